"""The results table: one row per version of a task's model, read from the manifests of one chain.

    tinycompress report --task sst2                 # the newest chain in runs/sst2
    tinycompress report runs/sst2/quantize-v2       # the chain that ends at that checkpoint
    tinycompress report --task sst2 --bench         # measure every row's latency here, now

A *chain* is a checkpoint and its ancestors, found through the ``parent`` links of the
manifests. By default it starts at the newest checkpoint of the furthest stage present
(export, else quantize, else prune, else finetune) and walks back to the finetune checkpoint.
The rows are: original (the pretrained encoder with a fresh head, from the finetune manifest's
``original/*`` metrics), fine-tuned, pruned (one row per prune checkpoint in the chain), quantized
and one row per exported artifact -- except that a file byte-identical to an earlier row's (the
ONNX export's copy of the quantized graph) is shown once, as the earlier row
(:func:`~tinycompress.report.identical.merge_identical`). A stage missing from the chain is a "not run" row carrying
the command that produces it. After them come the *baselines*: quantize checkpoints made straight
from the chain's fine-tuned model (``tinycompress run`` makes one per backend), i.e. int8 without
pruning, what a user would otherwise do -- the newest of each kind (backend and settings).

Everything shown comes from the manifests, except latency with ``bench=True`` (measured now on
this machine, the same inputs for every row, all rows interleaved in one measurement, plus an
ONNX Runtime fp32 row made for it) and the sweep curve (a ``prune_sweep.csv`` written
by ``benchmarks/prune_sweep.py``: ``--sweep CSV``, else the newest ``prune_sweep.csv`` under
``runs/<task>/sweeps/``).

:func:`~tinycompress.report.gather.build_report` gathers a :class:`Report` of these rows;
:func:`~tinycompress.stages.report.run_report` is the ``tinycompress report`` command as a function
(settings, build, write). Showing and writing it -- the Rich table, ``report.md``, ``report.json``,
``report.csv`` -- is :mod:`tinycompress.report.render`, the plots :mod:`tinycompress.report.plots`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tinycompress.checkpoint.format import (
    LAYERS_TOTAL_KEY,
    MODEL_CONFIG_FILE,
    ONNX_FILE,
    STRUCTURE_ATTR,
    TORCHSCRIPT_FILE,
    TORCHSCRIPT_INT8_FILE,
)
from tinycompress.checkpoint.store import Checkpoint
from tinycompress.checkpoint.workspace import quantize_kind, stage_versions
from tinycompress.errors import TinycompressError
from tinycompress.inference.latency import differs
from tinycompress.stage_graph import STAGE_ORDER, STAGES

REPORT_SCHEMA = 1

TEST_SPLIT_NOTE = "Test metrics are on the GLUE validation set (GLUE test labels are hidden)."

BATCH_KEYS = ("batch_1", "batch_32")

# What a row keeps of a timing besides its median (see tinycompress.inference.latency.Timing).
SPREAD_KEYS = ("q1_ms", "q3_ms", "min_ms", "max_ms", "runs")

# Files an export folder may hold: (file, runtime format, title, prefix of its test metrics).
EXPORT_ARTIFACT_FILES = (
    (ONNX_FILE, "onnx", "ONNX", "onnx"),
    (TORCHSCRIPT_FILE, "torchscript", "TorchScript", "torchscript"),
    (TORCHSCRIPT_INT8_FILE, "torchscript", "TorchScript", "torchscript_int8"),
)


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
    # Per batch key: {q1_ms, q3_ms, min_ms, max_ms, runs} of the timing whose median is in
    # latency_ms; None when unknown (a manifest written before the protocol recorded a spread).
    latency_spread: dict[str, dict[str, float | int] | None] = field(
        default_factory=lambda: {k: None for k in BATCH_KEYS}
    )
    latency_source: str | None = None  # "bench" or "manifest"
    latency_machine: dict[str, Any] | None = None
    compression: float | None = None  # fine-tuned size / this size
    speedup: dict[str, float | None] = field(default_factory=lambda: {k: None for k in BATCH_KEYS})
    # Per batch key: whether this latency and the fine-tuned one differ by more than their spread
    # (interquartile ranges apart); False: within the spread (shown "≈"); None: not known.
    speedup_differs: dict[str, bool | None] = field(default_factory=lambda: {k: None for k in BATCH_KEYS})
    test_rows: int | None = None
    # Byte-identical artifacts shown as this one row ("export-v1/model.onnx"), see merge_identical.
    same_file_as: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def size_mb(self) -> float | None:
        return None if self.size_bytes is None else self.size_bytes / 1e6

    @property
    def where(self) -> str:
        """The row's checkpoint, and its file when the folder holds several: "export-v1/model.onnx"."""
        name = self.checkpoint or "?"
        return f"{name}/{self.artifact}" if self.artifact else name

    def timing(self, key: str) -> dict[str, float | int] | None:
        """The latency at ``key`` as a timing dict (median plus the spread, when known)."""
        median = self.latency_ms.get(key)
        if median is None:
            return None
        return {"median_ms": median, **(self.latency_spread.get(key) or {})}

    def set_latency(self, timings: dict[str, dict | None], source: str, machine: dict | None) -> None:
        """Latency from ``{batch key: timing dict}`` (median, and the spread where recorded)."""
        self.latency_ms = {k: None for k in BATCH_KEYS}
        self.latency_spread = {k: None for k in BATCH_KEYS}
        for key in BATCH_KEYS:
            timing = timings.get(key)
            if not isinstance(timing, dict) or timing.get("median_ms") is None:
                continue
            self.latency_ms[key] = float(timing["median_ms"])
            if all(isinstance(timing.get(k), (int, float)) for k in SPREAD_KEYS):
                self.latency_spread[key] = {k: timing[k] for k in SPREAD_KEYS}
        self.latency_source, self.latency_machine = source, machine


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
    # Checkpoint name -> its manifest's ``details.tuning`` (quantize --tolerance): every candidate tried.
    tuning: dict[str, dict[str, Any]] = field(default_factory=dict)

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
            "tuning": self.tuning,
        }


