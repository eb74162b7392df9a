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
from pathlib import Path
from typing import Any, Sequence

from .checkpoint import BASELINE_FLAG, Checkpoint, Measured, load_hf_model, resolve_input, save_config_and_tokenizer, write_checkpoint
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
    [heads per fused layer]}``. Families ORT has no fusions for (``ArchSpec.ort_model_type``
    None) are exported unfused.
    """
    from .arch import get_arch
    from .onnx_utils import attention_head_counts, export_onnx, optimize_onnx

    raw = export_onnx(model, scratch / "fp32-raw.onnx", opset=opset)
    ort_type = get_arch(model).ort_model_type
    if ort_type is None:
        shutil.copyfile(raw, path)
        return {"fused_ops": {}, "attention_fusion": False, "fused_attention_heads": []}
    stats = optimize_onnx(raw, path, model_type=ort_type)
    fused = {op: n for op, n in stats.items() if n and op != "pinned_attention_layers"}
    return {"fused_ops": fused, "attention_fusion": fused.get("Attention", 0) > 0, "fused_attention_heads": attention_head_counts(path)}


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
    from .data import encode, iterate_batches, padding_id, subset_rows

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


def _versions() -> dict[str, str]:
    """The runtimes int8 speed and accuracy depend on (a subset of the manifest's versions)."""
    from .checkpoint import library_versions

    return {name: version for name, version in library_versions().items() if name in ("onnxruntime", "torch")}


# ------------------------------------------------------------------------------ the stage


def _size_mb(n_bytes) -> str:
    return f"{n_bytes / 1e6:.2f} MB" if isinstance(n_bytes, (int, float)) else "?"


def summary_line(checkpoint: Checkpoint) -> str:
    """``size 5.81 MB (parent 22.71 MB); latency median batch 1 2.10 ms, batch 32 41.00 ms (2 threads)``
    of a quantize checkpoint, from its manifest."""
    latency = checkpoint.details["latency"]
    return (
        f"size {_size_mb(checkpoint.model_bytes)} (parent {_size_mb(checkpoint.metrics.get('parent/model_bytes'))}); "
        f"latency median batch 1 {latency['batch_1']['median_ms']:.2f} ms, batch 32 {latency['batch_32']['median_ms']:.2f} ms "
        f"({latency['machine']['threads']} threads)"
    )


def build_artifact(config: Config, model, tokenizer, folder: Path, data) -> dict[str, Any]:
    """Write the int8 model, config.json and tokenizer files into ``folder``; returns details."""
    settings = config.quantize
    calibration = None
    if settings.backend == "onnx" and settings.mode == "static":
        calibration = calibration_batches(tokenizer, data.train, settings.calibration_samples, max_length=config.model.max_length, seed=config.seed)
    if settings.backend == "onnx":
        details = quantize_onnx_model(model, folder / ONNX_FILE, settings, opset=config.export.opset, calibration=calibration)
    else:
        details = quantize_torch_model(model, folder, settings)
    save_config_and_tokenizer(folder, model.config, tokenizer, config.model.max_length)
    details["calibration_rows"] = min(settings.calibration_samples, len(data.train)) if calibration is not None else 0
    return details


def run_quantize(config: Config, parent: Checkpoint, folder: Path) -> Measured:
    """Quantize ``parent`` into ``folder`` and measure the artifact there; returns the metrics
    and details for the manifest. Used as :func:`~tinycompress.checkpoint.write_checkpoint`'s
    ``write_files`` (see :func:`quantize`), so ``folder`` is the checkpoint's temporary folder."""
    from .arch import get_arch
    from .bench import artifact_latency
    from .data import load_config_data
    from .evaluate import evaluate_predictor
    from .modeling import count_parameters, prepare
    from .pruning import head_counts
    from .runtime import load_predictor

    check_parent("quantize", parent, config)  # again: callers may skip quantize()
    check_settings(config)
    spec, _, threads = prepare(config)
    model, tokenizer = load_hf_model(parent)
    get_arch(model)  # an unsupported model family fails here, before any work
    data = load_config_data(config, spec)
    start = time.perf_counter()
    built = build_artifact(config, model, tokenizer, folder, data)
    seconds = time.perf_counter() - start
    # The artifact itself is measured: nothing about int8 accuracy is assumed.
    predictor = load_predictor(folder, threads=threads)
    predictor.max_length = config.model.max_length
    metrics = evaluate_predictor(predictor, config, spec)
    metrics |= {f"parent/{k}": v for k, v in parent.metrics.items() if k.startswith("test/")}
    metrics |= {
        "parameters": count_parameters(model),
        "parent/model_bytes": parent.model_bytes,
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
    return Measured(metrics, details)


def quantize(config: Config, parent: str | Path | Checkpoint | None = None, *, baseline: bool = False) -> Checkpoint:
    """Quantize ``parent`` (default: the newest prune checkpoint of ``config.task``); returns the
    new ``quantize-v<N>`` checkpoint. ``baseline`` marks it as made for comparison only
    (:data:`~tinycompress.checkpoint.BASELINE_FLAG`), so later stages do not take it by default.

    Raises :class:`TinycompressError` (and writes nothing) for a missing or corrupt parent, a
    parent of another stage or task, or ``mode: static`` with ``backend: torch``. Build
    ``config`` on :func:`parent_base` so the parent's data and model settings carry over.
    """
    if not isinstance(parent, Checkpoint):
        parent = resolve_input(parent, workdir=config.workdir, task=config.task, stage="quantize")
    check_parent("quantize", parent, config)
    check_settings(config)
    return write_checkpoint(
        config.workdir, parent.task, "quantize", lambda folder: run_quantize(config, parent, folder),
        config=config, seed=config.seed, parent=parent, details={BASELINE_FLAG: True} if baseline else None,
    )
