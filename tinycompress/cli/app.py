"""The command line: parses flags into a Config and delegates to one stage function.

No training, pruning or file logic lives here. Heavy libraries are imported inside the
commands so that ``tinycompress --help`` stays instant. Commands are listed in ``--help`` in the
order they are registered below, which is the order a user meets them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, NoReturn, Optional
import typer
from tinycompress.errors import TinycompressError


DEBUG_ENV = "TINYCOMPRESS_DEBUG"


app = typer.Typer(
    name="tinycompress",
    help="Fine-tune, structurally prune, quantize and export small Transformer classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _from_config(default: str) -> str:
    """How help texts state a default: a YAML file or a parent checkpoint's config may change it."""
    return f"(default: from the config, {default} if unset)"


# Options used by more than one command: same spelling, same meaning, same help everywhere.
TaskOpt = Annotated[Optional[str], typer.Option("--task", "-t", help="GLUE task: sst2, cola, mrpc, rte, stsb, qnli, qqp, mnli.")]


DataDirOpt = Annotated[Optional[Path], typer.Option(
    "--data-dir", help="Folder of GLUE TSVs (default: from the config, else $TINYCOMPRESS_DATA_DIR, else the hub).")]


WorkdirOpt = Annotated[Optional[Path], typer.Option(
    "--workdir", "-w", help=f"Workspace holding runs/<task>/<stage>-v<N> folders {_from_config('runs')}.")]


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see configs/); flags override it.")]


DeviceOpt = Annotated[Optional[str], typer.Option("--device", help=f"auto | cpu | cuda | mps (auto = cuda > mps > cpu) {_from_config('auto')}.")]


SeedOpt = Annotated[Optional[int], typer.Option("--seed", help=f"Random seed {_from_config('42')}.")]


ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help=f"CPU threads for torch / ONNX Runtime {_from_config('all cores')}.")]


MaxTrainOpt = Annotated[Optional[int], typer.Option("--max-train-samples", help="Use only this many training rows (quick runs).")]


MaxTestOpt = Annotated[Optional[int], typer.Option("--max-test-samples", help="Evaluate on only this many test rows.")]


JsonOpt = Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")]


ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help=f"'default' (all-MiniLM-L6-v2, offline), an HF id or a local folder {_from_config('default')}.")]


EpochsOpt = Annotated[Optional[int], typer.Option("--epochs", help=f"Fine-tuning epochs {_from_config('3')}.")]


LearningRateOpt = Annotated[Optional[float], typer.Option("--lr", "--learning-rate", help=f"Fine-tuning learning rate {_from_config('5e-5')}.")]


BatchSizeOpt = Annotated[Optional[int], typer.Option("--batch-size", help=f"Fine-tuning batch size {_from_config('32')}.")]


MaxLengthOpt = Annotated[Optional[int], typer.Option("--max-length", help=f"Tokens per example; longer texts are truncated {_from_config('128')}.")]


RatioOpt = Annotated[Optional[float], typer.Option("--ratio", help=f"Fraction of all attention heads removed, in [0, 1) {_from_config('0.5')}.")]


FfnRatioOpt = Annotated[Optional[float], typer.Option("--ffn-ratio", help=f"Fraction of all FFN neurons removed, in [0, 1) {_from_config('0')}.")]


# Plain strings, not Choices: the config schema validates them, so a typo is one error line.
CriterionOpt = Annotated[Optional[str], typer.Option("--criterion", help=f"taylor | fisher | magnitude | random {_from_config('taylor')}.")]


RecoverEpochsOpt = Annotated[Optional[int], typer.Option(
    "--recover-epochs", help=f"Epochs of distillation from the parent after pruning; 0 = none {_from_config('1')}.")]


BackendOpt = Annotated[Optional[str], typer.Option(
    "--backend", help=f"Quantization backend: onnx (ONNX Runtime) | torch (torch int8 Linear + int8 embedding) {_from_config('onnx')}.")]


