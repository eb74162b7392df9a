import os

import torch

from tinycompress.checkpoint import load_hf_model, read_checkpoint
from tinycompress.config import load_config
from tinycompress.finetune import finetune


def test_tiny_model_learns_the_toy_task(tiny_finetuned):
    metrics = tiny_finetuned.metrics
    assert metrics["test/accuracy"] >= 0.95
    assert metrics["dev/accuracy"] >= 0.95
    assert metrics["train_rows"] == 192 and metrics["dev_rows"] == 48 and metrics["test_rows"] == 80
    assert metrics["samples_per_second"] > 0


def test_checkpoint_files_and_manifest(tiny_finetuned):
    assert sorted(os.listdir(tiny_finetuned.path)) == sorted(
        ["README.md", "config.json", "model.safetensors", "tinycompress.yaml", "tokenizer.json", "tokenizer_config.json"]
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
    import tinycompress.training as training
    from conftest import tiny_finetune_overrides

    monkeypatch.setattr(training, "evaluate", lambda *a, **k: {"accuracy": float("nan")})
    checkpoint = finetune(load_config(None, tiny_finetune_overrides(tiny_bert_dir, toy_glue, tmp_path, **{"finetune.epochs": 2})))
    assert checkpoint.metrics["best_epoch"] == 1
    assert len(checkpoint.manifest["details"]["history"]) == 2
