"""Options shared by the commands, each declared once and tied to the config key it overrides.

An option's help text and the default it states come from the config schema
(:mod:`tinycompress.config`), so each default is written in one place. Every config option is
``None`` unless given, so that a YAML file or a parent checkpoint's config wins over the
schema default; :func:`config_flags` turns a command's given flags into dotted overrides.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import typer
from pydantic.fields import FieldInfo

from tinycompress.config import Config


@dataclass(frozen=True)
class ConfigKey:
    """Annotation marker: the dotted config key (``"prune.ratio"``) an option overrides."""

    key: str


def schema_field(key: str) -> FieldInfo:
    """The pydantic field of a dotted config key."""
    *sections, leaf = key.split(".")
    model: Any = Config
    for section in sections:
        model = model.model_fields[section].annotation
    return model.model_fields[leaf]


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}".replace("e-0", "e-")  # 5e-05 -> 5e-5
    return str(value)


def schema_help(key: str, help: str | None = None, default_text: str | None = None, show_default: bool = True) -> str:
    """The field's description (or ``help``) and its default, which a config file may change.

    A field whose default is None says in its description what unset means.
    """
    field = schema_field(key)
    text = help or field.description or ""
    shown = default_text or (None if field.default is None or not show_default else _default_text(field.default))
    return f"{text} (default: from the config, {shown} if unset)." if shown else f"{text}."


def _flag_type(annotation: Any) -> Any:
    """The command-line type of a schema annotation: Literal choices are plain strings (the
    schema validates them, so a typo is one error line), ``int | None`` is ``int``."""
    members = [arg for arg in get_args(annotation) if arg is not type(None)] if get_origin(annotation) else []
    if get_origin(annotation) is not Literal and members:
        annotation = members[0]  # X | None -> X
    return str if get_origin(annotation) is Literal else annotation


def config_option(key: str, *names: str, type_: Any = None, **help_args: Any) -> Any:
    """An ``Annotated`` alias for an option that overrides config ``key`` when given; ``help_args``
    go to :func:`schema_help`."""
    flag_type = type_ or _flag_type(schema_field(key).annotation)
    return Annotated[flag_type | None, typer.Option(*names, help=schema_help(key, **help_args)), ConfigKey(key)]


def config_flags(command: Callable[..., Any], values: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Dotted config overrides from a command's parameter ``values`` (its ``locals()``).

    Only parameters annotated with a :class:`ConfigKey` count; None (not given) is kept, and
    :func:`~tinycompress.config.load_config` skips it. Paths become strings.
    """
    overrides = {}
    for name, parameter in inspect.signature(command, eval_str=True).parameters.items():
        keys = [meta.key for meta in getattr(parameter.annotation, "__metadata__", ()) if isinstance(meta, ConfigKey)]
        if keys and name not in skip:
            value = values[name]
            overrides[keys[0]] = str(value) if isinstance(value, Path) else value
    return overrides


# Shared options: same spelling, same meaning and help in every command that takes them.
# No default shown for --task: a parent checkpoint's task wins, and `report` takes the newest.
Task = config_option("task", "--task", "-t", show_default=False)
DataDir = config_option("data.data_dir", "--data-dir", type_=Path)
Workdir = config_option("workdir", "--workdir", "-w", type_=Path)
Device = config_option("device", "--device")
Seed = config_option("seed", "--seed")
Threads = config_option("threads", "--threads")
MaxTrain = config_option("data.max_train_samples", "--max-train-samples")
MaxTest = config_option("data.max_test_samples", "--max-test-samples")

Model = config_option("model.name", "--model", "-m")
MaxLength = config_option("model.max_length", "--max-length")
Head = config_option("model.head", "--head")
Epochs = config_option("finetune.epochs", "--epochs")
LearningRate = config_option("finetune.learning_rate", "--lr", "--learning-rate")
BatchSize = config_option("finetune.batch_size", "--batch-size")
Precision = config_option("finetune.precision", "--precision")
GradAccum = config_option("finetune.grad_accum", "--grad-accum")

Ratio = config_option("prune.ratio", "--ratio")
FfnRatio = config_option("prune.ffn_ratio", "--ffn-ratio")
Criterion = config_option("prune.criterion", "--criterion")
RecoverEpochs = config_option("prune.recover_epochs", "--recover-epochs")
RecoverLearningRate = config_option("prune.recover_learning_rate", "--recover-lr")
Speedup = config_option("prune.speedup", "--speedup")
TargetLatency = config_option("prune.target_latency_ms", "--target-latency-ms")
TargetSize = config_option("prune.target_size_mb", "--target-size-mb")
TargetBatch = config_option("prune.target_batch_size", "--target-batch-size", type_=int)
MaskTuning = config_option("prune.mask_tuning", "--mask-tuning/--no-mask-tuning")
LayerDistill = config_option("prune.distill_layer_weight", "--distill-layer-weight")
Backend = config_option("quantize.backend", "--backend")
Format = config_option("export.format", "--format", "-f")
Baselines = config_option("report.baselines", "--baselines/--no-baselines")

