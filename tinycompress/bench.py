"""Latency measurement shared by the benchmarks and the report.

Every model in a comparison must see the same inputs, so :func:`latency_batches` builds them
once from real task texts and the callers time each model's forward on those same tensors.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

LATENCY_BATCH_SIZES = (1, 32)


def measure_latency(forward: Callable[[], Any], *, runs: int = 50, warmup: int = 5) -> dict[str, float | int]:
    """Wall-clock latency of ``forward()``: ``{"median_ms", "p90_ms", "runs"}``.

    ``forward`` takes no arguments and runs one complete inference (bind the inputs in a
    closure, see :func:`torch_forward`). ``warmup`` untimed calls come first, so lazy
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
    return {"median_ms": round(statistics.median(timings_ms), 3), "p90_ms": round(_percentile(timings_ms, 90), 3), "runs": runs}


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
    rows = [(t,) if isinstance(t, str) else tuple(t) for t in texts]
    if not rows:
        raise ValueError("latency_batches needs at least one text")
    lengths = [len(_tokenize(tokenizer, [row], max_length)["input_ids"][0]) for row in rows]
    by_length = sorted(range(len(rows)), key=lambda i: (lengths[i], i))
    median_row = rows[by_length[len(by_length) // 2]]
    batch32 = [rows[i % len(rows)] for i in range(32)]
    return {1: _tokenize(tokenizer, [median_row], max_length, tensors=True), 32: _tokenize(tokenizer, batch32, max_length, tensors=True)}


def _tokenize(tokenizer, rows: list[tuple[str, ...]], max_length: int, tensors: bool = False) -> dict:
    columns = [list(column) for column in zip(*rows)]
    return dict(
        tokenizer(*columns, truncation=True, max_length=max_length, padding=tensors, return_tensors="pt" if tensors else None)
    )


def torch_forward(model, inputs: dict) -> Callable[[], Any]:
    """A no-argument closure running ``model(**inputs)`` without autograd, for measure_latency."""
    import torch

    model.eval()

    def forward():
        with torch.inference_mode():
            return model(**inputs).logits

    return forward
