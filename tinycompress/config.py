"""The typed config schema: defaults < YAML file (``--config``) < command-line flags.

Every stage takes a :class:`Config`. Unknown keys and wrong types are refused with one
:class:`~tinycompress.errors.TinycompressError` that lists every problem, and the resolved
config is saved in each checkpoint's manifest so that any result can be traced and rerun.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tinycompress.errors import TinycompressError


class _Section(BaseModel):
    # Unknown keys are refused (typos must not be silently ignored); assignment is validated
    # too, so a config stays valid after overrides.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Section):
    name: str = Field("default", description="'default' (all-MiniLM-L6-v2, offline), an HF id or a local folder")
    max_length: int = Field(128, ge=8, le=512, description="Tokens per example; longer texts are truncated")


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
    batch_size: int = Field(32, ge=1, description="Fine-tuning batch size")
    eval_batch_size: int = Field(128, ge=1, description="Batch size for evaluation")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Share of the steps spent warming the learning rate up")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this norm")
    group_by_length: bool = Field(True, description="Batch similar lengths together (less padding)")


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


class Config(_Section):
    task: str = Field("sst2", description="GLUE task: sst2, cola, mrpc, rte, stsb, qnli, qqp, mnli")
    seed: int = Field(42, description="Random seed")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto | cpu | cuda | mps (auto = cuda > mps > cpu)"
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch / ONNX Runtime (if unset: all cores)")
    workdir: str = Field("runs", description="Workspace holding runs/<task>/<stage>-v<N> folders")
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    prune: PruneSettings = PruneSettings()
    quantize: QuantizeSettings = QuantizeSettings()
    export: ExportSettings = ExportSettings()
    report: ReportSettings = ReportSettings()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge; dotted override keys ('prune.ratio') address sub-sections."""
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


def _format_errors(error: ValidationError, source: str) -> str:
    problems = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        problems.append(f"{where}: {message}")
    return f"invalid config ({source}): " + "; ".join(problems)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, or one-line errors for a missing file / bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise TinycompressError(
            f"config file not found: {path}", "pass an existing YAML file to --config (see configs/)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise TinycompressError(f"malformed YAML at {where}: {problem}", "fix the file's syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TinycompressError(f"config file {path} must hold a mapping of keys, not a {type(data).__name__}")
    return data


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
    data = _merge(base or {}, read_yaml(path)) if path is not None else copy.deepcopy(base or {})
    for key, value in (overrides or {}).items():
        if value is UNSET:
            _remove(data, key)
    clean = {k: v for k, v in (overrides or {}).items() if v is not None and v is not UNSET}
    merged = _merge(data, clean)
    source = f"{path} + command-line flags" if path else "command-line flags"
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise TinycompressError(_format_errors(exc, source), "fix or remove the keys named") from None


def config_from_dict(data: dict[str, Any]) -> Config:
    """A Config saved in a manifest (already resolved)."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise TinycompressError(_format_errors(exc, "checkpoint manifest")) from None
