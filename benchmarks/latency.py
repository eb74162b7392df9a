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
Torch and ONNX Runtime both get --threads intra-op threads. All variants are loaded first,
then timed interleaved in one measurement (each round runs every variant once, after warm-up
rounds; :func:`tinycompress.inference.latency.measure_predictors`), so a slow spell of the machine
hits them alike. Each cell is the median with its interquartile range; a speed-up reads
"≈1.02x" where the variant's and the baseline's IQRs overlap (the difference is within the
spread). Not a test: nothing is asserted.
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
    parser.add_argument(
        "--runs", type=int, default=50, help="timed rounds per batch size (each runs every model once) [default: 50]"
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first [default: 5]")
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
    """Every variant timed against the others in one interleaved measurement
    (:func:`tinycompress.inference.latency.measure_predictors`: warm-up rounds, then rounds that
    run each variant once, in table order); speed-ups against the first, and whether each
    differs from it by more than the spread (IQRs apart; ``differs`` False is shown "≈")."""
    from tinycompress.inference.latency import differs, measure_predictors

    timings = measure_predictors(dict(variants), texts, max_length=max_length, runs=runs, warmup=warmup)
    results = [{"variant": name, **timings[name]} for name, _ in variants]
    base = results[0]
    for row in results:
        for key in ("batch_1", "batch_32"):
            row[key]["speedup"] = round(base[key]["median_ms"] / row[key]["median_ms"], 2)
            row[key]["differs"] = None if row is base else differs(row[key], base[key])
    return results


def fmt_timing(timing: dict[str, Any]) -> str:
    """``1.90 (1.85–2.01)``: the median and its interquartile range, in ms."""
    return f"{timing['median_ms']:.2f} ({timing['q1_ms']:.2f}–{timing['q3_ms']:.2f})"


def fmt_speedup(timing: dict[str, Any]) -> str:
    """``1.42x``; ``≈1.02x`` where the IQRs overlap with the baseline's."""
    return ("≈" if timing.get("differs") is False else "") + f"{timing['speedup']:.2f}x"


def print_table(results: list[dict[str, Any]], header: str) -> None:
    print(header)
    cells = [
        (
            r["variant"],
            fmt_timing(r["batch_1"]),
            fmt_speedup(r["batch_1"]),
            fmt_timing(r["batch_32"]),
            fmt_speedup(r["batch_32"]),
        )
        for r in results
    ]
    titles = ("model", "batch 1 ms (IQR)", "speed-up", "batch 32 ms (IQR)", "speed-up")
    widths = [max(len(t), *(len(c[i]) for c in cells)) for i, t in enumerate(titles)]
    print("  ".join(t.ljust(w) if i == 0 else t.rjust(w) for i, (t, w) in enumerate(zip(titles, widths))))
    for row in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


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
        print(
            json.dumps(
                {
                    "machine": machine,
                    "runs": args.runs,
                    "warmup": args.warmup,
                    "protocol": "interleaved rounds, median and IQR",
                    "task": config.task,
                    "results": results,
                },
                indent=2,
                ensure_ascii=False,
            )
        )
    else:
        header = (
            f"{config.task}: median (Q1–Q3) of {args.runs} interleaved rounds after {args.warmup} warm-up rounds, "
            f"{threads} threads, {machine['cpu']} "
            f"({', '.join(machine['vector_extensions']) or 'no vector extensions found'}); speed-up vs {BASELINE.split()[0]} PyTorch fp32, "
            "≈ = within the spread (IQRs overlap)"
        )
        print_table(results, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
