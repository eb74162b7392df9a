"""Stage 4: deployment artifacts (ONNX, TorchScript), each checked against PyTorch.

    tinycompress export --task sst2                              # newest quantize, else prune, else finetune
    tinycompress export runs/sst2/prune-v1 --format all
    tinycompress export runs/sst2/quantize-v1 --output deploy/sst2-int8

What a folder holds (plus ``config.json``, tokenizer files, README.md and the manifest):

========================  =============================================  ===================================
parent                    ``--format onnx``                              ``--format torchscript``
========================  =============================================  ===================================
finetune / prune (fp32)   ``model.onnx`` fp32 (exported now)             ``model.torchscript.pt`` fp32
quantize, backend onnx    ``model.onnx`` int8 (copy of the quantized)    ``model.torchscript.pt`` fp32 of its parent
quantize, backend torch   ``model.onnx`` fp32 of its parent              ``model.torchscript.pt`` fp32 of its parent
                                                                         + ``model_int8.torchscript.pt`` int8
========================  =============================================  ===================================

``--format all`` writes both columns. The fp32 model is always the nearest PyTorch checkpoint of
the chain; int8 files come only from a quantize checkpoint, never from quantizing on the fly
here, because a quantize checkpoint's accuracy was measured on the test set and an on-the-fly
int8 model's would not be. (For an int8 TorchScript of a pruned model: ``tinycompress quantize
--backend torch`` first, then export that.)

The fp32 ONNX file is the plain export (standard ONNX ops, dynamic batch and sequence axes), so
it runs on any ONNX runtime; the int8 copy holds ORT contrib ops (QAttention, ...) and needs
ONNX Runtime.

Parity: right after writing, every file is loaded back (ONNX Runtime; ``torch.jit.load`` for
TorchScript) and compared with the PyTorch model it came from, on real test sentences: the
shortest ones, long ones truncated to max length, and a padded batch of mixed lengths. fp32
files use ``export.atol``; the int8 ONNX copy is compared with the fp32 parent at
``export.int8_atol``; the int8 TorchScript with the int8 torch module it was traced from, at
``export.atol`` (same kernels, so it must match as closely as fp32 does). A shape mismatch is an
error (nothing written); a tolerance miss is recorded, warned about, and the folder is written.

Each file is then run on the test split (``onnx/test/<m>``, ``torchscript/test/<m>``,
``torchscript_int8/test/<m>``; ``test/<m>`` is the file ``predict`` runs), and ``model.onnx``'s
latency at batch 1 and 32 is recorded like the quantize stage's.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tinycompress.checkpoint.format import ONNX_FILE, TORCHSCRIPT_FILE, TORCHSCRIPT_INT8_FILE, task_dir
from tinycompress.checkpoint.hf import load_hf_model, save_config_and_tokenizer
from tinycompress.checkpoint.store import Checkpoint, Measured, write_checkpoint
from tinycompress.checkpoint.temporaries import check_writable
from tinycompress.checkpoint.workspace import check_parent, resolve_input
from tinycompress.config import Config
from tinycompress.errors import TinycompressError
from tinycompress.exporters.parity import ParityResult, format_parity, parity_batches, parity_check, torch_logits_fn
from tinycompress.exporters.torchscript import (
    load_torchscript,
    save_torchscript,
    script_or_trace,
    torchscript_logits_fn,
)

FORMATS = {"onnx": ("onnx",), "torchscript": ("torchscript",), "all": ("onnx", "torchscript")}


@dataclass
class Sources:
    """Where each exported file comes from."""

    fp32: Checkpoint  # the nearest PyTorch checkpoint: the parent, or a quantize checkpoint's parent
    quantized: Checkpoint | None  # the parent, when it is a quantize checkpoint
    backend: str | None  # its quantize.backend: "onnx" or "torch"


def resolve_sources(parent: Checkpoint) -> Sources:
    if parent.stage != "quantize":
        return Sources(parent, None, None)
    fp32 = parent.parent()
    if fp32 is None:
        raise TinycompressError(
            f"{parent.path} records no parent checkpoint", "re-run `tinycompress quantize` on a prune checkpoint"
        )
    return Sources(fp32, parent, parent.details.get("backend") or parent.config.quantize.backend)


@dataclass
class Artifact:
    """One exported file and its parity check."""

    file: str
    precision: str  # "fp32" or "int8"
    source: str  # the checkpoint it was made from
    reference: str  # what it was compared with
    atol: float
    results: list = field(default_factory=list)  # ParityResult per batch

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["results"] = [_result_dict(r) for r in self.results]
        data["passed"] = all(r.passed for r in self.results)
        return data


def _result_dict(result) -> dict[str, Any]:
    return {
        "name": result.name,
        "shape": list(result.shape),
        "max_abs_diff": float(f"{result.max_abs_diff:.3g}"),
        "label_agreement_pct": round(result.label_agreement_pct, 2),
        "passed": result.passed,
    }


def check_parity(artifact: Artifact, reference_fn: Callable, candidate_fn: Callable, batches: dict) -> Artifact:
    """Fill ``artifact.results``; a shape mismatch (a broken export, not a tolerance question)
    raises TinycompressError."""

    try:
        artifact.results = parity_check(reference_fn, candidate_fn, batches, atol=artifact.atol)
    except ValueError as exc:
        raise TinycompressError(
            f"{artifact.file} fails the parity check: {exc}", "this is a bug in the export; please report it"
        ) from None
    return artifact


def write_onnx(sources: Sources, model, folder: Path, config: Config, batches: dict, threads: int) -> Artifact:
    """``model.onnx``: the quantize checkpoint's int8 graph copied, else an fp32 export of ``model``."""
    from tinycompress.exporters.onnx import export_onnx
    from tinycompress.inference.onnx_session import OnnxClassifier

    path = folder / ONNX_FILE
    if sources.backend == "onnx":
        shutil.copyfile(sources.quantized.path / ONNX_FILE, path)
        artifact = Artifact(
            ONNX_FILE, "int8", sources.quantized.name, f"PyTorch fp32 {sources.fp32.name}", config.export.int8_atol
        )
    else:
        export_onnx(model, path, opset=config.export.opset)
        artifact = Artifact(
            ONNX_FILE, "fp32", sources.fp32.name, f"PyTorch fp32 {sources.fp32.name}", config.export.atol
        )
    return check_parity(artifact, torch_logits_fn(model), OnnxClassifier(path, num_threads=threads), batches)