FormatOpt = Annotated[Optional[str], typer.Option("--format", "-f", help=f"Export format: onnx | torchscript | all {_from_config('onnx')}.")]


SweepOpt = Annotated[Optional[Path], typer.Option(
    "--sweep", help="A prune_sweep.csv from benchmarks/prune_sweep.py (default: the newest under runs/<task>/sweeps/).")]


OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Report folder, replaced on each run (default: runs/<task>/report).")]


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def run_command(work: Callable[[], Any]) -> Any:
    """Run a command body; user errors become one line on stderr and a non-zero exit."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return work()
    except typer.Exit:
        raise
    except TinycompressError as exc:
        if debug:
            raise
        _fail(exc.one_line())
    except KeyboardInterrupt:
        if debug:
            raise
        _fail("interrupted; no partial checkpoint was written, earlier ones are intact", code=130)
    except Exception as exc:  # a bug: still one line, with the way to see the traceback
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        _fail(f"unexpected {type(exc).__name__}: {first} (set {DEBUG_ENV}=1 for the traceback)")


def common_overrides(task, data_dir, workdir, device, seed, threads) -> dict[str, Any]:
    return {
        "task": task,
        "data.data_dir": str(data_dir) if data_dir else None,
        "workdir": str(workdir) if workdir else None,
        "device": device,
        "seed": seed,
        "threads": threads,
    }


def finetune_overrides(model, max_length, epochs, learning_rate, batch_size, max_train_samples, max_test_samples) -> dict[str, Any]:
    return {
        "model.name": model,
        "model.max_length": max_length,
        "finetune.epochs": epochs,
        "finetune.learning_rate": learning_rate,
        "finetune.batch_size": batch_size,
        "data.max_train_samples": max_train_samples,
        "data.max_test_samples": max_test_samples,
    }


def build_config(config_file: Optional[Path], overrides: dict[str, Any], base: dict[str, Any] | None = None):
    from tinycompress.config import load_config

    return load_config(config_file, overrides, base=base)


def _print_checkpoint(checkpoint) -> None:
    metrics = " ".join(f"{k}={v:.4f}" for k, v in checkpoint.metrics.items() if k.startswith("test/"))
    typer.echo(f"wrote {checkpoint.path}  {metrics}")


def _examples(*lines: str) -> str:
    return "Examples:\n\n" + "\n\n".join(f"  $ {line}" for line in lines)


@app.command(epilog=_examples(
    "tinycompress run --task sst2 --data-dir ../shared/data/glue",
    "tinycompress run --config configs/sst2.yaml --data-dir ../shared/data/glue",
    "tinycompress run --task sst2 --max-train-samples 2000 --max-test-samples 200 --epochs 1 --recover-epochs 0",
    "tinycompress run --task sst2 --ratio 0.3      # re-runs prune, quantize, export only",
))
def run(
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    threads: ThreadsOpt = None,
    model: ModelOpt = None,
    epochs: EpochsOpt = None,
    learning_rate: LearningRateOpt = None,
    batch_size: BatchSizeOpt = None,
    max_length: MaxLengthOpt = None,
    max_train_samples: MaxTrainOpt = None,
    max_test_samples: MaxTestOpt = None,
    ratio: RatioOpt = None,
    ffn_ratio: FfnRatioOpt = None,
    criterion: CriterionOpt = None,
    recover_epochs: RecoverEpochsOpt = None,
    backend: BackendOpt = None,
    export_format: FormatOpt = None,
    bench: Annotated[Optional[bool], typer.Option(
        "--bench/--no-bench", help="Measure every row's latency for the final table (default: on, unless the config sets report.bench).")] = None,
    baselines: Annotated[Optional[bool], typer.Option(
        "--baselines/--no-baselines",
        help=f"Also int8-quantize the unpruned fine-tuned model (ONNX Runtime and torch) for comparison {_from_config('on')}.")] = None,
    sweep: SweepOpt = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run finetune → prune → quantize → export → report and print the results table.

    Stages already done with the same settings and parent are reused, so a second run only
    rebuilds the report and a changed --ratio re-runs prune and what follows.
    """

    def work():
        from tinycompress.stages.pipeline import run_pipeline
        from tinycompress.report.render import print_report, report_json

        overrides = common_overrides(task, data_dir, workdir, device, seed, threads) | finetune_overrides(
            model, max_length, epochs, learning_rate, batch_size, max_train_samples, max_test_samples,
        ) | {
            "prune.ratio": ratio,
            "prune.ffn_ratio": ffn_ratio,
            "prune.criterion": criterion,
            "prune.recover_epochs": recover_epochs,
            "quantize.backend": backend,
            "export.format": export_format,
            "report.bench": bench,
            "report.baselines": baselines,
        }
        result = run_pipeline(build_config(config, overrides), out_dir=out, sweep=sweep)
        if as_json:
            typer.echo(report_json(result.report, result.report_dir))
        else:
            print_report(result.report)

    run_command(work)


