"""Choose how many heads and FFN neurons each layer keeps so the model fits a cost budget.

The cost of a structure is additive over layers: ``floor + sum over layers of head_cost(h_l) +
ffn_cost(n_l) + interaction_cost(h_l, n_l)``, where ``head_cost`` / ``ffn_cost`` come from a table
measured on the deployment runtime (:mod:`tinycompress.inference.cost_table`) -- milliseconds for
a latency target, bytes for a size target. Kwon et al. (2022) add the blocks' costs; on ONNX
Runtime int8 a layer cut in both blocks runs slower than that sum, so a latency table also prices
the pair (``interaction_cost``; bytes need none). The value of keeping ``k`` units of a block is
the summed importance of its ``k`` best units (Fisher or Taylor scores, additive under the diagonal
approximation Kwon et al. use), less a penalty when the block (or the whole layer) goes and its
removal was measured to cost more than its units' scores say
(:mod:`tinycompress.pruning.block_removal`). Maximising that value under the budget is a
multiple-choice knapsack over the layers, each choosing a (heads, FFN width) pair, which
:func:`choose_structure` solves exactly by dynamic programming over a finely discretised budget;
Kwon et al.'s greedy search approximates the same problem. A block keeping 0 units is skipped; a
layer keeping neither is removed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# Budget resolution of the dynamic programme: 1/4000 of the budget above the floor. Rounding every
# block cost *up* to this grid keeps the chosen structure within the true budget.
BUDGET_STEPS = 4000


@dataclass(frozen=True)
class Plan:
    """The chosen structure: units kept per layer (current positions, best first) and its cost."""

    heads_keep: list[list[int]]
    neurons_keep: list[list[int]]
    predicted_cost: float
    kept_importance: float  # summed scores of the kept units
    total_importance: float
    removal_penalty: float = 0.0  # paid for the whole blocks removed (see ``removal_costs``)

    @property
    def head_counts(self) -> list[int]:
        return [len(k) for k in self.heads_keep]

    @property
    def ffn_sizes(self) -> list[int]:
        return [len(k) for k in self.neurons_keep]


def layer_cost(
    h: int,
    n: int,
    head_cost: Callable[[int], float],
    ffn_cost: Callable[[int], float],
    interaction_cost: Callable[[int, int], float] | None = None,
) -> float:
    """One layer keeping ``h`` heads and ``n`` neurons: its blocks' costs plus their interaction
    (never below 0); a removed layer (``h = n = 0``) costs nothing."""
    if h == 0 and n == 0:
        return 0.0
    extra = interaction_cost(h, n) if interaction_cost is not None else 0.0
    return max(0.0, float(head_cost(h)) + float(ffn_cost(n)) + float(extra))


def structure_cost(
    head_counts: Sequence[int],
    ffn_sizes: Sequence[int],
    head_cost: Callable[[int], float],
    ffn_cost: Callable[[int], float],
    floor: float,
    interaction_cost: Callable[[int, int], float] | None = None,
) -> float:
    """``floor`` plus every layer's :func:`layer_cost`."""
    return float(
        floor + sum(layer_cost(h, n, head_cost, ffn_cost, interaction_cost) for h, n in zip(head_counts, ffn_sizes))
    )


# The FFN widths the search chooses between are multiples of this (ONNX Runtime's int8 GEMM works in
# blocks, so odd widths buy no time); the cost table measures the narrowest of them.
FFN_STEP = 32


