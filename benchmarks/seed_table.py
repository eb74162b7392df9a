#!/usr/bin/env python
"""Several `tinycompress run` reports of one task side by side: one column per seed, mean ± std.

    python benchmarks/seed_table.py runs/sst2/report-seed42 runs/sst2/report-seed43 runs/sst2/report-seed44

Each argument is a report folder (or its report.json) written by ``tinycompress run`` /
``tinycompress report``. Rows are matched by their label (fine-tuned, pruned, pruned + quantized,
int8 only, ...); the seed of each column is the one recorded in the chain's fine-tune manifest.
Prints a Markdown table of the task's primary test metric -- per seed, mean ± sample standard
deviation (n - 1) -- and the mean size, then the wall seconds per stage of each run. Not a test:
nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

# Rows whose figures are the fine-tuned model's or repeat another row's file.
SKIPPED_KEYS = {"original", "export"}


def read_report(path: Path) -> dict[str, Any]:
    file = path / "report.json" if path.is_dir() else path
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        sys.exit(f"error: cannot read {file}: {exc}")


def chain_seed(report: dict[str, Any]) -> int | None:
    """The seed in the manifest of the chain's first checkpoint (the fine-tune)."""
    manifest = Path(report["workspace"]) / report["task"] / report["chain"][0] / "tinycompress.yaml"
    try:
        return yaml.safe_load(manifest.read_text(encoding="utf-8")).get("seed")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}" if values else "—"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def seed_table(reports: list[dict[str, Any]]) -> str:
    metric = reports[0]["primary_metric"]
    seeds = [chain_seed(r) for r in reports]
    labels: list[str] = []
    for report in reports:
        labels += [
            row["label"]
            for row in report["rows"]
            if row["status"] == "ok" and row["key"] not in SKIPPED_KEYS and row["label"] not in labels
        ]
    headers = ["version", *(f"seed {s}" for s in seeds), f"mean ± std ({len(reports)} runs)", "size (MB, mean)"]
    lines = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    for label in labels:
        found = [
            next((row for row in r["rows"] if row["label"] == label and row["status"] == "ok"), None) for r in reports
        ]
        scores = [row["metrics"].get(metric) if row else None for row in found]
        sizes = [row["size_mb"] for row in found if row and row.get("size_mb") is not None]
        cells = [f"{s:.4f}" if s is not None else "—" for s in scores]
        known = [s for s in scores if s is not None]
        size = f"{statistics.mean(sizes):.1f}" if sizes else "—"
        lines.append("| " + " | ".join([label, *cells, mean_std(known), size]) + " |")
    lines += [
        "",
        f"test {metric}; wall seconds per stage:",
        "",
        "| seed | " + " | ".join(reports[0]["stage_seconds"]) + " |",
        "|---|" + "---:|" * len(reports[0]["stage_seconds"]),
    ]
    for seed, report in zip(seeds, reports):
        cells = ["—" if v is None else f"{v:,.0f}" for v in report["stage_seconds"].values()]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path, help="report folders or report.json files of one task")
    args = parser.parse_args(argv)
    reports = [read_report(path) for path in args.reports]
    if len({r["task"] for r in reports}) != 1:
        sys.exit("error: the reports are of different tasks; pass reports of one task")
    print(seed_table(reports))


if __name__ == "__main__":
    main()
