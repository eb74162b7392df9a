"""An ONNX Runtime session that takes the tokenizer's batches and returns logits."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tinycompress.exporters.onnx import feed_for

# ONNX Runtime ops that compute an activation's int8 scale from the batch at hand (static QDQ
# graphs use calibrated scales instead).
DYNAMIC_QUANTIZATION_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM"})


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
        # ORT's intra-op threads spin after each run by default and then take the cores from
        # whatever runs next: interleaved with an ORT int8 model, the fine-tuned torch model's batch-1
        # median read 25.8 ms with spinning and 10.7 ms without, while the ORT model's own moved
        # 2.28 -> 2.49 ms, inside its spread. Models are compared interleaved here, so no spinning.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = "logits" if "logits" in outputs else outputs[0]

    @functools.cached_property
    def scales_activations_per_batch(self) -> bool:
        """Whether the graph quantizes activations dynamically (ONNX Runtime's dynamic int8): their
        scale is the range of the whole batch, so a row's logits depend on the rows run with it."""
        import onnx

        graph = onnx.load(str(self.path), load_external_data=False).graph
        return any(node.op_type in DYNAMIC_QUANTIZATION_OPS for node in graph.node)

    def run_batch(self, batch: Mapping[str, Any]) -> np.ndarray:
        """Logits of a tokenizer batch (``input_ids``, ``attention_mask``, maybe ``token_type_ids``)."""
        return self(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))

    def __call__(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> np.ndarray:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feed = feed_for(batch, self.input_names)
        return self.session.run([self.output_name], feed)[0]
