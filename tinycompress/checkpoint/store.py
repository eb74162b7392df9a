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
import json
import os
import shlex
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tinycompress.checkpoint.format import (
    COMMAND_KEY,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MODEL_CARD_FILE,
    MODEL_FILE_SUFFIXES,
    READABLE_FORMAT_VERSIONS,
    SELF_CHECKSUM_KEY,
    STAGE_DIR_PATTERN,
    Manifest,
    manifest_digest,
    task_dir,
)
from tinycompress.checkpoint.model_card import model_card
from tinycompress.checkpoint.temporaries import remove_orphaned_temporaries, temporary_path
from tinycompress.console import log_to_stderr
from tinycompress.errors import TinycompressError
from tinycompress.stage_graph import producing_command
from tinycompress.text_files import read_text


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
        folder = (self.path.parent / parent["path"]).resolve()
        # Compared before the parent is read, so an edited parent is reported as a changed parent.
        if (folder / MANIFEST_NAME).is_file() and sha256_file(folder / MANIFEST_NAME) != parent["manifest_sha256"]:
            raise TinycompressError(
                f"{self.path}: its parent {folder} changed after it was written (manifest sha256 differs)",
                f"re-run `{remake_command(self.manifest)}` from the current parent",
            )
        return read_checkpoint(folder)

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


def remake_command(manifest: dict[str, Any]) -> str:
    """The command that made a checkpoint, for hints: the command line its manifest recorded
    (format 2, when made from the command line), else the stage's usual command."""
    recorded = manifest.get(COMMAND_KEY)
    if isinstance(recorded, str) and recorded.strip():
        return recorded
    return producing_command(str(manifest.get("stage", "")), manifest.get("task"))


def _corrupt_manifest(manifest_path: Path, why: str) -> TinycompressError:
    return TinycompressError(
        f"{manifest_path} is corrupt ({why})", "delete the folder and re-run the stage that wrote it"
    )


def _load_manifest(manifest_path: Path) -> dict[str, Any]:
    """The manifest as a dict whose fields have the types :class:`Manifest` declares."""
    text = read_text(manifest_path, what="manifest")
    try:
        manifest = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError):
        # PyYAML raises more than YAMLError on hostile input (bad dates, deep nesting).
        raise _corrupt_manifest(manifest_path, "not valid YAML") from None
    if not isinstance(manifest, dict):
        raise _corrupt_manifest(manifest_path, "not a mapping of manifest keys")
    _check_shape(manifest, manifest_path)
    try:
        Manifest.model_validate(manifest)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        raise _corrupt_manifest(manifest_path, f"{where}: {problem['msg']}") from None
    except RecursionError:
        raise _corrupt_manifest(manifest_path, "nested too deeply") from None
    return manifest


# A manifest is a few levels deep (details -> mask_tuning -> layers -> ...) and a few thousand
# values at most; YAML aliases can make a small file a cycle or an exponential tree.
_MANIFEST_MAX_DEPTH = 64
_MANIFEST_MAX_VALUES = 1_000_000


def _check_shape(manifest: dict[str, Any], manifest_path: Path) -> None:
    """Refuse nesting (or an alias cycle) deeper than :data:`_MANIFEST_MAX_DEPTH` and absurd sizes,
    walking without recursion, before anything recursive (validation, the digest) runs."""
    pending: list[tuple[Any, int]] = [(manifest, 1)]
    seen = 0
    while pending:
        node, depth = pending.pop()
        seen += 1
        if depth > _MANIFEST_MAX_DEPTH or seen > _MANIFEST_MAX_VALUES:
            raise _corrupt_manifest(manifest_path, "nested too deeply or too large")
        if isinstance(node, dict):
            pending.extend((value, depth + 1) for value in node.values())
        elif isinstance(node, list):
            pending.extend((value, depth + 1) for value in node)


# Folders already said to predate the self-checksum (said once per process, not on every read).
_SAID_UNSEALED: set[Path] = set()


