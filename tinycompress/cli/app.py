"""The command line: each command maps its flags onto one stage function.

No training, pruning or file logic lives here; flags, their help and their config keys are
declared once in :mod:`tinycompress.cli.options`. Stage modules (and so torch) are imported
inside the commands, so that ``tinycompress --help`` stays instant. Commands are listed in
``--help`` in the order they are registered below, which is the order a user meets them.
"""

import sys
from pathlib import Path
from typing import Annotated

import typer

from tinycompress.cli import options as opt
from tinycompress.cli.options import config_flags
from tinycompress.cli.output import (
    examples,
    one_line_errors,
    print_checkpoint,
    print_env,
    print_json,
    print_metrics,
    run_console,
    single_process,
)
from tinycompress.config import load_config

app = typer.Typer(
    name="tinycompress",
    help="Fine-tune, structurally prune, quantize and export small Transformer classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def command(*example_lines: str, launchable: bool = False):
    """Register a command with its examples epilog; its errors are one line on stderr. Only a
    ``launchable`` command runs as several processes (torchrun / accelerate launch); the others
    refuse to, in one line."""

    def register(function):
        body = function if launchable else single_process(function)
        return app.command(epilog=examples(*example_lines))(one_line_errors(body))

    return register


@command(
    "tinycompress run --task sst2 --data-dir ../shared/data/glue",
    "tinycompress run --config configs/sst2.yaml --data-dir ../shared/data/glue",
    "tinycompress run --task sst2 --max-train-samples 2000 --max-test-samples 200 --epochs 1 --recover-epochs 0",
    "tinycompress run --task sst2 --ratio 0.3      # re-runs prune, quantize, export only",
)
def run(
    task: opt.Task = None,
    data_dir: opt.DataDir = None,
    workdir: opt.Workdir = None,
    config: opt.ConfigFile = None,
    device: opt.Device = None,
    seed: opt.Seed = None,
    threads: opt.Threads = None,
    model: opt.Model = None,
    epochs: opt.Epochs = None,
    learning_rate: opt.LearningRate = None,
    batch_size: opt.BatchSize = None,
    precision: opt.Precision = None,
    grad_accum: opt.GradAccum = None,
    max_length: opt.MaxLength = None,
    head: opt.Head = None,
    max_train_samples: opt.MaxTrain = None,
    max_test_samples: opt.MaxTest = None,
    ratio: opt.Ratio = None,
    ffn_ratio: opt.FfnRatio = None,
    criterion: opt.Criterion = None,
    recover_epochs: opt.RecoverEpochs = None,
    recover_learning_rate: opt.RecoverLearningRate = None,
    speedup: opt.Speedup = None,
    target_latency_ms: opt.TargetLatency = None,
    target_size_mb: opt.TargetSize = None,
    target_batch_size: opt.TargetBatch = None,
    mask_tuning: opt.MaskTuning = None,
    distill_layer_weight: opt.LayerDistill = None,
    backend: opt.Backend = None,
    tolerance: opt.Tolerance = None,
    export_format: opt.Format = None,
    bench: opt.RunBench = None,
    baselines: opt.Baselines = None,
    sweep: opt.Sweep = None,
    out: opt.Out = None,
    as_json: opt.Json = False,
) -> None:
    """Run finetune → prune → quantize → export → report and print the results table.

    Stages already done with the same settings and parent are reused, so a second run only
    rebuilds the report and a changed --ratio re-runs prune and what follows.
    """
    flags = config_flags(run, locals())
    opt.check_one_pruning_goal(flags)

    from tinycompress.report.render import print_report, report_json
    from tinycompress.stages.pipeline import run_pipeline

    result = run_pipeline(load_config(config, flags), out_dir=out, sweep=sweep)
    if as_json:
        typer.echo(report_json(result.report, result.report_dir))
    else:
        print_report(result.report)


@command(
    "tinycompress finetune --task sst2 --data-dir ../shared/data/glue",
    "tinycompress finetune --task sst2 --max-train-samples 2000 --epochs 1",
    "tinycompress finetune --config configs/distilbert-sst2.yaml",
    "tinycompress finetune --task sst2 --head mean --lr 1e-4",
    "tinycompress finetune --task sst2 --search --trials 20 --search-samples 4000",
    "torchrun --nproc-per-node 2 -m tinycompress finetune --task sst2 --precision bf16",
    "accelerate launch --num_processes 4 -m tinycompress finetune --task mnli --batch-size 64 --grad-accum 2",
    launchable=True,
)
def finetune(
    task: opt.Task = None,
    data_dir: opt.DataDir = None,
    workdir: opt.Workdir = None,
    config: opt.ConfigFile = None,
    device: opt.Device = None,
    seed: opt.Seed = None,
    threads: opt.Threads = None,
    model: opt.Model = None,
    epochs: opt.Epochs = None,
    learning_rate: opt.LearningRate = None,
    batch_size: opt.BatchSize = None,
    precision: opt.Precision = None,
    grad_accum: opt.GradAccum = None,
    max_length: opt.MaxLength = None,
    head: opt.Head = None,
    max_train_samples: opt.MaxTrain = None,
    max_test_samples: opt.MaxTest = None,
    search: opt.Search = False,
    trials: opt.Trials = None,
    search_samples: opt.SearchSamples = None,
) -> None:
    """Fine-tune a pretrained encoder on a GLUE task; writes runs/<task>/finetune-v<N>/.

    Runs as several processes under torchrun or accelerate launch (CPUs, GPUs, machines):
    --batch-size is then the batch of one optimizer step over all of them. With --search, an
    Optuna study chooses the recipe first (resumed by the same command after Ctrl-C).
    """
    flags = config_flags(finetune, locals())
    opt.check_search_flags(flags, search)

    from tinycompress.stages.finetune import finetune as run_finetune
    from tinycompress.stages.finetune import search_and_finetune

    print_checkpoint((search_and_finetune if search else run_finetune)(load_config(config, flags)))


def _run_on_parent(stage: str, checkpoint: Path | None, config: Path | None, flags: dict, stage_fn, *args):
    """Run a stage on its parent checkpoint, whose settings (data, model, max length) carry over."""
    from tinycompress.checkpoint.workspace import find_parent, parent_base

    parent = find_parent(stage, checkpoint, config, flags)
    return stage_fn(load_config(config, flags, base=parent_base(parent, stage)), parent, *args)


@command(
    "tinycompress prune --task sst2 --ratio 0.5",
    "tinycompress prune --task sst2 --speedup 2",
    "tinycompress prune --task sst2 --target-latency-ms 20 --target-batch-size 1",
    "tinycompress prune --task sst2 --target-size-mb 12 --vocab",
    "tinycompress prune runs/sst2/finetune-v1 --ratio 0.3 --ffn-ratio 0.2 --criterion fisher --steps 3",
    "tinycompress prune runs/sst2/prune-v1 --ratio 0.2 --recover-epochs 2",
    "tinycompress prune --task sst2 --ratio 0.5 --recover-epochs 0 --importance-samples 256",
    "tinycompress prune --task sst2 --vocab --ratio 0",
    "tinycompress prune --task sst2 --vocab --vocab-min-frequency 2 --ratio 0.5",
    "torchrun --nproc-per-node 2 -m tinycompress prune --task sst2 --speedup 2",
    launchable=True,
)
def prune(
    checkpoint: Annotated[
        Path | None,
        typer.Argument(help="A finetune (or prune) checkpoint folder (default: the task's newest finetune-v<N>)."),
    ] = None,
    task: opt.Task = None,
    data_dir: opt.DataDir = None,
    workdir: opt.Workdir = None,
    config: opt.ConfigFile = None,
    device: opt.Device = None,
    seed: opt.Seed = None,
    threads: opt.Threads = None,
    ratio: opt.Ratio = None,
    ffn_ratio: opt.FfnRatio = None,
    criterion: opt.Criterion = None,
    steps: opt.Steps = None,
    recover_epochs: opt.RecoverEpochs = None,
    recover_learning_rate: opt.RecoverLearningRate = None,
    speedup: opt.Speedup = None,
    target_latency_ms: opt.TargetLatency = None,
    target_size_mb: opt.TargetSize = None,
    target_batch_size: opt.TargetBatch = None,
    mask_tuning: opt.MaskTuning = None,
    distill_layer_weight: opt.LayerDistill = None,
    importance_samples: opt.ImportanceSamples = None,
    precision: opt.Precision = None,
    grad_accum: opt.GradAccum = None,
    vocab: opt.Vocab = None,
    vocab_min_frequency: opt.VocabMinFrequency = None,
    vocab_top_k: opt.VocabTopK = None,
    max_train_samples: opt.MaxTrain = None,
    max_test_samples: opt.MaxTest = None,
) -> None:
    """Remove the least important attention heads and FFN neurons; writes runs/<task>/prune-v<N>/.

    With --vocab the word embedding is also cut to the tokens of the task's train and dev texts
    (after recovery); the folder's tokenizer spells other words with kept pieces, else [UNK].

    Settings of the parent checkpoint (data, model, max length) carry over. The new folder is
    written beside the parent unless --workdir is given. Runs as several processes under
    torchrun or accelerate launch (scoring and distillation are shared; the cost table and the
    speed-up are measured by process 0).
    """
    flags = config_flags(prune, locals())
    opt.check_one_pruning_goal(flags)

    from tinycompress.stages.prune import prune as run_prune

    print_checkpoint(_run_on_parent("prune", checkpoint, config, flags, run_prune))


@command(
    "tinycompress quantize --task sst2",
    "tinycompress quantize runs/sst2/finetune-v1",
    "tinycompress quantize --backend torch",
    "tinycompress quantize --mode static --per-channel --calibration-samples 256",
    "tinycompress quantize --tolerance 0.3          # fastest int8 within 0.3 dev points of fp32",
)
def quantize(
    checkpoint: Annotated[
        Path | None,
        typer.Argument(
            help="A prune (or finetune, for the unpruned comparison) checkpoint folder (default: the task's newest prune-v<N>)."
        ),
    ] = None,
    task: opt.Task = None,
    data_dir: opt.DataDir = None,
    workdir: opt.Workdir = None,
    config: opt.ConfigFile = None,
    seed: opt.Seed = None,
    threads: opt.Threads = None,
    backend: opt.Backend = None,
    mode: opt.Mode = None,
    per_channel: opt.PerChannel = None,
    embeddings: opt.Embeddings = None,
    calibration_samples: opt.CalibrationSamples = None,
    tolerance: opt.Tolerance = None,
    bench_runs: opt.BenchRuns = None,
    max_test_samples: opt.MaxTest = None,
) -> None:
    """Post-training int8 quantization; writes runs/<task>/quantize-v<N>/ with test metrics measured on the int8 model.

    Settings of the parent checkpoint (data, model, max length) carry over. The new folder is
    written beside the parent unless --workdir is given.
    """
    flags = config_flags(quantize, locals())

    from tinycompress.stages.quantize import quantize as run_quantize
    from tinycompress.stages.quantize import summary_line

    written = _run_on_parent("quantize", checkpoint, config, flags, run_quantize)
    print_checkpoint(written)
    typer.echo(summary_line(written))


@command(
    "tinycompress export --task sst2",
    "tinycompress export runs/sst2/prune-v1 --format all",
    "tinycompress export runs/sst2/quantize-v1 --output deploy/sst2-int8",
)
def export(
    checkpoint: Annotated[
        Path | None,
        typer.Argument(
            help="A quantize, prune or finetune checkpoint folder (default: the task's newest, in that order)."
        ),
    ] = None,
    format_: opt.Format = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write to this new folder instead of runs/<task>/export-v<N>/ (must not exist)."
        ),
    ] = None,
    task: opt.Task = None,
    data_dir: opt.DataDir = None,
    workdir: opt.Workdir = None,
    config: opt.ConfigFile = None,
    threads: opt.Threads = None,
    opset: opt.Opset = None,
) -> None:
    """Export to ONNX and/or TorchScript and check parity against PyTorch on real test sentences.

    Prints one line per file and batch: ✓/✗, max |Δ| of the logits and label agreement. A
    tolerance miss is a warning (the folder is still written); a shape mismatch is an error.
    """
    flags = config_flags(export, locals())

    from tinycompress.stages.export import export as run_export
    from tinycompress.stages.export import parity_lines, parity_warnings

    written = _run_on_parent("export", checkpoint, config, flags, run_export, output)
    typer.echo(f"wrote {written.path}")
    for line in parity_lines(written):
        typer.echo(line)
    for line in parity_warnings(written):
        typer.echo(f"warning: {line}", err=True)


