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

import hashlib
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import TinycompressError

FORMAT_VERSION = 1
MANIFEST_NAME = "tinycompress.yaml"
STAGES = ("finetune", "prune", "quantize", "export")
# The stage whose newest checkpoint a stage takes when given no input path.
PARENT_STAGE = {"prune": ("finetune",), "quantize": ("prune",), "export": ("quantize", "prune", "finetune")}
# ``details`` flag of a checkpoint made only for comparison (``tinycompress run``'s unpruned int8
# baselines): never taken as the default parent of a later stage or the end of the newest chain.
BASELINE_FLAG = "baseline"
_STAGE_DIR = re.compile(r"^(?P<stage>[a-z]+)-v(?P<version>\d+)$")


def producing_command(stage: str, task: str | None) -> str:
    task_flag = f" --task {task}" if task else ""
    return {
        "finetune": f"tinycompress finetune{task_flag}",
        "prune": f"tinycompress prune{task_flag} --ratio 0.5",
        "quantize": f"tinycompress quantize{task_flag}",
        "export": f"tinycompress export{task_flag}",
    }.get(stage, f"tinycompress {stage}{task_flag}")


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
        from .config import config_from_dict

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

    def parent(self) -> "Checkpoint | None":
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

    def made_from(self, parent: "Checkpoint | None") -> bool:
        """Whether this checkpoint was written from ``parent`` as it is now (same folder, same
        manifest sha256); with ``parent`` None, whether it has no parent. Reads only manifests."""
        link = self.manifest.get("parent")
        if parent is None:
            return not link
        if not isinstance(link, dict) or not link.get("path"):
            return False
        linked = (self.path.parent / str(link["path"])).resolve()
        return linked == parent.path.resolve() and link.get("manifest_sha256") == sha256_file(parent.path / MANIFEST_NAME)


# ------------------------------------------------------------------------------ hashing & sizes


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


# Files that make up a model's weights and graph; "size on disk" in the report is their sum
# (tokenizer files, configs and the model card are the same for every version and left out).
MODEL_FILE_SUFFIXES = (".safetensors", ".onnx", ".data", ".pt")


def model_files(folder: Path) -> list[Path]:
    return [p for p in _files_under(folder) if p.name.endswith(MODEL_FILE_SUFFIXES)]


def library_versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("tinycompress", "torch", "transformers", "onnx", "onnxruntime"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


# ------------------------------------------------------------------------------ the workspace


def task_dir(workdir: str | Path, task: str) -> Path:
    return Path(workdir) / task


def stage_versions(workdir: str | Path, task: str, stage: str) -> list[tuple[int, Path]]:
    """Completed ``<stage>-v<N>`` folders of a task, oldest first (temporary folders skipped)."""
    root = task_dir(workdir, task)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STAGE_DIR.match(child.name)
            if match and match["stage"] == stage and (child / MANIFEST_NAME).is_file():
                found.append((int(match["version"]), child))
    return sorted(found)


def latest_task(workdir: str | Path) -> str | None:
    """The task whose newest checkpoint was written last."""
    newest: tuple[float, str] | None = None
    root = Path(workdir)
    if not root.is_dir():
        return None
    for manifest in root.glob(f"*/*/{MANIFEST_NAME}"):
        if _STAGE_DIR.match(manifest.parent.name):
            stamp = manifest.stat().st_mtime
            if newest is None or stamp > newest[0]:
                newest = (stamp, manifest.parent.parent.name)
    return newest[1] if newest else None


def is_baseline(manifest: dict[str, Any]) -> bool:
    details = manifest.get("details")
    return isinstance(details, dict) and bool(details.get(BASELINE_FLAG))


def newest_in_chain(workdir: str | Path, task: str, stage: str) -> Path | None:
    """The newest ``stage`` folder of a task that is not a baseline (see :data:`BASELINE_FLAG`).

    Folders whose manifest cannot be read count: reading them later gives the real error.
    """
    for _, folder in reversed(stage_versions(workdir, task, stage)):
        try:
            if is_baseline(read_checkpoint(folder, verify=False).manifest):
                continue
        except TinycompressError:
            pass
        return folder
    return None


def resolve_input(explicit: str | Path | None, *, workdir: str | Path, task: str | None, stage: str) -> Checkpoint:
    """The checkpoint a stage starts from: the explicit path, else the newest parent-stage folder
    that is not a baseline."""
    if explicit is not None:
        return read_checkpoint(explicit)
    wanted = PARENT_STAGE[stage]
    task = task or latest_task(workdir)
    if task is None:
        raise TinycompressError(
            f"no checkpoints in workspace '{workdir}'",
            f"run `{producing_command(wanted[-1] if stage == 'export' else wanted[0], None)} --task sst2` first, or pass a checkpoint path",
        )
    for parent_stage in wanted:
        newest = newest_in_chain(workdir, task, parent_stage)
        if newest is not None:
            return read_checkpoint(newest)
    raise TinycompressError(
        f"no {' or '.join(wanted)} checkpoint for task {task} in '{workdir}'",
        f"run `{producing_command(wanted[0], task)}` first, or pass a checkpoint path",
    )


# ------------------------------------------------------------------------------ reading


def read_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    """A checkpoint with its manifest checked (format version, files and their sha256)."""
    path = Path(path)
    if not path.is_dir():
        raise TinycompressError(f"checkpoint folder not found: {path}", "pass an existing checkpoint folder (see `ls runs/<task>/`)")
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
        raise TinycompressError(f"{manifest_path} is corrupt (not a valid manifest)", "delete the folder and re-run the stage that wrote it")
    task, stage = manifest["task"], manifest["stage"]
    if manifest["format_version"] != FORMAT_VERSION:
        raise TinycompressError(
            f"{path} has checkpoint format {manifest['format_version']}; this tinycompress reads format {FORMAT_VERSION}",
            f"re-run `{producing_command(stage, task)}` with this version",
        )
    if verify:
        # A file the manifest does not list was not written by the stage: refuse it rather than
        # let a loader pick it up (a stray TorchScript pickle, say).
        unlisted = sorted(name for name in (str(p.relative_to(path)) for p in _files_under(path)) if name not in manifest["files"])
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


# ------------------------------------------------------------------------------ writing


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
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {task} · {stage}-v{version}", "",
             f"Written by `tinycompress {stage}`. Test metrics are on the GLUE validation set "
             "(GLUE test labels are hidden).", "", "| metric | value |", "|---|---|"]
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
        manifest = _new_manifest(task, stage, root, config=config, metrics=metrics, seed=seed, parent=parent, base_model=base_model, details=details)
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


