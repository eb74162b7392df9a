"""The ONNX Runtime recipes ``quantize --tolerance`` tries, the node groups it may keep in fp32,
and building one candidate (:mod:`tinycompress.quantization.tuning` runs the search)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from tinycompress.config import QuantizeSettings
from tinycompress.exporters.onnx import export_onnx
from tinycompress.exporters.ort_fusion import export_optimized_onnx
from tinycompress.quantization.onnx import (
    dynamic_op_types,
    preprocess_for_quantization,
    quantize_onnx_dynamic,
    quantize_onnx_static,
)
from tinycompress.quantization.tuning import Recipe


def onnx_recipes(settings: QuantizeSettings, *, static: bool = True) -> list[Recipe]:
    """The recipes ``--tolerance`` tries, the configured one first, without duplicates.

    Dynamic (fused graph; ORT quantizes activations to uint8 at run time): weights QInt8
    (U8S8) or QUInt8 (U8U8), per-channel on/off, reduce_range (7-bit weights), word embedding
    int8 or fp32. Static QDQ (unfused graph, S8S8): MinMax, Percentile and Entropy calibration.
    """
    per_channel, embeddings = settings.per_channel, settings.quantize_embeddings

    def dynamic(weight_type="QInt8", per_channel=per_channel, reduce_range=False, embeddings=embeddings):
        return {
            "mode": "dynamic",
            "weight_type": weight_type,
            "per_channel": per_channel,
            "reduce_range": reduce_range,
            "quantize_embeddings": embeddings,
        }

    def static_(method):
        return {
            "mode": "static",
            "weight_type": "QInt8",
            "activation_type": "QInt8",
            "per_channel": per_channel,
            "reduce_range": False,
            "quantize_embeddings": embeddings,
            "calibrate_method": method,
        }

    configured = dynamic() if settings.mode == "dynamic" else static_("MinMax")
    options = [
        configured,
        dynamic(),
        dynamic(per_channel=not per_channel),
        dynamic(weight_type="QUInt8"),
        dynamic(per_channel=True, reduce_range=True),
        dynamic(embeddings=not embeddings),
    ]
    if static:
        options += [static_(method) for method in ("MinMax", "Percentile", "Entropy")]
    recipes, seen = [], []
    for option in options:
        if option not in seen:
            seen.append(option)
            recipes.append(Recipe(recipe_name(option), option))
    return recipes


def recipe_name(settings: Mapping[str, Any]) -> str:
    """``dynamic-u8s8-per-tensor``, ``dynamic-u8u8-per-channel-reduce-range-fp32-embeddings``,
    ``static-qdq-entropy-per-tensor``."""
    if settings["mode"] == "dynamic":
        parts = ["dynamic", "u8s8" if settings["weight_type"] == "QInt8" else "u8u8"]
    else:
        parts = ["static-qdq", str(settings["calibrate_method"]).lower()]
    parts.append("per-channel" if settings["per_channel"] else "per-tensor")
    if settings.get("reduce_range"):
        parts.append("reduce-range")
    if not settings["quantize_embeddings"]:
        parts.append("fp32-embeddings")
    return "-".join(parts)


class OnnxTuningSources:
    """The fp32 graphs every candidate is quantized from, exported and preprocessed once, in
    ``scratch``: the fused graph (dynamic recipes) and the plain export (static QDQ)."""

    def __init__(self, model, scratch: Path, *, opset: int):
        self.model, self.scratch, self.opset = model, Path(scratch), opset
        self._fused: Path | None = None
        self._raw: Path | None = None
        self.fusion: dict[str, Any] = {}

    @property
    def fused(self) -> Path:
        if self._fused is None:
            self.scratch.mkdir(parents=True, exist_ok=True)
            self.fusion = export_optimized_onnx(
                self.model, self.scratch / "fp32-optimized.onnx", opset=self.opset, scratch=self.scratch
            )
            self._fused = preprocess_for_quantization(
                self.scratch / "fp32-optimized.onnx", self.scratch / "fp32-optimized-pre.onnx"
            )
        return self._fused

    @property
    def raw(self) -> Path:
        if self._raw is None:
            self.scratch.mkdir(parents=True, exist_ok=True)
            raw = export_onnx(self.model, self.scratch / "fp32-raw.onnx", opset=self.opset)
            self._raw = preprocess_for_quantization(raw, self.scratch / "fp32-raw-pre.onnx")
        return self._raw

    def source(self, settings: Mapping[str, Any]) -> Path:
        return self.fused if settings["mode"] == "dynamic" else self.raw


def recipe_op_types(settings: Mapping[str, Any]) -> tuple[str, ...]:
    if settings["mode"] == "dynamic":
        return dynamic_op_types(settings["quantize_embeddings"])
    return ("MatMul", "Gather") if settings["quantize_embeddings"] else ("MatMul",)


_LAYER = re.compile(r"(?:layer|layers|block|h)[./_](\d+)[./]")


def onnx_node_groups(
    path: str | Path, op_types: Sequence[str], attention_layers: Sequence[int] | None = None
) -> dict[str, list[str]]:
    """The nodes of ``op_types`` that a quantizer would touch, grouped for fp32 fallback.

    ``embeddings`` (EmbedLayerNormalization, and Gather on a float table), ``layer N attention``
    (fused Attention -- the N-th in graph order, or the N-th of ``attention_layers``, the layers
    that still have heads, when some have none -- and MatMuls under ``layer.N/.../attention/``),
    ``layer N ffn`` (the layer's other MatMuls), ``other`` (the rest). Ordered: embeddings, then
    layers in order (attention before ffn), then other.
    """
    graph = onnx.load(str(path), load_external_data=False).graph
    floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2}
    groups: dict[tuple, list[str]] = {}
    attention_index = 0
    for node in graph.node:
        if node.op_type not in op_types:
            continue
        if node.op_type == "EmbedLayerNormalization":
            key = (0, 0, 0, "embeddings")
        elif node.op_type == "Gather":
            if not node.input or node.input[0] not in floats:
                continue  # index arithmetic on shapes: nothing to quantize
            key = (0, 0, 0, "embeddings")
        elif node.op_type == "Attention":
            layer = attention_layers[attention_index] if attention_layers is not None else attention_index
            key = (1, layer, 0, f"layer {layer} attention")
            attention_index += 1
        else:
            match = _LAYER.search(node.name)
            if match:
                layer = int(match.group(1))
                kind = "attention" if "attention" in node.name.lower() or "attn" in node.name.lower() else "ffn"
                key = (1, layer, 0 if kind == "attention" else 1, f"layer {layer} {kind}")
            else:
                key = (2, 0, 0, "other")
        groups.setdefault(key, []).append(node.name)
    return {key[-1]: names for key, names in sorted(groups.items(), key=lambda item: item[0][:3])}


def quantize_onnx_recipe(
    sources: OnnxTuningSources,
    settings: Mapping[str, Any],
    path: Path,
    *,
    nodes_to_exclude: Sequence[str] = (),
    calibration: Sequence[dict] | None = None,
) -> dict[str, Any]:
    """Write the int8 graph of one tuning recipe (:func:`onnx_recipes`) to ``path``, with
    ``nodes_to_exclude`` left in fp32; returns details like :func:`quantize_onnx_model`."""
    source = sources.source(settings)
    ops = recipe_op_types(settings)
    if settings["mode"] == "dynamic":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"graph contains fused .* leaves in fp32")
            counts = quantize_onnx_dynamic(
                source,
                path,
                op_types=ops,
                per_channel=settings["per_channel"],
                weight_type=settings["weight_type"],
                reduce_range=settings["reduce_range"],
                nodes_to_exclude=nodes_to_exclude,
                preprocessed=True,
            )
        graph = dict(sources.fusion)
    else:
        counts = quantize_onnx_static(
            source,
            path,
            list(calibration or []),
            per_channel=settings["per_channel"],
            op_types=ops,
            calibrate_method=settings["calibrate_method"],
            reduce_range=settings["reduce_range"],
            nodes_to_exclude=nodes_to_exclude,
            preprocessed=True,
        )
        graph = {"fused_ops": {}, "attention_fusion": False, "fused_attention_heads": []}
    return {"quantized_ops": counts, **graph}
