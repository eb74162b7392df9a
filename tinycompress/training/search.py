"""Recipe search for fine-tuning: an Optuna study over the training hyper-parameters and the head.

Each trial fine-tunes a fresh copy of the pretrained model with one :class:`Recipe` on a seeded
subset of the training rows and is scored by its best dev metric (the dev split carved from
train; the test set is never looked at). Optuna's TPE sampler proposes recipes, and its median
pruner stops a trial whose dev metric after an epoch is below the median of earlier trials at
that epoch, so poor recipes cost one or two epochs rather than all of them.

The study is kept in Optuna's journal file storage (JSON lines, never a pickle) under
``runs/<task>/searches/``, named by a digest of everything a trial's score depends on, so the
same command after Ctrl-C (or a kill) resumes it: finished trials are kept, numbering goes on,
and a trial cut short is run again first.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tinycompress.checkpoint.format import search_journal_path
from tinycompress.config import Config, config_from_dict
from tinycompress.console import log_to_stderr
from tinycompress.data.batching import Encoded
from tinycompress.data.tasks import TaskSpec
from tinycompress.errors import TinycompressError, TrainingDiverged

# Bump when the space below changes: a study of another space is another study.
SEARCH_SPACE_VERSION = 1

# The space, as the field ranges where small encoders' published recipes sit: BERT's paper
# (2e-5..5e-5, 2-4 epochs), Google's BERT miniatures (up to 3e-4, 4 epochs), MiniLMv2
# (3e-5, 5 epochs, batch 256). Learning rate on a log scale.
LEARNING_RATE_RANGE = (1e-5, 3e-4)
EPOCHS_RANGE = (2, 5)
WARMUP_RANGE = (0.0, 0.2)
WEIGHT_DECAY_RANGE = (0.0, 0.1)
BATCH_SIZES = (16, 32, 64)
CLASSIFIER_DROPOUT_RANGE = (0.0, 0.3)
HEADS = ("cls", "mean")

# Trial states as the table shows them.
_COMPLETE, _PRUNED, _FAIL, _RUNNING = "complete", "pruned", "failed", "running"

# A trial stopped by Ctrl-C is marked with this user attribute, and its rerun with RETRY_OF.
INTERRUPTED = "interrupted"
RETRY_OF = "retry_of"


@dataclass(frozen=True)
class Recipe:
    """The settings a search trial chooses: ``finetune.*`` fields and ``model.head``."""

    learning_rate: float
    epochs: int
    warmup_ratio: float
    weight_decay: float
    batch_size: int
    classifier_dropout: float
    head: str

    def apply(self, config: Config) -> Config:
        """``config`` with this recipe in its finetune and model sections (validated as any config)."""
        data = config.model_dump()
        data["finetune"].update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "head"})
        data["model"]["head"] = self.head
        return config_from_dict(data, "search recipe")


def batch_sizes(grad_accum: int) -> tuple[int, ...]:
    """The batch sizes of the space that split into ``grad_accum`` equal micro-batches."""
    return tuple(size for size in BATCH_SIZES if size % grad_accum == 0)


def suggest_recipe(trial, sizes: tuple[int, ...] = BATCH_SIZES) -> Recipe:
    return Recipe(
        learning_rate=trial.suggest_float("learning_rate", *LEARNING_RATE_RANGE, log=True),
        epochs=trial.suggest_int("epochs", *EPOCHS_RANGE),
        warmup_ratio=trial.suggest_float("warmup_ratio", *WARMUP_RANGE),
        weight_decay=trial.suggest_float("weight_decay", *WEIGHT_DECAY_RANGE),
        batch_size=trial.suggest_categorical("batch_size", sizes),
        classifier_dropout=trial.suggest_float("classifier_dropout", *CLASSIFIER_DROPOUT_RANGE),
        head=trial.suggest_categorical("head", HEADS),
    )


@dataclass
class SearchOutcome:
    """What a finished search chose, and every trial of its study."""

    study_name: str
    journal: Path
    metric: str  # the dev metric trials are ranked by
    best: Recipe
    best_trial: int
    best_dev: float
    trials: list[dict[str, Any]] = field(default_factory=list)  # one row per trial (:func:`trial_rows`)

    def summary(self) -> dict[str, Any]:
        """For the fine-tune manifest's details."""
        return {
            "study": self.study_name,
            "metric": f"dev/{self.metric}",
            "best_trial": self.best_trial,
            f"best_dev/{self.metric}": self.best_dev,
            "recipe": asdict(self.best),
            "trials": self.trials,
            "space_version": SEARCH_SPACE_VERSION,
        }


