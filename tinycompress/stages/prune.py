"""Stage 2: structured pruning of attention heads and FFN neurons, then recovery by distillation.

    tinycompress prune --task sst2 --ratio 0.5 --ffn-ratio 0.2
    tinycompress prune runs/sst2/prune-v1 --ratio 0.3      # prune a pruned model further
    tinycompress prune --task sst2 --vocab --ratio 0       # drop unused embedding rows only

The parent is the newest ``finetune`` checkpoint of the task, or an explicit folder. An explicit
``prune`` checkpoint is accepted too (iterative pruning across runs): the ratios then apply to
the heads and neurons the parent still has, the parent is the distillation teacher, and neuron
positions in the manifest refer to the parent's FFN. Other stages are refused.

Importance is scored on training rows (never on test), units are removed with
:func:`tinycompress.pruning.iterative.prune_iteratively`, test metrics are measured on the parent, right
after pruning and after recovery, and everything lands in one ``prune-v<N>`` folder.

With ``prune.vocab`` the word embedding is cut last, after recovery (the teacher and the
student must read the same ids while distilling), to the tokens the train and dev texts use
(:mod:`tinycompress.pruning.vocab`); the folder's tokenizer then emits the new ids. When no head or
neuron is removed (``--ratio 0``) there is nothing to recover and recovery is skipped.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinycompress.checkpoint.hf import load_hf_model, save_hf_model
from tinycompress.checkpoint.store import Checkpoint, write_checkpoint
from tinycompress.checkpoint.workspace import check_parent, resolve_input
from tinycompress.config import Config
from tinycompress.data.batching import Encoded, encode, iterate_batches, padding_id, subset_rows
from tinycompress.data.glue import Examples, load_config_data
from tinycompress.errors import TinycompressError

# FLOPs depend on the sequence length; 128 is the default max_length, so numbers from
# different runs and tasks are comparable whatever their own max_length.
FLOPS_SEQ_LEN = 128


@dataclass
class PruneResult:
    """A pruned (and possibly recovered) model in memory, before it is written."""

    model: Any
    tokenizer: Any
    parent: Checkpoint
    metrics: dict[str, Any]
    details: dict[str, Any]


def importance_batches(
    encoded: Encoded, rows: int, *, batch_size: int, pad_id: int, regression: bool, seed: int
) -> Callable[[], Iterator[dict]]:
    """A function returning fresh labelled batches over ``rows`` seeded-random training rows.

    Each call yields the same batches, so re-scoring between pruning steps is comparable.
    """
    subset = subset_rows(encoded, rows, seed)

    def batches() -> Iterator[dict]:
        for _, batch in iterate_batches(subset, batch_size, pad_id, regression=regression):
            yield batch

    return batches


def measure_test(model, encoded: Encoded, spec, config: Config, *, pad_id: int, device) -> dict[str, float]:
    """The task's metrics on the test split (GLUE validation)."""
    from tinycompress.training.evaluation import evaluate

    return evaluate(model, encoded, spec, batch_size=config.finetune.eval_batch_size, pad_id=pad_id, device=device)


def recover(
    model, teacher, train_enc: Encoded, dev_enc: Encoded, spec, config: Config, *, pad_id: int, device, progress=None
):
    """Fine-tune ``model`` for ``config.prune.recover_epochs`` with distillation from ``teacher``.

    The dev split selects the best epoch; returns the :class:`~tinycompress.training.loop.TrainResult`.
    """
    from tinycompress.models.run_setup import set_seed
    from tinycompress.training.loop import train

    set_seed(config.seed)
    return train(
        model,
        train_enc,
        dev_enc,
        spec,
        config.finetune,
        pad_id=pad_id,
        device=device,
        seed=config.seed,
        epochs=config.prune.recover_epochs,
        teacher=teacher,
        temperature=config.prune.distill_temperature,
        alpha=config.prune.distill_alpha,
        progress=progress,
        description="recover",
    )


def _sig(value: float, digits: int = 4) -> float:
    # Significant digits, not decimals: Fisher scores can be ~1e-8 and would round to 0.
    return float(f"{float(value):.{digits}g}")


def _structure(model) -> dict[str, Any]:
    from tinycompress.models.pretrained import count_parameters
    from tinycompress.models.structure import current_head_ids, ffn_sizes
    from tinycompress.pruning.flops import estimate_flops

    heads = current_head_ids(model)
    return {
        "heads": heads,
        "ffn": ffn_sizes(model),
        "parameters": count_parameters(model),
        "flops": estimate_flops(model, FLOPS_SEQ_LEN),
    }


