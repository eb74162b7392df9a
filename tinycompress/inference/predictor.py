"""Load any model folder for inference behind one interface.

A :class:`Predictor` maps a batch of token tensors to logits, whatever runs underneath:

* ``torch``: PyTorch fp32 (finetune / prune checkpoints, or a plain HF model folder);
* ``onnx``: ONNX Runtime on ``model.onnx`` (ONNX quantize checkpoints, ONNX exports);
* ``torch-int8``: the torch int8 backend (``int8_weights.safetensors`` + ``int8_recipe.json``,
  torch quantize checkpoints);
* ``torchscript``: ``model_int8.torchscript.pt`` / ``model.torchscript.pt`` (TorchScript exports).

When a folder holds several (``tinycompress export --format all``), the first of that list
that is present wins: ``model.onnx``, then the int8 TorchScript file, then the fp32 one.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinycompress.checkpoint.format import (
    INT8_RECIPE_FILE,
    MANIFEST_NAME,
    MODEL_CONFIG_FILE,
    ONNX_FILE,
    TORCHSCRIPT_FILE,
    TORCHSCRIPT_INT8_FILE,
)
from tinycompress.checkpoint.hf import build_model_skeleton, load_hf_model, load_hf_model_folder
from tinycompress.errors import TinycompressError

# Used when neither the manifest nor the tokenizer says how long inputs may be.
FALLBACK_MAX_LENGTH = 512


@dataclass
class Predictor:
    """``forward(inputs)`` takes a dict of int64 [batch, seq] torch tensors (``input_ids``,
    ``attention_mask`` and maybe ``token_type_ids``) and returns logits [batch, labels] as a
    torch tensor or numpy array."""

    forward: Callable[[dict], Any]
    tokenizer: Any
    config: Any  # the HF config (labels, problem type)
    kind: str  # "torch", "onnx", "torch-int8", "torchscript"
    model: Any = None  # the fp32 torch module, when there is one (parameter counts)
    max_length: int = FALLBACK_MAX_LENGTH  # tokens per input; longer texts are truncated
    segments: int | None = None  # texts per input (1, or 2 for pair tasks) when the folder says its task
    # Whether the model quantizes activations dynamically; asked only when a metric is computed
    # (for ONNX it reads the graph). See :attr:`batch_dependent`.
    scales_activations_per_batch: Callable[[], bool] = lambda: False

    @functools.cached_property
    def batch_dependent(self) -> bool:
        """Dynamic int8 (ONNX Runtime's or torch's) scales activations by the range of the whole
        batch, so a row's logits depend on the rows run with it: metrics score such a model one
        row at a time (:func:`~tinycompress.training.evaluation.evaluate_predictor`)."""
        return self.scales_activations_per_batch()

    @property
    def label_names(self) -> list[str]:
        id2label = getattr(self.config, "id2label", None) or {}
        return [id2label.get(i, id2label.get(str(i), str(i))) for i in range(len(id2label) or 1)]

    @property
    def is_regression(self) -> bool:
        return getattr(self.config, "problem_type", None) == "regression" or getattr(self.config, "num_labels", 2) == 1


def torch_predictor(model, tokenizer, kind: str = "torch", max_length: int | None = None) -> Predictor:
    """A predictor running an in-memory fp32 HF classifier under ``no_grad``."""
    import torch

    model.eval()

    @torch.no_grad()
    def forward(inputs: dict):
        return model(**inputs).logits

    return Predictor(
        forward, tokenizer, model.config, kind, model, max_length or _tokenizer_limit(tokenizer, model.config)
    )


def onnx_predictor(folder: str | Path, *, threads: int | None = None, max_length: int | None = None) -> Predictor:
    """ONNX Runtime (CPU) on ``folder/model.onnx`` with the folder's tokenizer and config.json.

    ``threads`` defaults to torch's current intra-op thread count, so ``--threads`` (which
    the stages apply to torch) governs ONNX Runtime too.
    """
    import torch

    from tinycompress.inference.onnx_session import OnnxClassifier

    folder = Path(folder)
    session = OnnxClassifier(folder / ONNX_FILE, num_threads=threads or torch.get_num_threads())

    return _folder_predictor(
        folder,
        session.run_batch,
        "onnx",
        max_length,
        scales_activations_per_batch=lambda: session.scales_activations_per_batch,
    )


def load_torch_int8_model(folder: str | Path):
    """The int8 torch module of a torch quantize folder (safetensors + recipe; nothing unpickled)."""
    from tinycompress.quantization.torch import load_torch_int8

    return load_torch_int8(folder, lambda: build_model_skeleton(folder))


def torch_int8_predictor(folder: str | Path, *, max_length: int | None = None) -> Predictor:
    """The torch int8 backend: dynamic-int8 Linears and an int8 word embedding."""
    import torch

    folder = Path(folder)
    model = load_torch_int8_model(folder)

    @torch.no_grad()
    def forward(inputs: dict):
        return model(**inputs).logits

    # model stays None: packed int8 Linears hold no nn.Parameters, so counting them would
    # report a meaningless parameter count.
    return _folder_predictor(folder, forward, "torch-int8", max_length, scales_activations_per_batch=lambda: True)


def torchscript_predictor(folder: str | Path, file: str, *, max_length: int | None = None) -> Predictor:
    """A TorchScript export (``model.torchscript.pt`` or ``model_int8.torchscript.pt``).

    TorchScript archives are pickle-based. tinycompress never loads pickles from checkpoints
    (their weights are safetensors); an export folder is a deployment artifact the user asked
    for, and ``torch.jit.load`` (TorchScript's C++ reader, which cannot import arbitrary Python
    globals) is how it is meant to run, so it is loaded here. Never ``torch.load``.
    """
    import torch

    from tinycompress.exporters.torchscript import load_torchscript, torchscript_input_names

    folder = Path(folder)
    module = load_torchscript(folder / file)
    names = torchscript_input_names(module)

    @torch.no_grad()
    def forward(inputs: dict):
        return module(*[_input_or_zeros(inputs, name) for name in names])

    # The int8 file is torch's dynamic int8, traced or scripted.
    dynamic_int8 = file == TORCHSCRIPT_INT8_FILE
    return _folder_predictor(
        folder, forward, "torchscript", max_length, scales_activations_per_batch=lambda: dynamic_int8
    )


def _input_or_zeros(inputs: dict, name: str):
    from tinycompress.data.batching import zero_token_type_ids

    if name in inputs and inputs[name] is not None:
        return inputs[name]
    if name == "token_type_ids":  # a tokenizer without segments: every token is segment 0
        return zero_token_type_ids(inputs["input_ids"])
    raise TinycompressError(f"the TorchScript model needs input {name!r}, which the tokenizer does not produce")


def _folder_predictor(
    folder: Path, forward, kind: str, max_length: int | None, *, scales_activations_per_batch=lambda: False
) -> Predictor:
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    limit = max_length or _tokenizer_limit(tokenizer, config)
    return Predictor(
        forward, tokenizer, config, kind, None, limit, scales_activations_per_batch=scales_activations_per_batch
    )


def _tokenizer_limit(tokenizer, config) -> int:
    """Max tokens for a folder without a manifest: the tokenizer's limit, capped by the model's
    position table (tokenizers often say 'unlimited' as a huge number)."""
    limits = [FALLBACK_MAX_LENGTH]
    for value in (getattr(tokenizer, "model_max_length", None), getattr(config, "max_position_embeddings", None)):
        if isinstance(value, int) and 0 < value < 1_000_000:
            limits.append(value)
    return min(limits)


def _manifest_max_length(checkpoint) -> int | None:
    return ((checkpoint.manifest.get("config") or {}).get("model") or {}).get("max_length") if checkpoint else None


def _predictor_of(path: Path, checkpoint, threads: int | None) -> Predictor | None:
    max_length = _manifest_max_length(checkpoint)
    if checkpoint is not None and checkpoint.stage in ("finetune", "prune"):
        # PyTorch stages hold safetensors weights only; nothing else in them is ever loaded.
        model, tokenizer = load_hf_model(checkpoint)
        return torch_predictor(model, tokenizer, max_length=max_length)
    if (path / ONNX_FILE).is_file():
        return onnx_predictor(path, threads=threads, max_length=max_length)
    if (path / INT8_RECIPE_FILE).is_file():
        return torch_int8_predictor(path, max_length=max_length)
    for file in (TORCHSCRIPT_INT8_FILE, TORCHSCRIPT_FILE):
        if (path / file).is_file():
            return torchscript_predictor(path, file, max_length=max_length)
    if (path / MODEL_CONFIG_FILE).is_file() and checkpoint is None:
        return torch_predictor(*load_hf_model_folder(path))
    return None


def load_predictor(path, *, threads: int | None = None) -> Predictor:
    """A predictor for a checkpoint or export folder (verified first when it has a manifest).

    ``path`` may also be an already verified :class:`~tinycompress.checkpoint.store.Checkpoint`, so
    callers that read it themselves do not hash its files a second time.

    Inputs are truncated to the manifest's ``model.max_length`` (the length the model was
    trained and measured with), else the tokenizer's limit. Raises TinycompressError for a
    missing, corrupt or model-less folder.
    """
    from tinycompress.checkpoint.store import Checkpoint, read_checkpoint

    if isinstance(path, Checkpoint):
        checkpoint, path = path, path.path
    else:
        path = Path(path)
        checkpoint = read_checkpoint(path) if (path / MANIFEST_NAME).is_file() or not path.exists() else None
    predictor = _predictor_of(path, checkpoint, threads)
    if predictor is not None and checkpoint is not None:
        from tinycompress.data.tasks import get_task

        # A task this version does not know: texts are split at a tab, as for bare folders.
        with contextlib.suppress(TinycompressError):
            predictor.segments = len(get_task(checkpoint.task).tsv_text_columns)
    if predictor is not None:
        return predictor
    raise TinycompressError(
        f"{path} holds no model (no {MANIFEST_NAME}, {ONNX_FILE}, TorchScript file or {MODEL_CONFIG_FILE})",
        "pass a checkpoint or export folder, e.g. runs/sst2/export-v1",
    )