def study_name(config: Config, *, model_source: str, train_data: Encoded, dev_data: Encoded) -> str:
    """``finetune-<digest>``: the same name for every run whose trials would score the same -- the
    space, the seed, the model, the very rows trials train and are scored on, and the settings a
    trial keeps from the config rather than choosing."""
    rows = json.dumps([train_data.input_ids, train_data.labels, dev_data.input_ids, dev_data.labels])
    key = {
        "space": SEARCH_SPACE_VERSION,
        "task": config.task,
        "seed": config.seed,
        "model": model_source,
        "rows": hashlib.sha256(rows.encode()).hexdigest(),
        "finetune": config.finetune.model_dump(
            include={"max_grad_norm", "group_by_length", "precision", "grad_accum", "eval_batch_size"}
        ),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return f"finetune-{digest}"


def _state(trial) -> str:
    from optuna.trial import TrialState

    return {
        TrialState.COMPLETE: _COMPLETE,
        TrialState.PRUNED: _PRUNED,
        TrialState.FAIL: _FAIL,
        TrialState.RUNNING: _RUNNING,
    }.get(trial.state, trial.state.name.lower())


def trial_rows(study, metric: str) -> list[dict[str, Any]]:
    """One row per trial, by number: state, the dev metric (best epoch; for a pruned trial, its
    last epoch's), epochs run, seconds and the recipe."""
    rows = []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        steps = trial.intermediate_values
        value = trial.value if trial.value is not None else (steps[max(steps)] if steps else None)
        rows.append(
            {
                "trial": trial.number,
                "state": _state(trial),
                f"dev/{metric}": None if value is None or math.isnan(value) else round(value, 6),
                "epochs_run": len(steps),
                "seconds": trial.user_attrs.get("seconds"),
                **{k: trial.params.get(k) for k in (f.name for f in fields(Recipe))},
                "note": trial.user_attrs.get("failure") or ("interrupted" if trial.user_attrs.get(INTERRUPTED) else ""),
            }
        )
    return rows


def write_trials_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)


