"""Logits and task metrics of a model (or any forward function) over an encoded split."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from tinycompress.data.batching import Encoded, batch_order, collate, encode, padding_id
from tinycompress.data.glue import load_config_data
from tinycompress.data.tasks import TaskSpec
from tinycompress.training.distributed import Processes
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
    processes: Processes | None = None,
) -> np.ndarray:
    """Logits for every row, in the rows' original order.

    ``forward`` replaces ``model(**inputs).logits`` (e.g. an ONNX Runtime session). Batches
    group rows of similar length (least padding) unless ``group_by_length`` is False: then
    they are consecutive rows, in order. With several ``processes`` (every one must call this
    alike), each computes whole batches of that same order (batch i on process i % world size)
    and every process gets all the logits, each row exactly once.
    """
    device = device or torch.device("cpu")
    lengths = [len(x) for x in encoded.input_ids]
    order = batch_order(lengths, batch_size, shuffle=False, group_by_length=group_by_length, seed=0)
    if processes is not None:
        order = processes.share(order)
    out: np.ndarray | None = None
    rows: list[int] = []
    parts: list[np.ndarray] = []
    for indices in order:
        inputs = model_inputs(collate(encoded, indices, pad_id, regression=False), device)
        logits = forward(inputs) if forward is not None else model(**inputs).logits
        logits = (
            logits.float().cpu().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits, dtype=np.float32)
        )
        rows.extend(indices)
        parts.append(logits)
    if processes is not None and processes.distributed:
        return processes.gather_rows(rows, np.concatenate(parts) if parts else None, len(encoded))
    if parts:
        out = np.zeros((len(encoded), parts[0].shape[-1]), dtype=np.float32)
        out[rows] = np.concatenate(parts)
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
    processes: Processes | None = None,
) -> dict[str, float]:
    """The task's metrics over every row of ``encoded``; with several ``processes``, each
    computes a share of the logits and all get the same metrics (see :func:`predict_logits`)."""
    if model is not None:
        model.eval()
    logits = predict_logits(
        model, encoded, batch_size=batch_size, pad_id=pad_id, device=device, forward=forward, processes=processes
    )
    return compute_metrics(spec, logits, encoded.labels)


def evaluate_split(
    model,
    encoded: Encoded,
    spec: TaskSpec,
    config,
    *,
    pad_id: int,
    device=None,
    forward=None,
    batch_dependent: bool = False,
    processes=None,
) -> dict[str, float]:
    """:func:`evaluate` at ``config``'s evaluation batch size: how every stage scores a model (or
    an ONNX Runtime session's ``forward``) on one encoded split, without the split's prefix.

    ``batch_dependent``: the model's logits for a row depend on the rows run with it (dynamic
    int8 scales activations by the batch's range). Its rows then run one at a time, so the metric
    is the model's own: batched, the same int8 file's SST-2 test accuracy moved by up to 0.7 point
    between batch sizes 8 and 128.
    """
    return evaluate(
        model,
        encoded,
        spec,
        batch_size=1 if batch_dependent else config.finetune.eval_batch_size,
        pad_id=pad_id,
        device=device,
        forward=forward,
        processes=processes,
    )


def evaluate_predictor(predictor, config, spec, data=None, *, split: str = "test") -> dict[str, float]:
    """``<split>/<metric>`` of a :class:`~tinycompress.inference.predictor.Predictor` on ``config``'s
    data: ``split`` "test" (GLUE validation) or "dev" (carved from train with ``config.seed``, the
    split that selects models). ``data``: the already loaded
    :class:`~tinycompress.data.glue.TaskData` of ``config`` (else loaded here)."""
    data = data if data is not None else load_config_data(config, spec)
    examples = {"test": data.test, "dev": data.dev}[split]
    encoded = encode(predictor.tokenizer, examples, config.model.max_length)
    metrics = evaluate_split(
        None,
        encoded,
        spec,
        config,
        pad_id=padding_id(predictor.tokenizer),
        forward=predictor.forward,
        batch_dependent=predictor.batch_dependent,
    )
    return {f"{split}/{k}": v for k, v in metrics.items()}


def evaluate_predictor_dev(predictor, config, spec, data=None) -> dict[str, float]:
    """``dev/<metric>`` of a predictor: never the test set (see :func:`evaluate_predictor`)."""
    return evaluate_predictor(predictor, config, spec, data, split="dev")