@command(
    "tinycompress report --task sst2",
    "tinycompress report runs/sst2/quantize-v2 --bench --threads 4",
    "tinycompress report --task sst2 --sweep runs/sst2/sweeps/prune_sweep.csv --out results/",
    "tinycompress report --task sst2 --json",
)
def report(
    run_dir: Annotated[
        Path | None,
        typer.Argument(
            help="A checkpoint folder (the chain ending there), a task folder (runs/sst2) or a workspace "
            "(default: the newest chain of --task in --workdir)."
        ),
    ] = None,
    task: opt.Task = None,
    workdir: opt.Workdir = None,
    config: opt.ConfigFile = None,
    data_dir: opt.DataDir = None,
    threads: opt.Threads = None,
    bench: opt.ReportBench = None,
    bench_runs: opt.ReportRuns = None,
    baselines: opt.ReportBaselines = None,
    sweep: opt.Sweep = None,
    out: opt.Out = None,
    as_json: opt.Json = False,
) -> None:
    """Print the results table of one chain and write report.md / .json / .csv and plots.

    Rows: original → fine-tuned → pruned → quantized → exported, found through the lineage in
    the manifests, then the baselines (int8 without pruning). Test metrics are on the GLUE
    validation set (GLUE test labels are hidden).
    """
    # The task and data folder are not settings here: without --task, the newest chain is shown.
    flags = config_flags(report, locals(), skip=("task", "data_dir"))

    from tinycompress.report.render import print_report, report_json
    from tinycompress.stages.report import run_report

    built, written = run_report(
        run_dir,
        config_file=config,
        overrides=flags,
        task=task,
        data_dir=str(data_dir) if data_dir else None,
        sweep=sweep,
        out_dir=out,
    )
    if as_json:
        typer.echo(report_json(built, written))
    else:
        print_report(built)
    typer.echo(f"wrote {written}", err=True)


