"""finetune --search: the Optuna study over fine-tuning recipes, its records and its resumption."""

import csv

import pytest
from conftest import tiny_finetune_overrides

from tinycompress.config import load_config
from tinycompress.data.batching import Encoded
from tinycompress.errors import TinycompressError, TrainingDiverged
from tinycompress.stages.finetune import search_and_finetune
from tinycompress.training import search as search_module
from tinycompress.training.search import Recipe, study_name


def _config(model_dir, data_dir, workdir, trials: int):
    overrides = {"search.trials": trials, "search.samples": 64}
    return load_config(None, tiny_finetune_overrides(model_dir, data_dir, workdir, **overrides))


def _journals(workdir):
    return sorted((workdir / "sst2" / "searches").glob("*.jsonl"))


def _scores(trials):
    return [t["dev/accuracy"] for t in trials]


def test_three_trials_are_recorded_and_the_best_is_trained(tiny_bert_dir, toy_glue, tmp_path, capsys):
    checkpoint = search_and_finetune(_config(tiny_bert_dir, toy_glue, tmp_path, trials=3))
    search = checkpoint.manifest["details"]["search"]
    trials = search["trials"]
    assert [t["trial"] for t in trials] == [0, 1, 2]
    assert all(t["state"] in ("complete", "pruned") and t["epochs_run"] >= 1 for t in trials)
    complete = [t for t in trials if t["state"] == "complete"]
    best = max(complete, key=lambda t: t["dev/accuracy"])
    assert search["best_dev/accuracy"] == pytest.approx(best["dev/accuracy"], abs=1e-6)
    # Ties go to the earliest trial, as Optuna keeps the first best value.
    assert search["best_trial"] == min(t["trial"] for t in complete if t["dev/accuracy"] == best["dev/accuracy"])
    recipe = search["recipe"]
    assert recipe == {k: best[k] for k in recipe}
    # The final fine-tune used the chosen recipe on all rows: its config says so.
    config = checkpoint.manifest["config"]
    assert config["model"]["head"] == recipe["head"]
    for key in ("learning_rate", "epochs", "warmup_ratio", "weight_decay", "batch_size", "classifier_dropout"):
        assert config["finetune"][key] == recipe[key]
    assert (
        checkpoint.metrics["train_rows"] == 192 and len(checkpoint.manifest["details"]["history"]) == recipe["epochs"]
    )
    # The study and the table travel with the checkpoint.
    files = sorted(p.name for p in checkpoint.path.iterdir())
    assert "search_journal.jsonl" in files and "search_trials.csv" in files
    with open(checkpoint.path / "search_trials.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["trial"]) for r in rows] == [0, 1, 2]
    assert [float(r["dev/accuracy"]) for r in rows] == pytest.approx(_scores(trials))
    err = capsys.readouterr().err
    assert "trial 0 " in err and "trial 2 " in err and "dev/accuracy" in err


def test_a_resumed_search_continues_the_numbering(tiny_bert_dir, toy_glue, tmp_path, capsys):
    first = search_and_finetune(_config(tiny_bert_dir, toy_glue, tmp_path, trials=2))
    capsys.readouterr()
    second = search_and_finetune(_config(tiny_bert_dir, toy_glue, tmp_path, trials=4))
    trials = second.manifest["details"]["search"]["trials"]
    assert [t["trial"] for t in trials] == [0, 1, 2, 3]
    assert trials[:2] == first.manifest["details"]["search"]["trials"]  # kept, not re-run
    assert "resuming" in capsys.readouterr().err
    # The new trials are new recipes, not the first ones proposed again.
    params = [tuple(t[k] for k in ("learning_rate", "epochs", "batch_size")) for t in trials]
    assert len(set(params)) == 4
    # Nothing left to run: the same search goes straight to the final fine-tune.
    third = search_and_finetune(_config(tiny_bert_dir, toy_glue, tmp_path, trials=4))
    assert third.manifest["details"]["search"]["trials"] == trials
    assert third.manifest["config"]["finetune"] == second.manifest["config"]["finetune"]


def test_an_interrupted_trial_is_run_again_first(tiny_bert_dir, toy_glue, tmp_path, monkeypatch):
    from tinycompress.training import loop

    real_train = loop.train
    calls = []

    def interrupted_second_trial(*args, **kwargs):
        calls.append(kwargs.get("description"))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(loop, "train", interrupted_second_trial)
    config = _config(tiny_bert_dir, toy_glue, tmp_path, trials=3)
    with pytest.raises(KeyboardInterrupt):
        search_and_finetune(config)
    assert not list((tmp_path / "sst2").glob("finetune-v*"))  # nothing half-written
    assert len(_journals(tmp_path)) == 1
    assert not list((tmp_path / "sst2" / "searches").glob("*.pid"))  # the study's lock is released
    monkeypatch.setattr(loop, "train", real_train)
    checkpoint = search_and_finetune(config)
    trials = checkpoint.manifest["details"]["search"]["trials"]
    assert (trials[0]["note"], trials[1]["state"], trials[1]["note"]) == ("", "failed", "interrupted")
    # Trial 2 reran trial 1's recipe; trial 3 is the third counted trial.
    keys = [f for f in Recipe.__dataclass_fields__]
    assert [trials[2][k] for k in keys] == [trials[1][k] for k in keys]
    assert len(trials) == 4 and trials[2]["state"] != "failed"


def test_a_trial_left_running_by_a_killed_search_is_recovered(tiny_bert_dir, toy_glue, tmp_path):
    import optuna

    first = search_and_finetune(_config(tiny_bert_dir, toy_glue, tmp_path, trials=1))
    (journal,) = _journals(tmp_path)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name=first.manifest["details"]["search"]["study"], storage=storage)
    orphan = study.ask()
    search_module.suggest_recipe(orphan)  # the dead process had chosen its recipe, then died
    checkpoint = search_and_finetune(_config(tiny_bert_dir, toy_glue, tmp_path, trials=2))
    trials = checkpoint.manifest["details"]["search"]["trials"]
    assert [(t["trial"], t["state"], t["note"]) for t in trials][1] == (1, "failed", "interrupted")
    assert trials[2]["learning_rate"] == trials[1]["learning_rate"]  # rerun first
    assert len(trials) == 3 and trials[2]["state"] in ("complete", "pruned")


