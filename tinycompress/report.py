"""The results table: one row per version of a task's model, read from the manifests of one chain.

    tinycompress report --task sst2                 # the newest chain in runs/sst2
    tinycompress report runs/sst2/quantize-v2       # the chain that ends at that checkpoint
    tinycompress report --task sst2 --bench         # measure every row's latency here, now

A *chain* is a checkpoint and its ancestors, found through the ``parent`` links of the
manifests. By default it starts at the newest checkpoint of the furthest stage present
(export, else quantize, else prune, else finetune) and walks back to the finetune checkpoint.
The rows are: original (the pretrained encoder with a fresh head, from the finetune manifest's
``original/*`` metrics), fine-tuned, pruned (one row per prune checkpoint in the chain), quantized
and one row per exported artifact. A stage missing from the chain is a "not run" row carrying
the command that produces it. After them come the *baselines*: quantize checkpoints made straight
from the chain's fine-tuned model (``tinycompress run`` makes one per backend), i.e. int8 without
pruning, what a user would otherwise do -- the newest of each kind (backend and settings).

Everything shown comes from the manifests, except latency with ``bench=True`` (measured now on
this machine, the same inputs for every row) and the sweep curve (a ``prune_sweep.csv`` written
by ``benchmarks/prune_sweep.py``: ``--sweep CSV``, else the newest ``prune_sweep.csv`` under
``runs/<task>/sweeps/``).

:func:`build_report` gathers a :class:`Report`; :func:`run_report` is the ``tinycompress report``
command as a function (settings, build, write). Showing and writing it -- the Rich table,
``report.md``, ``report.json``, ``report.csv`` and PNG plots -- is :mod:`tinycompress.report_render`.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .checkpoint import (
    MANIFEST_NAME,
    STAGES,
    Checkpoint,
    latest_task,
    newest_in_chain,
    producing_command,
    read_checkpoint,
    stage_versions,
    task_dir,
)
from .errors import TinycompressError

REPORT_SCHEMA = 1
SWEEP_DIR_NAME = "sweeps"
SWEEP_FILE_NAME = "prune_sweep.csv"
TEST_SPLIT_NOTE = "Test metrics are on the GLUE validation set (GLUE test labels are hidden)."
BATCH_KEYS = ("batch_1", "batch_32")
# Files an export folder may hold: (file, runtime format, title, prefix of its test metrics).
EXPORT_ARTIFACT_FILES = (
    ("model.onnx", "onnx", "ONNX", "onnx"),
    ("model.torchscript.pt", "torchscript", "TorchScript", "torchscript"),
    ("model_int8.torchscript.pt", "torchscript", "TorchScript", "torchscript_int8"),
)
# Where the seconds a stage spent are recorded in its manifest (metrics, then details).
SECONDS_KEYS = ("train_seconds", "prune_seconds", "quantize_seconds", "export_seconds")


# ------------------------------------------------------------------------------ data


@dataclass
class Row:
    """One version of the model in the table. ``None`` means unknown (shown as "—")."""

    key: str  # "original", "finetune", "prune", "quantize", "export" or "baseline"
    label: str  # what the table shows, e.g. "pruned + quantized"
    status: str  # "ok" or "not run"
    checkpoint: str | None = None  # folder name, e.g. "prune-v1"
    path: str | None = None
    artifact: str | None = None  # for export rows: the file in the folder, e.g. "model.onnx"
    command: str | None = None  # for "not run": the command that produces the stage
    runtime: str | None = None  # e.g. "torch fp32", "onnx int8"
    size_bytes: int | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    metrics_from: str | None = None  # where the metrics were measured, when not on this row's own artifact
    parameters: int | None = None
    heads_kept: int | None = None
    heads_total: int | None = None
    ffn_kept: int | None = None
    ffn_total: int | None = None
    latency_ms: dict[str, float | None] = field(default_factory=lambda: {k: None for k in BATCH_KEYS})
    latency_source: str | None = None  # "bench" or "manifest"
    latency_machine: dict[str, Any] | None = None
    compression: float | None = None  # fine-tuned size / this size
    speedup: dict[str, float | None] = field(default_factory=lambda: {k: None for k in BATCH_KEYS})
    test_rows: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def size_mb(self) -> float | None:
        return None if self.size_bytes is None else self.size_bytes / 1e6


@dataclass
class Report:
    """Everything the table, the files and ``--json`` show (see :meth:`to_dict` for the schema)."""

    task: str
    workspace: str
    metrics: list[str]  # the task's metric names, primary first
    rows: list[Row]
    chain: list[str]  # checkpoint folder names, finetune first
    latency: dict[str, Any]
    stage_seconds: dict[str, float | None]
    stage_timing: dict[str, dict[str, Any]]
    sweep: dict[str, Any] | None
    footnotes: list[str]
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    # The sweep rows themselves, for the plot; not part of the JSON (the CSV is referenced).
    sweep_rows: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    def row(self, key: str) -> Row | None:
        """The first row with this key, if any."""
        return next((r for r in self.rows if r.key == key), None)

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for row in self.rows:
            item = asdict(row)
            item["size_mb"] = None if row.size_mb is None else round(row.size_mb, 3)
            rows.append(item)
        return {
            "schema": REPORT_SCHEMA,
            "task": self.task,
            "workspace": self.workspace,
            "created": self.created,
            "test_split": TEST_SPLIT_NOTE,
            "metrics": self.metrics,
            "primary_metric": self.primary_metric,
            "chain": self.chain,
            "rows": rows,
            "latency": self.latency,
            "stage_seconds": self.stage_seconds,
            "stage_timing": self.stage_timing,
            "sweep": self.sweep,
            "footnotes": self.footnotes,
        }


# ------------------------------------------------------------------------------ finding the chain


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _stage_dirs(folder: Path) -> bool:
    return any(stage_versions(folder.parent, folder.name, stage) for stage in STAGES)


def locate(target: str | Path | None = None, *, workdir: str | Path = "runs", task: str | None = None) -> tuple[Path, str, Checkpoint | None]:
    """(workspace, task, explicit chain end or None) for a report target.

    ``target`` may be a checkpoint folder (the chain ends there), a task folder (``runs/sst2``)
    or a workspace (``runs``); without it, ``workdir`` and ``task`` (default: the workspace's
    most recent task) are used. Raises :class:`TinycompressError` for a missing folder, an
    unknown task or an empty workspace.
    """
    from .tasks import get_task

    if task is not None:
        task = get_task(task).name
    end = None
    if target is not None:
        target = Path(target)
        if not target.is_dir():
            raise TinycompressError(f"report target not found: {target}", "pass a checkpoint folder, a task folder (runs/sst2) or a workspace (runs)")
        if (target / MANIFEST_NAME).is_file():
            end = read_checkpoint(target)
            if task is not None and end.task != task:
                raise TinycompressError(f"{target} is a {end.task} checkpoint, not {task}", "drop --task or pass a checkpoint of that task")
            return target.resolve().parent.parent, end.task, end
        if _stage_dirs(target):
            workdir, found_task = target.resolve().parent, target.resolve().name
            if task is not None and found_task != task:
                raise TinycompressError(f"{target} holds task {found_task}, not {task}", "drop --task or pass that task's folder")
            task = found_task
        else:
            workdir = target
    workdir = Path(workdir)
    if task is None:
        task = latest_task(workdir)
        if task is None:
            raise TinycompressError(
                f"no checkpoints in workspace '{workdir}'",
                "run `tinycompress run --task sst2 --data-dir ../shared/data/glue` first, or pass --workdir",
            )
    if not any(stage_versions(workdir, task, stage) for stage in STAGES):
        raise TinycompressError(
            f"no checkpoints for task {task} in workspace '{workdir}'",
            f"run `tinycompress run --task {task}` (or `{producing_command('finetune', task)}`) first",
        )
    return workdir, task, end


def chain_end(workdir: str | Path, task: str) -> Checkpoint:
    """The newest checkpoint of the furthest stage present (export > quantize > prune > finetune),
    baselines left out (they are shown beside a chain, see :func:`find_baselines`)."""
    for stage in reversed(STAGES):
        newest = newest_in_chain(workdir, task, stage)
        if newest is not None:
            return read_checkpoint(newest)
    raise TinycompressError(f"no checkpoints for task {task} in workspace '{workdir}'", f"run `{producing_command('finetune', task)}` first")


def walk_chain(end: Checkpoint) -> tuple[list[Checkpoint], list[str]]:
    """``end`` and its ancestors, oldest (finetune) first, and notes on broken links.

    A missing or corrupt ancestor, or one whose manifest changed since the child was written
    (``Checkpoint.parent`` checks that), stops the walk with a note rather than failing the report.
    """
    chain, notes = [end], []
    current = end
    while current.manifest.get("parent"):
        link = current.manifest["parent"]
        try:
            parent = current.parent()
        except TinycompressError as exc:
            notes.append(f"{current.name}: its parent {link.get('path')} cannot be read ({exc.problem})")
            break
        if any(c.path == parent.path for c in chain):
            notes.append(f"{current.name}: parent link loops back to {parent.name}")
            break
        chain.append(parent)
        current = parent
    return list(reversed(chain)), notes


def _quantize_kind(checkpoint: Checkpoint) -> tuple[str, str, bool, bool]:
    """(backend, mode, per-channel, int8 embeddings) of a quantize checkpoint, as it recorded them."""
    settings, details = checkpoint.config.quantize, checkpoint.details
    return (str(details.get("backend", settings.backend)), str(details.get("mode", settings.mode)),
            bool(details.get("per_channel", settings.per_channel)), bool(details.get("quantize_embeddings", settings.quantize_embeddings)))


def find_baselines(chain: list[Checkpoint], workdir: str | Path, task: str) -> list[Checkpoint]:
    """Quantize checkpoints outside ``chain`` made from its fine-tuned checkpoint as it is now
    (unpruned int8): the newest of each kind (backend, mode, per-channel, int8 embeddings),
    ordered by backend, then version. Unreadable or corrupt ones are left out.
    """
    finetune = next((c for c in chain if c.stage == "finetune"), None)
    if finetune is None:
        return []
    in_chain = {c.path.resolve() for c in chain}
    found: dict[tuple[str, str, bool, bool], tuple[int, Checkpoint]] = {}
    for number, folder in reversed(stage_versions(workdir, task, "quantize")):
        if folder.resolve() in in_chain:
            continue
        try:
            candidate = read_checkpoint(folder, verify=False)
            link = candidate.manifest.get("parent")
            if not isinstance(link, dict) or link.get("stage") != "finetune" or not candidate.made_from(finetune):
                continue
            kind = _quantize_kind(candidate)
            if kind in found:
                continue
            found[kind] = (number, read_checkpoint(folder))  # verify the files of the one shown
        except (TinycompressError, AttributeError, TypeError, ValueError):
            continue
    return [checkpoint for _, (_, checkpoint) in sorted(found.items(), key=lambda item: (item[0][0], item[1][0]))]


# ------------------------------------------------------------------------------ rows


def _structure(folder: Path) -> tuple[int, int, int, int] | None:
    """(heads kept, heads total, FFN neurons kept, FFN total) from a folder's config.json.

    Pruned checkpoints record what they kept in ``config.tinycompress_pruning``; totals are the
    unpruned architecture's. None when there is no readable config of a known family.
    """
    from types import SimpleNamespace

    from .arch import get_arch

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        spec = get_arch(SimpleNamespace(model_type=config.get("model_type")))
        layers, heads, ffn = config[spec.layers_field], config[spec.heads_field], config[spec.ffn_field]
    except (OSError, ValueError, KeyError, TypeError, TinycompressError):
        return None
    structure = config.get("tinycompress_pruning") or {}
    heads_kept = sum(len(h) for h in structure["heads_kept"]) if "heads_kept" in structure else layers * heads
    ffn_kept = sum(structure["intermediate_sizes"]) if "intermediate_sizes" in structure else layers * ffn
    return heads_kept, layers * heads, ffn_kept, layers * ffn


def _latency_from_manifest(checkpoint: Checkpoint) -> tuple[dict[str, float | None], dict | None] | None:
    """``details.latency`` as {batch key: median ms} and the machine it was measured on."""
    latency = checkpoint.details.get("latency")
    if not isinstance(latency, dict):
        return None
    values: dict[str, float | None] = {}
    for key in BATCH_KEYS:
        entry = latency.get(key)
        if isinstance(entry, dict):
            entry = entry.get("median_ms")
        values[key] = float(entry) if isinstance(entry, (int, float)) else None
    if all(v is None for v in values.values()):
        return None
    machine = latency.get("machine") if isinstance(latency.get("machine"), dict) else None
    return values, machine


def _quantize_runtime(checkpoint: Checkpoint) -> str:
    backend = checkpoint.details.get("backend") or checkpoint.config.quantize.backend
    return f"{backend} int8"


def _task_metrics(checkpoint: Checkpoint, names: list[str], prefix: str = "test/") -> dict[str, float | None]:
    return {name: checkpoint.metrics.get(f"{prefix}{name}") for name in names}


def _stage_row(checkpoint: Checkpoint, names: list[str]) -> Row:
    """The row of a finetune, prune or quantize checkpoint, straight from its manifest."""
    metrics = checkpoint.metrics
    if checkpoint.stage == "finetune":
        label, runtime = "fine-tuned", "torch fp32"
    elif checkpoint.stage == "prune":
        label, runtime = "pruned", "torch fp32"
    else:
        parent_stage = (checkpoint.manifest.get("parent") or {}).get("stage")
        label = "pruned + quantized" if parent_stage == "prune" else "quantized"
        runtime = _quantize_runtime(checkpoint)
    row = Row(
        key=checkpoint.stage, label=label, status="ok", checkpoint=checkpoint.name, path=str(checkpoint.path),
        runtime=runtime, size_bytes=checkpoint.model_bytes, metrics=_task_metrics(checkpoint, names),
        parameters=metrics.get("parameters"), test_rows=metrics.get("test_rows"),
    )
    structure = _structure(checkpoint.path)
    if structure is not None:
        row.heads_kept, row.heads_total, row.ffn_kept, row.ffn_total = structure
    # The prune manifest's own counts win over config.json (they are what the stage measured).
    if "heads" in metrics:
        row.heads_kept = metrics["heads"]
    if "ffn_neurons" in metrics:
        row.ffn_kept = metrics["ffn_neurons"]
    manifest_latency = _latency_from_manifest(checkpoint)
    if manifest_latency is not None:
        row.latency_ms, row.latency_machine = manifest_latency
        row.latency_source = "manifest"
    return row


def _artifact_files(folder: Path, file: str) -> list[Path]:
    """The files one exported model is made of: the file and any external-data sibling."""
    main = folder / file
    extra = [p for p in folder.iterdir() if p.name.startswith(file + ".") and p.name.endswith(".data")] if folder.is_dir() else []
    return [p for p in [main, *extra] if p.is_file()]


def _export_rows(checkpoint: Checkpoint, chain: list[Checkpoint], names: list[str], rows_so_far: list[Row]) -> list[Row]:
    """One row per file in an export folder (``details.files``: ONNX, TorchScript fp32 / int8).

    Test metrics are the export's own measurement of that file (``onnx/test/<m>``,
    ``torchscript/test/<m>``, ``torchscript_int8/test/<m>``). An export that did not measure a
    file shows, if its parity check passed, the metrics of the checkpoint the file was made from
    (``metrics_from`` says which). Latency (``details.latency``) belongs to ``model.onnx``.
    """
    files = checkpoint.details.get("files")
    if not isinstance(files, dict) or not files:
        # An export folder without per-file details: one row per model file found.
        present = [name for name, _, _, _ in EXPORT_ARTIFACT_FILES if (checkpoint.path / name).is_file()]
        files = {name: {} for name in present} or {"?": {}}
    precision_default = "int8" if any(c.stage == "quantize" for c in chain) else "fp32"
    manifest_latency = _latency_from_manifest(checkpoint)
    rows = []
    for file, info in files.items():
        fmt, title, prefix = next(((f, t, p) for name, f, t, p in EXPORT_ARTIFACT_FILES if name == file), ("?", str(file), None))
        precision = info.get("precision") or precision_default
        own_files = _artifact_files(checkpoint.path, file)
        # A single artifact is the whole model_bytes of the manifest; several are sized each.
        size = checkpoint.model_bytes if len(files) == 1 else (sum(p.stat().st_size for p in own_files) or None)
        row = Row(
            key="export", label=f"exported ({title} {precision})", status="ok", checkpoint=checkpoint.name,
            path=str(checkpoint.path), artifact=file if file != "?" else None, runtime=f"{fmt} {precision}", size_bytes=size,
            metrics={name: None for name in names}, parameters=checkpoint.metrics.get("parameters"),
            test_rows=checkpoint.metrics.get("test_rows"),
        )
        if prefix is not None and any(f"{prefix}/test/{name}" in checkpoint.metrics for name in names):
            row.metrics = _task_metrics(checkpoint, names, f"{prefix}/test/")
        elif len(files) == 1 and any(f"test/{name}" in checkpoint.metrics for name in names):
            row.metrics = _task_metrics(checkpoint, names)
        else:
            source = next((r for r in rows_so_far if r.checkpoint == info.get("source") and r.status == "ok"), None)
            if info.get("passed") and source is not None:
                row.metrics, row.test_rows = dict(source.metrics), source.test_rows
                row.metrics_from = f"{source.checkpoint} (parity passed)"
        if info.get("passed") is False:
            row.notes.append(f"parity check failed against {info.get('reference')}")
        if file == "model.onnx" and manifest_latency is not None:
            row.latency_ms, row.latency_machine = manifest_latency
            row.latency_source = "manifest"
        rows.append(row)
    return rows


def _original_row(finetune: Row, checkpoint: Checkpoint, names: list[str]) -> Row:
    """The pretrained encoder with a fresh seeded head: same architecture as the fine-tuned model."""
    return Row(
        key="original", label="original", status="ok", checkpoint=None, path=None,
        runtime="torch fp32", size_bytes=finetune.size_bytes, metrics=_task_metrics(checkpoint, names, "original/test/"),
        parameters=finetune.parameters, heads_kept=finetune.heads_kept, heads_total=finetune.heads_total,
        ffn_kept=finetune.ffn_kept, ffn_total=finetune.ffn_total, test_rows=finetune.test_rows,
        metrics_from=f"{checkpoint.name}: original/test/*",
        notes=[f"pretrained {checkpoint.manifest.get('base_model', 'model')} with a fresh seeded head; size and parameters are the fine-tuned model's (same architecture)"],
    )


def _missing_row(stage: str, task: str, workdir: Path) -> Row:
    labels = {"finetune": "fine-tuned", "prune": "pruned", "quantize": "pruned + quantized", "export": "exported"}
    row = Row(key=stage, label=labels[stage], status="not run", command=producing_command(stage, task))
    others = [path.name for _, path in stage_versions(workdir, task, stage)]
    if others:
        row.notes.append(f"not in this chain; other {stage} checkpoints: {', '.join(others)}")
    return row


def _inherit_structure(rows: list[Row], chain: list[Checkpoint]) -> None:
    """Quantize / export keep their parent's architecture: fill unknown counts from the parent row."""
    by_name = {r.checkpoint: r for r in rows if r.checkpoint}
    for checkpoint in chain:
        link = checkpoint.manifest.get("parent")
        if not link:
            continue
        parent_name = Path(link["path"]).name
        parent_row = by_name.get(parent_name)
        for row in (r for r in rows if r.checkpoint == checkpoint.name):
            if parent_row is None:
                continue
            for attribute in ("parameters", "heads_kept", "heads_total", "ffn_kept", "ffn_total"):
                if getattr(row, attribute) is None:
                    setattr(row, attribute, getattr(parent_row, attribute))
    # Totals are the unpruned model's, whatever a row recorded.
    finetune = next((r for r in rows if r.key == "finetune" and r.status == "ok"), None)
    if finetune is not None:
        for row in rows:
            if row.status == "ok":
                row.heads_total = finetune.heads_total if finetune.heads_total is not None else row.heads_total
                row.ffn_total = finetune.ffn_total if finetune.ffn_total is not None else row.ffn_total


