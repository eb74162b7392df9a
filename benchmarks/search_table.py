#!/usr/bin/env python
"""The trials of a `finetune --search` study as a Markdown table, best dev metric first.

    python benchmarks/search_table.py runs/sst2/searches/finetune-<digest>.jsonl
    python benchmarks/search_table.py runs/sst2/finetune-v3/search_journal.jsonl

Reads Optuna's journal file (a study still running, interrupted or finished; the checkpoint
folder a search ends with holds a copy). Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from tinycompress.training.search import Recipe, trial_rows


def main(argv: list[str] | None = None) -> int:
    import optuna

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("journal", type=Path)
    parser.add_argument("--metric", default="accuracy", help="the task's primary metric (default: accuracy)")
    args = parser.parse_args(argv)
    if not args.journal.is_file():
        print(f"no such journal: {args.journal}", file=sys.stderr)
        return 1
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(args.journal)))
    score = f"dev/{args.metric}"
    recipe = list(Recipe.__dataclass_fields__)
    for summary in optuna.get_all_study_summaries(storage):
        rows = trial_rows(optuna.load_study(study_name=summary.study_name, storage=storage), args.metric)
        rows.sort(key=lambda r: (r["state"] != "complete", -(r[score] if r[score] is not None else -math.inf)))
        print(f"study {summary.study_name}: {len(rows)} trials\n")
        columns = ["trial", "state", score, "epochs_run", "seconds", *recipe, "note"]
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for row in rows:
            cells = []
            for column in columns:
                value = row[column]
                if value is None or value == "":
                    cells.append("")
                elif column == score:
                    cells.append(f"{value:.4f}")
                elif column == "seconds":
                    cells.append(f"{value:,.0f}")
                elif isinstance(value, float):
                    cells.append(f"{value:.3g}")
                else:
                    cells.append(str(value))
            print("| " + " | ".join(cells) + " |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