def _new_manifest(task: str, stage: str, root: Path, *, config, metrics, seed, parent, base_model, details) -> dict[str, Any]:
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
        manifest["parent"] = {"path": parent_rel, "stage": parent.stage, "manifest_sha256": sha256_file(parent.path / MANIFEST_NAME)}
    return manifest


def _seal(folder: Path, manifest: dict[str, Any], version: int) -> None:
    """Add the model card, then the manifest (checksums of everything else) as the last file."""
    manifest["version"] = version
    (folder / "README.md").write_text(
        _model_card(manifest["task"], manifest["stage"], version, manifest["base_model"], manifest["metrics"]), encoding="utf-8"
    )
    files = _files_under(folder)
    manifest["files"] = {str(p.relative_to(folder)): sha256_file(p) for p in files}
    manifest["size_bytes"] = size_bytes(files)
    manifest["model_bytes"] = size_bytes(model_files(folder))
    (folder / MANIFEST_NAME).write_text(yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _next_version(root: Path, stage: str) -> int:
    """One past the highest ``<stage>-v<N>`` name in ``root``, complete or not, so a folder left
    without a manifest is never a rename target."""
    numbers = [int(m["version"]) for m in (_STAGE_DIR.match(c.name) for c in root.iterdir()) if m and m["stage"] == stage]
    return max(numbers, default=0) + 1


def _refuse_existing(destination: Path) -> None:
    if destination.exists():
        raise TinycompressError(f"output folder {destination} already exists", "pass a new folder to --output, or remove it first")


# ------------------------------------------------------------------------------ models


def save_tokenizer(directory: Path, tokenizer, max_length: int) -> None:
    """The tokenizer files, with ``model_max_length`` set to the length the model was measured
    with, so plain ``AutoTokenizer(..., truncation=True)`` users truncate the same way."""
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(directory)


def save_config_and_tokenizer(directory: Path, model_config, tokenizer, max_length: int) -> None:
    """``config.json`` (labels, architecture, pruned structure) and the tokenizer files: what a
    folder holding an ONNX graph or int8 weights needs besides them to be loaded and run."""
    model_config.save_pretrained(directory)
    save_tokenizer(directory, tokenizer, max_length)


def save_hf_model(directory: Path, model, tokenizer, max_length: int) -> None:
    """HF-format weights (safetensors), config and tokenizer files."""
    model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(directory, tokenizer, max_length)


def load_hf_model(checkpoint: Checkpoint):
    """(model, tokenizer) from a PyTorch checkpoint, in eval mode, shapes rebuilt if pruned.

    Weights come from safetensors only; never from pickles.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = checkpoint.path
    if not (path / "model.safetensors").is_file():
        raise TinycompressError(
            f"{path} holds no PyTorch weights (model.safetensors); it is a {checkpoint.stage} checkpoint",
            "pass a finetune or prune checkpoint",
        )
    config = AutoConfig.from_pretrained(path)
    structure = getattr(config, "tinycompress_pruning", None)
    if structure:
        # Pruned layers have shapes config.json alone cannot express: build the full model,
        # shrink it to the recorded structure, then load the weights strictly.
        from safetensors.torch import load_file

        from .pruning import apply_structure_

        model = AutoModelForSequenceClassification.from_config(config)
        apply_structure_(model, structure)
        state = load_file(path / "model.safetensors")
        missing, unexpected = model.load_state_dict(state, strict=False)
        persistent_missing = [k for k in missing if not k.endswith("position_ids")]
        if persistent_missing or unexpected:
            raise TinycompressError(f"{path}: weights do not match the recorded structure ({(persistent_missing + unexpected)[:3]})", "re-run the prune stage")
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)
