#!/usr/bin/env python
"""Does the cost table predict the speed-up of structures it never measured? Predicted against measured.

    python benchmarks/cost_table_accuracy.py --data-dir ../shared/data/glue --workdir runs --threads 2

Builds the default model's classifier (weights do not change timings: the head is left untrained),
reads this machine's cost table from ``<workdir>/.cache/cost-tables/`` (measuring it when absent,
exactly as ``tinycompress prune --speedup`` does), and cuts the model to structures the table did
not measure: uniform ones off its grids (every layer keeping the same heads and FFN width) and
random mixed ones (each layer its own heads and width, a multiple of 32, seeded). Each is
int8-quantized as ``tinycompress quantize`` does by default and timed interleaved against the
unpruned int8 model in one process, at batch 1 and 32 on the task's test texts. The table prints,
per structure and batch, the speed-up the table predicts with and without its interaction term
(blocks' costs added, as Kwon et al. 2022 and cost tables before version 3 do), the measured
speed-up (median of per-round ratios) and measured / predicted.

Not a test: nothing is asserted. Writes <out>/cost_table_accuracy.csv.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
import tempfile
from pathlib import Path

LATENCY_TEXTS = 512
# (heads, FFN width) of every layer: off the table's grids (heads 1 3 6 9, widths 32 384 768 1152).
UNIFORM = [(2, 256), (2, 992), (5, 416), (5, 1536), (8, 608), (10, 1216), (12, 416)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name or folder [default: the config's default]")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--data-dir", default=None, help="folder of GLUE TSVs [default: TINYCOMPRESS_DATA_DIR]")
    parser.add_argument("--workdir", default="runs", help="workspace holding the cost-table cache [default: runs]")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads [default: all cores]")
    parser.add_argument("--mixed", type=int, default=8, help="random mixed structures [default: 8]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mixed structures [default: 0]")
    parser.add_argument("--runs", type=int, default=40, help="interleaved rounds [default: 40]")
    parser.add_argument("--out", type=Path, default=Path("runs/sweeps/cost-table"))
    args = parser.parse_args(argv)
    for name in ("mixed", "runs"):
        if getattr(args, name) < (0 if name == "mixed" else 1):
            parser.error(f"--{name} is out of range")
    return args


def structures(n_layers: int, heads: int, ffn: int, mixed: int, seed: int) -> dict[str, tuple[list[int], list[int]]]:
    """Name -> (heads per layer, FFN width per layer): the uniform ones that fit, then ``mixed`` random ones."""
    from tinycompress.pruning.budget import FFN_STEP

    out = {f"uniform {h}h/{n}": ([h] * n_layers, [n] * n_layers) for h, n in UNIFORM if h <= heads and n <= ffn}
    rng = random.Random(seed)
    widths = list(range(0, ffn + 1, FFN_STEP))
    for i in range(mixed):
        # Layers kept mostly whole up to mostly cut, as the search's plans for 1.25-3x are.
        share = rng.uniform(0.2, 0.9)
        h = [min(heads, max(0, round(rng.gauss(share * heads, heads / 4)))) for _ in range(n_layers)]
        n = [_nearest(widths, rng.gauss(share * ffn, ffn / 4)) for _ in range(n_layers)]
        out[f"mixed {i + 1}"] = (h, n)
    return out


def _nearest(values: list[int], x: float) -> int:
    return min(values, key=lambda v: abs(v - x))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import copy

    from tinycompress.config import QuantizeSettings
    from tinycompress.config.schema import ExportSettings, ModelSettings
    from tinycompress.data.glue import load_task_data
    from tinycompress.data.tasks import get_task
    from tinycompress.inference.cost_table import load_or_measure_cost_table
    from tinycompress.inference.latency import interleaved_samples, latency_batches, paired_speedup
    from tinycompress.inference.onnx_session import OnnxClassifier
    from tinycompress.models.pretrained import load_pretrained_classifier
    from tinycompress.models.run_setup import configure_threads
    from tinycompress.models.structure import drop_empty_layers_, ffn_sizes, head_counts, prune_heads_, prune_neurons_
    from tinycompress.pruning.budget import structure_cost
    from tinycompress.quantization.onnx import quantize_onnx_model

    settings = ModelSettings()
    spec = get_task(args.task)
    model, tokenizer, _ = load_pretrained_classifier(args.model or settings.name, spec, seed=0)
    model.eval()
    data = load_task_data(spec, data_dir=args.data_dir, dev_fraction=0.1, seed=0)
    batches = latency_batches(tokenizer, data.test.texts[:LATENCY_TEXTS], settings.max_length)
    threads = configure_threads(args.threads)
    opset = ExportSettings().opset
    table = load_or_measure_cost_table(model, batches, workdir=args.workdir, threads=threads, opset=opset)
    plans = structures(len(head_counts(model)), head_counts(model)[0], ffn_sizes(model)[0], args.mixed, args.seed)

    models = {"unpruned": model}
    for name, (heads, widths) in plans.items():
        cut = copy.deepcopy(model)
        prune_heads_(cut, [list(range(h)) for h in heads], drop_empty_layers=False)
        prune_neurons_(cut, [list(range(n)) for n in widths], drop_empty_layers=False)
        drop_empty_layers_(cut)
        models[name] = cut
    rows = []
    with tempfile.TemporaryDirectory(prefix="tinycompress-cost-table-accuracy-") as scratch:
        sessions = {}
        for index, (name, net) in enumerate(models.items()):
            print(f"quantizing {index + 1}/{len(models)}: {name}", file=sys.stderr, flush=True)
            path = Path(scratch) / f"{index}.onnx"
            quantize_onnx_model(net, path, QuantizeSettings(), opset=opset)
            sessions[name] = OnnxClassifier(path, num_threads=threads)
        for size, batch in sorted(batches.items()):
            print(f"timing {len(sessions)} models at batch {size} ({args.runs} rounds)", file=sys.stderr, flush=True)
            forwards = {name: (lambda s=session, b=batch: s.run_batch(b)) for name, session in sessions.items()}
            samples = interleaved_samples(forwards, runs=args.runs)
            full = table.full_ms(size)
            for name, (heads, widths) in plans.items():
                added = full / structure_cost(
                    heads, widths, table.head_cost(size), table.ffn_cost(size), table.floor_ms(size)
                )
                predicted = full / table.predict_ms(size, heads, widths)
                measured = paired_speedup(samples["unpruned"], samples[name])
                rows.append(
                    {
                        "structure": name,
                        "heads": " ".join(map(str, heads)),
                        "ffn": " ".join(map(str, widths)),
                        "batch": size,
                        "predicted_added": round(added, 3),
                        "predicted": round(predicted, 3),
                        "measured": round(measured, 3),
                        "measured_over_added": round(measured / added, 3),
                        "measured_over_predicted": round(measured / predicted, 3),
                        "median_ms": round(statistics.median(samples[name]), 2),
                        "unpruned_ms": round(statistics.median(samples["unpruned"]), 2),
                    }
                )
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "cost_table_accuracy.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _print(rows, table)
    return 0


def _print(rows: list[dict], table) -> None:
    version = table.key.get("version")
    print(f"cost table v{version} ({'cached' if table.cached else 'measured now'}), threads {table.key.get('threads')}")
    header = f"{'structure':14s} {'heads':>18s} {'ffn':>30s} {'b':>3s} {'added':>6s} {'table':>6s} {'meas':>6s} {'m/add':>6s} {'m/tab':>6s}"
    print(header)
    for r in rows:
        print(
            f"{r['structure']:14s} {r['heads']:>18s} {r['ffn']:>30s} {r['batch']:>3d} {r['predicted_added']:6.3f} "
            f"{r['predicted']:6.3f} {r['measured']:6.3f} {r['measured_over_added']:6.3f} {r['measured_over_predicted']:6.3f}"
        )
    for size in sorted({r["batch"] for r in rows}):
        of = [r for r in rows if r["batch"] == size]
        worst_added = max(abs(r["measured_over_added"] - 1) for r in of)
        worst = max(abs(r["measured_over_predicted"] - 1) for r in of)
        print(f"batch {size}: largest miss, blocks added {worst_added:.1%}; with the interaction {worst:.1%}")


if __name__ == "__main__":
    sys.exit(main())
