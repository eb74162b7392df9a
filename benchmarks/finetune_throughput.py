"""Fine-tuning throughput: tinycompress's loop against HF Trainer + DataCollatorWithPadding.

    python benchmarks/finetune_throughput.py --data-dir ../shared/data/glue --rows 2048

Same model (the default all-MiniLM-L6-v2), same SST-2 rows, batch size, threads and one epoch
each. Prints one table of samples/s (training steps only: no evaluation, no saving).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def ours(model_factory, rows, tokenizer, args) -> float:
    from tinycompress.config import FinetuneSettings
    from tinycompress.data.batching import encode
    from tinycompress.data.tasks import get_task
    from tinycompress.training.loop import train

    spec = get_task("sst2")
    encoded = encode(tokenizer, rows, args.max_length)
    dev = encode(tokenizer, rows.subset(range(8)), args.max_length)
    settings = FinetuneSettings(epochs=1, batch_size=args.batch_size, learning_rate=5e-5)
    result = train(
        model_factory(), encoded, dev, spec, settings, pad_id=tokenizer.pad_token_id, device=torch.device("cpu"), seed=0
    )
    return result.samples_per_second


def hf_trainer(model_factory, rows, tokenizer, args, *, group_by_length: bool) -> float:
    import datasets
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    table = datasets.Dataset.from_dict({"sentence": [t[0] for t in rows.texts], "label": rows.labels})
    table = table.map(
        lambda b: tokenizer(b["sentence"], truncation=True, max_length=args.max_length),
        batched=True,
        remove_columns=["sentence"],
    )
    training_args = TrainingArguments(
        output_dir="/tmp/tinycompress-trainer-bench",
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=1,
        learning_rate=5e-5,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        # transformers 5 names it train_sampling_strategy (4.x: group_by_length=True).
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        seed=0,
    )
    trainer = Trainer(
        model=model_factory(), args=training_args, train_dataset=table, data_collator=DataCollatorWithPadding(tokenizer)
    )
    started = time.perf_counter()
    trainer.train()
    return len(table) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each loop; the median is shown")
    args = parser.parse_args()

    from tinycompress.data.glue import load_task_data
    from tinycompress.data.tasks import get_task
    from tinycompress.models.pretrained import load_pretrained_classifier
    from tinycompress.models.run_setup import configure_threads, quiet_hf

    quiet_hf()
    threads = configure_threads(args.threads)
    spec = get_task("sst2")
    data = load_task_data(spec, data_dir=args.data_dir, dev_fraction=0.05, seed=0, max_train_samples=args.rows)
    _, tokenizer, _ = load_pretrained_classifier("default", spec, 0)

    def factory():
        return load_pretrained_classifier("default", spec, 0)[0]

    loops = [
        ("tinycompress (length-grouped, dynamic padding)", lambda: ours(factory, data.train, tokenizer, args)),
        (
            "HF Trainer + DataCollatorWithPadding",
            lambda: hf_trainer(factory, data.train, tokenizer, args, group_by_length=False),
        ),
        (
            "HF Trainer + DataCollatorWithPadding, group_by_length",
            lambda: hf_trainer(factory, data.train, tokenizer, args, group_by_length=True),
        ),
    ]
    # Interleaved repeats, median kept: one pass of a few thousand rows is noisy on 2 cores.
    rates: dict[str, list[float]] = {name: [] for name, _ in loops}
    for _ in range(args.repeats):
        for name, loop in loops:
            rates[name].append(loop())
    results = [(name, statistics.median(values)) for name, values in rates.items()]
    baseline = results[1][1]
    print(
        f"\nall-MiniLM-L6-v2 on {len(data.train)} SST-2 rows, batch {args.batch_size}, {threads} threads, 1 epoch, CPU, median of {args.repeats} interleaved runs"
    )
    print(f"{'loop':<62} {'samples/s':>10} {'vs Trainer':>11}")
    for name, rate in results:
        print(f"{name:<62} {rate:>10.1f} {rate / baseline:>10.2f}x")


if __name__ == "__main__":
    main()
