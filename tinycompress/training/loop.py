"""The training loop shared by fine-tuning and pruning recovery (optionally distilling from a teacher)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from tinycompress.data.batching import Encoded, batch_order, collate
from tinycompress.data.tasks import TaskSpec
from tinycompress.errors import TrainingDiverged
from tinycompress.training.distributed import Processes
from tinycompress.training.evaluation import evaluate
from tinycompress.training.losses import batch_loss


@dataclass
class TrainResult:
    best_dev: dict[str, float]
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    samples_per_second: float = 0.0
    train_seconds: float = 0.0
    # How the batches were spread: processes, backend, precision, accumulation, batch sizes.
    setup: dict[str, Any] = field(default_factory=dict)


def _optimizer(model, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    # No weight decay on biases and LayerNorm weights, as in BERT and HF Trainer.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates all 22 M parameters (half of them the word embedding) in one
    # pass: on 2 CPU cores it cuts the optimizer step from ~100 ms to ~60 ms per batch.
    device_type = next(model.parameters()).device.type
    return torch.optim.AdamW(groups, lr=learning_rate, fused=device_type in ("cpu", "cuda"))


class KeepBest:
    """The best epoch so far by one dev metric, with a CPU copy of its weights.

    NaN (e.g. a correlation of constant predictions) ranks lowest, but the first epoch offered
    is always kept, so there is a best epoch whatever the scores.
    """

    def __init__(self, metric: str):
        self.metric = metric
        self.score, self.epoch, self.dev = -math.inf, 0, {}
        self.state: dict | None = None

    def offer(self, model, epoch: int, dev: dict[str, float]) -> None:
        score = dev[self.metric]
        score = -math.inf if math.isnan(score) else score
        if self.state is None or score > self.score:
            self.score, self.epoch, self.dev = score, epoch, dev
            self.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def restore(self, model) -> None:
        """Load the best epoch's weights back into ``model``."""
        if self.state is not None:
            model.load_state_dict(self.state)


