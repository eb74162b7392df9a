#!/usr/bin/env python
"""Accuracy against measured speed-up: target-driven pruning against uniform ratios.

    python benchmarks/speedup_sweep.py --checkpoint runs/sst2/finetune-v1 \\
        --data-dir ../shared/data/glue --out runs/sst2/sweeps/speedup

For every target speed-up (batch 32, ONNX Runtime int8 over the unpruned int8 model) this runs the
prune stage's own code (:func:`tinycompress.stages.prune.run_prune`, nothing written) twice:

* **searched**: ``prune --speedup T`` -- the structure chosen on this machine's cost table;
* **uniform**: ``prune --ratio r --ffn-ratio r`` with the ``r`` whose uniform structure (every layer
  keeping the same share of heads and neurons) the same cost table predicts to run T times faster;

both with the same scoring, least-squares rescaling and distillation settings. Each result's int8
model is timed interleaved against the unpruned int8 model (batch 1 and 32). Columns: predicted and
measured speed-ups, int8 size, test accuracy right after pruning, after the least-squares
rescaling (retraining-free), and after distillation.

``--max-train-samples`` limits the training rows (importance, rescaling, distillation and the dev
split carved from them) to fit a CPU budget; the prune stage itself uses all rows.

Writes <out>/speedup_sweep.csv and <out>/speedup_sweep.png and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

DEFAULT_TARGETS = "1.25,1.5,2,2.5,3"


def _targets(text: str) -> list[float]:
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--targets must be comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"every target must be > 1, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a finetune checkpoint folder, e.g. runs/sst2/finetune-v1")
    parser.add_argument("--data-dir", help="folder of GLUE TSVs [default: the checkpoint's]")
    parser.add_argument("--targets", type=_targets, default=_targets(DEFAULT_TARGETS))
    parser.add_argument("--criterion", default=None, help="importance criterion [default: the config's]")
    parser.add_argument("--recover-epochs", type=int, default=1, help="distillation epochs (0: none) [default: 1]")
    parser.add_argument("--distill-layer-weight", type=float, default=None)
    parser.add_argument("--max-train-samples", type=int, default=None, help="limit the training rows")
    parser.add_argument("--no-uniform", action="store_true", help="skip the uniform-ratio runs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/sweeps/speedup"))
    parser.add_argument("--plot-only", action="store_true", help="redraw <out>/speedup_sweep.png from its CSV")
    return parser.parse_args(argv)


def uniform_ratio(table, target: float, n_layers: int, heads: int, ffn: int, batch: int = 32) -> float:
    """The share r of every layer's heads and neurons whose removal the cost table predicts gives ``target``."""
    low, high = 0.0, 0.999
    for _ in range(40):
        r = (low + high) / 2
        kept_heads, kept_ffn = round(heads * (1 - r)), round(ffn * (1 - r))
        speedup = table.predict_speedup(batch, [kept_heads] * n_layers, [kept_ffn] * n_layers)
        low, high = (r, high) if speedup < target else (low, r)
    return round(high, 4)


def _row(kind: str, target: float, result, seconds: float) -> dict:
    metrics, details = result.metrics, result.details
    measured = details["target"]["measured"] if details.get("target") else details["uniform_measured"]
    key = next(k for k in metrics if k.startswith("test/"))
    metric = key.split("/", 1)[1]
    predicted = details["target"]["predicted_speedup"] if details.get("target") else details["uniform_predicted"]
    return {
        "kind": kind,
        "target": target,
        "ratio": details.get("ratio"),
        "predicted_speedup_b32": predicted.get("32"),
        "measured_speedup_b32": measured["batch_32"]["speedup"],
        "measured_speedup_b1": measured["batch_1"]["speedup"],
        "b32_ms": measured["batch_32"]["pruned"]["median_ms"],
        "b32_iqr_ms": f"{measured['batch_32']['pruned']['q1_ms']}-{measured['batch_32']['pruned']['q3_ms']}",
        "unpruned_b32_ms": measured["batch_32"]["unpruned"]["median_ms"],
        "int8_mb": round(measured["size_bytes"]["pruned"] / 1e6, 2),
        "heads": metrics["heads"],
        "ffn_neurons": metrics["ffn_neurons"],
        "layers": len(details["heads_kept"]),
        f"parent_{metric}": metrics[f"parent/test/{metric}"],
        f"pruned_{metric}": metrics[f"pruned_no_recovery/test/{metric}"],
        f"rescaled_{metric}": metrics.get(f"mask_tuned/test/{metric}"),
        f"final_{metric}": metrics[f"test/{metric}"],
        f"final_int8_{metric}": measured["pruned_int8_test"][metric],
        f"unpruned_int8_{metric}": measured["unpruned_int8_test"][metric],
        "search_seconds": metrics.get("search_seconds"),
        "seconds": round(seconds, 1),
    }


