"""Fine-tuning throughput with 1 and 2 processes: tinycompress's own training loop under torchrun.

    python benchmarks/distributed_throughput.py --data-dir ../shared/data/glue
    python benchmarks/distributed_throughput.py --data-dir ../shared/data/glue --tiny --steps 40
    python benchmarks/distributed_throughput.py --data-dir ../shared/data/glue --processes 1 2 4 --device cuda

Each configuration is launched as ``python -m torch.distributed.run --standalone --nproc-per-node N``
running this file as a worker: the first ``steps × batch-size`` SST-2 training rows, one epoch of
:func:`tinycompress.training.loop.train` (the loop ``finetune`` and ``prune`` use; the global batch
is ``--batch-size`` whatever N, so every configuration takes the same optimizer steps), the
training steps timed, nothing written. Configurations are interleaved over ``--repeats`` rounds;
the table shows the median samples/s and the range. On CPU the cores are divided between the
processes (``--threads`` in total, default all); on 2 cores two processes cannot be faster than
one -- this measures what the distributed path costs, not a speed-up. The model is the default
all-MiniLM-L6-v2 (installed offline), or with ``--tiny`` a small random BERT with a word-level
vocabulary built from the rows (no download, seconds per run).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_model(texts, seed: int):
    """A 2-layer, 128-wide random BERT and a word-level tokenizer over ``texts``' 8,000 commonest words."""
    from collections import Counter

    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, BertTokenizer

    words = Counter(w for row in texts for text in row for w in text.lower().split())
    vocab = SPECIALS + [w for w, _ in words.most_common(8000) if w not in SPECIALS]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, model_max_length=512)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        num_labels=2,
    )
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config), tokenizer


def worker(args) -> None:
    """One launched process: train for one epoch over the rows; process 0 prints a JSON line."""
    import torch

    from tinycompress.config import FinetuneSettings
    from tinycompress.data.batching import encode, padding_id
    from tinycompress.data.glue import load_task_data
    from tinycompress.data.tasks import get_task
    from tinycompress.models.pretrained import load_pretrained_classifier
    from tinycompress.models.run_setup import quiet_hf, resolve_device
    from tinycompress.training.distributed import close_processes, start_processes
    from tinycompress.training.loop import train

    quiet_hf()
    processes = start_processes(resolve_device(args.device))
    torch.set_num_threads(args.worker_threads)
    spec = get_task("sst2")
    data = load_task_data(spec, data_dir=args.data_dir, dev_fraction=0.05, seed=0)
    rows = data.train.subset(range(min(len(data.train), args.steps * args.batch_size)))
    if args.tiny:
        model, tokenizer = tiny_model(rows.texts, seed=0)
    else:
        model, tokenizer, _ = load_pretrained_classifier("default", spec, 0)
    train_enc = encode(tokenizer, rows, args.max_length)
    dev_enc = encode(tokenizer, data.dev.subset(range(32)), args.max_length)
    settings = FinetuneSettings(epochs=1, batch_size=args.batch_size, learning_rate=5e-5, precision=args.precision)
    result = train(
        model,
        train_enc,
        dev_enc,
        spec,
        settings,
        pad_id=padding_id(tokenizer),
        device=processes.device,
        seed=0,
        processes=processes,
    )
    if processes.is_main:
        print(json.dumps({"samples_per_second": result.samples_per_second, "rows": len(train_enc)}))
    close_processes()


def launch(args, processes: int) -> tuple[list[str], float]:
    """(command, samples/s) of one launched run with ``processes`` processes."""
    threads = max(1, args.threads // processes) if args.device == "cpu" else 1
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    command += [__file__, "--worker", "--worker-threads", str(threads), *_shared_flags(args)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
    line = next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{"))
    return command, json.loads(line)["samples_per_second"]


def _shared_flags(args) -> list[str]:
    flags = ["--data-dir", args.data_dir, "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    flags += ["--max-length", str(args.max_length), "--device", args.device, "--precision", args.precision]
    return flags + (["--tiny"] if args.tiny else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="GLUE folder with sst2/train.tsv")
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps per run (rows = steps x batch size)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch: rows per optimizer step")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the processes")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; median and range shown")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--tiny", action="store_true", help="a small random BERT instead of all-MiniLM-L6-v2")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    args.data_dir = str(Path(args.data_dir).resolve())
    rates: dict[int, list[float]] = {n: [] for n in args.processes}
    commands: dict[int, list[str]] = {}
    for _ in range(args.repeats):
        for n in args.processes:
            commands[n], rate = launch(args, n)
            rates[n].append(rate)
    model = "tiny random BERT (2 x 128)" if args.tiny else "all-MiniLM-L6-v2"
    print(
        f"\n{model}, {args.steps * args.batch_size} SST-2 rows, global batch {args.batch_size}, max length "
        f"{args.max_length}, {args.device}, {args.precision}, {args.threads} threads in total, "
        f"median (min-max) of {args.repeats} interleaved runs"
    )
    print(f"{'processes':>9} {'threads each':>12} {'samples/s':>10} {'range':>15} {'vs 1':>6}")
    base = statistics.median(rates[args.processes[0]])
    for n in args.processes:
        median = statistics.median(rates[n])
        threads = max(1, args.threads // n) if args.device == "cpu" else "-"
        spread = f"{min(rates[n]):.0f}-{max(rates[n]):.0f}"
        print(f"{n:>9} {threads!s:>12} {median:>10.1f} {spread:>15} {median / base:>5.2f}x")
    print("\ncommands:")
    for n in args.processes:
        print(f"  OMP_NUM_THREADS={max(1, args.threads // n)} {shlex.join(commands[n])}")


if __name__ == "__main__":
    main()
