"""What a prune run works on, loaded once: the parent model (the teacher), the tokenized splits,
the importance batches and the processes; and the measurements every part of the stage takes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tinycompress.checkpoint.hf import load_hf_model
from tinycompress.checkpoint.store import Checkpoint
from tinycompress.config import Config
from tinycompress.data.batching import Encoded, batch_order, collate, encode, padding_id, subset_rows
from tinycompress.data.glue import Examples, load_config_data
from tinycompress.errors import TinycompressError


def importance_batches(
    encoded: Encoded, rows: int, *, batch_size: int, pad_id: int, regression: bool, seed: int, processes=None
) -> Callable[[], Iterator[dict]]:
    """A function returning fresh labelled batches over ``rows`` seeded-random training rows.

    Each call yields the same batches, so re-scoring between pruning steps is comparable. With
    several ``processes``, each gets its share of those same batches (batch i on process
    i % world size); score them inside
    :func:`~tinycompress.pruning.importance.summed_over_processes`.
    """
    subset = subset_rows(encoded, rows, seed)
    lengths = [len(ids) for ids in subset.input_ids]

    def batches() -> Iterator[dict]:
        order = batch_order(lengths, batch_size, shuffle=False, group_by_length=True, seed=0)
        for indices in processes.share(order) if processes is not None else order:
            yield collate(subset, indices, pad_id, regression=regression)

    return batches


def scores_summed(processes):
    """Importance scores of every process's batches added up (a no-op in one process)."""
    from tinycompress.pruning.importance import summed_over_processes

    return summed_over_processes(processes.sum if processes is not None and processes.distributed else None)


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
        select_heads([torch.zeros(n) for n in heads], settings.ratio or 0.0, settings.min_heads_per_layer)
        select_neurons([torch.zeros(n) for n in neurons], settings.ffn_ratio or 0.0, settings.min_neurons_per_layer)
    except ValueError as exc:
        raise TinycompressError(
            f"cannot prune: {exc}",
            "lower --ratio / --ffn-ratio, or prune.min_heads_per_layer / prune.min_neurons_per_layer",
        ) from None


@dataclass
class PruneJob:
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
    processes: Any  # tinycompress.training.distributed.Processes


def load_job(config: Config, parent: Checkpoint, *, ratios: bool = True) -> PruneJob:
    from tinycompress.models.run_setup import prepare
    from tinycompress.training.distributed import start_processes

    spec, device, threads = prepare(config)
    processes = start_processes(device)
    device = processes.device
    if config.prune.recover_epochs > 0:
        processes.check_training(config.finetune, device)
    data = load_config_data(config, spec)  # a data problem fails before any model is loaded
    teacher, tokenizer = load_hf_model(parent)
    if ratios:
        check_feasible(teacher, config)  # before the data is read and tokenized
    if config.prune.vocab:
        from tinycompress.pruning.vocab import check_prunable

        try:
            check_prunable(teacher, tokenizer)
        except ValueError as exc:
            raise TinycompressError(f"cannot prune the vocabulary of {parent.path}: {exc}", "drop --vocab") from None
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
        processes=processes,
    )
    return PruneJob(
        spec,
        device,
        threads,
        teacher.to(device),
        tokenizer,
        train,
        dev,
        test,
        pad_id,
        data.source,
        batches,
        data.test,
        processes,
    )


def measure(net, job: PruneJob, config: Config, split: str = "test") -> dict[str, float]:
    from tinycompress.training.evaluation import evaluate_split

    encoded = job.test if split == "test" else job.dev
    return evaluate_split(net, encoded, job.spec, config, pad_id=job.pad_id, device=job.device, processes=job.processes)


def training_batches(job: PruneJob, config: Config, *, rows: int, seed_offset: int) -> Callable[[], Iterator[dict]]:
    """:func:`importance_batches` over ``rows`` training rows drawn with ``config.seed + seed_offset``,
    all of them in whichever process calls it: 0 draws the scoring rows, 1 the least squares',
    2 the rows that choose between candidate structures."""
    return importance_batches(
        job.train,
        rows,
        batch_size=config.finetune.batch_size,
        pad_id=job.pad_id,
        regression=job.spec.is_regression,
        seed=config.seed + seed_offset,
    )


def rescale_kept_units_(model, job: PruneJob, config: Config) -> dict[str, Any]:
    """Kwon et al.'s least-squares rescaling of ``model``'s kept heads and neurons, in place, on
    ``mask_tuning_samples`` training rows (all of them, in whichever process calls it); returns
    :func:`~tinycompress.pruning.mask_tuning.tune_masks_`'s details."""
    from tinycompress.models.structure import teacher_layer_positions
    from tinycompress.pruning.mask_tuning import tune_masks_

    # Other rows than the importance scores' (seed offset 0) where the split allows.
    batches = training_batches(job, config, rows=config.prune.mask_tuning_samples, seed_offset=1)
    # Each layer reconstructs its own teacher layer (Kwon et al.), also when later layers were removed:
    # asking the last kept layer to rebuild the teacher's last one, through a few per-unit scales,
    # fitted scales up to ±8 and took seed 43's model at 1.5x from 0.66 to 0.51 on test (own layer: 0.71).
    return tune_masks_(model, job.teacher, batches(), layer_map=teacher_layer_positions(model, job.teacher))