def width_options(current: int, step: int, minimum: int) -> list[int]:
    """Widths an FFN of ``current`` neurons may be cut to: multiples of ``step``, ``current`` itself
    and 0, all >= minimum."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    options = set(range(0, current + 1, step)) | {current}
    return sorted(w for w in options if w >= minimum)


def _ranked(scores: Tensor) -> tuple[list[int], np.ndarray]:
    """Positions best first (ties: lower position first) and the cumulative importance of the top k."""
    values = torch.as_tensor(scores).detach().float().cpu()
    if torch.isnan(values).any():
        raise ValueError("importance scores contain NaN")
    order = sorted(range(len(values)), key=lambda i: (-float(values[i]), i))
    cumulative = np.concatenate([[0.0], np.cumsum([float(values[i]) for i in order])])
    return order, cumulative


def choose_structure(
    head_scores: Sequence[Tensor],
    neuron_scores: Sequence[Tensor],
    *,
    head_cost: Callable[[int], float],
    ffn_cost: Callable[[int], float],
    floor: float,
    budget: float,
    interaction_cost: Callable[[int, int], float] | None = None,
    ffn_step: int = FFN_STEP,
    min_heads: int = 0,
    min_neurons: int = 0,
    removal_costs: Sequence[Mapping[str, float | None]] | None = None,
) -> Plan:
    """The per-layer structure keeping the most importance whose cost is at most ``budget``.

    ``head_scores[l]`` / ``neuron_scores[l]``: importance of every unit present in layer l.
    ``head_cost(h)`` / ``ffn_cost(n)``: cost of one layer's attention with ``h`` heads / FFN with
    ``n`` neurons (0 for 0); ``interaction_cost(h, n)``, when given, what a layer keeping both costs
    beyond their sum (see :func:`layer_cost`). ``removal_costs[l]``: importance lost, in the
    scores' units, when layer l's ``"attention"`` block, its ``"ffn"`` or the whole ``"layer"``
    goes (:class:`~tinycompress.pruning.block_removal.RemovalLosses`); where that is more than the
    units' summed scores, the option pays the difference. Raises ValueError when even the cheapest
    structure allowed by the minimums costs more than ``budget``.
    """
    if len(head_scores) != len(neuron_scores):
        raise ValueError(f"{len(head_scores)} layers of head scores but {len(neuron_scores)} of neuron scores")
    if removal_costs is not None and len(removal_costs) != len(head_scores):
        raise ValueError(f"{len(head_scores)} layers of scores but {len(removal_costs)} of removal costs")
    # One knapsack group per layer, its options every (heads, neurons) pair: removing a whole
    # layer is priced on its own, so the two blocks of a layer are chosen together.
    ranked: list[tuple[list[int], list[int]]] = []
    # [(heads, neurons, cost, value, kept scores, penalty)], value = kept scores - penalty
    groups: list[list[tuple[int, int, float, float, float, float]]] = []
    for index, (h_scores, n_scores) in enumerate(zip(head_scores, neuron_scores)):
        h_order, h_cumulative = _ranked(h_scores)
        n_order, n_cumulative = _ranked(n_scores)
        ranked.append((h_order, n_order))
        penalties = _removal_penalties(
            removal_costs[index] if removal_costs is not None else {}, h_cumulative[-1], n_cumulative[-1]
        )
        options = []
        for h in range(min(min_heads, len(h_order)), len(h_order) + 1):
            for n in width_options(len(n_order), ffn_step, min(min_neurons, len(n_order))):
                kept = float(h_cumulative[h] + n_cumulative[n])
                penalty = penalties.get((h == 0, n == 0), 0.0)
                cost = layer_cost(h, n, head_cost, ffn_cost, interaction_cost)
                options.append((h, n, cost, kept - penalty, kept, penalty))
        groups.append(options)
    cheapest = floor + sum(min(option[2] for option in options) for options in groups)
    if cheapest > budget:
        raise ValueError(f"the cheapest structure allowed costs {cheapest:.4g}, over the budget {budget:.4g}")

    # Costs relative to each group's cheapest option, on a grid rounded up so the plan never overshoots.
    spare = budget - cheapest
    unit = spare / BUDGET_STEPS if spare > 0 else 1.0
    steps = BUDGET_STEPS if spare > 0 else 0

    def width(cost: float, base: float) -> int:
        if spare > 0:
            return math.ceil((cost - base) / unit - 1e-9)
        return 0 if cost - base <= 1e-12 else steps + 1

    best = np.full(steps + 1, -np.inf)
    best[0] = 0.0
    choices: list[np.ndarray] = []
    for options in groups:
        base = min(option[2] for option in options)
        new = np.full(steps + 1, -np.inf)
        choice = np.full(steps + 1, -1, dtype=np.int64)
        for index, (_, _, cost, value, _, _) in enumerate(options):
            shift = width(cost, base)
            if shift > steps:
                continue
            candidate = np.full(steps + 1, -np.inf)
            candidate[shift:] = best[: steps + 1 - shift] + value
            better = candidate > new
            new[better] = candidate[better]
            choice[better] = index
        best = new
        choices.append(choice)
    # Walk back from the best final state to the option chosen in each group.
    position = int(np.argmax(best))
    picked: list[tuple[int, int, float, float, float, float]] = []
    for options, choice in zip(reversed(groups), reversed(choices)):
        option = options[int(choice[position])]
        picked.append(option)
        position -= width(option[2], min(other[2] for other in options))
    picked.reverse()
    heads_keep = [sorted(h_order[: option[0]]) for (h_order, _), option in zip(ranked, picked)]
    neurons_keep = [sorted(n_order[: option[1]]) for (_, n_order), option in zip(ranked, picked)]
    cost = structure_cost(
        [len(k) for k in heads_keep], [len(k) for k in neurons_keep], head_cost, ffn_cost, floor, interaction_cost
    )
    kept = sum(option[4] for option in picked)
    penalty = sum(option[5] for option in picked)
    total = sum(float(torch.as_tensor(s).float().sum()) for s in [*head_scores, *neuron_scores])
    return Plan(heads_keep, neurons_keep, cost, float(kept), total, float(penalty))


def _removal_penalties(costs: Mapping[str, float | None], heads_total: float, neurons_total: float) -> dict:
    """Importance to subtract from an option, keyed by (no heads kept, no neurons kept): what a
    measured removal cost exceeds the removed units' summed scores by (never negative -- a
    removal measured to cost less than its scores is not made cheaper than the scores say; one
    whose measurement is not finite is never chosen)."""

    def excess(measured: float | None, scored: float) -> float:
        if measured is None:
            return 0.0
        return max(0.0, measured - scored) if math.isfinite(measured) else math.inf

    return {
        (True, False): excess(costs.get("attention"), heads_total),
        (False, True): excess(costs.get("ffn"), neurons_total),
        (True, True): excess(costs.get("layer"), heads_total + neurons_total),
    }
