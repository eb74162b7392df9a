"""The whole pipeline in one call: finetune → prune → quantize → export → report.

    tinycompress run --task sst2 --data-dir ../shared/data/glue
    tinycompress run --config configs/sst2.yaml --ratio 0.3        # re-runs prune and later stages

Every stage gets the same resolved :class:`~tinycompress.config.Config` and writes its usual
``<stage>-v<N>`` folder. The pipeline resumes: before running a stage it looks for an existing
checkpoint of that stage (newest first) made from the same parent checkpoint with the same
settings for that stage (its ``fingerprint`` in :data:`~tinycompress.stage_graph.STAGES`) and reuses it instead. So a second identical
``run`` only rebuilds the report, and changing ``--ratio`` re-runs prune, quantize and export but
not the fine-tune. A stage interrupted mid-way leaves no folder (checkpoints are written
atomically), so it simply runs again next time.

With ``report.baselines`` (on by default) it also quantizes the unpruned fine-tuned model with
each backend's default dynamic int8 -- what a user would do instead of pruning -- and the report
shows those checkpoints as rows measured beside the chain.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinycompress.checkpoint.format import task_dir
from tinycompress.checkpoint.store import Checkpoint
from tinycompress.checkpoint.temporaries import check_writable
from tinycompress.checkpoint.workspace import find_reusable
from tinycompress.config import Config, QuantizeSettings
from tinycompress.console import log_to_stderr
from tinycompress.errors import TinycompressError
from tinycompress.stage_graph import BASELINE_BACKENDS, BASELINE_FINGERPRINT, STAGE_ORDER, STAGES


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` did: the chain's checkpoints, which stages were reused, timings."""

    checkpoints: dict[str, Checkpoint]  # stage -> the checkpoint used (new or reused)
    skipped: list[str]  # stages whose existing checkpoint was reused
    seconds: dict[str, float]  # wall seconds of the stages run now, by checkpoint name
    report: Any  # tinycompress.report.rows.Report
    report_dir: Path
    log: list[str] = field(default_factory=list)
    baselines: dict[str, Checkpoint] = field(default_factory=dict)  # backend -> unpruned int8 checkpoint


def stage_functions() -> dict[str, Callable[[Config, Checkpoint | None], Checkpoint]]:
    """stage -> function(config, parent) writing a new checkpoint, from :data:`STAGES` (each
    imported only when called); "baseline" writes a quantize checkpoint marked as a baseline."""

    def runner(stage: str, **options: Any) -> Callable[[Config, Checkpoint | None], Checkpoint]:
        spec = STAGES[stage]

        def run(config: Config, parent: Checkpoint | None) -> Checkpoint:
            function = spec.load_function()
            return function(config, parent, **options) if spec.parents else function(config, **options)

        return run

    return {stage: runner(stage) for stage in STAGE_ORDER} | {"baseline": runner("quantize", baseline=True)}


def _bench_default(config: Config) -> bool:
    """``report.bench`` when the config file or a flag set it, else True (see :func:`run_pipeline`)."""
    return config.report.bench if "bench" in config.report.model_fields_set else True


