"""The checkpoint directory format: the one module that lays out, verifies and publishes
checkpoint folders (stages hand it a function that writes their model files).

Layout of a workspace (default ``./runs``)::

    runs/<task>/<stage>-v<N>/
        config.json, model.safetensors, tokenizer files   (HF format; or model.onnx for ONNX stages)
        README.md                                         (model card with HF front matter)
        tinycompress.yaml                                 (manifest, written last)

The manifest records the format version, stage, version, parent folder and the sha256 of the
parent's manifest, the resolved config, metrics, the sha256 of every file, library versions and
the seed. Folders are written under a hidden temporary name and renamed into place, so a killed
process never leaves a folder that looks complete; versions are never overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from tinycompress.checkpoint.format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MODEL_CARD_FILE,
    MODEL_FILE_SUFFIXES,
    STAGE_DIR_PATTERN,
    task_dir,
)
from tinycompress.errors import TinycompressError
from tinycompress.stage_graph import producing_command


@dataclass
class Measured:
    """What a stage's ``write_files`` may return (see :func:`write_checkpoint`): metrics and
    details measured on the files it has just written. Quantize and export measure the
    artifact itself, so these exist only once the files do."""

    metrics: dict[str, Any]
    details: dict[str, Any]


@dataclass
class Checkpoint:
    """A verified checkpoint folder and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics") or {}

    @property
    def details(self) -> dict[str, Any]:
        return self.manifest.get("details") or {}

    @property
    def config(self):
        from tinycompress.config import config_from_dict

        return config_from_dict(self.manifest["config"])

    @property
    def model_bytes(self) -> int:
        """Size on disk of the model's weight / graph files (tokenizer and config excluded)."""
        recorded = self.manifest.get("model_bytes")
        # Manifests written before the field existed: the same sum, from the verified files.
        return recorded if recorded is not None else size_bytes(model_files(self.path))

    @property
    def name(self) -> str:
        return self.path.name

    def parent(self) -> Checkpoint | None:
        parent = self.manifest.get("parent")
        if not parent:
            return None
        found = read_checkpoint((self.path.parent / parent["path"]).resolve())
        if sha256_file(found.path / MANIFEST_NAME) != parent["manifest_sha256"]:
            raise TinycompressError(
                f"{self.path}: its parent {found.path} changed after it was written (manifest sha256 differs)",
                f"re-run `{producing_command(self.stage, self.task)}` from the current parent",
            )
        return found

    def made_from(self, parent: Checkpoint | None) -> bool:
        """Whether this checkpoint was written from ``parent`` as it is now (same folder, same
        manifest sha256); with ``parent`` None, whether it has no parent. Reads only manifests."""
        link = self.manifest.get("parent")
        if parent is None:
            return not link
        if not isinstance(link, dict) or not link.get("path"):
            return False
        linked = (self.path.parent / str(link["path"])).resolve()
        return linked == parent.path.resolve() and link.get("manifest_sha256") == sha256_file(
            parent.path / MANIFEST_NAME
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def size_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def model_files(folder: Path) -> list[Path]:
    return [p for p in _files_under(folder) if p.name.endswith(MODEL_FILE_SUFFIXES)]


def library_versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("tinycompress", "torch", "transformers", "onnx", "onnxruntime"):
        with contextlib.suppress(metadata.PackageNotFoundError):  # optional runtimes
            versions[package] = metadata.version(package)
    return versions


def read_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    """A checkpoint with its manifest checked (format version, files and their sha256)."""
    path = Path(path)
    if not path.is_dir():
        raise TinycompressError(
            f"checkpoint folder not found: {path}", "pass an existing checkpoint folder (see `ls runs/<task>/`)"
        )
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise TinycompressError(
            f"{path} is not a tinycompress checkpoint (no {MANIFEST_NAME})",
            "pass a folder written by a tinycompress stage, e.g. runs/sst2/finetune-v1",
        )
    try:
        manifest = yaml.safe_load(manifest_path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        manifest = None
    required = ("format_version", "stage", "task", "version", "files", "config")
    if not isinstance(manifest, dict) or any(k not in manifest for k in required):
        raise TinycompressError(
            f"{manifest_path} is corrupt (not a valid manifest)", "delete the folder and re-run the stage that wrote it"
        )
    task, stage = manifest["task"], manifest["stage"]
    if manifest["format_version"] != FORMAT_VERSION:
        raise TinycompressError(
            f"{path} has checkpoint format {manifest['format_version']}; this tinycompress reads format {FORMAT_VERSION}",
            f"re-run `{producing_command(stage, task)}` with this version",
        )
    if verify:
        # A file the manifest does not list was not written by the stage: refuse it rather than
        # let a loader pick it up (a stray TorchScript pickle, say).
        unlisted = sorted(
            name for name in (str(p.relative_to(path)) for p in _files_under(path)) if name not in manifest["files"]
        )
        if unlisted:
            raise TinycompressError(
                f"{path}: file {unlisted[0]} is not listed in the manifest",
                f"remove it, or re-run `{producing_command(stage, task)}` to write a new checkpoint",
            )
        for name, digest in manifest["files"].items():
            file = path / name
            if not file.is_file():
                raise TinycompressError(
                    f"{path}: file {name} listed in the manifest is missing",
                    f"re-run `{producing_command(stage, task)}` to write a new checkpoint",
                )
            if sha256_file(file) != digest:
                raise TinycompressError(
                    f"{path}: {name} is corrupt (sha256 differs from the manifest)",
                    f"re-run `{producing_command(stage, task)}` to write a new checkpoint",
                )
    return Checkpoint(path, manifest)


def _model_card(task: str, stage: str, version: int, base_model: str, metrics: dict[str, Any]) -> str:
    metric_names = sorted({k.split("/")[-1] for k in metrics if k.startswith("test/")})
    front = {
        "base_model": base_model,
        "datasets": ["nyu-mll/glue"],
        "metrics": metric_names,
        "pipeline_tag": "text-classification",
        "library_name": "transformers",
        "tags": ["tinycompress", stage, task],
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {task} · {stage}-v{version}",
        "",
        f"Written by `tinycompress {stage}`. Test metrics are on the GLUE validation set "
        "(GLUE test labels are hidden).",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    lines += ["", f"Provenance, config and file checksums: `{MANIFEST_NAME}`.", ""]
    return "\n".join(lines)


def write_checkpoint(
    workdir: str | Path,
    task: str,
    stage: str,
    write_files: Callable[[Path], Measured | None],
    *,
    config,
    seed: int,
    metrics: dict[str, Any] | None = None,
    parent: Checkpoint | None = None,
    base_model: str | None = None,
    details: dict[str, Any] | None = None,
    destination: str | Path | None = None,
) -> Checkpoint:
    """Write a new ``<stage>-v<N>`` folder atomically and return it, verified.

    ``write_files(tmp_dir)`` puts the model files in a temporary folder; a stage that measures
    what it wrote there returns a :class:`Measured`, whose metrics and details are added to
    ``metrics`` and ``details``. The model card and manifest are added, then the folder is
    renamed into place. Any failure or Ctrl-C removes the temporary folder and leaves earlier
    versions as they were.

    ``destination`` (e.g. ``tinycompress export --output DIR``) replaces
    ``<workdir>/<task>/<stage>-v<N>``: it must not exist, the temporary folder is made beside
    it, and the manifest says version 1.
    """
    if destination is not None:
        destination = Path(destination)
        _refuse_existing(destination)
    root = task_dir(workdir, task) if destination is None else destination.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_orphaned_temporaries(root)
    # The writer's pid is in the name, so a folder left by a killed process can be told apart
    # from one another live process is still writing.
    tmp = root / f".tmp-{stage}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        measured = write_files(tmp)
        if isinstance(measured, Measured):
            metrics, details = {**(metrics or {}), **measured.metrics}, {**(details or {}), **measured.details}
        manifest = _new_manifest(
            task,
            stage,
            root,
            config=config,
            metrics=metrics,
            seed=seed,
            parent=parent,
            base_model=base_model,
            details=details,
        )
        if destination is not None:
            _seal(tmp, manifest, version=1)
            _refuse_existing(destination)  # rename would silently replace an empty folder made meanwhile
            os.rename(tmp, destination)
            return read_checkpoint(destination)
        version = _next_version(root, stage)
        for _attempt in range(100):
            _seal(tmp, manifest, version)
            final = root / f"{stage}-v{version}"
            try:
                # rename refuses to replace a non-empty folder: another process took this version.
                os.rename(tmp, final)
                return read_checkpoint(final)
            except OSError:
                if not final.exists():
                    raise
                version += 1
        raise TinycompressError(f"could not find a free {stage}-v<N> name in {root}", "remove stray folders there")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_TEMPORARY = re.compile(r"^\.tmp-[a-z]+-(?P<pid>\d+)-[0-9a-f]+$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _remove_orphaned_temporaries(root: Path) -> None:
    """Delete temporary folders whose writing process is gone (killed mid-write, e.g. SIGKILL)."""
    for child in root.iterdir():
        match = _TEMPORARY.match(child.name)
        if match and child.is_dir() and not _pid_alive(int(match["pid"])):
            shutil.rmtree(child, ignore_errors=True)


def _new_manifest(
    task: str, stage: str, root: Path, *, config, metrics, seed, parent, base_model, details
) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "task": task,
        "version": 0,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": base_model or (parent.manifest.get("base_model") if parent else None) or "unknown",
        "parent": None,
        "seed": seed,
        "metrics": metrics or {},
        "details": details or {},
        "config": config.to_dict(),
        "versions": library_versions(),
    }
    if parent is not None:
        # Relative to the task folder, so a workspace can be moved or copied whole.
        parent_rel = os.path.relpath(parent.path.resolve(), root.resolve())
        manifest["parent"] = {
            "path": parent_rel,
            "stage": parent.stage,
            "manifest_sha256": sha256_file(parent.path / MANIFEST_NAME),
        }
    return manifest


def _seal(folder: Path, manifest: dict[str, Any], version: int) -> None:
    """Add the model card, then the manifest (checksums of everything else) as the last file."""
    manifest["version"] = version
    (folder / MODEL_CARD_FILE).write_text(
        _model_card(manifest["task"], manifest["stage"], version, manifest["base_model"], manifest["metrics"]),
        encoding="utf-8",
    )
    files = _files_under(folder)
    manifest["files"] = {str(p.relative_to(folder)): sha256_file(p) for p in files}
    manifest["size_bytes"] = size_bytes(files)
    manifest["model_bytes"] = size_bytes(model_files(folder))
    (folder / MANIFEST_NAME).write_text(yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _next_version(root: Path, stage: str) -> int:
    """One past the highest ``<stage>-v<N>`` name in ``root``, complete or not, so a folder left
    without a manifest is never a rename target."""
    numbers = [
        int(m["version"])
        for m in (STAGE_DIR_PATTERN.match(c.name) for c in root.iterdir())
        if m and m["stage"] == stage
    ]
    return max(numbers, default=0) + 1


def _refuse_existing(destination: Path) -> None:
    if destination.exists():
        raise TinycompressError(
            f"output folder {destination} already exists", "pass a new folder to --output, or remove it first"
        )