def train(
    model,
    train_data: Encoded,
    dev_data: Encoded,
    spec: TaskSpec,
    settings,
    *,
    pad_id: int,
    device,
    seed: int,
    epochs: int | None = None,
    teacher=None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    layer_weight: float = 0.0,
    layer_map: Sequence[int] | None = None,
    progress=None,
    description: str = "fine-tune",
    processes: Processes | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """AdamW + linear warm-up/decay + clipping; evaluates on dev each epoch and keeps the best.

    ``settings`` is a :class:`~tinycompress.config.FinetuneSettings`. With a ``teacher``, the
    loss is :func:`~tinycompress.training.losses.distillation_loss`, plus ``layer_weight`` times
    the hidden-state MSE of student layer i to teacher layer ``layer_map[i]``
    (:func:`~tinycompress.training.losses.hidden_state_loss`) when ``layer_weight`` > 0.
    On return the model holds the best epoch's weights.

    ``processes`` (:func:`~tinycompress.training.distributed.start_processes`) spreads each
    batch of ``settings.batch_size`` rows over the launched processes and ``settings.grad_accum``
    micro-batches (:mod:`tinycompress.training.distributed`); every process must call this
    alike. ``settings.precision`` bf16 / fp16 trains under Accelerate's autocast. Without
    processes, at fp32 and without accumulation, the loop is plain torch in one process.

    ``on_epoch(epoch, dev_metrics)`` is called after each epoch's dev evaluation; an exception it
    raises (a search pruning a poor trial) ends training there.
    """
    if layer_weight < 0:
        raise ValueError(f"layer_weight must be >= 0, got {layer_weight}")
    if layer_weight > 0 and teacher is None:
        raise ValueError("layer_weight > 0 distils hidden states: it needs a teacher")
    from transformers import get_linear_schedule_with_warmup

    processes = processes or Processes(device)
    processes.check_training(settings, device)
    epochs = settings.epochs if epochs is None else epochs
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    steps_per_epoch = math.ceil(len(train_data) / settings.batch_size)
    total_steps = max(1, steps_per_epoch * epochs)
    optimizer = _optimizer(model, settings.learning_rate, settings.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * total_steps), total_steps)
    engine = processes.engine(model, optimizer, settings.precision)
    lengths = [len(x) for x in train_data.input_ids]

    result = TrainResult(best_dev={}, best_epoch=0, setup=processes.setup(settings))
    best = KeepBest(spec.primary_metric)
    seen, train_seconds = 0, 0.0
    task_id = progress.add_task(description, total=total_steps, loss=float("nan"), rate=0.0) if progress else None
    # Dropout draws differ between processes (each sees other rows); rank 0 draws as one process does.
    torch.manual_seed(seed + processes.rank)
    for epoch in range(1, epochs + 1):
        engine.model.train()
        running = None
        epoch_start = time.perf_counter()
        for step, indices in enumerate(
            batch_order(
                lengths, settings.batch_size, shuffle=True, group_by_length=settings.group_by_length, seed=seed + epoch
            ),
            start=1,
        ):
            parts = processes.micro_batches(indices, settings.grad_accum)
            step_loss = None
            for part, (rows, weight) in enumerate(parts, start=1):
                # Gradients are all-reduced once per optimizer step, after the last micro-batch.
                with engine.no_sync() if part < len(parts) else nullcontext():
                    with engine.autocast():
                        batch = collate(train_data, rows, pad_id, regression=spec.is_regression)
                        loss = batch_loss(
                            engine.model,
                            batch,
                            device,
                            regression=spec.is_regression,
                            teacher=teacher,
                            temperature=temperature,
                            alpha=alpha,
                            layer_weight=layer_weight,
                            layer_map=layer_map,
                        )
                        if weight != 1.0:
                            loss = loss * weight
                    engine.backward(loss)
                step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
            engine.clip_grad_norm_(settings.max_grad_norm)
            engine.optimizer.step()
            if not engine.step_was_skipped:
                scheduler.step()
            engine.optimizer.zero_grad(set_to_none=True)
            seen += len(indices)
            # The one host sync of a step, as before; checked after the update so a GPU keeps queueing
            # the backward pass. The batch's loss is summed over processes, so all of them see the same
            # value, and a non-finite loss ends the run on every process: nothing is saved.
            value = processes.sum(step_loss).item() / processes.world_size
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"{description}: the training loss became {value} at epoch {epoch}/{epochs}, "
                    f"step {step}/{steps_per_epoch}; stopped before writing a checkpoint",
                    f"lower the learning rate (now {settings.learning_rate:g}: --lr, or --recover-lr for the "
                    "distillation after pruning) or check the training labels",
                )
            running = value if running is None else 0.98 * running + 0.02 * value
            if progress:
                progress.update(
                    task_id, advance=1, loss=running, rate=seen / (train_seconds + time.perf_counter() - epoch_start)
                )
        # Only the training loop counts towards samples/s; dev evaluation does not.
        train_seconds += time.perf_counter() - epoch_start
        dev = evaluate(
            engine.module(),
            dev_data,
            spec,
            batch_size=settings.eval_batch_size,
            pad_id=pad_id,
            device=device,
            processes=processes,
        )
        result.history.append({"epoch": epoch, "train_loss": running, **{f"dev/{k}": v for k, v in dev.items()}})
        if progress:  # one line per epoch, also when stderr is a log file rather than a terminal
            scores = " ".join(f"dev/{k}={v:.4f}" for k, v in dev.items())
            progress.console.log(
                f"{description} epoch {epoch}/{epochs}: loss {running:.4f} {scores} {seen / train_seconds:.0f} samples/s"
            )
        best.offer(engine.module(), epoch, dev)
        if on_epoch is not None:
            on_epoch(epoch, dev)
    result.best_dev, result.best_epoch = best.dev, best.epoch
    result.train_seconds = train_seconds
    result.samples_per_second = seen / train_seconds if train_seconds else 0.0
    model = engine.finish()
    best.restore(model)
    model.eval()
    return result


def make_progress():
    """A Rich progress bar on stderr with loss and samples/s."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[rate]:.0f} samples/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
