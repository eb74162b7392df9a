"""The typed config schema: defaults < YAML file (``--config``) < command-line flags.

Every stage takes a :class:`Config`. Unknown keys and wrong types are refused with one
:class:`~tinycompress.errors.TinycompressError` that lists every problem, and the resolved
config is saved in each checkpoint's manifest so that any result can be traced and rerun.

Types are strict: ``epochs: true``, ``seed: "7"`` or ``vocab: "yes"`` are errors rather than
quietly becoming 1, 7 and True; an integer is accepted where a number is expected
(``speedup: 2``), and every number must be finite (no ``.inf`` / ``.nan``). Config files are
read as UTF-8 YAML, whose floats may also be written without a dot (``learning_rate: 5e-5``,
as in YAML 1.2).
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from tinycompress.errors import TinycompressError
from tinycompress.text_files import read_text


class _Section(BaseModel):
    # Unknown keys are refused (typos must not be silently ignored); assignment is validated
    # too, so a config stays valid after overrides. Strict types: no bool -> int, no str ->
    # number / bool (an int is still accepted for a float); numbers must be finite.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class ModelSettings(_Section):
    name: str = Field("default", description="'default' (all-MiniLM-L6-v2, offline), an HF id or a local folder")
    max_length: int = Field(128, ge=8, le=512, description="Tokens per example; longer texts are truncated")
    head: Literal["auto", "cls", "mean"] = Field(
        "cls",
        description=(
            "Classification head of a fine-tune: cls (Hugging Face's pooled [CLS]; loads anywhere) | mean (mean of "
            "the token states; loads with tinycompress or as ONNX) | auto (the pooling a sentence-transformers "
            "model was trained with, else cls)"
        ),
    )


class DataSettings(_Section):
    data_dir: str | None = Field(
        None, description="Folder of GLUE TSVs (if unset: $TINYCOMPRESS_DATA_DIR, else the hub)"
    )
    dev_fraction: float = Field(
        0.05, gt=0, lt=0.5, description="Share of train carved off (seeded) for model selection"
    )
    max_train_samples: int | None = Field(None, ge=1, description="Use only this many training rows (quick runs)")
    max_test_samples: int | None = Field(None, ge=1, description="Evaluate on only this many test rows")


class FinetuneSettings(_Section):
    epochs: int = Field(3, ge=1, description="Fine-tuning epochs")
    learning_rate: float = Field(5e-5, gt=0, description="Fine-tuning learning rate")
    batch_size: int = Field(
        32, ge=1, description="Fine-tuning batch size: rows per optimizer step, over all processes of a launched run"
    )
    eval_batch_size: int = Field(128, ge=1, description="Batch size for evaluation")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Share of the steps spent warming the learning rate up")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this norm")
    classifier_dropout: float | None = Field(
        None, ge=0, lt=1, description="Dropout before the classifier layer (if unset: the model's own, 0.1 for BERT)"
    )
    group_by_length: bool = Field(True, description="Batch similar lengths together (less padding)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Training precision: fp32 | bf16 | fp16 (mixed precision through Accelerate; fp16 needs CUDA)",
    )
    grad_accum: int = Field(
        1,
        ge=1,
        description=(
            "Micro-batches per optimizer step on each process (gradient accumulation); the batch size stays the "
            "optimizer step's, so it must be a multiple of processes x grad_accum"
        ),
    )


class PruneSettings(_Section):
    criterion: Literal["taylor", "fisher", "magnitude", "random"] | None = Field(
        None,
        description=(
            "taylor | fisher | magnitude | random (if unset: fisher for a target, whose search weighs heads "
            "against neurons; taylor for ratios)"
        ),
    )
    ratio: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Fraction of all attention heads removed, in [0, 1); setting it (or --ffn-ratio) prunes by ratios instead of a target",
    )
    ffn_ratio: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Fraction of all FFN neurons removed, in [0, 1); setting it (or --ratio) prunes by ratios instead of a target",
    )
    steps: int = Field(1, ge=1, description="Prune in this many steps, re-scoring between them")
    importance_samples: int = Field(1024, ge=1, description="Training rows used to score importance")
    min_heads_per_layer: int = Field(
        0, ge=0, description="Heads every layer keeps (0: a layer may lose its attention block)"
    )
    min_neurons_per_layer: int = Field(
        0, ge=0, description="FFN neurons every layer keeps (0: a layer may lose its FFN; with neither it is removed)"
    )
    speedup: float | None = Field(
        2.0,
        gt=1,
        description=(
            "Target: prune until the int8 (ONNX Runtime) model runs this many times faster than the unpruned int8 "
            "model at --target-batch-size, by this machine's measured latency table (the default target unless "
            "a ratio, --target-latency-ms or --target-size-mb is set)"
        ),
    )
    target_latency_ms: float | None = Field(
        None, gt=0, description="Target: int8 (ONNX Runtime) latency in ms at --target-batch-size, instead of --speedup"
    )
    target_size_mb: float | None = Field(
        None, gt=0, description="Target: size of the int8 (ONNX Runtime) model file in MB, instead of --speedup"
    )
    target_batch_size: Literal[1, 32] = Field(
        32, description="Batch size the latency targets and the measured speed-up refer to: 1 | 32"
    )
    mask_tuning: bool = Field(
        True,
        description=(
            "After pruning, rescale the kept heads and neurons of each layer by least squares to reconstruct the "
            "parent's layer outputs on training rows (retraining-free, Kwon et al. 2022)"
        ),
    )
    mask_tuning_samples: int = Field(2048, ge=1, description="Training rows the least-squares rescaling fits")
    recover_epochs: int = Field(2, ge=0, description="Epochs of distillation from the parent after pruning; 0 = none")
    distill_temperature: float = Field(2.0, gt=0, description="Softmax temperature of the distillation loss")
    distill_alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the soft (teacher) loss; the rest is the hard label loss"
    )
    distill_layer_weight: float = Field(
        1.0,
        ge=0,
        description=(
            "Weight of the per-layer hidden-state loss (MSE to the parent's matching layer, TinyBERT / CoFi) "
            "added to the distillation loss; 0 = logits only"
        ),
    )
    vocab: bool = Field(
        False, description="Also drop the word-embedding rows of tokens the train and dev texts never use"
    )
    vocab_min_frequency: int = Field(1, ge=1, description="With --vocab: keep tokens seen at least this often")
    vocab_top_k: int | None = Field(
        None,
        ge=1,
        description="With --vocab: keep at most this many of the most frequent tokens, special tokens aside (if unset: no limit)",
    )

    @field_validator("target_batch_size", mode="before")
    @classmethod
    def _batch_size_is_an_int(cls, value: Any) -> Any:
        # A Literal of ints compares by equality, so it would take true for 1 and 32.0 for 32.
        if type(value) is not int:
            raise PydanticCustomError("literal_error", "Input should be 1 or 32", {"expected": "1 or 32"})
        return value


class QuantizeSettings(_Section):
    backend: Literal["onnx", "torch"] = Field(
        "onnx", description="Quantization backend: onnx (ONNX Runtime) | torch (torch int8 Linear + int8 embedding)"
    )
    mode: Literal["dynamic", "static"] = Field(
        "dynamic", description="dynamic | static (ONNX QDQ, calibrated on training rows)"
    )
    per_channel: bool = Field(False, description="Weight scales per output channel (on) or per tensor (off)")
    quantize_embeddings: bool = Field(True, description="Quantize the word embedding (Gather) too")
    calibration_samples: int = Field(128, ge=1, description="Training rows calibrating static quantization")
    tolerance: float | None = Field(
        None,
        ge=0,
        description=(
            "Accuracy-driven tuning (ONNX backend): try int8 recipes and keep the most sensitive layers fp32 "
            "until the dev metric is within this many points (0.3 = 0.003 accuracy) of the fp32 model's, "
            "then keep the fastest such candidate (if unset: no tuning, the configured recipe)"
        ),
    )


class ExportSettings(_Section):
    format: Literal["onnx", "torchscript", "all"] = Field("onnx", description="Export format: onnx | torchscript | all")
    opset: int = Field(17, ge=13, description="ONNX opset of fp32 exports")
    atol: float = Field(1e-4, gt=0, description="Parity tolerance of fp32 exports against PyTorch")
    int8_atol: float = Field(0.1, gt=0, description="Parity tolerance of int8 exports against PyTorch")


class ReportSettings(_Section):
    bench: bool = Field(
        False, description="Measure every row's latency on this machine now, rather than read it from the manifests"
    )
    bench_runs: int = Field(50, ge=5, description="Timed runs per batch size when latency is measured")
    baselines: bool = Field(
        True,
        description="Also int8-quantize the unpruned fine-tuned model (ONNX Runtime and torch) for comparison",
    )


class SearchSettings(_Section):
    trials: int = Field(
        20,
        ge=1,
        description="Trials of `finetune --search` in all: a search resumed after Ctrl-C runs only the ones missing",
    )
    samples: int | None = Field(
        4000,
        ge=1,
        description="Training rows each search trial trains on (if unset: all); the chosen recipe then trains on all rows",
    )


class Config(_Section):
    task: str = Field("sst2", description="GLUE task: sst2, cola, mrpc, rte, stsb, qnli, qqp, mnli")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Random seed")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto | cpu | cuda | mps (auto = cuda > mps > cpu)"
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch / ONNX Runtime (if unset: all cores)")
    workdir: str = Field("runs", description="Workspace holding runs/<task>/<stage>-v<N> folders")
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    search: SearchSettings = SearchSettings()
    prune: PruneSettings = PruneSettings()
    quantize: QuantizeSettings = QuantizeSettings()
    export: ExportSettings = ExportSettings()
    report: ReportSettings = ReportSettings()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ------------------------------------------------------------------------------ reading YAML

# Levels of mappings and lists a config may nest (it needs three: file, section, value). Deeper
# input is refused before it can exhaust Python's recursion limit in PyYAML or pydantic.
MAX_DEPTH = 32

_TOO_DEEP_FIX = "a config holds sections of settings (e.g. `finetune: {epochs: 3}`); remove the extra nesting"
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
                None, None, f"cannot read {_short(text)} as {kind} ({_short(reason, 80)})", node.start_mark
            ) from None


_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITH_EXPONENT, list("-+0123456789."))


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[: limit - 1]}… ({len(text)} characters)"


def _yaml_error(exc: yaml.YAMLError, text: str, source: str | Path) -> TinycompressError:
    if isinstance(exc, _TooDeep):
        return TinycompressError(
            f"{source}:{exc.mark.line + 1}: nested too deeply (more than {MAX_DEPTH} levels of mappings and lists)",
            _TOO_DEEP_FIX,
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
            f"{source}: nested too deeply (a `<<` merge or an alias refers to itself)", _TOO_DEEP_FIX
        ) from None
    _check_tree(data, str(source), keys=False)
    return data


def _path_text(path: tuple[Any, ...]) -> str:
    text = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + (part if isinstance(part, str) and part else _render(part))
    return _short(text, 60)


def _check_tree(data: Any, source: str, *, keys: bool = True) -> None:
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
                f"invalid config ({source}): {_path_text(path[:3])}… nested too deeply "
                f"(more than {MAX_DEPTH} levels of mappings and lists, or an alias that refers to itself)",
                _TOO_DEEP_FIX,
            )
        if deepest.get(id(node), 0) >= depth:
            continue
        deepest[id(node)] = depth
        if isinstance(node, dict):
            for key, value in node.items():
                if keys and in_sections and not isinstance(key, str):
                    where = f"{_path_text(path)}: " if path else ""
                    raise TinycompressError(
                        f"invalid config ({source}): {where}key {_render(key)} ({_yaml_type(key)}) is not a setting name",
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
            f"config file {path} must hold a mapping of keys, not a {_yaml_type(data)}",
            "write `key: value` lines (see configs/)",
        )
    _check_tree(data, str(path))
    return data


# ------------------------------------------------------------------------------ merging


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge; dotted override keys ('prune.ratio') address sub-sections.

    Keys must be strings and nesting bounded (:func:`_check_tree`, run on every input first)."""
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


