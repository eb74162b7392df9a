"""Tests for tinycompress.models (arch, structure) and tinycompress.pruning on tiny random models."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
)

from tinycompress.errors import TinycompressError
from tinycompress.models.arch import get_arch, get_module, layers, ort_model_type
from tinycompress.models.pretrained import count_parameters
from tinycompress.models.structure import (
    STRUCTURE_ATTR,
    apply_structure_,
    ffn_sizes,
    head_counts,
    prune_heads_,
    prune_neurons_,
)
from tinycompress.pruning.flops import estimate_flops
from tinycompress.pruning.importance import compute_importance, gated
from tinycompress.pruning.iterative import cumulative_schedule, prune_iteratively
from tinycompress.pruning.selection import select_heads, select_lowest, select_neurons

HIDDEN, HEADS, FFN, LAYERS = 32, 4, 37, 2
HEAD_SIZE = HIDDEN // HEADS


def make_config(kind: str, attn: str = "eager"):
    if kind == "bert":
        config = BertConfig(
            vocab_size=100,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=FFN,
            max_position_embeddings=64,
            num_labels=3,
        )
    else:
        config = DistilBertConfig(
            vocab_size=100,
            dim=HIDDEN,
            n_layers=LAYERS,
            n_heads=HEADS,
            hidden_dim=FFN,
            max_position_embeddings=64,
            num_labels=3,
        )
    config._attn_implementation = attn
    return config


def make_model(kind: str, attn: str = "eager", seed: int = 0):
    torch.manual_seed(seed)
    cls = BertForSequenceClassification if kind == "bert" else DistilBertForSequenceClassification
    return cls(make_config(kind, attn)).eval()


def make_batches(n_batches: int = 2, batch_size: int = 4, seq_len: int = 9, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        mask = torch.ones(batch_size, seq_len, dtype=torch.long)
        mask[1, 6:] = 0  # padding, so masked positions are exercised
        mask[2, 4:] = 0
        batches.append(
            {
                "input_ids": torch.randint(1, 100, (batch_size, seq_len), generator=generator),
                "attention_mask": mask,
                "labels": torch.randint(0, 3, (batch_size,), generator=generator),
            }
        )
    return batches


def logits(model, batch):
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits


KINDS = ["bert", "distilbert"]


# ---------------------------------------------------------------- arch


def test_get_arch_rejects_unsupported_type():
    with pytest.raises(TinycompressError, match="'gpt2' is not supported; supported: bert, distilbert") as caught:
        get_arch(type("Cfg", (), {"model_type": "gpt2"})())
    assert "\n" not in caught.value.one_line()


def test_ort_model_type_comes_from_the_arch_table():
    # ORT has no DistilBERT entry: its BERT fusions cover both families; ORT's own names pass through.
    assert [ort_model_type(t) for t in ("bert", "distilbert", "gpt2")] == ["bert", "bert", "gpt2"]


@pytest.mark.parametrize("kind", KINDS)
def test_arch_paths_resolve(kind):
    model = make_model(kind)
    spec = get_arch(model)
    assert len(layers(model)) == LAYERS
    for path in (spec.query, spec.key, spec.value, spec.attn_out, spec.ffn_in, spec.ffn_out):
        assert isinstance(get_module(layers(model)[0], path), torch.nn.Linear)
    with pytest.raises(ValueError, match="nope"):
        get_module(model, "nope.x")


# ---------------------------------------------------------------- gates and importance


@pytest.mark.parametrize("kind", KINDS)
def test_gates_are_identity_get_gradients_and_are_removed(kind):
    model = make_model(kind)
    batch = make_batches(1)[0]
    before = logits(model, batch)
    with gated(model) as gates:
        loss = model(**batch).loss
        loss.backward()
        assert torch.allclose(logits(model, batch), before, atol=1e-6)
    for gate in gates.heads + gates.neurons:
        assert gate.grad is not None and gate.grad.abs().sum() > 0
    assert [g.shape[0] for g in gates.heads] == [HEADS] * LAYERS
    assert [g.shape[0] for g in gates.neurons] == [FFN] * LAYERS
    spec = get_arch(model)
    assert all(not get_module(layer, spec.attn_out)._forward_pre_hooks for layer in layers(model))


def _zero_head_output(model, layer_idx, head):
    spec = get_arch(model)
    out = get_module(layers(model)[layer_idx], spec.attn_out)
    with torch.no_grad():
        out.weight[:, head * HEAD_SIZE : (head + 1) * HEAD_SIZE] = 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_dead_head_scores_zero_and_removal_is_exact(kind, attn):
    model = make_model(kind, attn)
    _zero_head_output(model, layer_idx=1, head=2)
    batches = make_batches()
    for criterion in ("taylor", "fisher"):
        scores = compute_importance(model, batches, criterion).head_scores
        assert scores[1][2].item() == 0.0
        assert (scores[0] > 0).all() and scores[1][[0, 1, 3]].gt(0).all()
    assert compute_importance(model, None, "magnitude").head_scores[1][2] > 0
    before = logits(model, batches[0])
    prune_heads_(model, [[0, 1, 2, 3], [0, 1, 3]])
    assert (logits(model, batches[0]) - before).abs().max() <= 1e-6


def test_fisher_per_sample_trick_matches_one_sample_batches():
    model = make_model("bert")
    batch = make_batches(1)[0]
    singles = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(4)]
    batched = compute_importance(model, [batch], "fisher")
    looped = compute_importance(model, singles, "fisher")
    for a, b in zip(batched.head_scores + batched.neuron_scores, looped.head_scores + looped.neuron_scores):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-10)


def test_taylor_heads_are_layer_normalised_and_state_is_restored():
    model = make_model("bert").train()
    importance = compute_importance(model, make_batches(), "taylor")
    assert torch.allclose(importance.head_matrix().norm(dim=1), torch.ones(LAYERS))
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_magnitude_and_random_scores():
    model = make_model("distilbert")
    spec = get_arch(model)
    layer = layers(model)[0]
    q = get_module(layer, spec.query).weight[:HEAD_SIZE]
    k = get_module(layer, spec.key).weight[:HEAD_SIZE]
    v = get_module(layer, spec.value).weight[:HEAD_SIZE]
    o = get_module(layer, spec.attn_out).weight[:, :HEAD_SIZE]
    expected = torch.cat([q.flatten(), k.flatten(), v.flatten(), o.flatten()]).norm()
    magnitude = compute_importance(model, None, "magnitude")
    assert torch.allclose(magnitude.head_scores[0][0], expected)
    assert [len(s) for s in magnitude.neuron_scores] == [FFN] * LAYERS
    first, again = (compute_importance(model, None, "random", seed=3) for _ in range(2))
    assert torch.equal(first.head_matrix(), again.head_matrix())
    assert not torch.equal(first.head_matrix(), compute_importance(model, None, "random", seed=4).head_matrix())


def test_unknown_criterion_and_missing_batches():
    model = make_model("bert")
    with pytest.raises(ValueError, match="taylor"):
        compute_importance(model, None, "l0")
    with pytest.raises(ValueError, match="batches"):
        compute_importance(model, None, "fisher")


# ---------------------------------------------------------------- selection


def test_select_heads_ranks_globally():
    scores = torch.tensor([[0.1, 0.9, 0.8, 0.7], [0.2, 0.3, 0.95, 0.85]])
    assert select_heads(scores, 0.25) == [[1, 2, 3], [1, 2, 3]]
    assert select_heads(scores, 0.5) == [[1, 2], [2, 3]]
    assert select_heads(scores, 0.0) == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_select_heads_respects_min_per_layer():
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    assert select_heads(scores, 0.5, min_heads_per_layer=1) == [[3], [1, 2, 3]]
    assert select_heads(scores, 0.5, min_heads_per_layer=2) == [[2, 3], [2, 3]]


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_select_rejects_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        select_heads(torch.rand(2, 4), ratio)


def test_select_rejects_infeasible_and_negative_min():
    with pytest.raises(ValueError, match="at most 4"):
        select_heads(torch.rand(2, 4), 0.75, min_heads_per_layer=2)
    with pytest.raises(ValueError, match=">= 0"):
        select_heads(torch.rand(2, 4), 0.25, min_heads_per_layer=-1)
    # min 0 may empty a layer (its attention block is then skipped)
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    assert select_heads(scores, 0.5, min_heads_per_layer=0) == [[], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="NaN"):
        select_lowest([torch.tensor([float("nan"), 1.0])], 1)


def test_select_neurons_handles_uneven_layers():
    scores = [torch.tensor([5.0, 1.0, 3.0]), torch.tensor([2.0, 4.0, 0.5, 6.0, 7.0])]
    assert select_neurons(scores, 0.375) == [[0, 2], [1, 3, 4]]
    assert select_neurons(scores, 0.75, min_per_layer=1) == [[0], [4]]


# ---------------------------------------------------------------- removal, reload, cost


def analytic_params(heads_removed, neurons_removed):
    """Parameters dropped: Q/K/V rows (+bias) and O columns per head;
    FFN-in row (+bias) and FFN-out column per neuron."""
    per_head = 3 * (HIDDEN * HEAD_SIZE + HEAD_SIZE) + HIDDEN * HEAD_SIZE
    per_neuron = HIDDEN + 1 + HIDDEN
    return per_head * heads_removed + per_neuron * neurons_removed


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_and_flop_counts_after_pruning(kind):
    model = make_model(kind)
    params0 = count_parameters(model)
    seq = 16
    dense_layer = 2 * seq * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN) + 4 * seq * seq * HIDDEN
    assert estimate_flops(model, seq) == LAYERS * dense_layer
    prune_heads_(model, [[1, 3], [0, 1, 2]])
    prune_neurons_(model, [list(range(0, FFN, 2)), list(range(30))])
    neurons_removed = (FFN - len(range(0, FFN, 2))) + (FFN - 30)
    assert count_parameters(model) == params0 - analytic_params(3, neurons_removed)
    assert head_counts(model) == [2, 3] and ffn_sizes(model) == [19, 30]
    expected = sum(
        2 * seq * (4 * HIDDEN * h * HEAD_SIZE + 2 * HIDDEN * n) + 4 * seq * seq * h * HEAD_SIZE
        for h, n in [(2, 19), (3, 30)]
    )
    assert estimate_flops(model, seq) == expected
    spec = get_arch(model)
    assert getattr(get_module(layers(model)[0], spec.attention_module), spec.head_count_attr) == 2


def test_original_head_ids_survive_repeated_pruning():
    model = make_model("bert")
    prune_heads_(model, [[0, 2, 3], [1, 2, 3]])
    prune_heads_(model, [[1, 2], [0]])
    prune_neurons_(model, [list(range(10)), list(range(20))])
    assert getattr(model.config, STRUCTURE_ATTR) == {"heads_kept": [[2, 3], [1]], "intermediate_sizes": [10, 20]}


def test_prune_rejects_bad_keep_lists():
    model = make_model("bert")
    for keep in ([[0, 1]], [[0, 0], [1]], [[0, 4], [1]], [[-1], [1]]):
        with pytest.raises(ValueError):
            prune_heads_(model, keep)


@pytest.mark.parametrize("kind,attn", [("bert", "eager"), ("distilbert", "sdpa")])
def test_reload_via_apply_structure_is_exact(kind, attn, tmp_path):
    model = make_model(kind, attn)
    prune_heads_(model, [[0, 3], [1, 2, 3]])
    prune_neurons_(model, [list(range(5, 25)), list(range(0, FFN, 3))])
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    # Round-trip the config through a dict, as config.json would.
    config = type(model.config).from_dict(model.config.to_dict())
    config._attn_implementation = attn
    fresh = type(model)(config).eval()
    apply_structure_(fresh)
    fresh.load_state_dict(load_file(str(path)), strict=True)
    batch = make_batches(1)[0]
    assert (logits(fresh, batch) - logits(model, batch)).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="unpruned"):
        apply_structure_(fresh)


# ---------------------------------------------------------------- iterative


def test_cumulative_schedule_reaches_target():
    assert cumulative_schedule(8, 4, 2, "linear") == [2, 4]
    with pytest.raises(ValueError):  # the unreachable "geometric" schedule was removed (issue #10)
        cumulative_schedule(100, 75, 2, "geometric")
    assert cumulative_schedule(8, 0, 3) == [0, 0, 0]
    with pytest.raises(ValueError):
        cumulative_schedule(8, 4, 2, "cosine")


@pytest.mark.parametrize("kind,criterion", [("bert", "taylor"), ("distilbert", "fisher"), ("bert", "random")])
def test_prune_iteratively_hits_target(kind, criterion):
    model = make_model(kind)
    batches = make_batches(1)
    record = prune_iteratively(model, lambda: batches, criterion, head_ratio=0.5, ffn_ratio=0.3, steps=3)
    head_target = 4
    neuron_target = math.floor(0.3 * 2 * FFN + 0.5)
    assert sum(head_counts(model)) == 2 * HEADS - head_target
    assert sum(ffn_sizes(model)) == 2 * FFN - neuron_target
    assert [s.heads_remaining for s in record.steps][-1] == 2 * HEADS - head_target
    for layer in range(LAYERS):
        removed = [h for s in record.steps for h in s.heads_removed[layer]]
        kept = getattr(model.config, STRUCTURE_ATTR)["heads_kept"][layer]
        assert sorted(removed + kept) == list(range(HEADS))  # original ids, disjoint
        neurons = [n for s in record.steps for n in s.neurons_removed[layer]]
        assert len(set(neurons)) == len(neurons) == FFN - ffn_sizes(model)[layer]
    assert [len(s) for s in record.final_importance.head_scores] == head_counts(model)
    assert record.to_dict()["steps"][0]["step"] == 1


def test_prune_iteratively_rejects_infeasible_target_upfront():
    model = make_model("bert")
    with pytest.raises(ValueError, match="heads"):
        prune_iteratively(model, None, "magnitude", head_ratio=0.9, ffn_ratio=0.0, steps=2)
    assert head_counts(model) == [HEADS] * LAYERS
