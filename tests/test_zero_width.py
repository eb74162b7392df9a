"""Layers with no attention heads, no FFN neurons, or neither (removed), end to end.

Tiny random BERT / DistilBERT classifiers (3 layers, 4 heads, FFN 37) with *every* parameter
re-drawn, so biases and LayerNorms are non-trivial (HF's init zeroes biases, which would hide a
skipped block that forgot its bias). Three structures per family:

* ``heads0``: layer 0 keeps no heads (so ORT cannot fuse the embedding either), the rest partial;
* ``ffn0``: layer 1 keeps no FFN neurons;
* ``removed``: layer 1 keeps neither and is removed; layers 0 and 2 partially pruned.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import onnx
import pytest
import torch
from conftest import _toy_tokenizer
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
)

from tinycompress.checkpoint.hf import build_model_skeleton, load_hf_model, save_config_and_tokenizer, save_hf_model
from tinycompress.checkpoint.store import Checkpoint
from tinycompress.config import QuantizeSettings
from tinycompress.exporters import torchscript
from tinycompress.exporters.onnx import export_onnx, model_input_names
from tinycompress.exporters.ort_fusion import attention_head_counts, export_optimized_onnx
from tinycompress.exporters.parity import format_parity, parity_check, torch_logits_fn
from tinycompress.inference.onnx_session import OnnxClassifier
from tinycompress.inference.predictor import load_predictor
from tinycompress.models.arch import get_arch, get_module, layers
from tinycompress.models.config_fields import STRUCTURE_ATTR
from tinycompress.models.structure import (
    BiasOnly,
    SkippedBlock,
    apply_structure_,
    current_head_ids,
    current_layer_ids,
    drop_empty_layers_,
    ffn_sizes,
    head_counts,
    prune_heads_,
    prune_neurons_,
)
from tinycompress.pruning.flops import estimate_flops
from tinycompress.pruning.importance import CRITERIA, compute_importance, gated
from tinycompress.pruning.iterative import prune_iteratively
from tinycompress.pruning.selection import select_heads, select_neurons
from tinycompress.quantization import torch as torch_int8
from tinycompress.quantization.onnx import quantize_onnx_model

VOCAB, HIDDEN, LAYERS, HEADS, FFN, LABELS = 100, 32, 3, 4, 37, 3
HEAD_SIZE = HIDDEN // HEADS
KINDS = ["bert", "distilbert"]
ALL_HEADS, ALL_NEURONS = list(range(HEADS)), list(range(FFN))

# case -> (heads kept per layer, neurons kept per layer), in the 3-layer model's positions.
CASES = {
    "heads0": ([[], [0, 2], [1, 2, 3]], [list(range(20)), ALL_NEURONS, list(range(0, FFN, 3))]),
    "ffn0": ([[1, 3], ALL_HEADS, [0]], [ALL_NEURONS, [], list(range(10))]),
    "removed": ([[0, 1], [], [2, 3]], [list(range(30)), [], list(range(5, 25))]),
}
# case -> (heads_kept, intermediate_sizes, layers_kept or None) recorded afterwards.
EXPECTED = {
    "heads0": ([[], [0, 2], [1, 2, 3]], [20, FFN, 13], None),
    "ffn0": ([[1, 3], ALL_HEADS, [0]], [FFN, 0, 10], None),
    "removed": ([[0, 1], [2, 3]], [30, 20], [0, 2]),
}


def build(kind: str, attn: str = "eager", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "bert":
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=FFN,
            max_position_embeddings=64,
            num_labels=LABELS,
        )
        model = BertForSequenceClassification(config)
    else:
        config = DistilBertConfig(
            vocab_size=VOCAB,
            dim=HIDDEN,
            n_layers=LAYERS,
            n_heads=HEADS,
            hidden_dim=FFN,
            max_position_embeddings=64,
            num_labels=LABELS,
        )
        model = DistilBertForSequenceClassification(config)
    model.config._attn_implementation = attn
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model.eval()


def build_pruned(kind: str, case: str, attn: str = "eager") -> nn.Module:
    model = build(kind, attn)
    heads, neurons = CASES[case]
    prune_heads_(model, heads)
    prune_neurons_(model, neurons)
    return model


def make_batch(batch_size: int, seq_len: int, *, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(1, VOCAB, size=(batch_size, seq_len), dtype=np.int64)
    attention_mask = np.ones_like(input_ids)
    attention_mask[0, seq_len // 2 :] = 0  # padding, so the masked path is exercised
    token_type_ids = np.zeros_like(input_ids)
    token_type_ids[:, seq_len // 2 :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


BATCHES = {"short": make_batch(1, 3, seed=0), "padded": make_batch(3, 9, seed=1), "long": make_batch(5, 17, seed=2)}
FIXED = make_batch(8, 12, seed=7)


def torch_inputs(model: nn.Module, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in batch.items() if k in model_input_names(model)}


def logits(model: nn.Module, batch: dict[str, np.ndarray] = FIXED) -> torch.Tensor:
    with torch.no_grad():
        return model(**torch_inputs(model, batch)).logits


@pytest.fixture(autouse=True)
def no_files_in_cwd(tmp_path_factory, monkeypatch):
    """ORT tools like to drop temp files into the CWD (symbolic shape inference does on failure)."""
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)
    yield
    assert not list(cwd.iterdir()), f"files leaked into the working directory: {list(cwd.iterdir())}"


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_structure_is_recorded_per_present_layer(kind, case):
    model = build_pruned(kind, case)
    heads_kept, sizes, layers_kept = EXPECTED[case]
    expected = {"heads_kept": heads_kept, "intermediate_sizes": sizes}
    if layers_kept is not None:
        expected |= {"layers_kept": layers_kept, "layers_total": LAYERS}
    assert getattr(model.config, STRUCTURE_ATTR) == expected
    assert head_counts(model) == [len(h) for h in heads_kept] and ffn_sizes(model) == sizes
    assert current_head_ids(model) == heads_kept
    assert current_layer_ids(model) == (layers_kept or list(range(LAYERS)))
    spec = get_arch(model)
    assert getattr(model.config, spec.layers_field) == len(layers(model)) == len(sizes)
    if kind == "distilbert":
        assert model.distilbert.transformer.n_layers == len(sizes)
    # Skipped blocks hold no weight matrix at all: only the bias and (BERT) the LayerNorm.
    for layer, heads, size in zip(layers(model), heads_kept, sizes):
        assert isinstance(get_module(layer, spec.attn_skip.module), SkippedBlock) == (not heads)
        assert isinstance(get_module(layer, spec.ffn_skip.module), SkippedBlock) == (size == 0)
        if not heads:
            assert isinstance(get_module(layer, spec.attn_out), BiasOnly)
    assert all(p.numel() > 0 for p in model.parameters())


def test_unpruned_model_and_old_records_have_identity_layer_ids():
    model = build("bert")
    assert current_layer_ids(model) == [0, 1, 2]
    prune_heads_(model, [[0], [1], [2, 3]])  # no layer removed: the record keeps its old form
    assert "layers_kept" not in getattr(model.config, STRUCTURE_ATTR)
    assert current_layer_ids(model) == [0, 1, 2]


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_keys_of_skipped_blocks_stay_put(kind):
    full_keys = set(build(kind).state_dict())
    model = build_pruned(kind, "heads0")
    keys = set(model.state_dict())
    assert keys <= full_keys  # nothing renamed: only removed
    spec = get_arch(model)
    prefix = f"{'bert.encoder.layer' if kind == 'bert' else 'distilbert.transformer.layer'}.0."
    assert f"{prefix}{spec.attn_out}.bias" in keys and f"{prefix}{spec.attn_norm}.weight" in keys
    assert f"{prefix}{spec.query}.weight" not in keys and f"{prefix}{spec.attn_out}.weight" not in keys


def _keep(seen: dict, key: str, value: torch.Tensor) -> None:
    """Hook body recording a tensor (returns None, so the hooked call is left unchanged)."""
    seen[key] = value


@pytest.mark.parametrize("kind", KINDS)
def test_skipped_attention_is_layernorm_of_x_plus_bias(kind):
    reference = build(kind)
    model = build_pruned(kind, "heads0")
    spec = get_arch(model)
    layer, ref_layer = layers(model)[0], layers(reference)[0]
    seen = {}
    layer.register_forward_pre_hook(lambda m, args: _keep(seen, "x", args[0]))
    get_module(layer, spec.attn_norm).register_forward_hook(lambda m, a, out: _keep(seen, "out", out))
    logits(model)
    norm = get_module(ref_layer, spec.attn_norm)
    bias = get_module(ref_layer, spec.attn_out).bias
    expected = nn.functional.layer_norm(seen["x"] + bias, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    assert torch.equal(seen["out"], expected)


@pytest.mark.parametrize("kind", KINDS)
def test_skipped_ffn_is_layernorm_of_x_plus_bias(kind):
    reference = build(kind)
    model = build_pruned(kind, "ffn0")
    spec = get_arch(model)
    layer, ref_layer = layers(model)[1], layers(reference)[1]
    seen = {}
    get_module(layer, spec.attn_norm).register_forward_hook(lambda m, a, out: _keep(seen, "x", out))
    get_module(layer, spec.ffn_norm).register_forward_hook(lambda m, a, out: _keep(seen, "out", out))
    logits(model)
    norm = get_module(ref_layer, spec.ffn_norm)
    bias = get_module(ref_layer, spec.ffn_out).bias
    expected = nn.functional.layer_norm(seen["x"] + bias, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    assert torch.equal(seen["out"], expected)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", ["heads0", "ffn0"])
@pytest.mark.parametrize("kind", KINDS)
def test_skipping_equals_masking_every_unit(kind, case, attn):
    """The unpruned model with the removed units' gates at zero computes what the pruned one does."""
    heads, neurons = CASES[case]
    reference = build(kind, attn)
    with gated(reference) as gates, torch.no_grad():
        for gate, kept in zip(gates.heads + gates.neurons, heads + neurons):
            dropped = [i for i in range(len(gate)) if i not in kept]
            gate[dropped] = 0
        masked = logits(reference)
    model = build_pruned(kind, case, attn)
    torch.testing.assert_close(logits(model), masked, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_drop_empty_layers_can_wait(kind):
    model = build(kind)
    prune_heads_(model, [ALL_HEADS, [], ALL_HEADS], drop_empty_layers=False)
    prune_neurons_(model, [ALL_NEURONS, [], ALL_NEURONS], drop_empty_layers=False)
    assert head_counts(model) == [HEADS, 0, HEADS] and ffn_sizes(model) == [FFN, 0, FFN]
    assert logits(model).isfinite().all()  # an empty layer still runs: LN2(LN1(x + b1) + b2)
    assert drop_empty_layers_(model) == [1]
    assert head_counts(model) == [HEADS, HEADS] and current_layer_ids(model) == [0, 2]
    assert drop_empty_layers_(model) == []


def test_removing_a_layer_keeps_original_ids_through_later_pruning(tmp_path):
    model = build_pruned("bert", "removed")  # layers 0, 2 present
    prune_heads_(model, [[], [1]])  # positions: layer 0 loses its heads, layer 2 keeps head id 3
    prune_neurons_(model, [[], [0]])  # layer 0 loses its FFN too: removed
    assert getattr(model.config, STRUCTURE_ATTR) == {
        "heads_kept": [[3]],
        "intermediate_sizes": [1],
        "layers_kept": [2],
        "layers_total": 3,  # the unpruned count, kept through later pruning
    }
    assert model.config.num_hidden_layers == 1
    # Removing the last layers leaves ids 0..n-1, but the record still says layers were removed.
    model = build("bert")
    prune_heads_(model, [ALL_HEADS, ALL_HEADS, []])
    prune_neurons_(model, [ALL_NEURONS, ALL_NEURONS, []])
    assert getattr(model.config, STRUCTURE_ATTR)["layers_kept"] == [0, 1]
    # A rebuilt model (config.json read back) keeps the unpruned count too.
    folder = tmp_path / "saved"
    model.config.save_pretrained(folder)
    rebuilt = build_model_skeleton(folder)
    assert getattr(rebuilt.config, STRUCTURE_ATTR)["layers_total"] == 3


def test_prune_rejects_bad_keep_lists_for_skipped_layers():
    model = build_pruned("bert", "heads0")
    with pytest.raises(ValueError, match="within"):
        prune_heads_(model, [[0], [0, 1], [0]])  # layer 0 has no heads left to keep


@pytest.mark.parametrize("kind", KINDS)
def test_flops_count_skipped_blocks_as_zero(kind):
    seq = 16
    model = build_pruned(kind, "removed")
    expected = sum(
        2 * seq * (4 * HIDDEN * h * HEAD_SIZE + 2 * HIDDEN * n) + 4 * seq * seq * h * HEAD_SIZE
        for h, n in zip(head_counts(model), ffn_sizes(model))
    )
    assert estimate_flops(model, seq) == expected
    heads0 = build_pruned(kind, "heads0")
    dense_ffn = 2 * seq * 2 * HIDDEN * 20  # layer 0: FFN of 20 neurons only
    layer0 = estimate_flops(heads0, seq) - sum(
        2 * seq * (4 * HIDDEN * h * HEAD_SIZE + 2 * HIDDEN * n) + 4 * seq * seq * h * HEAD_SIZE
        for h, n in [(2, FFN), (3, 13)]
    )
    assert layer0 == dense_ffn


# ---------------------------------------------------------------- importance, selection, iterative


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("kind", KINDS)
def test_importance_of_a_model_with_skipped_blocks(kind, criterion):
    model = build_pruned(kind, "ffn0")
    prune_heads_(model, [[], [0, 1, 2, 3], [0]])  # layer 0: no heads; layer 1: no FFN
    batch = {**torch_inputs(model, FIXED), "labels": torch.arange(8) % LABELS}
    importance = compute_importance(model, [batch], criterion)
    assert [len(s) for s in importance.head_scores] == head_counts(model) == [0, HEADS, 1]
    assert [len(s) for s in importance.neuron_scores] == ffn_sizes(model) == [FFN, 0, 10]
    assert all(torch.isfinite(s).all() for s in importance.head_scores + importance.neuron_scores)
    if criterion in ("taylor", "fisher"):
        assert importance.head_scores[1].gt(0).all() and importance.neuron_scores[0].gt(0).any()
    if criterion == "taylor":  # per-layer unit norm by default; raw with normalize=False
        raw = compute_importance(model, [batch], criterion, normalize=False)
        for scores, raw_scores in zip(importance.head_scores, raw.head_scores):
            assert len(raw_scores) == len(scores)
            if len(scores):
                torch.testing.assert_close(raw_scores / raw_scores.norm(), scores)
    # Selection with min 0 treats the empty layers as having nothing to give.
    kept = select_heads(importance.head_scores, 0.5, min_heads_per_layer=0)
    assert kept[0] == [] and sum(len(k) for k in kept) == 5 - math.floor(0.5 * 5 + 0.5)
    assert select_neurons(importance.neuron_scores, 0.0, min_per_layer=0)[1] == []


def _shrink_layer(model: nn.Module, layer: int, factor: float = 0.01) -> None:
    """Scale one layer's prunable weights down, so magnitude ranks all its units lowest."""
    spec = get_arch(model)
    with torch.no_grad():
        for path in (spec.query, spec.key, spec.value, spec.attn_out, spec.ffn_in, spec.ffn_out):
            get_module(layers(model)[layer], path).weight.mul_(factor)


@pytest.mark.parametrize("kind", KINDS)
def test_prune_iteratively_with_min_zero_removes_an_emptied_layer(kind, tmp_path):
    model = build(kind)
    _shrink_layer(model, 1)
    record = prune_iteratively(
        model,
        None,
        "magnitude",
        head_ratio=1 / 3,  # 4 of 12 heads
        ffn_ratio=1 / 3,  # 37 of 111 neurons
        steps=2,
        min_heads_per_layer=0,
        min_neurons_per_layer=0,
    )
    assert record.layers_removed == [1] and record.to_dict()["layers_removed"] == [1]
    # Per-step lists index the layers of the model as passed in, the removed one included.
    assert sorted(h for step in record.steps for h in step.heads_removed[1]) == ALL_HEADS
    assert sorted(n for step in record.steps for n in step.neurons_removed[1]) == ALL_NEURONS
    assert [len(s.heads_removed) for s in record.steps] == [LAYERS, LAYERS]
    assert head_counts(model) == [HEADS, HEADS] and ffn_sizes(model) == [FFN, FFN]
    assert current_layer_ids(model) == [0, 2] and getattr(model.config, get_arch(model).layers_field) == 2
    assert [len(s) for s in record.final_importance.head_scores] == head_counts(model)
    assert [len(s) for s in record.final_importance.neuron_scores] == ffn_sizes(model)
    before = logits(model)
    save_hf_model(tmp_path, model, _toy_tokenizer(tmp_path), 32)
    reloaded, _ = load_hf_model(Checkpoint(tmp_path, {"stage": "prune"}))
    torch.testing.assert_close(logits(reloaded), before, atol=1e-6, rtol=0)  # reloaded with SDPA attention
    reloaded.set_attn_implementation("eager")
    assert torch.equal(logits(reloaded), before)


def test_prune_iteratively_with_min_zero_can_empty_attention_only():
    model = build("bert")
    _shrink_layer(model, 2)
    batches = [{**torch_inputs(model, FIXED), "labels": torch.arange(8) % LABELS}]
    # The first call empties layer 2's attention; the second scores (taylor) a model with an
    # empty head gate in that layer, which takes no part in the backward pass.
    record = prune_iteratively(model, lambda: batches, "magnitude", 1 / 3, 0.0, 1, 0, 0)
    assert head_counts(model)[2] == 0 and record.layers_removed == []
    record = prune_iteratively(model, lambda: batches, "taylor", 0.25, 0.1, 2, 0, 0)
    assert len(layers(model)) == LAYERS and head_counts(model)[2] == 0
    assert [len(s) for s in record.initial_importance.head_scores] == [HEADS, HEADS, 0]


# ---------------------------------------------------------------- save / reload


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_save_and_reload_give_identical_logits(kind, case, attn, tmp_path):
    model = build_pruned(kind, case, attn)
    save_hf_model(tmp_path, model, _toy_tokenizer(tmp_path), 32)
    reloaded, _ = load_hf_model(Checkpoint(tmp_path, {"stage": "prune"}))
    reloaded.set_attn_implementation(attn)
    assert getattr(reloaded.config, STRUCTURE_ATTR) == getattr(model.config, STRUCTURE_ATTR)
    assert head_counts(reloaded) == head_counts(model) and ffn_sizes(reloaded) == ffn_sizes(model)
    assert current_layer_ids(reloaded) == current_layer_ids(model)
    for batch in (FIXED, *BATCHES.values()):
        assert torch.equal(logits(reloaded, batch), logits(model, batch))


@pytest.mark.parametrize("kind", KINDS)
def test_apply_structure_needs_the_reduced_config(kind):
    model = build_pruned(kind, "removed")
    structure = getattr(model.config, STRUCTURE_ATTR)
    with pytest.raises(ValueError, match="reduced"):
        apply_structure_(build(kind), structure)  # built from the unpruned (3-layer) config
    config = type(model.config).from_dict(model.config.to_dict())  # as config.json would
    config._attn_implementation = "eager"
    fresh = type(model)(config).eval()
    apply_structure_(fresh)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(logits(fresh), logits(model))


# ---------------------------------------------------------------- ONNX, ORT fusion, int8


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_onnx_export_fusion_and_dynamic_int8(kind, case, tmp_path):
    model = build_pruned(kind, case)
    reference = torch_logits_fn(model)
    raw = export_onnx(model, tmp_path / "raw.onnx")
    graph = onnx.load(str(raw)).graph
    assert all(np.prod(init.dims) > 0 for init in graph.initializer), "zero-size tensor in the graph"
    results = parity_check(reference, OnnxClassifier(raw), BATCHES, atol=1e-4)
    assert all(r.passed for r in results), format_parity(results)

    fused = export_optimized_onnx(model, tmp_path / "fused.onnx", opset=17, scratch=tmp_path)
    # Layers without attention have no attention subgraph; every other one is fused with its own heads.
    assert fused["attention_fusion"]
    assert fused["fused_attention_heads"] == attention_head_counts(tmp_path / "fused.onnx")
    assert fused["fused_attention_heads"] == [h for h in head_counts(model) if h]
    results = parity_check(reference, OnnxClassifier(tmp_path / "fused.onnx"), BATCHES, atol=1e-4)
    assert all(r.passed for r in results), format_parity(results)

    details = quantize_onnx_model(model, tmp_path / "int8.onnx", QuantizeSettings(), opset=17)
    assert details["fused_attention_heads"] == [h for h in head_counts(model) if h]
    assert details["quantized_ops"]["Attention"] == sum(1 for h in head_counts(model) if h)
    assert details["quantized_ops"]["MatMul"] > 0
    (result,) = parity_check(reference, OnnxClassifier(tmp_path / "int8.onnx"), {"fixed": FIXED}, atol=0.1)
    assert result.passed and result.label_agreement_pct == 100.0, format_parity([result])


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_predictor_on_a_zero_width_model(kind, tmp_path):
    model = build_pruned(kind, "heads0")
    save_config_and_tokenizer(tmp_path, model.config, _toy_tokenizer(tmp_path), 32)
    quantize_onnx_model(model, tmp_path / "model.onnx", QuantizeSettings(), opset=17)
    predictor = load_predictor(tmp_path)
    assert predictor.kind == "onnx"
    out = np.asarray(predictor.forward(torch_inputs(model, FIXED)))
    np.testing.assert_allclose(out, logits(model).numpy(), atol=0.1)


# ---------------------------------------------------------------- torch int8, TorchScript


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_torch_int8_round_trip(kind, case, tmp_path):
    model = build_pruned(kind, case)
    qmodel = torch_int8.quantize_torch_dynamic(model)
    assert not any(type(m) is nn.Linear for m in qmodel.modules())
    before = logits(qmodel)
    torch.testing.assert_close(before, logits(model), atol=0.1, rtol=0)
    save_config_and_tokenizer(tmp_path, model.config, _toy_tokenizer(tmp_path), 32)
    torch_int8.save_torch_int8(qmodel, tmp_path)
    reloaded = torch_int8.load_torch_int8(tmp_path, lambda: build_model_skeleton(tmp_path))
    assert torch.equal(logits(reloaded), before)
    predictor = load_predictor(tmp_path)  # the torch-int8 predictor rebuilds the same skeleton
    assert predictor.kind == "torch-int8"
    assert torch.equal(predictor.forward(torch_inputs(model, FIXED)), before)


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_torchscript_matches_eager(kind, case, quantized, tmp_path):
    fp32 = build_pruned(kind, case)
    model = torch_int8.quantize_torch_dynamic(fp32) if quantized else copy.deepcopy(fp32)
    path = torchscript.save_torchscript(torchscript.script_or_trace(model), tmp_path / "model.pt")
    loaded = torchscript.load_torchscript(path)
    names = model_input_names(model)
    for batch in BATCHES.values():
        args = [torch.from_numpy(batch[n]) for n in names]
        with torch.no_grad():
            torch.testing.assert_close(loaded(*args), model(**dict(zip(names, args))).logits, atol=1e-5, rtol=0)
