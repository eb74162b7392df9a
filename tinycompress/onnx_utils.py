"""ONNX export, ORT graph optimisation, ORT int8 quantisation and parity checks.

Everything here works on Hugging Face *sequence classifiers* (BERT, DistilBERT, MiniLM and
their structurally pruned variants) and on the ``.onnx`` files made from them.

Exporter choice (``export_onnx(..., exporter="legacy")`` by default)
--------------------------------------------------------------------
torch 2.13 defaults to the dynamo (``torch.export``) exporter, but we default to the
legacy TorchScript tracer (``dynamo=False``) with the model switched to *eager* attention
for the duration of the export, because that is the only combination that ONNX Runtime
1.32's transformer optimizer fully fuses for transformers 5 models:

* legacy + eager attention: ``Attention`` + ``EmbedLayerNormalization`` +
  ``SkipLayerNormalization`` + ``BiasGelu`` fusions (ORT ships patterns for exactly the
  transformers-5 eager mask subgraph this tracer emits); parity with PyTorch ~1e-7;
  export takes ~0.2 s.
* legacy + SDPA attention, or dynamo with either attention: numerically exact, but ORT
  fuses only SkipLayerNormalization/BiasGelu, never Attention, so the fused graph is slower.
  The dynamo exporter also takes ~4 s per export and insists on opset >= 18.

``exporter="dynamo"`` stays available for the day the legacy tracer is removed.

Pruned models
-------------
transformers 5 reshapes Q/K/V with ``view(batch, seq, -1, head_dim)``, so the exported
graph does not state the head count. ORT then either fails to detect it (``num_heads=0``:
no Attention fusion at all) or, given ``num_heads``, applies that one number to every
layer - which silently computes *wrong* logits for layers whose heads were pruned.
``optimize_onnx`` therefore first pins the ``-1`` in each Q/K/V reshape to the layer's
true head count (out_features / head_dim of that layer's projection weight), which is an
exact rewrite; ORT then detects the heads per layer and fuses every layer correctly.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import tempfile
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from .data import MODEL_INPUT_NAMES

__all__ = [
    "DEFAULT_DYNAMIC_OP_TYPES",
    "FUSED_GRAPH_OP_TYPES",
    "LogitsOnly",
    "OnnxClassifier",
    "ParityResult",
    "attention_head_counts",
    "export_onnx",
    "format_parity",
    "make_example_batch",
    "model_input_names",
    "optimize_onnx",
    "parity_check",
    "quantize_onnx_dynamic",
    "quantize_onnx_static",
    "torch_logits_fn",
]

log = logging.getLogger(__name__)

_REQUIRED_INPUTS = ("input_ids", "attention_mask")

#: Default op types for dynamic quantisation of an *unfused* export: every Linear (MatMul)
#: and every embedding lookup (Gather) - the word embedding alone is about half of
#: MiniLM-L6's parameters, so leaving Gather in fp32 would forfeit most of the size win.
DEFAULT_DYNAMIC_OP_TYPES = ("MatMul", "Gather")

#: Op types to pass to ``quantize_onnx_dynamic`` for a graph that went through
#: ``optimize_onnx``: there the Q/K/V weights live inside ``Attention`` and the word
#: embedding inside ``EmbedLayerNormalization``, which MatMul/Gather alone do not touch.
FUSED_GRAPH_OP_TYPES = ("MatMul", "Gather", "Attention", "EmbedLayerNormalization")

#: What a quantised node of each source op type looks like in ORT's output graph.
_QUANTIZED_FORM = {
    "MatMul": ("MatMulInteger", "DynamicQuantizeMatMul"),
    "Attention": ("QAttention",),
    "EmbedLayerNormalization": ("QEmbedLayerNormalization",),
    "Conv": ("ConvInteger",),
    "LSTM": ("DynamicQuantizeLSTM",),
}
_INT8_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


# --------------------------------------------------------------------------------------
# Model inputs and the logits-only wrapper shared by ONNX export and TorchScript tracing
# --------------------------------------------------------------------------------------


def model_input_names(model: torch.nn.Module) -> list[str]:
    """Return the subset of (input_ids, attention_mask, token_type_ids) ``model`` accepts.

    Uses the explicit parameters of ``model.forward``: DistilBERT swallows unknown
    keywords through ``**kwargs``, so a "does it accept it" probe would wrongly say yes.
    """
    params = inspect.signature(model.forward).parameters
    names = [n for n in MODEL_INPUT_NAMES if n in params]
    missing = [n for n in _REQUIRED_INPUTS if n not in names]
    if missing:
        raise ValueError(
            f"{type(model).__name__}.forward lacks required input(s) {missing}; "
            "expected an HF sequence classifier taking input_ids and attention_mask"
        )
    return names


class LogitsOnly(torch.nn.Module):
    """Positional-args wrapper returning only ``logits``.

    Tracers (ONNX legacy export, ``torch.jit.trace``) need positional tensor inputs and a
    tensor output; HF models take keywords and return a ``ModelOutput``.
    """

    def __init__(self, model: torch.nn.Module, input_names: Sequence[str]):
        super().__init__()
        self.model = model
        self.input_names = tuple(input_names)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and "token_type_ids" in self.input_names:
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(**kwargs)
        return out[0] if isinstance(out, tuple) else out.logits


def make_example_batch(
    model: torch.nn.Module, *, batch_size: int = 2, seq_len: int = 8, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Build a small deterministic batch (int64 tensors) for tracing ``model``.

    The last row is half padding, so the traced graph always contains the real
    padding-mask computation rather than any "no padding" shortcut.
    """
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size}, {seq_len}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 2:
        raise ValueError("model.config.vocab_size is missing; pass an explicit example_batch")
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (batch_size, seq_len), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, seq_len // 2 :] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "token_type_ids" in model_input_names(model):
        batch["token_type_ids"] = torch.zeros_like(input_ids)
    return batch


