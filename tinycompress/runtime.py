"""Load any model folder for inference behind one interface.

A :class:`Predictor` maps a batch of token tensors to logits, whatever runs underneath:
PyTorch (finetune / prune checkpoints, or a plain HF model), ONNX Runtime (quantize / export
folders holding ``model.onnx``), or the torch int8 backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import TinycompressError


@dataclass
class Predictor:
    forward: Callable[[dict], Any]  # inputs dict of torch tensors -> logits (tensor or ndarray)
    tokenizer: Any
    config: Any  # the HF config (labels, max length)
    kind: str  # "torch", "onnx", "torch-int8", "torchscript"
    model: Any = None  # the torch module, when there is one

    @property
    def label_names(self) -> list[str]:
        id2label = getattr(self.config, "id2label", None) or {}
        return [id2label.get(i, id2label.get(str(i), str(i))) for i in range(len(id2label) or 1)]


def torch_predictor(model, tokenizer, kind: str = "torch") -> Predictor:
    import torch

    model.eval()

    @torch.no_grad()
    def forward(inputs: dict):
        return model(**inputs).logits

    return Predictor(forward, tokenizer, model.config, kind, model)


def load_predictor(path: str | Path) -> Predictor:
    """A predictor for a checkpoint folder or export folder (verified when it has a manifest)."""
    from .checkpoint import MANIFEST_NAME, load_hf_model, read_checkpoint

    path = Path(path)
    checkpoint = read_checkpoint(path) if (path / MANIFEST_NAME).is_file() or not path.exists() else None
    if (path / "model.onnx").is_file():
        from .onnx_runtime import onnx_predictor

        return onnx_predictor(path)
    if (path / "int8_manifest.json").is_file():
        from .torch_int8_runtime import torch_int8_predictor

        return torch_int8_predictor(path)
    if (path / "model.torchscript.pt").is_file():
        raise TinycompressError(
            f"{path} holds a TorchScript export; TorchScript files are pickle-based archives and are not loaded by tinycompress",
            "load it with torch.jit.load in your own code, or predict with the ONNX export",
        )
    if checkpoint is not None:
        model, tokenizer = load_hf_model(checkpoint)
        return torch_predictor(model, tokenizer)
    if (path / "config.json").is_file():
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        return torch_predictor(AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path))
    raise TinycompressError(f"{path} holds no model (no tinycompress.yaml, model.onnx or config.json)", "pass a checkpoint or export folder")
