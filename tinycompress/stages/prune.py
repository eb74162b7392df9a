"""Stage 2: structured pruning of attention heads and FFN neurons, then recovery by distillation.

    tinycompress prune --task sst2 --speedup 2                # a measured target (see below)
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

**Targets instead of ratios** (``--speedup``, ``--target-latency-ms``, ``--target-size-mb``): every
head and neuron is scored once, this machine's cost table of the int8 deployment model
(:mod:`tinycompress.inference.cost_table`, measured once and cached in the workspace) prices
them, and :func:`tinycompress.pruning.budget.choose_structure` keeps the most importance within the
budget -- per layer, so a layer may lose its attention block, its FFN or (both) itself; those
whole-block removals are priced at their loss measured on the scoring rows where the scores
underrate it (:mod:`tinycompress.pruning.block_removal`). The manifest's ``details.target`` holds
the budget, the predicted speed-up, the measured removal losses and the speed-up measured at the
end (the pruned and the unpruned model, both int8, timed interleaved).

**Recovery**, each step switchable and measured (test and dev) before and after: the least-squares
rescaling of the kept units to reconstruct the parent's layers (``prune.mask_tuning``, Kwon et al.
2022; retraining-free, a minute on CPU), then distillation from the parent (``recover_epochs``),
on logits and, with ``distill_layer_weight`` > 0, on every layer's hidden states (TinyBERT / CoFi).

**Several processes** (``torchrun --nproc-per-node N -m tinycompress prune ...``): each scores a
share of the importance batches (the sums are all-reduced), evaluation and distillation are shared
(:mod:`tinycompress.training.distributed`); process 0 alone measures the cost table (then shared)
and the final speed-up, and writes the folder.

With ``prune.vocab`` the word embedding is cut last, after recovery (the teacher and the
student must read the same ids while distilling), to the tokens the train and dev texts use
(:mod:`tinycompress.pruning.vocab`); the folder's tokenizer then emits the new ids. When no head or
neuron is removed (``--ratio 0``) there is nothing to recover and recovery is skipped.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinycompress.checkpoint.format import task_dir
from tinycompress.checkpoint.hf import save_hf_model
from tinycompress.checkpoint.store import Checkpoint, write_checkpoint
from tinycompress.checkpoint.temporaries import check_writable
from tinycompress.checkpoint.workspace import check_parent, resolve_input
from tinycompress.config import Config
from tinycompress.data.batching import Encoded, encode, padding_id
from tinycompress.errors import TinycompressError
from tinycompress.stages.prune_job import (
    PruneJob,
    load_job,
    measure,
    rescale_kept_units_,
    scores_summed,
)
from tinycompress.stages.prune_target import criterion_of, measure_speedup, prune_to_target, target_of, vocab_to_keep

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
    # The processes that made it (:class:`~tinycompress.training.distributed.Processes`); None: one.
    processes: Any = None


def recover(
    model,
    teacher,
    train_enc: Encoded,
    dev_enc: Encoded,
    spec,
    config: Config,
    *,
    pad_id: int,
    device,
    progress=None,
    layer_map: list[int] | None = None,
    processes=None,
):
    """Fine-tune ``model`` for ``config.prune.recover_epochs`` with distillation from ``teacher``, with
    the fine-tune's settings (its learning rate unless ``prune.recover_learning_rate`` is set).

    The dev split selects the best epoch; returns the :class:`~tinycompress.training.loop.TrainResult`.
    ``processes``: see :func:`~tinycompress.training.loop.train`.
    """
    from tinycompress.models.run_setup import set_seed
    from tinycompress.training.loop import train

    set_seed(config.seed)
    settings = config.finetune.model_copy(update={"learning_rate": config.recover_learning_rate})
    return train(
        model,
        train_enc,
        dev_enc,
        spec,
        settings,
        pad_id=pad_id,
        device=device,
        seed=config.seed,
        epochs=config.prune.recover_epochs,
        teacher=teacher,
        temperature=config.prune.distill_temperature,
        alpha=config.prune.distill_alpha,
        layer_weight=config.prune.distill_layer_weight,
        layer_map=layer_map,
        progress=progress,
        description="recover",
        processes=processes,
    )


def _sig(value: float, digits: int = 4) -> float:
    # Significant digits, not decimals: Fisher scores can be ~1e-8 and would round to 0.
    return float(f"{float(value):.{digits}g}")


def _structure(model) -> dict[str, Any]:
    from tinycompress.models.pretrained import count_parameters
    from tinycompress.models.structure import current_head_ids, current_layer_ids, ffn_sizes
    from tinycompress.pruning.flops import estimate_flops

    heads = current_head_ids(model)
    return {
        "layers": current_layer_ids(model),
        "heads": heads,
        "ffn": ffn_sizes(model),
        "parameters": count_parameters(model),
        "flops": estimate_flops(model, FLOPS_SEQ_LEN),
    }


def _prune_in_place(model, batches: Callable[[], Iterator[dict]], config: Config, processes=None):
    """prune_iteratively with the configured targets (checked feasible by :func:`check_feasible`)."""
    from tinycompress.pruning.iterative import prune_iteratively

    settings = config.prune
    with scores_summed(processes):
        return prune_iteratively(
            model,
            batches,
            criterion_of(config),
            settings.ratio or 0.0,
            settings.ffn_ratio or 0.0,
            settings.steps,
            min_heads_per_layer=settings.min_heads_per_layer,
            min_neurons_per_layer=settings.min_neurons_per_layer,
            seed=config.seed,
        )


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
        # Original layer ids; a layer left with neither heads nor neurons is removed.
        "layers_before": before["layers"],
        "layers_kept": after["layers"],
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


def _tune_masks(model, job: PruneJob, config: Config) -> dict[str, Any]:
    """Kwon et al.'s least-squares rescaling of the kept units, on ``mask_tuning_samples`` training rows."""
    # Every process fits the same scales on all the rows; process 0's are then everyone's.
    details = rescale_kept_units_(model, job, config)
    job.processes.sync_module(model)
    return details


