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

Accuracy-driven tuning (``--tolerance POINTS``, ONNX backend)
------------------------------------------------------------
Instead of the one configured recipe, :func:`tune_artifact` runs the search of
:mod:`tinycompress.quantization.tuning`: the dynamic (U8S8 / U8U8, per-channel, reduce_range,
fp32 embeddings) and static QDQ (MinMax / Percentile / Entropy) recipes of
:func:`~tinycompress.quantization.onnx_recipes.onnx_recipes`, then -- when none is within the tolerance
-- the best of them with the most sensitive node groups (embeddings, ``layer N attention``,
``layer N ffn``) kept fp32. Every candidate's dev metric is measured on the dev split carved from
train (the parent's fp32 dev metric is measured the same way, on the same rows); the candidates
within the tolerance are timed against one another on dev texts (the latency protocol) and the
fastest at batch 32 is written. ``details.tuning`` lists every candidate and the chosen one; the
top-level ``mode`` / ``per_channel`` / ``quantize_embeddings`` describe the chosen recipe. When no
candidate is within, the most accurate is kept, ``details.tuning.within_tolerance`` is false and a
``warning:`` line goes to stderr. ``--tolerance`` with ``--backend torch`` is refused.

The test metrics are measured by running the written artifact (ONNX Runtime session or the
reloaded int8 module) on the test split, and latency at batch 1 and 32 is measured on real test
texts; both land in the manifest with the machine they ran on (int8 speed depends on its
vector extensions).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tinycompress.checkpoint.format import BASELINE_FLAG, ONNX_FILE, task_dir
from tinycompress.checkpoint.hf import load_hf_model, save_config_and_tokenizer
from tinycompress.checkpoint.store import Checkpoint, Measured, library_versions, write_checkpoint
from tinycompress.checkpoint.temporaries import check_writable
from tinycompress.checkpoint.workspace import check_parent, resolve_input
from tinycompress.config import Config
from tinycompress.console import log_to_stderr
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
    if config.quantize.tolerance is not None and config.quantize.backend != "onnx":
        raise TinycompressError(
            "quantize.tolerance (accuracy-driven tuning) is only implemented for quantize.backend onnx",
            "use --backend onnx, or drop --tolerance",
        )


def _versions() -> dict[str, str]:
    """The runtimes int8 speed and accuracy depend on (a subset of the manifest's versions)."""

    return {name: version for name, version in library_versions().items() if name in ("onnxruntime", "torch")}


def _size_mb(n_bytes) -> str:
    return f"{n_bytes / 1e6:.2f} MB" if isinstance(n_bytes, (int, float)) else "?"


def summary_line(checkpoint: Checkpoint) -> str:
    """``size 5.81 MB (parent 22.71 MB); latency median batch 1 2.10 ms, batch 32 41.00 ms (2 threads)``
    of a quantize checkpoint, from its manifest; after tuning it ends with the chosen candidate:
    ``; tuned: dynamic-u8s8-per-channel of 7 candidates, dev accuracy drop 0.12 points (tolerance 0.3)``."""
    latency = checkpoint.details["latency"]
    line = (
        f"size {_size_mb(checkpoint.model_bytes)} (parent {_size_mb(checkpoint.metrics.get('parent/model_bytes'))}); "
        f"latency median batch 1 {latency['batch_1']['median_ms']:.2f} ms, batch 32 {latency['batch_32']['median_ms']:.2f} ms "
        f"({latency['machine']['threads']} threads)"
    )
    tuning = checkpoint.details.get("tuning")
    if tuning:
        chosen = next(c for c in tuning["candidates"] if c["name"] == tuning["chosen"])
        verdict = "" if tuning["within_tolerance"] else ", NOT within"
        line += (
            f"; tuned: {chosen['name']} of {len(tuning['candidates'])} candidates, dev {tuning['metric']} "
            f"drop {chosen['drop_points'] + 0.0:.2f} points (tolerance {tuning['tolerance']:g}{verdict})"
        )
    return line


def tuning_warning(tuning: dict) -> str | None:
    """The warning line of a tuning that met no candidate within the tolerance, else None."""
    if tuning["within_tolerance"]:
        return None
    chosen = next(c for c in tuning["candidates"] if c["name"] == tuning["chosen"])
    return (
        f"no int8 candidate is within {tuning['tolerance']:g} points of the fp32 dev {tuning['metric']} "
        f"({tuning['fp32_dev_metric']:.4f}); kept the most accurate, {chosen['name']} "
        f"({chosen['dev_metric']:.4f}, {chosen['drop_points']:.2f} points lower); raise --tolerance to accept it"
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


def tune_artifact(config: Config, model, tokenizer, folder: Path, data, spec, threads: int) -> dict[str, Any]:
    """``--tolerance``: the accuracy-driven search (:func:`tinycompress.quantization.tuning.tune`)
    with the real builders, dev evaluation and latency protocol. Candidates are built in a
    temporary folder; only the chosen ``model.onnx`` (+ config and tokenizer) is written into
    ``folder``. Returns details, with ``tuning`` (every candidate, the chosen one)."""
    from tinycompress.inference.latency import differs, measure_predictors
    from tinycompress.inference.predictor import load_predictor, torch_predictor
    from tinycompress.models.structure import head_counts
    from tinycompress.quantization.onnx_recipes import (
        OnnxTuningSources,
        onnx_node_groups,
        onnx_recipes,
        quantize_onnx_recipe,
        recipe_op_types,
    )
    from tinycompress.quantization.tuning import tune
    from tinycompress.training.evaluation import evaluate_predictor_dev

    settings, max_length = config.quantize, config.model.max_length
    key = f"dev/{spec.primary_metric}"

    def dev_metric_of(predictor) -> float:  # predictors come with max_length set (below)
        return float(evaluate_predictor_dev(predictor, config, spec, data)[key])

    def predictor_at(candidate: Path):
        predictor = load_predictor(candidate, threads=threads)
        predictor.max_length = max_length
        return predictor

    reference = dev_metric_of(torch_predictor(model, tokenizer, max_length=max_length))
    if math.isnan(reference):
        raise TinycompressError(
            f"the fp32 model's dev {spec.primary_metric} is NaN (constant predictions?): --tolerance has nothing to hold",
            "quantize without --tolerance",
        )
    calibration: list[dict] = []

    with tempfile.TemporaryDirectory(prefix="tinycompress-tune-") as scratch:
        scratch = Path(scratch)
        sources = OnnxTuningSources(model, scratch / "fp32", opset=config.export.opset)
        recipes = onnx_recipes(settings)

        def build(recipe, fp32_nodes, candidate: Path) -> dict[str, Any]:
            if recipe.settings["mode"] == "static" and not calibration:
                calibration.extend(
                    calibration_batches(
                        tokenizer,
                        data.train,
                        settings.calibration_samples,
                        max_length=max_length,
                        seed=config.seed,
                        single_batch=True,  # Percentile / Entropy need equal shapes
                    )
                )
            built = quantize_onnx_recipe(
                sources, recipe.settings, candidate / ONNX_FILE, nodes_to_exclude=fp32_nodes, calibration=calibration
            )
            save_config_and_tokenizer(candidate, model.config, tokenizer, max_length)
            return built

        def latencies(folders: dict[str, Path]) -> dict[str, dict]:
            predictors = {name: predictor_at(path) for name, path in folders.items()}
            return measure_predictors(predictors, data.dev.texts, max_length=max_length, runs=config.report.bench_runs)

        # Layers without heads have no fused Attention node: name the others by their layer.
        attention_layers = [i for i, heads in enumerate(head_counts(model)) if heads > 0]
        result = tune(
            recipes,
            build=build,
            dev_metric=lambda candidate: dev_metric_of(predictor_at(candidate)),
            latencies=latencies,
            node_groups=lambda recipe: onnx_node_groups(
                sources.source(recipe.settings), recipe_op_types(recipe.settings), attention_layers
            ),
            reference=reference,
            tolerance=settings.tolerance,
            metric=spec.primary_metric,
            scratch=scratch / "candidates",
            size=lambda candidate: (candidate / ONNX_FILE).stat().st_size,
            same_speed=lambda a, b: differs(a, b) is False,
            log=log_to_stderr,
        )
        chosen = result.chosen
        shutil.copy2(chosen.folder / ONNX_FILE, folder / ONNX_FILE)
    save_config_and_tokenizer(folder, model.config, tokenizer, max_length)
    tuning = result.to_dict()
    tuning["latency_rows"] = "dev texts (batch 1 = median length, batch 32 = first 32)"
    warning = tuning_warning(tuning)
    if warning:
        log_to_stderr(f"warning: {warning}")
    recipe = chosen.recipe.settings
    details = dict(chosen.details)
    details["calibration_rows"] = (
        min(settings.calibration_samples, len(data.train)) if recipe["mode"] == "static" else 0
    )
    return {
        "recipe": {
            "mode": recipe["mode"],
            "per_channel": recipe["per_channel"],
            "quantize_embeddings": recipe["quantize_embeddings"],
        },
        **details,
        "tuning": tuning,
    }


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
    data = load_config_data(config, spec)  # a data problem fails before any model is loaded
    model, tokenizer = load_hf_model(parent)
    get_arch(model)  # an unsupported model family fails here, before any work
    start = time.perf_counter()
    if config.quantize.tolerance is None:
        built, recipe = build_artifact(config, model, tokenizer, folder, data), {}
    else:
        built = tune_artifact(config, model, tokenizer, folder, data, spec, threads)
        recipe = built.pop("recipe")  # the chosen candidate's settings, not the configured ones
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
        "mode": recipe.get("mode", config.quantize.mode),
        "per_channel": recipe.get("per_channel", config.quantize.per_channel),
        "quantize_embeddings": recipe.get("quantize_embeddings", config.quantize.quantize_embeddings),
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
    check_writable(task_dir(config.workdir, parent.task))
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