def _shown(path: Path) -> str:
    """A path relative to the current folder when it is below it (as the user typed it)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def run_pipeline(
    config: Config,
    *,
    bench: bool | None = None,
    out_dir: str | Path | None = None,
    sweep: str | Path | None = None,
    log: Callable[[str], None] = log_to_stderr,
    stages: dict[str, Callable[[Config, Checkpoint | None], Checkpoint]] | None = None,
) -> PipelineResult:
    """Run (or reuse) every stage with ``config`` -- and, with ``report.baselines``, the unpruned
    int8 baselines (:data:`BASELINE_BACKENDS`) -- then build and write the report.

    ``bench``: measure latency of every row now. Default: on, unless the config sets
    ``report.bench`` explicitly (YAML or flag) -- the final table compares the versions, and only
    quantize manifests record a latency, so without measuring there would be no speed-ups. ``out_dir``:
    the report folder (default ``<workdir>/<task>/report``); ``sweep``: a prune sweep CSV for the
    report. ``stages`` replaces the stage functions (tests). Progress goes to ``log`` (stderr).
    Returns a :class:`PipelineResult`; raises :class:`TinycompressError` as the stages do,
    leaving the checkpoints written so far in place for the next run to reuse.
    """
    from tinycompress.data.tasks import get_task
    from tinycompress.report.gather import build_report
    from tinycompress.report.render import (
        REPORT_DIR_NAME,
        check_report_out,
        default_out_dir,
        previous_measured_seconds,
        write_report,
    )

    config = config.model_copy(update={"task": get_task(config.task).name})
    check_writable(task_dir(config.workdir, config.task))
    check_report_out(Path(out_dir) if out_dir is not None else task_dir(config.workdir, config.task) / REPORT_DIR_NAME)
    functions = stages or stage_functions()
    checkpoints: dict[str, Checkpoint] = {}
    baselines: dict[str, Checkpoint] = {}
    skipped: list[str] = []
    seconds: dict[str, float] = {}
    messages: list[str] = []

    def say(message: str) -> None:
        messages.append(message)
        log(message)

    def timed(
        what: str,
        function: Callable[[Config, Checkpoint | None], Checkpoint],
        stage_config: Config,
        parent: Checkpoint | None,
    ) -> Checkpoint:
        start = time.perf_counter()
        checkpoint = function(stage_config, parent)
        seconds[checkpoint.name] = round(time.perf_counter() - start, 1)
        say(f"{what}: wrote {_shown(checkpoint.path)} in {seconds[checkpoint.name]:.1f}s")
        return checkpoint

    parent: Checkpoint | None = None
    for stage in STAGE_ORDER:
        reused = find_reusable(stage, config, parent, log=say)
        if reused is not None:
            same = "the same config" if parent is None else f"the same config and parent ({parent.name})"
            say(f"skip {stage}: {_shown(reused.path)} has {same}")
            checkpoints[stage], parent = reused, reused
            skipped.append(stage)
            continue
        say(f"run {stage}" + (f" on {_shown(parent.path)}" if parent is not None else ""))
        checkpoint = timed(stage, functions[stage], config, parent)
        checkpoints[stage], parent = checkpoint, checkpoint

    if config.report.baselines:
        for backend in BASELINE_BACKENDS:
            # Default quantize settings but the backend: the baseline is the plain recipe.
            baseline = config.model_copy(update={"quantize": QuantizeSettings(backend=backend)})
            reused = find_reusable(
                "quantize", baseline, checkpoints["finetune"], log=say, sections=BASELINE_FINGERPRINT
            )
            if reused is not None:
                say(
                    f"skip baseline {backend} int8: {_shown(reused.path)} has the same config and parent ({checkpoints['finetune'].name})"
                )
                skipped.append(f"baseline-{backend}")
                baselines[backend] = reused
                continue
            say(f"run baseline: quantize {_shown(checkpoints['finetune'].path)} (unpruned, {backend} int8)")
            try:
                baselines[backend] = timed(
                    f"baseline {backend} int8", functions["baseline"], baseline, checkpoints["finetune"]
                )
            except TinycompressError as exc:
                # A comparison row must not cost the user the chain's report: say why it is missing.
                say(f"baseline {backend} int8 failed, left out of the table: {exc.problem}")

    end = checkpoints[STAGE_ORDER[-1]]
    target_dir = Path(out_dir) if out_dir is not None else None
    # Wall times of stages reused now were timed by the run that made them; its report kept them.
    earlier_dir = target_dir or Path(config.workdir) / config.task / "report"
    measured = previous_measured_seconds(earlier_dir) | seconds
    report = build_report(
        end.path,
        bench=_bench_default(config) if bench is None else bench,
        bench_runs=config.report.bench_runs,
        threads=config.threads,
        data_dir=config.data.data_dir,
        sweep=sweep,
        measured_seconds=measured,
        log=say,
        baselines=list(baselines.values()),
    )
    written = write_report(report, target_dir or default_out_dir(report))
    say(f"report: wrote {_shown(written)}")
    return PipelineResult(checkpoints, skipped, seconds, report, written, messages, baselines)