def _recover(model, job: PruneJob, config: Config, parent: Checkpoint) -> tuple[dict[str, Any], dict[str, float]]:
    """Distil ``model`` from the parent for ``recover_epochs``; returns the recovery details and
    the best epoch's dev metrics."""
    from tinycompress.models.structure import teacher_layer_positions
    from tinycompress.training.loop import make_progress

    with make_progress() if job.processes.is_main else contextlib.nullcontext() as progress:
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
            layer_map=teacher_layer_positions(model, job.teacher, last_to_last=True),
            processes=job.processes,
        )
    details = {
        "epochs": config.prune.recover_epochs,
        "learning_rate": config.recover_learning_rate,
        "teacher": parent.name,
        "temperature": config.prune.distill_temperature,
        "alpha": config.prune.distill_alpha,
        "layer_weight": config.prune.distill_layer_weight,
        "best_epoch": result.best_epoch,
        "history": result.history,
        "train_seconds": round(result.train_seconds, 1),
        "samples_per_second": round(result.samples_per_second, 1),
        "distributed": result.setup,
    }
    return details, result.best_dev


def _prune_vocab(model, job: PruneJob, config: Config) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Cut ``model``'s word embedding to the train + dev tokens, in place, and re-measure test.

    Returns (new tokenizer, metrics, details); the metrics' ``test/*`` are measured with the
    new tokenizer and replace the caller's (which it keeps as ``pre_vocab/test/*``).
    """
    from tinycompress.pruning.vocab import (
        embedding_bytes,
        oov_rate,
        prune_embeddings_,
        rewrite_tokenizer,
        special_ids,
        tokenization_report,
    )
    from tinycompress.training.evaluation import evaluate_split

    settings, old_tokenizer = config.prune, job.tokenizer
    rows_before, bytes_before = model.get_input_embeddings().num_embeddings, embedding_bytes(model)
    try:
        kept, counts = vocab_to_keep(model, job, config)
        new_tokenizer = rewrite_tokenizer(old_tokenizer, kept)
        prune_embeddings_(model, kept)
    except ValueError as exc:
        raise TinycompressError(f"cannot prune the vocabulary: {exc}", "drop --vocab") from None
    test = encode(new_tokenizer, job.test_examples, config.model.max_length)
    pad_id = padding_id(new_tokenizer)
    pruned_test = evaluate_split(
        model, test, job.spec, config, pad_id=pad_id, device=job.device, processes=job.processes
    )
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
    """Score, prune (to the ratios, or to a target), rescale by least squares (``mask_tuning``),
    recover by distillation (``recover_epochs``) and measure after each step; writes nothing.

    ``parent`` must be a finetune or prune checkpoint of ``config.task``. The returned model is
    on the CPU in eval mode, exactly what :func:`write_prune` saves.
    """
    check_parent("prune", parent, config)
    target_kind = target_of(config)
    job = load_job(config, parent, ratios=target_kind is None)
    model = copy.deepcopy(job.teacher)
    start = time.perf_counter()
    target = None
    if target_kind is None:
        record = _prune_in_place(model, job.batches, config, job.processes)
    else:
        record, target = prune_to_target(model, job, config)
    prune_seconds = time.perf_counter() - start
    # The scores step 1 ranked by, on the (still unpruned) copy of the parent: unlike the
    # pruner's final scores they cover the removed heads too.
    importance = record.initial_importance
    removed_any = any(any(step.heads_removed) or any(step.neurons_removed) for step in record.steps)

    # Test (and dev) metrics after each step: the parent, pruned, rescaled, distilled.
    metrics = {f"parent/test/{k}": v for k, v in measure(job.teacher, job, config).items()}
    metrics |= {f"pruned_no_recovery/test/{k}": v for k, v in measure(model, job, config).items()}
    mask_tuning = recovery = None
    if removed_any:
        metrics |= {f"pruned_no_recovery/dev/{k}": v for k, v in measure(model, job, config, "dev").items()}
    if removed_any and config.prune.mask_tuning:
        mask_tuning = _tune_masks(model, job, config)
        metrics |= {f"mask_tuned/test/{k}": v for k, v in measure(model, job, config).items()}
        metrics |= {f"mask_tuned/dev/{k}": v for k, v in measure(model, job, config, "dev").items()}
    if removed_any and config.prune.recover_epochs > 0:
        recovery, best_dev = _recover(model, job, config, parent)
        metrics |= {f"dev/{k}": v for k, v in best_dev.items()}
    metrics |= {f"test/{k}": v for k, v in measure(model, job, config).items()}

    tokenizer, vocab = job.tokenizer, None
    if config.prune.vocab:
        # Last, after recovery: distillation feeds the same (old) ids to teacher and student.
        tokenizer, vocab_metrics, vocab = _prune_vocab(model, job, config)
        metrics |= {f"pre_vocab/{k}": v for k, v in metrics.items() if k.startswith("test/")} | vocab_metrics
    if target is not None and job.processes.is_main:
        # Timed by process 0 alone; the others' results are not written.
        target["measured"] = _measured_against_parent(model, tokenizer, job, config)
    before, after = _structure(job.teacher), _structure(model)
    # magnitude and random read no data; saying they used rows would mislead.
    criterion = criterion_of(config)
    rows = min(config.prune.importance_samples, len(job.train)) if criterion in ("taylor", "fisher") else 0
    metrics |= _size_metrics(before, after) | {
        "importance_rows": rows,
        "train_rows": len(job.train),
        "dev_rows": len(job.dev),
        "test_rows": len(job.test),
        "prune_seconds": round(prune_seconds, 1),  # scoring and removal (and the cost table), all steps
        "threads": job.threads,
        "device": str(job.device),
    }
    if mask_tuning is not None:
        # Scoring + cost table + selection + least squares: the retraining-free part.
        metrics["search_seconds"] = round(prune_seconds + mask_tuning["seconds"], 1)
    if target is not None and job.processes.is_main:
        measured = target["measured"][f"batch_{target['batch_size']}"]
        metrics |= {
            "target/predicted_speedup": target["predicted_speedup"].get(str(target["batch_size"])),
            "target/measured_speedup": measured["speedup"],
        }
    details = {
        "mode": "ratio" if target is None else "target",
        "criterion": criterion,
        "ratio": (config.prune.ratio or 0.0) if target is None else None,
        "ffn_ratio": (config.prune.ffn_ratio or 0.0) if target is None else None,
        "steps": config.prune.steps if target is None else 1,
        "target": target,
        "flops_seq_len": FLOPS_SEQ_LEN,
        "importance": _importance_details(importance, before["heads"], rows),
        **_removal_details(record, before, after),
        "mask_tuning": mask_tuning,
        "recovery": recovery,
        "vocab": vocab,
        "data_source": job.data_source,
        "world_size": job.processes.world_size,
    }
    model.cpu().eval()
    return PruneResult(model, tokenizer, parent, metrics, details, job.processes)


def _measured_against_parent(model, tokenizer, job: PruneJob, config: Config) -> dict[str, Any]:
    """:func:`measure_speedup` against the unpruned model: the parent when it is unpruned, else
    a randomly initialised twin of its architecture (int8 speed does not depend on the weights)."""
    from tinycompress.inference.cost_table import unpruned_twin
    from tinycompress.models.config_fields import STRUCTURE_ATTR

    teacher = job.teacher
    reference = unpruned_twin(teacher) if getattr(teacher.config, STRUCTURE_ATTR, None) else teacher
    return measure_speedup(model.cpu().eval(), tokenizer, reference.cpu().eval(), job.tokenizer, job, config)


def write_prune(config: Config, result: PruneResult) -> Checkpoint:
    """Write ``result`` as the next ``prune-v<N>`` folder of ``config.task`` in ``config.workdir``
    (by process 0 when several made it; every process returns the folder)."""

    def write() -> Checkpoint:
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

    return result.processes.write_on_main(write) if result.processes is not None else write()


def prune(config: Config, parent: str | Path | Checkpoint | None = None) -> Checkpoint:
    """Prune ``parent`` (default: the newest finetune checkpoint of ``config.task``); returns the new checkpoint.

    Raises :class:`TinycompressError` (and writes nothing) for a missing or corrupt parent, a
    parent of another stage or task, or ratios that would leave a layer below its minimum.
    Build ``config`` on :func:`~tinycompress.checkpoint.workspace.parent_base` so the parent's data and model settings carry over.
    """
    if not isinstance(parent, Checkpoint):
        parent = resolve_input(parent, workdir=config.workdir, task=config.task, stage="prune")
    check_writable(task_dir(config.workdir, parent.task))
    return write_prune(config, run_prune(config, parent))
