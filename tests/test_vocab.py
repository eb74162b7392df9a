"""Vocabulary pruning (tinycompress.pruning.vocab) and `tinycompress prune --vocab`, on tiny models."""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import SPECIALS
from typer.testing import CliRunner

from tinycompress.checkpoint.format import MANIFEST_NAME
from tinycompress.checkpoint.hf import load_hf_model, save_hf_model
from tinycompress.checkpoint.store import Checkpoint, read_checkpoint
from tinycompress.checkpoint.workspace import parent_base
from tinycompress.cli.app import app
from tinycompress.config import load_config
from tinycompress.pruning.vocab import (
    collect_token_counts,
    config_token_ids,
    embedding_bytes,
    id_map,
    oov_rate,
    prune_embeddings_,
    rewrite_tokenizer,
    rewrite_tokenizer_files,
    rewrite_tokenizer_json,
    select_vocab,
    special_ids,
    tokenization_report,
)
from tinycompress.stages.prune import run_prune, write_prune

runner = CliRunner()
EXPECTED_FILES = {
    "config.json",
    "model.safetensors",
    "README.md",
    MANIFEST_NAME,
    "tokenizer.json",
    "tokenizer_config.json",
}
FAST = {"prune.importance_samples": 32, "prune.recover_epochs": 0, "prune.criterion": "magnitude", "threads": 1}
KEPT_TEXTS = ["the film was good", "a bad movie", "the plot is very dull"]
KEPT_PAIRS = [("the film was good", "a bad movie"), ("great story", "the plot is dull")]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy_tokenizer(words):
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True, model_max_length=64)