@command(
    'tinycompress predict runs/sst2/export-v1 "a gripping, funny film" "dull and far too long"',
    "tinycompress predict runs/sst2/quantize-v1 --file reviews.txt --json",
)
def predict(
    path: Annotated[Path, typer.Argument(help="An export folder or a finetune / prune / quantize checkpoint.")],
    texts: Annotated[
        list[str] | None, typer.Argument(help="Texts to classify (pair tasks: the two sentences separated by a tab).")
    ] = None,
    file: Annotated[Path | None, typer.Option("--file", help="A UTF-8 file with one text per line.")] = None,
    as_json: opt.Json = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Texts per forward pass.")] = 32,
    threads: opt.Threads = None,
) -> None:
    """Classify texts with any model folder; prints the label and its probability per text (regression: the score)."""
    from tinycompress.stages.predict import format_prediction, read_texts
    from tinycompress.stages.predict import predict as run_predict

    predictions = run_predict(path, read_texts(texts, file), batch_size=batch_size, threads=threads)
    if as_json:
        print_json(predictions, ensure_ascii=False)
    else:
        for prediction in predictions:
            typer.echo(format_prediction(prediction))


@command(
    "tinycompress evaluate default --task sst2",
    "tinycompress evaluate runs/sst2/prune-v1",
    "tinycompress evaluate runs/sst2/quantize-v1 --json",
)
def evaluate(
    target: Annotated[
        str, typer.Argument(help="A checkpoint or export folder, 'default', an HF id or a model folder.")
    ],
    task: opt.Task = None,
    data_dir: opt.DataDir = None,
    config: opt.ConfigFile = None,
    device: opt.Device = None,
    seed: opt.Seed = None,
    threads: opt.Threads = None,
    max_test_samples: opt.MaxTest = None,
    as_json: opt.Json = False,
) -> None:
    """Measure any model on the task's test set (GLUE validation); prints its metrics.

    A plain model (not a checkpoint) gets a freshly initialised, seeded classification head:
    that is the "original" row of the report.
    """
    flags = config_flags(evaluate, locals())

    from tinycompress.stages.evaluate import evaluate_target

    metrics = evaluate_target(target, config_file=config, overrides=flags)
    if as_json:
        print_json(metrics)
    else:
        print_metrics(metrics)


@command(
    "tinycompress env",
    "tinycompress env --data-dir ../shared/data/glue --json",
    "torchrun --nproc-per-node 2 -m tinycompress env    # what each launched process sees",
    launchable=True,
)
def env(data_dir: opt.DataDir = None, as_json: opt.Json = False) -> None:
    """Print versions, device, threads, CPU vector extensions, where the model and data are, and the
    processes a launcher started (world size, rank, backend, devices); every process prints its own."""
    from tinycompress.stages.env import environment_report

    report = environment_report(str(data_dir) if data_dir else None)
    if as_json:
        print_json(report)
    else:
        print_env(report)


def main() -> None:
    """Console entry point: usage errors (bad flag types, unknown options) are one line too."""
    run_console(app, sys.argv[1:])


if __name__ == "__main__":
    main()