def read_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    """A checkpoint with its manifest checked: its types, its own checksum (format 2), the
    format version, and (``verify``) every file and its sha256."""
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
    manifest = _load_manifest(manifest_path)
    task, stage, remake = manifest["task"], manifest["stage"], remake_command(manifest)
    if manifest["format_version"] not in READABLE_FORMAT_VERSIONS:
        raise TinycompressError(
            f"{path} has checkpoint format {manifest['format_version']}; this tinycompress reads formats "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}",
            f"re-run `{producing_command(stage, task)}` with this version",
        )
    if manifest["format_version"] >= 2:
        if manifest.get(SELF_CHECKSUM_KEY) != manifest_digest(manifest):
            raise TinycompressError(
                f"{manifest_path} was edited after it was written (its {SELF_CHECKSUM_KEY} does not match its content)",
                f"restore the file, or re-run `{remake}` to write a new checkpoint",
            )
    elif path.resolve() not in _SAID_UNSEALED:
        _SAID_UNSEALED.add(path.resolve())
        log_to_stderr(
            f"note: {path} has checkpoint format 1, which predates the manifest's own checksum: "
            "its metrics and config cannot be verified (its files can)"
        )
    unsafe = [name for name in manifest["files"] if Path(name).is_absolute() or ".." in Path(name).parts]
    if unsafe:
        raise _corrupt_manifest(manifest_path, f"file name {unsafe[0]} points outside the folder")
    if verify:
        # A file the manifest does not list was not written by the stage: refuse it rather than
        # let a loader pick it up (a stray TorchScript pickle, say).
        unlisted = sorted(
            name for name in (str(p.relative_to(path)) for p in _files_under(path)) if name not in manifest["files"]
        )
        if unlisted:
            raise TinycompressError(
                f"{path}: file {unlisted[0]} is not listed in the manifest",
                f"remove it, or re-run `{remake}` to write a new checkpoint",
            )
        for name, digest in manifest["files"].items():
            file = path / name
            if not file.is_file():
                raise TinycompressError(
                    f"{path}: file {name} listed in the manifest is missing",
                    f"re-run `{remake}` to write a new checkpoint",
                )
            if sha256_file(file) != digest:
                raise TinycompressError(
                    f"{path}: {name} is corrupt (sha256 differs from the manifest)",
                    f"re-run `{remake}` to write a new checkpoint",
                )
            if name.endswith(".safetensors"):
                check_safetensors_file(file, remake)
    return Checkpoint(path, manifest)


# A safetensors file starts with the byte length of its JSON header (little-endian u64).
_SAFETENSORS_MAX_HEADER = 100 << 20


def check_safetensors_file(file: Path, remake: str | None = None) -> None:
    """Refuse a file named ``*.safetensors`` that is not one (a checksum only says it is the
    file that was listed), before a loader fails on it without naming it."""
    fix = f"re-run `{remake}` to write a new checkpoint" if remake else "pass a folder with a valid safetensors file"
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= length <= min(size - 8, _SAFETENSORS_MAX_HEADER):
            raise TinycompressError(f"{file} is not a safetensors file (no valid header)", fix)
        header = handle.read(length)
    try:
        parsed = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        raise TinycompressError(f"{file} is not a safetensors file (its header is not a JSON object)", fix)


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
    remove_orphaned_temporaries(root)
    tmp = temporary_path(root, stage)
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


# The command line of this process when it runs as the CLI (see :func:`record_command_line`).
_command_line: str | None = None


def record_command_line(argv: list[str]) -> None:
    """Remember the command line (``["tinycompress", "prune", ...]``) so the manifests this process
    writes can say what made them, and error hints can say how to make them again."""
    global _command_line
    _command_line = shlex.join(argv)


def _file_mode() -> int:
    """rw-r--r-- under the usual umask: what a plain ``open(..., "w")`` gives."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _seal(folder: Path, manifest: dict[str, Any], version: int) -> None:
    """Add the model card, then the manifest (checksums of everything else, then its own) as the last file."""
    manifest["version"] = version
    (folder / MODEL_CARD_FILE).write_text(
        model_card(manifest["task"], manifest["stage"], version, manifest["base_model"], manifest["metrics"]),
        encoding="utf-8",
    )
    files = _files_under(folder)
    # Some writers (safetensors, tempfile) create files 0600; a checkpoint's files are all alike.
    mode = _file_mode()
    for file in files:
        os.chmod(file, mode)
    manifest["files"] = {str(p.relative_to(folder)): sha256_file(p) for p in files}
    manifest["size_bytes"] = size_bytes(files)
    manifest["model_bytes"] = size_bytes(model_files(folder))
    if _command_line is not None:
        manifest[COMMAND_KEY] = _command_line
    manifest.pop(SELF_CHECKSUM_KEY, None)
    text = yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True)
    # The checksum covers the content as it will be read back, so anything YAML does not keep
    # exactly would show up here rather than as a false "edited" later.
    manifest[SELF_CHECKSUM_KEY] = manifest_digest(yaml.safe_load(text))
    (folder / MANIFEST_NAME).write_text(
        text + f"{SELF_CHECKSUM_KEY}: {manifest[SELF_CHECKSUM_KEY]}\n", encoding="utf-8"
    )


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
