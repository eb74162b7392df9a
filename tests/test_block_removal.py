"""Measured removal losses of whole blocks and layers, and the search pricing them."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from test_zero_width import HEADS, LAYERS, build

from tinycompress.models.structure import drop_empty_layers_, ffn_sizes, prune_heads_, prune_neurons_
from tinycompress.pruning.block_removal import RemovalLosses, removal_losses
from tinycompress.pruning.budget import choose_structure, structure_cost, width_options
from tinycompress.pruning.importance import summed_over_processes

KINDS = ["bert", "distilbert"]


def labelled_batches(kind: str, n: int = 3, size: int = 4, length: int = 10) -> list[dict]:
    generator = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(n):
        batch = {
            "input_ids": torch.randint(1, 100, (size, length), generator=generator),
            "attention_mask": torch.ones(size, length, dtype=torch.long),
            "labels": torch.randint(0, 3, (size,), generator=generator),
        }
        batch["attention_mask"][0, length // 2 :] = 0
        batches.append(batch)
    return batches


def summed_loss(model, batches) -> float:
    with torch.no_grad():
        return sum(float(model(**b).loss) * b["labels"].shape[0] for b in batches)


@pytest.mark.parametrize("kind", KINDS)
def test_measured_losses_are_those_of_the_structurally_removed_models(kind):
    model, batches = build(kind), labelled_batches(kind)
    before = [p.clone() for p in model.parameters()]
    measured = removal_losses(model, batches)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # left as it was
    base = summed_loss(model, batches)
    assert measured.rows == 12 and measured.batches == 3 and measured.loss == pytest.approx(base, rel=1e-5)
    every_neuron = ffn_sizes(model)[0]
    for index in range(LAYERS):
        heads = [list(range(HEADS))] * LAYERS
        neurons = [list(range(every_neuron))] * LAYERS
        no_heads = copy.deepcopy(model)
        prune_heads_(no_heads, [[] if i == index else h for i, h in enumerate(heads)])
        no_ffn = copy.deepcopy(model)
        prune_neurons_(no_ffn, [[] if i == index else n for i, n in enumerate(neurons)])
        no_layer = copy.deepcopy(no_heads)
        prune_neurons_(no_layer, [[] if i == index else n for i, n in enumerate(neurons)], drop_empty_layers=False)
        assert drop_empty_layers_(no_layer) == [index]
        for got, removed in ((measured.attention, no_heads), (measured.ffn, no_ffn), (measured.layer, no_layer)):
            assert got[index] == pytest.approx(summed_loss(removed, batches) - base, rel=1e-4, abs=1e-4)
    assert len({round(v, 3) for v in measured.layer}) == LAYERS  # not one value copied around


def test_blocks_already_gone_are_not_measured_and_sums_cover_every_process():
    model = build("bert")
    prune_heads_(model, [[0, 1], [], list(range(HEADS))])
    batches = labelled_batches("bert")
    alone = removal_losses(model, batches)
    assert alone.attention[1] is None and alone.attention[0] is not None and alone.ffn[1] is not None
    with summed_over_processes(lambda t: 2 * t):  # two processes that scored the same batches
        doubled = removal_losses(model, batches)
    assert doubled.rows == 2 * alone.rows and doubled.loss == pytest.approx(2 * alone.loss)
    assert doubled.layer == pytest.approx([2 * v for v in alone.layer])


def test_score_units():
    losses = RemovalLosses(rows=100, batches=4, loss=5.0, attention=[3.0, None], ffn=[1.0, 2.0], layer=[6.0, 8.0])
    fisher = losses.in_score_units("fisher")
    assert fisher[0] == {"attention": 6.0, "ffn": 2.0, "layer": 12.0} and fisher[1]["attention"] is None
    assert losses.in_score_units("taylor")[1] == {"attention": None, "ffn": 0.08, "layer": 0.32}
    with pytest.raises(ValueError, match="magnitude"):
        losses.in_score_units("magnitude")
    assert losses.to_dict()["layer_removed"] == [0.06, 0.08]


def _linear(per_unit: float):
    return lambda k: 0.0 if k == 0 else per_unit * k


def test_a_measured_removal_cost_keeps_a_block_the_scores_would_drop():
    # Layer 1's heads score almost nothing, so without measured costs its attention goes first.
    heads = [torch.tensor([5.0, 5.0]), torch.tensor([0.01, 0.01])]
    neurons = [torch.tensor([5.0] * 4), torch.tensor([3.0] * 4)]
    kwargs = dict(head_cost=_linear(1.0), ffn_cost=_linear(0.5), floor=0.0, budget=6.0, ffn_step=1)
    assert choose_structure(heads, neurons, **kwargs).head_counts == [2, 0]
    measured = [{"attention": 1.0, "ffn": 1.0, "layer": 1.0}, {"attention": 50.0, "ffn": 1.0, "layer": 60.0}]
    plan = choose_structure(heads, neurons, **kwargs, removal_costs=measured)
    assert plan.head_counts[1] >= 1 and plan.predicted_cost <= 6.0 and plan.removal_penalty == 0.0
    # A removal that could not be measured (not finite) is never chosen.
    unmeasured = [measured[0], {"attention": float("nan"), "ffn": 1.0, "layer": 60.0}]
    assert choose_structure(heads, neurons, **kwargs, removal_costs=unmeasured).head_counts[1] >= 1
    # A cost below the summed scores changes nothing: removal is never made cheaper than scored.
    cheap = [{"attention": 0.0, "ffn": 0.0, "layer": 0.0}] * 2
    assert choose_structure(heads, neurons, **kwargs, removal_costs=cheap).head_counts == [2, 0]


def test_the_layer_cost_applies_only_when_both_blocks_go():
    heads = [torch.tensor([9.0, 9.0]), torch.tensor([0.001, 0.001])]
    neurons = [torch.tensor([9.0] * 4), torch.tensor([0.001] * 4)]
    kwargs = dict(head_cost=_linear(1.0), ffn_cost=_linear(1.0), floor=0.0, budget=6.01, ffn_step=1)
    assert choose_structure(heads, neurons, **kwargs).head_counts == [2, 0]
    # Removing layer 1 whole is measured to be costly; dropping only its attention is not.
    costs = [{}, {"attention": 0.0, "ffn": 100.0, "layer": 100.0}]
    plan = choose_structure(heads, neurons, **kwargs, removal_costs=costs)
    assert plan.head_counts[1] == 0 and plan.ffn_sizes[1] >= 1
    assert plan.removal_penalty == pytest.approx(0.0)  # the attention's measured cost was below its scores


def test_matches_exhaustive_search_with_removal_costs():
    generator = torch.Generator().manual_seed(1)
    heads = [torch.rand(3, generator=generator) for _ in range(2)]
    neurons = [torch.rand(6, generator=generator) for _ in range(2)]
    costs = [{"attention": 2.5, "ffn": 0.2, "layer": 4.0}, {"attention": None, "ffn": 3.0, "layer": 1.0}]
    head_cost, ffn_cost, floor, budget = _linear(0.7), _linear(0.2), 0.5, 2.6
    plan = choose_structure(
        heads,
        neurons,
        head_cost=head_cost,
        ffn_cost=ffn_cost,
        floor=floor,
        budget=budget,
        ffn_step=2,
        removal_costs=costs,
    )

    def value(layer, h, n):
        top = float(heads[layer].sort(descending=True).values[:h].sum())
        top += float(neurons[layer].sort(descending=True).values[:n].sum())
        h_total, n_total = float(heads[layer].sum()), float(neurons[layer].sum())
        measured = costs[layer]
        if h == 0 and n == 0:
            return top - max(0.0, measured["layer"] - h_total - n_total)
        if h == 0 and measured["attention"] is not None:
            return top - max(0.0, measured["attention"] - h_total)
        if n == 0:
            return top - max(0.0, measured["ffn"] - n_total)
        return top

    best = max(
        value(0, h0, n0) + value(1, h1, n1)
        for h0, h1, n0, n1 in itertools.product(range(4), range(4), width_options(6, 2, 0), width_options(6, 2, 0))
        if structure_cost([h0, h1], [n0, n1], head_cost, ffn_cost, floor) <= budget
    )
    assert plan.kept_importance - plan.removal_penalty == pytest.approx(best, rel=1e-6)
    assert plan.removal_penalty >= 0 and plan.predicted_cost <= budget