def _structure(folder: Path) -> tuple[int, int, int, int] | None:
    """(heads kept, heads total, FFN neurons kept, FFN total) from a folder's config.json.

    Pruned checkpoints record what they kept in ``config.tinycompress_pruning``; totals are the
    unpruned architecture's. None when there is no readable config of a known family.
    """
    from types import SimpleNamespace

    from tinycompress.models.arch import get_arch

    try:
        config = json.loads((folder / MODEL_CONFIG_FILE).read_text(encoding="utf-8"))
        spec = get_arch(SimpleNamespace(model_type=config.get("model_type")))
        layers, heads, ffn = config[spec.layers_field], config[spec.heads_field], config[spec.ffn_field]
    except (OSError, ValueError, KeyError, TypeError, TinycompressError):
        return None
    structure = config.get(STRUCTURE_ATTR) or {}
    # With layers removed, config.json holds the reduced count; the record keeps the original.
    layers = structure.get(LAYERS_TOTAL_KEY, layers) if isinstance(structure, dict) else layers
    heads_kept = sum(len(h) for h in structure["heads_kept"]) if "heads_kept" in structure else layers * heads
    ffn_kept = sum(structure["intermediate_sizes"]) if "intermediate_sizes" in structure else layers * ffn
    return heads_kept, layers * heads, ffn_kept, layers * ffn