def _as_int64_tensor(name: str, value: Any) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.dim() != 2:
        raise ValueError(f"{name} must be a 2-D integer array, got {tuple(tensor.shape)} {tensor.dtype}")
    return tensor.to(torch.int64)


def _example_args(
    model: torch.nn.Module, example_batch: Mapping[str, Any] | None
) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """Validate/construct the example batch and return (input names, positional args)."""
    names = model_input_names(model)
    batch = example_batch if example_batch is not None else make_example_batch(model)
    if not isinstance(batch, Mapping):
        raise ValueError(f"example_batch must be a mapping of input name -> array, got {type(batch).__name__}")
    missing = [n for n in _REQUIRED_INPUTS if n not in batch]
    if missing:
        raise ValueError(f"example_batch lacks {missing}")
    if "token_type_ids" in names and "token_type_ids" not in batch:
        batch = {**batch, "token_type_ids": torch.zeros_like(torch.as_tensor(batch["input_ids"]))}
    args = tuple(_as_int64_tensor(n, batch[n]) for n in names)
    if any(a.shape != args[0].shape for a in args):
        raise ValueError(f"example_batch inputs differ in shape: {[tuple(a.shape) for a in args]}")
    return names, args


@contextmanager
def _export_mode(model: torch.nn.Module, *, eager_attention: bool) -> Iterator[None]:
    """Put ``model`` in eval mode (and optionally eager attention), then restore both.

    Eval mode keeps dropout out of the traced graph; restoring afterwards means exporting
    never changes the caller's model (a trainer may export mid-run).
    """
    was_training = model.training
    config = getattr(model, "config", None)
    old_attn = getattr(config, "_attn_implementation", None)
    switch = eager_attention and old_attn not in (None, "eager") and hasattr(model, "set_attn_implementation")
    try:
        model.eval()
        if switch:
            model.set_attn_implementation("eager")
        yield
    finally:
        if switch:
            model.set_attn_implementation(old_attn)
        model.train(was_training)


