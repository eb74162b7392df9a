"""GLUE task definitions: columns, labels and metrics, in one table.

Two file layouts are read (see :mod:`tinycompress.data.glue`):
  * ours / HF split names: ``<task>/{train,validation,test}.tsv``
  * GLUE's ``download_glue_data.py``: ``SST-2/{train,dev,test}.tsv``, ``CoLA/`` without header, ...
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tinycompress.errors import TinycompressError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    # Text columns as named in the GLUE TSV header (one or two).
    tsv_text_columns: tuple[str, ...]
    tsv_label_column: str
    # The same columns in the HF `nyu-mll/glue` dataset.
    hub_text_columns: tuple[str, ...]
    # None means regression (one output, a float target).
    label_names: tuple[str, ...] | None
    # Metrics reported; the first one selects the best epoch.
    metrics: tuple[str, ...]
    classic_dir: str
    # Split name -> file stem, for both layouts. "test" is the GLUE validation set: GLUE's
    # test labels are hidden, so we report on validation and never select models with it.
    split_files: dict[str, str] = field(default_factory=dict)
    classic_split_files: dict[str, str] = field(default_factory=dict)
    # Columns of a header-less classic file (CoLA), by position.
    classic_headerless_columns: tuple[str, ...] | None = None

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]


def _splits(test: str = "validation") -> dict[str, str]:
    return {"train": "train", "test": test}


def _classic(test: str = "dev") -> dict[str, str]:
    return {"train": "train", "test": test}


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        "sst2",
        ("sentence",),
        "label",
        ("sentence",),
        ("negative", "positive"),
        ("accuracy",),
        "SST-2",
        _splits(),
        _classic(),
    ),
    "cola": TaskSpec(
        "cola",
        ("sentence",),
        "label",
        ("sentence",),
        ("unacceptable", "acceptable"),
        ("matthews_correlation",),
        "CoLA",
        _splits(),
        _classic(),
        classic_headerless_columns=("source", "label", "original_label", "sentence"),
    ),
    "mrpc": TaskSpec(
        "mrpc",
        ("#1 String", "#2 String"),
        "Quality",
        ("sentence1", "sentence2"),
        ("not_equivalent", "equivalent"),
        ("f1", "accuracy"),
        "MRPC",
        _splits(),
        _classic(),
    ),
    "rte": TaskSpec(
        "rte",
        ("sentence1", "sentence2"),
        "label",
        ("sentence1", "sentence2"),
        ("entailment", "not_entailment"),
        ("accuracy",),
        "RTE",
        _splits(),
        _classic(),
    ),
    "stsb": TaskSpec(
        "stsb",
        ("sentence1", "sentence2"),
        "score",
        ("sentence1", "sentence2"),
        None,
        ("pearson", "spearman"),
        "STS-B",
        _splits(),
        _classic(),
    ),
    "qnli": TaskSpec(
        "qnli",
        ("question", "sentence"),
        "label",
        ("question", "sentence"),
        ("entailment", "not_entailment"),
        ("accuracy",),
        "QNLI",
        _splits(),
        _classic(),
    ),
    "qqp": TaskSpec(
        "qqp",
        ("question1", "question2"),
        "is_duplicate",
        ("question1", "question2"),
        ("not_duplicate", "duplicate"),
        ("f1", "accuracy"),
        "QQP",
        _splits(),
        _classic(),
    ),
    "mnli": TaskSpec(
        "mnli",
        ("sentence1", "sentence2"),
        "gold_label",
        ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"),
        ("accuracy",),
        "MNLI",
        {"train": "train", "test": "validation_matched", "test_mismatched": "validation_mismatched"},
        {"train": "train", "test": "dev_matched", "test_mismatched": "dev_mismatched"},
    ),
}


def get_task(name: str) -> TaskSpec:
    """The spec of a GLUE task, or a one-line error listing the known tasks."""
    spec = TASKS.get(name.lower()) if isinstance(name, str) else None
    if spec is None:
        raise TinycompressError(f"unknown task '{name}'", f"use one of: {', '.join(TASKS)}")
    return spec
