import dataclasses
import math
import os

import numpy as np
import pytest
import torch

from tinycompress.checkpoint.hf import load_hf_model
from tinycompress.checkpoint.store import read_checkpoint
from tinycompress.config import load_config
from tinycompress.data.batching import encode
from tinycompress.data.glue import load_task_data
from tinycompress.data.tasks import get_task
from tinycompress.stages.finetune import finetune
from tinycompress.training.metrics import compute_metrics


def test_tiny_model_learns_the_toy_task(tiny_finetuned):
    metrics = tiny_finetuned.metrics
    assert metrics["test/accuracy"] >= 0.95
    assert metrics["dev/accuracy"] >= 0.95
    assert metrics["train_rows"] == 192 and metrics["dev_rows"] == 48 and metrics["test_rows"] == 80
    assert metrics["samples_per_second"] > 0


def test_checkpoint_files_and_manifest(tiny_finetuned):
    assert sorted(os.listdir(tiny_finetuned.path)) == sorted(
        [
            "README.md",
            "config.json",
            "model.safetensors",
            "tinycompress.yaml",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    card = (tiny_finetuned.path / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "pipeline_tag: text-classification" in card
    manifest = tiny_finetuned.manifest
    assert manifest["parent"] is None and manifest["config"]["finetune"]["epochs"] == 10
    assert len(manifest["details"]["history"]) == 10


def test_reload_gives_identical_logits(tiny_finetuned):
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = load_hf_model(read_checkpoint(tiny_finetuned.path))
    plain = AutoModelForSequenceClassification.from_pretrained(tiny_finetuned.path).eval()
    batch = tokenizer(["the film was good", "bad plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain(**batch).logits)


def test_same_seed_same_result(tiny_bert_dir, toy_glue, tmp_path):
    from conftest import tiny_finetune_overrides

    overrides = tiny_finetune_overrides(tiny_bert_dir, toy_glue, tmp_path, **{"finetune.epochs": 2})
    first = finetune(load_config(None, overrides))
    second = finetune(load_config(None, overrides))
    assert first.metrics["dev/accuracy"] == second.metrics["dev/accuracy"]
    assert first.manifest["files"]["model.safetensors"] == second.manifest["files"]["model.safetensors"]
    assert (first.name, second.name) == ("finetune-v1", "finetune-v2")


def test_distilbert_finetunes(tiny_distilbert_dir, toy_glue, tmp_path):
    from conftest import tiny_finetune_overrides

    checkpoint = finetune(load_config(None, tiny_finetune_overrides(tiny_distilbert_dir, toy_glue, tmp_path)))
    assert checkpoint.metrics["test/accuracy"] >= 0.9
    model, _ = load_hf_model(checkpoint)
    assert model.config.model_type == "distilbert"


def test_nan_dev_metric_still_keeps_a_best_epoch(tiny_bert_dir, toy_glue, tmp_path, monkeypatch):
    from conftest import tiny_finetune_overrides

    import tinycompress.training.loop as training

    monkeypatch.setattr(training, "evaluate", lambda *a, **k: {"accuracy": float("nan")})
    checkpoint = finetune(
        load_config(None, tiny_finetune_overrides(tiny_bert_dir, toy_glue, tmp_path, **{"finetune.epochs": 2}))
    )
    assert checkpoint.metrics["best_epoch"] == 1
    assert len(checkpoint.manifest["details"]["history"]) == 2


def test_stsb_regression_on_sentence_pairs(tiny_bert_dir, toy_stsb, tmp_path):
    from conftest import tiny_finetune_overrides

    overrides = tiny_finetune_overrides(tiny_bert_dir, toy_stsb, tmp_path, task="stsb", **{"finetune.epochs": 3})
    checkpoint = finetune(load_config(None, overrides))
    metrics = checkpoint.metrics
    for prefix in ("test/", "dev/", "original/test/"):
        assert {k for k in metrics if k.startswith(prefix) and k.count("/") == prefix.count("/")} == {
            f"{prefix}pearson",
            f"{prefix}spearman",
        }
        assert all(
            math.isfinite(metrics[f"{prefix}{m}"]) and -1.0 <= metrics[f"{prefix}{m}"] <= 1.0
            for m in ("pearson", "spearman")
        )
    model, tokenizer = load_hf_model(checkpoint)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    # Both sentences of a pair reach the model, as segments 0 and 1, and scores stay floats.
    data = load_task_data(get_task("stsb"), data_dir=str(toy_stsb), dev_fraction=0.2, seed=42)
    encoded = encode(tokenizer, data.test, 32)
    assert all(set(types) == {0, 1} for types in encoded.token_type_ids)
    assert all(isinstance(label, float) for label in encoded.labels) and len(encoded) == metrics["test_rows"] == 40


def test_compute_metrics_known_values():
    labels = [0, 1, 1, 0]
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [-1.0, 1.0], [0.5, 0.7]])  # predictions 0, 1, 1, 1
    classification = dataclasses.replace(get_task("sst2"), metrics=("accuracy", "f1", "matthews_correlation"))
    # TP 2, TN 1, FP 1, FN 0: precision 2/3, recall 1; MCC (2*1 - 1*0) / sqrt(3*2*2*1).
    assert compute_metrics(classification, logits, labels) == pytest.approx(
        {"accuracy": 0.75, "f1": 0.8, "matthews_correlation": 1 / math.sqrt(3)}, rel=1e-12
    )
    # Regression reads column 0: predictions rank 1, 3, 2, 4 against 1, 2, 3, 4: 1 - 6*2/(4*15).
    scores = compute_metrics(get_task("stsb"), np.array([[1.0], [3.0], [2.0], [4.0]]), [1.0, 2.0, 3.0, 4.0])
    assert scores == pytest.approx({"pearson": 0.8, "spearman": 0.8}, rel=1e-12)


def test_keep_best_keeps_the_first_epoch_and_then_only_better_ones():
    from tinycompress.training.loop import KeepBest

    model = torch.nn.Linear(1, 1)
    best = KeepBest("accuracy")
    for epoch, score in enumerate([float("nan"), 0.5, 0.4, 0.7, 0.7], start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        best.offer(model, epoch, {"accuracy": score})
    assert (best.epoch, best.dev) == (4, {"accuracy": 0.7})
    best.restore(model)
    assert model.weight.item() == 4.0
