"""Latency measurement shared by the quantize and export stages, the report and the benchmarks.

Every model in a comparison must see the same inputs, so :func:`latency_batches` builds them
from real task texts and :func:`measure_predictor` times each model's forward on them: the one
way latency is measured anywhere in tinycompress.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

LATENCY_BATCH_SIZES = (1, 32)

DEFAULT_WARMUP = 5


def measure_latency(
    forward: Callable[[], Any], *, runs: int = 50, warmup: int = DEFAULT_WARMUP
) -> dict[str, float | int]:
    """Wall-clock latency of ``forward()``: ``{"median_ms", "p90_ms", "runs"}``.

    ``forward`` takes no arguments and runs one complete inference (bind the inputs in a
    closure, as :func:`measure_predictor` does). ``warmup`` untimed calls come first, so lazy
    initialisation and allocator growth are not measured. Raises ValueError for runs < 1 or
    warmup < 0.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for _ in range(warmup):
        forward()
    timings_ms = []
    for _ in range(runs):
        start = time.perf_counter()
        forward()
        timings_ms.append((time.perf_counter() - start) * 1000.0)
    return {
        "median_ms": round(statistics.median(timings_ms), 3),
        "p90_ms": round(_percentile(timings_ms, 90), 3),
        "runs": runs,
    }


def _percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation (numpy's default), without numpy."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_batches(tokenizer, texts: Sequence[str | tuple[str, ...]], max_length: int) -> dict[int, dict]:
    """``{1: inputs, 32: inputs}``: tokenized batches of real texts, as torch tensors.

    ``texts`` are task rows (a string, or a tuple of one or two strings for pair tasks); pass
    the same rows for every model compared. Batch 1 is the row of median token length (a
    typical request, not the shortest or longest); batch 32 is the first 32 rows (cycled when
    fewer), padded to the longest of them. Raises ValueError when ``texts`` is empty.
    """
    from tinycompress.data.batching import as_text_row, encode_rows

    rows = [as_text_row(t) for t in texts]
    if not rows:
        raise ValueError("latency_batches needs at least one text")
    lengths = [len(ids) for ids in encode_rows(tokenizer, rows, max_length, return_tensors=None)["input_ids"]]
    by_length = sorted(range(len(rows)), key=lambda i: (lengths[i], i))
    median_row = rows[by_length[len(by_length) // 2]]
    batch32 = [rows[i % len(rows)] for i in range(32)]
    return {1: encode_rows(tokenizer, [median_row], max_length), 32: encode_rows(tokenizer, batch32, max_length)}


def measure_predictor(
    predictor, texts: Sequence, *, max_length: int, runs: int, warmup: int = DEFAULT_WARMUP
) -> dict[str, dict]:
    """``{"batch_1": {median_ms, p90_ms, runs}, "batch_32": {...}}``: the latency of a
    :class:`~tinycompress.inference.predictor.Predictor` on :func:`latency_batches` of ``texts``, tokenized
    by its own tokenizer and truncated to ``max_length`` tokens."""
    return {
        f"batch_{size}": measure_latency(lambda inputs=inputs: predictor.forward(inputs), runs=runs, warmup=warmup)
        for size, inputs in latency_batches(predictor.tokenizer, texts, max_length).items()
    }


def artifact_latency(predictor, texts: Sequence, *, runs: int, threads: int) -> dict[str, Any]:
    """:func:`measure_predictor` at the predictor's own max length, plus ``"machine"``: the
    latency record a stage keeps in its manifest (``details.latency``)."""
    from tinycompress.inference.machine import machine_info

    result: dict[str, Any] = measure_predictor(predictor, texts, max_length=predictor.max_length, runs=runs)
    result["machine"] = machine_info(threads)
    return result