def _recover_interrupted(study, storage) -> int:
    """Mark trials left running by a killed process as failed, and queue every trial cut short
    (Ctrl-C or kill) that has not been rerun yet, so it runs first. Returns how many were queued."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    rerun = {t.user_attrs.get(RETRY_OF) for t in trials}
    queued = 0
    for trial in trials:
        if trial.state == TrialState.RUNNING:
            # One search per study at a time: a trial still "running" belongs to a dead process.
            storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        elif not trial.user_attrs.get(INTERRUPTED):
            continue
        if trial.number not in rerun and len(trial.params) == len(fields(Recipe)):
            study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})
            queued += 1
    return queued


def _counted(trial) -> bool:
    """Whether a trial counts towards ``search.trials``: finished, and not cut short (an
    interrupted trial is run again; a queued rerun has not run yet)."""
    return _state(trial) in (_COMPLETE, _PRUNED, _FAIL) and not trial.user_attrs.get(INTERRUPTED)


def run_search(
    config: Config,
    spec: TaskSpec,
    train_data: Encoded,
    dev_data: Encoded,
    *,
    build_model: Callable[[Recipe], Any],
    model_source: str,
    pad_id: int,
    device,
) -> SearchOutcome:
    """Run (or resume) the study of ``config`` until ``config.search.trials`` trials have finished.

    ``build_model(recipe)`` returns a fresh pretrained classifier (``model_source``) with the
    recipe's head and dropout. Each trial trains on ``config.search.samples`` rows of
    ``train_data`` (the same seeded rows for every trial) and is scored on all of ``dev_data``.
    One process at a time works on a study (a lock file beside its journal).
    """
    import random

    import optuna

    from tinycompress.checkpoint.temporaries import held_by_this_process

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial instead of its warnings
    sizes = batch_sizes(config.finetune.grad_accum)
    if not sizes:
        raise TinycompressError(
            f"--grad-accum {config.finetune.grad_accum} splits none of the searched batch sizes {BATCH_SIZES}",
            "use --grad-accum 1, 2, 4, 8 or 16 for a search",
        )
    rows = min(len(train_data), config.search.samples or len(train_data))
    subset = train_data.subset(sorted(random.Random(config.seed).sample(range(len(train_data)), rows)))
    name = study_name(config, model_source=model_source, train_data=subset, dev_data=dev_data)
    journal = search_journal_path(config.workdir, spec.name, name)
    journal.parent.mkdir(parents=True, exist_ok=True)
    with held_by_this_process(journal.with_suffix(".pid"), f"the search study {journal}"):
        return _run_study(config, spec, subset, dev_data, sizes, name, journal, build_model, pad_id, device)


def _run_study(config, spec, subset, dev_data, sizes, name, journal, build_model, pad_id, device) -> SearchOutcome:
    import optuna
    import torch

    from tinycompress.training.loop import train

    metric = spec.primary_metric
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    previous = study_trials(storage, name)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        # Seeded by the trials already run, so a resumed search does not propose its first recipes again.
        sampler=optuna.samplers.TPESampler(seed=(config.seed + len(previous)) % 2**32),
        # Once 4 trials have completed, a trial whose dev metric after an epoch (from the first on)
        # is below their median at that epoch stops there.
        pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1),
    )
    queued = _recover_interrupted(study, storage)
    done = sum(_counted(t) for t in study.get_trials(deepcopy=False))
    remaining = max(0, config.search.trials - done)
    if previous:
        log_to_stderr(
            f"search: resuming {journal} ({done} trial(s) done, {remaining} to run"
            + (f", {queued} cut short to run again" if queued else "")
            + ")"
        )
    else:
        log_to_stderr(
            f"search: {remaining} trial(s) on {len(subset)} training rows, scored by dev/{metric} on "
            f"{len(dev_data)} dev rows; study in {journal} (Ctrl-C keeps finished trials; the same command resumes)"
        )

    def objective(trial) -> float:
        recipe = suggest_recipe(trial, sizes)
        settings = recipe.apply(config).finetune
        start = time.perf_counter()

        def on_epoch(epoch: int, dev: dict[str, float]) -> None:
            trial.report(dev[metric], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            result = train(
                build_model(recipe),
                subset,
                dev_data,
                spec,
                settings,
                pad_id=pad_id,
                device=device,
                seed=config.seed,
                on_epoch=on_epoch,
                description=f"trial {trial.number}",
            )
        except KeyboardInterrupt:
            trial.set_user_attr(INTERRUPTED, True)
            raise
        except (TrainingDiverged, torch.OutOfMemoryError) as exc:  # a failed trial; the search goes on
            trial.set_user_attr("failure", exc.problem if isinstance(exc, TrainingDiverged) else "out of memory")
            return float("nan")
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - start, 1))
        return result.best_dev[metric]

    def log_trial(study, trial) -> None:
        row = next(r for r in trial_rows(study, metric) if r["trial"] == trial.number)
        score = row[f"dev/{metric}"]
        recipe = ", ".join(f"{k}={_short(row[k])}" for k in (f.name for f in fields(Recipe)))
        log_to_stderr(
            f"trial {trial.number} {row['state']}: dev/{metric} "
            f"{'-' if score is None else f'{score:.4f}'} after {row['epochs_run']} epoch(s), "
            f"{row['seconds']} s ({recipe})"
        )

    if remaining:
        study.optimize(objective, n_trials=remaining, callbacks=[log_trial], gc_after_trial=True)
    table = trial_rows(study, metric)
    log_to_stderr(format_trials(table, metric))
    try:
        best = study.best_trial
    except ValueError:
        raise TinycompressError(
            f"search: none of the {len(table)} trials finished; their notes are in {journal}",
            "check the training labels, or run more trials with --trials",
        ) from None
    return SearchOutcome(
        study_name=name,
        journal=journal,
        metric=metric,
        best=Recipe(**best.params),
        best_trial=best.number,
        best_dev=best.value,
        trials=table,
    )


def study_trials(storage, name: str) -> list:
    """The trials of study ``name`` in ``storage`` (none if it does not exist yet)."""
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return []


def format_trials(rows: list[dict[str, Any]], metric: str) -> str:
    """The trials as a plain-text table, best dev metric first (failed and unscored trials last)."""
    columns = ["trial", "state", f"dev/{metric}", "epochs_run", "seconds", *(f.name for f in fields(Recipe))]
    ranked = sorted(
        rows,
        key=lambda r: (r["state"] != _COMPLETE, -(r[f"dev/{metric}"] if r[f"dev/{metric}"] is not None else -math.inf)),
    )
    score = f"dev/{metric}"
    cells = [columns] + [
        [
            "-" if r[c] is None else f"{r[c]:.4f}" if c == score else f"{r[c]:,.0f}" if c == "seconds" else _short(r[c])
            for c in columns
        ]
        for r in ranked
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in cells)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
