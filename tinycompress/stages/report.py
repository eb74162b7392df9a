"""`tinycompress report`: find the chain, build its report, write report.md / .json / .csv and plots."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinycompress.console import log_to_stderr
from tinycompress.report.gather import build_report
from tinycompress.report.rows import Report


def run_report(
    target: str | Path | None = None,
    *,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    task: str | None = None,
    data_dir: str | None = None,
    sweep: str | Path | None = None,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] = log_to_stderr,
) -> tuple[Report, Path]:
    """Build the report of one chain and write its files: ``tinycompress report`` as a function.

    Settings (workdir, threads, ``report.bench``, ``report.bench_runs``, ``report.baselines``) come from
    ``config_file`` < ``overrides`` (dotted keys, None = not given). The task is ``task``, else
    the config file's, else the workspace's most recent one -- not Config's default, since a
    report without a task means "the latest results". ``target``, ``data_dir`` and ``sweep`` are
    as for :func:`build_report`; ``out_dir`` as for
    :func:`~tinycompress.report.render.write_report`. Returns (report, folder written).
    """
    from tinycompress.checkpoint.format import task_dir
    from tinycompress.checkpoint.workspace import locate
    from tinycompress.config import load_config, read_yaml
    from tinycompress.report.render import REPORT_DIR_NAME, check_report_out, write_report

    settings = load_config(config_file, overrides)
    asked_task = task or (read_yaml(config_file).get("task") if config_file is not None else None)
    # Pre-flight: the folder the report goes to, before any latency is measured.
    workspace, found_task, _ = locate(target, workdir=settings.workdir, task=asked_task)
    check_report_out(Path(out_dir) if out_dir is not None else task_dir(workspace, found_task) / REPORT_DIR_NAME)
    report = build_report(
        target,
        workdir=settings.workdir,
        task=asked_task,
        bench=settings.report.bench,
        bench_runs=settings.report.bench_runs,
        threads=settings.threads,
        data_dir=data_dir,
        sweep=sweep,
        log=log,
        baselines=None if settings.report.baselines else [],
    )
    return report, write_report(report, out_dir)
