"""ONNX Runtime int8 quantisation of exported classifiers: the quantize stage's ``onnx`` backend.

:func:`quantize_onnx_model` writes the int8 graph of an fp32 HF classifier, by mode:

``dynamic``: export -> ORT transformer optimizer (Attention / EmbedLayerNormalization fusion,
with each pruned layer's own head count, see :mod:`tinycompress.exporters.ort_fusion`) ->
:func:`quantize_onnx_dynamic` of MatMul, the fused Attention and, with ``quantize_embeddings``,
the word embedding (Gather, or EmbedLayerNormalization once fused). Weights are stored int8;
activations are quantised per call.

``static``: :func:`quantize_onnx_static`, QDQ int8 of MatMul (and Gather) calibrated (MinMax) on
seeded-random training rows (:func:`calibration_batches`). It quantises the *unfused* export:
ORT's QDQ quantizer has no Attention / EmbedLayerNormalization support, so fusing first would
leave the attention and embedding weights fp32. ORT fuses Q/DQ pairs into int8 kernels at
session load.

Accuracy-driven tuning (``quantize --tolerance``) builds its candidates with these quantisers:
its recipes and node groups are :mod:`tinycompress.quantization.onnx_recipes`, the search
:mod:`tinycompress.quantization.tuning`.

Both quantisers count, in the graph they wrote, how many nodes of each requested op type were
quantised, so an op type ORT silently skipped shows up in the manifest.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tinycompress.config import QuantizeSettings
from tinycompress.exporters.onnx import export_onnx, feed_for
from tinycompress.exporters.ort_fusion import export_optimized_onnx

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

#: Initializer types of an int8 (quantized) weight.
_INT8_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)

#: Rows per calibration batch of static quantization.
CALIBRATION_BATCH_SIZE = 32


def _validate_op_types(op_types: Iterable[str], registry: Mapping[str, Any], kind: str) -> list[str]:
    if isinstance(op_types, str):
        raise ValueError("op_types must be a sequence of op type names, not a single string")
    ops = list(op_types)
    unknown = [op for op in ops if op not in registry]
    if not ops or unknown:
        raise ValueError(f"op_types for {kind} quantisation must be non-empty and within {sorted(registry)}; got {ops}")
    return ops


def preprocess_for_quantization(in_path: Path, out_path: Path) -> Path:
    """Run ORT's recommended ``quant_pre_process`` (shape inference + basic optimisation).

    Symbolic shape inference is needed to type ORT's fused contrib ops (Attention, ...),
    but on a plain export it gives up on the transformers-5 mask subgraph *and* then dumps
    ``sym_shape_infer_temp.onnx`` + a ``<uuid>.data`` file into the current directory.
    So it runs only when the graph has contrib ops; plain graphs get ONNX shape inference.
    A fused graph can still defeat it: when the first layer's attention was pruned away, ORT
    cannot fuse the embedding (EmbedLayerNormalization wants an Attention after it) and the
    position-id slice stays symbolic. Then it runs with the working directory in a scratch
    folder (so the dump lands there) and, on failure, the graph gets ONNX shape inference
    instead; the quantiser types the contrib ops' outputs as float (see ``DefaultTensorType``).
    Returns the path to quantise.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    graph = onnx.load(str(in_path), load_external_data=False).graph
    has_contrib_ops = any(node.domain == "com.microsoft" for node in graph.node)
    if not has_contrib_ops:
        quant_pre_process(str(in_path), str(out_path), skip_symbolic_shape=True)
        return out_path
    in_path, out_path = Path(in_path).resolve(), Path(out_path).resolve()
    try:
        with tempfile.TemporaryDirectory(prefix="tinycompress-shapes-") as scratch, _working_directory(scratch):
            quant_pre_process(str(in_path), str(out_path), skip_symbolic_shape=False)
    except Exception as err:  # ORT raises a bare Exception("Incomplete symbolic shape inference")
        if "symbolic shape inference" not in str(err):
            raise
        quant_pre_process(str(in_path), str(out_path), skip_symbolic_shape=True)
    return out_path