def classifier(model_dir: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def logits(model, tokenizer, texts) -> torch.Tensor:
    columns = [list(c) for c in zip(*[(t,) if isinstance(t, str) else t for t in texts])]
    batch = tokenizer(*columns, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def reload(folder: Path):
    """Through checkpoint.load_hf_model, as every later stage loads a pruned folder."""
    return load_hf_model(Checkpoint(folder, {"stage": "prune"}))


def kept_for(tokenizer, model, texts, **kwargs) -> list[int]:
    counts = collect_token_counts(tokenizer, texts, 32)
    return select_vocab(counts, tokenizer, always_keep=config_token_ids(model).values(), **kwargs)


# ------------------------------------------------------------------------------ counting & selection


def test_counts_cover_both_texts_of_a_pair_and_respect_truncation(tiny_bert_dir):
    _, tokenizer = classifier(tiny_bert_dir)
    ids = tokenizer.convert_tokens_to_ids
    counts = collect_token_counts(tokenizer, [("good film", "bad plot"), ("good", "great")], 32)
    assert counts[ids("good")] == 2 and counts[ids("plot")] == 1 and counts[ids("great")] == 1
    assert counts[ids("[SEP]")] == 4 and counts[ids("[CLS]")] == 2
    # 5 tokens: [CLS] good [SEP] bad [SEP]; the model never sees film or plot.
    truncated = collect_token_counts(tokenizer, [("good film", "bad plot")], 5)
    assert ids("film") not in truncated and ids("plot") not in truncated and truncated[ids("bad")] == 1
    assert collect_token_counts(tokenizer, [], 32) == Counter()
    with pytest.raises(ValueError, match="all be single sentences or all be pairs"):
        collect_token_counts(tokenizer, ["good", ("good", "bad")], 32)


def test_select_vocab_frequency_top_k_and_specials(tiny_bert_dir):
    _, tokenizer = classifier(tiny_bert_dir)
    specials = special_ids(tokenizer)
    assert specials == set(range(len(SPECIALS)))  # pad, unk, cls, sep, mask
    counts = Counter({10: 5, 11: 5, 12: 3, 13: 1, 2: 9})  # 2 is [CLS]: special, not ranked
    assert select_vocab(counts, tokenizer) == sorted(specials | {10, 11, 12, 13})
    assert select_vocab(counts, tokenizer, min_frequency=3) == sorted(specials | {10, 11, 12})
    # top-k counts ordinary tokens only; a tie (10 and 11, 5 each) goes to the lower id.
    assert select_vocab(counts, tokenizer, top_k=1) == sorted(specials | {10})
    assert select_vocab(counts, tokenizer, min_frequency=4, top_k=5) == sorted(specials | {10, 11})
    assert 20 in select_vocab(counts, tokenizer, always_keep=[20])
    for bad in ({"min_frequency": 0}, {"top_k": 0}, {"min_frequency": 1.5}):
        with pytest.raises(ValueError, match="min_frequency|top_k"):
            select_vocab(counts, tokenizer, **bad)


def _remap(ids, mapping, unk_id):
    """The ids a rewritten tokenizer should produce: old ids renumbered, dropped ones [UNK]."""
    return [mapping.get(int(i), unk_id) for i in ids]


def test_oov_rate_and_id_map():
    assert oov_rate([[2, 10, 11, 3], [2, 12, 3]], kept_ids=[2, 3, 10], ignore_ids=[2, 3]) == pytest.approx(2 / 3)
    assert oov_rate([[2, 3]], kept_ids=[2, 3], ignore_ids=[2, 3]) == 0.0
    mapping = id_map([0, 1, 5, 9])
    assert mapping == {0: 0, 1: 1, 5: 2, 9: 3}
    assert _remap([9, 7, 5], mapping, unk_id=1) == [3, 1, 2]
    for bad in ([3, 1], [1, 1], []):
        with pytest.raises(ValueError, match="kept_ids"):
            id_map(bad)


# ------------------------------------------------------------------------------ the tokenizer


def test_rewritten_tokenizer_round_trips_and_remaps_specials(tiny_bert_dir, tmp_path):
    model, old = classifier(tiny_bert_dir)
    kept = kept_for(old, model, KEPT_TEXTS + [" ".join(pair) for pair in KEPT_PAIRS])
    assert len(kept) < len(old)
    mapping = id_map(kept)
    new = rewrite_tokenizer(old, kept)
    new.save_pretrained(tmp_path)
    reloaded = reload_tokenizer(tmp_path)
    for tokenizer in (new, reloaded):
        assert len(tokenizer) == len(kept)
        unk = tokenizer.unk_token_id
        for text in KEPT_TEXTS:
            old_ids = old(text)["input_ids"]
            assert tokenizer(text)["input_ids"] == _remap(old_ids, mapping, unk)
            assert (
                tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True)
                == old.decode(old_ids, skip_special_tokens=True)
                == text
            )
        for first, second in KEPT_PAIRS:
            old_pair, new_pair = old(first, second), tokenizer(first, second)
            assert new_pair["input_ids"] == _remap(old_pair["input_ids"], mapping, unk)
            assert new_pair["token_type_ids"] == old_pair["token_type_ids"]
        # Every special token is present, at the rank of its old id.
        for token in SPECIALS:
            assert tokenizer.convert_tokens_to_ids(token) == mapping[old.convert_tokens_to_ids(token)]
        assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id) == (
            mapping[0],
            mapping[2],
            mapping[3],
        )
        # A dropped token is [UNK] (a whole word here: toy words are single pieces).
        dropped = next(w for w in ("superb", "lovely", "grim", "awful") if old.convert_tokens_to_ids(w) not in mapping)
        assert tokenizer(f"the {dropped} film")["input_ids"] == [
            tokenizer.cls_token_id,
            mapping[old.convert_tokens_to_ids("the")],
            unk,
            mapping[old.convert_tokens_to_ids("film")],
            tokenizer.sep_token_id,
        ]
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert sorted(saved["model"]["vocab"].values()) == list(range(len(kept)))
    assert {t["content"]: t["id"] for t in saved["added_tokens"]} == {
        t: mapping[old.convert_tokens_to_ids(t)] for t in SPECIALS
    }
    assert saved["post_processor"]["special_tokens"]["[CLS]"]["ids"] == [new.cls_token_id]
    assert saved["post_processor"]["special_tokens"]["[SEP]"]["ids"] == [new.sep_token_id]


