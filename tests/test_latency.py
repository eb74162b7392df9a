"""The latency protocol (tinycompress.inference.latency): interleaved rounds, median with spread."""

from __future__ import annotations

import pytest

from tinycompress.inference.latency import Timing, differs, measure_interleaved


def test_models_are_timed_interleaved_in_rounds_after_warmup():
    calls: list[str] = []
    forwards = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    timings = measure_interleaved(forwards, runs=3, warmup=2)
    # Two warm-up rounds, then three timed rounds, each starting one model later.
    assert calls == ["a", "b", "c"] * 2 + ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {name: t.runs for name, t in timings.items()} == {"a": 3, "b": 3, "c": 3}


def test_a_slow_spell_hits_every_model_in_its_round():
    # A fake clock: round 2 of 4 is slow for everyone; model b always costs twice a's time.
    import tinycompress.inference.latency as latency

    now = [0.0]
    cost = {"a": 1.0, "b": 2.0}
    calls = {"count": 0}

    def forward(name):
        def run():
            slow = 10.0 if calls["count"] // 2 == 1 else 1.0  # both calls of the second round
            now[0] += cost[name] * slow / 1000.0
            calls["count"] += 1

        return run

    original = latency.time.perf_counter
    latency.time.perf_counter = lambda: now[0]
    try:
        timings = measure_interleaved({"a": forward("a"), "b": forward("b")}, runs=4, warmup=0)
    finally:
        latency.time.perf_counter = original
    assert timings["a"].median_ms == pytest.approx(1.0) and timings["b"].median_ms == pytest.approx(2.0)
    assert timings["a"].max_ms == pytest.approx(10.0) and timings["b"].max_ms == pytest.approx(20.0)


def test_timing_summary_and_differs():
    timing = Timing.of([1.0, 2.0, 3.0, 4.0, 100.0])
    assert (timing.median_ms, timing.q1_ms, timing.q3_ms, timing.min_ms, timing.max_ms) == (3.0, 2.0, 4.0, 1.0, 100.0)
    assert timing.p90_ms == pytest.approx(61.6)  # linear interpolation, as numpy's default
    assert timing.runs == 5
    fast, overlapping, slow = Timing.of([1, 2, 3]), Timing.of([1.8, 2.2, 2.6]), Timing.of([5, 6, 7])
    assert differs(fast, slow) is True and differs(fast, overlapping) is False
    assert differs(fast.to_dict(), {"median_ms": 9.0}) is None  # a manifest without a spread
    with pytest.raises(ValueError):
        Timing.of([])
    with pytest.raises(ValueError, match="runs"):
        measure_interleaved({"a": lambda: None}, runs=0)