@contextlib.contextmanager
def _working_directory(path: str | Path):
    """Temporarily change the process's working directory (ORT writes debug files into it)."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    if name not in ("QInt8", "QUInt8"):
        raise ValueError(f"weight_type must be QInt8 or QUInt8, got {name!r}")
    return QuantType[name]


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
    weight_type: str = "QInt8",
    reduce_range: bool = False,
    nodes_to_exclude: Sequence[str] = (),
    preprocessed: bool = False,
) -> dict[str, int]:
    """Dynamic int8 quantisation with ORT (QInt8 weights, activations quantised at run time).

    Args:
        in_path: fp32 graph (raw export, or optimised - then use ``FUSED_GRAPH_OP_TYPES``).
        out_path: where to write the int8 graph.
        op_types: ORT op types whose weights get quantised.
        per_channel: per-output-channel weight scales (MatMul) instead of per-tensor.
        weight_type: ``"QInt8"`` (signed weights; with ORT's uint8 dynamic activations: U8S8)
            or ``"QUInt8"`` (U8U8).
        reduce_range: 7-bit weights (ORT's advice for CPUs without VNNI, where U8S8 can saturate).
        nodes_to_exclude: node names left in fp32 (names of the graph after
            ``quant_pre_process``, which keeps the export's names).
        preprocessed: ``in_path`` already went through :func:`preprocess_for_quantization`
            (the tuning search preprocesses once and quantises many times).

    Returns:
        For each requested op type, how many nodes in the output graph are quantised
        forms of it (MatMul -> MatMulInteger, Gather -> Gather on an int8 table,
        Attention -> QAttention, EmbedLayerNormalization -> QEmbedLayerNormalization).
    """
    from onnxruntime.quantization import quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    ops = _validate_op_types(op_types, IntegerOpsRegistry, "dynamic")
    in_path, out_path = Path(in_path), Path(out_path)
    _warn_unrequested_fused_ops(onnx.load(str(in_path), load_external_data=False).graph, ops)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = in_path if preprocessed else preprocess_for_quantization(in_path, Path(tmp) / "preprocessed.onnx")
        quantize_dynamic(
            str(source),
            str(out_path),
            op_types_to_quantize=ops,
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=_quant_type(weight_type),
            nodes_to_exclude=list(nodes_to_exclude) or None,
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
        self._feeds = [feed_for(batch, input_names) for batch in batches]
        self._index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._index >= len(self._feeds):
            return None
        self._index += 1
        return self._feeds[self._index - 1]


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
    calibrate_method: str = "MinMax",
    reduce_range: bool = False,
    nodes_to_exclude: Sequence[str] = (),
    preprocessed: bool = False,
) -> dict[str, int]:
    """Static int8 quantisation in QDQ format, calibrated on ``calibration_batches``.

    Args:
        in_path: fp32 graph (raw ``export_onnx`` output is the tested path).
        out_path: where to write the QDQ graph.
        calibration_batches: non-empty list of dicts ``{input name: int array [b, s]}``;
            keys the graph does not declare are ignored, missing token_type_ids become 0.
        per_channel: per-channel weight scales.
        op_types: op types to wrap in Q/DQ pairs.
        calibrate_method: ORT's ``CalibrationMethod`` name: ``MinMax``, ``Percentile`` or ``Entropy``.
        reduce_range: 7-bit weights.
        nodes_to_exclude: node names left in fp32 (no Q/DQ around them).
        preprocessed: ``in_path`` already went through :func:`preprocess_for_quantization`.

    Returns:
        For each op type, how many of its nodes read a DequantizeLinear output, plus the
        total ``QuantizeLinear``/``DequantizeLinear`` node counts. Activations and weights
        are both QInt8 (ORT's recommended S8S8 for QDQ on CPU).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry

    ops = _validate_op_types(op_types, QDQRegistry, "static QDQ")
    if isinstance(calibration_batches, Mapping) or not calibration_batches:
        raise ValueError("calibration_batches must be a non-empty list of input dicts")
    in_path, out_path = Path(in_path), Path(out_path)
    graph_inputs = [i.name for i in onnx.load(str(in_path), load_external_data=False).graph.input]
    reader = _ListDataReader(calibration_batches, graph_inputs)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = in_path if preprocessed else preprocess_for_quantization(in_path, Path(tmp) / "preprocessed.onnx")
        # ORT's calibrators print progress on stdout, which holds only results here.
        with contextlib.redirect_stdout(sys.stderr):
            quantize_static(
                str(source),
                str(out_path),
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=ops,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(nodes_to_exclude) or None,
                calibrate_method=CalibrationMethod[calibrate_method],
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
    return _count_qdq_quantized(onnx.load(str(out_path)).graph, ops)


def dynamic_op_types(quantize_embeddings: bool) -> tuple[str, ...]:

    embedding_ops = ("Gather", "EmbedLayerNormalization")
    return tuple(op for op in FUSED_GRAPH_OP_TYPES if quantize_embeddings or op not in embedding_ops)


def quantize_onnx_model(
    model, path: Path, settings: QuantizeSettings, *, opset: int, calibration: Sequence[dict] | None = None
) -> dict[str, Any]:
    """Write the int8 ONNX model of ``model`` (fp32 HF classifier) to ``path``; fp32 graphs stay
    in a temporary folder.

    ``calibration`` (a list of input dicts) is required for ``settings.mode == "static"``.
    Returns details: quantized op counts, fused op counts, fusion flag and head counts.
    """

    with tempfile.TemporaryDirectory(prefix="tinycompress-onnx-") as scratch:
        scratch = Path(scratch)
        if settings.mode == "dynamic":
            graph = export_optimized_onnx(model, scratch / "fp32-optimized.onnx", opset=opset, scratch=scratch)
            with warnings.catch_warnings():
                # Without quantize_embeddings the fused embedding is left fp32 on purpose.
                warnings.filterwarnings("ignore", message=r"graph contains fused .* leaves in fp32")
                ops = dynamic_op_types(settings.quantize_embeddings)
                counts = quantize_onnx_dynamic(
                    scratch / "fp32-optimized.onnx", path, op_types=ops, per_channel=settings.per_channel
                )
        else:
            raw = export_onnx(model, scratch / "fp32-raw.onnx", opset=opset)
            ops = ("MatMul", "Gather") if settings.quantize_embeddings else ("MatMul",)
            counts = quantize_onnx_static(
                raw, path, list(calibration or []), per_channel=settings.per_channel, op_types=ops
            )
            graph = {"fused_ops": {}, "attention_fusion": False, "fused_attention_heads": []}
    return {"quantized_ops": counts, **graph}


def calibration_batches(
    tokenizer, examples, rows: int, *, max_length: int, seed: int, single_batch: bool = False
) -> list[dict]:
    """Input dicts (no labels) over ``rows`` seeded-random rows of ``examples`` (training rows).

    ``single_batch``: all rows in one batch (padded to the longest). ORT's Percentile and Entropy
    calibrators stack the outputs of all batches, so every batch must have the same shape.
    """
    from tinycompress.data.batching import encode, iterate_batches, padding_id, subset_rows

    subset = subset_rows(encode(tokenizer, examples, max_length), rows, seed)
    pad_id = padding_id(tokenizer)
    batches = []
    size = max(1, len(subset)) if single_batch else CALIBRATION_BATCH_SIZE
    for _, batch in iterate_batches(subset, size, pad_id, regression=False):
        batch.pop("labels", None)
        batches.append(batch)
    return batches
