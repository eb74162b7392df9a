"""Prune heads and FFN neurons in one or more steps, re-scoring between steps.

With a per-layer minimum of 0 a step may empty a layer's attention block or FFN (it is then
skipped, see :mod:`tinycompress.models.structure`). Layers left with neither are kept, empty,
until the last step, so every step's per-layer lists index the layers of the model as it was
passed in; they are removed after the last step (``PruningRecord.layers_removed``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tinycompress.models.structure import (
    current_head_ids,
    drop_empty_layers_,
    ffn_sizes,
    head_counts,
    prune_heads_,
    prune_neurons_,
)
from tinycompress.pruning.importance import CRITERIA, Importance, LossFn, compute_importance
from tinycompress.pruning.selection import check_capacity, check_min, count_to_remove, select_lowest

# How removals are split across steps. Only "linear" exists; the name is kept so a manifest or
# caller naming another schedule gets a clear error rather than a silent default.
SCHEDULES: tuple[str, ...] = ("linear",)


@dataclass
class StepRecord:
    """What one pruning step removed, per layer of the model as it was passed to
    ``prune_iteratively``. Heads are original head ids; neurons are positions in that model."""

    step: int
    heads_removed: list[list[int]]
    neurons_removed: list[list[int]]
    heads_remaining: int
    neurons_remaining: int


@dataclass
class PruningRecord:
    """Per-step removals plus the final scores of the surviving units (the
    last step's scores restricted to kept units, aligned with the final model).

    ``initial_importance`` holds the scores the first step ranked by: every unit of the model
    as it was passed in, removed ones included, so callers need not score that model again.
    ``layers_removed``: positions, in the model as it was passed in, of the layers removed
    after the last step because they had neither heads nor FFN neurons left.
    """

    steps: list[StepRecord] = field(default_factory=list)
    final_importance: Importance | None = None
    initial_importance: Importance | None = None
    layers_removed: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-serialisable summary."""
        final = self.final_importance
        return {
            "steps": [vars(step).copy() for step in self.steps],
            "layers_removed": list(self.layers_removed),
            "final_importance": None
            if final is None
            else {
                "criterion": final.criterion,
                "head_scores": [s.tolist() for s in final.head_scores],
                "neuron_scores": [s.tolist() for s in final.neuron_scores],
            },
        }


def cumulative_schedule(total: int, target: int, steps: int, schedule: str = "linear") -> list[int]:
    """Cumulative number removed after steps 1..steps, ending exactly at ``target``.

    "linear" removes about target/steps each step.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps}")
    if target == 0:
        return [0] * steps
    cumulative = [math.floor(target * k / steps + 0.5) for k in range(1, steps + 1)]
    cumulative[-1] = target
    return cumulative


def _restrict(scores: list[Tensor], keep: list[list[int]]) -> list[Tensor]:
    return [s[torch.tensor(k, dtype=torch.long)] for s, k in zip(scores, keep)]


def dropped(ids: list[list[int]], keep: list[list[int]]) -> list[list[int]]:
    """``ids[l][pos]`` for every position not in ``keep[l]``: what a keep list removes, per layer."""
    removed = []
    for layer_ids, kept in zip(ids, keep):
        kept = set(kept)
        removed.append([i for pos, i in enumerate(layer_ids) if pos not in kept])
    return removed


def prune_iteratively(
    model: nn.Module,
    batches_fn: Callable[[], Iterable[Mapping[str, Tensor]]] | None,
    criterion: str,
    head_ratio: float,
    ffn_ratio: float,
    steps: int,
    min_heads_per_layer: int = 1,
    min_neurons_per_layer: int = 1,
    schedule: str = "linear",
    loss_fn: LossFn | None = None,
    seed: int = 0,
) -> PruningRecord:
    """Prune heads and FFN neurons in ``steps`` rounds, re-scoring before each.

    Ratios are fractions of the heads / neurons present when called; after the
    last step exactly ``round(ratio * total)`` of each are gone (``schedule``
    decides the split, see ``cumulative_schedule``). ``batches_fn()`` must
    return a fresh iterable of batches each call (it is called once per step;
    may be None for "magnitude" / "random"). "random" uses ``seed + step``.
    Raises ValueError up front if the targets are infeasible.

    With a minimum of 0 a layer may lose all its heads or neurons (the block is skipped); a
    layer losing both is removed after the last step (see ``PruningRecord.layers_removed``).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"Unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    check_min(min_heads_per_layer, "heads")
    check_min(min_neurons_per_layer, "neurons")
    heads0, neurons0 = head_counts(model), ffn_sizes(model)
    head_target = count_to_remove(head_ratio, sum(heads0))
    neuron_target = count_to_remove(ffn_ratio, sum(neurons0))
    # Every removal lowers the removable capacity by exactly one, so checking
    # the totals once guarantees every step is feasible.
    check_capacity(heads0, head_target, min_heads_per_layer, "heads")
    check_capacity(neurons0, neuron_target, min_neurons_per_layer, "neurons")
    head_cum = [0] + cumulative_schedule(sum(heads0), head_target, steps, schedule)
    neuron_cum = [0] + cumulative_schedule(sum(neurons0), neuron_target, steps, schedule)

    record = PruningRecord()
    neuron_ids = [list(range(n)) for n in neurons0]
    for step in range(1, steps + 1):
        batches = batches_fn() if batches_fn is not None else None
        importance = compute_importance(model, batches, criterion, loss_fn=loss_fn, seed=seed + step - 1)
        if step == 1:
            record.initial_importance = importance
        head_keep = select_lowest(
            importance.head_scores, head_cum[step] - head_cum[step - 1], min_heads_per_layer, "heads"
        )
        neuron_keep = select_lowest(
            importance.neuron_scores, neuron_cum[step] - neuron_cum[step - 1], min_neurons_per_layer, "neurons"
        )
        heads_removed = dropped(current_head_ids(model), head_keep)
        neurons_removed = dropped(neuron_ids, neuron_keep)
        # Emptied layers stay until the end, so per-layer lists keep their length between steps.
        prune_heads_(model, head_keep, drop_empty_layers=False)
        prune_neurons_(model, neuron_keep, drop_empty_layers=False)
        neuron_ids = [[ids[i] for i in k] for ids, k in zip(neuron_ids, neuron_keep)]
        record.steps.append(
            StepRecord(step, heads_removed, neurons_removed, sum(head_counts(model)), sum(ffn_sizes(model)))
        )
        record.final_importance = Importance(
            criterion, _restrict(importance.head_scores, head_keep), _restrict(importance.neuron_scores, neuron_keep)
        )
    record.layers_removed = drop_empty_layers_(model)
    if record.layers_removed and record.final_importance is not None:
        final, gone = record.final_importance, set(record.layers_removed)
        record.final_importance = Importance(
            final.criterion,
            [s for layer, s in enumerate(final.head_scores) if layer not in gone],
            [s for layer, s in enumerate(final.neuron_scores) if layer not in gone],
        )
    return record
