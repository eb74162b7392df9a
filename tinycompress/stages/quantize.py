"""Stage 3: post-training int8 quantization of a (pruned) model.

    tinycompress quantize --task sst2                        # newest prune-v<N>, ONNX Runtime dynamic int8
    tinycompress quantize runs/sst2/finetune-v1              # the unpruned model, for comparison
    tinycompress quantize --backend torch                    # torch dynamic int8 Linear + int8 embedding
    tinycompress quantize --mode static --per-channel        # ONNX QDQ, calibrated on training rows

The parent is the newest ``prune`` checkpoint of the task, or an explicit ``finetune`` / ``prune``
folder. Quantize and export folders are refused: quantizing twice compounds the rounding error.

Backends
--------
``onnx`` (default): ONNX Runtime int8 (:mod:`tinycompress.quantization.onnx`), ``mode: dynamic``
on the fused graph or ``mode: static`` (QDQ, calibrated on ``calibration_samples`` seeded-random
training rows) on the plain export. Only the int8 ``model.onnx`` is kept.

``torch``: ``torch.ao`` dynamic int8 Linear + weight-only int8 word embedding
(:mod:`tinycompress.quantization.torch`), stored as ``int8_weights.safetensors`` + ``int8_recipe.json``.

The test metrics are measured by running the written artifact (ONNX Runtime session or the
reloaded int8 module) on the test split, and latency at batch 1 and 32 is measured on real test
texts; both land in the manifest with the machine they ran on (int8 speed depends on its
vector extensions).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tinycompress.checkpoint.format import BASELINE_FLAG, ONNX_FILE
from tinycompress.checkpoint.hf import load_hf_model, save_config_and_tokenizer
from tinycompress.checkpoint.store import Checkpoint, Measured, library_versions, write_checkpoint
from tinycompress.checkpoint.workspace import check_parent, resolve_input
from tinycompress.config import Config
from tinycompress.errors import TinycompressError
from tinycompress.quantization.onnx import calibration_batches, quantize_onnx_model
from tinycompress.quantization.torch import quantize_torch_model


def check_settings(config: Config) -> None:
    """Refuse setting combinations that have no implementation, before any work."""
    if config.quantize.mode == "static" and config.quantize.backend != "onnx":
        raise TinycompressError(
            "quantize.mode static is only implemented for quantize.backend onnx",
            "use --backend onnx, or --mode dynamic",
        )


def _versions() -> dict[str, str]:
    """The runtimes int8 speed and accuracy depend on (a subset of the manifest's versions)."""

    return {name: version for name, version in library_versions().items() if name in ("onnxruntime", "torch")}


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
        calibration = calibration_batches(
            tokenizer, data.train, settings.calibration_samples, max_length=config.model.max_length, seed=config.seed
        )
    if settings.backend == "onnx":
        details = quantize_onnx_model(
            model, folder / ONNX_FILE, settings, opset=config.export.opset, calibration=calibration
        )
    else:
        details = quantize_torch_model(model, folder, settings)
    save_config_and_tokenizer(folder, model.config, tokenizer, config.model.max_length)
    details["calibration_rows"] = min(settings.calibration_samples, len(data.train)) if calibration is not None else 0
    return details


def run_quantize(config: Config, parent: Checkpoint, folder: Path) -> Measured:
    """Quantize ``parent`` into ``folder`` and measure the artifact there; returns the metrics
    and details for the manifest. Used as :func:`~tinycompress.checkpoint.store.write_checkpoint`'s
    ``write_files`` (see :func:`quantize`), so ``folder`` is the checkpoint's temporary folder."""
    from tinycompress.data.glue import load_config_data
    from tinycompress.inference.latency import artifact_latency
    from tinycompress.inference.predictor import load_predictor
    from tinycompress.models.arch import get_arch
    from tinycompress.models.pretrained import count_parameters
    from tinycompress.models.run_setup import prepare
    from tinycompress.models.structure import head_counts
    from tinycompress.training.evaluation import evaluate_predictor

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
        "backend": config.quantize.backend,
        "mode": config.quantize.mode,
        "per_channel": config.quantize.per_channel,
        "quantize_embeddings": config.quantize.quantize_embeddings,
        **built,
        "attention_heads": head_counts(model),
        "opset": config.export.opset if config.quantize.backend == "onnx" else None,
        "versions": _versions(),
        "data_source": data.source,
        "latency": artifact_latency(predictor, data.test.texts, runs=config.report.bench_runs, threads=threads),
    }
    details["machine"] = details["latency"]["machine"]
    return Measured(metrics, details)


def quantize(config: Config, parent: str | Path | Checkpoint | None = None, *, baseline: bool = False) -> Checkpoint:
    """Quantize ``parent`` (default: the newest prune checkpoint of ``config.task``); returns the
    new ``quantize-v<N>`` checkpoint. ``baseline`` marks it as made for comparison only
    (:data:`~tinycompress.checkpoint.format.BASELINE_FLAG`), so later stages do not take it by default.

    Raises :class:`TinycompressError` (and writes nothing) for a missing or corrupt parent, a
    parent of another stage or task, or ``mode: static`` with ``backend: torch``. Build
    ``config`` on :func:`~tinycompress.checkpoint.workspace.parent_base` so the parent's data and model settings carry over.
    """
    if not isinstance(parent, Checkpoint):
        parent = resolve_input(parent, workdir=config.workdir, task=config.task, stage="quantize")
    check_parent("quantize", parent, config)
    check_settings(config)
    return write_checkpoint(
        config.workdir,
        parent.task,
        "quantize",
        lambda folder: run_quantize(config, parent, folder),
        config=config,
        seed=config.seed,
        parent=parent,
        details={BASELINE_FLAG: True} if baseline else None,
    )