def _trace_and_check(module, path: Path, artifact: Artifact, batches: dict) -> Artifact:

    save_torchscript(script_or_trace(module), path)
    # Loading the file just written (torch.jit.load) checks what users will load: allowed for
    # export folders, which are deployment artifacts; checkpoints never hold pickles.
    return check_parity(artifact, torch_logits_fn(module), torchscript_logits_fn(load_torchscript(path)), batches)


def write_torchscript(sources: Sources, model, folder: Path, config: Config, batches: dict) -> list[Artifact]:
    """``model.torchscript.pt`` (fp32) and, for a torch quantize parent, ``model_int8.torchscript.pt``."""
    from tinycompress.inference.predictor import load_torch_int8_model

    fp32 = Artifact(
        TORCHSCRIPT_FILE, "fp32", sources.fp32.name, f"PyTorch fp32 {sources.fp32.name}", config.export.atol
    )
    artifacts = [_trace_and_check(model, folder / TORCHSCRIPT_FILE, fp32, batches)]
    if sources.backend == "torch":
        qmodel = load_torch_int8_model(sources.quantized.path)
        int8 = Artifact(
            TORCHSCRIPT_INT8_FILE,
            "int8",
            sources.quantized.name,
            f"PyTorch int8 {sources.quantized.name}",
            config.export.atol,
        )
        artifacts.append(_trace_and_check(qmodel, folder / TORCHSCRIPT_INT8_FILE, int8, batches))
    return artifacts


def run_export(config: Config, parent: Checkpoint, folder: Path) -> Measured:
    """Write the requested files into ``folder``, check each against PyTorch and measure each
    on the test split; returns the metrics and details for the manifest. Used as
    :func:`~tinycompress.checkpoint.store.write_checkpoint`'s ``write_files`` (see :func:`export`)."""
    from tinycompress.data.glue import load_config_data
    from tinycompress.models.pretrained import count_parameters
    from tinycompress.models.run_setup import prepare

    check_parent("export", parent, config)
    sources = resolve_sources(parent)
    spec, _, threads = prepare(config)
    model, tokenizer = load_hf_model(sources.fp32)
    data = load_config_data(config, spec)
    batches = parity_batches(tokenizer, data.test.texts, config.model.max_length)
    start = time.perf_counter()
    artifacts: list[Artifact] = []
    formats = FORMATS[config.export.format]
    if "onnx" in formats:
        artifacts.append(write_onnx(sources, model, folder, config, batches, threads))
    if "torchscript" in formats:
        artifacts += write_torchscript(sources, model, folder, config, batches)
    save_config_and_tokenizer(folder, model.config, tokenizer, config.model.max_length)
    seconds = time.perf_counter() - start  # writing and parity-checking the files
    metrics = measure_artifacts(folder, artifacts, config, spec, threads)
    metrics |= {f"parent/{k}": v for k, v in parent.metrics.items() if k.startswith("test/")}
    metrics |= {
        "parameters": count_parameters(model),
        "test_rows": len(data.test),
        "parity_passed": all(a.to_dict()["passed"] for a in artifacts),
        "export_seconds": round(seconds, 1),
    }
    details = {
        "format": config.export.format,
        "opset": config.export.opset,
        "fp32_source": sources.fp32.name,
        "int8_source": sources.quantized.name if sources.quantized else None,
        "quantize_backend": sources.backend,
        "parity_batches": {name: list(batch["input_ids"].shape) for name, batch in batches.items()},
        "files": {a.file: a.to_dict() for a in artifacts},
    }
    if (folder / ONNX_FILE).is_file():
        from tinycompress.inference.latency import artifact_latency
        from tinycompress.inference.predictor import onnx_predictor

        onnx = onnx_predictor(folder, threads=threads, max_length=config.model.max_length)
        details["latency"] = artifact_latency(onnx, data.test.texts, runs=config.report.bench_runs, threads=threads)
    return Measured(metrics, details)


