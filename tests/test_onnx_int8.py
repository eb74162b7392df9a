"""ONNX export/optimise/quantise and the torch int8 backend on tiny random classifiers.

Models are built here (vocab 100, hidden 32, 2 layers, 4 heads, FFN 37), seeded, with
*all* parameters re-drawn so biases and LayerNorms are non-trivial (HF's init zeroes
biases, which lets exporters merge identical initializers and hides bugs).
"""

from __future__ import annotations

import pickle

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
)

from tinycompress.exporters import onnx as onnx_export
from tinycompress.exporters import torchscript
from tinycompress.exporters.onnx import export_onnx
from tinycompress.exporters.ort_fusion import attention_head_counts, optimize_onnx
from tinycompress.exporters.parity import format_parity, parity_check, torch_logits_fn
from tinycompress.inference.onnx_session import OnnxClassifier
from tinycompress.quantization import torch as torch_int8
from tinycompress.quantization.onnx import FUSED_GRAPH_OP_TYPES, quantize_onnx_dynamic, quantize_onnx_static

VOCAB, HIDDEN, LAYERS, HEADS, FFN, LABELS = 100, 32, 2, 4, 37, 3
HEAD_DIM = HIDDEN // HEADS


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model.eval()


def build_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=64,
        num_labels=LABELS,
    )
    return _randomize(BertForSequenceClassification(config), seed=1)


def build_distilbert() -> DistilBertForSequenceClassification:
    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=VOCAB,
        dim=HIDDEN,
        n_layers=LAYERS,
        n_heads=HEADS,
        hidden_dim=FFN,
        max_position_embeddings=64,
        num_labels=LABELS,
    )
    return _randomize(DistilBertForSequenceClassification(config), seed=2)


def _sliced_linear(old: nn.Linear, rows: slice = slice(None), cols: slice = slice(None)) -> nn.Linear:
    weight = old.weight.data[rows, cols]
    new = nn.Linear(weight.shape[1], weight.shape[0])
    new.weight.data = weight.clone()
    new.bias.data = old.bias.data[rows].clone()
    return new


def keep_two_heads_in_layer0(model: BertForSequenceClassification) -> BertForSequenceClassification:
    """Simulate head pruning: layer 0 keeps heads 0-1 (Q/K/V 32->16, output 16->32)."""
    attention = model.bert.encoder.layer[0].attention
    kept = slice(0, 2 * HEAD_DIM)
    for name in ("query", "key", "value"):
        setattr(attention.self, name, _sliced_linear(getattr(attention.self, name), rows=kept))
    attention.output.dense = _sliced_linear(attention.output.dense, cols=kept)
    return model.eval()


def build_pruned_bert() -> BertForSequenceClassification:
    return keep_two_heads_in_layer0(build_bert())


BUILDERS = {"bert": build_bert, "distilbert": build_distilbert, "pruned": build_pruned_bert}


