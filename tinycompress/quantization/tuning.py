"""Accuracy-driven int8 tuning (``tinycompress quantize --tolerance POINTS``), like Intel Neural
Compressor's: try several quantization recipes, keep the most accuracy-sensitive parts of the
graph in fp32 when none is accurate enough, and choose the *fastest* candidate whose dev metric
is within the tolerance of the fp32 parent's.

This module is the search alone; it knows nothing of ONNX, torch, data or timing. The caller
(:mod:`tinycompress.stages.quantize`) passes callables:

* ``build(recipe, fp32_nodes, folder)``: write the candidate (recipe, with the named nodes /
  modules left in fp32) into ``folder``; returns details for the manifest;
* ``dev_metric(folder)``: the task's main metric of the candidate in ``folder`` on the dev split
  carved from train (never the test set);
* ``latencies({name: folder})``: ``{name: {"batch_1": timing, "batch_32": timing}}`` of several
  candidates measured against one another (the latency protocol of
  :mod:`tinycompress.inference.latency`: interleaved rounds, median and spread);
* ``node_groups(recipe)``: the nodes the recipe quantizes, grouped (``embeddings``,
  ``layer 3 attention``, ``layer 3 ffn``, ...), in graph order.

The search (:func:`tune`)
-------------------------
1. **Recipes.** Every recipe is built and measured, in the order given (the configured recipe
   first). Each is a candidate.
2. **Node exclusion**, only when no recipe is within the tolerance. Take the recipe with the best
   dev metric. *Sensitivity*: for each node group, build that recipe with this one group in fp32
   and measure it (one candidate per group); a group's sensitivity is the metric it wins back.
   The phase stops at the first candidate within the tolerance. Otherwise *fallback*: keep the
   2, 3, ... most sensitive groups in fp32 together, re-measuring after each added group, and stop
   at the first candidate within the tolerance -- at most all groups but one (every group in fp32
   is the fp32 graph again, not an int8 model), or ``max_fp32_groups`` when set.
3. **Choice.** Every candidate within the tolerance -- plus the first recipe, as the reference
   point of "full int8" -- is timed against the others in one interleaved measurement; the
   fastest at batch 32 (median) is chosen. Candidates whose interquartile range overlaps the
   fastest's cannot be told apart by the measurement: among those, the smaller file wins (files
   within 10 % of the smallest count as one size: a recipe that keeps the word embedding in fp32
   is 3x larger for no speed), then the best dev metric, then the earlier (simpler) recipe. A NaN
   dev metric is never within the tolerance nor "best".

Drops are in *points* of the metric (100 x the metric: 0.3 points = 0.003 of accuracy); every
GLUE metric here grows with quality, so drop = (fp32 - candidate) x 100.

When nothing meets the tolerance
--------------------------------
This happens when even all groups but one in fp32 miss the tolerance (a tolerance of about 0, a
very sensitive model, or ``max_fp32_groups`` set). We then *keep the best candidate* (highest dev
metric; among equals the one with fewer fp32 nodes, then the earliest), mark the result
``within_tolerance: false`` and let the caller warn -- rather than failing, because a run that
took minutes of calibration should still leave the most accurate int8 model it found, and the
manifest says plainly that it misses the tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Dev metric drops within this many points of the tolerance count as within (float rounding).
_EPSILON = 1e-9

#: Candidates tied on speed whose files are within this share of the smallest one's are one size.
SIZE_TIE = 0.10

#: The batch size whose median latency decides between candidates.
CHOICE_BATCH = "batch_32"


@dataclass(frozen=True)
class Recipe:
    """A named quantization recipe; ``settings`` are backend-specific and JSON-serialisable."""

    name: str
    settings: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dict(self.settings)}


@dataclass
class Candidate:
    """One built and measured candidate."""

    name: str
    recipe: Recipe
    phase: str  # "recipe" | "sensitivity" | "fallback"
    fp32_groups: tuple[str, ...]
    fp32_nodes: tuple[str, ...]
    folder: Path
    dev_metric: float
    drop_points: float
    size_bytes: int
    within_tolerance: bool
    details: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "phase": self.phase,
            "recipe": self.recipe.to_dict(),
            "fp32_groups": list(self.fp32_groups),
            "fp32_nodes": list(self.fp32_nodes),
            "dev_metric": self.dev_metric,
            "drop_points": round(self.drop_points, 4),
            "size_bytes": self.size_bytes,
            "latency": self.latency,
            "within_tolerance": self.within_tolerance,
        }


@dataclass
class TuningResult:
    tolerance: float
    metric: str
    reference: float  # fp32 dev metric of the parent
    candidates: list[Candidate]
    chosen: Candidate
    sensitivity: dict[str, float]  # group -> dev metric with that group alone in fp32

    @property
    def within_tolerance(self) -> bool:
        return self.chosen.within_tolerance

    def to_dict(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "metric": self.metric,
            "split": "dev",
            "fp32_dev_metric": self.reference,
            "candidates": [c.to_dict() for c in self.candidates],
            "sensitivity": dict(self.sensitivity),
            "chosen": self.chosen.name,
            "within_tolerance": self.within_tolerance,
            "choice_rule": (
                f"fastest at {CHOICE_BATCH.replace('_', ' ')} (median) among candidates within tolerance; "
                "candidates whose IQR overlaps the fastest's count as tied: the smallest file (within 10 %), "
                "then best dev metric, then recipe order"
                if self.within_tolerance
                else "none within tolerance: the best dev metric was kept"
            ),
        }


def _score(candidate: Candidate) -> float:
    """The dev metric, NaN ranked below everything."""
    return -math.inf if math.isnan(candidate.dev_metric) else candidate.dev_metric


def folder_bytes(folder: Path) -> int:
    """Total size of the files in ``folder`` (default candidate size)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def drop_in_points(reference: float, metric: float) -> float:
    return (reference - metric) * 100.0


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)