# Metric prefix of each file; the report reads "<prefix>/test/<metric>" per artifact.
METRIC_PREFIX = {ONNX_FILE: "onnx", TORCHSCRIPT_FILE: "torchscript", TORCHSCRIPT_INT8_FILE: "torchscript_int8"}


def measure_artifacts(folder: Path, artifacts: list[Artifact], config: Config, spec, threads: int) -> dict[str, Any]:
    """Test metrics of every written file, run from ``folder`` (``onnx/test/accuracy``, ...),
    plus ``test/<m>`` of the file :func:`tinycompress.inference.predictor.load_predictor` runs for this folder."""
    from tinycompress.inference.predictor import onnx_predictor, torchscript_predictor
    from tinycompress.training.evaluation import evaluate_predictor

    metrics: dict[str, Any] = {}
    for artifact in artifacts:
        if artifact.file == ONNX_FILE:
            predictor = onnx_predictor(folder, threads=threads, max_length=config.model.max_length)
        else:
            predictor = torchscript_predictor(folder, artifact.file, max_length=config.model.max_length)
        measured = evaluate_predictor(predictor, config, spec)
        metrics |= {f"{METRIC_PREFIX[artifact.file]}/{k}": v for k, v in measured.items()}
    primary = next(
        f for f in (ONNX_FILE, TORCHSCRIPT_INT8_FILE, TORCHSCRIPT_FILE) if any(a.file == f for a in artifacts)
    )
    prefix = f"{METRIC_PREFIX[primary]}/"
    metrics |= {k[len(prefix) :]: v for k, v in list(metrics.items()) if k.startswith(prefix)}
    return metrics


def export(
    config: Config, parent: str | Path | Checkpoint | None = None, output: str | Path | None = None
) -> Checkpoint:
    """Export ``parent`` (default: the task's newest quantize, prune or finetune checkpoint) in
    ``config.export.format``; returns the ``export-v<N>`` (or ``output``) folder.

    Raises TinycompressError, writing nothing, for an existing ``output``, a missing or corrupt
    parent, a parent of another stage or task, or a shape mismatch in the parity check.
    Tolerance misses do not raise: see ``metrics["parity_passed"]`` and :func:`parity_warnings`.
    """
    if output is not None and Path(output).exists():
        raise TinycompressError(
            f"output folder {output} already exists", "pass a new folder to --output, or remove it first"
        )
    if not isinstance(parent, Checkpoint):
        parent = resolve_input(parent, workdir=config.workdir, task=config.task, stage="export")
    check_parent("export", parent, config)
    if output is not None:
        check_writable(Path(output).parent, "pass --output a new folder in a writable place")
    else:
        check_writable(task_dir(config.workdir, parent.task))
    return write_checkpoint(
        config.workdir,
        parent.task,
        "export",
        lambda folder: run_export(config, parent, folder),
        config=config,
        seed=config.seed,
        parent=parent,
        destination=output,
    )


def parity_lines(checkpoint: Checkpoint) -> list[str]:
    """Human-readable parity results of an export folder: a header per file, then one
    ``✓``/``✗`` line per batch with max |Δ| and label agreement."""

    lines = []
    for file, info in (checkpoint.details.get("files") or {}).items():
        lines.append(
            f"{file}  {info['precision']} from {info['source']}, vs {info['reference']} (atol {info['atol']:g})"
        )
        results = [
            ParityResult(
                r["name"], tuple(r["shape"]), r["max_abs_diff"], r["label_agreement_pct"], info["atol"], r["passed"]
            )
            for r in info["results"]
        ]
        lines += [f"  {line}" for line in format_parity(results)]
    return lines


def parity_warnings(checkpoint: Checkpoint) -> list[str]:
    """One line per batch over its tolerance (the folder is written anyway)."""
    warnings = []
    for file, info in (checkpoint.details.get("files") or {}).items():
        for r in info["results"]:
            if not r["passed"]:
                diff = "NaN" if math.isnan(r["max_abs_diff"]) else f"{r['max_abs_diff']:.2e}"
                warnings.append(
                    f"{file}: batch '{r['name']}' differs from {info['reference']} by max|Δ|={diff} > atol {info['atol']:g} "
                    f"(labels agree on {r['label_agreement_pct']:.1f}%)"
                )
    return warnings
