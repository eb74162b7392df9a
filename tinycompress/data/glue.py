"""GLUE data: read TSVs (two layouts) or the hub, and carve a dev split from the training rows.

Sources, in order: ``data_dir`` (config / ``--data-dir``), ``$TINYCOMPRESS_DATA_DIR``, then
``datasets.load_dataset("nyu-mll/glue", task)``. Files are read with quoting off, since GLUE text
has unbalanced ``"`` characters.
"""

from __future__ import annotations

import csv
import io
import math
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tinycompress.data.tasks import TaskSpec
from tinycompress.errors import TinycompressError
from tinycompress.text_files import read_text

if TYPE_CHECKING:
    from tinycompress.config import Config


DATA_DIR_ENV = "TINYCOMPRESS_DATA_DIR"


@dataclass
class Examples:
    """Rows of one split: one or two text columns and (except GLUE test) labels."""

    texts: list[tuple[str, ...]]
    labels: list[float] | list[int] | None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> Examples:
        labels = None if self.labels is None else [self.labels[i] for i in indices]
        return Examples([self.texts[i] for i in indices], labels)


@dataclass
class TaskData:
    train: Examples
    dev: Examples
    test: Examples
    source: str


def _parse_label(raw: str, spec: TaskSpec, where: str) -> int | float:
    raw = raw.strip()
    if spec.label_names is None:
        try:
            value = float(raw)
        except ValueError:
            raise TinycompressError(f"{where}: label '{raw}' is not a number") from None
        if not math.isfinite(value):  # nan, inf, or a literal too large for a float (1e999)
            raise TinycompressError(
                f"{where}: label '{raw}' is not a finite number", f"{spec.name} scores are finite numbers, e.g. 3.8"
            )
        return value
    if raw in spec.label_names:
        return spec.label_names.index(raw)
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value < len(spec.label_names):
        raise TinycompressError(
            f"{where}: label '{raw}' is out of range",
            f"{spec.name} labels are 0..{len(spec.label_names) - 1} or {', '.join(spec.label_names)}",
        )
    return value


def read_tsv(path: Path, spec: TaskSpec, *, with_labels: bool, headerless: bool = False) -> Examples:
    """Rows of a GLUE TSV (UTF-8); malformed files fail with the file and line number."""
    return _parse_tsv(_read_tsv_text(path), path, spec, with_labels=with_labels, headerless=headerless)


def _read_tsv_text(path: Path) -> str:
    return read_text(path, what="TSV file")


def _parse_tsv(text: str, path: Path, spec: TaskSpec, *, with_labels: bool, headerless: bool) -> Examples:
    """Rows of the decoded text of the TSV ``path``, read as :func:`read_tsv` says."""
    csv.field_size_limit(sys.maxsize)
    # newline="": lines end at \n, \r or \r\n, as when the file itself is opened with newline="".
    rows = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        first = next(rows, None)
        if first is None:
            raise TinycompressError(f"{path}: the file is empty", "point --data-dir at the GLUE TSV files")
        if headerless:
            header, pending, first_line = list(spec.classic_headerless_columns or ()), [first], 1
        else:
            header, pending, first_line = first, [], 2
        needed = list(spec.tsv_text_columns) + ([spec.tsv_label_column] if with_labels else [])
        missing = [c for c in needed if c not in header]
        if missing:
            raise TinycompressError(
                f"{path}:1: missing column(s) {', '.join(missing)} (header: {', '.join(header)})",
                f"a {spec.name} file needs the columns {', '.join(needed)}",
            )
        text_idx = [header.index(c) for c in spec.tsv_text_columns]
        label_idx = header.index(spec.tsv_label_column) if with_labels else None
        texts: list[tuple[str, ...]] = []
        labels: list = []

        def consume(row: list[str], line: int) -> None:
            if len(row) != len(header):
                raise TinycompressError(
                    f"{path}:{line}: expected {len(header)} tab-separated columns, found {len(row)}",
                    "fix or remove that line",
                )
            texts.append(tuple(row[i].strip() for i in text_idx))
            if label_idx is not None:
                labels.append(_parse_label(row[label_idx], spec, f"{path}:{line}"))

        for row in pending:  # the first row of a header-less file is data, on line 1
            consume(row, 1)
        for line, row in enumerate(rows, start=first_line + len(pending)):
            if not row:  # a blank line, as at the end of some GLUE files
                continue
            consume(row, line)
    except csv.Error as exc:  # not expected with quoting off; still the user's file, so say where
        raise TinycompressError(
            f"{path}:{rows.line_num}: unreadable TSV line ({exc})", "fix or remove that line"
        ) from None
    if not texts:
        raise TinycompressError(
            f"{path}: has a header but no rows", "add the data rows, or point --data-dir at the full GLUE TSV files"
        )
    return Examples(texts, labels if with_labels else None)


def _find_split_file(root: Path, spec: TaskSpec, split: str) -> tuple[Path, bool] | None:
    """(path, classic layout) for a split in either layout, or None."""
    candidates = [
        (root / spec.name / f"{spec.split_files[split]}.tsv", False),
        (root / spec.classic_dir / f"{spec.classic_split_files[split]}.tsv", True),
    ]
    for path, classic in candidates:
        if path.is_file():
            return path, classic
    return None


