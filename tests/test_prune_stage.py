"""The prune stage (tinycompress.stages.prune) and the `tinycompress prune` command, on tiny models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, rewrite_manifest, tiny_finetune_overrides
from typer.testing import CliRunner

from tinycompress.checkpoint.format import MANIFEST_NAME
from tinycompress.checkpoint.hf import load_hf_model
from tinycompress.checkpoint.store import read_checkpoint
from tinycompress.checkpoint.workspace import parent_base
from tinycompress.cli.app import app
from tinycompress.config import load_config
from tinycompress.data.batching import collate, encode
from tinycompress.data.glue import load_task_data
from tinycompress.data.tasks import get_task
from tinycompress.errors import TinycompressError
from tinycompress.inference.latency import latency_batches, measure_latency, measure_predictor
from tinycompress.inference.predictor import torch_predictor
from tinycompress.models.pretrained import count_parameters
from tinycompress.models.structure import current_head_ids, head_counts
from tinycompress.stages.prune import FLOPS_SEQ_LEN, prune, run_prune, write_prune
from tinycompress.stages.prune_job import check_feasible

runner = CliRunner()
# BertTokenizer in transformers 5 saves tokenizer.json + tokenizer_config.json (no vocab.txt).
EXPECTED_FILES = {
    "config.json",
    "model.safetensors",
    "README.md",
    MANIFEST_NAME,
    "tokenizer.json",
    "tokenizer_config.json",
}
FAST = {"prune.importance_samples": 64, "prune.recover_epochs": 0, "threads": 1}


@pytest.fixture
def parent(tiny_finetuned, tmp_path):
    """A private copy of the session's finetune-v1 (tests write prune folders beside it)."""
    target = tmp_path / "ws" / "sst2" / "finetune-v1"
    shutil.copytree(tiny_finetuned.path, target)
    return read_checkpoint(target)


def prune_config(parent, **overrides):
    return load_config(None, {**FAST, **overrides}, base=parent_base(parent, "prune"))


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def toy_batch(config, tokenizer) -> dict:
    data = load_task_data(get_task("sst2"), data_dir=config.data.data_dir, dev_fraction=0.2, seed=0)
    encoded = encode(tokenizer, data.test, config.model.max_length)
    batch = collate(encoded, list(range(16)), tokenizer.pad_token_id, regression=False)
    batch.pop("labels")
    return batch


def assert_reload_is_exact(config, result, checkpoint):
    reloaded, tokenizer = load_hf_model(checkpoint)
    batch = toy_batch(config, tokenizer)
    with torch.no_grad():
        expected = result.model(**batch).logits
        actual = reloaded(**batch).logits
    assert (expected - actual).abs().max().item() <= 1e-6
    return reloaded


# ------------------------------------------------------------------------------ the stage