@app.command(epilog=_examples(
    "tinycompress finetune --task sst2 --data-dir ../shared/data/glue",
    "tinycompress finetune --task sst2 --max-train-samples 2000 --epochs 1",
    "tinycompress finetune --config configs/distilbert-sst2.yaml",
))
def finetune(
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    threads: ThreadsOpt = None,
    model: ModelOpt = None,
    epochs: EpochsOpt = None,
    learning_rate: LearningRateOpt = None,
    batch_size: BatchSizeOpt = None,
    max_length: MaxLengthOpt = None,
    max_train_samples: MaxTrainOpt = None,
    max_test_samples: MaxTestOpt = None,
) -> None:
    """Fine-tune a pretrained encoder on a GLUE task; writes runs/<task>/finetune-v<N>/."""

    def work():
        from tinycompress.stages.finetune import finetune as run_finetune

        overrides = common_overrides(task, data_dir, workdir, device, seed, threads) | finetune_overrides(
            model, max_length, epochs, learning_rate, batch_size, max_train_samples, max_test_samples,
        )
        _print_checkpoint(run_finetune(build_config(config, overrides)))

    run_command(work)


@app.command(epilog=_examples(
    "tinycompress prune --task sst2 --ratio 0.5",
    "tinycompress prune runs/sst2/finetune-v1 --ratio 0.3 --ffn-ratio 0.2 --criterion fisher --steps 3",
    "tinycompress prune runs/sst2/prune-v1 --ratio 0.2 --recover-epochs 2",
    "tinycompress prune --task sst2 --ratio 0.5 --recover-epochs 0 --importance-samples 256",
    "tinycompress prune --task sst2 --vocab --ratio 0",
    "tinycompress prune --task sst2 --vocab --vocab-min-frequency 2 --ratio 0.5",
))
def prune(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="A finetune (or prune) checkpoint folder (default: the task's newest finetune-v<N>).")] = None,
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    threads: ThreadsOpt = None,
    ratio: RatioOpt = None,
    ffn_ratio: FfnRatioOpt = None,
    criterion: CriterionOpt = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help=f"Prune in this many steps, re-scoring between them {_from_config('1')}.")] = None,
    recover_epochs: RecoverEpochsOpt = None,
    importance_samples: Annotated[Optional[int], typer.Option(
        "--importance-samples", help=f"Training rows used to score importance {_from_config('1024')}.")] = None,
    vocab: Annotated[Optional[bool], typer.Option(
        "--vocab/--no-vocab", help=f"Also drop the word-embedding rows of tokens the train and dev texts never use {_from_config('off')}.")] = None,
    vocab_min_frequency: Annotated[Optional[int], typer.Option(
        "--vocab-min-frequency", help=f"With --vocab: keep tokens seen at least this often {_from_config('1')}.")] = None,
    vocab_top_k: Annotated[Optional[int], typer.Option(
        "--vocab-top-k", help=f"With --vocab: keep at most this many of the most frequent tokens, special tokens aside {_from_config('no limit')}.")] = None,
    max_train_samples: MaxTrainOpt = None,
    max_test_samples: MaxTestOpt = None,
) -> None:
    """Remove the least important attention heads and FFN neurons; writes runs/<task>/prune-v<N>/.

    With --vocab the word embedding is also cut to the tokens of the task's train and dev texts
    (after recovery); the folder's tokenizer spells other words with kept pieces, else [UNK].

    Settings of the parent checkpoint (data, model, max length) carry over. The new folder is
    written beside the parent unless --workdir is given.
    """

    def work():
        from tinycompress.checkpoint.workspace import find_parent, parent_base
        from tinycompress.stages.prune import prune as run_prune

        overrides = common_overrides(task, data_dir, workdir, device, seed, threads) | {
            "prune.ratio": ratio,
            "prune.ffn_ratio": ffn_ratio,
            "prune.criterion": criterion,
            "prune.steps": steps,
            "prune.recover_epochs": recover_epochs,
            "prune.importance_samples": importance_samples,
            "prune.vocab": vocab,
            "prune.vocab_min_frequency": vocab_min_frequency,
            "prune.vocab_top_k": vocab_top_k,
            "data.max_train_samples": max_train_samples,
            "data.max_test_samples": max_test_samples,
        }
        parent = find_parent("prune", checkpoint, config, overrides)
        _print_checkpoint(run_prune(build_config(config, overrides, base=parent_base(parent, "prune")), parent))

    run_command(work)