def _prune_in_place(model, batches: Callable[[], Iterator[dict]], config: Config):
    """prune_iteratively with the configured targets (checked feasible by :func:`check_feasible`)."""
    from tinycompress.pruning.iterative import prune_iteratively

    settings = config.prune
    return prune_iteratively(
        model,
        batches,
        settings.criterion,
        settings.ratio,
        settings.ffn_ratio,
        settings.steps,
        min_heads_per_layer=settings.min_heads_per_layer,
        min_neurons_per_layer=settings.min_neurons_per_layer,
        seed=config.seed,
    )


def check_feasible(model, config: Config) -> None:
    """Refuse ratios that would take a layer below its minimum, before data is loaded or scored.

    Selection on all-equal scores fails exactly when the real selection would, and costs nothing.
    An unsupported model family raises its own error (no ratio would help).
    """
    import torch

    from tinycompress.models.arch import get_arch
    from tinycompress.models.structure import ffn_sizes, head_counts
    from tinycompress.pruning.selection import select_heads, select_neurons

    settings = config.prune
    get_arch(model)
    heads, neurons = head_counts(model), ffn_sizes(model)
    try:
        select_heads([torch.zeros(n) for n in heads], settings.ratio, settings.min_heads_per_layer)
        select_neurons([torch.zeros(n) for n in neurons], settings.ffn_ratio, settings.min_neurons_per_layer)
    except ValueError as exc:
        raise TinycompressError(
            f"cannot prune: {exc}",
            "lower --ratio / --ffn-ratio, or prune.min_heads_per_layer / prune.min_neurons_per_layer",
        ) from None


def _importance_details(importance, head_ids: list[list[int]], rows: int) -> dict[str, Any]:
    """Per-layer head scores keyed by original head id, and per-layer neuron score summaries."""
    return {
        "criterion": importance.criterion,
        "rows": rows,
        "heads": [
            {int(h): _sig(s) for h, s in zip(ids, scores.tolist())}
            for ids, scores in zip(head_ids, importance.head_scores)
        ],
        "neurons_mean": [_sig(scores.mean()) if len(scores) else 0.0 for scores in importance.neuron_scores],
    }


def _removal_details(record, before: dict, after: dict) -> dict[str, Any]:
    heads_removed = [
        sorted({h for step in record.steps for h in step.heads_removed[layer]}) for layer in range(len(before["heads"]))
    ]
    neurons_removed = [
        sorted({n for step in record.steps for n in step.neurons_removed[layer]}) for layer in range(len(before["ffn"]))
    ]
    return {
        "heads_before": before["heads"],
        "heads_kept": after["heads"],
        "heads_removed": heads_removed,
        "neurons_before": before["ffn"],
        "neurons_kept": after["ffn"],
        # Positions in the parent's FFN (for a finetune parent these are the original ids).
        "neurons_removed": neurons_removed,
        "step_log": [
            {
                "step": s.step,
                "heads_removed": s.heads_removed,
                "neurons_removed": sum(len(n) for n in s.neurons_removed),
                "heads_remaining": s.heads_remaining,
                "neurons_remaining": s.neurons_remaining,
            }
            for s in record.steps
        ],
    }


def _size_metrics(before: dict, after: dict) -> dict[str, Any]:
    return {
        "parameters": after["parameters"],
        "parent/parameters": before["parameters"],
        "flops": after["flops"],
        "parent/flops": before["flops"],
        "flops_seq_len": FLOPS_SEQ_LEN,
        "heads": sum(len(h) for h in after["heads"]),
        "parent/heads": sum(len(h) for h in before["heads"]),
        "ffn_neurons": sum(after["ffn"]),
        "parent/ffn_neurons": sum(before["ffn"]),
    }


@dataclass
class _Job:
    """What one prune run works on: the parent model (teacher), tokenized splits, device."""

    spec: Any
    device: Any
    threads: int
    teacher: Any
    tokenizer: Any
    train: Encoded
    dev: Encoded
    test: Encoded
    pad_id: int
    data_source: str
    batches: Callable[[], Iterator[dict]]
    test_examples: Examples  # raw texts: a vocabulary-pruned model's tokenizer re-encodes them


