#!/usr/bin/env python
"""Test accuracy against the fraction of attention heads removed, for each importance criterion.

    python benchmarks/prune_sweep.py --checkpoint runs/sst2/finetune-v1 \\
        --data-dir ../shared/data/glue --out runs/sweeps/prune

Method:
  * one-shot, heads only: each criterion scores the *unpruned* model once (on
    --importance-samples seeded-random training rows), then every ratio prunes a fresh copy by
    those scores and is measured on the test split (GLUE validation) with no recovery. Iterative
    pruning (re-scoring between steps) is the prune stage's --steps, not measured here;
  * the criterion with the best mean test score over the ratios is then re-run at every ratio
    with 1 epoch of recovery (distillation from the unpruned model) on a seeded subset of
    --recover-train-samples training rows, so the sweep fits a CPU budget. Full recovery (all
    training rows) is what `tinycompress prune` does, and scores higher.

Writes <out>/prune_sweep.csv and <out>/prune_sweep.png and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
import time
from pathlib import Path

CRITERIA = ("taylor", "fisher", "magnitude", "random")
DEFAULT_RATIOS = "0.1,0.2,0.3,0.4,0.5,0.6,0.7"


# ------------------------------------------------------------------------------ arguments


def _ratios(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios must be comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every ratio must be in [0, 1), got {text!r}")
    return sorted(set(values))


def _criteria(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in CRITERIA]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"criteria must be among {', '.join(CRITERIA)}, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a finetune checkpoint folder, e.g. runs/sst2/finetune-v1")
    parser.add_argument("--data-dir", help="folder of GLUE TSVs [default: the checkpoint's]")
    parser.add_argument(
        "--ratios", type=_ratios, default=_ratios(DEFAULT_RATIOS), help=f"head ratios [default: {DEFAULT_RATIOS}]"
    )
    parser.add_argument("--criteria", type=_criteria, default=list(CRITERIA), help=f"[default: {','.join(CRITERIA)}]")
    parser.add_argument("--importance-samples", type=int, default=1024, help="training rows used to score importance")
    parser.add_argument(
        "--recover-train-samples",
        type=int,
        default=2000,
        help="training rows for the 1-epoch recovery of the best criterion; 0 skips recovery",
    )
    parser.add_argument("--max-test-samples", type=int, help="evaluate on only this many test rows")
    parser.add_argument("--threads", type=int, help="torch threads [default: the checkpoint's setting]")
    parser.add_argument("--seed", type=int, help="[default: the checkpoint's seed]")
    parser.add_argument("--out", type=Path, default=Path("runs/sweeps/prune"), help="output folder")
    args = parser.parse_args(argv)
    for name in ("importance_samples", "max_test_samples", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.recover_train_samples < 0:
        parser.error("--recover-train-samples must be >= 0")
    return args


# ------------------------------------------------------------------------------ the sweep


class Sweep:
    """The unpruned model, its tokenized splits and the settings every measurement shares."""

    def __init__(self, args: argparse.Namespace):
        from tinycompress.checkpoint.hf import load_hf_model
        from tinycompress.checkpoint.store import read_checkpoint
        from tinycompress.config import load_config
        from tinycompress.data.batching import encode, padding_id
        from tinycompress.data.glue import load_config_data
        from tinycompress.models.run_setup import prepare
        from tinycompress.stages.prune_job import importance_batches

        parent = read_checkpoint(args.checkpoint)
        overrides = {
            "data.data_dir": args.data_dir,
            "data.max_test_samples": args.max_test_samples,
            "threads": args.threads,
            "seed": args.seed,
            "prune.recover_epochs": 1,
        }
        self.config = load_config(None, overrides, base=parent.manifest["config"])
        self.spec, self.device, self.threads = prepare(self.config)
        self.model, self.tokenizer = load_hf_model(parent)
        self.model.to(self.device)
        data = load_config_data(self.config, self.spec)
        max_length = self.config.model.max_length
        self.train, self.dev, self.test = (
            encode(self.tokenizer, s, max_length) for s in (data.train, data.dev, data.test)
        )
        self.pad_id = padding_id(self.tokenizer)
        self.batches = importance_batches(
            self.train,
            args.importance_samples,
            batch_size=self.config.finetune.batch_size,
            pad_id=self.pad_id,
            regression=self.spec.is_regression,
            seed=self.config.seed,
        )
        self.checkpoint = parent

    def measure(self, model) -> dict[str, float]:
        from tinycompress.training.evaluation import evaluate_split

        return evaluate_split(model, self.test, self.spec, self.config, pad_id=self.pad_id, device=self.device)

    def pruned_copy(self, head_scores, ratio: float):
        """A copy of the unpruned model with the lowest-scored ``ratio`` of heads removed."""
        from tinycompress.models.structure import prune_heads_
        from tinycompress.pruning.selection import select_heads

        model = copy.deepcopy(self.model)
        prune_heads_(model, select_heads(head_scores, ratio, self.config.prune.min_heads_per_layer))
        return model

    def row(
        self, model, criterion: str, ratio: float, *, recovered: bool, recovery_rows: int = 0, seconds: float = 0.0
    ) -> dict:
        from tinycompress.models.pretrained import count_parameters
        from tinycompress.models.structure import head_counts
        from tinycompress.pruning.flops import estimate_flops
        from tinycompress.stages.prune import FLOPS_SEQ_LEN

        start = time.perf_counter()
        metrics = self.measure(model)
        return {
            "criterion": criterion,
            "head_ratio": ratio,
            "recovered": recovered,
            "recovery_train_rows": recovery_rows,
            "heads": sum(head_counts(model)),
            **{f"test_{k}": round(v, 4) for k, v in metrics.items()},
            "parameters": count_parameters(model),
            f"flops_seq{FLOPS_SEQ_LEN}": estimate_flops(model, FLOPS_SEQ_LEN),
            "seconds": round(seconds + time.perf_counter() - start, 1),
        }


def sweep_criterion(sweep: Sweep, criterion: str, ratios: list[float]) -> tuple[list[dict], object]:
    """Rows for one criterion without recovery, and its scores (reused for recovery)."""
    from tinycompress.pruning.importance import compute_importance

    start = time.perf_counter()
    importance = compute_importance(sweep.model, sweep.batches(), criterion, seed=sweep.config.seed)
    scoring = time.perf_counter() - start
    rows = []
    for ratio in ratios:
        try:
            model = sweep.pruned_copy(importance.head_scores, ratio)
        except ValueError as exc:  # a ratio the per-layer minimum makes impossible
            print(f"  skip {criterion} {ratio}: {exc}", file=sys.stderr)
            continue
        # The scoring time is shared by all ratios; it is charged to the first one.
        rows.append(sweep.row(model, criterion, ratio, recovered=False, seconds=scoring if not rows else 0.0))
        _progress(rows[-1], sweep.spec.primary_metric)
    return rows, importance


def recovered_rows(sweep: Sweep, criterion: str, importance, ratios: list[float], train_rows: int) -> list[dict]:
    """Rows for ``criterion`` after 1 epoch of distillation on ``train_rows`` training rows."""
    from tinycompress.data.batching import subset_rows
    from tinycompress.stages.prune import recover

    seed = sweep.config.seed
    train = subset_rows(sweep.train, train_rows, seed)
    # Dev only picks the best epoch (there is one); a quarter of the training rows is plenty.
    dev = subset_rows(sweep.dev, max(train_rows // 4, 64), seed)
    rows = []
    for ratio in ratios:
        try:
            model = sweep.pruned_copy(importance.head_scores, ratio)
        except ValueError:
            continue
        start = time.perf_counter()
        recover(model, sweep.model, train, dev, sweep.spec, sweep.config, pad_id=sweep.pad_id, device=sweep.device)
        rows.append(
            sweep.row(
                model, criterion, ratio, recovered=True, recovery_rows=len(train), seconds=time.perf_counter() - start
            )
        )
        _progress(rows[-1], sweep.spec.primary_metric)
    return rows


def best_criterion(rows: list[dict], metric: str) -> str:
    """The criterion with the highest mean test score over the swept ratios."""
    by_criterion: dict[str, list[float]] = {}
    for row in rows:
        by_criterion.setdefault(row["criterion"], []).append(row[f"test_{metric}"])
    return max(by_criterion, key=lambda c: sum(by_criterion[c]) / len(by_criterion[c]))


# ------------------------------------------------------------------------------ output


def _progress(row: dict, metric: str) -> None:
    tag = " + recovery" if row["recovered"] else ""
    print(
        f"  {row['criterion']:<9} ratio {row['head_ratio']:.2f}{tag}: test {metric} {row[f'test_{metric}']:.4f} ({row['seconds']}s)",
        file=sys.stderr,
        flush=True,
    )


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def print_table(rows: list[dict], metric: str, notes: list[str]) -> None:
    """A compact table (the CSV has every column): fits an 80-column terminal."""
    from rich.console import Console
    from rich.table import Table

    flops_key = next(k for k in rows[0] if k.startswith("flops_seq"))
    table = Table(
        title=f"Head pruning sweep: test {metric} (GLUE validation); GFLOPs at {flops_key[9:]} tokens; recovery = 1 epoch"
    )
    for column in ("criterion", "ratio", "recovery", "heads", metric, "params", "GFLOPs"):
        table.add_column(column, justify="left" if column in ("criterion", "recovery") else "right", no_wrap=True)
    for row in rows:
        recovery = f"{row['recovery_train_rows']} rows" if row["recovered"] else "-"
        table.add_row(
            row["criterion"],
            f"{row['head_ratio']:.2f}",
            recovery,
            str(row["heads"]),
            f"{row[f'test_{metric}']:.4f}",
            f"{row['parameters']:,}",
            f"{row[flops_key] / 1e9:.3f}",
        )
    console = Console()
    console.print(table)
    for note in notes:
        console.print(f"note: {note}", soft_wrap=True)


def plot(rows: list[dict], metric: str, path: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers / CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    baseline = next(r for r in rows if r["criterion"] == "unpruned")[f"test_{metric}"]
    ax.axhline(baseline, color="grey", linestyle=":", label="unpruned")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    criteria = list(dict.fromkeys(r["criterion"] for r in rows if r["criterion"] != "unpruned"))
    for color, criterion in zip(colors, criteria):  # one colour per criterion, dashed once recovered
        for recovered, style in ((False, "-o"), (True, "--s")):
            points = [
                (r["head_ratio"], r[f"test_{metric}"])
                for r in rows
                if r["criterion"] == criterion and r["recovered"] == recovered
            ]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, color=color, label=f"{criterion} + 1 epoch recovery" if recovered else criterion)
    ax.set_xlabel("fraction of attention heads removed")
    ax.set_ylabel(f"test {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, caption, fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    from tinycompress.errors import TinycompressError

    args = parse_args(argv)
    try:
        sweep = Sweep(args)
    except TinycompressError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 1
    metric = sweep.spec.primary_metric
    print(
        f"sweeping {sweep.checkpoint.path} on {len(sweep.test)} test rows, {sweep.threads} threads, {sweep.device}",
        file=sys.stderr,
    )
    rows = [sweep.row(sweep.model, "unpruned", 0.0, recovered=False)]
    scores = {}
    for criterion in args.criteria:
        criterion_rows, scores[criterion] = sweep_criterion(sweep, criterion, args.ratios)
        rows += criterion_rows
    best = best_criterion([r for r in rows if r["criterion"] != "unpruned"], metric)
    notes = [
        f"one-shot head pruning: each criterion scored the unpruned model once on {min(args.importance_samples, len(sweep.train))} "
        "training rows, then each ratio pruned a fresh copy (iterative pruning is `tinycompress prune --steps`)",
        f"best criterion without recovery (mean test {metric} over ratios): {best}",
    ]
    if args.recover_train_samples:
        rows += recovered_rows(sweep, best, scores[best], args.ratios, args.recover_train_samples)
        notes.append(
            f"recovery: 1 epoch of distillation from the unpruned model on a subset of "
            f"{min(args.recover_train_samples, len(sweep.train))} of {len(sweep.train)} training rows (to fit a CPU budget); "
            "the prune stage recovers on all of them"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "prune_sweep.csv")
    plot(rows, metric, args.out / "prune_sweep.png", "\n".join(notes[:1] + notes[2:]))
    print_table(rows, metric, notes)
    print(f"wrote {args.out / 'prune_sweep.csv'} and {args.out / 'prune_sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
