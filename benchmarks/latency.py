#!/usr/bin/env python
"""CPU latency of every model version, side by side: one run, fixed threads, the same real texts.

    python benchmarks/latency.py --finetuned runs/sst2/finetune-v1 --pruned runs/sst2/prune-v1 \\
        --data-dir ../shared/data/glue --threads 2 --runs 50
    python benchmarks/latency.py --finetuned runs/sst2/finetune-v1 --pruned runs/sst2/prune-v1 \\
        --pruned-int8 runs/sst2/quantize-v1 --unpruned-int8 runs/sst2/quantize-v2

Rows (speed-ups are against the first):

1. fine-tuned, PyTorch fp32
2. pruned, PyTorch fp32
3. pruned, ONNX fp32: export + ORT transformer fusions (the graph the int8 model is made from)
4. pruned, ONNX int8: dynamic int8 as ``tinycompress quantize`` makes it
5. unpruned (fine-tuned), ONNX int8
6. pruned, ONNX fp32 unfused: the portable file ``tinycompress export`` writes

The ONNX variants are built in a temporary folder with the quantize stage's own functions, unless
--pruned-int8 / --unpruned-int8 name ONNX quantize checkpoints to time instead. Inputs: batch 1
is the test row of median token length, batch 32 the first 32 test rows padded to the longest
(:func:`tinycompress.inference.latency.latency_batches`); each model tokenizes them with its own tokenizer.
Torch and ONNX Runtime both get --threads intra-op threads. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

BASELINE = "fine-tuned  PyTorch fp32"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetuned", type=Path, required=True, help="finetune checkpoint, e.g. runs/sst2/finetune-v1")
    parser.add_argument("--pruned", type=Path, required=True, help="prune checkpoint, e.g. runs/sst2/prune-v1")
    parser.add_argument("--pruned-int8", type=Path, help="ONNX quantize checkpoint of --pruned [default: built now]")
    parser.add_argument(
        "--unpruned-int8", type=Path, help="ONNX quantize checkpoint of --finetuned [default: built now]"
    )
    parser.add_argument("--data-dir", help="folder of GLUE TSVs [default: the pruned checkpoint's]")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads [default: 2]")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per model and batch size [default: 50]")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first [default: 5]")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    for name in ("threads", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


# ------------------------------------------------------------------------------ the variants


def onnx_folder(model, tokenizer, folder: Path, *, int8: bool, fused: bool, opset: int, max_length: int) -> Path:
    """``folder`` with model.onnx (built with the quantize stage's functions), config and tokenizer."""
    from tinycompress.checkpoint.format import ONNX_FILE
    from tinycompress.checkpoint.hf import save_config_and_tokenizer
    from tinycompress.config import QuantizeSettings
    from tinycompress.exporters.onnx import export_onnx
    from tinycompress.exporters.ort_fusion import export_optimized_onnx
    from tinycompress.quantization.onnx import quantize_onnx_model

    folder.mkdir(parents=True)
    if int8:
        quantize_onnx_model(model, folder / ONNX_FILE, QuantizeSettings(), opset=opset)
    elif fused:
        with tempfile.TemporaryDirectory() as scratch:
            export_optimized_onnx(model, folder / ONNX_FILE, opset=opset, scratch=Path(scratch))
    else:
        export_onnx(model, folder / ONNX_FILE, opset=opset)
    save_config_and_tokenizer(folder, model.config, tokenizer, max_length)
    return folder


def quantized_predictor(path: Path, threads: int):
    from tinycompress.checkpoint.format import ONNX_FILE
    from tinycompress.checkpoint.store import read_checkpoint
    from tinycompress.errors import TinycompressError
    from tinycompress.inference.predictor import onnx_predictor

    checkpoint = read_checkpoint(path)
    if checkpoint.stage != "quantize" or not (path / ONNX_FILE).is_file():
        raise TinycompressError(
            f"{path} is not an ONNX quantize checkpoint",
            "pass a folder written by `tinycompress quantize --backend onnx`",
        )
    return onnx_predictor(path, threads=threads)


def build_variants(args, finetuned, pruned, scratch: Path) -> list[tuple[str, Any]]:
    """(name, Predictor) for every row, in table order."""
    from tinycompress.checkpoint.hf import load_hf_model
    from tinycompress.inference.predictor import onnx_predictor, torch_predictor

    opset, max_length = pruned.config.export.opset, pruned.config.model.max_length
    ft_model, ft_tokenizer = load_hf_model(finetuned)
    pr_model, pr_tokenizer = load_hf_model(pruned)

    def onnx(name: str, model, tokenizer, **kind):
        folder = onnx_folder(model, tokenizer, scratch / name, opset=opset, max_length=max_length, **kind)
        return onnx_predictor(folder, threads=args.threads)

    if args.pruned_int8:
        pruned_int8 = quantized_predictor(args.pruned_int8, args.threads)
    else:
        pruned_int8 = onnx("pruned-int8", pr_model, pr_tokenizer, int8=True, fused=True)
    if args.unpruned_int8:
        unpruned_int8 = quantized_predictor(args.unpruned_int8, args.threads)
    else:
        unpruned_int8 = onnx("unpruned-int8", ft_model, ft_tokenizer, int8=True, fused=True)
    return [
        (BASELINE, torch_predictor(ft_model, ft_tokenizer)),
        ("pruned      PyTorch fp32", torch_predictor(pr_model, pr_tokenizer)),
        ("pruned      ONNX fp32 (fused)", onnx("pruned-fp32", pr_model, pr_tokenizer, int8=False, fused=True)),
        ("pruned      ONNX int8", pruned_int8),
        ("unpruned    ONNX int8", unpruned_int8),
        (
            "pruned      ONNX fp32 (unfused export)",
            onnx("pruned-fp32-export", pr_model, pr_tokenizer, int8=False, fused=False),
        ),
    ]


# ------------------------------------------------------------------------------ timing and output


def time_variants(variants, texts, max_length: int, runs: int, warmup: int) -> list[dict[str, Any]]:
    from tinycompress.inference.latency import measure_predictor

    results = [
        {"variant": name, **measure_predictor(predictor, texts, max_length=max_length, runs=runs, warmup=warmup)}
        for name, predictor in variants
    ]
    base = results[0]
    for row in results:
        for key in ("batch_1", "batch_32"):
            row[key]["speedup"] = round(base[key]["median_ms"] / row[key]["median_ms"], 2)
    return results


def print_table(results: list[dict[str, Any]], header: str) -> None:
    print(header)
    width = max(len(r["variant"]) for r in results)
    print(f"{'model':<{width}}  {'batch 1 ms':>10}  {'speed-up':>8}  {'batch 32 ms':>11}  {'speed-up':>8}")
    for r in results:
        b1, b32 = r["batch_1"], r["batch_32"]
        print(
            f"{r['variant']:<{width}}  {b1['median_ms']:>10.2f}  {b1['speedup']:>7.2f}x  {b32['median_ms']:>11.2f}  {b32['speedup']:>7.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tinycompress.checkpoint.store import read_checkpoint
    from tinycompress.data.glue import load_task_data
    from tinycompress.data.tasks import get_task
    from tinycompress.errors import TinycompressError
    from tinycompress.inference.machine import machine_info
    from tinycompress.models.run_setup import configure_threads, quiet_hf

    quiet_hf()
    threads = configure_threads(args.threads)
    try:
        finetuned, pruned = read_checkpoint(args.finetuned), read_checkpoint(args.pruned)
        config = pruned.config
        data = load_task_data(
            get_task(config.task),
            data_dir=args.data_dir or config.data.data_dir,
            dev_fraction=config.data.dev_fraction,
            seed=config.seed,
        )
        with tempfile.TemporaryDirectory(prefix="tinycompress-latency-") as scratch:
            variants = build_variants(args, finetuned, pruned, Path(scratch))
            results = time_variants(variants, data.test.texts, config.model.max_length, args.runs, args.warmup)
    except TinycompressError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return 1
    machine = machine_info(threads)
    if args.json:
        print(json.dumps({"machine": machine, "runs": args.runs, "task": config.task, "results": results}, indent=2))
    else:
        header = (
            f"{config.task}: median of {args.runs} runs, {threads} threads, {machine['cpu']} "
            f"({', '.join(machine['vector_extensions']) or 'no vector extensions found'}); speed-up vs {BASELINE.split()[0]} PyTorch fp32"
        )
        print_table(results, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
