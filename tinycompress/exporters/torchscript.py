"""TorchScript export of fp32 and torch-int8 classifiers (script, else trace), saved and loaded without pickles of our own."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinycompress.data.batching import zero_token_type_ids
from tinycompress.exporters.onnx import LogitsOnly, example_args


@contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence expected noise while tracing an HF classifier (reasons inline)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    # jit.trace reads every module property, incl. HF's `loss_function`, which logs a
    # "loss_type=None ... unrecognized" warning irrelevant to inference.
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            # TorchScript is what the caller asked for; its deprecation is known.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
            # Only the "pad mask if shorter than keys" check; both lengths come from seq.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"transformers\.masking_utils")
            # SDPA's `is_causal = q_len > 1 and mask is None and is_causal`: encoders have
            # is_causal=False, so the traced constant (False) is right for every input.
            warnings.filterwarnings(
                "ignore", category=torch.jit.TracerWarning, module=r"transformers\.integrations\.sdpa_attention"
            )
            # jit.trace touches this deprecated HF property while collecting attributes.
            warnings.filterwarnings(
                "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def script_or_trace(model: nn.Module, example_batch: Mapping[str, Any] | None = None) -> torch.jit.ScriptModule:
    """TorchScript an fp32 or ``quantize_torch_dynamic`` HF classifier by tracing.

    HF models cannot be ``torch.jit.script``-ed, so this always traces a ``LogitsOnly``
    wrapper. The result takes positional ``(input_ids, attention_mask[, token_type_ids])``
    int64 tensors - token_type_ids only if the model accepts it - and returns logits;
    batch size and sequence length stay dynamic. ``example_batch`` defaults to a small
    padded batch (padding makes sure the real masking path is traced).
    """
    names, args = example_args(model, example_batch)
    was_training = model.training
    model.eval()
    try:
        with _quiet_tracing(), torch.no_grad():
            # check_trace=False: the check re-traces and compares, doubling the cost, and
            # our tests compare against eager on other shapes anyway.
            return torch.jit.trace(LogitsOnly(model, names).eval(), args, check_trace=False)
    finally:
        model.train(was_training)


def save_torchscript(module: torch.jit.ScriptModule, path: str | Path) -> Path:
    """``torch.jit.save`` without the deprecation warning.

    A TorchScript archive is a deployment artifact, not a checkpoint: its constants use
    the pickle *format*, decoded by TorchScript's C++ reader (which cannot import Python
    globals), never by Python's ``pickle``. Checkpoints stay safetensors.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_tracing():
        torch.jit.save(module, str(path))
    return path


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    """``torch.jit.load`` onto CPU without the deprecation warning."""
    with _quiet_tracing():
        return torch.jit.load(str(path), map_location="cpu")


def torchscript_logits_fn(module) -> Callable:
    """A TorchScript classifier as ``fn(input_ids, attention_mask, token_type_ids=None)`` -> numpy."""

    names = torchscript_input_names(module)

    def run(input_ids, attention_mask, token_type_ids=None):
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        if given["token_type_ids"] is None:
            given["token_type_ids"] = zero_token_type_ids(input_ids)
        with torch.no_grad():
            return module(*[given[n] for n in names]).float().numpy()

    return run


def torchscript_input_names(module) -> list[str]:
    """The positional inputs a traced ``LogitsOnly`` takes (token_type_ids only for BERT-likes)."""
    return [argument.name for argument in module.forward.schema.arguments[1:]]  # [0] is self