def tune(
    recipes: Sequence[Recipe],
    *,
    build: Callable[[Recipe, Sequence[str], Path], Mapping[str, Any] | None],
    dev_metric: Callable[[Path], float],
    latencies: Callable[[Mapping[str, Path]], Mapping[str, Mapping[str, Any]]],
    node_groups: Callable[[Recipe], Mapping[str, Sequence[str]]],
    reference: float,
    tolerance: float,
    metric: str,
    scratch: Path,
    size: Callable[[Path], int] = folder_bytes,
    max_fp32_groups: int | None = None,
    same_speed: Callable[[Mapping[str, Any], Mapping[str, Any]], bool] = lambda a, b: False,
    log: Callable[[str], None] | None = None,
) -> TuningResult:
    """Search for the fastest candidate whose dev metric is within ``tolerance`` points of
    ``reference`` (see the module docstring). Candidates are built in sub-folders of ``scratch``;
    the chosen one's folder is ``result.chosen.folder``. ``same_speed(a, b)`` says whether two
    timings cannot be told apart (the latency protocol's spread; default: never). Raises
    ValueError for no recipes, a negative tolerance or a NaN reference."""
    if not recipes:
        raise ValueError("tune needs at least one recipe")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if math.isnan(reference):
        raise ValueError("the fp32 dev metric is NaN: there is no accuracy to stay within a tolerance of")
    say = log or (lambda _message: None)
    candidates: list[Candidate] = []

    def attempt(recipe: Recipe, phase: str, name: str, groups: Sequence[str], nodes: Sequence[str]) -> Candidate:
        folder = Path(scratch) / f"{len(candidates):02d}-{_safe(name)}"
        details = dict(build(recipe, list(nodes), folder) or {})
        value = float(dev_metric(folder))
        # A NaN metric (e.g. a constant-prediction correlation) is never within, never "best".
        drop = math.inf if math.isnan(value) else drop_in_points(reference, value)
        candidate = Candidate(
            name=name,
            recipe=recipe,
            phase=phase,
            fp32_groups=tuple(groups),
            fp32_nodes=tuple(nodes),
            folder=folder,
            dev_metric=value,
            drop_points=drop,
            size_bytes=int(size(folder)),
            within_tolerance=drop <= tolerance + _EPSILON,
            details=details,
        )
        candidates.append(candidate)
        verdict = "within" if candidate.within_tolerance else "outside"
        say(f"tune: {name}: dev {metric} {value:.4f} (drop {drop:+.2f} points, {verdict} {tolerance:g})")
        return candidate

    for recipe in recipes:
        attempt(recipe, "recipe", recipe.name, (), ())

    sensitivity: dict[str, float] = {}
    if not any(c.within_tolerance for c in candidates):
        base = max(candidates, key=_score)  # max keeps the first of equals
        groups = {name: list(nodes) for name, nodes in node_groups(base.recipe).items() if nodes}
        singles: dict[str, Candidate] = {}
        for group, nodes in groups.items():
            single = attempt(base.recipe, "sensitivity", f"{base.recipe.name}+fp32[{group}]", (group,), nodes)
            singles[group] = single
            sensitivity[group] = single.dev_metric
            if single.within_tolerance:
                break
        if singles and not any(c.within_tolerance for c in singles.values()):
            order = list(groups)
            ranked = sorted(order, key=lambda g: (-sensitivity[g], order.index(g)))
            # Every group in fp32 is the fp32 graph again, not an int8 model: stop one short of it.
            limit = len(ranked) - 1 if max_fp32_groups is None else min(max_fp32_groups, len(ranked) - 1)
            for k in range(2, limit + 1):
                kept = ranked[:k]
                nodes = [node for group in kept for node in groups[group]]
                if attempt(
                    base.recipe, "fallback", f"{base.recipe.name}+fp32[{k} groups]", kept, nodes
                ).within_tolerance:
                    break

    within = [c for c in candidates if c.within_tolerance]
    timed = within if candidates[0] in within else [candidates[0], *within]
    if not within:
        chosen = max(candidates, key=lambda c: (_score(c), -len(c.fp32_nodes), -candidates.index(c)))
        timed = [candidates[0]] if chosen is candidates[0] else [candidates[0], chosen]
    timings = latencies({c.name: c.folder for c in timed})
    for candidate in timed:
        candidate.latency = dict(timings[candidate.name])
    if within:
        fastest = min(within, key=lambda c: (c.latency[CHOICE_BATCH]["median_ms"], candidates.index(c)))
        # Candidates the measurement cannot tell apart from the fastest (overlapping IQRs) are
        # tied on speed: among them the smaller file, then the best dev metric, then the earlier
        # (simpler) recipe. Seed 44's search chose fp32 embeddings (52.7 MB against 16.9) for
        # 0.09 point of dev accuracy, which did not hold on test.
        tied = [c for c in within if c is fastest or same_speed(c.latency[CHOICE_BATCH], fastest.latency[CHOICE_BATCH])]
        smallest = min(c.size_bytes for c in tied)
        small = [c for c in tied if c.size_bytes <= smallest * (1 + SIZE_TIE)]
        chosen = max(small, key=lambda c: (_score(c), -candidates.index(c)))
    say(f"tune: chose {chosen.name}" + ("" if chosen.within_tolerance else " (none within tolerance: best dev metric)"))
    return TuningResult(tolerance, metric, reference, candidates, chosen, sensitivity)