@app.command(epilog=_examples(
    "tinycompress quantize --task sst2",
    "tinycompress quantize runs/sst2/finetune-v1",
    "tinycompress quantize --backend torch",
    "tinycompress quantize --mode static --per-channel --calibration-samples 256",
))
def quantize(
    checkpoint: Annotated[Optional[Path], typer.Argument(
        help="A prune (or finetune, for the unpruned comparison) checkpoint folder (default: the task's newest prune-v<N>).")] = None,
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    threads: ThreadsOpt = None,
    backend: BackendOpt = None,
    mode: Annotated[Optional[str], typer.Option(
        "--mode", help=f"dynamic | static (ONNX QDQ, calibrated on training rows) {_from_config('dynamic')}.")] = None,
    per_channel: Annotated[Optional[bool], typer.Option(
        "--per-channel/--per-tensor", help=f"Weight scales per output channel or per tensor {_from_config('per tensor')}.")] = None,
    embeddings: Annotated[Optional[bool], typer.Option("--embeddings/--no-embeddings", help=f"Quantize the word embedding too {_from_config('yes')}.")] = None,
    calibration_samples: Annotated[Optional[int], typer.Option(
        "--calibration-samples", help=f"Training rows calibrating static quantization {_from_config('128')}.")] = None,
    bench_runs: Annotated[Optional[int], typer.Option(
        "--bench-runs", help=f"Timed runs per batch size for the recorded latency {_from_config('50')}.")] = None,
    max_test_samples: MaxTestOpt = None,
) -> None:
    """Post-training int8 quantization; writes runs/<task>/quantize-v<N>/ with test metrics measured on the int8 model.

    Settings of the parent checkpoint (data, model, max length) carry over. The new folder is
    written beside the parent unless --workdir is given.
    """

    def work():
        from tinycompress.checkpoint.workspace import find_parent, parent_base
        from tinycompress.stages.quantize import quantize as run_quantize
        from tinycompress.stages.quantize import summary_line

        overrides = common_overrides(task, data_dir, workdir, None, seed, threads) | {
            "quantize.backend": backend,
            "quantize.mode": mode,
            "quantize.per_channel": per_channel,
            "quantize.quantize_embeddings": embeddings,
            "quantize.calibration_samples": calibration_samples,
            "report.bench_runs": bench_runs,
            "data.max_test_samples": max_test_samples,
        }
        parent = find_parent("quantize", checkpoint, config, overrides)
        written = run_quantize(build_config(config, overrides, base=parent_base(parent, "quantize")), parent)
        _print_checkpoint(written)
        typer.echo(summary_line(written))

    run_command(work)