def _has_header(text: str, spec: TaskSpec) -> bool:
    """Whether the first line of a TSV's text names the task's text columns."""
    first = io.StringIO(text, newline=None).readline().rstrip("\n").split("\t")
    return all(c in first for c in spec.tsv_text_columns)


def resolve_data_dir(data_dir: str | None) -> Path | None:
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    return Path(chosen).expanduser() if chosen else None


def _from_dir(root: Path, spec: TaskSpec) -> tuple[dict[str, Examples], dict[str, str]]:
    """The splits found under ``root``, and the file each was read from."""
    if not root.is_dir():
        raise TinycompressError(
            f"data folder not found: {root}", f"pass a folder of GLUE TSVs to --data-dir or ${DATA_DIR_ENV}"
        )
    found: dict[str, Examples] = {}
    paths: dict[str, str] = {}
    for split in spec.split_files:
        located = _find_split_file(root, spec, split)
        if located is None:
            if split in ("train", "test"):
                raise TinycompressError(
                    f"no {split} file for {spec.name} in {root}",
                    f"expected {root / spec.name / (spec.split_files[split] + '.tsv')} "
                    f"or {root / spec.classic_dir / (spec.classic_split_files[split] + '.tsv')}",
                )
            continue
        path, classic = located
        text = _read_tsv_text(path)  # decoded once, for the header check and the rows
        headerless = classic and spec.classic_headerless_columns is not None and not _has_header(text, spec)
        found[split] = _parse_tsv(text, path, spec, with_labels=True, headerless=headerless)
        paths[split] = str(path)
    return found, paths


def _from_hub(spec: TaskSpec) -> dict[str, Examples]:
    try:
        import datasets

        dataset = datasets.load_dataset("nyu-mll/glue", spec.name)
    except Exception as exc:  # any failure here means "no hub": say how to fix it in one line
        raise TinycompressError(
            f"no data for {spec.name}: no --data-dir / ${DATA_DIR_ENV} given and the hub failed ({type(exc).__name__})",
            f"pass --data-dir pointing at a folder with {spec.name}/train.tsv and {spec.name}/validation.tsv",
        ) from None
    found = {}
    for split, hub_split in spec.split_files.items():
        if hub_split not in dataset:
            continue
        table = dataset[hub_split]
        texts = list(zip(*(table[c] for c in spec.hub_text_columns)))
        found[split] = Examples([tuple(t) for t in texts], list(table["label"]))
    return found


def _dev_rows(rows: int, dev_fraction: float) -> int:
    """How many of ``rows`` training rows become the dev split (at least one)."""
    return max(1, int(round(rows * dev_fraction)))


def load_task_data(
    spec: TaskSpec,
    *,
    data_dir: str | None,
    dev_fraction: float,
    seed: int,
    max_train_samples: int | None = None,
    max_test_samples: int | None = None,
) -> TaskData:
    """Train / dev / test splits. Dev is carved from train with ``seed``; test = GLUE validation."""
    root = resolve_data_dir(data_dir)
    if root is not None:
        splits, paths = _from_dir(root, spec)
        source = str(root)
    else:
        splits, source = _from_hub(spec), "hub:nyu-mll/glue"
        paths = {split: f"the {source} {spec.name} {split} split" for split in splits}
    train_all = splits["train"]
    order = list(range(len(train_all)))
    random.Random(seed).shuffle(order)
    n_dev = _dev_rows(len(order), dev_fraction)
    dev_idx, train_idx = order[:n_dev], order[n_dev:]
    if not train_idx or not dev_idx:
        needed = next((n for n in range(2, 10_000) if n - _dev_rows(n, dev_fraction) >= 1), None)
        raise TinycompressError(
            f"{paths['train']} has {len(order)} row(s): too few to carve a dev split "
            f"(data.dev_fraction {dev_fraction:g}) and keep training rows",
            f"it needs at least {needed} rows" if needed else "lower data.dev_fraction",
        )
    if max_train_samples is not None:
        train_idx = train_idx[:max_train_samples]
        dev_idx = dev_idx[: max(1, min(len(dev_idx), max_train_samples // 4 or 1))]
    test = splits["test"]
    if max_test_samples is not None:
        test = test.subset(range(min(len(test), max_test_samples)))
    return TaskData(train_all.subset(sorted(train_idx)), train_all.subset(sorted(dev_idx)), test, source)


def load_config_data(config: Config, spec: TaskSpec, seed: int | None = None) -> TaskData:
    """:func:`load_task_data` with ``config.data``'s settings; the dev split is carved with
    ``seed`` (default: ``config.seed``)."""
    return load_task_data(
        spec,
        data_dir=config.data.data_dir,
        dev_fraction=config.data.dev_fraction,
        seed=config.seed if seed is None else seed,
        max_train_samples=config.data.max_train_samples,
        max_test_samples=config.data.max_test_samples,
    )