def build_rows(chain: list[Checkpoint], task: str, workdir: Path, names: list[str]) -> list[Row]:
    """Rows in table order: original, fine-tuned, pruned..., quantized, exported artifacts.

    Stages absent from ``chain`` become "not run" rows with their producing command.
    """
    rows: list[Row] = []
    by_stage: dict[str, list[Checkpoint]] = {stage: [c for c in chain if c.stage == stage] for stage in STAGES}
    finetunes = by_stage["finetune"]
    if finetunes:
        finetune_row = _stage_row(finetunes[0], names)
        rows += [_original_row(finetune_row, finetunes[0], names), finetune_row]
    else:
        missing = _missing_row("finetune", task, workdir)
        rows += [Row(key="original", label="original", status="not run", command=missing.command), missing]
    for stage in ("prune", "quantize"):
        rows += [_stage_row(c, names) for c in by_stage[stage]] or [_missing_row(stage, task, workdir)]
    exports = [row for c in by_stage["export"] for row in _export_rows(c, chain, names, rows)]
    rows += exports or [_missing_row("export", task, workdir)]
    _inherit_structure(rows, chain)
    return rows


BASELINE_BACKEND_TITLES = {"onnx": "ONNX Runtime", "torch": "torch"}


def baseline_rows(baselines: list[Checkpoint], rows: list[Row], names: list[str]) -> list[Row]:
    """One row per baseline checkpoint (see :func:`find_baselines`), with its parent's (the
    fine-tuned row's) architecture where the checkpoint's own files do not say it."""
    made = []
    for checkpoint in baselines:
        row = _stage_row(checkpoint, names)
        backend, mode, per_channel, int8_embeddings = _quantize_kind(checkpoint)
        # The label names every setting that differs from the plain recipe `run` uses.
        extras = [text for text, shown in ((mode, mode != "dynamic"), ("per-channel", per_channel), ("fp32 embeddings", not int8_embeddings)) if shown]
        row.key = "baseline"
        row.label = f"int8 only, unpruned ({', '.join([BASELINE_BACKEND_TITLES.get(backend, backend), *extras])})"
        made.append(row)
    _inherit_structure(rows + made, baselines)
    return made


