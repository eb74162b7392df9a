"""The real default model (all-MiniLM-L6-v2, offline) on a few hundred real SST-2 rows."""

import pytest

from tinycompress.config import load_config
from tinycompress.stages.finetune import finetune

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def minilm_finetuned(real_glue, tmp_path_factory):
    overrides = {
        "task": "sst2",
        "data.data_dir": str(real_glue),
        "data.max_train_samples": 300,
        "data.max_test_samples": 200,
        "finetune.epochs": 3,
        "finetune.batch_size": 16,
        "finetune.learning_rate": 1e-4,
        "workdir": str(tmp_path_factory.mktemp("ws")),
    }
    return finetune(load_config(None, overrides))


def test_default_model_is_minilm_and_learns_something(minilm_finetuned):
    metrics = minilm_finetuned.metrics
    assert metrics["parameters"] == 22_713_986  # 22.7 M encoder + a 2-way head
    assert metrics["train_rows"] == 300 and metrics["test_rows"] == 200
    # 300 rows, three short epochs: well above chance (0.5) on real SST-2 sentences.
    assert metrics["test/accuracy"] >= 0.6
    assert minilm_finetuned.manifest["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_real_checkpoint_loads_with_plain_transformers(minilm_finetuned):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(minilm_finetuned.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_finetuned.path)
    batch = tokenizer(
        ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)
    assert model.config.id2label == {0: "negative", 1: "positive"}
