"""Which units to remove: the lowest-scoring heads or neurons, globally ranked, with a per-layer minimum."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

Scores = Tensor | Sequence[Tensor]


def _score_list(scores: Scores) -> list[Tensor]:
    if torch.is_tensor(scores):
        if scores.dim() != 2:
            raise ValueError(f"Score tensor must be [layers, units], got shape {tuple(scores.shape)}")
        return list(scores)
    result = [torch.as_tensor(s).detach().flatten().float().cpu() for s in scores]
    if not result:
        raise ValueError("Scores are empty: need at least one layer")
    return result


def count_to_remove(ratio: float, total: int) -> int:
    """``ratio * total`` rounded half up; ValueError unless ``0 <= ratio < 1``."""
    if not 0 <= ratio < 1:  # also rejects NaN
        raise ValueError(f"Pruning ratio must be in [0, 1), got {ratio}")
    return math.floor(ratio * total + 0.5)


def check_min(min_per_layer: int, unit: str) -> None:
    """ValueError unless ``min_per_layer >= 0``.

    0 is allowed: a layer may then lose every head (its attention block is skipped) or every
    FFN neuron (its FFN is skipped), and a layer losing both is removed; see
    :mod:`tinycompress.models.structure`.
    """
    if min_per_layer < 0:
        raise ValueError(f"min {unit} per layer must be >= 0, got {min_per_layer}")


def check_capacity(counts: Sequence[int], n_remove: int, min_per_layer: int, unit: str) -> None:
    capacity = sum(max(count - min_per_layer, 0) for count in counts)
    if n_remove > capacity:
        raise ValueError(
            f"Cannot remove {n_remove} {unit} out of {sum(counts)}: at most {capacity} can go "
            f"while keeping >= {min_per_layer} per layer"
        )


def select_lowest(scores: Scores, n_remove: int, min_per_layer: int = 1, unit: str = "units") -> list[list[int]]:
    """Kept indices per layer after removing the ``n_remove`` lowest-scored
    units globally (across layers), never leaving a layer below ``min_per_layer``.
    With ``min_per_layer`` 0 a layer may be emptied (its kept list is then ``[]``);
    layers that are already empty (no scores) stay empty.

    Ties are broken by (layer, index), lowest first, so results are deterministic.
    """
    layer_scores = _score_list(scores)
    check_min(min_per_layer, unit)
    counts = [len(s) for s in layer_scores]
    if n_remove < 0:
        raise ValueError(f"n_remove must be >= 0, got {n_remove}")
    check_capacity(counts, n_remove, min_per_layer, unit)
    flat = torch.cat([s.float() for s in layer_scores])
    if torch.isnan(flat).any():
        raise ValueError("Scores contain NaN")
    layer_of = torch.cat([torch.full((c,), layer) for layer, c in enumerate(counts)]).tolist()
    offsets = [sum(counts[:layer]) for layer in range(len(counts))]
    remaining = list(counts)
    removed: set[int] = set()
    for pos in torch.argsort(flat, stable=True).tolist():
        if len(removed) == n_remove:
            break
        layer = layer_of[pos]
        if remaining[layer] > min_per_layer:
            removed.add(pos)
            remaining[layer] -= 1
    return [[i for i in range(c) if offsets[layer] + i not in removed] for layer, c in enumerate(counts)]


def select_heads(head_scores: Scores, ratio: float, min_heads_per_layer: int = 1) -> list[list[int]]:
    """Kept head indices (current positions) per layer after removing
    ``round(ratio * total heads)`` heads, lowest global score first.

    ``head_scores``: ``[L, H]`` tensor or list of 1-D tensors (one per layer).
    Raises ValueError for ratio outside [0, 1), ``min_heads_per_layer < 0`` or
    a ratio the per-layer minimum makes impossible. ``min_heads_per_layer=0`` lets a
    layer lose all its heads (``[]``: its attention block is then skipped).
    """
    layer_scores = _score_list(head_scores)
    n_remove = count_to_remove(ratio, sum(len(s) for s in layer_scores))
    return select_lowest(layer_scores, n_remove, min_heads_per_layer, unit="heads")


def select_neurons(ffn_scores: Scores, ratio: float, min_per_layer: int = 1) -> list[list[int]]:
    """Same as ``select_heads`` for FFN neurons; returns kept neuron indices per layer."""
    layer_scores = _score_list(ffn_scores)
    n_remove = count_to_remove(ratio, sum(len(s) for s in layer_scores))
    return select_lowest(layer_scores, n_remove, min_per_layer, unit="neurons")
