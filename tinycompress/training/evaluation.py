"""Logits and task metrics of a model (or any forward function) over an encoded split."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from tinycompress.data.batching import Encoded, encode, iterate_batches, padding_id
from tinycompress.data.glue import load_config_data
from tinycompress.data.tasks import TaskSpec
from tinycompress.training.metrics import compute_metrics


def model_inputs(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def predict_logits(
    model,
    encoded: Encoded,
    *,
    batch_size: int,
    pad_id: int,
    device=None,
    forward: Callable | None = None,
    group_by_length: bool = True,
) -> np.ndarray:
    """Logits for every row, in the rows' original order.

    ``forward`` replaces ``model(**inputs).logits`` (e.g. an ONNX Runtime session). Batches
    group rows of similar length (least padding) unless ``group_by_length`` is False: then
    they are consecutive rows, in order.
    """
    device = device or torch.device("cpu")
    out: np.ndarray | None = None
    for indices, batch in iterate_batches(
        encoded, batch_size, pad_id, regression=False, group_by_length=group_by_length
    ):
        inputs = model_inputs(batch, device)
        logits = forward(inputs) if forward is not None else model(**inputs).logits
        logits = (
            logits.float().cpu().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits, dtype=np.float32)
        )
        if out is None:
            out = np.zeros((len(encoded), logits.shape[-1]), dtype=np.float32)
        out[indices] = logits
    return out if out is not None else np.zeros((0, 1), dtype=np.float32)


def evaluate(
    model,
    encoded: Encoded,
    spec: TaskSpec,
    *,
    batch_size: int,
    pad_id: int,
    device=None,
    forward: Callable | None = None,
) -> dict[str, float]:
    if model is not None:
        model.eval()
    logits = predict_logits(model, encoded, batch_size=batch_size, pad_id=pad_id, device=device, forward=forward)
    return compute_metrics(spec, logits, encoded.labels)


def evaluate_predictor(predictor, config, spec, data=None, *, split: str = "test") -> dict[str, float]:
    """``<split>/<metric>`` of a :class:`~tinycompress.inference.predictor.Predictor` on ``config``'s
    data: ``split`` "test" (GLUE validation) or "dev" (carved from train with ``config.seed``, the
    split that selects models). ``data``: the already loaded
    :class:`~tinycompress.data.glue.TaskData` of ``config`` (else loaded here)."""
    data = data if data is not None else load_config_data(config, spec)
    examples = {"test": data.test, "dev": data.dev}[split]
    encoded = encode(predictor.tokenizer, examples, config.model.max_length)
    metrics = evaluate(
        None,
        encoded,
        spec,
        batch_size=config.finetune.eval_batch_size,
        pad_id=padding_id(predictor.tokenizer),
        forward=predictor.forward,
    )
    return {f"{split}/{k}": v for k, v in metrics.items()}


def evaluate_predictor_dev(predictor, config, spec, data=None) -> dict[str, float]:
    """``dev/<metric>`` of a predictor: never the test set (see :func:`evaluate_predictor`)."""
    return evaluate_predictor(predictor, config, spec, data, split="dev")