def _read(path: Path) -> list[dict]:
    def value(text: str):
        try:
            return float(text)
        except ValueError:
            return text or None

    with open(path, newline="") as stream:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(stream)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        rows = _read(args.out / "speedup_sweep.csv")
        _print(rows)
        _plot(rows, args.out / "speedup_sweep.png")
        return 0
    from tinycompress.checkpoint.store import read_checkpoint
    from tinycompress.checkpoint.workspace import parent_base
    from tinycompress.config import load_config
    from tinycompress.inference.cost_table import load_or_measure_cost_table
    from tinycompress.stages import prune as prune_stage
    from tinycompress.stages import prune_job, prune_target

    if not args.checkpoint:
        print("speedup_sweep: --checkpoint is required (a finetune checkpoint folder)", file=sys.stderr)
        return 2
    parent = read_checkpoint(args.checkpoint)
    overrides = {
        "data.data_dir": args.data_dir,
        "data.max_train_samples": args.max_train_samples,
        "prune.criterion": args.criterion,
        "prune.recover_epochs": args.recover_epochs,
        "prune.distill_layer_weight": args.distill_layer_weight,
        "threads": args.threads,
    }
    base = load_config(None, overrides, base=parent_base(parent, "prune"))
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for target in args.targets:
        start = time.perf_counter()
        # The parent's config may carry ratios (they would win over the target): clear them.
        searched = {"speedup": target, "ratio": None, "ffn_ratio": None}
        config = base.model_copy(update={"prune": base.prune.model_copy(update=searched)})
        result = prune_stage.run_prune(config, parent)
        rows.append(_row("searched", target, result, time.perf_counter() - start))
        print(rows[-1], file=sys.stderr, flush=True)
        if args.no_uniform:
            continue
        start = time.perf_counter()
        job = prune_job.load_job(config, parent, ratios=False)  # the inputs, threads and teacher
        table = load_or_measure_cost_table(
            job.teacher,
            prune_target.latency_inputs(job.tokenizer, job, config),
            workdir=config.workdir,
            threads=job.threads,
            opset=config.export.opset,
        )
        spec_heads = len(result.details["heads_before"][0])
        r = uniform_ratio(
            table, target, len(result.details["heads_before"]), spec_heads, result.details["neurons_before"][0]
        )
        update = {"speedup": None, "ratio": r, "ffn_ratio": r}
        uniform_config = base.model_copy(update={"prune": base.prune.model_copy(update=update)})
        uniform = prune_stage.run_prune(uniform_config, parent)
        uniform.details["uniform_measured"] = prune_target.measure_speedup(
            uniform.model, uniform.tokenizer, job.teacher, job.tokenizer, job, uniform_config
        )
        uniform.details["uniform_predicted"] = {
            str(b): round(
                table.full_ms(b)
                / table.predict_ms(b, [len(h) for h in uniform.details["heads_kept"]], uniform.details["neurons_kept"]),
                3,
            )
            for b in (1, 32)
        }
        rows.append(_row("uniform", target, uniform, time.perf_counter() - start))
        print(rows[-1], file=sys.stderr, flush=True)
        _write(rows, args.out)
    _write(rows, args.out)
    _print(rows)
    _plot(rows, args.out / "speedup_sweep.png")
    return 0


def _write(rows: list[dict], out: Path) -> None:
    if not rows:
        return
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "speedup_sweep.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _print(rows: list[dict]) -> None:
    metric_keys = [k for k in rows[0] if k.startswith(("pruned_", "rescaled_", "final_", "parent_", "unpruned_int8"))]
    columns = ["kind", "target", "predicted_speedup_b32", "measured_speedup_b32", "measured_speedup_b1", "int8_mb"]
    columns += ["heads", "ffn_neurons", "layers", *metric_keys]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in columns) + " |")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next(k for k in rows[0] if k.startswith("final_")).split("_", 1)[1]
    distilled = any(r[f"final_{metric}"] != r.get(f"rescaled_{metric}") for r in rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker in (("searched", "o"), ("uniform", "s")):
        points = sorted((r["measured_speedup_b32"], r[f"final_{metric}"]) for r in rows if r["kind"] == kind)
        if points and distilled:
            ax.plot(*zip(*points), marker=marker, label=f"{kind} (after distillation)")
        free = sorted(
            (r["measured_speedup_b32"], r[f"rescaled_{metric}"])
            for r in rows
            if r["kind"] == kind and r.get(f"rescaled_{metric}") is not None
        )
        if free:
            ax.plot(*zip(*free), marker=marker, linestyle="--", alpha=0.6, label=f"{kind} (retraining-free)")
    for kind, marker in (("searched", "o"), ("uniform", "s")):
        points = sorted((r["measured_speedup_b32"], r[f"final_int8_{metric}"]) for r in rows if r["kind"] == kind)
        if points:
            ax.plot(*zip(*points), marker=marker, linestyle=":", label=f"{kind} (final model, int8)")
    ax.scatter([1.0], [rows[0][f"unpruned_int8_{metric}"]], color="black", zorder=5, label="unpruned int8 (1.0x)")
    ax.scatter([1.0], [rows[0][f"parent_{metric}"]], color="gray", zorder=5, label="unpruned fp32")
    ax.set_xlabel("measured speed-up over unpruned ONNX Runtime int8 (batch 32)")
    ax.set_ylabel(f"test {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
