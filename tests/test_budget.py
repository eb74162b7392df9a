"""The structure search under a cost budget (pure: synthetic scores and cost tables)."""

from __future__ import annotations

import itertools

import pytest
import torch

from tinycompress.pruning.budget import choose_structure, structure_cost, width_options


def _linear(per_unit: float, fixed: float = 0.0):
    return lambda k: 0.0 if k == 0 else fixed + per_unit * k


def test_keeps_within_budget_and_prefers_cheaper_units_per_importance():
    # Two layers. Heads cost 1 each, neurons 0.1 each (grid of 4). Layer 0's neurons are worth
    # much more per unit of cost than its heads; layer 1's heads are nearly worthless.
    heads = [torch.tensor([1.0, 1.0]), torch.tensor([0.01, 0.02])]
    neurons = [torch.tensor([5.0, 5.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0]), torch.tensor([0.5] * 8)]
    plan = choose_structure(
        heads, neurons, head_cost=_linear(1.0), ffn_cost=_linear(0.1), floor=1.0, budget=3.0, ffn_step=4
    )
    assert plan.predicted_cost <= 3.0 + 1e-9
    assert plan.heads_keep[1] == []  # worthless heads go first
    assert plan.neurons_keep[0] == [0, 1, 2, 3]  # the best 4 neurons (a grid step), not the zeros
    assert plan.predicted_cost == pytest.approx(
        structure_cost(plan.head_counts, plan.ffn_sizes, _linear(1.0), _linear(0.1), 1.0)
    )


def _both_cut(h: int, n: int) -> float:
    """An interaction like ONNX Runtime int8's: a layer cut in both blocks costs more than their sum."""
    return 0.4 if 0 < h < 3 and 0 < n < 8 else 0.0


@pytest.mark.parametrize("interaction_cost", [None, _both_cut])
def test_matches_exhaustive_search_on_a_small_problem(interaction_cost):
    generator = torch.Generator().manual_seed(0)
    heads = [torch.rand(3, generator=generator) for _ in range(2)]
    neurons = [torch.rand(8, generator=generator) for _ in range(2)]
    head_cost, ffn_cost = _linear(0.7, fixed=0.3), _linear(0.11, fixed=0.2)
    budget, floor = 3.1, 0.5
    plan = choose_structure(
        heads,
        neurons,
        head_cost=head_cost,
        ffn_cost=ffn_cost,
        floor=floor,
        budget=budget,
        interaction_cost=interaction_cost,
        ffn_step=2,
    )

    def value(scores, k):
        return float(scores.sort(descending=True).values[:k].sum())

    best = -1.0
    for h0, h1, n0, n1 in itertools.product(range(4), range(4), width_options(8, 2, 0), width_options(8, 2, 0)):
        if structure_cost([h0, h1], [n0, n1], head_cost, ffn_cost, floor, interaction_cost) <= budget:
            best = max(best, value(heads[0], h0) + value(heads[1], h1) + value(neurons[0], n0) + value(neurons[1], n1))
    assert plan.kept_importance == pytest.approx(best, rel=1e-6)
    assert plan.predicted_cost <= budget
    assert plan.predicted_cost == pytest.approx(
        structure_cost(plan.head_counts, plan.ffn_sizes, head_cost, ffn_cost, floor, interaction_cost)
    )


def test_minimums_and_an_unreachable_budget():
    heads = [torch.ones(4), torch.ones(4)]
    neurons = [torch.ones(8), torch.ones(8)]
    plan = choose_structure(
        heads, neurons, head_cost=_linear(1.0), ffn_cost=_linear(1.0), floor=0.0, budget=4.0, min_heads=1, ffn_step=1
    )
    assert min(plan.head_counts) >= 1
    with pytest.raises(ValueError, match="over the budget"):
        choose_structure(
            heads, neurons, head_cost=_linear(1.0), ffn_cost=_linear(1.0), floor=0.0, budget=1.0, min_heads=1
        )


def test_a_layer_may_lose_everything():
    heads = [torch.tensor([9.0, 9.0]), torch.tensor([0.001, 0.001])]
    neurons = [torch.tensor([9.0] * 4), torch.tensor([0.001] * 4)]
    plan = choose_structure(
        heads, neurons, head_cost=_linear(1.0), ffn_cost=_linear(1.0), floor=0.0, budget=6.01, ffn_step=1
    )
    assert plan.head_counts == [2, 0] and plan.ffn_sizes == [4, 0]


def test_an_interaction_moves_the_cut_into_one_block_per_layer():
    # Added up, cutting a head and half the FFN of every layer keeps the most importance; with an
    # interaction that charges a layer cut in both blocks, the search cuts one block per layer.
    heads = [torch.tensor([3.0, 1.0]), torch.tensor([3.0, 1.0])]
    neurons = [torch.tensor([2.0, 2.0, 1.0, 1.0]), torch.tensor([2.0, 2.0, 1.0, 1.0])]
    kwargs = dict(head_cost=_linear(1.0), ffn_cost=_linear(0.5), floor=0.0, budget=4.0, ffn_step=2)
    added = choose_structure(heads, neurons, **kwargs)
    assert added.head_counts == [1, 1] and added.ffn_sizes == [2, 2]
    charged = choose_structure(heads, neurons, **kwargs, interaction_cost=lambda h, n: 1.0 if h < 2 and n < 4 else 0.0)
    assert charged.head_counts == [0, 0] and charged.ffn_sizes == [4, 4]
    assert charged.predicted_cost == pytest.approx(4.0)


def test_width_options():
    assert width_options(100, 32, 0) == [0, 32, 64, 96, 100]
    assert width_options(100, 32, 40) == [64, 96, 100]
