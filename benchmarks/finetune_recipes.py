#!/usr/bin/env python
"""Fine-tune checkpoints grouped by recipe: test metric per seed, mean ± std, training time.

    python benchmarks/finetune_recipes.py runs/sst2/finetune-v1 runs/sst2/finetune-v2 ...
    python benchmarks/finetune_recipes.py runs/*/sst2/finetune-v*        # several workdirs

Each argument is a ``finetune-v<N>`` folder (verified as any checkpoint is read). Folders whose
recipe (head, learning rate, epochs, batch size, warm-up, weight decay, classifier dropout,
training rows) is the same form one row; its columns are the seeds. Prints a Markdown table of
the task's primary test metric -- per seed, mean ± sample standard deviation (n - 1) -- with the
best-epoch dev metric and the training seconds. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from tinycompress.checkpoint.store import read_checkpoint
from tinycompress.data.tasks import get_task
from tinycompress.errors import TinycompressError

RECIPE_KEYS = ("learning_rate", "epochs", "batch_size", "warmup_ratio", "weight_decay", "classifier_dropout")


def recipe_of(manifest: dict) -> tuple:
    config = manifest["config"]
    head = manifest["details"].get("head") or config["model"].get("head", "cls")
    return (head, *(config["finetune"].get(k) for k in RECIPE_KEYS), config["data"].get("max_train_samples"))


def _recipe_text(recipe: tuple) -> str:
    head, *values, rows = recipe
    shown = ("model's" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in values)
    parts = [f"head {head}"] + [f"{k} {v}" for k, v in zip(RECIPE_KEYS, shown)]
    return ", ".join(parts + ([f"{rows} train rows"] if rows else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args(argv)
    groups: dict[tuple, dict[int, dict]] = defaultdict(dict)
    task = None
    for folder in args.folders:
        try:
            checkpoint = read_checkpoint(folder)
        except TinycompressError as exc:
            print(f"skipped {folder}: {exc}", file=sys.stderr)
            continue
        if checkpoint.stage != "finetune":
            print(f"skipped {folder}: a {checkpoint.stage} checkpoint", file=sys.stderr)
            continue
        task = task or checkpoint.task
        groups[recipe_of(checkpoint.manifest)][checkpoint.manifest["seed"]] = checkpoint.manifest["metrics"]
    if not groups:
        print("no fine-tune checkpoints", file=sys.stderr)
        return 1
    metric = get_task(task).primary_metric
    seeds = sorted({seed for by_seed in groups.values() for seed in by_seed})
    print(f"| recipe | {' | '.join(f'seed {s}' for s in seeds)} | mean ± std | dev (mean) | train s (mean) |")
    print("|---|" + "---:|" * (len(seeds) + 3))
    for recipe, by_seed in sorted(groups.items(), key=lambda item: str(item[0])):
        tests = [m[f"test/{metric}"] for m in by_seed.values()]
        spread = f" ± {statistics.stdev(tests):.4f}" if len(tests) > 1 else ""
        cells = [f"{by_seed[s][f'test/{metric}']:.4f}" if s in by_seed else "" for s in seeds]
        dev = statistics.mean(m[f"dev/{metric}"] for m in by_seed.values())
        seconds = statistics.mean(m["train_seconds"] for m in by_seed.values())
        print(
            f"| {_recipe_text(recipe)} | {' | '.join(cells)} | **{statistics.mean(tests):.4f}**{spread} "
            f"({len(tests)}) | {dev:.4f} | {seconds:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
