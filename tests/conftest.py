"""Shared fixtures: toy GLUE folders (SST-2, STS-B), tiny random BERT / DistilBERT model folders, real data."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property-based tests (hypothesis): a few hundred examples per reader in the default run;
# `pytest --hypothesis-profile fuzz` runs 10,000 each (the long fuzz run).
settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
POSITIVE = ["good", "great", "fine", "lovely", "superb", "happy", "bright", "warm"]
NEGATIVE = ["bad", "awful", "poor", "dull", "sad", "grim", "cold", "weak"]
NEUTRAL = ["the", "film", "movie", "plot", "actor", "story", "is", "was", "very", "quite", "a", "scene"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def assert_one_line_error(result, *needles) -> None:
    """A CliRunner result that failed with exactly one ``error:`` line on stderr, no traceback."""
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def rewrite_manifest(folder: Path, change) -> None:
    """Apply ``change(manifest)`` to a checkpoint's manifest and seal it again (its own checksum),
    as a deliberate rewrite would; a plain edit is refused on read (tests/test_manifest_integrity.py)."""
    import yaml

    from tinycompress.checkpoint.format import MANIFEST_NAME, SELF_CHECKSUM_KEY, manifest_digest

    path = folder / MANIFEST_NAME
    manifest = yaml.safe_load(path.read_text(encoding="utf-8"))
    change(manifest)
    manifest[SELF_CHECKSUM_KEY] = manifest_digest(manifest)
    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")


def toy_sentence(rng: random.Random, label: int) -> str:
    """A few neutral words and one or two sentiment words: linearly separable by word identity."""
    words = rng.sample(NEUTRAL, rng.randint(2, 6)) + rng.sample(POSITIVE if label else NEGATIVE, rng.randint(1, 2))
    rng.shuffle(words)
    return " ".join(words)


def write_toy_sst2(root: Path, *, n_train: int = 240, n_test: int = 80, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder = root / "sst2"
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", n_train), ("validation", n_test)):
        rows = ["sentence\tlabel"]
        for i in range(count):
            label = i % 2
            rows.append(f"{toy_sentence(rng, label)} \t{label}")
        (folder / f"{name}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def write_toy_stsb(root: Path, *, n_train: int = 160, n_test: int = 40, seed: int = 0) -> Path:
    """STS-B layout (sentence pairs, a 0-5 float score): pairs of the same sentiment score high."""
    rng = random.Random(seed)
    folder = root / "stsb"
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", n_train), ("validation", n_test)):
        rows = ["sentence1\tsentence2\tscore"]
        for _ in range(count):
            first, second = rng.randint(0, 1), rng.randint(0, 1)
            score = (4.5 if first == second else 0.5) + rng.uniform(-0.5, 0.5)
            rows.append(f"{toy_sentence(rng, first)}\t{toy_sentence(rng, second)}\t{score:.3f}")
        (folder / f"{name}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def toy_glue(tmp_path_factory) -> Path:
    """A GLUE folder (our layout) with a separable toy SST-2."""
    return write_toy_sst2(tmp_path_factory.mktemp("toy_glue"))


@pytest.fixture(scope="session")
def toy_stsb(tmp_path_factory) -> Path:
    """A GLUE folder (our layout) with a toy STS-B: regression on sentence pairs."""
    return write_toy_stsb(tmp_path_factory.mktemp("toy_stsb"))


def _toy_tokenizer(folder: Path):
    from transformers import BertTokenizer

    # transformers 5 builds WordPiece tokenizers from a vocab mapping (`vocab=`), not `vocab_file=`.
    words = SPECIALS + sorted(set(POSITIVE + NEGATIVE + NEUTRAL))
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True, model_max_length=64)


def make_tiny_model_dir(folder: Path, kind: str = "bert", seed: int = 0) -> Path:
    """A random tiny encoder + toy tokenizer saved as an HF model folder (usable as --model)."""
    import torch
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _toy_tokenizer(folder)
    torch.manual_seed(seed)
    if kind == "bert":
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
            type_vocab_size=2,
        )
        model = BertModel(config)
    elif kind == "distilbert":
        config = DistilBertConfig(
            vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64
        )
        model = DistilBertModel(config)
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=["bert", "distilbert"])
def tiny_model_dir(request, tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp(f"tiny_{request.param}"), request.param)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_bert"), "bert")


@pytest.fixture(scope="session")
def tiny_distilbert_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_distilbert"), "distilbert")


def tiny_finetune_overrides(model_dir: Path, data_dir: Path, workdir: Path, **extra) -> dict:
    """Config overrides for a fast, deterministic fine-tune of a tiny model on the toy data."""
    return {
        "task": "sst2",
        "model.name": str(model_dir),
        "model.max_length": 32,
        "data.data_dir": str(data_dir),
        "data.dev_fraction": 0.2,
        "workdir": str(workdir),
        "finetune.epochs": 10,
        "finetune.learning_rate": 2e-3,
        "finetune.batch_size": 16,
        "finetune.warmup_ratio": 0.0,
        "threads": 1,
        **extra,
    }


@pytest.fixture(scope="session")
def tiny_finetuned(tiny_bert_dir, toy_glue, tmp_path_factory):
    """A finetune-v1 checkpoint of the tiny BERT on the toy task (session-wide, read-only)."""
    from tinycompress.config import load_config
    from tinycompress.stages.finetune import finetune

    workdir = tmp_path_factory.mktemp("ws")
    return finetune(load_config(None, tiny_finetune_overrides(tiny_bert_dir, toy_glue, workdir)))


@pytest.fixture(scope="session")
def real_glue() -> Path:
    """The real GLUE TSVs ($TINYCOMPRESS_DATA_DIR, or ../shared/data/glue beside the checkout)."""
    chosen = os.environ.get("TINYCOMPRESS_DATA_DIR") or str(REPO.parent / "shared" / "data" / "glue")
    path = Path(chosen)
    if not (path / "sst2" / "train.tsv").is_file():
        pytest.skip(f"real GLUE data not found at {path}")
    return path