def make_batch(batch_size: int, seq_len: int, *, pad: bool, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(1, VOCAB, size=(batch_size, seq_len), dtype=np.int64)
    attention_mask = np.ones_like(input_ids)
    if pad:  # first row half padding, as a tokenizer would produce
        attention_mask[0, seq_len // 2 :] = 0
        input_ids[0, seq_len // 2 :] = 0
    token_type_ids = np.zeros_like(input_ids)
    token_type_ids[:, seq_len // 2 :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


# Different batch sizes *and* lengths from the export example (2 x 8): proves dynamic axes.
BATCHES = {
    "short": make_batch(1, 3, pad=False, seed=0),
    "padded": make_batch(3, 9, pad=True, seed=1),
    "long": make_batch(5, 17, pad=True, seed=2),
}


@pytest.fixture(autouse=True)
def no_files_in_cwd(tmp_path_factory, monkeypatch):
    """ORT tools like to drop temp files into the CWD; none of ours may."""
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)
    yield
    assert not list(cwd.iterdir()), f"files leaked into the working directory: {list(cwd.iterdir())}"


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    return {name: export_onnx(model, out / f"{name}.onnx") for name, model in models.items()}


@pytest.fixture(scope="module")
def optimized(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_opt")
    result = {}
    for name, path in exported.items():
        model_type = "distilbert" if name == "distilbert" else "bert"
        stats = optimize_onnx(path, out / f"{name}.onnx", model_type=model_type, num_heads=0, hidden_size=0)
        result[name] = (out / f"{name}.onnx", stats)
    return result


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", ["bert", "distilbert", "pruned"])
def test_export_matches_pytorch_on_dynamic_shapes(models, exported, name):
    model = models[name]
    classifier = OnnxClassifier(exported[name], num_threads=1)
    expected_inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if name != "distilbert" else [])
    assert classifier.input_names == expected_inputs
    graph = onnx.load(str(exported[name])).graph
    for graph_input in graph.input:
        assert [d.dim_param for d in graph_input.type.tensor_type.shape.dim] == ["batch", "seq"]
    assert [o.name for o in graph.output] == ["logits"]

    results = parity_check(torch_logits_fn(model), classifier, BATCHES, atol=1e-4)
    assert [r.shape for r in results] == [(1, LABELS), (3, LABELS), (5, LABELS)]
    assert all(r.passed for r in results), format_parity(results)
    assert all(line.startswith("✓ ") for line in format_parity(results))
    assert not model.training  # export restored eval mode, not the exporter's default


def test_export_leaves_model_state_alone(tmp_path):
    model = build_bert().train()
    attn = model.config._attn_implementation
    export_onnx(model, tmp_path / "m.onnx")
    assert model.training and model.config._attn_implementation == attn


def test_dynamo_exporter_also_matches(models, tmp_path):
    path = export_onnx(models["distilbert"], tmp_path / "dynamo.onnx", exporter="dynamo")
    results = parity_check(torch_logits_fn(models["distilbert"]), OnnxClassifier(path), BATCHES, atol=1e-4)
    assert all(r.passed for r in results), format_parity(results)


# ----------------------------------------------------------------------------- optimise


@pytest.mark.parametrize("name, heads", [("bert", [4, 4]), ("distilbert", [4, 4]), ("pruned", [2, 4])])
def test_optimizer_fuses_attention_per_layer(models, optimized, name, heads):
    path, stats = optimized[name]
    assert stats["Attention"] == LAYERS
    assert stats["SkipLayerNormalization"] >= LAYERS
    assert stats["EmbedLayerNormalization"] == 1
    assert stats["pinned_attention_layers"] == LAYERS
    assert attention_head_counts(path) == heads  # the pruned layer keeps its own 2 heads
    results = parity_check(torch_logits_fn(models[name]), OnnxClassifier(path), BATCHES, atol=1e-4)
    assert all(r.passed for r in results), format_parity(results)


# ----------------------------------------------------------------------------- ORT int8


def _int8_gathers(graph: onnx.GraphProto) -> int:
    # ORT stores dynamically quantised embedding tables as uint8 (its activation type).
    eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    int8_inits = {i.name for i in graph.initializer if i.data_type in eight_bit}
    return sum(1 for n in graph.node if n.op_type == "Gather" and n.input[0] in int8_inits)


FIXED = make_batch(8, 12, pad=True, seed=7)


def test_dynamic_int8_quantizes_matmul_and_gather(models, exported, tmp_path):
    out = tmp_path / "bert.int8.onnx"
    counts = quantize_onnx_dynamic(exported["bert"], out)
    graph = onnx.load(str(out)).graph
    ops = {n.op_type for n in graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear", "DequantizeLinear"} <= ops
    # word, position and token-type embeddings all read int8 tables
    assert _int8_gathers(graph) == 3 == counts["Gather"]
    # 3 QKV + 1 output + 2 FFN per layer, + pooler and classifier (pre-processing turns
    # their Gemm into MatMul); activation x activation MatMuls (QK^T, AV) stay fp32.
    assert counts["MatMul"] == 6 * LAYERS + 2
    assert out.stat().st_size < exported["bert"].stat().st_size

    reference, candidate = torch_logits_fn(models["bert"]), OnnxClassifier(out)
    (result,) = parity_check(reference, candidate, {"fixed": FIXED}, atol=0.1)
    assert result.label_agreement_pct == 100.0, format_parity([result])


def test_dynamic_int8_of_fused_pruned_graph(models, optimized, tmp_path):
    fused, _ = optimized["pruned"]
    out = tmp_path / "pruned.fused.int8.onnx"
    counts = quantize_onnx_dynamic(fused, out, op_types=FUSED_GRAPH_OP_TYPES)
    assert counts["Attention"] == LAYERS and counts["EmbedLayerNormalization"] == 1 and counts["MatMul"] > 0
    assert attention_head_counts(out) == [2, 4]
    assert out.stat().st_size < fused.stat().st_size
    (result,) = parity_check(torch_logits_fn(models["pruned"]), OnnxClassifier(out), {"fixed": FIXED}, atol=0.1)
    assert result.label_agreement_pct == 100.0, format_parity([result])


def test_dynamic_int8_warns_when_fused_weights_would_stay_fp32(optimized, tmp_path):
    fused, _ = optimized["bert"]
    with pytest.warns(UserWarning, match="FUSED_GRAPH_OP_TYPES"):
        quantize_onnx_dynamic(fused, tmp_path / "partial.onnx")


def test_static_qdq_runs(models, exported, tmp_path):
    out = tmp_path / "distil.qdq.onnx"
    calibration = [make_batch(4, 10, pad=True, seed=s) for s in range(3)]  # has extra token_type_ids
    counts = quantize_onnx_static(exported["distilbert"], out, calibration)
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > 0 and counts["MatMul"] > 0
    logits = OnnxClassifier(out)(**BATCHES["long"])
    assert logits.shape == (5, LABELS) and np.isfinite(logits).all()
    # int8 rounding, not a broken graph: close to the fp32 model, same labels.
    results = parity_check(torch_logits_fn(models["distilbert"]), OnnxClassifier(out), BATCHES, atol=0.1)
    assert all(r.passed and r.label_agreement_pct == 100.0 for r in results), format_parity(results)


# ----------------------------------------------------------------------------- torch int8


def _forbid_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle must not be used to load an int8 checkpoint")

    for target, attr in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, attr, refuse)


@pytest.mark.parametrize("name", ["bert", "distilbert", "pruned"])
def test_torch_int8_round_trip_is_exact_and_pickle_free(models, tmp_path, monkeypatch, name):
    model = models[name]
    qmodel = torch_int8.quantize_torch_dynamic(model)
    assert isinstance(qmodel.get_input_embeddings(), torch_int8.Int8Embedding)
    assert not any(type(m) is nn.Linear for m in qmodel.modules())
    assert any(type(m) is nn.Linear for m in model.modules())  # original untouched

    batch = {k: torch.from_numpy(v) for k, v in BATCHES["long"].items() if k in onnx_export.model_input_names(model)}
    with torch.no_grad():
        before = qmodel(**batch).logits
        fp32 = model(**batch).logits
    assert torch.equal(before.argmax(-1), fp32.argmax(-1))

    written = torch_int8.save_torch_int8(qmodel, tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == sorted(p.name for p in written)
    assert {p.suffix for p in written} <= {".safetensors", ".json", ".yaml"}

    _forbid_pickle(monkeypatch)
    reloaded = torch_int8.load_torch_int8(tmp_path / "ckpt", BUILDERS[name])
    with torch.no_grad():
        after = reloaded(**batch).logits
    assert torch.equal(before, after)

    monkeypatch.undo()
    model.save_pretrained(tmp_path / "fp32")  # safetensors
    fp32_bytes = sum(p.stat().st_size for p in (tmp_path / "fp32").glob("*.safetensors"))
    assert sum(p.stat().st_size for p in written) < fp32_bytes


def test_torch_int8_per_channel_round_trip(models, tmp_path):
    qmodel = torch_int8.quantize_torch_dynamic(models["bert"], per_channel=True)
    torch_int8.save_torch_int8(qmodel, tmp_path)
    reloaded = torch_int8.load_torch_int8(tmp_path, build_bert)
    batch = {k: torch.from_numpy(v) for k, v in BATCHES["padded"].items()}
    with torch.no_grad():
        assert torch.equal(qmodel(**batch).logits, reloaded(**batch).logits)


def test_torch_int8_load_rejects_wrong_architecture(models, tmp_path):
    torch_int8.save_torch_int8(torch_int8.quantize_torch_dynamic(models["pruned"]), tmp_path)
    with pytest.raises(ValueError, match="pruned|does not match"):
        torch_int8.load_torch_int8(tmp_path, build_bert)  # unpruned skeleton


# ----------------------------------------------------------------------------- TorchScript


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("name", ["bert", "distilbert"])
def test_torchscript_round_trip_matches_eager(models, tmp_path, name, quantized):
    model = torch_int8.quantize_torch_dynamic(models[name]) if quantized else models[name]
    traced = torchscript.script_or_trace(model)
    path = torchscript.save_torchscript(traced, tmp_path / "model.pt")
    loaded = torchscript.load_torchscript(path)
    names = onnx_export.model_input_names(model)
    for batch in BATCHES.values():
        args = [torch.from_numpy(batch[n]) for n in names]
        with torch.no_grad():
            eager = model(**dict(zip(names, args))).logits
            scripted = loaded(*args)
        torch.testing.assert_close(scripted, eager, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- helpers & errors


def test_parity_reports_failures_and_rejects_shape_mismatch():
    batch = {"input_ids": np.ones((2, 3), np.int64), "attention_mask": np.ones((2, 3), np.int64)}
    ref = lambda **b: np.array([[0.0, 1.0], [1.0, 0.0]])  # noqa: E731
    off = lambda **b: np.array([[0.0, 1.5], [0.0, 1.0]])  # noqa: E731
    (result,) = parity_check(ref, off, [batch], atol=1e-3)
    assert not result.passed and result.label_agreement_pct == 50.0
    assert format_parity([result]) == ["✗ batch0  max|Δ|=1.0e+00 labels 50.0%"]
    with pytest.raises(ValueError, match="shape"):
        parity_check(ref, lambda **b: np.zeros((2, 3)), [batch], atol=1.0)
    with pytest.raises(ValueError, match="atol"):
        parity_check(ref, ref, [batch], atol=-1)
    with pytest.raises(ValueError, match="at least one"):
        parity_check(ref, ref, [], atol=1.0)


def test_bad_inputs_raise_value_error(models, exported, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(models["bert"], tmp_path / "x.onnx", opset=9)
    with pytest.raises(ValueError, match="attention_mask"):
        export_onnx(models["bert"], tmp_path / "x.onnx", example_batch={"input_ids": np.ones((1, 4), np.int64)})
    with pytest.raises(ValueError, match="model_type"):
        optimize_onnx(exported["bert"], tmp_path / "o.onnx", model_type="llama-ish")
    with pytest.raises(ValueError, match="op_types"):
        quantize_onnx_dynamic(exported["bert"], tmp_path / "q.onnx", op_types=("Softmax",))
    with pytest.raises(ValueError, match="calibration_batches"):
        quantize_onnx_static(exported["bert"], tmp_path / "s.onnx", [])
    with pytest.raises(ValueError, match="2-D integer"):
        OnnxClassifier(exported["bert"])(np.ones((2, 3), np.float32), np.ones((2, 3), np.int64))
    with pytest.raises(ValueError, match="num_threads"):
        OnnxClassifier(exported["bert"], num_threads=0)
    with pytest.raises(ValueError, match="no int8 modules"):
        torch_int8.save_torch_int8(models["bert"], tmp_path / "nope")
