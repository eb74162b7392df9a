"""Latency of every report row, measured now on this machine, interleaved in one process.

All rows' models are loaded first, then timed together by
:func:`tinycompress.inference.latency.measure_predictors`: warm-up rounds, then rounds in which
every model runs once (A B C, B C A, C A B, ...), so a slow spell of the machine hits every row alike.
Besides the rows of the table this times

* an **ONNX Runtime fp32** version of the chain's newest fp32 model (pruned, else fine-tuned),
  exported now with the quantize stage's own export + ORT fusion into a temporary folder, so the
  table shows the gain of int8 apart from the gain of switching runtime;
* every artifact the report shows once because it is byte-identical to another row's (an ONNX
  export's copy of the quantized file), under its own name: the same file timed twice in one
  measurement, which shows how far two readings of one model can disagree (``same_file`` in the
  report's ``latency`` section; ``benchmarks/latency_repeatability.py`` repeats it).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinycompress.checkpoint.store import Checkpoint
from tinycompress.console import log_to_stderr
from tinycompress.errors import TinycompressError
from tinycompress.report.rows import BATCH_KEYS, Row

ONNX_FP32_KEY = "onnx_fp32"

ONNX_FP32_DIR = "onnx-fp32"


def _test_texts(finetune: Checkpoint, data_dir: str | None, limit: int = 512) -> list[tuple[str, ...]]:
    """Real test rows of the task, with the data settings the chain was trained with."""
    from tinycompress.config import load_config
    from tinycompress.data.glue import load_config_data
    from tinycompress.data.tasks import get_task

    overrides = {"data.data_dir": data_dir} if data_dir else {}
    config = load_config(None, overrides, base=finetune.manifest["config"])
    data = load_config_data(config, get_task(config.task))
    return data.test.texts[:limit]


def _row_predictor(row: Row, threads: int):
    """The predictor of one row: its export file when it has one, else its checkpoint folder."""
    from tinycompress.checkpoint.format import ONNX_FILE
    from tinycompress.inference.predictor import load_predictor, onnx_predictor, torchscript_predictor

    if row.artifact is None:
        return load_predictor(row.path, threads=threads)
    if row.artifact == ONNX_FILE:
        return onnx_predictor(row.path, threads=threads)
    return torchscript_predictor(row.path, row.artifact)


def onnx_fp32_source(rows: list[Row], chain: list[Checkpoint]) -> tuple[Row, Checkpoint] | None:
    """The row and checkpoint of the chain's newest torch fp32 model: the last pruned, else the fine-tuned."""
    by_name = {c.name: c for c in chain}
    for key in ("prune", "finetune"):
        found = [r for r in rows if r.key == key and r.status == "ok" and r.checkpoint in by_name]
        if found:
            return found[-1], by_name[found[-1].checkpoint]
    return None


def make_onnx_fp32_row(source: Row, checkpoint: Checkpoint, folder: Path, *, threads: int, max_length: int):
    """(row, predictor): ``checkpoint`` exported to fp32 ONNX with the quantize stage's export +
    ORT transformer fusion (:func:`~tinycompress.exporters.ort_fusion.export_optimized_onnx`) in
    ``folder`` (config and tokenizer beside it). The row's metrics are the source model's (the
    same weights); its size is the fp32 ONNX file's."""
    from tinycompress.checkpoint.format import ONNX_FILE
    from tinycompress.checkpoint.hf import load_hf_model, save_config_and_tokenizer
    from tinycompress.exporters.ort_fusion import export_optimized_onnx
    from tinycompress.inference.predictor import onnx_predictor

    model, tokenizer = load_hf_model(checkpoint)
    scratch = folder / "scratch"
    scratch.mkdir(parents=True)
    graph = export_optimized_onnx(model, folder / ONNX_FILE, opset=checkpoint.config.export.opset, scratch=scratch)
    save_config_and_tokenizer(folder, model.config, tokenizer, max_length)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.startswith(ONNX_FILE))
    fusion = "with fused attention" if graph.get("attention_fusion") else "no attention fusion"
    row = Row(
        key=ONNX_FP32_KEY,
        label=f"{source.label}, ONNX Runtime fp32",
        status="ok",
        checkpoint=source.checkpoint,
        runtime="onnx fp32",
        size_bytes=size,
        metrics=dict(source.metrics),
        metrics_from=f"{source.checkpoint} (same weights, fp32)",
        parameters=source.parameters,
        heads_kept=source.heads_kept,
        heads_total=source.heads_total,
        ffn_kept=source.ffn_kept,
        ffn_total=source.ffn_total,
        test_rows=source.test_rows,
        notes=[
            f"{source.checkpoint} exported now to fp32 ONNX ({fusion}) with the quantize stage's export + ORT fusion, "
            "into a temporary folder, for --bench only; metrics are the source model's (same weights, not measured "
            "on this file); size is the fp32 ONNX file's"
        ],
    )
    return row, onnx_predictor(folder, threads=threads, max_length=max_length)


def _relative_difference(a: float, b: float) -> float:
    """|a - b| relative to the smaller of the two (0.1 = the larger is 10 % above the smaller)."""
    return abs(a - b) / min(a, b)


