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
    name: str = Field("default", description="'default' (all-MiniLM-L6-v2, offline), an HF id or a local path")
    max_length: int = Field(128, ge=8, le=512, description="tokens per example; longer texts are truncated")


class DataSettings(_Section):
    data_dir: str | None = Field(None, description="folder of GLUE TSVs; else $TINYCOMPRESS_DATA_DIR; else the hub")
    dev_fraction: float = Field(0.05, gt=0, lt=0.5, description="share of train carved off (seeded) for model selection")
    max_train_samples: int | None = Field(None, ge=1, description="use only this many training rows (quick runs)")
    max_test_samples: int | None = Field(None, ge=1, description="evaluate on only this many test rows")


class FinetuneSettings(_Section):
    epochs: int = Field(3, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    group_by_length: bool = Field(True, description="batch similar lengths together (less padding)")


class PruneSettings(_Section):
    criterion: Literal["taylor", "fisher", "magnitude", "random"] = "taylor"
    ratio: float = Field(0.5, ge=0, lt=1, description="fraction of all attention heads removed")
    ffn_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of all FFN neurons removed")
    steps: int = Field(1, ge=1, description="prune iteratively in this many steps, re-scoring between them")
    importance_samples: int = Field(1024, ge=1, description="training rows used to score importance")
    min_heads_per_layer: int = Field(1, ge=1, description="heads every layer keeps")
    min_neurons_per_layer: int = Field(1, ge=1, description="FFN neurons every layer keeps")
    recover_epochs: int = Field(1, ge=0, description="epochs of distillation from the parent after pruning")
    distill_temperature: float = Field(2.0, gt=0)
    distill_alpha: float = Field(0.5, ge=0, le=1, description="weight of the soft (teacher) loss; the rest is the hard label loss")
    vocab: bool = Field(False, description="also drop the embedding rows the task's texts never use")
    vocab_min_frequency: int = Field(1, ge=1, description="keep tokens seen at least this often")
    vocab_top_k: int | None = Field(None, ge=1, description="keep at most this many of the most frequent tokens")


class QuantizeSettings(_Section):
    backend: Literal["onnx", "torch"] = "onnx"
    mode: Literal["dynamic", "static"] = "dynamic"
    per_channel: bool = False
    quantize_embeddings: bool = Field(True, description="int8 word embeddings (Gather) too")
    calibration_samples: int = Field(128, ge=1, description="training rows used to calibrate static quantization")


class ExportSettings(_Section):
    format: Literal["onnx", "torchscript", "all"] = "onnx"
    opset: int = Field(17, ge=13)
    atol: float = Field(1e-4, gt=0, description="parity tolerance of fp32 exports against PyTorch")
    int8_atol: float = Field(0.1, gt=0, description="parity tolerance of int8 exports against PyTorch")


class ReportSettings(_Section):
    bench: bool = Field(False, description="measure latency now rather than read it from manifests")
    bench_runs: int = Field(50, ge=5)
    baselines: bool = Field(
        True,
        description="run: also int8-quantize the unpruned fine-tuned model (ONNX Runtime and torch, dynamic) -- "
        "what a user would do without pruning -- so the table compares against it; report: show such checkpoints",
    )


class Config(_Section):
    task: str = "sst2"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch/ORT intra-op threads; default: all cores")
    workdir: str = "runs"
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
        raise TinycompressError(f"config file not found: {path}", "pass an existing YAML file to --config (see configs/)")
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


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Defaults < ``base`` (a parent checkpoint's resolved config) < YAML file < overrides.

    Override keys are dotted ('prune.ratio'); None values are skipped (flag not given).
    """
    data = _merge(base or {}, read_yaml(path)) if path is not None else dict(base or {})
    clean = {k: v for k, v in (overrides or {}).items() if v is not None}
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
