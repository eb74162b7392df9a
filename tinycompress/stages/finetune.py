"""Stage 1: fine-tune a pretrained encoder on a GLUE task.

tinycompress finetune --task sst2 --data-dir ../shared/data/glue
tinycompress finetune --task sst2 --search --trials 20   # choose the recipe first
torchrun --nproc-per-node 2 -m tinycompress finetune --task sst2   # several processes

Launched as several processes, every process runs this function alike: batches are shared
(:mod:`tinycompress.training.distributed`), metrics are over whole splits, and process 0 alone
writes the folder, which every process returns.
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path

from tinycompress.checkpoint.format import SEARCH_JOURNAL_FILE, SEARCH_TRIALS_FILE, task_dir
from tinycompress.checkpoint.hf import save_hf_model
from tinycompress.checkpoint.store import Checkpoint, write_checkpoint
from tinycompress.checkpoint.temporaries import check_writable
from tinycompress.config import Config
from tinycompress.data.batching import encode, padding_id
from tinycompress.data.glue import TaskData, load_config_data
from tinycompress.data.tasks import get_task
from tinycompress.errors import TinycompressError
from tinycompress.models.heads import head_of
from tinycompress.models.pretrained import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_HUB_ID,
    count_parameters,
    load_pretrained_classifier,
    load_tokenizer,
    resolve_model_source,
)
from tinycompress.models.run_setup import prepare
from tinycompress.training.search import SearchOutcome, write_trials_csv


def finetune(config: Config) -> Checkpoint:
    """Fine-tune ``config.model.name`` on ``config.task``; returns the new checkpoint.

    Model selection uses the dev split carved from train; the test metrics (GLUE validation)
    are measured once, on the best epoch, and stored in the manifest.
    """
    return _finetune(config)


def search_and_finetune(config: Config) -> Checkpoint:
    """Search the fine-tuning recipe (:mod:`tinycompress.training.search`), then fine-tune with the
    best one on all training rows; returns the new checkpoint.

    Its manifest's config holds the chosen recipe and its details the search (every trial);
    the study's journal and a CSV of the trials are saved beside the weights. Interrupted, the
    same call resumes the study.
    """
    from tinycompress.training.distributed import start_processes
    from tinycompress.training.search import run_search

    check_writable(task_dir(config.workdir, get_task(config.task).name))
    spec, device, _ = prepare(config)
    processes = start_processes(device)
    if processes.world_size > 1:
        raise TinycompressError(
            "finetune --search runs its trials in one process",
            "run the search without torchrun / accelerate launch; launch the final fine-tune with the recipe it prints",
        )
    device = processes.device
    processes.check_training(config.finetune, device)  # settings every trial keeps (precision, grad_accum)
    data = load_config_data(config, spec)
    source = resolve_model_source(config.model.name)
    tokenizer = load_tokenizer(source)
    train_enc, dev_enc = (encode(tokenizer, split, config.model.max_length) for split in (data.train, data.dev))

    def build_model(recipe):
        model, _, _ = load_pretrained_classifier(
            config.model.name, spec, config.seed, head=recipe.head, classifier_dropout=recipe.classifier_dropout
        )
        return model

    outcome = run_search(
        config,
        spec,
        train_enc,
        dev_enc,
        build_model=build_model,
        model_source=str(Path(source).resolve()) if Path(source).exists() else source,
        pad_id=padding_id(tokenizer),
        device=device,
    )
    return _finetune(outcome.best.apply(config), search=outcome, data=data)  # the recipe leaves the rows alone


def _finetune(config: Config, search: SearchOutcome | None = None, data: TaskData | None = None) -> Checkpoint:
    from tinycompress.training.distributed import start_processes
    from tinycompress.training.evaluation import evaluate_split
    from tinycompress.training.loop import make_progress, train

    check_writable(task_dir(config.workdir, get_task(config.task).name))
    spec, device, threads = prepare(config)
    processes = start_processes(device)
    device = processes.device
    processes.check_training(config.finetune, device)
    data = data if data is not None else load_config_data(config, spec)
    model, tokenizer, source = load_pretrained_classifier(
        config.model.name,
        spec,
        config.seed,
        head=config.model.head,
        classifier_dropout=config.finetune.classifier_dropout,
    )
    max_length = config.model.max_length
    train_enc, dev_enc, test_enc = (encode(tokenizer, split, max_length) for split in (data.train, data.dev, data.test))
    pad = padding_id(tokenizer)

    def test_metrics() -> dict[str, float]:
        return evaluate_split(model, test_enc, spec, config, pad_id=pad, device=device, processes=processes)

    # The "original" row of the report: the pretrained encoder with its fresh, seeded head,
    # measured on the same test rows before any training.
    model.to(device)  # a GPU run evaluates it there before training
    original = test_metrics()
    with make_progress() if processes.is_main else nullcontext() as progress:
        result = train(
            model,
            train_enc,
            dev_enc,
            spec,
            config.finetune,
            pad_id=pad,
            device=device,
            seed=config.seed,
            progress=progress,
            processes=processes,
        )
    test = test_metrics()
    metrics = {
        **{f"test/{k}": v for k, v in test.items()},
        **{f"dev/{k}": v for k, v in result.best_dev.items()},
        **{f"original/test/{k}": v for k, v in original.items()},
        "parameters": count_parameters(model),
        "train_rows": len(train_enc),
        "dev_rows": len(dev_enc),
        "test_rows": len(test_enc),
        "best_epoch": result.best_epoch,
        "train_seconds": round(result.train_seconds, 1),
        "samples_per_second": round(result.samples_per_second, 1),
        "threads": threads,
        "device": str(device),
    }
    model.cpu()
    base_model = DEFAULT_MODEL_HUB_ID if config.model.name == DEFAULT_MODEL else config.model.name

    def write_files(folder: Path) -> None:
        save_hf_model(folder, model, tokenizer, max_length)
        if search is not None:
            shutil.copyfile(search.journal, folder / SEARCH_JOURNAL_FILE)
            write_trials_csv(search.trials, folder / SEARCH_TRIALS_FILE)

    return processes.write_on_main(
        lambda: write_checkpoint(
            config.workdir,
            spec.name,
            "finetune",
            write_files,
            config=config,
            metrics=metrics,
            seed=config.seed,
            base_model=base_model,
            details={
                "history": result.history,
                "data_source": data.source,
                "model_source": source,
                "head": head_of(model),  # what model.head (perhaps "auto") built
                "distributed": result.setup,
                **({"search": search.summary()} if search is not None else {}),
            },
        )
    )