def test_prune_writes_v1_that_reloads_exactly(parent):
    config = prune_config(parent, **{"prune.ratio": 0.5, "prune.ffn_ratio": 0.2})
    result = run_prune(config, parent)
    checkpoint = write_prune(config, result)

    assert checkpoint.path == parent.path.parent / "prune-v1" and checkpoint.stage == "prune"
    assert {p.name for p in checkpoint.path.iterdir()} == EXPECTED_FILES
    assert checkpoint.manifest["parent"]["path"] == "finetune-v1"
    reloaded = assert_reload_is_exact(config, result, checkpoint)

    details, metrics = checkpoint.details, checkpoint.metrics
    assert head_counts(reloaded) == [len(ids) for ids in details["heads_kept"]] == [2, 2]
    assert current_head_ids(reloaded) == details["heads_kept"]
    for kept, removed, before in zip(details["heads_kept"], details["heads_removed"], details["heads_before"]):
        assert sorted(kept + removed) == before
    assert sum(len(n) for n in details["neurons_removed"]) == round(0.2 * 74)
    scores = details["importance"]["heads"]  # per layer: original head id -> score
    assert [sorted(layer) for layer in scores] == details["heads_before"]
    # One step: the removed heads are the lowest-scored ones (no layer hits its minimum here).
    removed = [scores[layer][h] for layer, heads in enumerate(details["heads_removed"]) for h in heads]
    kept = [scores[layer][h] for layer, heads in enumerate(details["heads_kept"]) for h in heads]
    assert max(removed) <= min(kept)
    assert metrics["parameters"] == count_parameters(reloaded) < metrics["parent/parameters"]
    assert (
        metrics["flops"] < metrics["parent/flops"]
        and metrics["flops_seq_len"] == FLOPS_SEQ_LEN == details["flops_seq_len"]
    )
    for key in ("test/accuracy", "pruned_no_recovery/test/accuracy", "parent/test/accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    # Without recovery the final metrics are those right after pruning.
    assert metrics["test/accuracy"] == metrics["pruned_no_recovery/test/accuracy"]
    assert details["recovery"] is None


def test_second_prune_writes_v2_and_a_pruned_parent_is_pruned_further(parent):
    first = prune(prune_config(parent, **{"prune.ratio": 0.25}))  # no path: newest finetune of the task
    assert first.name == "prune-v1" and first.manifest["parent"]["stage"] == "finetune"

    second = prune(load_config(None, {**FAST, "prune.ratio": 0.5}, base=parent_base(first, "prune")), first.path)
    assert second.name == "prune-v2" and second.manifest["parent"]["path"] == "prune-v1"
    # The ratio applies to the 6 heads prune-v1 kept; ids stay those of the original model.
    assert second.metrics["parent/heads"] == 6 and second.metrics["heads"] == 3
    for kept_now, kept_before in zip(second.details["heads_kept"], first.details["heads_kept"]):
        assert set(kept_now) <= set(kept_before)
    assert head_counts(load_hf_model(second)[0]) == [len(ids) for ids in second.details["heads_kept"]]


def test_recovery_records_both_metric_sets(parent):
    config = prune_config(parent, **{"prune.ratio": 0.5, "prune.recover_epochs": 1, "prune.criterion": "fisher"})
    checkpoint = prune(config, parent.path)
    metrics, recovery = checkpoint.metrics, checkpoint.details["recovery"]
    assert {"test/accuracy", "pruned_no_recovery/test/accuracy", "parent/test/accuracy", "dev/accuracy"} <= set(metrics)
    assert recovery["epochs"] == 1 and len(recovery["history"]) == 1 and recovery["teacher"] == "finetune-v1"


def test_recovery_learning_rate_is_the_fine_tunes_unless_set(monkeypatch):
    import tinycompress.training.loop as loop
    from tinycompress.stages.prune import recover

    rates = []
    monkeypatch.setattr(loop, "train", lambda *args, **kwargs: rates.append(args[4].learning_rate))
    for overrides in ({}, {"prune.recover_learning_rate": 5e-5}):
        config = load_config(None, {"finetune.learning_rate": 1e-4, **overrides})
        recover(None, None, None, None, None, config, pad_id=0, device="cpu")
        assert config.finetune.learning_rate == 1e-4  # the recipe itself is left alone
    assert rates == [1e-4, 5e-5]


@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_data_free_criteria(parent, criterion):
    checkpoint = prune(
        prune_config(parent, **{"prune.ratio": 0.5, "prune.steps": 2, "prune.criterion": criterion}), parent
    )
    assert checkpoint.metrics["heads"] == 4 and len(checkpoint.details["step_log"]) == 2
    assert checkpoint.metrics["importance_rows"] == 0  # these criteria read no data


def test_refusals_write_nothing(parent):
    workspace = parent.path.parent.parent
    before = listing(workspace)
    with pytest.raises(TinycompressError, match="cannot prune"):  # 7 of 8 heads: a layer would be emptied
        prune(prune_config(parent, **{"prune.ratio": 0.9, "prune.min_heads_per_layer": 1}), parent)
    with pytest.raises(TinycompressError, match="trained for task sst2, not cola"):
        prune(prune_config(parent, task="cola"), parent)
    with pytest.raises(TinycompressError, match="not found"):
        prune(prune_config(parent), workspace / "sst2" / "finetune-v9")
    assert listing(workspace) == before


def test_unsupported_model_family_is_its_own_error(parent):
    model, _ = load_hf_model(parent)
    with pytest.raises(TinycompressError, match="cannot prune: .*lower --ratio"):
        check_feasible(model, prune_config(parent, **{"prune.ratio": 0.9, "prune.min_heads_per_layer": 1}))
    model.config.model_type = "gpt2"  # what an unsupported family looks like to the adapter table
    with pytest.raises(TinycompressError, match="'gpt2' is not supported; supported: bert, distilbert") as caught:
        check_feasible(model, prune_config(parent, **{"prune.ratio": 0.5}))
    assert "--ratio" not in str(caught.value)


def test_refuses_a_parent_of_another_stage(parent, tmp_path):
    quantized = tmp_path / "other" / "sst2" / "quantize-v1"
    shutil.copytree(parent.path, quantized)
    rewrite_manifest(quantized, lambda manifest: manifest.update(stage="quantize"))
    with pytest.raises(
        TinycompressError, match=r"quantize checkpoint \(already quantized\); prune needs a finetune or prune"
    ):
        prune(prune_config(parent), quantized)
    assert sorted(p.name for p in (tmp_path / "other" / "sst2").iterdir()) == ["quantize-v1"]


def test_distilbert_round_trip(tiny_distilbert_dir, toy_glue, tmp_path):
    from tinycompress.stages.finetune import finetune

    overrides = tiny_finetune_overrides(tiny_distilbert_dir, toy_glue, tmp_path / "ws", **{"finetune.epochs": 2})
    parent = finetune(load_config(None, overrides))
    config = prune_config(parent, **{"prune.ratio": 0.5, "prune.ffn_ratio": 0.3})
    result = run_prune(config, parent)
    checkpoint = write_prune(config, result)
    reloaded = assert_reload_is_exact(config, result, checkpoint)
    assert reloaded.config.model_type == "distilbert"
    assert head_counts(reloaded) == [len(ids) for ids in checkpoint.details["heads_kept"]]
    assert checkpoint.metrics["parameters"] < checkpoint.metrics["parent/parameters"]


# ------------------------------------------------------------------------------ the command


def test_cli_prunes_the_newest_finetune_of_the_workspace(parent):
    workspace = parent.path.parent.parent
    args = [
        "prune",
        "--workdir",
        str(workspace),
        "--task",
        "sst2",
        "--ratio",
        "0.25",
        "--ffn-ratio",
        "0.1",
        "--criterion",
        "magnitude",
        "--steps",
        "2",
        "--recover-epochs",
        "0",
        "--importance-samples",
        "32",
        "--threads",
        "1",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout and "prune-v1" in result.stdout
    written = read_checkpoint(workspace / "sst2" / "prune-v1")
    assert written.metrics["heads"] == 6 and written.config.prune.steps == 2
    # Carried over from the parent, not the defaults.
    assert written.config.model.max_length == 32 and written.config.data.data_dir == parent.config.data.data_dir


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--ratio", "1.5"], ["prune.ratio"]),
        (["--criterion", "entropy"], ["prune.criterion"]),
        (["--task", "cola"], ["trained for task sst2, not cola"]),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(parent, extra, needles):
    workspace = parent.path.parent.parent
    before = listing(workspace)
    assert_one_line_error(runner.invoke(app, ["prune", str(parent.path), "--recover-epochs", "0", *extra]), *needles)
    assert listing(workspace) == before


def test_cli_missing_and_corrupt_checkpoint(parent, tmp_path):
    assert_one_line_error(runner.invoke(app, ["prune", str(tmp_path / "nothing")]), "not found")
    assert_one_line_error(
        runner.invoke(app, ["prune", "--workdir", str(tmp_path / "empty"), "--task", "sst2"]), "no finetune checkpoint"
    )
    corrupt = tmp_path / "corrupt" / "sst2" / "finetune-v1"
    shutil.copytree(parent.path, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    assert_one_line_error(runner.invoke(app, ["prune", str(corrupt)]), "model.safetensors is corrupt")
    assert sorted(p.name for p in corrupt.parent.iterdir()) == ["finetune-v1"]


def test_cli_help_has_examples():
    result = runner.invoke(app, ["prune", "--help"])
    assert result.exit_code == 0 and "Examples:" in result.stdout and "--ffn-ratio" in result.stdout


# ------------------------------------------------------------------------------ latency helpers (inference/latency.py)


def test_latency_batches_and_measure_latency(tiny_finetuned):
    model, tokenizer = load_hf_model(tiny_finetuned)
    texts = ["good", "the film was very dull and the plot grim", "a warm story"]
    batches = latency_batches(tokenizer, texts, 32)
    assert batches[1]["input_ids"].tolist() == tokenizer(["a warm story"], return_tensors="pt")["input_ids"].tolist()
    assert batches[32]["input_ids"].shape[0] == 32 and batches[32]["attention_mask"][1].all()
    timings = measure_predictor(torch_predictor(model, tokenizer), texts, max_length=32, runs=3, warmup=1)
    assert set(timings) == {"batch_1", "batch_32"}
    for timing in timings.values():
        assert (
            set(timing) == {"median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "p90_ms", "runs"} and timing["runs"] == 3
        )
        assert 0 < timing["median_ms"] <= timing["p90_ms"]
    with pytest.raises(ValueError, match="runs"):
        measure_latency(lambda: None, runs=0)
