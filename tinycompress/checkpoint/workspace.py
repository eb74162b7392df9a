"""The workspace: versions of a task's stage folders, the newest one, a stage's input, reuse, chains and baselines."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinycompress.checkpoint.format import BASELINE_FLAG, MANIFEST_NAME, STAGE_DIR_PATTERN, task_dir
from tinycompress.checkpoint.store import Checkpoint, read_checkpoint
from tinycompress.config import Config, load_config, read_yaml
from tinycompress.console import log_to_stderr
from tinycompress.errors import TinycompressError
from tinycompress.stage_graph import STAGE_ORDER, STAGES, producing_command


def stage_versions(workdir: str | Path, task: str, stage: str) -> list[tuple[int, Path]]:
    """Completed ``<stage>-v<N>`` folders of a task, oldest first (temporary folders skipped)."""
    root = task_dir(workdir, task)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = STAGE_DIR_PATTERN.match(child.name)
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
        if STAGE_DIR_PATTERN.match(manifest.parent.name):
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
    wanted = STAGES[stage].default_parents
    task = task or latest_task(workdir)
    if task is None:
        raise TinycompressError(
            f"no checkpoints in workspace '{workdir}'",
            # The earliest stage it can start from (for export, the fine-tune).
            f"run `{producing_command(min(wanted, key=STAGE_ORDER.index), None)} --task sst2` first, or pass a checkpoint path",
        )
    for parent_stage in wanted:
        newest = newest_in_chain(workdir, task, parent_stage)
        if newest is not None:
            return read_checkpoint(newest)
    raise TinycompressError(
        f"no {' or '.join(wanted)} checkpoint for task {task} in '{workdir}'",
        f"run `{producing_command(wanted[0], task)}` first, or pass a checkpoint path",
    )


def find_parent(
    stage: str,
    explicit: str | Path | None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Checkpoint:
    """The checkpoint ``stage`` starts from: ``explicit``, else the task's newest parent-stage folder.

    The flags are validated first (without a base), so ``--ratio 1.5`` reports the ratio rather
    than a missing checkpoint. The task is the one asked for (flag or config file), else the
    workspace's most recent one.
    """
    overrides = overrides or {}
    flags = load_config(config_file, overrides)
    asked_task = overrides.get("task") or (read_yaml(config_file).get("task") if config_file else None)
    return resolve_input(explicit, workdir=flags.workdir, task=asked_task, stage=stage)


def parent_base(parent: Checkpoint, stage: str) -> dict[str, Any]:
    """The parent's resolved config, to build ``stage``'s config on (``load_config(base=...)``).

    Everything carries over, except that a parent of the same stage (a prune of a prune) does
    not pass on its own section, so its ratio is not silently applied again. The workdir becomes
    the parent's workspace, so the new folder lands beside its parent unless --workdir is given.
    """
    base = copy.deepcopy(parent.manifest["config"])
    if parent.stage == stage:
        base.pop(stage, None)
    base["workdir"] = str(parent.path.resolve().parent.parent)
    return base


def check_parent(stage: str, parent: Checkpoint, config: Config) -> None:
    """Refuse a parent ``stage`` cannot start from, or one of another task, before any work."""
    accepted = STAGES[stage].parents
    if parent.stage not in accepted:
        already = {"quantize": " (already quantized)", "export": " (already exported)"}.get(parent.stage, "")
        raise TinycompressError(
            f"{parent.path} is {'an' if parent.stage[0] in 'aeiou' else 'a'} {parent.stage} checkpoint{already}; {stage} needs a {' or '.join(accepted)} checkpoint",
            f"pass a {accepted[-1]}-v<N> folder, e.g. {parent.path.parent / (accepted[-1] + '-v1')}",
        )
    if parent.task != config.task:
        raise TinycompressError(
            f"{parent.path} was trained for task {parent.task}, not {config.task}",
            f"drop --task, or pass a {config.task} checkpoint",
        )


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    """``config["a"]["b"]`` for ``"a.b"``; None where a level is missing."""
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _normalised(config: dict[str, Any], sections: tuple[str, ...]) -> dict[str, Any]:
    """The named sections of a config dict, with paths made absolute so that `../data` and
    `/abs/data` compare equal whatever folder the command ran from."""
    picked = {name: _lookup(config, name) for name in sections}
    data = dict(picked.get("data") or {})
    if data.get("data_dir"):
        data["data_dir"] = str(Path(data["data_dir"]).expanduser().resolve())
    if "data" in picked:
        picked["data"] = data
    model = dict(picked.get("model") or {})
    name = model.get("name")
    if name and Path(name).expanduser().exists():
        model["name"] = str(Path(name).expanduser().resolve())
    if "model" in picked:
        picked["model"] = model
    return picked


def stage_fingerprint(
    stage: str, config: Config | dict[str, Any], sections: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """The part of ``config`` that must match for an existing ``stage`` checkpoint to be reused
    (``sections``, default the stage's ``fingerprint`` in :data:`~tinycompress.stage_graph.STAGES`)."""
    if not isinstance(config, Config):
        # A manifest's config, resolved when it was written: validated again so that a key the
        # schema gained since (with its default) does not make an old checkpoint look different.
        try:
            config = Config.model_validate(config)
        except ValueError:
            return _normalised(config, sections or STAGES[stage].fingerprint)
    data = config.to_dict()
    # Compare the distillation rate used, not how it was given: unset, it is the fine-tune's.
    data["prune"]["recover_learning_rate"] = config.recover_learning_rate
    return _normalised(data, sections or STAGES[stage].fingerprint)


def find_reusable(
    stage: str,
    config: Config,
    parent: Checkpoint | None,
    log: Callable[[str], None] = log_to_stderr,
    sections: tuple[str, ...] | None = None,
) -> Checkpoint | None:
    """The newest ``stage`` checkpoint of ``config.task`` in ``config.workdir`` made from ``parent``
    with the same :func:`stage_fingerprint` (over ``sections``); None when there is none.

    Manifests are compared first (cheap); the match is then verified (file checksums), and a
    corrupt one is skipped with a message rather than reused.
    """
    wanted = stage_fingerprint(stage, config, sections)
    for _, folder in reversed(stage_versions(config.workdir, config.task, stage)):
        try:
            candidate = read_checkpoint(folder, verify=False)
        except TinycompressError:
            continue
        if (
            not candidate.made_from(parent)
            or stage_fingerprint(stage, candidate.manifest.get("config") or {}, sections) != wanted
        ):
            continue
        try:
            return read_checkpoint(folder)
        except TinycompressError as exc:
            log(f"not reusing {folder}: {exc.problem}")
    return None


def _stage_dirs(folder: Path) -> bool:
    return any(stage_versions(folder.parent, folder.name, stage) for stage in STAGE_ORDER)


def locate(
    target: str | Path | None = None, *, workdir: str | Path = "runs", task: str | None = None
) -> tuple[Path, str, Checkpoint | None]:
    """(workspace, task, explicit chain end or None) for a report target.

    ``target`` may be a checkpoint folder (the chain ends there), a task folder (``runs/sst2``)
    or a workspace (``runs``); without it, ``workdir`` and ``task`` (default: the workspace's
    most recent task) are used. Raises :class:`TinycompressError` for a missing folder, an
    unknown task or an empty workspace.
    """
    from tinycompress.data.tasks import get_task

    if task is not None:
        task = get_task(task).name
    end = None
    if target is not None:
        target = Path(target)
        if not target.is_dir():
            raise TinycompressError(
                f"report target not found: {target}",
                "pass a checkpoint folder, a task folder (runs/sst2) or a workspace (runs)",
            )
        if (target / MANIFEST_NAME).is_file():
            end = read_checkpoint(target)
            if task is not None and end.task != task:
                raise TinycompressError(
                    f"{target} is a {end.task} checkpoint, not {task}", "drop --task or pass a checkpoint of that task"
                )
            return target.resolve().parent.parent, end.task, end
        if _stage_dirs(target):
            workdir, found_task = target.resolve().parent, target.resolve().name
            if task is not None and found_task != task:
                raise TinycompressError(
                    f"{target} holds task {found_task}, not {task}", "drop --task or pass that task's folder"
                )
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
    if not any(stage_versions(workdir, task, stage) for stage in STAGE_ORDER):
        raise TinycompressError(
            f"no checkpoints for task {task} in workspace '{workdir}'",
            f"run `tinycompress run --task {task}` (or `{producing_command('finetune', task)}`) first",
        )
    return workdir, task, end


def chain_end(workdir: str | Path, task: str) -> Checkpoint:
    """The newest checkpoint of the furthest stage present (export > quantize > prune > finetune),
    baselines left out (they are shown beside a chain, see :func:`find_baselines`)."""
    for stage in reversed(STAGE_ORDER):
        newest = newest_in_chain(workdir, task, stage)
        if newest is not None:
            return read_checkpoint(newest)
    raise TinycompressError(
        f"no checkpoints for task {task} in workspace '{workdir}'", f"run `{producing_command('finetune', task)}` first"
    )


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


def quantize_kind(checkpoint: Checkpoint) -> tuple[str, str, bool, bool]:
    """(backend, mode, per-channel, int8 embeddings) of a quantize checkpoint, as it recorded them."""
    settings, details = checkpoint.config.quantize, checkpoint.details
    return (
        str(details.get("backend", settings.backend)),
        str(details.get("mode", settings.mode)),
        bool(details.get("per_channel", settings.per_channel)),
        bool(details.get("quantize_embeddings", settings.quantize_embeddings)),
    )


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
            kind = quantize_kind(candidate)
            if kind in found:
                continue
            found[kind] = (number, read_checkpoint(folder))  # verify the files of the one shown
        except (TinycompressError, AttributeError, TypeError, ValueError):
            continue
    return [checkpoint for _, (_, checkpoint) in sorted(found.items(), key=lambda item: (item[0][0], item[1][0]))]
