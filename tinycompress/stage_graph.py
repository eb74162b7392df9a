"""The one table of checkpoint stages: what each starts from, what decides whether an existing
checkpoint can be reused, how the report labels it, and the command that makes it.

The workspace (default parents, accepted parents, reuse), ``tinycompress run`` (order, stage
functions), the report (labels, "not run" rows) and the error hints (commands) all read this table,
so a new stage is a row here plus its module under ``tinycompress/stages/`` -- and, where it needs
rows of its own in the report or a new kind of model folder, code in ``report/`` or ``inference/``.

It is plain data at the bottom of the import order (beside ``config`` and ``errors``), not in
``tinycompress/stages/``: the checkpoint layer needs the default parents and the commands for its
error hints, and imports only flow downwards (see ``[tool.importlinter]`` in pyproject.toml).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Config sections every stage's fingerprint includes. The parent's identity already pins them,
# but a checkpoint made with other upstream settings (e.g. different data) must not be mistaken
# for this run's.
_UPSTREAM_SECTIONS = ("task", "seed", "model", "data", "finetune")


@dataclass(frozen=True)
class StageSpec:
    """One row of :data:`STAGES`."""

    name: str
    # The report row of its checkpoints ("pruned", ...).
    label: str
    # Stages whose checkpoints it accepts as input; () = it starts from a pretrained model.
    parents: tuple[str, ...]
    # Tried in this order (newest checkpoint, baselines excluded) when no input is given.
    default_parents: tuple[str, ...]
    # Config sections (or dotted keys) that, with the parent, decide what it produces.
    fingerprint: tuple[str, ...]
    # "module:function" of the stage function, imported only when run. A string, not the function:
    # this table sits below the stages in the import order (tests/test_layout.py checks each).
    function: str
    # What `command()` adds after the stage name and --task.
    command_args: str = ""

    def command(self, task: str | None = None) -> str:
        """The command that makes a checkpoint of this stage (used in hints)."""
        task_flag = f" --task {task}" if task else ""
        extra = f" {self.command_args}" if self.command_args else ""
        return f"tinycompress {self.name}{task_flag}{extra}"

    def load_function(self) -> Callable[..., Any]:
        """The stage function: ``function(config)`` without parents, else ``function(config, parent)``."""
        module, name = self.function.split(":")
        return getattr(importlib.import_module(module), name)


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            "finetune",
            "fine-tuned",
            parents=(),
            default_parents=(),
            fingerprint=_UPSTREAM_SECTIONS,
            function="tinycompress.stages.finetune:finetune",
        ),
        StageSpec(
            "prune",
            "pruned",
            parents=("finetune", "prune"),
            default_parents=("finetune",),
            fingerprint=_UPSTREAM_SECTIONS + ("prune",),
            function="tinycompress.stages.prune:prune",
            command_args="--speedup 2",
        ),
        # Quantize exports the ONNX graph it quantizes with export.opset.
        StageSpec(
            "quantize",
            "pruned + quantized",
            parents=("finetune", "prune"),
            default_parents=("prune",),
            fingerprint=_UPSTREAM_SECTIONS + ("prune", "quantize", "export.opset"),
            function="tinycompress.stages.quantize:quantize",
        ),
        StageSpec(
            "export",
            "exported",
            parents=("finetune", "prune", "quantize"),
            default_parents=("quantize", "prune", "finetune"),
            fingerprint=_UPSTREAM_SECTIONS + ("prune", "quantize", "export"),
            function="tinycompress.stages.export:export",
        ),
    )
}
# The order of a chain (and of `tinycompress run`).
STAGE_ORDER: tuple[str, ...] = tuple(STAGES)

# The baselines: the unpruned fine-tuned model quantized the usual way (dynamic int8 with default
# settings, ONNX Runtime as Optimum does it, and torch), made by `run` beside the main chain so
# that the table compares pruning + quantization with quantization alone, measured together.
# They are quantize checkpoints whose fingerprint leaves out the prune section: a new --ratio
# does not make them again.
BASELINE_BACKENDS = ("onnx", "torch")
BASELINE_FINGERPRINT = _UPSTREAM_SECTIONS + ("quantize", "export.opset")


def producing_command(stage: str, task: str | None) -> str:
    """The command that makes a ``stage`` checkpoint (``tinycompress <stage>`` for a stage not in the table)."""
    spec = STAGES.get(stage)
    if spec is None:
        return f"tinycompress {stage}" + (f" --task {task}" if task else "")
    return spec.command(task)
