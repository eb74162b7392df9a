"""ONNX Runtime's transformer optimizer on exported BERT-family graphs: Attention,
EmbedLayerNormalization, SkipLayerNormalization and BiasGelu fusion, made exact for pruned models.

Full fusion needs the legacy exporter with eager attention (see :mod:`tinycompress.exporters.onnx`);
:func:`export_optimized_onnx` exports and fuses in one call, as the quantize stage does.

Pruned models
-------------
transformers 5 reshapes Q/K/V with ``view(batch, seq, -1, head_dim)``, so the exported
graph does not state the head count. ORT then either fails to detect it (``num_heads=0``:
no Attention fusion at all) or, given ``num_heads``, applies that one number to every
layer - which silently computes *wrong* logits for layers whose heads were pruned.
``optimize_onnx`` therefore first pins the ``-1`` in each Q/K/V reshape to the layer's
true head count (out_features / head_dim of that layer's projection weight), which is an
exact rewrite; ORT then detects the heads per layer and fuses every layer correctly.

A layer that lost *all* its heads has no attention subgraph at all (its block is
``LayerNorm(x + bias)``, see :mod:`tinycompress.models.structure`): nothing is pinned or fused
there, so there is one fused Attention per layer *with* heads. ORT fuses the embedding
(EmbedLayerNormalization) only when an Attention follows it: if the first layer has no heads
the embedding stays unfused (Gather + LayerNormalization), which is exact, only less fused.
"""

from __future__ import annotations

import copy
import logging
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper


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

    from tinycompress.models.arch import SUPPORTED_MODEL_TYPES, ort_model_type

    canonical = ort_model_type(model_type.lower())
    if canonical not in MODEL_TYPES:
        raise ValueError(
            f"unknown model_type {model_type!r}; ORT knows {sorted(MODEL_TYPES)} (+ {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
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
        model_type: an HF model type of :mod:`tinycompress.models.arch` (``"bert"``, ``"distilbert"``:
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


def export_optimized_onnx(model, path: Path, *, opset: int, scratch: Path) -> dict[str, Any]:
    """Export ``model`` to ONNX and fuse it with ORT's transformer optimizer into ``path``.

    Returns ``{"fused_ops": {op: count > 0}, "attention_fusion": bool, "fused_attention_heads":
    [heads per fused layer]}`` (layers without heads have no fused Attention, so no entry). Families ORT has no fusions for (``ArchSpec.ort_model_type``
    None) are exported unfused.
    """
    from tinycompress.exporters.onnx import export_onnx
    from tinycompress.models.arch import get_arch

    raw = export_onnx(model, scratch / "fp32-raw.onnx", opset=opset)
    ort_type = get_arch(model).ort_model_type
    if ort_type is None:
        shutil.copyfile(raw, path)
        return {"fused_ops": {}, "attention_fusion": False, "fused_attention_heads": []}
    stats = optimize_onnx(raw, path, model_type=ort_type)
    fused = {op: n for op, n in stats.items() if n and op != "pinned_attention_layers"}
    return {
        "fused_ops": fused,
        "attention_fusion": fused.get("Attention", 0) > 0,
        "fused_attention_heads": attention_head_counts(path),
    }
