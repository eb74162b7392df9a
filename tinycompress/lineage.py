"""How a stage picks its parent checkpoint and builds its config on the parent's.

Shared by prune, quantize and export: which parent stages each accepts, the newest-parent
default, and the rule that a child inherits its parent's resolved config (data, model, max
length) unless the YAML file or a flag says otherwise.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, resolve_input
from .config import Config, load_config, read_yaml
from .errors import TinycompressError

ACCEPTED_PARENTS = {
    "prune": ("finetune", "prune"),
    "quantize": ("finetune", "prune"),
    "export": ("finetune", "prune", "quantize"),
}


def find_parent(stage: str, explicit: str | Path | None, config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Checkpoint:
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
    accepted = ACCEPTED_PARENTS[stage]
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
