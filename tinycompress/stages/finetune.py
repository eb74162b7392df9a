"""Stage 1: fine-tune a pretrained encoder on a GLUE task.

tinycompress finetune --task sst2 --data-dir ../shared/data/glue
torchrun --nproc-per-node 2 -m tinycompress finetune --task sst2   # several processes

Launched as several processes, every process runs this function alike: batches are shared
(:mod:`tinycompress.training.distributed`), metrics are over whole splits, and process 0 alone
writes the folder, which every process returns.
"""

from __future__ import annotations

from contextlib import nullcontext

from tinycompress.checkpoint.format import task_dir
from tinycompress.checkpoint.hf import save_hf_model
from tinycompress.checkpoint.store import Checkpoint, write_checkpoint
from tinycompress.checkpoint.temporaries import check_writable
from tinycompress.config import Config
from tinycompress.data.batching import encode, padding_id
from tinycompress.data.glue import load_config_data
from tinycompress.data.tasks import get_task
from tinycompress.models.pretrained import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_HUB_ID,
    count_parameters,
    load_pretrained_classifier,
)
from tinycompress.models.run_setup import prepare


def finetune(config: Config) -> Checkpoint:
    """Fine-tune ``config.model.name`` on ``config.task``; returns the new checkpoint.

    Model selection uses the dev split carved from train; the test metrics (GLUE validation)
    are measured once, on the best epoch, and stored in the manifest.
    """
    from tinycompress.training.distributed import start_processes
    from tinycompress.training.evaluation import evaluate
    from tinycompress.training.loop import make_progress, train

    check_writable(task_dir(config.workdir, get_task(config.task).name))
    spec, device, threads = prepare(config)
    processes = start_processes(device)
    device = processes.device
    processes.check_training(config.finetune, device)
    data = load_config_data(config, spec)
    model, tokenizer, source = load_pretrained_classifier(config.model.name, spec, config.seed)
    max_length = config.model.max_length
    train_enc, dev_enc, test_enc = (encode(tokenizer, split, max_length) for split in (data.train, data.dev, data.test))
    pad = padding_id(tokenizer)

    def test_metrics() -> dict[str, float]:
        return evaluate(
            model,
            test_enc,
            spec,
            batch_size=config.finetune.eval_batch_size,
            pad_id=pad,
            device=device,
            processes=processes,
        )

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
    return processes.write_on_main(
        lambda: write_checkpoint(
            config.workdir,
            spec.name,
            "finetune",
            lambda folder: save_hf_model(folder, model, tokenizer, max_length),
            config=config,
            metrics=metrics,
            seed=config.seed,
            base_model=base_model,
            details={
                "history": result.history,
                "data_source": data.source,
                "model_source": source,
                "distributed": result.setup,
            },
        )
    )
