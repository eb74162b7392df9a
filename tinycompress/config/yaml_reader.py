"""Config files as YAML: PyYAML's safe loader with YAML 1.2 floats (``learning_rate: 5e-5``), a
nesting limit, and every problem as one :class:`~tinycompress.errors.TinycompressError` naming the
file and line; and how a loaded value is spelled back in those messages."""

from __future__ import annotations

import datetime
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from tinycompress.errors import TinycompressError
from tinycompress.text_files import read_text

# Levels of mappings and lists a config may nest (it needs three: file, section, value). Deeper
# input is refused before it can exhaust Python's recursion limit in PyYAML or pydantic.
MAX_DEPTH = 32

TOO_DEEP_FIX = "a config holds sections of settings (e.g. `finetune: {epochs: 3}`); remove the extra nesting"
_KEY_FIX = (
    "keys are setting names such as `epochs` or `prune.ratio`; "
    "quote a key that YAML would read as a number, true/false or null"
)

# YAML 1.1 (PyYAML) reads a float only with a dot and a signed exponent, so `5e-5` or `1.0e5`
# would be strings; YAML 1.2 reads them as numbers, and so does a config file.
_FLOAT_WITH_EXPONENT = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$")


class _TooDeep(yaml.YAMLError):
    def __init__(self, mark: Any):
        super().__init__("nested too deeply")
        self.mark = mark


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2 floats, a nesting limit, and a bad scalar
    (``!!int abc``, a date like ``2024-13-45``, a 5,000-digit integer) as a marked YAML error."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        # PyYAML composes nested nodes recursively: stop well before the recursion limit.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, AttributeError, OverflowError) as exc:
            kind = str(node.tag).rsplit(":", 1)[-1]
            kind = {"int": "an integer", "float": "a number", "bool": "true or false"}.get(kind, f"a {kind}")
            text = node.value if isinstance(node.value, str) else f"this {node.id}"
            reason = str(exc).split(":")[0]  # not the offending value again, nor sys.set_int_max_str_digits
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {shorten(text)} as {kind} ({shorten(reason, 80)})", node.start_mark
            ) from None


_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITH_EXPONENT, list("-+0123456789."))


def shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[: limit - 1]}… ({len(text)} characters)"


def _yaml_error(exc: yaml.YAMLError, text: str, source: str | Path) -> TinycompressError:
    if isinstance(exc, _TooDeep):
        return TinycompressError(
            f"{source}:{exc.mark.line + 1}: nested too deeply (more than {MAX_DEPTH} levels of mappings and lists)",
            TOO_DEEP_FIX,
        )
    if isinstance(exc, yaml.reader.ReaderError):
        line = text[: exc.position].count("\n") + 1
        return TinycompressError(
            f"malformed YAML at {source}:{line}: unacceptable character #x{exc.character:04x} ({exc.reason})",
            "remove the control character",
        )
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}" if mark is not None else str(source)
    problem = getattr(exc, "problem", None) or "malformed YAML"
    return TinycompressError(f"malformed YAML at {where}: {problem}", "fix the file's syntax")


def parse_yaml(text: str, source: str | Path) -> Any:
    """The YAML document in ``text`` (None if it is empty), read as config files are: YAML 1.2
    floats (``5e-5``), at most :data:`MAX_DEPTH` levels of nesting, also through aliases.

    Any problem is one :class:`TinycompressError` naming ``source`` (a file, for messages) and,
    where it can, the line.
    """
    try:
        data = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, text, source) from None
    except RecursionError:
        # A merge key (`<<`) that refers to itself; deep nesting is refused above.
        raise TinycompressError(
            f"{source}: nested too deeply (a `<<` merge or an alias refers to itself)", TOO_DEEP_FIX
        ) from None
    check_tree(data, str(source), keys=False)
    return data


def path_text(path: tuple[Any, ...]) -> str:
    text = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + (part if isinstance(part, str) and part else render_value(part))
    return shorten(text, 60)


def check_tree(data: Any, source: str, *, keys: bool = True) -> None:
    """Refuse more than :data:`MAX_DEPTH` levels of nesting (aliases included: an alias that
    refers to its own node nests forever) and, with ``keys``, a mapping key that is not a string
    (``1: 2``, ``null: x``) along the chain of mappings that the config's sections are.

    Iterative (a recursive walk would itself overflow); a node reached again through an alias is
    walked again only when reached deeper than before, so at most MAX_DEPTH times.
    """
    deepest: dict[int, int] = {}
    stack: list[tuple[Any, tuple[Any, ...], int, bool]] = [(data, (), 1, True)]
    while stack:
        node, path, depth, in_sections = stack.pop()
        if not isinstance(node, (dict, list, tuple, set, frozenset)):
            continue
        if depth > MAX_DEPTH:
            raise TinycompressError(
                f"invalid config ({source}): {path_text(path[:3])}… nested too deeply "
                f"(more than {MAX_DEPTH} levels of mappings and lists, or an alias that refers to itself)",
                TOO_DEEP_FIX,
            )
        if deepest.get(id(node), 0) >= depth:
            continue
        deepest[id(node)] = depth
        if isinstance(node, dict):
            for key, value in node.items():
                if keys and in_sections and not isinstance(key, str):
                    where = f"{path_text(path)}: " if path else ""
                    raise TinycompressError(
                        f"invalid config ({source}): {where}key {render_value(key)} ({yaml_type(key)}) is not a setting name",
                        _KEY_FIX,
                    )
                stack.append((value, (*path, key), depth + 1, in_sections))
        else:
            for index, value in enumerate(node):
                stack.append((value, (*path, index), depth + 1, False))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a UTF-8 file, or one-line errors for a missing / unreadable / non-UTF-8
    file, bad YAML, too deep nesting, or a key that is not a string."""
    path = Path(path)
    try:
        exists = path.exists()
    except (OSError, ValueError):
        exists = False
    if not exists:
        raise TinycompressError(
            f"config file not found: {path}", "pass an existing YAML file to --config (see configs/)"
        )
    data = parse_yaml(read_text(path, what="config file"), path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TinycompressError(
            f"config file {path} must hold a mapping of keys, not a {yaml_type(data)}",
            "write `key: value` lines (see configs/)",
        )
    check_tree(data, str(path))
    return data


def yaml_type(value: Any) -> str:
    """The YAML name of a loaded value's type, as a user wrote it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, (set, frozenset)):
        return "set"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return "timestamp"
    if isinstance(value, (bytes, bytearray)):
        return "binary"
    return type(value).__name__


def render_value(value: Any) -> str:
    """``value`` as YAML would spell it, shortened; safe for huge or self-referring values."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if value.bit_length() > 64:  # str() refuses integers of more than 4300 digits
            digits = int(value.bit_length() * math.log10(2)) + 1
            digits -= 10 ** (digits - 1) > abs(value)
            return f"a {digits}-digit integer"
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(shorten(value), ensure_ascii=False)
    if isinstance(value, dict):
        return f"a mapping of {len(value)} keys"
    if isinstance(value, (list, tuple, set, frozenset)):
        return f"a {yaml_type(value)} of {len(value)} items"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return f"a binary value of {len(value)} bytes"
    return f"a {yaml_type(value)} value"
