#!/usr/bin/env python
"""Test accuracy of each model at several evaluation batch sizes, and its changed labels per split.

How much a model's test accuracy depends on the evaluation batch size, and how often int8 changes
its parent's predicted labels on the dev split (carved from train) against the test set.

    python benchmarks/int8_batch_dependence.py runs/sst2/prune-v1 runs/sst2/quantize-v1 runs/sst2/quantize-v4 \\
        --data-dir ../shared/data/glue

The first folder is the reference (an fp32 parent, a checkpoint folder with its manifest: its
config gives the task, seed and data); the others are any model folder tinycompress reads. Rows run in length-grouped batches of each size, as stage evaluation batches them. Dynamic
int8 scales activations by the batch's range, so its column values differ; fp32's do not. The
second table gives, per split and length band, each model's accuracy and the share of rows whose
predicted label differs from the reference's. The dev split is carved with the first folder's
seed and ``data.dev_fraction``. Prints Markdown; nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from tinycompress.checkpoint.store import read_checkpoint
from tinycompress.config import config_from_dict
from tinycompress.data.batching import encode, padding_id
from tinycompress.data.glue import load_config_data
from tinycompress.data.tasks import get_task
from tinycompress.errors import TinycompressError
from tinycompress.inference.predictor import load_predictor
from tinycompress.training.evaluation import predict_logits

BANDS = ((0, 10), (10, 20), (20, None), (0, None))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="model folders; the first is the reference")
    parser.add_argument("--data-dir", help="GLUE TSV folder (else the reference's config)")
    parser.add_argument("--batch-sizes", default="1,8,32,64,128")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    try:
        reference = read_checkpoint(args.folders[0])
        data_settings = dict(reference.manifest["config"])
        if args.data_dir:
            data_settings["data"] = {**data_settings["data"], "data_dir": args.data_dir}
        config = config_from_dict(data_settings)
        spec = get_task(config.task)
        data = load_config_data(config, spec)
        predictors = {folder: load_predictor(folder, threads=args.threads) for folder in args.folders}
    except TinycompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if spec.is_regression:
        print("error: accuracy and label flips need a classification task", file=sys.stderr)
        return 2

    def logits(predictor, examples, batch_size):
        encoded = encode(predictor.tokenizer, examples, config.model.max_length)
        pad = padding_id(predictor.tokenizer)
        out = predict_logits(None, encoded, batch_size=batch_size, pad_id=pad, forward=predictor.forward)
        return out.argmax(-1), np.asarray(encoded.labels), np.array([len(ids) for ids in encoded.input_ids])

    print(f"Test accuracy by evaluation batch size ({len(data.test)} rows)\n")
    print("| folder | " + " | ".join(f"b{b}" for b in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for folder, predictor in predictors.items():
        cells = []
        for size in sizes:
            predicted, labels, _ = logits(predictor, data.test, size)
            cells.append(f"{(predicted == labels).mean():.4f}")
        print(f"| {folder} | " + " | ".join(cells) + " |")

    print(f"\nOne row at a time: accuracy and labels changed against {args.folders[0]}\n")
    print("| split | tokens | rows | " + " | ".join(f"{f}: acc / changed" for f in args.folders[1:]) + " |")
    print("|---|---|---:|" + "---:|" * (len(args.folders) - 1))
    for split, examples in (("dev", data.dev), ("test", data.test)):
        runs = {folder: logits(predictor, examples, 1) for folder, predictor in predictors.items()}
        base, labels, lengths = runs[args.folders[0]]
        for low, high in BANDS:
            rows = (lengths >= low) & (lengths < (high or 10**9))
            if not rows.any():
                continue
            cells = []
            for folder in args.folders[1:]:
                predicted = runs[folder][0][rows]
                cells.append(f"{(predicted == labels[rows]).mean():.4f} / {(predicted != base[rows]).mean():.2%}")
            band = f"{low}+" if high is None else f"{low}-{high - 1}"
            print(
                f"| {split} | {'all' if (low, high) == (0, None) else band} | {rows.sum()} | "
                + " | ".join(cells)
                + " |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
