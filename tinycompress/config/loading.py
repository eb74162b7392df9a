"""A :class:`~tinycompress.config.schema.Config` from defaults < a parent checkpoint's config <
a YAML file < command-line flags, validated, with every problem listed in one
:class:`~tinycompress.errors.TinycompressError`."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tinycompress.config.schema import Config
from tinycompress.config.yaml_reader import TOO_DEEP_FIX, check_tree, path_text, read_yaml, render_value, yaml_type
from tinycompress.errors import TinycompressError


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge; dotted override keys ('prune.ratio') address sub-sections.

    Keys must be strings and nesting bounded (:func:`check_tree`, run on every input first)."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
            continue
        target = merged
        *parents, leaf = key.split(".")
        for part in parents:
            node = target.get(part)
            if not isinstance(node, dict):
                node = {}
                target[part] = node
            target = node
        target[leaf] = value
    return merged


# ------------------------------------------------------------------------------ error messages

_EXPECTED = {
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "finite_number": "expected a finite number",
    "model_type": "expected a section (a mapping of settings)",
    "model_attributes_type": "expected a section (a mapping of settings)",
    "recursion_loop": "refers to itself",
}


def _describe(item: Any) -> str:
    """One pydantic error as `what is wrong, got <value> (<YAML type>)`."""
    kind, value = item["type"], item.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "literal_error":
        message = f"expected {item.get('ctx', {}).get('expected') or item['msg'].removeprefix('Input should be ')}"
    elif kind == "float_type" and isinstance(value, int) and not isinstance(value, bool):
        message = "too large a number"
    elif kind in _EXPECTED:
        message = _EXPECTED[kind]
    else:
        message = item["msg"].replace("Input should be", "should be")
    if "input" not in item or kind == "recursion_loop":
        return message
    shown = render_value(value)
    if shown.startswith("a "):  # "a list of 3 items", "a 401-digit integer": the type is said
        return f"{message}, got {shown}"
    return f"{message}, got {shown} ({yaml_type(value)})"


def _format_errors(error: ValidationError, source: str) -> str:
    problems = []
    for item in error.errors():
        where = path_text(tuple(item["loc"])) or "(top level)"
        problems.append(f"{where}: {_describe(item)}")
    return f"invalid config ({source}): " + "; ".join(problems)


def _validate(data: Any, source: str, fix: str | None) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise TinycompressError(_format_errors(exc, source), fix) from None
    except RecursionError:  # refused by check_tree first; a last safety net
        raise TinycompressError(f"invalid config ({source}): nested too deeply", TOO_DEEP_FIX) from None


# ------------------------------------------------------------------------------ loading


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


# An override value that removes the key from the base and the YAML file, so the schema default
# applies: a command-line target (--speedup) must win over ratios a parent's config carries.
UNSET: Any = _Unset()


def _remove(data: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data.get(part)
        if not isinstance(data, dict):
            return
    data.pop(leaf, None)


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Defaults < ``base`` (a parent checkpoint's resolved config) < YAML file < overrides.

    Override keys are dotted ('prune.ratio'); None values are skipped (flag not given), and
    :data:`UNSET` values remove the key so its schema default applies.
    """
    if base is not None and not isinstance(base, dict):
        raise TinycompressError(
            f"the parent checkpoint's config is a {yaml_type(base)}, not a mapping of settings",
            "pass a checkpoint folder written by tinycompress",
        )
    overrides = overrides or {}
    source = f"{path} + command-line flags" if path else "command-line flags"
    try:
        check_tree(base or {}, "parent checkpoint's config")
        check_tree(overrides, "command-line flags")
        data = _merge(base or {}, read_yaml(path)) if path is not None else copy.deepcopy(base or {})
        for key, value in overrides.items():
            if value is UNSET:
                _remove(data, key)
        clean = {k: v for k, v in overrides.items() if v is not None and v is not UNSET}
        merged = _merge(data, clean)
    except RecursionError:  # refused by check_tree first; a last safety net
        raise TinycompressError(f"invalid config ({source}): nested too deeply", TOO_DEEP_FIX) from None
    return _validate(merged, source, "fix or remove the keys named")


def config_from_dict(data: dict[str, Any], source: str = "checkpoint manifest") -> Config:
    """A resolved Config as a dict (saved in a manifest, or a search's recipe applied), validated;
    ``source`` names it in errors."""
    check_tree(data, source)
    return _validate(data, source, None)