# Options of one command each.
Steps = config_option("prune.steps", "--steps")
ImportanceSamples = config_option("prune.importance_samples", "--importance-samples")
Vocab = config_option("prune.vocab", "--vocab/--no-vocab")
VocabMinFrequency = config_option("prune.vocab_min_frequency", "--vocab-min-frequency")
VocabTopK = config_option("prune.vocab_top_k", "--vocab-top-k")
Mode = config_option("quantize.mode", "--mode")
PerChannel = config_option("quantize.per_channel", "--per-channel/--per-tensor")
Embeddings = config_option("quantize.quantize_embeddings", "--embeddings/--no-embeddings")
CalibrationSamples = config_option("quantize.calibration_samples", "--calibration-samples")
Tolerance = config_option("quantize.tolerance", "--tolerance")
Trials = config_option("search.trials", "--trials")
SearchSamples = config_option("search.samples", "--search-samples")
BenchRuns = config_option("report.bench_runs", "--bench-runs")
Opset = config_option("export.opset", "--opset")
# `run` measures latency unless the config says otherwise (see stages.pipeline.run_pipeline).
RunBench = config_option(
    "report.bench", "--bench/--no-bench", help="Measure every row's latency for the final table", default_text="on"
)
ReportBench = config_option("report.bench", "--bench/--no-bench")
ReportRuns = config_option("report.bench_runs", "--runs")
ReportBaselines = config_option(
    "report.baselines",
    "--baselines/--no-baselines",
    help="Show the int8 checkpoints made straight from the chain's fine-tuned model (int8 without pruning)",
)

# Options that are not config keys.
ConfigFile = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (see configs/); flags override it.")
]
Json = Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")]
Search = Annotated[
    bool,
    typer.Option(
        "--search",
        help=(
            "First search the recipe (learning rate, epochs, warm-up, weight decay, batch size, classifier "
            "dropout, head) with Optuna on the dev split, then fine-tune with the best on all rows."
        ),
    ),
]
Sweep = Annotated[
    Path | None,
    typer.Option(
        "--sweep",
        help="A prune_sweep.csv from benchmarks/prune_sweep.py (default: the newest under runs/<task>/sweeps/).",
    ),
]
Out = Annotated[
    Path | None, typer.Option("--out", "-o", help="Report folder, replaced on each run (default: runs/<task>/report).")
]


def check_one_pruning_goal(flags: dict[str, Any]) -> None:
    """Refuse ratios and a target given together on one command line (which one would win is not
    obvious; the config rule is: ratios, else the latency or size target, else --speedup); a
    target given alone wins over ratios from a config file or the parent's config (they are
    unset in ``flags``)."""
    from tinycompress.config import UNSET
    from tinycompress.errors import TinycompressError

    ratios = [
        f for f, key in (("--ratio", "prune.ratio"), ("--ffn-ratio", "prune.ffn_ratio")) if flags.get(key) is not None
    ]
    targets = [
        f
        for f, key in (
            ("--speedup", "prune.speedup"),
            ("--target-latency-ms", "prune.target_latency_ms"),
            ("--target-size-mb", "prune.target_size_mb"),
        )
        if flags.get(key) is not None
    ]
    if ratios and targets:
        raise TinycompressError(
            f"{' and '.join(ratios)} and {' and '.join(targets)} were both given",
            "prune either by ratios or to a target",
        )
    if targets:
        flags["prune.ratio"] = flags["prune.ffn_ratio"] = UNSET


# Flags the recipe search chooses for itself, and the search's own.
_SEARCHED = {
    "finetune.learning_rate": "--lr",
    "finetune.epochs": "--epochs",
    "finetune.batch_size": "--batch-size",
    "model.head": "--head",
}
_SEARCH_ONLY = {"search.trials": "--trials", "search.samples": "--search-samples"}


def check_search_flags(flags: dict[str, Any], search: bool) -> None:
    """Refuse a flag the search would override (``--lr`` with ``--search``) or one that means
    nothing without it (``--trials`` alone), rather than ignore it."""
    from tinycompress.errors import TinycompressError

    if search:
        given = [flag for key, flag in _SEARCHED.items() if flags.get(key) is not None]
        if given:
            raise TinycompressError(
                f"{', '.join(given)} and --search were both given: the search chooses {', '.join(given)}",
                "drop them to search, or fine-tune without --search",
            )
    else:
        given = [flag for key, flag in _SEARCH_ONLY.items() if flags.get(key) is not None]
        if given:
            raise TinycompressError(f"{', '.join(given)} only apply to --search", "add --search, or drop them")
