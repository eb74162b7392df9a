"""A cost model of this machine: latency and size of the int8 deployment model against its structure.

Target-driven pruning (``prune --speedup`` / ``--target-latency-ms`` / ``--target-size-mb``) needs
to know what a head or an FFN neuron costs *in the runtime the model is deployed to*: ONNX Runtime
with the ``quantize`` stage's default dynamic int8 recipe, on this CPU, with the thread count in
use. Following Kwon et al. (2022), the cost is taken as additive over layers, and the per-layer
costs come from a lookup table measured once per machine:

* variants of the model's architecture are built with every layer alike -- ``h`` heads and the
  full FFN, for ``h = 0 .. H-1``; the full attention and ``n`` FFN neurons, for ``n`` on a grid
  (``FFN_GRID_STEP``, plus the narrowest width the search keeps) -- plus the unpruned model; each
  is exported, fused and int8-quantized exactly as ``tinycompress quantize`` does, and all are
  timed *interleaved* in one process
  (:func:`~tinycompress.inference.latency.measure_interleaved`) at batch 1 and batch 32 on real
  task texts;
* one layer's attention with ``h`` heads then costs ``(T(h) - T(0)) / layers`` and its FFN with
  ``n`` neurons ``(T(n) - T(0)) / layers`` (linear in between non-zero grid points: an FFN that
  exists pays its fixed cost, so no line is drawn from the skipped block); ``floor`` is what the
  unpruned model's time leaves for embeddings, classifier and LayerNorms. Both curves are made
  non-decreasing (pool-adjacent-violators), so timing noise cannot make a head look free;
* the two blocks' savings do not add up: on this project's machine models with every layer cut in
  both blocks ran 2-8 % slower than the two curves' sum (cut in one block only, within 1 %). So
  variants cut in both blocks are measured too, on a coarse grid (:func:`joint_axis`: no, the
  fewest, and about a quarter, half and three quarters of the heads, likewise of the FFN), and a
  layer keeping ``h`` heads and ``n`` neurons pays, on top of the two curves, the interaction
  measured there (bilinear in between; 0 where either block is whole);
* file sizes of the same variants give the size model (bytes per block), exactly linear.

The table is cached as JSON under ``<workdir>/.cache/cost-tables/``, named by a hash of its key:
CPU, cores, vector extensions, thread count, ONNX Runtime version, recipe, architecture shape and
the input shapes. A second prune on the same machine reads it; any change of the key measures anew.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinycompress.checkpoint.temporaries import remove_orphaned_temporaries, temporary_path
from tinycompress.console import log_to_stderr
from tinycompress.pruning.budget import FFN_STEP, structure_cost

# 2: the narrowest FFN width the search keeps is measured (version 1 drew a line from the skipped
# block to 128 neurons and priced a 32-neuron FFN at a quarter of its cost on MiniLM).
# 3: the interaction of the two blocks is measured (versions 1-2 added the blocks' costs).
TABLE_VERSION = 3
FFN_GRID_STEP = 128
# Shares of the heads / FFN width at which variants cut in both blocks are measured.
JOINT_FRACTIONS = (0.25, 0.5, 0.75)
CACHE_DIR = ".cache/cost-tables"
TABLE_RUNS = 20
TABLE_WARMUP = 3
# The deployment recipe the table is measured for: ``tinycompress quantize``'s default.
RECIPE = "onnx-dynamic-u8s8-per-tensor-embeddings-int8"


def _non_decreasing(values: Sequence[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight]
    for value in values:
        blocks.append([float(value), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean2, weight2 = blocks.pop()
            mean1, weight1 = blocks.pop()
            blocks.append([(mean1 * weight1 + mean2 * weight2) / (weight1 + weight2), weight1 + weight2])
    result: list[float] = []
    for mean, weight in blocks:
        result.extend([mean] * int(weight))
    return result


def _interpolate(widths: Sequence[int], costs: Sequence[float], n: int) -> float:
    """Linear interpolation of ``costs`` over the sorted grid ``widths`` (``widths[0]`` = 0) at ``n``.

    0 costs 0; below the narrowest measured width, that width's cost: most of a block's time at small
    widths is fixed (its quantize, GEMM and activation calls), which a line from 0 would leave out.
    """
    if n <= 0:
        return 0.0
    return float(sum(weight * costs[i] for i, weight in _axis_weights(widths, n)))


def _axis_weights(axis: Sequence[int], x: int) -> list[tuple[int, float]]:
    """(index, weight) pairs interpolating linearly at ``x`` over the sorted ``axis`` (``axis[0]`` = 0):
    0 exactly at 0, the narrowest non-zero point below it, the last point above it. Shared by the
    FFN curve (:func:`_interpolate`) and the interaction grid."""
    if x <= 0:
        return [(0, 1.0)]
    if x >= axis[-1]:
        return [(len(axis) - 1, 1.0)]
    i = bisect_left(axis, x)
    if axis[i] == x or i == 1:
        return [(i, 1.0)]
    t = (x - axis[i - 1]) / (axis[i] - axis[i - 1])
    return [(i - 1, 1.0 - t), (i, t)]


def joint_axis(sizes: Sequence[int], full: int) -> list[int]:
    """Where one block is cut in the variants cut in both: 0, the narrowest of ``sizes`` (the sizes
    measured along that block alone), the ones nearest :data:`JOINT_FRACTIONS` of ``full``, and
    ``full`` (where the interaction is 0 by definition)."""
    inner = sorted(v for v in sizes if 0 < v < full)
    points = {0}
    if inner:
        points.add(inner[0])
        points |= {min(inner, key=lambda v, f=f: (abs(v - f * full), v)) for f in JOINT_FRACTIONS}
    return [*sorted(points), full]


@dataclass
class CostTable:
    """Per-block costs of one architecture on one machine (see the module docstring).

    ``latency[str(batch)]`` holds ``full_ms`` (the unpruned model), ``floor_ms``, ``head_ms``
    (index = kept heads, 0..H), ``ffn_widths`` and ``ffn_ms`` (same length, starting at 0),
    ``joint_heads``, ``joint_ffn`` and ``interaction_ms`` (``[i][j]``: what a layer keeping
    ``joint_heads[i]`` heads and ``joint_ffn[j]`` neurons costs beyond the two curves; absent in
    tables that add the blocks), plus ``timings`` (every variant's median and spread); ``size``
    holds the same in bytes (additive: no interaction).
    """

    key: dict[str, Any]
    latency: dict[str, dict[str, Any]]
    size: dict[str, Any]
    measured_seconds: float = 0.0
    cached: bool = False

    def head_cost(self, batch_size: int) -> Callable[[int], float]:
        table = self.latency[str(batch_size)]["head_ms"]
        return lambda h: float(table[h])

    def ffn_cost(self, batch_size: int) -> Callable[[int], float]:
        entry = self.latency[str(batch_size)]
        return lambda n: _interpolate(entry["ffn_widths"], entry["ffn_ms"], n)

    def interaction_cost(self, batch_size: int) -> Callable[[int, int], float]:
        entry = self.latency[str(batch_size)]
        if "interaction_ms" not in entry:
            return lambda h, n: 0.0
        heads, ffn, values = entry["joint_heads"], entry["joint_ffn"], entry["interaction_ms"]

        def interaction(h: int, n: int) -> float:
            return float(
                sum(wh * wn * values[i][j] for i, wh in _axis_weights(heads, h) for j, wn in _axis_weights(ffn, n))
            )

        return interaction

    def floor_ms(self, batch_size: int) -> float:
        return float(self.latency[str(batch_size)]["floor_ms"])

    def full_ms(self, batch_size: int) -> float:
        return float(self.latency[str(batch_size)]["full_ms"])

    def predict_ms(self, batch_size: int, head_counts: Sequence[int], ffn_sizes: Sequence[int]) -> float:
        return structure_cost(
            head_counts,
            ffn_sizes,
            self.head_cost(batch_size),
            self.ffn_cost(batch_size),
            self.floor_ms(batch_size),
            self.interaction_cost(batch_size),
        )

    def predict_speedup(self, batch_size: int, head_counts: Sequence[int], ffn_sizes: Sequence[int]) -> float:
        """How many times faster than the unpruned model this table predicts the structure runs."""
        return self.full_ms(batch_size) / self.predict_ms(batch_size, head_counts, ffn_sizes)

    def head_bytes(self) -> Callable[[int], float]:
        per_head = self.size["bytes_per_head"]
        return lambda h: float(per_head * h)

    def ffn_bytes(self) -> Callable[[int], float]:
        per_neuron = self.size["bytes_per_neuron"]
        return lambda n: float(per_neuron * n)

    def predict_bytes(self, head_counts: Sequence[int], ffn_sizes: Sequence[int], floor_bytes: float) -> float:
        return floor_bytes + sum(self.head_bytes()(h) + self.ffn_bytes()(n) for h, n in zip(head_counts, ffn_sizes))

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "latency": self.latency, "size": self.size, "measured_seconds": self.measured_seconds}

    def summary(self) -> dict[str, Any]:
        """What a manifest keeps: the key, where the table is, and the per-block costs (no raw timings)."""
        latency = {b: {k: v for k, v in entry.items() if k != "timings"} for b, entry in self.latency.items()}
        return {"key": self.key, "latency": latency, "size": self.size, "cached": self.cached}


def table_key(model, batches: dict[int, dict], *, threads: int, opset: int) -> dict[str, Any]:
    """What the table depends on: machine, runtime, recipe, architecture shape and input shapes."""
    import onnxruntime

    from tinycompress.inference.machine import machine_info
    from tinycompress.models.arch import get_arch
    from tinycompress.models.heads import head_of

    spec = get_arch(model)
    config = model.config
    machine = machine_info(threads)
    return {
        "version": TABLE_VERSION,
        "cpu": machine["cpu"],
        "cores": machine["cores"],
        "vector_extensions": machine["vector_extensions"],
        "threads": threads,
        "runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
        "recipe": RECIPE,
        "opset": opset,
        "model_type": spec.model_type,
        "hidden": getattr(config, spec.hidden_field),
        "heads": spec.num_heads(config),
        "ffn": spec.ffn_size(config),
        "vocab": model.get_input_embeddings().num_embeddings,
        "num_labels": config.num_labels,
        # Only a mean head is named, so the tables measured before heads existed stay valid.
        **({"head": head_of(config)} if head_of(config) != "cls" else {}),
        "input_shapes": {str(size): list(batch["input_ids"].shape) for size, batch in sorted(batches.items())},
    }


def _cache_path(workdir: str | Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(workdir) / CACHE_DIR / f"{key['model_type']}-{digest}.json"


def _read_cached(path: Path, key: dict[str, Any]) -> CostTable | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent or damaged: measure again (and overwrite)
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    try:
        return CostTable(data["key"], data["latency"], data["size"], data.get("measured_seconds", 0.0), cached=True)
    except KeyError:
        return None


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temporaries(path.parent)
    temporary = temporary_path(path.parent, "costtable", ".json")
    try:
        temporary.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def unpruned_twin(model):
    """A randomly initialised, unpruned classifier of ``model``'s architecture (its layer count and head)."""
    from transformers import AutoModelForSequenceClassification

    from tinycompress.models.config_fields import STRUCTURE_ATTR
    from tinycompress.models.heads import apply_head_, head_of

    config = copy.deepcopy(model.config)
    if hasattr(config, STRUCTURE_ATTR):
        delattr(config, STRUCTURE_ATTR)
    twin = AutoModelForSequenceClassification.from_config(config)
    apply_head_(twin, head_of(config))
    return twin.eval()


def _variant(base, heads: int, ffn: int):
    """``base`` (unpruned) with every layer cut to its first ``heads`` heads and ``ffn`` neurons."""
    from tinycompress.models.structure import ffn_sizes, head_counts, prune_heads_, prune_neurons_

    model = copy.deepcopy(base)
    n_layers = len(head_counts(model))
    if heads < head_counts(model)[0]:
        prune_heads_(model, [list(range(heads))] * n_layers)
    if ffn < ffn_sizes(model)[0]:
        prune_neurons_(model, [list(range(ffn))] * n_layers)
    return model


def ffn_grid(ffn: int, step: int = FFN_GRID_STEP, narrowest: int = FFN_STEP) -> list[int]:
    """FFN widths measured: 0, ``narrowest``, step, 2 step, ... below ``ffn``, and ``ffn`` itself."""
    return sorted(set(range(0, ffn, step)) | {min(narrowest, ffn), ffn})


def measure_cost_table(
    model,
    batches: dict[int, dict],
    *,
    threads: int,
    opset: int,
    runs: int = TABLE_RUNS,
    warmup: int = TABLE_WARMUP,
    ffn_step: int = FFN_GRID_STEP,
) -> CostTable:
    """Build, int8-quantize and time (interleaved) the variants of ``model``'s architecture.

    ``batches``: ``{batch_size: inputs}`` from :func:`~tinycompress.inference.latency.latency_batches`.
    """
    import time

    from tinycompress.config import QuantizeSettings
    from tinycompress.inference.latency import measure_interleaved
    from tinycompress.inference.onnx_session import OnnxClassifier
    from tinycompress.models.arch import get_arch, layers
    from tinycompress.quantization.onnx import quantize_onnx_model

    start = time.perf_counter()
    key = table_key(model, batches, threads=threads, opset=opset)
    base = unpruned_twin(model)
    n_layers = len(layers(base))
    spec = get_arch(base)
    full_heads, full_ffn = spec.num_heads(base.config), spec.ffn_size(base.config)
    widths = ffn_grid(full_ffn, ffn_step)
    variants = {"full": (full_heads, full_ffn)}
    variants |= {f"heads={h}": (h, full_ffn) for h in range(full_heads)}
    variants |= {f"ffn={n}": (full_heads, n) for n in widths if n < full_ffn}
    joint_heads, joint_ffn = joint_axis(range(full_heads + 1), full_heads), joint_axis(widths, full_ffn)
    # A layer keeping neither block is removed: it costs nothing, no variant needed.
    variants |= {f"heads={h},ffn={n}": (h, n) for h in joint_heads[:-1] for n in joint_ffn[:-1] if h or n}
    settings = QuantizeSettings()
    sessions: dict[str, OnnxClassifier] = {}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="tinycompress-cost-table-") as scratch:
        for index, (name, (heads, ffn)) in enumerate(variants.items(), 1):
            log_to_stderr(f"cost table: building variant {index}/{len(variants)} ({name})")
            path = Path(scratch) / f"{name.replace('=', '-')}.onnx"
            quantize_onnx_model(_variant(base, heads, ffn), path, settings, opset=opset)
            sizes[name] = path.stat().st_size
            sessions[name] = OnnxClassifier(path, num_threads=threads)
        latency: dict[str, dict[str, Any]] = {}
        for size, batch in sorted(batches.items()):
            log_to_stderr(f"cost table: timing {len(sessions)} variants at batch {size} ({runs} interleaved rounds)")
            forwards = {name: (lambda s=session, b=batch: s.run_batch(b)) for name, session in sessions.items()}
            timings = measure_interleaved(forwards, runs=runs, warmup=warmup)
            median = {name: t.median_ms for name, t in timings.items()}
            full = median["full"]
            head_ms = [(median[f"heads={h}"] - median["heads=0"]) / n_layers for h in range(full_heads)]
            head_ms.append((full - median["heads=0"]) / n_layers)
            ffn_ms = [(median[f"ffn={n}"] - median["ffn=0"]) / n_layers for n in widths[:-1]]
            ffn_ms.append((full - median["ffn=0"]) / n_layers)
            # Index 0 is exactly 0 by construction (T(0) - T(0)); noise can only bend the rest, and a
            # block never saves time by existing (clamped at 0 before smoothing, so index 0 stays 0).
            head_ms = [round(v, 4) for v in _non_decreasing([max(0.0, v) for v in head_ms])]
            ffn_ms = [round(v, 4) for v in _non_decreasing([max(0.0, v) for v in ffn_ms])]
            floor = full - n_layers * (head_ms[-1] + ffn_ms[-1])
            # What a layer cut in both blocks costs beyond the two curves: exactly what makes the
            # prediction of each joint variant its measured time.
            interaction_ms = [
                [
                    0.0
                    if h == full_heads or n == full_ffn or not (h or n)
                    else round(
                        (median[f"heads={h},ffn={n}"] - floor) / n_layers - head_ms[h] - ffn_ms[widths.index(n)], 4
                    )
                    for n in joint_ffn
                ]
                for h in joint_heads
            ]
            latency[str(size)] = {
                "full_ms": full,
                # What the unpruned model's time leaves once every block is priced: the prediction
                # of the unpruned structure is then exactly its measured time.
                "floor_ms": floor,
                "head_ms": head_ms,
                "ffn_widths": widths,
                "ffn_ms": ffn_ms,
                "joint_heads": joint_heads,
                "joint_ffn": joint_ffn,
                "interaction_ms": interaction_ms,
                "timings": {name: t.to_dict() for name, t in timings.items()},
            }
    per_head = (sizes["full"] - sizes["heads=0"]) / (n_layers * full_heads)
    per_neuron = (sizes["full"] - sizes["ffn=0"]) / (n_layers * full_ffn)
    size = {
        "full_bytes": sizes["full"],
        "floor_bytes": sizes["full"] - n_layers * (per_head * full_heads + per_neuron * full_ffn),
        "bytes_per_head": per_head,
        "bytes_per_neuron": per_neuron,
        "embedding_row_bytes": getattr(base.config, spec.hidden_field),  # int8: one byte per value
    }
    return CostTable(key, latency, size, measured_seconds=round(time.perf_counter() - start, 1))


def load_or_measure_cost_table(
    model, batches: dict[int, dict], *, workdir: str | Path, threads: int, opset: int, **measure_kwargs
) -> CostTable:
    """The cached table for this key under ``workdir``, or a newly measured one (then cached)."""
    key = table_key(model, batches, threads=threads, opset=opset)
    path = _cache_path(workdir, key)
    cached = _read_cached(path, key)
    if cached is not None:
        log_to_stderr(f"cost table: using {path}")
        return cached
    table = measure_cost_table(model, batches, threads=threads, opset=opset, **measure_kwargs)
    _write_atomic(path, table.to_dict())
    log_to_stderr(f"cost table: measured in {table.measured_seconds:.0f} s, cached as {path}")
    return table