def reload_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_wordpiece_collapses_a_word_with_a_missing_piece_to_unk(tmp_path):
    old = toy_tokenizer(
        ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "the", "play", "##s", "##ing", "playing", "actor"]
    )
    ids = old.convert_tokens_to_ids
    assert old.tokenize("the actors plays playing") == ["the", "actor", "##s", "play", "##s", "playing"]
    # Keep everything but ##s and playing: "actors"/"plays" lose a piece, "playing" has another spelling.
    kept = sorted(set(range(len(old))) - {ids("##s"), ids("playing")})
    new = rewrite_tokenizer(old, kept)
    assert new.tokenize("the actors plays playing") == ["the", "[UNK]", "[UNK]", "play", "##ing"]
    report = tokenization_report(old, new, ["the actors plays playing", "the actor"], 32, kept)
    assert report["tokens"] == 8 and report["oov_rate"] == pytest.approx(3 / 8)
    assert report["words_affected"] == 3 and report["words_to_unk"] == 2 and report["words_resegmented"] == 1
    assert report["kept_pieces_lost"] == 2  # actor and play went down with their ##s
    assert report["rows_with_oov"] == 0.5 and report["unk_rate_before"] == 0.0
    assert report["unk_rate_after"] == pytest.approx(2 / 7)


def test_vocab_txt_and_added_tokens_decoder_rewritten_consistently(tiny_bert_dir, tmp_path):
    from transformers import BertTokenizer

    _, old = classifier(tiny_bert_dir)
    old.save_pretrained(tmp_path)
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    (tmp_path / "vocab.txt").write_text("".join(f"{t}\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(i): {"content": t, "special": True} for i, t in enumerate(SPECIALS)}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    words = ["good", "film", "the", "dull"]
    kept = sorted(special_ids(old) | set(old.convert_tokens_to_ids(words)))
    rewrite_tokenizer_files(tmp_path, kept)

    new_vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    lines = (tmp_path / "vocab.txt").read_text().splitlines()
    assert (
        lines
        == [t for t, _ in sorted(new_vocab.items(), key=lambda kv: kv[1])]
        == [old.convert_ids_to_tokens(i) for i in kept]
    )
    decoder = json.loads((tmp_path / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {v["content"]: int(k) for k, v in decoder.items()} == {t: lines.index(t) for t in SPECIALS}
    from_json = reload_tokenizer(tmp_path)
    from_txt = BertTokenizer(vocab=str(tmp_path / "vocab.txt"), do_lower_case=True)
    for text in ("the good film", "the dull superb film"):
        assert from_txt(text)["input_ids"] == from_json(text)["input_ids"]


def test_rewrite_refusals(tiny_bert_dir, tmp_path):
    _, old = classifier(tiny_bert_dir)
    data = json.loads(old.backend_tokenizer.to_str())
    with pytest.raises(ValueError, match="WordPiece"):
        rewrite_tokenizer_json({**data, "model": {"type": "BPE", "vocab": {}, "merges": []}}, [0, 1])
    with pytest.raises(ValueError, match=r"drop added/special tokens \['\[MASK\]'\]"):
        rewrite_tokenizer_json(data, [0, 1, 2, 3, 5])
    with pytest.raises(ValueError, match="does not have"):
        rewrite_tokenizer_json(data, [0, 1, 2, 3, 4, 999])
    with pytest.raises(ValueError, match="strictly increasing"):
        rewrite_tokenizer(old, [0, 2, 1, 3, 4])
    with pytest.raises(ValueError, match="neither"):
        rewrite_tokenizer_files(tmp_path, [0, 1])


# ------------------------------------------------------------------------------ the model


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_pruned_model_gives_the_same_logits_after_save_and_reload(kind, tiny_bert_dir, tiny_distilbert_dir, tmp_path):
    model, old = classifier(tiny_bert_dir if kind == "bert" else tiny_distilbert_dir)
    expected = logits(model, old, KEPT_TEXTS)
    expected_pairs = logits(model, old, KEPT_PAIRS)
    kept = kept_for(old, model, KEPT_TEXTS + [" ".join(pair) for pair in KEPT_PAIRS])
    bytes_before = embedding_bytes(model)
    prune_embeddings_(model, kept)
    new = rewrite_tokenizer(old, kept)
    assert (logits(model, new, KEPT_TEXTS) - expected).abs().max().item() <= 1e-6

    save_hf_model(tmp_path, model, new, 64)
    reloaded, tokenizer = reload(tmp_path)
    assert reloaded.config.model_type == kind and reloaded.config.vocab_size == len(kept) == len(tokenizer)
    assert tuple(reloaded.get_input_embeddings().weight.shape) == (len(kept), 32)
    assert embedding_bytes(reloaded) == len(kept) * 32 * 4 < bytes_before
    assert (logits(reloaded, tokenizer, KEPT_TEXTS) - expected).abs().max().item() <= 1e-6
    assert (logits(reloaded, tokenizer, KEPT_PAIRS) - expected_pairs).abs().max().item() <= 1e-6


def test_pad_id_and_padding_idx_are_remapped(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    # [PAD] at id 3, after three ordinary words that get dropped: its new id is 0.
    words = ["alpha", "beta", "gamma", "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "film", "bad"]
    old = toy_tokenizer(words)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=20,
        max_position_embeddings=32,
        pad_token_id=3,
    )
    model = BertForSequenceClassification(config).eval()
    texts = ["good film", "bad", "good bad film film"]
    expected = logits(model, old, texts)  # padded batch: the pad id matters for the mask only, but must stay valid
    kept = kept_for(old, model, texts)
    assert kept[:2] == [3, 4]
    prune_embeddings_(model, kept)
    new = rewrite_tokenizer(old, kept)
    assert model.config.pad_token_id == 0 == new.pad_token_id == model.get_input_embeddings().padding_idx
    save_hf_model(tmp_path, model, new, 64)
    reloaded, tokenizer = reload(tmp_path)
    assert reloaded.config.pad_token_id == 0 and reloaded.get_input_embeddings().padding_idx == 0
    assert (logits(reloaded, tokenizer, texts) - expected).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match="pad_token_id"):
        prune_embeddings_(reloaded, [1, 2])
    with pytest.raises(ValueError, match="kept_ids must lie in"):
        prune_embeddings_(reloaded, [0, 1, 99])


# ------------------------------------------------------------------------------ the stage and the command


@pytest.fixture
def parent(tiny_finetuned, tmp_path):
    target = tmp_path / "ws" / "sst2" / "finetune-v1"
    shutil.copytree(tiny_finetuned.path, target)
    return read_checkpoint(target)


def test_cli_vocab_only_step(parent):
    workspace = parent.path.parent.parent
    args = [
        "prune",
        str(parent.path),
        "--vocab",
        "--ratio",
        "0",
        "--vocab-top-k",
        "10",
        "--criterion",
        "magnitude",
        "--importance-samples",
        "32",
        "--threads",
        "1",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    written = read_checkpoint(workspace / "sst2" / "prune-v1")
    assert {p.name for p in written.path.iterdir()} == EXPECTED_FILES
    metrics, vocab = written.metrics, written.details["vocab"]
    assert written.config.prune.vocab and written.config.prune.vocab_top_k == 10
    assert metrics["vocab_size"] == vocab["kept"] == 10 + len(SPECIALS)
    assert metrics["parent/vocab_size"] == vocab["before"] == len(SPECIALS) + 28
    assert metrics["embedding_mb"] < metrics["parent/embedding_mb"]
    assert vocab["embedding_bytes_after"] == 15 * 32 * 4 and vocab["embedding_bytes_before"] == 33 * 32 * 4
    assert 0 < metrics["test_oov_rate"] == vocab["test"]["oov_rate"] < 1
    for key in ("test/accuracy", "pre_vocab/test/accuracy", "parent/test/accuracy"):
        assert 0 <= metrics[key] <= 1
    # Nothing structural was removed: no recovery, so before the cut the model is the parent.
    assert written.details["recovery"] is None and metrics["heads"] == metrics["parent/heads"]
    assert metrics["pre_vocab/test/accuracy"] == metrics["parent/test/accuracy"]
    assert metrics["parameters"] == metrics["parent/parameters"] - 18 * 32

    model, tokenizer = load_hf_model(written)
    parent_model, parent_tokenizer = load_hf_model(parent)
    assert model.config.vocab_size == len(tokenizer) == 15 and model.get_input_embeddings().num_embeddings == 15
    kept_words = sorted(set(tokenizer.get_vocab()) - set(SPECIALS))
    rng = random.Random(1)
    texts = [" ".join(rng.sample(kept_words, rng.randint(1, 6))) for _ in range(12)]
    assert (logits(model, tokenizer, texts) - logits(parent_model, parent_tokenizer, texts)).abs().max().item() <= 1e-6
    dropped = sorted(set(parent_tokenizer.get_vocab()) - set(tokenizer.get_vocab()))
    assert len(dropped) == 18 and tokenizer(dropped[0])["input_ids"][1] == tokenizer.unk_token_id

    # A vocabulary-pruned folder is an ordinary parent: its heads can be pruned next.
    result = runner.invoke(
        app,
        [
            "prune",
            str(written.path),
            "--ratio",
            "0.25",
            "--recover-epochs",
            "0",
            "--criterion",
            "magnitude",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    second = read_checkpoint(workspace / "sst2" / "prune-v2")
    assert second.metrics["heads"] == 6 and second.metrics["parameters"] < metrics["parameters"]
    assert load_hf_model(second)[0].config.vocab_size == 15 and second.details["vocab"] is None


def test_vocab_combined_with_head_pruning_and_recovery(parent):
    config = load_config(
        None,
        {
            **FAST,
            "prune.ratio": 0.5,
            "prune.recover_epochs": 1,
            "prune.vocab": True,
            "prune.vocab_min_frequency": 2,
            "prune.vocab_top_k": 20,
        },
        base=parent_base(parent, "prune"),
    )
    result = run_prune(config, parent)
    checkpoint = write_prune(config, result)
    metrics, details = checkpoint.metrics, checkpoint.details
    assert metrics["heads"] == 4 and details["recovery"]["epochs"] == 1
    assert metrics["vocab_size"] == 20 + len(SPECIALS) and details["vocab"]["min_frequency"] == 2
    assert {
        "test/accuracy",
        "pre_vocab/test/accuracy",
        "pruned_no_recovery/test/accuracy",
        "parent/test/accuracy",
    } <= set(metrics)
    reloaded, tokenizer = load_hf_model(checkpoint)
    assert len(tokenizer) == reloaded.config.vocab_size == 25
    texts = ["the film was good", "a bad plot", "the story is very dull", "superb and lovely acting"]
    assert (
        logits(result.model, result.tokenizer, texts) - logits(reloaded, tokenizer, texts)
    ).abs().max().item() <= 1e-6


def test_cli_vocab_flags_are_validated(parent):
    result = runner.invoke(app, ["prune", str(parent.path), "--vocab", "--vocab-top-k", "0", "--recover-epochs", "0"])
    assert result.exit_code != 0 and "prune.vocab_top_k" in result.stderr
    assert sorted(p.name for p in parent.path.parent.iterdir()) == ["finetune-v1"]
    assert "--vocab-min-frequency" in runner.invoke(app, ["prune", "--help"]).stdout


# ------------------------------------------------------------------------------ the real default model


@pytest.mark.integration
def test_real_minilm_vocab_pruning_on_sst2_rows(real_glue, tmp_path):
    from tinycompress.data.glue import load_task_data
    from tinycompress.data.tasks import get_task
    from tinycompress.models.pretrained import load_pretrained_classifier

    start = time.perf_counter()
    spec = get_task("sst2")
    data = load_task_data(spec, data_dir=str(real_glue), dev_fraction=0.05, seed=0, max_train_samples=300)
    model, old, _ = load_pretrained_classifier("default", spec, 0)
    model.eval()
    texts = [row[0] for row in data.train.texts]
    kept = select_vocab(collect_token_counts(old, texts, 128), old, always_keep=config_token_ids(model).values())
    assert len(SPECIALS) < len(kept) < 5000 and set(old.all_special_ids) <= set(kept)
    sample = texts[:16]  # training rows: every token kept by construction
    expected = logits(model, old, sample)
    prune_embeddings_(model, kept)
    new = rewrite_tokenizer(old, kept)
    save_hf_model(tmp_path, model, new, 64)
    reloaded, tokenizer = reload(tmp_path)
    assert reloaded.get_input_embeddings().num_embeddings == len(kept) < 30522 // 4
    assert (logits(reloaded, tokenizer, sample) - expected).abs().max().item() <= 1e-6
    report = tokenization_report(old, tokenizer, [row[0] for row in data.test.texts[:200]], 128, kept)
    assert (
        0 < report["oov_rate"] < 0.5
        and report["words_to_unk"] + report["words_resegmented"] <= report["words_affected"]
    )
    assert time.perf_counter() - start < 60
