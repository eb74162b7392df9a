"""Rows whose artifacts are byte-identical (a quantize folder's model.onnx and its ONNX export):
shown once, the first row naming the others."""

from __future__ import annotations

from tinycompress.checkpoint.format import INT8_RECIPE_FILE, MODEL_CONFIG_FILE, MODEL_FILE_SUFFIXES
from tinycompress.checkpoint.store import Checkpoint
from tinycompress.report.rows import Row


def _artifact_digests(row: Row, checkpoint: Checkpoint) -> tuple[str, ...] | None:
    """The sha256 (from the manifest's ``files``) of the bytes that make up ``row``'s model.

    An export row is its file and any external-data sibling; a checkpoint row is its model
    files (ONNX graphs, safetensors), plus config.json and the int8 recipe when the weights are
    safetensors (the architecture is read from them). None when the manifest lists none.
    """
    files = checkpoint.manifest.get("files")
    if not isinstance(files, dict):
        return None
    if row.artifact is not None:
        names = [n for n in files if n == row.artifact or (n.startswith(row.artifact + ".") and n.endswith(".data"))]
        if row.artifact not in names:
            return None
    else:
        names = [n for n in files if n.endswith(MODEL_FILE_SUFFIXES)]
        if any(n.endswith(".safetensors") for n in names):
            names += [n for n in (MODEL_CONFIG_FILE, INT8_RECIPE_FILE) if n in files]
    return tuple(sorted(str(files[n]) for n in names)) or None


def merge_identical(rows: list[Row], checkpoints: list[Checkpoint]) -> list[tuple[Row, Row]]:
    """Drop every row whose model is byte-identical to an earlier row's, in place.

    Identity is the sha256 recorded in the manifests (e.g. an ONNX quantize folder's
    ``model.onnx`` and its export's copy); only identical bytes count. The first row stays and
    names the dropped ones in ``same_file_as`` and its notes. Returns (kept, dropped) pairs.
    """
    by_name = {c.name: c for c in checkpoints}
    first: dict[tuple[str, ...], Row] = {}
    pairs: list[tuple[Row, Row]] = []
    for row in list(rows):
        checkpoint = by_name.get(row.checkpoint) if row.status == "ok" and row.checkpoint else None
        digests = _artifact_digests(row, checkpoint) if checkpoint is not None else None
        if digests is None:
            continue
        kept = first.setdefault(digests, row)
        if kept is row:
            continue
        rows.remove(row)
        kept.same_file_as.append(row.where)
        kept.notes.append(f"{row.where} ({row.label}) is the same file (identical sha256): shown once, as this row")
        pairs.append((kept, row))
    return pairs
