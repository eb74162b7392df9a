"""Build a report: the chain's rows, baselines, timings and sweep, gathered from the manifests."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinycompress.checkpoint.format import task_dir
from tinycompress.checkpoint.store import Checkpoint
from tinycompress.checkpoint.workspace import chain_end, find_baselines, locate, walk_chain
from tinycompress.console import log_to_stderr
from tinycompress.errors import TinycompressError
from tinycompress.report.identical import merge_identical
from tinycompress.report.measure import bench_rows
from tinycompress.report.rows import (
    TEST_SPLIT_NOTE,
    Report,
    Row,
    baseline_rows,
    build_rows,
    compute_ratios,
)
from tinycompress.stage_graph import STAGE_ORDER

SWEEP_DIR_NAME = "sweeps"

SWEEP_FILE_NAME = "prune_sweep.csv"

# Where the seconds a stage spent are recorded in its manifest (metrics, then details).
SECONDS_KEYS = ("train_seconds", "prune_seconds", "quantize_seconds", "export_seconds")


def manifest_seconds(checkpoint: Checkpoint) -> tuple[float | None, str | None]:
    """Seconds a stage's manifest says it spent, and which keys they came from.

    Sums the ``*_seconds`` entries of ``metrics`` and of ``details`` (and a prune's recovery
    training time). These are compute times measured inside the stage, not wall time.
    """
    total, used = 0.0, []
    for where, values in (("metrics", checkpoint.metrics), ("details", checkpoint.details)):
        for key in SECONDS_KEYS:
            value = values.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                total += float(value)
                used.append(f"{where}.{key}")
    recovery = checkpoint.details.get("recovery")
    if isinstance(recovery, dict) and isinstance(recovery.get("train_seconds"), (int, float)):
        total += float(recovery["train_seconds"])
        used.append("details.recovery.train_seconds")
    return (round(total, 1), "manifest: " + " + ".join(used)) if used else (None, None)


def stage_timing(
    chain: list[Checkpoint], measured: dict[str, float] | None = None, baselines: list[Checkpoint] = ()
) -> tuple[dict[str, float | None], dict[str, dict[str, Any]]]:
    """(seconds per stage, per-checkpoint timing with its source).

    ``measured`` maps checkpoint names to wall seconds timed by ``tinycompress run``; they win
    over the manifests' compute times. Several checkpoints of one stage (iterative pruning) add up.
    ``baselines`` are listed per checkpoint (stage "baseline") but not added to the chain's stages.
    """
    measured = measured or {}
    per_stage: dict[str, float | None] = {stage: None for stage in STAGE_ORDER}
    timing: dict[str, dict[str, Any]] = {}
    for in_chain, checkpoint in [(True, c) for c in chain] + [(False, c) for c in baselines]:
        if checkpoint.name in measured:
            seconds, source = round(float(measured[checkpoint.name]), 1), "run: wall time"
        else:
            seconds, source = manifest_seconds(checkpoint)
        timing[checkpoint.name] = {
            "stage": checkpoint.stage if in_chain else "baseline",
            "seconds": seconds,
            "source": source,
        }
        if seconds is not None and in_chain:
            per_stage[checkpoint.stage] = round((per_stage[checkpoint.stage] or 0.0) + seconds, 1)
    return per_stage, timing


def find_sweep(workdir: Path, task: str, explicit: str | Path | None = None) -> Path | None:
    """``explicit``, else the newest ``prune_sweep.csv`` under ``<workdir>/<task>/sweeps/``."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise TinycompressError(
                f"sweep CSV not found: {path}", "pass the prune_sweep.csv written by benchmarks/prune_sweep.py"
            )
        return path
    root = task_dir(workdir, task) / SWEEP_DIR_NAME
    found = sorted(root.rglob(SWEEP_FILE_NAME), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    return found[-1] if found else None


def read_sweep(path: Path, metric: str) -> list[dict[str, Any]]:
    """Rows of a prune sweep CSV (criterion, head_ratio, recovered, test_<metric>, ...), typed."""
    column = f"test_{metric}"
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TinycompressError(f"cannot read sweep CSV {path}: {exc}") from None
    needed = {"criterion", "head_ratio", "recovered", column}
    if not rows or not needed <= set(rows[0]):
        raise TinycompressError(
            f"{path} is not a prune sweep of this task (needs columns {', '.join(sorted(needed))})",
            "pass the prune_sweep.csv written by benchmarks/prune_sweep.py for this task",
        )
    typed = []
    for raw in rows:
        try:
            typed.append(
                {
                    "criterion": raw["criterion"],
                    "head_ratio": float(raw["head_ratio"]),
                    "recovered": raw["recovered"].strip().lower() == "true",
                    "score": float(raw[column]),
                }
            )
        except ValueError:
            raise TinycompressError(f"{path}: malformed row {raw}", "re-run benchmarks/prune_sweep.py") from None
    return typed


def _footnotes(report_rows: list[Row], latency: dict[str, Any], finetune: Checkpoint | None) -> list[str]:
    notes = [TEST_SPLIT_NOTE]
    if finetune is not None:
        notes.append(
            f"original = the pretrained encoder ({finetune.manifest.get('base_model', '?')}) with a freshly initialised, seeded "
            "classification head, before fine-tuning; its architecture is the fine-tuned model's, so its size, parameters "
            "(and, with --bench, latency) are the fine-tuned model's fp32 figures."
        )
    notes.append(
        "size = the model's weight / graph files on disk (manifest model_bytes; tokenizer and config files excluded), MB = 10^6 bytes."
    )
    notes.append(
        "compression = fine-tuned size / size; speed-up = fine-tuned latency / latency (only between latencies measured on the same machine and threads); "
        "≈ = the two latencies' interquartile ranges overlap, i.e. the difference is within the spread of the measurement."
    )
    if latency.get("source") == "bench":
        machine = latency["machine"]
        notes.append(
            f"latency (ms): measured now on {machine['cpu']} ({machine['cores']} cores, threads: {machine['threads']}), all models "
            f"loaded first, then timed interleaved (each model once per round, the first model rotating): median (Q1–Q3) of "
            f"{latency['rounds']} rounds after {latency['warmup']} warm-up rounds; {latency['inputs']}, max length {latency['max_length']}."
        )
        for check in latency.get("same_file") or []:
            readings = "; ".join(
                f"batch {key.split('_')[1]}: {check[key]['first']['median_ms']:.2f} vs {check[key]['second']['median_ms']:.2f} ms "
                f"({check[key]['relative_difference']:.0%} apart)"
                for key in ("batch_1", "batch_32")
            )
            notes.append(
                f"repeatability: {check['first']} and {check['second']} are the same file, timed under both names in the same "
                f"measurement: {readings}."
            )
        if latency.get("onnx_fp32"):
            notes.append(f"ONNX Runtime fp32 row: {latency['onnx_fp32']}")
    else:
        machines = latency.get("machines") or []
        where = (
            "; ".join(f"{m.get('cpu', '?')} (threads: {m.get('threads', '?')})" for m in machines)
            or "no manifest records latency"
        )
        notes.append(
            f"latency (ms): read from the manifests (measured when each stage ran, each model on its own: {where}), median "
            "(Q1–Q3) where the manifest records the spread; — = not recorded. "
            "`tinycompress report --bench` measures every row on this machine now."
        )
    baselines = [r for r in report_rows if r.key == "baseline"]
    if baselines:
        notes.append(
            "int8 only, unpruned = the fine-tuned model quantized to int8 without pruning, what a user would do instead "
            f"(ONNX Runtime dynamic int8 is the Optimum way): {', '.join(r.checkpoint or '?' for r in baselines)}."
        )
    for row in report_rows:
        if row.status != "ok" and row.command and row.key != "original":
            notes.append(f"{row.label}: not run — `{row.command}` makes it.")
        if row.same_file_as:
            notes.append(
                f"{row.label} ({row.where}): {', '.join(row.same_file_as)} is the same file (identical sha256), shown once."
            )
        if row.key == "onnx_fp32":
            notes.append(
                f"{row.label} = {row.checkpoint} exported now to fp32 ONNX with the quantize stage's export and ORT fusion "
                "(the graph the int8 model is made from), so int8's gain shows apart from the runtime's; its metrics are "
                f"{row.checkpoint}'s (same weights), its size the fp32 ONNX file's."
            )
    counts = {r.test_rows for r in report_rows if r.status == "ok" and r.test_rows is not None}
    if len(counts) == 1:
        notes.append(f"test rows: {counts.pop()}.")
    elif len(counts) > 1:
        notes.append(
            f"rows were measured on different numbers of test rows ({', '.join(str(c) for c in sorted(counts))}); compare with care."
        )
    return notes


def build_report(
    target: str | Path | None = None,
    *,
    workdir: str | Path = "runs",
    task: str | None = None,
    bench: bool = False,
    bench_runs: int = 50,
    threads: int | None = None,
    data_dir: str | None = None,
    sweep: str | Path | None = None,
    measured_seconds: dict[str, float] | None = None,
    log: Callable[[str], None] = log_to_stderr,
    baselines: list[Checkpoint] | None = None,
) -> Report:
    """Gather the report of one chain.

    ``target``: a checkpoint folder (the chain ends there), a task folder or a workspace; else
    ``workdir`` + ``task`` (default: the most recent task), whose newest chain is reported.
    Rows whose model is byte-identical to an earlier row's (an ONNX export's copy of the
    quantized file) are shown once (:func:`~tinycompress.report.identical.merge_identical`).
    ``bench``: measure latency now, every row interleaved in one measurement (``bench_runs``
    rounds, ``threads`` threads, texts from the chain's test data or ``data_dir``), with an
    ONNX Runtime fp32 row added (:func:`~tinycompress.report.measure.bench_rows`); else latency
    comes from the manifests' ``details.latency``.
    ``sweep``: a prune sweep CSV (default: the newest under ``runs/<task>/sweeps/``).
    ``measured_seconds``: wall seconds per checkpoint name, from ``tinycompress run``.
    ``baselines``: the unpruned int8 checkpoints to show after the chain (None: :func:`find_baselines`).
    Raises :class:`TinycompressError` for an empty workspace, an unknown task or a bad target.
    """
    from tinycompress.data.tasks import get_task

    workdir, task, end = locate(target, workdir=workdir, task=task)
    end = end or chain_end(workdir, task)
    chain, chain_notes = walk_chain(end)
    names = list(get_task(task).metrics)
    rows = build_rows(chain, task, workdir, names)
    if baselines is None:
        baselines = find_baselines(chain, workdir, task)
    rows += baseline_rows(baselines, rows, names)
    twins = merge_identical(rows, chain + list(baselines))
    finetune = next((c for c in chain if c.stage == "finetune"), None)
    if bench:
        latency = bench_rows(rows, chain, runs=bench_runs, threads=threads, data_dir=data_dir, log=log, twins=twins)
    else:
        machines = []
        for row in rows:
            if row.latency_machine is not None and row.latency_machine not in machines:
                machines.append(row.latency_machine)
        latency = {"source": "manifests" if any(r.latency_source for r in rows) else "none", "machines": machines}
    compute_ratios(rows)
    per_stage, timing = stage_timing(chain, measured_seconds, baselines)
    sweep_path = find_sweep(workdir, task, sweep)
    sweep_info, sweep_rows = None, []
    if sweep_path is not None:
        try:
            sweep_rows = read_sweep(sweep_path, names[0])
            sweep_info = {
                "csv": str(sweep_path),
                "rows": len(sweep_rows),
                "criteria": sorted({r["criterion"] for r in sweep_rows}),
            }
        except TinycompressError as exc:
            if sweep is not None:
                raise
            chain_notes.append(f"sweep {sweep_path} skipped: {exc.problem}")
    tuning = {
        c.name: c.details["tuning"]
        for c in [*chain, *baselines]
        if c.stage == "quantize" and isinstance(c.details.get("tuning"), dict)
    }
    return Report(
        task=task,
        workspace=str(workdir),
        metrics=names,
        rows=rows,
        chain=[c.name for c in chain],
        latency=latency,
        stage_seconds=per_stage,
        stage_timing=timing,
        sweep=sweep_info,
        footnotes=_footnotes(rows, latency, finetune) + _tuning_notes(tuning) + chain_notes,
        sweep_rows=sweep_rows,
        tuning=tuning,
    )


def _tuning_notes(tuning: dict[str, dict[str, Any]]) -> list[str]:
    """One line per checkpoint quantized with --tolerance: what it chose among how many candidates."""
    notes = []
    for name, record in tuning.items():
        candidates = record.get("candidates") or []
        chosen = next((c for c in candidates if c.get("name") == record.get("chosen")), {})
        verdict = "within" if record.get("within_tolerance") else "NOT within"
        notes.append(
            f"{name}: int8 tuned for a tolerance of {record.get('tolerance')} points of dev {record.get('metric')} "
            f"(fp32 {record.get('fp32_dev_metric')}): {record.get('chosen')} chosen of {len(candidates)} candidates, "
            f"dev drop {chosen.get('drop_points', float('nan')):+.2f} points ({verdict}); every candidate under "
            "'int8 tuning' in report.md and in report.json."
        )
    return notes
