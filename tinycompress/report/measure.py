"""Latency of every report row, measured now on this machine, interleaved in one process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tinycompress.checkpoint.store import Checkpoint
from tinycompress.console import log_to_stderr
from tinycompress.errors import TinycompressError
from tinycompress.report.rows import BATCH_KEYS, Row


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


def bench_rows(
    rows: list[Row],
    chain: list[Checkpoint],
    *,
    runs: int = 50,
    threads: int | None = None,
    data_dir: str | None = None,
    log: Callable[[str], None] = log_to_stderr,
) -> dict[str, Any]:
    """Measure every row's latency now, in place; returns the ``latency`` section of the report.

    Each row's folder is loaded with :func:`tinycompress.inference.predictor.load_predictor` and fed the same
    test texts, tokenized by its own tokenizer (they are copies of one another) into a batch of 1
    (the median-length row) and a batch of 32 (see :func:`tinycompress.inference.latency.latency_batches`).
    The original row has the fine-tuned architecture, so it gets the fine-tuned latency.
    """
    from tinycompress.inference.latency import DEFAULT_WARMUP, LATENCY_BATCH_SIZES, measure_predictor
    from tinycompress.inference.machine import machine_info
    from tinycompress.models.run_setup import configure_threads, quiet_hf

    quiet_hf()
    used_threads = configure_threads(threads)
    finetune = next((c for c in chain if c.stage == "finetune"), chain[0])
    max_length = finetune.config.model.max_length
    texts = _test_texts(finetune, data_dir)
    for row in rows:
        if row.status != "ok" or row.path is None:
            continue
        row.latency_ms, row.latency_source, row.latency_machine = {k: None for k in BATCH_KEYS}, None, None
        log(f"bench {row.label} ({row.checkpoint}) ...")
        try:
            predictor = _row_predictor(row, used_threads)
        except TinycompressError as exc:
            row.notes.append(f"latency not measured: {exc.problem}")
            continue
        timings = measure_predictor(predictor, texts, max_length=max_length, runs=runs)
        row.latency_ms = {key: timing["median_ms"] for key, timing in timings.items()}
        row.latency_source = "bench"
    finetune_row = next((r for r in rows if r.key == "finetune" and r.status == "ok"), None)
    original = next((r for r in rows if r.key == "original" and r.status == "ok"), None)
    if original is not None and finetune_row is not None and finetune_row.latency_source == "bench":
        original.latency_ms, original.latency_source = dict(finetune_row.latency_ms), "bench"
        original.notes.append("latency: the fine-tuned model's (same architecture)")
    machine = machine_info(used_threads)
    for row in rows:
        if row.latency_source == "bench":
            row.latency_machine = machine
    return {
        "source": "bench",
        "machine": machine,
        "runs": runs,
        "warmup": DEFAULT_WARMUP,
        "statistic": "median",
        "batch_sizes": list(LATENCY_BATCH_SIZES),
        "max_length": max_length,
        "inputs": f"{len(texts)} real test rows: batch 1 = the median-length row, batch 32 = the first 32 rows padded to the longest",
    }