def _yaml_type(value: Any) -> str:
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


def _render(value: Any) -> str:
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
        return json.dumps(_short(value), ensure_ascii=False)
    if isinstance(value, dict):
        return f"a mapping of {len(value)} keys"
    if isinstance(value, (list, tuple, set, frozenset)):
        return f"a {_yaml_type(value)} of {len(value)} items"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return f"a binary value of {len(value)} bytes"
    return f"a {_yaml_type(value)} value"


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
    shown = _render(value)
    if shown.startswith("a "):  # "a list of 3 items", "a 401-digit integer": the type is said
        return f"{message}, got {shown}"
    return f"{message}, got {shown} ({_yaml_type(value)})"


def _format_errors(error: ValidationError, source: str) -> str:
    problems = []
    for item in error.errors():
        where = _path_text(tuple(item["loc"])) or "(top level)"
        problems.append(f"{where}: {_describe(item)}")
    return f"invalid config ({source}): " + "; ".join(problems)


def _validate(data: Any, source: str, fix: str | None) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise TinycompressError(_format_errors(exc, source), fix) from None
    except RecursionError:  # refused by _check_tree first; a last safety net
        raise TinycompressError(f"invalid config ({source}): nested too deeply", _TOO_DEEP_FIX) from None


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
            f"the parent checkpoint's config is a {_yaml_type(base)}, not a mapping of settings",
            "pass a checkpoint folder written by tinycompress",
        )
    overrides = overrides or {}
    source = f"{path} + command-line flags" if path else "command-line flags"
    try:
        _check_tree(base or {}, "parent checkpoint's config")
        _check_tree(overrides, "command-line flags")
        data = _merge(base or {}, read_yaml(path)) if path is not None else copy.deepcopy(base or {})
        for key, value in overrides.items():
            if value is UNSET:
                _remove(data, key)
        clean = {k: v for k, v in overrides.items() if v is not None and v is not UNSET}
        merged = _merge(data, clean)
    except RecursionError:  # refused by _check_tree first; a last safety net
        raise TinycompressError(f"invalid config ({source}): nested too deeply", _TOO_DEEP_FIX) from None
    return _validate(merged, source, "fix or remove the keys named")


def config_from_dict(data: dict[str, Any], source: str = "checkpoint manifest") -> Config:
    """A resolved Config as a dict (saved in a manifest, or a search's recipe applied), validated;
    ``source`` names it in errors."""
    _check_tree(data, source)
    return _validate(data, source, None)
