"""Latency measurement shared by the quantize and export stages, the report and the benchmarks.

The protocol, the one way latency is measured anywhere in tinycompress:

* every model in a comparison sees the same inputs (:func:`latency_batches`: real task texts,
  batch 1 = the median-length row, batch 32 = the first 32 rows), tokenized by its own tokenizer;
* models compared with one another are timed *interleaved*, in rounds (A B C, B C A, C A B, ...), after
  warm-up rounds, with the caller's thread count pinned (:func:`measure_interleaved`): a slow
  spell of the machine then hits every model alike instead of whichever ran during it;
* the result of each model is its median with its spread -- the interquartile range (Q1-Q3)
  and min-max -- and the number of rounds (:class:`Timing`); two models differ only when their
  interquartile ranges do not overlap (:func:`differs`).

The statistics are the standard library's (``statistics.median`` and ``statistics.quantiles``);
pyperf would time each model in separate processes, which defeats the interleaving, and
``torch.utils.benchmark`` times one statement at a time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

LATENCY_BATCH_SIZES = (1, 32)

DEFAULT_WARMUP = 5


@dataclass(frozen=True)
class Timing:
    """Wall-clock latency of one model over ``rounds`` timed calls, in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    p90_ms: float
    runs: int  # timed calls (one per round)

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Timing:
        """The summary of raw per-call timings (at least one)."""
        if not samples_ms:
            raise ValueError("a timing needs at least one sample")
        samples_ms = [float(s) for s in samples_ms]
        if len(samples_ms) == 1:
            q1 = q3 = samples_ms[0]
        else:
            # "inclusive" treats the samples as the whole population: Q1/Q3 stay within min-max.
            q1, _, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")
        p90 = statistics.quantiles(samples_ms, n=10, method="inclusive")[-1] if len(samples_ms) > 1 else samples_ms[0]
        return cls(
            median_ms=round(statistics.median(samples_ms), 3),
            q1_ms=round(q1, 3),
            q3_ms=round(q3, 3),
            min_ms=round(min(samples_ms), 3),
            max_ms=round(max(samples_ms), 3),
            p90_ms=round(p90, 3),
            runs=len(samples_ms),
        )

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def differs(a: Mapping[str, Any] | Timing, b: Mapping[str, Any] | Timing) -> bool | None:
    """Whether two timings differ by more than their spread (their Q1-Q3 ranges do not overlap).

    Takes :class:`Timing` objects or their dicts; None when either lacks a spread (a manifest
    written before the protocol recorded one).
    """
    a, b = (t.to_dict() if isinstance(t, Timing) else t for t in (a, b))
    if any(t.get(k) is None for t in (a, b) for k in ("q1_ms", "q3_ms")):
        return None
    return a["q3_ms"] < b["q1_ms"] or b["q3_ms"] < a["q1_ms"]


def measure_interleaved(
    forwards: Mapping[str, Callable[[], Any]], *, runs: int = 50, warmup: int = DEFAULT_WARMUP
) -> dict[str, Timing]:
    """Time several models against one another: ``warmup`` untimed rounds (A B C), then ``runs``
    timed rounds, each calling every forward once, the starting model rotating (A B C, B C A, ...).

    ``forwards`` maps a name to a no-argument function that runs one complete inference (bind
    the inputs in a closure). Returns each name's :class:`Timing`. Raises ValueError for
    runs < 1, warmup < 0 or no forwards.
    """
    samples = interleaved_samples(forwards, runs=runs, warmup=warmup)
    return {name: Timing.of(values) for name, values in samples.items()}


def paired_speedup(baseline_ms: Sequence[float], model_ms: Sequence[float]) -> float:
    """The median over rounds of ``baseline / model``, both timed in the same round.

    A slow spell of the machine that hits one round slows both models of that round alike, so the
    per-round ratio is steadier than the ratio of the two medians.
    """
    if len(baseline_ms) != len(model_ms) or not model_ms:
        raise ValueError("paired_speedup needs the same, non-zero number of rounds for both models")
    return statistics.median(b / m for b, m in zip(baseline_ms, model_ms))


def interleaved_samples(
    forwards: Mapping[str, Callable[[], Any]], *, runs: int = 50, warmup: int = DEFAULT_WARMUP
) -> dict[str, list[float]]:
    """The raw per-round times (ms) behind :func:`measure_interleaved`; round ``i`` of every model
    is its ``i``-th entry."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not forwards:
        raise ValueError("measure_interleaved needs at least one forward")
    for _ in range(warmup):
        for forward in forwards.values():
            forward()
    samples: dict[str, list[float]] = {name: [] for name in forwards}
    order = list(forwards)
    for round_ in range(runs):
        # Each round starts one model later (A B C, B C A, C A B, ...), so no model always runs
        # right after the same neighbour (whose caches and allocations it would inherit).
        shift = round_ % len(order)
        for name in order[shift:] + order[:shift]:
            start = time.perf_counter()
            forwards[name]()
            samples[name].append((time.perf_counter() - start) * 1000.0)
    return samples


def measure_latency(
    forward: Callable[[], Any], *, runs: int = 50, warmup: int = DEFAULT_WARMUP
) -> dict[str, float | int]:
    """One model's :class:`Timing` as a dict (:func:`measure_interleaved` with a single model)."""
    return measure_interleaved({"model": forward}, runs=runs, warmup=warmup)["model"].to_dict()


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


def measure_predictors(
    predictors: Mapping[str, Any], texts: Sequence, *, max_length: int, runs: int, warmup: int = DEFAULT_WARMUP
) -> dict[str, dict[str, dict]]:
    """``{name: {"batch_1": timing dict, "batch_32": ...}}``: :class:`~tinycompress.inference.predictor.Predictor`
    objects timed against one another (:func:`measure_interleaved`, one batch size at a time) on
    :func:`latency_batches` of ``texts``, each tokenized by its own tokenizer and truncated to
    ``max_length`` tokens."""
    inputs = {name: latency_batches(p.tokenizer, texts, max_length) for name, p in predictors.items()}
    result: dict[str, dict[str, dict]] = {name: {} for name in predictors}
    for size in LATENCY_BATCH_SIZES:
        forwards = {name: (lambda p=p, batch=inputs[name][size]: p.forward(batch)) for name, p in predictors.items()}
        for name, timing in measure_interleaved(forwards, runs=runs, warmup=warmup).items():
            result[name][f"batch_{size}"] = timing.to_dict()
    return result


def measure_predictor(
    predictor, texts: Sequence, *, max_length: int, runs: int, warmup: int = DEFAULT_WARMUP
) -> dict[str, dict]:
    """``{"batch_1": timing dict, "batch_32": ...}`` of one predictor (:func:`measure_predictors`)."""
    return measure_predictors({"model": predictor}, texts, max_length=max_length, runs=runs, warmup=warmup)["model"]


def artifact_latency(predictor, texts: Sequence, *, runs: int, threads: int) -> dict[str, Any]:
    """:func:`measure_predictor` at the predictor's own max length, plus ``"machine"``: the
    latency record a stage keeps in its manifest (``details.latency``)."""
    from tinycompress.inference.machine import machine_info

    result: dict[str, Any] = measure_predictor(predictor, texts, max_length=predictor.max_length, runs=runs)
    result["machine"] = machine_info(threads)
    return result