def test_a_live_search_holds_its_study(tiny_bert_dir, toy_glue, tmp_path, monkeypatch):
    import os

    from tinycompress.training import loop

    config = _config(tiny_bert_dir, toy_glue, tmp_path, trials=1)
    real_train = loop.train
    seen = []

    def second_search_meanwhile(*args, **kwargs):
        if not kwargs.get("description", "").startswith("trial"):  # the final fine-tune, after the search
            return real_train(*args, **kwargs)
        (lock,) = (tmp_path / "sst2" / "searches").glob("*.pid")
        assert lock.read_text().split()[1] == str(os.getpid())
        with pytest.raises(TinycompressError, match="is in use by process"):
            search_and_finetune(config)
        seen.append(lock)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(loop, "train", second_search_meanwhile)
    search_and_finetune(config)
    assert seen and not seen[0].exists()


def test_a_diverging_trial_fails_and_the_search_goes_on(tiny_bert_dir, toy_glue, tmp_path, monkeypatch):
    from tinycompress.training import loop

    real_train = loop.train
    calls = []

    def first_diverges(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise TrainingDiverged("fine-tune: the training loss became nan", "lower the learning rate")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(loop, "train", first_diverges)
    checkpoint = search_and_finetune(_config(tiny_bert_dir, toy_glue, tmp_path, trials=2))
    trials = checkpoint.manifest["details"]["search"]["trials"]
    assert trials[0]["state"] == "failed" and "loss became nan" in trials[0]["note"]
    assert trials[0]["dev/accuracy"] is None and checkpoint.manifest["details"]["search"]["best_trial"] == 1


def test_no_finished_trial_is_one_clear_error(tiny_bert_dir, toy_glue, tmp_path, monkeypatch):
    from tinycompress.training import loop

    def diverges(*args, **kwargs):
        raise TrainingDiverged("fine-tune: the training loss became nan")

    monkeypatch.setattr(loop, "train", diverges)
    with pytest.raises(TinycompressError, match="none of the 2 trials finished"):
        search_and_finetune(_config(tiny_bert_dir, toy_glue, tmp_path, trials=2))
    assert not list((tmp_path / "sst2").glob("finetune-v*"))


def test_other_errors_stop_the_search(tiny_bert_dir, toy_glue, tmp_path, monkeypatch):
    from tinycompress.training import loop

    def broken(*args, **kwargs):
        raise TinycompressError("something the user must fix")

    monkeypatch.setattr(loop, "train", broken)
    with pytest.raises(TinycompressError, match="something the user must fix"):
        search_and_finetune(_config(tiny_bert_dir, toy_glue, tmp_path, trials=3))


def test_study_name_follows_what_scores_a_trial(tiny_bert_dir, toy_glue, tmp_path):
    base = tiny_finetune_overrides(tiny_bert_dir, toy_glue, tmp_path)
    rows = Encoded([[1, 5, 2], [1, 6, 2]], None, [0, 1])
    dev = Encoded([[1, 7, 2]], None, [1])

    def name(overrides=None, model="m", train=rows):
        config = load_config(None, {**base, **(overrides or {})})
        return study_name(config, model_source=model, train_data=train, dev_data=dev)

    assert name() == name({"search.trials": 99, "finetune.learning_rate": 1.0, "data.data_dir": "/elsewhere"})
    assert name() != name({"seed": 7})
    assert name() != name(model="other")
    assert name() != name(train=Encoded([[1, 5, 2], [1, 6, 2]], None, [1, 1]))  # other labels: other data
    assert name() != name({"finetune.grad_accum": 2})


def test_recipe_apply_validates_and_grad_accum_narrows_the_batch_sizes(tiny_bert_dir, toy_glue, tmp_path):
    config = load_config(None, tiny_finetune_overrides(tiny_bert_dir, toy_glue, tmp_path))
    recipe = Recipe(3e-4, 4, 0.1, 0.05, 64, 0.2, "mean")
    applied = recipe.apply(config)
    assert (applied.finetune.learning_rate, applied.finetune.batch_size, applied.model.head) == (3e-4, 64, "mean")
    assert applied.finetune.eval_batch_size == config.finetune.eval_batch_size
    with pytest.raises(TinycompressError):
        Recipe(3e-4, 0, 0.1, 0.05, 64, 0.2, "mean").apply(config)  # epochs 0 is not a config
    assert search_module.batch_sizes(1) == (16, 32, 64) and search_module.batch_sizes(32) == (32, 64)
    assert search_module.batch_sizes(3) == ()
    grad_accum_3 = load_config(
        None,
        tiny_finetune_overrides(
            tiny_bert_dir,
            toy_glue,
            tmp_path,
            **{"finetune.grad_accum": 3, "finetune.batch_size": 48, "search.trials": 1},
        ),
    )
    with pytest.raises(TinycompressError, match="splits none of the searched batch sizes"):
        search_and_finetune(grad_accum_3)


def test_cli_search(tiny_bert_dir, toy_glue, tmp_path):
    from typer.testing import CliRunner

    from tinycompress.cli.app import app

    args = ["finetune", "--search", "--trials", "2", "--search-samples", "32", "--max-length", "32"]
    for key, value in tiny_finetune_overrides(tiny_bert_dir, toy_glue, tmp_path).items():
        if key in ("task", "model.name", "data.data_dir", "workdir", "threads"):
            args += [{"model.name": "--model", "data.data_dir": "--data-dir"}.get(key, f"--{key}"), str(value)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "finetune-v1" in result.stdout
    assert "trial 1 " in result.stderr
    from conftest import assert_one_line_error

    assert_one_line_error(
        CliRunner().invoke(app, [*args, "--lr", "1e-4", "--head", "mean"]), "--lr, --head and --search"
    )
    plain = [a for a in args if a != "--search"]
    assert_one_line_error(CliRunner().invoke(app, plain), "--trials, --search-samples only apply to --search")
    assert sorted(p.name for p in (tmp_path / "sst2").glob("finetune-v*")) == ["finetune-v1"]