def _latency_from_manifest(checkpoint: Checkpoint) -> tuple[dict[str, dict | None], dict | None] | None:
    """``details.latency`` as {batch key: timing dict} and the machine it was measured on.

    Older manifests record a bare median (a number) or a timing without spread; both give a
    timing dict with only ``median_ms``.
    """
    latency = checkpoint.details.get("latency")
    if not isinstance(latency, dict):
        return None
    values: dict[str, dict | None] = {}
    for key in BATCH_KEYS:
        entry = latency.get(key)
        if isinstance(entry, (int, float)) and not isinstance(entry, bool):
            entry = {"median_ms": entry}
        values[key] = entry if isinstance(entry, dict) and isinstance(entry.get("median_ms"), (int, float)) else None
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
    label, runtime = STAGES[checkpoint.stage].label, "torch fp32"
    if checkpoint.stage == "quantize":
        parent_stage = (checkpoint.manifest.get("parent") or {}).get("stage")
        label = "pruned + quantized" if parent_stage == "prune" else "quantized"
        runtime = _quantize_runtime(checkpoint)
    row = Row(
        key=checkpoint.stage,
        label=label,
        status="ok",
        checkpoint=checkpoint.name,
        path=str(checkpoint.path),
        runtime=runtime,
        size_bytes=checkpoint.model_bytes,
        metrics=_task_metrics(checkpoint, names),
        parameters=metrics.get("parameters"),
        test_rows=metrics.get("test_rows"),
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
        row.set_latency(manifest_latency[0], "manifest", manifest_latency[1])
    return row


def _artifact_files(folder: Path, file: str) -> list[Path]:
    """The files one exported model is made of: the file and any external-data sibling."""
    main = folder / file
    extra = (
        [p for p in folder.iterdir() if p.name.startswith(file + ".") and p.name.endswith(".data")]
        if folder.is_dir()
        else []
    )
    return [p for p in [main, *extra] if p.is_file()]


def _export_rows(
    checkpoint: Checkpoint, chain: list[Checkpoint], names: list[str], rows_so_far: list[Row]
) -> list[Row]:
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
        fmt, title, prefix = next(
            ((f, t, p) for name, f, t, p in EXPORT_ARTIFACT_FILES if name == file), ("?", str(file), None)
        )
        precision = info.get("precision") or precision_default
        own_files = _artifact_files(checkpoint.path, file)
        # A single artifact is the whole model_bytes of the manifest; several are sized each.
        size = checkpoint.model_bytes if len(files) == 1 else (sum(p.stat().st_size for p in own_files) or None)
        row = Row(
            key="export",
            label=f"exported ({title} {precision})",
            status="ok",
            checkpoint=checkpoint.name,
            path=str(checkpoint.path),
            artifact=file if file != "?" else None,
            runtime=f"{fmt} {precision}",
            size_bytes=size,
            metrics={name: None for name in names},
            parameters=checkpoint.metrics.get("parameters"),
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
        if file == ONNX_FILE and manifest_latency is not None:
            row.set_latency(manifest_latency[0], "manifest", manifest_latency[1])
        rows.append(row)
    return rows


def _original_row(finetune: Row, checkpoint: Checkpoint, names: list[str]) -> Row:
    """The pretrained encoder with a fresh seeded head: same architecture as the fine-tuned model."""
    return Row(
        key="original",
        label="original",
        status="ok",
        checkpoint=None,
        path=None,
        runtime="torch fp32",
        size_bytes=finetune.size_bytes,
        metrics=_task_metrics(checkpoint, names, "original/test/"),
        parameters=finetune.parameters,
        heads_kept=finetune.heads_kept,
        heads_total=finetune.heads_total,
        ffn_kept=finetune.ffn_kept,
        ffn_total=finetune.ffn_total,
        test_rows=finetune.test_rows,
        metrics_from=f"{checkpoint.name}: original/test/*",
        notes=[
            f"pretrained {checkpoint.manifest.get('base_model', 'model')} with a fresh seeded head; size and parameters are the fine-tuned model's (same architecture)"
        ],
    )


def _missing_row(stage: str, task: str, workdir: Path) -> Row:
    row = Row(key=stage, label=STAGES[stage].label, status="not run", command=STAGES[stage].command(task))
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
    by_stage: dict[str, list[Checkpoint]] = {stage: [c for c in chain if c.stage == stage] for stage in STAGE_ORDER}
    finetunes = by_stage["finetune"]
    if finetunes:
        finetune_row = _stage_row(finetunes[0], names)
        rows += [_original_row(finetune_row, finetunes[0], names), finetune_row]
    else:
        missing = _missing_row("finetune", task, workdir)
        rows += [Row(key="original", label="original", status="not run", command=missing.command), missing]
    for stage in STAGE_ORDER[1:-1]:  # between the fine-tune and the exports: one row per checkpoint
        rows += [_stage_row(c, names) for c in by_stage[stage]] or [_missing_row(stage, task, workdir)]
    exports = [row for c in by_stage["export"] for row in _export_rows(c, chain, names, rows)]
    rows += exports or [_missing_row("export", task, workdir)]
    _inherit_structure(rows, chain)
    return rows


BASELINE_BACKEND_TITLES = {"onnx": "ONNX Runtime", "torch": "torch"}


def baseline_rows(baselines: list[Checkpoint], rows: list[Row], names: list[str]) -> list[Row]:
    """One row per baseline checkpoint (see :func:`~tinycompress.checkpoint.workspace.find_baselines`), with its parent's (the
    fine-tuned row's) architecture where the checkpoint's own files do not say it."""
    made = []
    for checkpoint in baselines:
        row = _stage_row(checkpoint, names)
        backend, mode, per_channel, int8_embeddings = quantize_kind(checkpoint)
        # The label names every setting that differs from the plain recipe `run` uses.
        extras = [
            text
            for text, shown in (
                (mode, mode != "dynamic"),
                ("per-channel", per_channel),
                ("fp32 embeddings", not int8_embeddings),
            )
            if shown
        ]
        row.key = "baseline"
        row.label = f"int8 only, unpruned ({', '.join([BASELINE_BACKEND_TITLES.get(backend, backend), *extras])})"
        made.append(row)
    _inherit_structure(rows + made, baselines)
    return made


def compute_ratios(rows: list[Row]) -> None:
    """Compression (fine-tuned size / size) and speed-up (fine-tuned latency / latency), in place.

    A speed-up needs both latencies measured the same way on the same machine (CPU and threads);
    otherwise it is left unknown rather than comparing numbers from different computers. Where
    both latencies have a spread, ``speedup_differs`` says whether their interquartile ranges
    are apart (:func:`~tinycompress.inference.latency.differs`); the reference itself, and the
    original row (which borrows its latency), get None.
    """
    base = next((r for r in rows if r.key == "finetune" and r.status == "ok"), None)
    if base is None:
        return
    for row in rows:
        if row.status != "ok":
            continue
        if base.size_bytes and row.size_bytes:
            row.compression = base.size_bytes / row.size_bytes
        comparable = (
            row.latency_source is not None
            and row.latency_source == base.latency_source
            and same_machine(row.latency_machine, base.latency_machine)
        )
        for key in BATCH_KEYS:
            mine, theirs = row.latency_ms.get(key), base.latency_ms.get(key)
            row.speedup[key] = theirs / mine if comparable and mine and theirs else None
            row.speedup_differs[key] = None
            if row.speedup[key] is not None and row is not base and row.key != "original":
                row.speedup_differs[key] = differs(row.timing(key), base.timing(key))


def same_machine(a: dict | None, b: dict | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.get("cpu") == b.get("cpu") and a.get("threads") == b.get("threads")
