"""Stage 3: post-training int8 quantization of a (pruned) model.

    tinycompress quantize --task sst2                        # newest prune-v<N>, ONNX Runtime dynamic int8
    tinycompress quantize runs/sst2/finetune-v1              # the unpruned model, for comparison
    tinycompress quantize --backend torch                    # torch dynamic int8 Linear + int8 embedding
    tinycompress quantize --mode static --per-channel        # ONNX QDQ, calibrated on training rows

The parent is the newest ``prune`` checkpoint of the task, or an explicit ``finetune`` / ``prune``
folder. Quantize and export folders are refused: quantizing twice compounds the rounding error.

Backends
--------
``onnx`` (default), ``mode: dynamic``: export (dynamic batch and sequence axes) -> ORT transformer
optimizer (Attention / EmbedLayerNormalization fusion, with each pruned layer's own head count)
-> dynamic int8 of MatMul, the fused Attention and, with ``quantize_embeddings``, the word
embedding (Gather, or EmbedLayerNormalization once fused). Only the int8 ``model.onnx`` is kept.

``onnx``, ``mode: static``: QDQ int8 of MatMul (and Gather) calibrated (MinMax) on
``calibration_samples`` seeded-random training rows. It quantizes the *unfused* export: ORT's QDQ
quantizer has no Attention / EmbedLayerNormalization support, so fusing first would leave the
attention and embedding weights fp32. ORT fuses Q/DQ pairs into int8 kernels at session load.

``torch``: ``torch.ao`` dynamic int8 Linear + weight-only int8 word embedding
(:mod:`tinycompress.int8`), stored as ``int8_weights.safetensors`` + ``int8_recipe.json``.

The test metrics are measured by running the written artifact (ONNX Runtime session or the
reloaded int8 module) on the test split, and latency at batch 1 and 32 is measured on real test
texts; both land in the manifest with the machine they ran on (int8 speed depends on its
vector extensions).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .checkpoint import Checkpoint, load_hf_model, resolve_input, save_tokenizer, write_checkpoint
from .config import Config, QuantizeSettings
from .errors import TinycompressError
from .lineage import check_parent
from .runtime import ONNX_FILE

CALIBRATION_BATCH_SIZE = 32


def check_settings(config: Config) -> None:
    """Refuse setting combinations that have no implementation, before any work."""
    if config.quantize.mode == "static" and config.quantize.backend != "onnx":
        raise TinycompressError("quantize.mode static is only implemented for quantize.backend onnx", "use --backend onnx, or --mode dynamic")


# ------------------------------------------------------------------------------ ONNX backend


def export_optimized_onnx(model, path: Path, *, opset: int, scratch: Path) -> dict[str, Any]:
    """Export ``model`` to ONNX and fuse it with ORT's transformer optimizer into ``path``.

    Returns ``{"fused_ops": {op: count > 0}, "attention_fusion": bool, "fused_attention_heads":
    [heads per fused layer]}``. Model types ORT has no fusions for are exported unfused.
    """
    from .onnx_utils import attention_head_counts, export_onnx, optimize_onnx

    raw = export_onnx(model, scratch / "fp32-raw.onnx", opset=opset)
    if not _ort_can_fuse(model.config.model_type):
        shutil.copyfile(raw, path)
        return {"fused_ops": {}, "attention_fusion": False, "fused_attention_heads": []}
    stats = optimize_onnx(raw, path, model_type=model.config.model_type)
    fused = {op: n for op, n in stats.items() if n and op != "pinned_attention_layers"}
    return {"fused_ops": fused, "attention_fusion": fused.get("Attention", 0) > 0, "fused_attention_heads": attention_head_counts(path)}


def _ort_can_fuse(model_type: str) -> bool:
    from onnxruntime.transformers.optimizer import MODEL_TYPES

    # onnx_utils.optimize_onnx maps these BERT relatives onto ORT's "bert" fusions.
    return model_type in MODEL_TYPES or model_type in ("distilbert", "minilm", "roberta")


def _dynamic_op_types(quantize_embeddings: bool) -> tuple[str, ...]:
    from .onnx_utils import FUSED_GRAPH_OP_TYPES

    embedding_ops = ("Gather", "EmbedLayerNormalization")
    return tuple(op for op in FUSED_GRAPH_OP_TYPES if quantize_embeddings or op not in embedding_ops)


def quantize_onnx_model(model, path: Path, settings: QuantizeSettings, *, opset: int, calibration: Sequence[dict] | None = None) -> dict[str, Any]:
    """Write the int8 ONNX model of ``model`` (fp32 HF classifier) to ``path``; fp32 graphs stay
    in a temporary folder.

    ``calibration`` (a list of input dicts) is required for ``settings.mode == "static"``.
    Returns details: quantized op counts, fused op counts, fusion flag and head counts.
    """
    from .onnx_utils import export_onnx, quantize_onnx_dynamic, quantize_onnx_static

    with tempfile.TemporaryDirectory(prefix="tinycompress-onnx-") as scratch:
        scratch = Path(scratch)
        if settings.mode == "dynamic":
            graph = export_optimized_onnx(model, scratch / "fp32-optimized.onnx", opset=opset, scratch=scratch)
            with warnings.catch_warnings():
                # Without quantize_embeddings the fused embedding is left fp32 on purpose.
                warnings.filterwarnings("ignore", message=r"graph contains fused .* leaves in fp32")
                ops = _dynamic_op_types(settings.quantize_embeddings)
                counts = quantize_onnx_dynamic(scratch / "fp32-optimized.onnx", path, op_types=ops, per_channel=settings.per_channel)
        else:
            raw = export_onnx(model, scratch / "fp32-raw.onnx", opset=opset)
            ops = ("MatMul", "Gather") if settings.quantize_embeddings else ("MatMul",)
            counts = quantize_onnx_static(raw, path, list(calibration or []), per_channel=settings.per_channel, op_types=ops)
            graph = {"fused_ops": {}, "attention_fusion": False, "fused_attention_heads": []}
    return {"quantized_ops": counts, **graph}


def calibration_batches(tokenizer, examples, rows: int, *, max_length: int, seed: int) -> list[dict]:
    """Input dicts (no labels) over ``rows`` seeded-random rows of ``examples`` (training rows)."""
    from .data import encode, iterate_batches
    from .data import padding_id
    from .prune import subset_rows

    subset = subset_rows(encode(tokenizer, examples, max_length), rows, seed)
    pad_id = padding_id(tokenizer)
    batches = []
    for _, batch in iterate_batches(subset, CALIBRATION_BATCH_SIZE, pad_id, regression=False):
        batch.pop("labels", None)
        batches.append(batch)
    return batches


# ------------------------------------------------------------------------------ torch backend


def quantize_torch_model(model, folder: Path, settings: QuantizeSettings) -> dict[str, Any]:
    """Write ``int8_weights.safetensors`` + ``int8_recipe.json`` of ``model`` into ``folder``."""
    from .int8 import INT8_RECIPE_FILE, quantize_torch_dynamic, save_torch_int8

    qmodel = quantize_torch_dynamic(model, per_channel=settings.per_channel, quantize_embeddings=settings.quantize_embeddings)
    save_torch_int8(qmodel, folder)
    recipe = json.loads((folder / INT8_RECIPE_FILE).read_text())
    counts = {"Linear": len(recipe["linear"]), "Embedding": len(recipe["embedding"])}
    return {"quantized_ops": counts, "fused_ops": {}, "attention_fusion": False, "fused_attention_heads": []}


# ------------------------------------------------------------------------------ measuring the artifact


def artifact_latency(predictor, texts: Sequence, *, runs: int, threads: int) -> dict[str, Any]:
    """``{"batch_1": {median_ms, p90_ms, runs}, "batch_32": {...}, "machine": {...}}`` of a
    predictor on real texts (the same rows :func:`tinycompress.bench.latency_batches` picks
    for every model compared)."""
    from .bench import latency_batches, measure_latency
    from .envinfo import machine_info

    result: dict[str, Any] = {}
    for size, inputs in latency_batches(predictor.tokenizer, texts, predictor.max_length).items():
        result[f"batch_{size}"] = measure_latency(lambda inputs=inputs: predictor.forward(inputs), runs=runs)
    result["machine"] = machine_info(threads)
    return result


def _versions() -> dict[str, str]:
    from importlib import metadata

    return {name: metadata.version(name) for name in ("onnxruntime", "torch")}


# ------------------------------------------------------------------------------ the stage


@dataclass
class QuantizeResult:
    """A quantized model written to a staging folder, measured, not yet a checkpoint."""

    staging: Path
    parent: Checkpoint
    metrics: dict[str, Any]
    details: dict[str, Any]


def build_artifact(config: Config, model, tokenizer, staging: Path, data) -> dict[str, Any]:
    """Write the int8 model, config.json and tokenizer files into ``staging``; returns details."""
    settings = config.quantize
    calibration = None
    if settings.backend == "onnx" and settings.mode == "static":
        calibration = calibration_batches(tokenizer, data.train, settings.calibration_samples, max_length=config.model.max_length, seed=config.seed)
    if settings.backend == "onnx":
        details = quantize_onnx_model(model, staging / ONNX_FILE, settings, opset=config.export.opset, calibration=calibration)
    else:
        details = quantize_torch_model(model, staging, settings)
    model.config.save_pretrained(staging)
    save_tokenizer(staging, tokenizer, config.model.max_length)
    details["calibration_rows"] = min(settings.calibration_samples, len(data.train)) if calibration is not None else 0
    return details


def run_quantize(config: Config, parent: Checkpoint, staging: Path) -> QuantizeResult:
    """Quantize ``parent`` into ``staging`` and measure the artifact; writes no checkpoint."""
    from .evaluate import evaluate_predictor
    from .finetune import load_data, prepare
    from .modeling import count_parameters
    from .pruning import head_counts
    from .runtime import load_predictor

    check_parent("quantize", parent, config)  # again: callers may skip quantize()
    check_settings(config)
    spec, _, threads = prepare(config)
    model, tokenizer = load_hf_model(parent)
    data = load_data(config, spec)
    start = time.perf_counter()
    built = build_artifact(config, model, tokenizer, staging, data)
    seconds = time.perf_counter() - start
    # The artifact itself is measured: nothing about int8 accuracy is assumed.
    predictor = load_predictor(staging, threads=threads)
    predictor.max_length = config.model.max_length
    metrics = evaluate_predictor(predictor, config, spec)
    metrics |= {f"parent/{k}": v for k, v in parent.metrics.items() if k.startswith("test/")}
    metrics |= {
        "parameters": count_parameters(model),
        "parent/model_bytes": parent.manifest.get("model_bytes"),
        "test_rows": len(data.test),
        "threads": threads,
        "quantize_seconds": round(seconds, 1),
    }
    details = {
        "backend": config.quantize.backend, "mode": config.quantize.mode, "per_channel": config.quantize.per_channel,
        "quantize_embeddings": config.quantize.quantize_embeddings, **built,
        "attention_heads": head_counts(model), "opset": config.export.opset if config.quantize.backend == "onnx" else None,
        "versions": _versions(), "data_source": data.source,
        "latency": artifact_latency(predictor, data.test.texts, runs=config.report.bench_runs, threads=threads),
    }
    details["machine"] = details["latency"]["machine"]
    return QuantizeResult(staging, parent, metrics, details)


def write_quantize(config: Config, result: QuantizeResult) -> Checkpoint:
    """Move the staged files into the next ``quantize-v<N>`` folder of the parent's task."""

    def move_files(folder: Path) -> None:
        for item in result.staging.iterdir():
            shutil.move(str(item), str(folder / item.name))

    return write_checkpoint(
        config.workdir, result.parent.task, "quantize", move_files,
        config=config, metrics=result.metrics, seed=config.seed, parent=result.parent, details=result.details,
    )


def quantize(config: Config, parent: str | Path | Checkpoint | None = None) -> Checkpoint:
    """Quantize ``parent`` (default: the newest prune checkpoint of ``config.task``); returns the
    new ``quantize-v<N>`` checkpoint.

    Raises :class:`TinycompressError` (and writes nothing) for a missing or corrupt parent, a
    parent of another stage or task, or ``mode: static`` with ``backend: torch``. Build
    ``config`` on :func:`parent_base` so the parent's data and model settings carry over.
    """
    if not isinstance(parent, Checkpoint):
        parent = resolve_input(parent, workdir=config.workdir, task=config.task, stage="quantize")
    check_parent("quantize", parent, config)
    check_settings(config)
    with tempfile.TemporaryDirectory(prefix="tinycompress-quantize-") as staging:
        return write_quantize(config, run_quantize(config, parent, Path(staging)))
