"""The command line: parses flags into a Config and delegates to one stage function.

No training, pruning or file logic lives here. Heavy libraries are imported inside the
commands so that ``tinycompress --help`` stays instant.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from .errors import TinycompressError

DEBUG_ENV = "TINYCOMPRESS_DEBUG"

app = typer.Typer(
    name="tinycompress",
    help="Fine-tune, structurally prune, quantize and export small Transformer classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options shared by every command: same spelling, same meaning everywhere.
TaskOpt = Annotated[Optional[str], typer.Option("--task", "-t", help="GLUE task: sst2, cola, mrpc, rte, stsb, qnli, qqp, mnli.")]
DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help="Folder of GLUE TSVs (else $TINYCOMPRESS_DATA_DIR, else the hub).")]
WorkdirOpt = Annotated[Optional[Path], typer.Option("--workdir", "-w", help="Workspace holding runs/<task>/<stage>-v<N> folders (default: runs).")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see configs/); flags override it.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda | mps (auto = cuda > mps > cpu).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed (default: 42).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch / ONNX Runtime (default: all cores).")]
MaxTrainOpt = Annotated[Optional[int], typer.Option("--max-train-samples", help="Use only this many training rows (quick runs).")]
MaxTestOpt = Annotated[Optional[int], typer.Option("--max-test-samples", help="Evaluate on only this many test rows.")]


def _fail(message: str, code: int = 1) -> None:
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


def build_config(config_file: Optional[Path], overrides: dict[str, Any], base: dict[str, Any] | None = None):
    from .config import load_config

    return load_config(config_file, overrides, base=base)


def _print_checkpoint(checkpoint) -> None:
    metrics = " ".join(f"{k}={v:.4f}" for k, v in checkpoint.metrics.items() if k.startswith("test/"))
    typer.echo(f"wrote {checkpoint.path}  {metrics}")


def _examples(*lines: str) -> str:
    return "Examples:\n\n" + "\n\n".join(f"  $ {line}" for line in lines)


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
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="'default' (all-MiniLM-L6-v2, offline), an HF id or a local folder.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs")] = None,
    learning_rate: Annotated[Optional[float], typer.Option("--lr", "--learning-rate")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length")] = None,
    max_train_samples: MaxTrainOpt = None,
    max_test_samples: MaxTestOpt = None,
) -> None:
    """Fine-tune a pretrained encoder on a GLUE task; writes runs/<task>/finetune-v<N>/."""

    def work():
        from .finetune import finetune as run_finetune

        overrides = common_overrides(task, data_dir, workdir, device, seed, threads) | {
            "model.name": model,
            "model.max_length": max_length,
            "finetune.epochs": epochs,
            "finetune.learning_rate": learning_rate,
            "finetune.batch_size": batch_size,
            "data.max_train_samples": max_train_samples,
            "data.max_test_samples": max_test_samples,
        }
        _print_checkpoint(run_finetune(build_config(config, overrides)))

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
    as_json: Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")] = False,
) -> None:
    """Measure any model on the task's test set (GLUE validation); prints its metrics.

    A plain model (not a checkpoint) gets a freshly initialised, seeded classification head:
    that is the "original" row of the report.
    """

    def work():
        from .evaluate import evaluate_target

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
    as_json: Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")] = False,
) -> None:
    """Print versions, device, threads, CPU vector extensions, and where the model and data are."""

    def work():
        from .envinfo import environment_report

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


@app.command(epilog=_examples(
    "tinycompress prune --task sst2 --ratio 0.5",
    "tinycompress prune runs/sst2/finetune-v1 --ratio 0.3 --ffn-ratio 0.2 --criterion fisher --steps 3",
    "tinycompress prune runs/sst2/prune-v1 --ratio 0.2 --recover-epochs 2",
    "tinycompress prune --task sst2 --ratio 0.5 --recover-epochs 0 --importance-samples 256",
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
    ratio: Annotated[Optional[float], typer.Option("--ratio", help="Fraction of all attention heads removed, in [0, 1) (default: 0.5).")] = None,
    ffn_ratio: Annotated[Optional[float], typer.Option("--ffn-ratio", help="Fraction of all FFN neurons removed, in [0, 1) (default: 0).")] = None,
    # A plain string, not a Choice: the config schema validates it, so a typo is one error line.
    criterion: Annotated[Optional[str], typer.Option("--criterion", help="taylor | fisher | magnitude | random (default: taylor).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Prune in this many steps, re-scoring between them (default: 1).")] = None,
    recover_epochs: Annotated[Optional[int], typer.Option("--recover-epochs", help="Epochs of distillation from the parent after pruning; 0 = none (default: 1).")] = None,
    importance_samples: Annotated[Optional[int], typer.Option("--importance-samples", help="Training rows used to score importance (default: 1024).")] = None,
    max_train_samples: MaxTrainOpt = None,
    max_test_samples: MaxTestOpt = None,
) -> None:
    """Remove the least important attention heads and FFN neurons; writes runs/<task>/prune-v<N>/.

    Settings of the parent checkpoint (data, model, max length) carry over. The new folder is
    written beside the parent unless --workdir is given.
    """

    def work():
        from .prune import find_parent, parent_base
        from .prune import prune as run_prune

        overrides = common_overrides(task, data_dir, workdir, device, seed, threads) | {
            "prune.ratio": ratio,
            "prune.ffn_ratio": ffn_ratio,
            "prune.criterion": criterion,
            "prune.steps": steps,
            "prune.recover_epochs": recover_epochs,
            "prune.importance_samples": importance_samples,
            "data.max_train_samples": max_train_samples,
            "data.max_test_samples": max_test_samples,
        }
        parent = find_parent(checkpoint, config, overrides)
        _print_checkpoint(run_prune(build_config(config, overrides, base=parent_base(parent)), parent))

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
