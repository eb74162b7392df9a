"""ONNX export of Hugging Face sequence classifiers, and the int64 feeds their graphs take.

Everything here works on HF *sequence classifiers* (BERT, DistilBERT, MiniLM and their
structurally pruned variants). :class:`LogitsOnly` and :func:`example_args` (the positional
wrapper and the example batch a tracer needs) serve the TorchScript export too. Fusing the
exported graph is :mod:`tinycompress.exporters.ort_fusion`'s job, int8 quantisation
:mod:`tinycompress.quantization.onnx`'s, comparing it with PyTorch
:mod:`tinycompress.exporters.parity`'s.

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
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinycompress.data.batching import MODEL_INPUT_NAMES, zero_token_type_ids

_REQUIRED_INPUTS = ("input_ids", "attention_mask")


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
        batch["token_type_ids"] = zero_token_type_ids(input_ids)
    return batch


def _as_int64_tensor(name: str, value: Any) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.dim() != 2:
        raise ValueError(f"{name} must be a 2-D integer array, got {tuple(tensor.shape)} {tensor.dtype}")
    return tensor.to(torch.int64)


def example_args(
    model: torch.nn.Module, example_batch: Mapping[str, Any] | None
) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """(input names, positional int64 tensors) to trace ``model`` with, for :class:`LogitsOnly`.

    ``example_batch`` is validated (a mapping holding at least input_ids and attention_mask, all
    inputs of one shape); None makes one with :func:`make_example_batch`. Missing token_type_ids
    become zeros when the model takes them.
    """
    names = model_input_names(model)
    batch = example_batch if example_batch is not None else make_example_batch(model)
    if not isinstance(batch, Mapping):
        raise ValueError(f"example_batch must be a mapping of input name -> array, got {type(batch).__name__}")
    missing = [n for n in _REQUIRED_INPUTS if n not in batch]
    if missing:
        raise ValueError(f"example_batch lacks {missing}")
    if "token_type_ids" in names and "token_type_ids" not in batch:
        batch = {**batch, "token_type_ids": zero_token_type_ids(torch.as_tensor(batch["input_ids"]))}
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
    names, args = example_args(model, example_batch)
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


def feed_for(batch: Mapping[str, Any], input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Select and int64-cast the inputs a graph declares; token_type_ids default to 0."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"each batch must be a mapping of input name -> array, got {type(batch).__name__}")
    feed = {}
    for name in input_names:
        if name in batch and batch[name] is not None:
            feed[name] = to_int64_array(name, batch[name])
        elif name == "token_type_ids" and "input_ids" in batch:
            feed[name] = zero_token_type_ids(to_int64_array("input_ids", batch["input_ids"]))
        else:
            raise ValueError(f"batch lacks graph input {name!r} (has {sorted(batch)})")
    shapes = {a.shape for a in feed.values()}
    if len(shapes) != 1:
        raise ValueError(f"inputs differ in shape: { {k: v.shape for k, v in feed.items()} }")
    return feed


def to_int64_array(name: str, value: Any) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be a 2-D integer array, got shape {array.shape} dtype {array.dtype}")
    return array.astype(np.int64, copy=False)
