"""Showing and writing a :class:`~tinycompress.report.rows.Report`: the terminal table, report.md,
report.csv, report.json and the PNG plots.

    tinycompress report --task sst2                 # prints the table, writes runs/sst2/report/

:mod:`tinycompress.report` gathers the rows from the manifests (and measures latency with
``--bench``); this module only formats what it gathered. :func:`write_report` replaces the
report folder whole, atomically.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

from tinycompress.checkpoint.format import task_dir
from tinycompress.checkpoint.temporaries import check_writable, remove_orphaned_temporaries, temporary_path
from tinycompress.errors import TinycompressError
from tinycompress.report.plots import plot_size, plot_sweep
from tinycompress.report.rows import BATCH_KEYS, TEST_SPLIT_NOTE, Report, Row

REPORT_DIR_NAME = "report"

PLOT_SIZE = "accuracy_vs_size.png"

PLOT_SWEEP = "prune_sweep.png"

REPORT_FILES = ("report.md", "report.json", "report.csv", PLOT_SIZE)

MISSING = "—"


def _fmt_size(row: Row) -> str:
    if row.size_mb is None:
        return MISSING
    return (
        f"{row.size_mb:.1f}" if row.size_mb >= 10 else f"{row.size_mb:.3f}" if row.size_mb < 1 else f"{row.size_mb:.2f}"
    )


def _fmt_metric(value) -> str:
    return MISSING if value is None else f"{value:.4f}"


def _fmt_params(value) -> str:
    if value is None:
        return MISSING
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value:,}"


def _fmt_count(kept, total) -> str:
    return MISSING if kept is None else f"{kept}/{total}" if total is not None else str(kept)


def _fmt_ms(value) -> str:
    return MISSING if value is None else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _fmt_ratio(value) -> str:
    return MISSING if value is None else f"{value:.2f}×"


def fmt_latency(row: Row, key: str) -> str:
    """``1.90 (1.85–2.01)``: the median with its interquartile range; the median alone when no
    spread is known (a manifest written before the protocol recorded one)."""
    median, spread = row.latency_ms.get(key), row.latency_spread.get(key)
    if median is None or not spread:
        return _fmt_ms(median)
    return f"{_fmt_ms(median)} ({_fmt_ms(spread['q1_ms'])}–{_fmt_ms(spread['q3_ms'])})"


def fmt_speedup(row: Row, key: str) -> str:
    """``1.42×``; ``≈1.02×`` where the row's and the fine-tuned latency's IQRs overlap."""
    value = row.speedup.get(key)
    if value is None:
        return MISSING
    return ("≈" if row.speedup_differs.get(key) is False else "") + _fmt_ratio(value)


TABLE_COLUMNS = (
    "version",
    "checkpoint",
    "runtime",
    "size (MB)",
    "{metrics}",
    "params",
    "heads",
    "FFN neurons",
    "b1 ms (IQR)",
    "b32 ms (IQR)",
    "compression",
    "speed-up b1",
    "speed-up b32",
)


def table_cells(report: Report) -> tuple[list[str], list[list[str]]]:
    """(headers, rows of cells) shared by the terminal table and report.md."""
    headers = []
    for column in TABLE_COLUMNS:
        headers += report.metrics if column == "{metrics}" else [column]
    body = []
    for row in report.rows:
        if row.status != "ok":
            cells = [row.label, f"not run: `{row.command}`" if row.command else "not run"] + [MISSING] * (
                len(headers) - 2
            )
        else:
            where = row.checkpoint or (row.metrics_from or "").split(":")[0] + " (original/*)"
            if row.path is None and row.checkpoint:  # made now from that checkpoint (the ONNX Runtime fp32 row)
                where += " (exported now)"
            cells = [row.label, where, row.runtime or MISSING, _fmt_size(row)]
            cells += [_fmt_metric(row.metrics.get(m)) for m in report.metrics]
            cells += [
                _fmt_params(row.parameters),
                _fmt_count(row.heads_kept, row.heads_total),
                _fmt_count(row.ffn_kept, row.ffn_total),
                fmt_latency(row, "batch_1"),
                fmt_latency(row, "batch_32"),
                _fmt_ratio(row.compression),
                fmt_speedup(row, "batch_1"),
                fmt_speedup(row, "batch_32"),
            ]
        body.append(cells)
    return headers, body


def render_table(report: Report):
    """A Rich table of the report (footnotes are printed separately, see :func:`print_report`)."""
    from rich.table import Table

    headers, body = table_cells(report)
    table = Table(title=f"tinycompress report: {report.task} — test {report.primary_metric} on GLUE validation")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < 3 else "right", no_wrap=i != 1)
    for cells in body:
        table.add_row(*[c.replace("`", "") for c in cells])
    return table


def print_report(report: Report, console=None) -> None:
    """The table and its footnotes on ``console`` (default: stdout, wide when not a terminal)."""
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:
            # Piped or captured output has no width; do not squeeze 14 columns into 80.
            console = Console(width=200)
    console.print(render_table(report))
    for note in report.footnotes:
        console.print(f"• {note}", soft_wrap=True, highlight=False)


def _tuning_markdown(report: Report) -> list[str]:
    """A table of every candidate ``quantize --tolerance`` tried, per tuned checkpoint."""
    lines: list[str] = []
    for name, record in report.tuning.items():
        lines += [
            "",
            f"## int8 tuning: {name}",
            "",
            f"Tolerance {record.get('tolerance')} points of dev {record.get('metric')}; fp32 dev "
            f"{record.get('metric')} {record.get('fp32_dev_metric')}; chosen: **{record.get('chosen')}** "
            f"({record.get('choice_rule', '')}).",
            "",
            "| candidate | phase | fp32 groups | dev | drop (points) | size (MB) | b32 ms (IQR) | within |",
            "|---|---|---|---:|---:|---:|---:|---|",
        ]
        for c in record.get("candidates") or []:
            b32 = ((c.get("latency") or {}).get("batch_32")) or {}
            latency = _fmt_ms(b32.get("median_ms"))
            if b32.get("q1_ms") is not None and b32.get("median_ms") is not None:
                latency += f" ({b32['q1_ms']:.2f}–{b32['q3_ms']:.2f})"
            lines.append(
                f"| {c.get('name')} | {c.get('phase')} | {', '.join(c.get('fp32_groups') or []) or MISSING} | "
                f"{_fmt_metric(c.get('dev_metric'))} | {c.get('drop_points', 0):+.2f} | {(c.get('size_bytes') or 0) / 1e6:.1f} | "
                f"{latency} | {'yes' if c.get('within_tolerance') else 'no'} |"
            )
    return lines


def to_markdown(report: Report) -> str:
    headers, body = table_cells(report)
    lines = [
        f"# tinycompress report: {report.task}",
        "",
        f"Chain: {' → '.join(report.chain)} (workspace `{report.workspace}`). Created {report.created}.",
        "",
        f"**{TEST_SPLIT_NOTE}**",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if i < 3 else "---:" for i in range(len(headers))) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
    lines += ["", "## Notes", ""] + [f"- {note}" for note in report.footnotes]
    lines += ["", "## Time per stage", "", "| checkpoint | stage | seconds | source |", "|---|---|---:|---|"]
    for name, item in report.stage_timing.items():
        seconds = MISSING if item["seconds"] is None else f"{item['seconds']:.1f}"
        lines.append(f"| {name} | {item['stage']} | {seconds} | {item['source'] or MISSING} |")
    lines += _tuning_markdown(report)
    lines += ["", "## Plots", "", f"![test {report.primary_metric} against size]({PLOT_SIZE})"]
    if report.sweep is not None:
        lines += ["", f"Pruning sweep from `{report.sweep['csv']}`:", "", f"![pruning sweep]({PLOT_SWEEP})"]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = (
    "label",
    "status",
    "checkpoint",
    "runtime",
    "size_bytes",
    "size_mb",
    "{metrics}",
    "parameters",
    "heads_kept",
    "heads_total",
    "ffn_kept",
    "ffn_total",
    "latency_b1_ms",
    "latency_b32_ms",
    "{spread}",
    "latency_source",
    "compression",
    "speedup_b1",
    "speedup_b32",
    "speedup_b1_differs",
    "speedup_b32_differs",
    "same_file_as",
    "command",
)


# The spread of each latency (empty where unknown): latency_b1_q1_ms, ..., latency_b32_runs.
CSV_SPREAD = tuple(
    (f"latency_b{key.split('_')[1]}_{part}", key, part)
    for key in BATCH_KEYS
    for part in ("q1_ms", "q3_ms", "min_ms", "max_ms", "runs")
)


def to_csv(report: Report) -> str:
    columns = []
    for column in CSV_COLUMNS:
        if column == "{metrics}":
            columns += [f"test_{m}" for m in report.metrics]
        elif column == "{spread}":
            columns += [name for name, _, _ in CSV_SPREAD]
        else:
            columns.append(column)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        item = {
            "label": row.label,
            "status": row.status,
            "checkpoint": row.checkpoint,
            "runtime": row.runtime,
            "size_bytes": row.size_bytes,
            "size_mb": None if row.size_mb is None else round(row.size_mb, 3),
            "parameters": row.parameters,
            "heads_kept": row.heads_kept,
            "heads_total": row.heads_total,
            "ffn_kept": row.ffn_kept,
            "ffn_total": row.ffn_total,
            "latency_b1_ms": row.latency_ms.get("batch_1"),
            "latency_b32_ms": row.latency_ms.get("batch_32"),
            "latency_source": row.latency_source,
            "compression": row.compression,
            "speedup_b1": row.speedup.get("batch_1"),
            "speedup_b32": row.speedup.get("batch_32"),
            "speedup_b1_differs": row.speedup_differs.get("batch_1"),
            "speedup_b32_differs": row.speedup_differs.get("batch_32"),
            "same_file_as": " ".join(row.same_file_as) or None,
            "command": row.command,
        }
        item |= {f"test_{m}": row.metrics.get(m) for m in report.metrics}
        item |= {name: (row.latency_spread.get(key) or {}).get(part) for name, key, part in CSV_SPREAD}
        writer.writerow({k: "" if v is None else v for k, v in item.items()})
    return buffer.getvalue()


def default_out_dir(report: Report) -> Path:
    return task_dir(report.workspace, report.task) / REPORT_DIR_NAME


def report_files(report: Report) -> list[str]:
    """The file names :func:`write_report` writes for ``report``."""
    return list(REPORT_FILES) + ([PLOT_SWEEP] if report.sweep is not None else [])


def check_report_out(out: Path) -> Path:
    """Pre-flight of a report folder: refuse one that holds anything but an earlier report, and
    make sure its parent folder can be written (before any latency is measured)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.json").is_file())):
        raise TinycompressError(
            f"{out} exists and is not a tinycompress report folder", "pass an empty or new folder to --out"
        )
    check_writable(out.parent, "pass --out (or --workdir) a writable place")
    return out