@app.command(epilog=_examples(
    "tinycompress export --task sst2",
    "tinycompress export runs/sst2/prune-v1 --format all",
    "tinycompress export runs/sst2/quantize-v1 --output deploy/sst2-int8",
))
def export(
    checkpoint: Annotated[Optional[Path], typer.Argument(
        help="A quantize, prune or finetune checkpoint folder (default: the task's newest, in that order).")] = None,
    format_: FormatOpt = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Write to this new folder instead of runs/<task>/export-v<N>/ (must not exist).")] = None,
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
    threads: ThreadsOpt = None,
    opset: Annotated[Optional[int], typer.Option("--opset", help=f"ONNX opset of fp32 exports {_from_config('17')}.")] = None,
) -> None:
    """Export to ONNX and/or TorchScript and check parity against PyTorch on real test sentences.

    Prints one line per file and batch: ✓/✗, max |Δ| of the logits and label agreement. A
    tolerance miss is a warning (the folder is still written); a shape mismatch is an error.
    """

    def work():
        from tinycompress.stages.export import export as run_export
        from tinycompress.stages.export import parity_lines, parity_warnings
        from tinycompress.checkpoint.workspace import find_parent, parent_base

        overrides = common_overrides(task, data_dir, workdir, None, None, threads) | {"export.format": format_, "export.opset": opset}
        parent = find_parent("export", checkpoint, config, overrides)
        written = run_export(build_config(config, overrides, base=parent_base(parent, "export")), parent, output)
        typer.echo(f"wrote {written.path}")
        for line in parity_lines(written):
            typer.echo(line)
        for line in parity_warnings(written):
            typer.echo(f"warning: {line}", err=True)

    run_command(work)