def bench_rows(
    rows: list[Row],
    chain: list[Checkpoint],
    *,
    runs: int = 50,
    threads: int | None = None,
    data_dir: str | None = None,
    log: Callable[[str], None] = log_to_stderr,
    twins: list[tuple[Row, Row]] = (),
    onnx_fp32: bool = True,
) -> dict[str, Any]:
    """Measure every row's latency now, interleaved in one measurement, in place; returns the
    ``latency`` section of the report.

    Each row's model is loaded (:func:`tinycompress.inference.predictor.load_predictor`, or its
    export file) before any is timed; then all are timed together, ``runs`` rounds per batch
    size (:func:`tinycompress.inference.latency.measure_predictors`) on the same test texts,
    tokenized by each model's own tokenizer (batch 1 = the median-length row, batch 32 = the
    first 32 rows). Every row keeps its median and spread (``latency_spread``). The original row
    has the fine-tuned architecture, so it gets the fine-tuned latency.

    ``onnx_fp32``: add the ONNX Runtime fp32 row (see :func:`make_onnx_fp32_row`) right after its
    source row. ``twins``: (kept, dropped) rows of byte-identical artifacts
    (:func:`~tinycompress.report.identical.merge_identical`); the dropped file is timed too, and the
    two readings of the same file are returned under ``same_file``.
    """
    from tinycompress.inference.latency import DEFAULT_WARMUP, LATENCY_BATCH_SIZES, measure_predictors
    from tinycompress.inference.machine import machine_info
    from tinycompress.models.run_setup import configure_threads, quiet_hf

    quiet_hf()
    used_threads = configure_threads(threads)
    finetune = next((c for c in chain if c.stage == "finetune"), chain[0])
    max_length = finetune.config.model.max_length
    texts = _test_texts(finetune, data_dir)
    section: dict[str, Any] = {}
    predictors: dict[str, Any] = {}
    measured: dict[str, Row] = {}
    with tempfile.TemporaryDirectory(prefix="tinycompress-bench-") as scratch:
        made_now: dict[int, Any] = {}  # id(row) -> predictor, for rows made here (no folder of their own)
        source = onnx_fp32_source(rows, chain) if onnx_fp32 else None
        if source is not None:
            log(f"bench: exporting {source[0].checkpoint} to ONNX fp32 (temporary) ...")
            try:
                row, predictor = make_onnx_fp32_row(
                    source[0], source[1], Path(scratch) / ONNX_FP32_DIR, threads=used_threads, max_length=max_length
                )
            except Exception as exc:  # a missing row must not cost the whole report; it is said why
                section["onnx_fp32"] = f"not made: {type(exc).__name__}: {exc}"
                log(f"bench: ONNX Runtime fp32 row left out: {exc}")
            else:
                rows.insert(rows.index(source[0]) + 1, row)
                made_now[id(row)] = predictor
        for row in rows:  # every model is loaded before any is timed, in table order
            if row.status != "ok":
                continue
            row.set_latency({}, None, None)
            if id(row) in made_now:
                name = f"{row.checkpoint} (ONNX Runtime fp32, made now)"
                predictors[name], measured[name] = made_now[id(row)], row
                continue
            if row.path is None:
                continue
            log(f"bench: loading {row.label} ({row.where}) ...")
            try:
                predictors[row.where], measured[row.where] = _row_predictor(row, used_threads), row
            except TinycompressError as exc:
                row.notes.append(f"latency not measured: {exc.problem}")
        twin_names = []
        for kept, dropped in twins:
            if kept.where in predictors and dropped.path is not None and dropped.where not in predictors:
                try:
                    predictors[dropped.where] = _row_predictor(dropped, used_threads)
                except TinycompressError as exc:
                    log(f"bench: {dropped.where} not timed: {exc.problem}")
                    continue
                twin_names.append((kept, dropped))
        if predictors:
            log(f"bench: {len(predictors)} models interleaved, {runs} rounds after {DEFAULT_WARMUP} warm-up rounds ...")
            timings = measure_predictors(predictors, texts, max_length=max_length, runs=runs, warmup=DEFAULT_WARMUP)
        else:
            timings = {}
    machine = machine_info(used_threads)
    for name, row in measured.items():
        row.set_latency(timings[name], "bench", machine)
    finetune_row = next((r for r in rows if r.key == "finetune" and r.status == "ok"), None)
    original = next((r for r in rows if r.key == "original" and r.status == "ok"), None)
    if original is not None and finetune_row is not None and finetune_row.latency_source == "bench":
        original.set_latency({k: finetune_row.timing(k) for k in BATCH_KEYS}, "bench", machine)
        original.notes.append("latency: the fine-tuned model's (same architecture)")
    same_file = []
    for kept, dropped in twin_names:
        entry: dict[str, Any] = {"row": kept.label, "first": kept.where, "second": dropped.where}
        for key in BATCH_KEYS:
            a, b = timings[kept.where][key], timings[dropped.where][key]
            entry[key] = {
                "first": a,
                "second": b,
                "relative_difference": round(_relative_difference(a["median_ms"], b["median_ms"]), 4),
            }
        same_file.append(entry)
    return {
        "source": "bench",
        "machine": machine,
        "runs": runs,
        "rounds": runs,
        "warmup": DEFAULT_WARMUP,
        "statistic": "median, IQR",
        "protocol": "all models loaded first, then timed interleaved: every round runs each model once, the first model rotating",
        "models": list(predictors),
        "batch_sizes": list(LATENCY_BATCH_SIZES),
        "max_length": max_length,
        "inputs": f"{len(texts)} real test rows: batch 1 = the median-length row, batch 32 = the first 32 rows padded to the longest",
        "same_file": same_file,
        **section,
    }