def _load_job(config: Config, parent: Checkpoint) -> _Job:
    from tinycompress.models.run_setup import prepare

    spec, device, threads = prepare(config)
    teacher, tokenizer = load_hf_model(parent)
    check_feasible(teacher, config)  # before the data is read and tokenized
    if config.prune.vocab:
        from tinycompress.pruning.vocab import check_prunable

        try:
            check_prunable(teacher, tokenizer)
        except ValueError as exc:
            raise TinycompressError(f"cannot prune the vocabulary of {parent.path}: {exc}", "drop --vocab") from None
    data = load_config_data(config, spec)
    train, dev, test = (
        encode(tokenizer, split, config.model.max_length) for split in (data.train, data.dev, data.test)
    )
    pad_id = padding_id(tokenizer)
    batches = importance_batches(
        train,
        config.prune.importance_samples,
        batch_size=config.finetune.batch_size,
        pad_id=pad_id,
        regression=spec.is_regression,
        seed=config.seed,
    )
    return _Job(
        spec, device, threads, teacher.to(device), tokenizer, train, dev, test, pad_id, data.source, batches, data.test
    )


def _measure_and_recover(
    model, job: _Job, config: Config, parent: Checkpoint, *, recover_model: bool = True
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Test metrics of the parent, of the pruned model and (after recovery) the final ones.

    ``recover_model=False`` skips recovery (nothing was removed, so the model is the parent's).
    """
    from tinycompress.training.loop import make_progress

    def measure(net) -> dict[str, float]:
        return measure_test(net, job.test, job.spec, config, pad_id=job.pad_id, device=job.device)

    parent_test, pruned_test = measure(job.teacher), measure(model)
    final_test, dev, recovery = pruned_test, {}, None
    if recover_model and config.prune.recover_epochs > 0:
        with make_progress() as progress:
            result = recover(
                model,
                job.teacher,
                job.train,
                job.dev,
                job.spec,
                config,
                pad_id=job.pad_id,
                device=job.device,
                progress=progress,
            )
        final_test, dev = measure(model), result.best_dev
        recovery = {
            "epochs": config.prune.recover_epochs,
            "teacher": parent.name,
            "temperature": config.prune.distill_temperature,
            "alpha": config.prune.distill_alpha,
            "best_epoch": result.best_epoch,
            "history": result.history,
            "train_seconds": round(result.train_seconds, 1),
            "samples_per_second": round(result.samples_per_second, 1),
        }
    metrics = {f"test/{k}": v for k, v in final_test.items()}
    metrics |= {f"pruned_no_recovery/test/{k}": v for k, v in pruned_test.items()}
    metrics |= {f"parent/test/{k}": v for k, v in parent_test.items()}
    metrics |= {f"dev/{k}": v for k, v in dev.items()}
    return metrics, recovery


def _prune_vocab(model, job: _Job, config: Config) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Cut ``model``'s word embedding to the train + dev tokens, in place, and re-measure test.

    Returns (new tokenizer, metrics, details); the metrics' ``test/*`` are measured with the
    new tokenizer and replace the caller's (which it keeps as ``pre_vocab/test/*``).
    """
    from tinycompress.pruning.vocab import (
        config_token_ids,
        count_ids,
        embedding_bytes,
        oov_rate,
        prune_embeddings_,
        rewrite_tokenizer,
        select_vocab,
        special_ids,
        tokenization_report,
    )

    settings, old_tokenizer = config.prune, job.tokenizer
    # job.train / job.dev are already tokenized as the model sees them (pairs, max_length).
    counts = count_ids(job.train.input_ids + job.dev.input_ids)
    rows_before, bytes_before = model.get_input_embeddings().num_embeddings, embedding_bytes(model)
    try:
        kept = select_vocab(
            counts,
            old_tokenizer,
            settings.vocab_min_frequency,
            settings.vocab_top_k,
            always_keep=config_token_ids(model).values(),
        )
        new_tokenizer = rewrite_tokenizer(old_tokenizer, kept)
        prune_embeddings_(model, kept)
    except ValueError as exc:
        raise TinycompressError(f"cannot prune the vocabulary: {exc}", "drop --vocab") from None
    test = encode(new_tokenizer, job.test_examples, config.model.max_length)
    pad_id = padding_id(new_tokenizer)
    pruned_test = measure_test(model, test, job.spec, config, pad_id=pad_id, device=job.device)
    # Under the ORIGINAL tokenizer: test tokens whose row is gone (now [UNK] or re-spelled).
    rate = oov_rate(job.test.input_ids, kept, ignore_ids=special_ids(old_tokenizer) - {old_tokenizer.unk_token_id})
    report = tokenization_report(old_tokenizer, new_tokenizer, job.test_examples.texts, config.model.max_length, kept)
    bytes_after = embedding_bytes(model)
    metrics = {f"test/{k}": v for k, v in pruned_test.items()} | {
        "vocab_size": len(kept),
        "parent/vocab_size": rows_before,
        "embedding_mb": round(bytes_after / 1e6, 3),
        "parent/embedding_mb": round(bytes_before / 1e6, 3),
        "test_oov_rate": round(rate, 6),
    }
    details = {
        "min_frequency": settings.vocab_min_frequency,
        "top_k": settings.vocab_top_k,
        "kept": len(kept),
        "before": rows_before,
        "special_kept": len(special_ids(old_tokenizer)),
        "counted_rows": len(job.train) + len(job.dev),
        "counted_tokens": sum(counts.values()),
        "distinct_seen": len(counts),
        "embedding_bytes_before": bytes_before,
        "embedding_bytes_after": bytes_after,  # fp32
        "test": {k: round(v, 6) if isinstance(v, float) else v for k, v in report.items()},
    }
    return new_tokenizer, metrics, details


def run_prune(config: Config, parent: Checkpoint) -> PruneResult:
    """Score, prune, measure and (if ``config.prune.recover_epochs``) recover; writes nothing.

    ``parent`` must be a finetune or prune checkpoint of ``config.task``. The returned model is
    on the CPU in eval mode, exactly what :func:`write_prune` saves.
    """
    check_parent("prune", parent, config)
    job = _load_job(config, parent)
    model = copy.deepcopy(job.teacher)
    start = time.perf_counter()
    record = _prune_in_place(model, job.batches, config)
    prune_seconds = time.perf_counter() - start
    # The scores step 1 ranked by, on the (still unpruned) copy of the parent: unlike the
    # pruner's final scores they cover the removed heads too.
    importance = record.initial_importance
    removed_any = any(any(step.heads_removed) or any(step.neurons_removed) for step in record.steps)
    metrics, recovery = _measure_and_recover(model, job, config, parent, recover_model=removed_any)
    tokenizer, vocab = job.tokenizer, None
    if config.prune.vocab:
        # Last, after recovery: distillation feeds the same (old) ids to teacher and student.
        tokenizer, vocab_metrics, vocab = _prune_vocab(model, job, config)
        metrics |= {f"pre_vocab/{k}": v for k, v in metrics.items() if k.startswith("test/")} | vocab_metrics
    before, after = _structure(job.teacher), _structure(model)
    # magnitude and random read no data; saying they used rows would mislead.
    rows = min(config.prune.importance_samples, len(job.train)) if config.prune.criterion in ("taylor", "fisher") else 0
    metrics |= _size_metrics(before, after) | {
        "importance_rows": rows,
        "train_rows": len(job.train),
        "dev_rows": len(job.dev),
        "test_rows": len(job.test),
        "prune_seconds": round(prune_seconds, 1),  # scoring and removal, all steps
        "threads": job.threads,
        "device": str(job.device),
    }
    details = {
        "criterion": config.prune.criterion,
        "ratio": config.prune.ratio,
        "ffn_ratio": config.prune.ffn_ratio,
        "steps": config.prune.steps,
        "flops_seq_len": FLOPS_SEQ_LEN,
        "importance": _importance_details(importance, before["heads"], rows),
        **_removal_details(record, before, after),
        "recovery": recovery,
        "vocab": vocab,
        "data_source": job.data_source,
    }
    model.cpu().eval()
    return PruneResult(model, tokenizer, parent, metrics, details)


def write_prune(config: Config, result: PruneResult) -> Checkpoint:
    """Write ``result`` as the next ``prune-v<N>`` folder of ``config.task`` in ``config.workdir``."""
    return write_checkpoint(
        config.workdir,
        result.parent.task,
        "prune",
        lambda folder: save_hf_model(folder, result.model, result.tokenizer, config.model.max_length),
        config=config,
        metrics=result.metrics,
        seed=config.seed,
        parent=result.parent,
        details=result.details,
    )


def prune(config: Config, parent: str | Path | Checkpoint | None = None) -> Checkpoint:
    """Prune ``parent`` (default: the newest finetune checkpoint of ``config.task``); returns the new checkpoint.

    Raises :class:`TinycompressError` (and writes nothing) for a missing or corrupt parent, a
    parent of another stage or task, or ratios that would leave a layer below its minimum.
    Build ``config`` on :func:`~tinycompress.checkpoint.workspace.parent_base` so the parent's data and model settings carry over.
    """
    if not isinstance(parent, Checkpoint):
        parent = resolve_input(parent, workdir=config.workdir, task=config.task, stage="prune")
    return write_prune(config, run_prune(config, parent))