@contextmanager
def _quiet_known_export_warnings() -> Iterator[None]:
    """Silence warnings that are expected and harmless for HF classifiers (why below)."""
    with warnings.catch_warnings():
        # We choose the legacy exporter deliberately (see module docstring).
        warnings.filterwarnings(
            "ignore", message=r".*legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", message=r"The feature will be removed", category=DeprecationWarning)
        # masking_utils only pads the mask when it is shorter than the keys; the traced
        # branch (no padding needed) is right for every shape because both come from seq.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"transformers\.masking_utils")
        # The mask uses advanced indexing; the Gather/Reshape decomposition is exact.
        warnings.filterwarnings("ignore", message=r"Exporting aten::index operator", category=UserWarning)
        yield


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


def export_onnx(
    model: torch.nn.Module,
    path: str | Path,
    *,
    opset: int = 17,
    example_batch: Mapping[str, Any] | None = None,
    exporter: str = "legacy",
) -> Path:
    """Export an HF sequence classifier to ONNX with dynamic batch and sequence axes.

    Args:
        model: HF ``*ForSequenceClassification`` (fp32, possibly pruned). Its training flag
            and attention implementation are restored afterwards.
        path: output ``.onnx`` file; parent folders are created.
        opset: ONNX opset (>= 14; the dynamo exporter raises it to >= 18).
        example_batch: mapping with ``input_ids``, ``attention_mask`` (and
            ``token_type_ids``) used for tracing; a small padded batch is made if None.
        exporter: ``"legacy"`` (default, fusion-friendly) or ``"dynamo"``.

    Returns:
        The path written. Graph inputs are ``input_ids``, ``attention_mask`` and, only if
        the model takes it, ``token_type_ids`` (int64, shape [batch, seq]); the single
        output is ``logits`` [batch, num_labels].
    """
    if not isinstance(opset, int) or opset < 14:
        raise ValueError(f"opset must be an int >= 14, got {opset!r}")
    if exporter not in ("legacy", "dynamo"):
        raise ValueError(f"exporter must be 'legacy' or 'dynamo', got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names, args = _example_args(model, example_batch)
    with _export_mode(model, eager_attention=exporter == "legacy"), torch.no_grad():
        # Built inside the context: wrapper.eval() would flip the model's flag before
        # _export_mode records it.
        wrapper = LogitsOnly(model, names).eval()
        if exporter == "legacy":
            _export_legacy(wrapper, args, names, path, opset)
        else:
            _export_dynamo(wrapper, args, names, path, opset)
    return path


def _export_legacy(wrapper, args, names, path: Path, opset: int) -> None:
    axes = {n: {0: "batch", 1: "seq"} for n in names}
    axes["logits"] = {0: "batch"}
    with _quiet_known_export_warnings():
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=list(names),
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _export_dynamo(wrapper, args, names, path: Path, opset: int) -> None:
    # One Dim object per axis shared by all inputs tells torch.export they are equal,
    # which also gives the ONNX graph the readable axis names "batch" and "seq".
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    with warnings.catch_warnings():
        # Both are torch-internal notices: the shared Dim objects make inputs share names,
        # and torch.export itself still uses the deprecated pytree LeafSpec check.
        warnings.filterwarnings("ignore", message=r".*axis name.*will not be used", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=FutureWarning)
        torch.onnx.export(
            wrapper,
            args,
            str(path),
            input_names=list(names),
            output_names=["logits"],
            dynamic_shapes={n: {0: batch, 1: seq} for n in names},
            opset_version=max(opset, 18),  # the dynamo exporter has no opset<18 kernels
            dynamo=True,
            optimize=True,
            external_data=False,
            verbose=False,  # no progress prints
        )


# --------------------------------------------------------------------------------------
# ORT transformer optimizer
# --------------------------------------------------------------------------------------


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Map tensor name -> value for initializers and ``Constant`` nodes."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _projection_out_features(add_node, producers, values) -> int | None:
    """Out features of the Linear (MatMul + Add) feeding a reshape, if recognisable."""
    for name in add_node.input:
        matmul = producers.get(name)
        if matmul is None or matmul.op_type != "MatMul":
            continue
        for weight_name in matmul.input:
            weight = values.get(weight_name)
            if weight is not None and weight.ndim == 2:
                return int(weight.shape[1])
    return None


def _single_int(value: np.ndarray | None) -> int | None:
    return int(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _pin_attention_head_counts(model: onnx.ModelProto) -> list[int]:
    """Replace the ``-1`` head axis of every Q/K/V reshape with the layer's head count.

    Matches ``MatMul -> Add -> Reshape(shape=Concat(b, s, -1, head_dim))``; the head count is
    the projection's out_features / head_dim. Each rewritten reshape gets its own Concat,
    because exporters share one Concat between layers that may have different head counts.
    Returns the pinned head count of each rewritten reshape (3 per attention layer).
    """
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    values = _constant_values(graph)
    plans = []  # (index of reshape, reshape, concat, heads)
    for index, node in enumerate(graph.node):
        if node.op_type != "Reshape":
            continue
        concat, add = producers.get(node.input[1]), producers.get(node.input[0])
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
            continue
        if add is None or add.op_type != "Add":
            continue
        head_axis = _single_int(values.get(concat.input[2]))
        head_dim = _single_int(values.get(concat.input[3]))
        out_features = _projection_out_features(add, producers, values)
        if head_axis != -1 or not head_dim or head_dim <= 0 or not out_features or out_features % head_dim:
            continue
        plans.append((index, node, concat, out_features // head_dim, values[concat.input[2]].dtype))
    for index, reshape, concat, heads, dtype in reversed(plans):
        name = f"tinycompress_num_heads_{heads}"
        if not any(init.name == name for init in graph.initializer):
            graph.initializer.append(numpy_helper.from_array(np.array([heads], dtype=dtype), name))
        pinned = copy.deepcopy(concat)
        pinned.name = f"{reshape.name or reshape.output[0]}_pinned_shape"
        pinned.input[2] = name
        pinned.output[0] = f"{pinned.name}_out"
        reshape.input[1] = pinned.output[0]
        graph.node.insert(index, pinned)
    _drop_dead_nodes(graph)
    return [plan[3] for plan in plans]


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nobody reads (ONNX ops have no side effects).

    Keeps ORT from logging "Removing initializer ..." for the Constants we orphaned.
    """
    while True:
        used = _names_read(graph) | {out.name for out in graph.output}
        alive = [n for n in graph.node if any(o in used for o in n.output if o)]
        if len(alive) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(alive)


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node of ``graph`` or of its subgraphs (If/Loop bodies)."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                names |= _names_read(sub)
    return names


def _canonical_model_type(model_type: str) -> str:
    from onnxruntime.transformers.optimizer import MODEL_TYPES

    from .arch import SUPPORTED_MODEL_TYPES, ort_model_type

    canonical = ort_model_type(model_type.lower())
    if canonical not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; ORT knows {sorted(MODEL_TYPES)} (+ {', '.join(SUPPORTED_MODEL_TYPES)})")
    return canonical


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


@contextmanager
def _filtered_loggers(names: Sequence[str], *fragments: str) -> Iterator[None]:
    loggers, flt = [logging.getLogger(n) for n in names], _DropMessages(*fragments)
    for logger in loggers:
        logger.addFilter(flt)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(flt)


# onnxruntime.transformers puts its own folder on sys.path and imports its fusion modules
# as top-level modules, so their loggers are named "fusion_attention", not the package path.
_FUSION_ATTENTION_LOGGERS = ("fusion_attention", "onnxruntime.transformers.fusion_attention")


def optimize_onnx(
    in_path: str | Path,
    out_path: str | Path,
    *,
    model_type: str,
    num_heads: int = 0,
    hidden_size: int = 0,
) -> dict[str, int]:
    """Fuse a BERT-family ONNX graph with ORT's transformer optimizer.

    Args:
        in_path: fp32 graph from ``export_onnx`` (legacy exporter for Attention fusion).
        out_path: where to write the fused graph.
        model_type: an HF model type of :mod:`tinycompress.arch` (``"bert"``, ``"distilbert"``:
            mapped through ``ArchSpec.ort_model_type``) or any key of
            ``onnxruntime.transformers.optimizer.MODEL_TYPES``.
        num_heads, hidden_size: 0 = detect. Head counts are pinned per layer before
            fusion (see module docstring), so pruned layers are detected correctly and
            these values only matter for graphs whose heads could not be pinned.

    Returns:
        Fused-op counts, e.g. ``{"Attention": 6, "EmbedLayerNormalization": 1,
        "SkipLayerNormalization": 12, "BiasGelu": 6, ...}`` (zeros included), plus
        ``"pinned_attention_layers"``: how many layers had their head count pinned.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    canonical = _canonical_model_type(model_type)
    for name, value in (("num_heads", num_heads), ("hidden_size", hidden_size)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0 (0 = detect), got {value!r}")
    model = onnx.load(str(in_path))
    pinned = _pin_attention_head_counts(model)
    # ORT warns about every pruned layer that its Q/K/V width differs from the input
    # width; that is exactly what pruning does and ORT handles it (qkv_hidden_sizes).
    with _filtered_loggers(_FUSION_ATTENTION_LOGGERS, "is not same as weight matrix dimension"):
        optimized = optimize_model(model, model_type=canonical, num_heads=num_heads, hidden_size=hidden_size)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    optimized.save_model_to_file(str(out_path))
    stats = _fused_op_stats(optimized)
    stats["pinned_attention_layers"] = len(pinned) // 3
    return stats


def _fused_op_stats(optimized) -> dict[str, int]:
    if hasattr(optimized, "get_fused_operator_statistics"):
        return {k: int(v) for k, v in optimized.get_fused_operator_statistics().items()}
    return dict(Counter(node.op_type for node in optimized.model.graph.node))


def attention_head_counts(path: str | Path) -> list[int]:
    """Return ``num_heads`` of every fused (Q)Attention node in graph order."""
    graph = onnx.load(str(path), load_external_data=False).graph
    heads = []
    for node in graph.node:
        if node.op_type in ("Attention", "QAttention"):
            attr = next((a for a in node.attribute if a.name == "num_heads"), None)
            heads.append(int(onnx.helper.get_attribute_value(attr)) if attr is not None else -1)
    return heads


# --------------------------------------------------------------------------------------
# ORT quantisation
# --------------------------------------------------------------------------------------


def _validate_op_types(op_types: Iterable[str], registry: Mapping[str, Any], kind: str) -> list[str]:
    if isinstance(op_types, str):
        raise ValueError("op_types must be a sequence of op type names, not a single string")
    ops = list(op_types)
    unknown = [op for op in ops if op not in registry]
    if not ops or unknown:
        raise ValueError(f"op_types for {kind} quantisation must be non-empty and within {sorted(registry)}; got {ops}")
    return ops


def _preprocess_for_quantization(in_path: Path, out_path: Path) -> Path:
    """Run ORT's recommended ``quant_pre_process`` (shape inference + basic optimisation).

    Symbolic shape inference is needed to type ORT's fused contrib ops (Attention, ...),
    but on a plain export it gives up on the transformers-5 mask subgraph *and* then dumps
    ``sym_shape_infer_temp.onnx`` + a ``<uuid>.data`` file into the current directory.
    So it runs only when the graph has contrib ops; plain graphs get ONNX shape inference.
    Returns the path to quantise.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    graph = onnx.load(str(in_path), load_external_data=False).graph
    has_contrib_ops = any(node.domain == "com.microsoft" for node in graph.node)
    quant_pre_process(str(in_path), str(out_path), skip_symbolic_shape=not has_contrib_ops)
    return out_path


def _initializer_types(graph: onnx.GraphProto) -> dict[str, int]:
    return {init.name: init.data_type for init in graph.initializer}


def _count_dynamic_quantized(graph: onnx.GraphProto, op_types: Sequence[str]) -> dict[str, int]:
    ops = Counter(node.op_type for node in graph.node)
    init_types = _initializer_types(graph)
    counts = {}
    for op in op_types:
        if op == "Gather":  # quantised Gather keeps its op type but reads an int8 table
            counts[op] = sum(
                1 for n in graph.node if n.op_type == "Gather" and init_types.get(n.input[0]) in _INT8_TYPES
            )
        else:
            counts[op] = sum(ops[q] for q in _QUANTIZED_FORM.get(op, (f"Q{op}", f"{op}Integer")))
    return counts


def _warn_unrequested_fused_ops(graph: onnx.GraphProto, ops: Sequence[str]) -> None:
    present = {node.op_type for node in graph.node}
    skipped = sorted(({"Attention", "EmbedLayerNormalization"} & present) - set(ops))
    if skipped:
        warnings.warn(
            f"graph contains fused {skipped} nodes that op_types={list(ops)} leaves in fp32; "
            "pass op_types=FUSED_GRAPH_OP_TYPES to quantise their weights too",
            UserWarning,
            stacklevel=3,
        )


def quantize_onnx_dynamic(
    in_path: str | Path,
    out_path: str | Path,
    *,
    op_types: Sequence[str] = DEFAULT_DYNAMIC_OP_TYPES,
    per_channel: bool = False,
) -> dict[str, int]:
    """Dynamic int8 quantisation with ORT (QInt8 weights, activations quantised at run time).

    Args:
        in_path: fp32 graph (raw export, or optimised - then use ``FUSED_GRAPH_OP_TYPES``).
        out_path: where to write the int8 graph.
        op_types: ORT op types whose weights get quantised.
        per_channel: per-output-channel weight scales (MatMul) instead of per-tensor.

    Returns:
        For each requested op type, how many nodes in the output graph are quantised
        forms of it (MatMul -> MatMulInteger, Gather -> Gather on an int8 table,
        Attention -> QAttention, EmbedLayerNormalization -> QEmbedLayerNormalization).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    ops = _validate_op_types(op_types, IntegerOpsRegistry, "dynamic")
    in_path, out_path = Path(in_path), Path(out_path)
    _warn_unrequested_fused_ops(onnx.load(str(in_path), load_external_data=False).graph, ops)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = _preprocess_for_quantization(in_path, Path(tmp) / "preprocessed.onnx")
        quantize_dynamic(
            str(source),
            str(out_path),
            op_types_to_quantize=ops,
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            # Shape inference cannot type the outputs of ORT contrib ops (Attention, ...);
            # everything in these graphs is fp32, so say so instead of failing.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return _count_dynamic_quantized(onnx.load(str(out_path)).graph, ops)


class _ListDataReader:
    """ORT ``CalibrationDataReader`` over a list of input dicts, fed in order once.

    ORT's reader ABC accepts any class with ``get_next`` (``__subclasshook__``).
    """

    def __init__(self, batches: Sequence[Mapping[str, Any]], input_names: Sequence[str]):
        self._feeds = [_feed_for(batch, input_names) for batch in batches]
        self._index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._index >= len(self._feeds):
            return None
        self._index += 1
        return self._feeds[self._index - 1]

    def rewind(self) -> None:
        self._index = 0


def _feed_for(batch: Mapping[str, Any], input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Select and int64-cast the inputs a graph declares; token_type_ids default to 0."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"each batch must be a mapping of input name -> array, got {type(batch).__name__}")
    feed = {}
    for name in input_names:
        if name in batch and batch[name] is not None:
            feed[name] = _to_int64_array(name, batch[name])
        elif name == "token_type_ids" and "input_ids" in batch:
            feed[name] = np.zeros_like(_to_int64_array("input_ids", batch["input_ids"]))
        else:
            raise ValueError(f"batch lacks graph input {name!r} (has {sorted(batch)})")
    shapes = {a.shape for a in feed.values()}
    if len(shapes) != 1:
        raise ValueError(f"inputs differ in shape: { {k: v.shape for k, v in feed.items()} }")
    return feed


def _to_int64_array(name: str, value: Any) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be a 2-D integer array, got shape {array.shape} dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _count_qdq_quantized(graph: onnx.GraphProto, op_types: Sequence[str]) -> dict[str, int]:
    producers = {out: node.op_type for node in graph.node for out in node.output}
    counts = {
        op: sum(
            1
            for node in graph.node
            if node.op_type == op and any(producers.get(i) == "DequantizeLinear" for i in node.input)
        )
        for op in op_types
    }
    ops = Counter(node.op_type for node in graph.node)
    counts["QuantizeLinear"] = ops["QuantizeLinear"]
    counts["DequantizeLinear"] = ops["DequantizeLinear"]
    return counts


def quantize_onnx_static(
    in_path: str | Path,
    out_path: str | Path,
    calibration_batches: Sequence[Mapping[str, Any]],
    *,
    per_channel: bool = False,
    op_types: Sequence[str] = DEFAULT_DYNAMIC_OP_TYPES,
) -> dict[str, int]:
    """Static int8 quantisation in QDQ format, calibrated (MinMax) on ``calibration_batches``.

    Args:
        in_path: fp32 graph (raw ``export_onnx`` output is the tested path).
        out_path: where to write the QDQ graph.
        calibration_batches: non-empty list of dicts ``{input name: int array [b, s]}``;
            keys the graph does not declare are ignored, missing token_type_ids become 0.
        per_channel: per-channel weight scales.
        op_types: op types to wrap in Q/DQ pairs.

    Returns:
        For each op type, how many of its nodes read a DequantizeLinear output, plus the
        total ``QuantizeLinear``/``DequantizeLinear`` node counts. Activations and weights
        are both QInt8 (ORT's recommended S8S8 for QDQ on CPU).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry

    ops = _validate_op_types(op_types, QDQRegistry, "static QDQ")
    if isinstance(calibration_batches, Mapping) or not calibration_batches:
        raise ValueError("calibration_batches must be a non-empty list of input dicts")
    in_path, out_path = Path(in_path), Path(out_path)
    graph_inputs = [i.name for i in onnx.load(str(in_path), load_external_data=False).graph.input]
    reader = _ListDataReader(calibration_batches, graph_inputs)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = _preprocess_for_quantization(in_path, Path(tmp) / "preprocessed.onnx")
        quantize_static(
            str(source),
            str(out_path),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=ops,
            per_channel=per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return _count_qdq_quantized(onnx.load(str(out_path)).graph, ops)


# --------------------------------------------------------------------------------------
# Inference wrapper and sizes
# --------------------------------------------------------------------------------------


class OnnxClassifier:
    """Run an exported classifier with ONNX Runtime on CPU.

    ``OnnxClassifier(path, num_threads=None)``; ``clf(input_ids, attention_mask,
    token_type_ids=None)`` takes int arrays/tensors of shape [batch, seq] and returns
    fp32 numpy logits [batch, num_labels]. Only inputs the graph declares are fed;
    ``token_type_ids`` defaults to zeros when the graph wants it and none is given.
    """

    def __init__(self, path: str | Path, num_threads: int | None = None):
        import onnxruntime as ort

        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
        options = ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = "logits" if "logits" in outputs else outputs[0]

    def __call__(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> np.ndarray:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feed = _feed_for(batch, self.input_names)
        return self.session.run([self.output_name], feed)[0]


# --------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------


def torch_logits_fn(model: torch.nn.Module) -> Callable[..., np.ndarray]:
    """Wrap a torch classifier as ``fn(input_ids, attention_mask, token_type_ids=None)``
    returning numpy logits, the same call signature as ``OnnxClassifier``.

    Runs under ``no_grad`` in whatever mode the model is in (call ``.eval()`` first).
    """
    names = model_input_names(model)

    def run(input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> np.ndarray:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feed = {k: torch.from_numpy(v) for k, v in _feed_for(batch, names).items()}
        with torch.no_grad():
            out = model(**feed)
        logits = out[0] if isinstance(out, tuple) else getattr(out, "logits", out)
        return logits.detach().float().cpu().numpy()

    return run


@dataclass(frozen=True)
class ParityResult:
    """Comparison of candidate vs reference logits on one batch."""

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float  # NaN if either side produced NaN
    label_agreement_pct: float  # % of rows whose argmax label matches
    atol: float
    passed: bool  # max_abs_diff <= atol (NaN never passes)


def _named_batches(batches) -> list[tuple[str, Mapping[str, Any]]]:
    if isinstance(batches, Mapping):
        items = list(batches.items())
    else:
        items = [(f"batch{i}", b) for i, b in enumerate(batches)]
    if not items:
        raise ValueError("parity_check needs at least one batch")
    return [(str(name), batch) for name, batch in items]


def parity_check(
    reference_fn: Callable[..., Any],
    candidate_fn: Callable[..., Any],
    batches: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    *,
    atol: float,
) -> list[ParityResult]:
    """Compare two logits functions batch by batch.

    Args:
        reference_fn, candidate_fn: called as ``fn(**batch)`` and returning logits
            [batch, num_labels] (numpy or torch); e.g. ``torch_logits_fn(model)`` and an
            ``OnnxClassifier``. Batches must therefore hold only model inputs.
        batches: ``{name: batch}`` or a list of batches (named ``batch0``, ``batch1``...).
        atol: largest allowed ``max |reference - candidate|``.

    Returns:
        One ``ParityResult`` per batch. Raises ``ValueError`` if the two functions return
        logits of different shapes (that is a bug, not a tolerance question).
    """
    if not isinstance(atol, (int, float)) or not atol >= 0:
        raise ValueError(f"atol must be a number >= 0, got {atol!r}")
    results = []
    for name, batch in _named_batches(batches):
        ref = _as_logits(reference_fn(**batch))
        cand = _as_logits(candidate_fn(**batch))
        if ref.shape != cand.shape:
            raise ValueError(f"batch {name!r}: logits shape {cand.shape} != reference {ref.shape}")
        diff = float(np.max(np.abs(ref - cand))) if ref.size else 0.0
        if np.isnan(ref).any() or np.isnan(cand).any():
            diff = float("nan")
        agree = float(np.mean(ref.argmax(-1) == cand.argmax(-1)) * 100.0) if ref.size else 100.0
        passed = math.isfinite(diff) and diff <= atol
        results.append(ParityResult(name, tuple(ref.shape), diff, agree, float(atol), passed))
    return results


def _as_logits(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def format_parity(results: Iterable[ParityResult]) -> list[str]:
    """Render results as lines like ``✓ short  max|Δ|=1.2e-06 labels 100.0%``."""
    results = list(results)
    width = max((len(r.name) for r in results), default=0)
    return [
        f"{'✓' if r.passed else '✗'} {r.name:<{width}}  max|Δ|={r.max_abs_diff:.1e} "
        f"labels {r.label_agreement_pct:.1f}%"
        for r in results
    ]
