#!/usr/bin/env python
"""Does `report --bench` measure the same file the same way twice? N reports of one chain, side by side.

    python benchmarks/latency_repeatability.py runs/sst2/export-v1 --data-dir ../shared/data/glue --threads 2
    python benchmarks/latency_repeatability.py --workdir runs --task sst2 --reports 5 --runs 50

A chain whose ONNX quantize checkpoint was exported holds the same ``model.onnx`` twice (the
export copies the quantized file; the manifests' sha256 agree). The report shows it once, but
``--bench`` still times the export's copy under its own name, in the same interleaved
measurement as every other row (:func:`tinycompress.report.measure.bench_rows`). This script
builds the report N times (default 5) **in this one process**, one after another, each with its
own fresh measurement (models loaded anew, warm-up, interleaved rounds), exactly as
``tinycompress report --bench`` does, and prints for each report the two medians of that one
file at batch 1 and batch 32, how far apart they are (|a - b| relative to the smaller one) and
whether that is within 10 %. No report files are written.

Not a test: nothing is asserted, the table is printed whatever it shows. Exit status 1 only
when the chain has no such pair (export the ONNX quantize checkpoint first:
``tinycompress export --task <task>``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

TOLERANCE = 0.10

KEYS = ("batch_1", "batch_32")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "target", nargs="?", help="a checkpoint folder (the chain ends there) or a task folder [default: newest chain]"
    )
    parser.add_argument("--workdir", default="runs", help="workspace [default: runs]")
    parser.add_argument("--task", help="task [default: the workspace's most recent]")
    parser.add_argument("--data-dir", help="folder of GLUE TSVs [default: the chain's]")
    parser.add_argument("--reports", type=int, default=5, help="reports to build, each measured anew [default: 5]")
    parser.add_argument("--runs", type=int, default=50, help="timed interleaved rounds per report [default: 50]")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads [default: the config's]")
    parser.add_argument(
        "--no-baselines", action="store_true", help="leave the unpruned int8 baselines out (fewer models per round)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--verbose", action="store_true", help="show the report's progress on stderr")
    args = parser.parse_args(argv)
    for name in ("reports", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def collect(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One entry per report: its number, its same-file checks (``latency.same_file``) and its rows measured."""
    from tinycompress.report.gather import build_report

    log = (lambda message: print(message, file=sys.stderr)) if args.verbose else (lambda _: None)
    found = []
    for number in range(1, args.reports + 1):
        print(f"report {number}/{args.reports} ...", file=sys.stderr)
        report = build_report(
            args.target,
            workdir=args.workdir,
            task=args.task,
            bench=True,
            bench_runs=args.runs,
            threads=args.threads,
            data_dir=args.data_dir,
            log=log,
            baselines=[] if args.no_baselines else None,
        )
        found.append(
            {
                "report": number,
                "task": report.task,
                "chain": report.chain,
                "machine": report.latency["machine"],
                "models": report.latency["models"],
                "same_file": report.latency["same_file"],
            }
        )
        if not report.latency["same_file"]:
            break  # no pair in this chain: the next reports would find none either
    return found


def table(found: list[dict[str, Any]]) -> list[str]:
    """The printed lines: one row per report and pair, then one summary line per batch size."""
    titles = ["report", "same file (first = second)"]
    for key in KEYS:
        size = key.split("_")[1]
        titles += [f"b{size} first ms (IQR)", f"b{size} second ms (IQR)", f"b{size} apart", f"b{size} ≤10 %"]
    cells = []
    for entry in found:
        for check in entry["same_file"]:
            row = [str(entry["report"]), f"{check['first']} = {check['second']}"]
            for key in KEYS:
                first, second = check[key]["first"], check[key]["second"]
                apart = check[key]["relative_difference"]
                row += [_fmt(first), _fmt(second), f"{apart:.1%}", "yes" if apart <= TOLERANCE else "NO"]
            cells.append(row)
    widths = [max(len(t), *(len(c[i]) for c in cells)) if cells else len(t) for i, t in enumerate(titles)]
    lines = ["  ".join(t.ljust(w) if i < 2 else t.rjust(w) for i, (t, w) in enumerate(zip(titles, widths)))]
    lines += [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells
    ]
    for key in KEYS:
        aparts = [check[key]["relative_difference"] for entry in found for check in entry["same_file"]]
        if aparts:
            within = sum(a <= TOLERANCE for a in aparts)
            lines.append(
                f"batch {key.split('_')[1]}: {within}/{len(aparts)} within 10 % (largest {max(aparts):.1%}, "
                f"median {sorted(aparts)[len(aparts) // 2]:.1%})"
            )
    return lines


def _fmt(timing: dict[str, Any]) -> str:
    return f"{timing['median_ms']:.2f} ({timing['q1_ms']:.2f}–{timing['q3_ms']:.2f})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tinycompress.errors import TinycompressError

    try:
        found = collect(args)
    except TinycompressError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 1
    if not any(entry["same_file"] for entry in found):
        chain = " → ".join(found[0]["chain"]) if found else "?"
        print(
            f"error: the chain {chain} holds no file twice (no ONNX quantize checkpoint exported); "
            "run `tinycompress export` on the ONNX quantize checkpoint first",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps({"tolerance": TOLERANCE, "reports": found}, indent=2, ensure_ascii=False))
        return 0
    first = found[0]
    machine = first["machine"]
    print(
        f"{first['task']}: {' → '.join(first['chain'])}; {len(found)} reports built one after another in one process, "
        f"each timing {len(first['models'])} models interleaved, median (Q1–Q3) of {args.runs} rounds; "
        f"{machine['cpu']}, threads: {machine['threads']}; apart = |first - second| / the smaller"
    )
    for line in table(found):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