@app.command(epilog=_examples(
    "tinycompress report --task sst2",
    "tinycompress report runs/sst2/quantize-v2 --bench --threads 4",
    "tinycompress report --task sst2 --sweep runs/sst2/sweeps/prune_sweep.csv --out results/",
    "tinycompress report --task sst2 --json",
))
def report(
    run_dir: Annotated[Optional[Path], typer.Argument(
        help="A checkpoint folder (the chain ending there), a task folder (runs/sst2) or a workspace "
             "(default: the newest chain of --task in --workdir).")] = None,
    task: TaskOpt = None,
    workdir: WorkdirOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    threads: ThreadsOpt = None,
    bench: Annotated[Optional[bool], typer.Option(
        "--bench/--no-bench", help=f"Measure every row's latency on this machine now, rather than read it from the manifests {_from_config('off')}.")] = None,
    bench_runs: Annotated[Optional[int], typer.Option("--runs", help=f"Timed runs per row and batch size with --bench {_from_config('50')}.")] = None,
    baselines: Annotated[Optional[bool], typer.Option(
        "--baselines/--no-baselines",
        help=f"Show the int8 checkpoints made straight from the chain's fine-tuned model (int8 without pruning) {_from_config('on')}.")] = None,
    sweep: SweepOpt = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the results table of one chain and write report.md / .json / .csv and plots.

    Rows: original → fine-tuned → pruned → quantized → exported, found through the lineage in
    the manifests, then the baselines (int8 without pruning). Test metrics are on the GLUE
    validation set (GLUE test labels are hidden).
    """

    def work():
        from tinycompress.stages.report import run_report
        from tinycompress.report.render import print_report, report_json

        overrides = {"workdir": str(workdir) if workdir else None, "threads": threads, "report.bench": bench, "report.bench_runs": bench_runs,
                     "report.baselines": baselines}
        built, written = run_report(run_dir, config_file=config, overrides=overrides, task=task,
                                    data_dir=str(data_dir) if data_dir else None, sweep=sweep, out_dir=out)
        if as_json:
            typer.echo(report_json(built, written))
        else:
            print_report(built)
        typer.echo(f"wrote {written}", err=True)

    run_command(work)


@app.command(epilog=_examples(
    'tinycompress predict runs/sst2/export-v1 "a gripping, funny film" "dull and far too long"',
    "tinycompress predict runs/sst2/quantize-v1 --file reviews.txt --json",
))
def predict(
    path: Annotated[Path, typer.Argument(help="An export folder or a finetune / prune / quantize checkpoint.")],
    texts: Annotated[Optional[list[str]], typer.Argument(help="Texts to classify (pair tasks: the two sentences separated by a tab).")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", help="A UTF-8 file with one text per line.")] = None,
    as_json: JsonOpt = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Texts per forward pass (default: 32).")] = 32,
    threads: ThreadsOpt = None,
) -> None:
    """Classify texts with any model folder; prints the label and its probability per text (regression: the score)."""

    def work():
        from tinycompress.stages.predict import format_prediction, read_texts
        from tinycompress.stages.predict import predict as run_predict

        predictions = run_predict(path, read_texts(texts, file), batch_size=batch_size, threads=threads)
        if as_json:
            typer.echo(json.dumps(predictions, indent=2, ensure_ascii=False))
        else:
            for prediction in predictions:
                typer.echo(format_prediction(prediction))

    run_command(work)


@app.command(epilog=_examples(
    "tinycompress evaluate default --task sst2",
    "tinycompress evaluate runs/sst2/prune-v1",
    "tinycompress evaluate runs/sst2/quantize-v1 --json",
))
def evaluate(
    target: Annotated[str, typer.Argument(help="A checkpoint or export folder, 'default', an HF id or a model folder.")],
    task: TaskOpt = None,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    threads: ThreadsOpt = None,
    max_test_samples: MaxTestOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure any model on the task's test set (GLUE validation); prints its metrics.

    A plain model (not a checkpoint) gets a freshly initialised, seeded classification head:
    that is the "original" row of the report.
    """

    def work():
        from tinycompress.stages.evaluate import evaluate_target

        overrides = common_overrides(task, data_dir, None, device, seed, threads) | {"data.max_test_samples": max_test_samples}
        metrics = evaluate_target(target, config_file=config, overrides=overrides)
        if as_json:
            typer.echo(json.dumps(metrics, indent=2))
        else:
            typer.echo("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))

    run_command(work)


@app.command(epilog=_examples("tinycompress env", "tinycompress env --data-dir ../shared/data/glue --json"))
def env(
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print versions, device, threads, CPU vector extensions, and where the model and data are."""

    def work():
        from tinycompress.stages.env import environment_report

        report = environment_report(str(data_dir) if data_dir else None)
        if as_json:
            typer.echo(json.dumps(report, indent=2))
            return
        versions = report.pop("versions")
        for name, version in versions.items():
            typer.echo(f"{name:<20} {version}")
        for key, value in report.items():
            shown = ", ".join(value) if isinstance(value, list) else value
            typer.echo(f"{key:<20} {shown}")

    run_command(work)


def main() -> None:
    """Console entry point: usage errors (bad flag types, unknown options) are one line too."""
    # typer.TyperException is the public base of its usage errors; catching it here, rather
    # than in standalone mode, replaces the multi-line usage box with our one-line format.
    args = sys.argv[1:] or ["--help"]
    try:
        result = app(args=args, prog_name="tinycompress", standalone_mode=False)
    except typer.TyperException as exc:
        context = getattr(exc, "ctx", None)
        hint = f" — see `{context.command_path} --help`" if context is not None else ""
        typer.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(getattr(exc, "exit_code", 2))
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    sys.exit(main())