# ------------------------------------------------------------------------------ latency


def _test_texts(finetune: Checkpoint, data_dir: str | None, limit: int = 512) -> list[tuple[str, ...]]:
    """Real test rows of the task, with the data settings the chain was trained with."""
    from .config import load_config
    from .data import load_config_data
    from .tasks import get_task

    overrides = {"data.data_dir": data_dir} if data_dir else {}
    config = load_config(None, overrides, base=finetune.manifest["config"])
    data = load_config_data(config, get_task(config.task))
    return data.test.texts[:limit]


def _row_predictor(row: Row, threads: int):
    """The predictor of one row: its export file when it has one, else its checkpoint folder."""
    from . import runtime

    if row.artifact is None:
        return runtime.load_predictor(row.path, threads=threads)
    if row.artifact == runtime.ONNX_FILE:
        return runtime.onnx_predictor(row.path, threads=threads)
    return runtime.torchscript_predictor(row.path, row.artifact)


def bench_rows(rows: list[Row], chain: list[Checkpoint], *, runs: int = 50, threads: int | None = None,
               data_dir: str | None = None, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Measure every row's latency now, in place; returns the ``latency`` section of the report.

    Each row's folder is loaded with :func:`tinycompress.runtime.load_predictor` and fed the same
    test texts, tokenized by its own tokenizer (they are copies of one another) into a batch of 1
    (the median-length row) and a batch of 32 (see :func:`tinycompress.bench.latency_batches`).
    The original row has the fine-tuned architecture, so it gets the fine-tuned latency.
    """
    from .bench import DEFAULT_WARMUP, LATENCY_BATCH_SIZES, measure_predictor
    from .envinfo import machine_info
    from .modeling import configure_threads, quiet_hf

    quiet_hf()
    used_threads = configure_threads(threads)
    finetune = next((c for c in chain if c.stage == "finetune"), chain[0])
    max_length = finetune.config.model.max_length
    texts = _test_texts(finetune, data_dir)
    for row in rows:
        if row.status != "ok" or row.path is None:
            continue
        row.latency_ms, row.latency_source, row.latency_machine = {k: None for k in BATCH_KEYS}, None, None
        log(f"bench {row.label} ({row.checkpoint}) ...")
        try:
            predictor = _row_predictor(row, used_threads)
        except TinycompressError as exc:
            row.notes.append(f"latency not measured: {exc.problem}")
            continue
        timings = measure_predictor(predictor, texts, max_length=max_length, runs=runs)
        row.latency_ms = {key: timing["median_ms"] for key, timing in timings.items()}
        row.latency_source = "bench"
    finetune_row = next((r for r in rows if r.key == "finetune" and r.status == "ok"), None)
    original = next((r for r in rows if r.key == "original" and r.status == "ok"), None)
    if original is not None and finetune_row is not None and finetune_row.latency_source == "bench":
        original.latency_ms, original.latency_source = dict(finetune_row.latency_ms), "bench"
        original.notes.append("latency: the fine-tuned model's (same architecture)")
    machine = machine_info(used_threads)
    for row in rows:
        if row.latency_source == "bench":
            row.latency_machine = machine
    return {
        "source": "bench", "machine": machine, "runs": runs, "warmup": DEFAULT_WARMUP, "statistic": "median",
        "batch_sizes": list(LATENCY_BATCH_SIZES), "max_length": max_length,
        "inputs": f"{len(texts)} real test rows: batch 1 = the median-length row, batch 32 = the first 32 rows padded to the longest",
    }


def _same_machine(a: dict | None, b: dict | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.get("cpu") == b.get("cpu") and a.get("threads") == b.get("threads")


def compute_ratios(rows: list[Row]) -> None:
    """Compression (fine-tuned size / size) and speed-up (fine-tuned latency / latency), in place.

    A speed-up needs both latencies measured the same way on the same machine (CPU and threads);
    otherwise it is left unknown rather than comparing numbers from different computers.
    """
    base = next((r for r in rows if r.key == "finetune" and r.status == "ok"), None)
    if base is None:
        return
    for row in rows:
        if row.status != "ok":
            continue
        if base.size_bytes and row.size_bytes:
            row.compression = base.size_bytes / row.size_bytes
        comparable = row.latency_source is not None and row.latency_source == base.latency_source and _same_machine(row.latency_machine, base.latency_machine)
        for key in BATCH_KEYS:
            mine, theirs = row.latency_ms.get(key), base.latency_ms.get(key)
            row.speedup[key] = theirs / mine if comparable and mine and theirs else None


# ------------------------------------------------------------------------------ timing and sweep


def manifest_seconds(checkpoint: Checkpoint) -> tuple[float | None, str | None]:
    """Seconds a stage's manifest says it spent, and which keys they came from.

    Sums the ``*_seconds`` entries of ``metrics`` and of ``details`` (and a prune's recovery
    training time). These are compute times measured inside the stage, not wall time.
    """
    total, used = 0.0, []
    for where, values in (("metrics", checkpoint.metrics), ("details", checkpoint.details)):
        for key in SECONDS_KEYS:
            value = values.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                total += float(value)
                used.append(f"{where}.{key}")
    recovery = checkpoint.details.get("recovery")
    if isinstance(recovery, dict) and isinstance(recovery.get("train_seconds"), (int, float)):
        total += float(recovery["train_seconds"])
        used.append("details.recovery.train_seconds")
    return (round(total, 1), "manifest: " + " + ".join(used)) if used else (None, None)


def stage_timing(chain: list[Checkpoint], measured: dict[str, float] | None = None,
                 baselines: list[Checkpoint] = ()) -> tuple[dict[str, float | None], dict[str, dict[str, Any]]]:
    """(seconds per stage, per-checkpoint timing with its source).

    ``measured`` maps checkpoint names to wall seconds timed by ``tinycompress run``; they win
    over the manifests' compute times. Several checkpoints of one stage (iterative pruning) add up.
    ``baselines`` are listed per checkpoint (stage "baseline") but not added to the chain's stages.
    """
    measured = measured or {}
    per_stage: dict[str, float | None] = {stage: None for stage in STAGES}
    timing: dict[str, dict[str, Any]] = {}
    for in_chain, checkpoint in [(True, c) for c in chain] + [(False, c) for c in baselines]:
        if checkpoint.name in measured:
            seconds, source = round(float(measured[checkpoint.name]), 1), "run: wall time"
        else:
            seconds, source = manifest_seconds(checkpoint)
        timing[checkpoint.name] = {"stage": checkpoint.stage if in_chain else "baseline", "seconds": seconds, "source": source}
        if seconds is not None and in_chain:
            per_stage[checkpoint.stage] = round((per_stage[checkpoint.stage] or 0.0) + seconds, 1)
    return per_stage, timing


def find_sweep(workdir: Path, task: str, explicit: str | Path | None = None) -> Path | None:
    """``explicit``, else the newest ``prune_sweep.csv`` under ``<workdir>/<task>/sweeps/``."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise TinycompressError(f"sweep CSV not found: {path}", "pass the prune_sweep.csv written by benchmarks/prune_sweep.py")
        return path
    root = task_dir(workdir, task) / SWEEP_DIR_NAME
    found = sorted(root.rglob(SWEEP_FILE_NAME), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    return found[-1] if found else None


def read_sweep(path: Path, metric: str) -> list[dict[str, Any]]:
    """Rows of a prune sweep CSV (criterion, head_ratio, recovered, test_<metric>, ...), typed."""
    column = f"test_{metric}"
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TinycompressError(f"cannot read sweep CSV {path}: {exc}") from None
    needed = {"criterion", "head_ratio", "recovered", column}
    if not rows or not needed <= set(rows[0]):
        raise TinycompressError(
            f"{path} is not a prune sweep of this task (needs columns {', '.join(sorted(needed))})",
            "pass the prune_sweep.csv written by benchmarks/prune_sweep.py for this task",
        )
    typed = []
    for raw in rows:
        try:
            typed.append({"criterion": raw["criterion"], "head_ratio": float(raw["head_ratio"]),
                          "recovered": raw["recovered"].strip().lower() == "true", "score": float(raw[column])})
        except ValueError:
            raise TinycompressError(f"{path}: malformed row {raw}", "re-run benchmarks/prune_sweep.py") from None
    return typed


# ------------------------------------------------------------------------------ the report


def _footnotes(report_rows: list[Row], latency: dict[str, Any], finetune: Checkpoint | None) -> list[str]:
    notes = [TEST_SPLIT_NOTE]
    if finetune is not None:
        notes.append(
            f"original = the pretrained encoder ({finetune.manifest.get('base_model', '?')}) with a freshly initialised, seeded "
            "classification head, before fine-tuning; its architecture is the fine-tuned model's, so its size, parameters "
            "(and, with --bench, latency) are the fine-tuned model's fp32 figures."
        )
    notes.append("size = the model's weight / graph files on disk (manifest model_bytes; tokenizer and config files excluded), MB = 10^6 bytes.")
    notes.append("compression = fine-tuned size / size; speed-up = fine-tuned latency / latency (only between latencies measured on the same machine and threads).")
    if latency.get("source") == "bench":
        machine = latency["machine"]
        notes.append(
            f"latency: measured now on {machine['cpu']} ({machine['cores']} cores, threads: {machine['threads']}), median of "
            f"{latency['runs']} runs after {latency['warmup']} warm-up runs; {latency['inputs']}, max length {latency['max_length']}."
        )
    else:
        machines = latency.get("machines") or []
        where = "; ".join(f"{m.get('cpu', '?')} (threads: {m.get('threads', '?')})" for m in machines) or "no manifest records latency"
        notes.append(f"latency: read from the manifests (measured when each stage ran: {where}); — = not recorded. "
                     "`tinycompress report --bench` measures every row on this machine now.")
    baselines = [r for r in report_rows if r.key == "baseline"]
    if baselines:
        notes.append(
            "int8 only, unpruned = the fine-tuned model quantized to int8 without pruning, what a user would do instead "
            f"(ONNX Runtime dynamic int8 is the Optimum way): {', '.join(r.checkpoint or '?' for r in baselines)}."
        )
    for row in report_rows:
        if row.status != "ok" and row.command and row.key != "original":
            notes.append(f"{row.label}: not run — `{row.command}` makes it.")
    counts = {r.test_rows for r in report_rows if r.status == "ok" and r.test_rows is not None}
    if len(counts) == 1:
        notes.append(f"test rows: {counts.pop()}.")
    elif len(counts) > 1:
        notes.append(f"rows were measured on different numbers of test rows ({', '.join(str(c) for c in sorted(counts))}); compare with care.")
    return notes


def build_report(
    target: str | Path | None = None,
    *,
    workdir: str | Path = "runs",
    task: str | None = None,
    bench: bool = False,
    bench_runs: int = 50,
    threads: int | None = None,
    data_dir: str | None = None,
    sweep: str | Path | None = None,
    measured_seconds: dict[str, float] | None = None,
    log: Callable[[str], None] = _log,
    baselines: list[Checkpoint] | None = None,
) -> Report:
    """Gather the report of one chain.

    ``target``: a checkpoint folder (the chain ends there), a task folder or a workspace; else
    ``workdir`` + ``task`` (default: the most recent task), whose newest chain is reported.
    ``bench``: measure latency now (``bench_runs`` runs, ``threads`` threads, texts from the
    chain's test data or ``data_dir``); else latency comes from the manifests' ``details.latency``.
    ``sweep``: a prune sweep CSV (default: the newest under ``runs/<task>/sweeps/``).
    ``measured_seconds``: wall seconds per checkpoint name, from ``tinycompress run``.
    ``baselines``: the unpruned int8 checkpoints to show after the chain (None: :func:`find_baselines`).
    Raises :class:`TinycompressError` for an empty workspace, an unknown task or a bad target.
    """
    from .tasks import get_task

    workdir, task, end = locate(target, workdir=workdir, task=task)
    end = end or chain_end(workdir, task)
    chain, chain_notes = walk_chain(end)
    names = list(get_task(task).metrics)
    rows = build_rows(chain, task, workdir, names)
    if baselines is None:
        baselines = find_baselines(chain, workdir, task)
    rows += baseline_rows(baselines, rows, names)
    finetune = next((c for c in chain if c.stage == "finetune"), None)
    if bench:
        latency = bench_rows(rows, chain, runs=bench_runs, threads=threads, data_dir=data_dir, log=log)
    else:
        machines = []
        for row in rows:
            if row.latency_machine is not None and row.latency_machine not in machines:
                machines.append(row.latency_machine)
        latency = {"source": "manifests" if any(r.latency_source for r in rows) else "none", "machines": machines}
    compute_ratios(rows)
    per_stage, timing = stage_timing(chain, measured_seconds, baselines)
    sweep_path = find_sweep(workdir, task, sweep)
    sweep_info, sweep_rows = None, []
    if sweep_path is not None:
        try:
            sweep_rows = read_sweep(sweep_path, names[0])
            sweep_info = {"csv": str(sweep_path), "rows": len(sweep_rows), "criteria": sorted({r["criterion"] for r in sweep_rows})}
        except TinycompressError as exc:
            if sweep is not None:
                raise
            chain_notes.append(f"sweep {sweep_path} skipped: {exc.problem}")
    return Report(
        task=task, workspace=str(workdir), metrics=names, rows=rows, chain=[c.name for c in chain], latency=latency,
        stage_seconds=per_stage, stage_timing=timing, sweep=sweep_info,
        footnotes=_footnotes(rows, latency, finetune) + chain_notes, sweep_rows=sweep_rows,
    )


def run_report(
    target: str | Path | None = None,
    *,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    task: str | None = None,
    data_dir: str | None = None,
    sweep: str | Path | None = None,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] = _log,
) -> tuple[Report, Path]:
    """Build the report of one chain and write its files: ``tinycompress report`` as a function.

    Settings (workdir, threads, ``report.bench``, ``report.bench_runs``, ``report.baselines``) come from
    ``config_file`` < ``overrides`` (dotted keys, None = not given). The task is ``task``, else
    the config file's, else the workspace's most recent one -- not Config's default, since a
    report without a task means "the latest results". ``target``, ``data_dir`` and ``sweep`` are
    as for :func:`build_report`; ``out_dir`` as for
    :func:`~tinycompress.report_render.write_report`. Returns (report, folder written).
    """
    from .config import load_config, read_yaml
    from .report_render import write_report

    settings = load_config(config_file, overrides)
    asked_task = task or (read_yaml(config_file).get("task") if config_file is not None else None)
    report = build_report(target, workdir=settings.workdir, task=asked_task, bench=settings.report.bench,
                          bench_runs=settings.report.bench_runs, threads=settings.threads, data_dir=data_dir, sweep=sweep, log=log,
                          baselines=None if settings.report.baselines else [])
    return report, write_report(report, out_dir)


__all__ = [
    "Report", "Row", "build_report", "run_report", "locate", "chain_end", "walk_chain", "find_baselines", "build_rows",
    "baseline_rows", "bench_rows",
    "compute_ratios", "find_sweep", "read_sweep", "stage_timing",
]