def write_report(report: Report, out_dir: str | Path | None = None) -> Path:
    """Write the report files into ``out_dir`` (default ``<workspace>/<task>/report``); returns it.

    The folder is derived output, replaced whole on every call: the files are written into a
    temporary sibling that then takes its place, so readers never see half a report. If that
    last step fails, the earlier report is put back where it was. A folder that exists and holds
    anything but an earlier report is refused rather than deleted.
    """
    out = check_report_out(Path(out_dir) if out_dir is not None else default_out_dir(report))
    remove_orphaned_temporaries(out.parent)
    tmp = temporary_path(out.parent, out.name)
    tmp.mkdir()
    try:
        data = report.to_dict() | {"files": report_files(report)}
        (tmp / "report.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(to_markdown(report), encoding="utf-8")
        (tmp / "report.csv").write_text(to_csv(report), encoding="utf-8")
        plot_size(report, tmp / PLOT_SIZE)
        if report.sweep is not None:
            plot_sweep(report, tmp / PLOT_SWEEP)
        old = None
        if out.exists():
            old = temporary_path(out.parent, f"old_{out.name}")
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)  # never leave the only report in a hidden folder
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def previous_measured_seconds(out_dir: Path) -> dict[str, float]:
    """Wall seconds that an earlier ``tinycompress run`` timed, from the report it left in ``out_dir``."""
    try:
        data = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
        return {
            name: float(item["seconds"])
            for name, item in data.get("stage_timing", {}).items()
            if item.get("source") == "run: wall time" and item.get("seconds") is not None
        }
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def report_json(report: Report, out_dir: Path | None = None) -> str:
    """The JSON that ``--json`` prints (the report.json content)."""
    data = report.to_dict() | {"files": report_files(report)}
    if out_dir is not None:
        data["out_dir"] = str(out_dir)
    return json.dumps(data, indent=2, ensure_ascii=False)
