"""The mean-pooling classification head: training, reload, pruning, export, predict."""

import json

import numpy as np
import pytest
import torch

from tinycompress.checkpoint.hf import load_hf_model, load_hf_model_folder
from tinycompress.config import load_config
from tinycompress.data.tasks import get_task
from tinycompress.models.heads import apply_head_, head_of, masked_mean
from tinycompress.models.pretrained import count_parameters, load_pretrained_classifier
from tinycompress.stages.finetune import finetune


@pytest.fixture(scope="module")
def mean_finetuned(tiny_bert_dir, toy_glue, tmp_path_factory):
    from conftest import tiny_finetune_overrides

    workdir = tmp_path_factory.mktemp("mean_ws")
    overrides = tiny_finetune_overrides(tiny_bert_dir, toy_glue, workdir, **{"model.head": "mean"})
    return finetune(load_config(None, overrides))


def test_masked_mean_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(masked_mean(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(masked_mean(hidden, None), hidden.mean(dim=1))


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_mean_head_drops_the_cls_layer_and_pools_real_tokens(kind, tiny_bert_dir, tiny_distilbert_dir, tmp_path):
    folder = tiny_bert_dir if kind == "bert" else tiny_distilbert_dir
    spec = get_task("sst2")
    cls_model, tokenizer, _ = load_pretrained_classifier(str(folder), spec, 0)
    mean_model, _, _ = load_pretrained_classifier(str(folder), spec, 0, head="mean", classifier_dropout=0.25)
    hidden = cls_model.config.hidden_size if kind == "bert" else cls_model.config.dim
    # The [CLS]-only dense layer (BERT's pooler, DistilBERT's pre_classifier) is gone: weight + bias.
    assert count_parameters(cls_model) - count_parameters(mean_model) == hidden * hidden + hidden
    assert not any("pooler" in k or "pre_classifier" in k for k in mean_model.state_dict())
    assert type(mean_model).__name__ == f"MeanPooling{type(cls_model).__name__}"
    assert head_of(mean_model) == "mean" and head_of(cls_model) == "cls"
    assert mean_model.dropout.p == 0.25
    mean_model.eval()
    # A row's logits do not depend on how much padding its batch adds.
    alone = tokenizer(["the film was good"], return_tensors="pt")
    padded = tokenizer(
        ["the film was good", "bad plot and a long dull film that was bad"], padding=True, return_tensors="pt"
    )
    assert padded["input_ids"].shape[1] > alone["input_ids"].shape[1]
    with torch.no_grad():
        expected = mean_model.classifier(masked_mean(mean_model.base_model(**alone)[0], alone["attention_mask"]))
        torch.testing.assert_close(mean_model(**alone).logits, expected)
        torch.testing.assert_close(mean_model(**padded).logits[:1], expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(mean_model(**alone, return_dict=False)[0], mean_model(**alone).logits)
        # The class made for the head is findable by name: the model pickles (deepcopy, torch.save).
        import pickle

        assert torch.equal(pickle.loads(pickle.dumps(mean_model))(**alone).logits, mean_model(**alone).logits)
    # Exported to ONNX, the pooling is in the graph: plain ONNX Runtime gives the same logits.
    import onnxruntime as ort

    from tinycompress.exporters.onnx import export_onnx

    path = export_onnx(mean_model, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == (
        ["input_ids", "attention_mask", "token_type_ids"] if kind == "bert" else ["input_ids", "attention_mask"]
    )
    feed = {name: padded[name].numpy() for name in names}
    with torch.no_grad():
        np.testing.assert_allclose(session.run(["logits"], feed)[0], mean_model(**padded).logits.numpy(), atol=1e-5)
    apply_head_(mean_model, "mean")  # idempotent
    with pytest.raises(ValueError, match="cannot be given its \\[CLS\\] head back"):
        apply_head_(mean_model, "cls")


def test_mean_head_learns_the_toy_task_and_reloads_identically(mean_finetuned):
    assert mean_finetuned.metrics["test/accuracy"] >= 0.95
    assert mean_finetuned.manifest["config"]["model"]["head"] == "mean"
    config = json.loads((mean_finetuned.path / "config.json").read_text())
    # The Hugging Face class by its own name; tinycompress_head says how the head is rebuilt.
    assert config["tinycompress_head"] == "mean" and config["architectures"] == ["BertForSequenceClassification"]
    model, tokenizer = load_hf_model(mean_finetuned)
    again, _ = load_hf_model_folder(mean_finetuned.path)
    batch = tokenizer(["the film was good", "bad plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        assert torch.equal(logits, again(**batch).logits)
    assert logits.argmax(-1).tolist() == [1, 0]


def test_mean_head_prunes_quantizes_exports_and_predicts(mean_finetuned, tmp_path):
    import onnxruntime as ort

    from tinycompress.checkpoint.store import read_checkpoint
    from tinycompress.stages.export import export
    from tinycompress.stages.predict import predict
    from tinycompress.stages.prune import prune
    from tinycompress.stages.quantize import quantize

    base = mean_finetuned.manifest["config"]
    overrides = {"prune.ratio": 0.5, "prune.recover_epochs": 1, "prune.importance_samples": 64}
    pruned = prune(load_config(None, overrides, base=base), mean_finetuned)
    assert pruned.metrics["test/accuracy"] >= 0.9
    model, tokenizer = load_hf_model(read_checkpoint(pruned.path))
    assert head_of(model) == "mean" and model.bert.pooler is None
    int8 = quantize(load_config(None, {}, base=pruned.manifest["config"]), pruned)
    assert int8.metrics["test/accuracy"] >= 0.9
    onnx = export(load_config(None, {"export.format": "onnx"}, base=pruned.manifest["config"]), pruned)
    assert onnx.metrics["parity_passed"] is True
    # Plain ONNX Runtime runs the mean-pooling graph: logits equal PyTorch's on a padded batch.
    batch = tokenizer(["the film was good", "a bad and dull plot"], padding=True, return_tensors="np")
    session = ort.InferenceSession(str(onnx.path / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()}
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
    np.testing.assert_allclose(session.run(["logits"], feed)[0], expected, atol=1e-4)
    for folder in (pruned.path, int8.path, onnx.path):
        assert [p["label"] for p in predict(folder, ["the film was good", "bad plot"])] == ["positive", "negative"]


def test_unknown_head_is_refused_in_one_line(tmp_path):
    from conftest import assert_one_line_error
    from typer.testing import CliRunner

    from tinycompress.cli.app import app

    result = CliRunner().invoke(app, ["finetune", "--task", "sst2", "--head", "max", "--workdir", str(tmp_path)])
    assert_one_line_error(result, "model.head", "'cls' or 'mean'")
    assert not (tmp_path / "sst2").exists()


def _sentence_transformers_folder(folder, **modes):
    pooling = folder / "1_Pooling"
    pooling.mkdir(parents=True)
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    settings = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False}
    (pooling / "config.json").write_text(json.dumps({**settings, **{f"pooling_mode_{k}": v for k, v in modes.items()}}))
    return folder


def test_auto_head_is_the_pooling_the_encoder_was_trained_with(tmp_path):
    from tinycompress.models.heads import pretrained_pooling, resolve_head
    from tinycompress.models.pretrained import default_model_path

    assert pretrained_pooling(_sentence_transformers_folder(tmp_path / "a", mean_tokens=True)) == "mean"
    assert pretrained_pooling(_sentence_transformers_folder(tmp_path / "b", cls_token=True)) == "cls"
    # Several modes at once (or another one) is not a head we build: auto falls back to cls.
    both = _sentence_transformers_folder(tmp_path / "c", cls_token=True, mean_tokens=True)
    assert pretrained_pooling(both) is None and resolve_head("auto", str(both)) == "cls"
    broken = _sentence_transformers_folder(tmp_path / "d", mean_tokens=True)
    (broken / "modules.json").write_text("[{")
    assert pretrained_pooling(broken) is None
    assert pretrained_pooling(tmp_path / "missing") is None and resolve_head("auto", "some/hub-id") == "cls"
    assert resolve_head("mean", str(tmp_path)) == "mean" and resolve_head("cls", str(both)) == "cls"
    if default_model_path() is not None:  # all-MiniLM-L6-v2 was trained with mean pooling
        assert pretrained_pooling(default_model_path()) == "mean"


def test_auto_head_fine_tune_records_what_it_built(tiny_bert_dir, toy_glue, tmp_path):
    import shutil

    from conftest import tiny_finetune_overrides

    model_dir = shutil.copytree(tiny_bert_dir, tmp_path / "st_model")
    _sentence_transformers_folder(model_dir, mean_tokens=True)
    overrides = tiny_finetune_overrides(
        model_dir, toy_glue, tmp_path / "ws", **{"model.head": "auto", "finetune.epochs": 1}
    )
    checkpoint = finetune(load_config(None, overrides))
    assert checkpoint.manifest["config"]["model"]["head"] == "auto"  # as asked: `run` reuses it
    assert checkpoint.manifest["details"]["head"] == "mean"
    assert head_of(load_hf_model(checkpoint)[0]) == "mean"
