from collections import Counter
from pathlib import Path

import pytest

from tinycompress.data.batching import batch_order, collate, encode
from tinycompress.data.glue import load_task_data, read_tsv
from tinycompress.data.tasks import get_task
from tinycompress.errors import TinycompressError


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_quotes_are_not_special(tmp_path):
    # GLUE text has unbalanced quotes; a quoting CSV reader would merge these rows.
    file = _write(tmp_path / "sst2/train.tsv", 'sentence\tlabel\n" a quote opens \t1\nand never closes " \t0\n')
    rows = read_tsv(file, get_task("sst2"), with_labels=True)
    assert rows.texts == [('" a quote opens',), ('and never closes "',)]
    assert rows.labels == [1, 0]


def test_ours_and_classic_layouts_give_the_same_rows(tmp_path):
    cola_rows = [
        "gj04\t1\t\tThe sailors rode the breeze .",
        "gj04\t0\t*\tThe more we study , the more .",
        "gj04\t1\t\tA third one .",
        "gj04\t0\t*\tOne more bad .",
    ]
    ours, classic = tmp_path / "ours", tmp_path / "classic"
    header = "source\tlabel\toriginal_label\tsentence\n"
    _write(ours / "cola/train.tsv", header + "\n".join(cola_rows) + "\n")
    _write(ours / "cola/validation.tsv", header + "\n".join(cola_rows[:2]) + "\n")
    # The classic CoLA files have no header row.
    _write(classic / "CoLA/train.tsv", "\n".join(cola_rows) + "\n")
    _write(classic / "CoLA/dev.tsv", "\n".join(cola_rows[:2]) + "\n")
    spec = get_task("cola")
    a = load_task_data(spec, data_dir=str(ours), dev_fraction=0.25, seed=3)
    b = load_task_data(spec, data_dir=str(classic), dev_fraction=0.25, seed=3)
    assert (a.train.texts, a.train.labels, a.dev.texts, a.test.texts) == (
        b.train.texts,
        b.train.labels,
        b.dev.texts,
        b.test.texts,
    )
    assert len(a.train) == 3 and len(a.dev) == 1 and a.test.labels == [1, 0]


def test_string_labels_and_pairs(tmp_path):
    header = "index\tsentence1\tsentence2\tlabel\n"
    file = _write(
        tmp_path / "rte/train.tsv", header + "0\tA man .\tA person .\tentailment\n1\tX .\tY .\tnot_entailment\n"
    )
    rows = read_tsv(file, get_task("rte"), with_labels=True)
    assert rows.texts == [("A man .", "A person ."), ("X .", "Y .")] and rows.labels == [0, 1]


@pytest.mark.parametrize(
    "body, message",
    [
        ("sentence\tlabel\ngood \t1\nbad \t7\n", r"train.tsv:3: label '7' is out of range"),
        ("sentence\tlabel\ngood \t1\nbad\t0\textra\n", r"train.tsv:3: expected 2 tab-separated columns, found 3"),
        ("text\tlabel\ngood \t1\n", r"train.tsv:1: missing column\(s\) sentence"),
    ],
)
def test_malformed_tsv_names_file_and_line(tmp_path, body, message):
    _write(tmp_path / "sst2/train.tsv", body)
    _write(tmp_path / "sst2/validation.tsv", "sentence\tlabel\nok \t1\n")
    with pytest.raises(TinycompressError, match=message):
        load_task_data(get_task("sst2"), data_dir=str(tmp_path), dev_fraction=0.1, seed=0)


def test_missing_data_says_where_it_looked(tmp_path):
    with pytest.raises(TinycompressError, match="no train file for sst2"):
        load_task_data(get_task("sst2"), data_dir=str(tmp_path), dev_fraction=0.1, seed=0)


def test_dev_split_is_seeded_and_disjoint(toy_glue):
    spec = get_task("sst2")
    a = load_task_data(spec, data_dir=str(toy_glue), dev_fraction=0.25, seed=1)
    b = load_task_data(spec, data_dir=str(toy_glue), dev_fraction=0.25, seed=1)
    c = load_task_data(spec, data_dir=str(toy_glue), dev_fraction=0.25, seed=2)
    assert a.dev.texts == b.dev.texts and a.dev.texts != c.dev.texts
    assert len(a.train) + len(a.dev) == 240 and len(a.dev) == 60
    # Disjoint: train and dev together are exactly the rows of the train file, none in both.
    every = read_tsv(toy_glue / "sst2" / "train.tsv", spec, with_labels=True)
    assert len(set(every.texts)) == len(every)  # the toy sentences are all different
    assert not set(a.train.texts) & set(a.dev.texts)
    assert Counter(a.train.texts) + Counter(a.dev.texts) == Counter(every.texts)


def test_length_grouping_cuts_padding_and_keeps_every_row():
    lengths = [(i * 37) % 50 + 1 for i in range(1000)]
    grouped = batch_order(lengths, 32, shuffle=True, group_by_length=True, seed=0)
    plain = batch_order(lengths, 32, shuffle=True, group_by_length=False, seed=0)
    assert sorted(i for b in grouped for i in b) == list(range(1000))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(plain) / 5


def test_collate_pads_dynamically(tiny_bert_dir, toy_glue):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    data = load_task_data(get_task("sst2"), data_dir=str(toy_glue), dev_fraction=0.25, seed=0)
    encoded = encode(tokenizer, data.test, max_length=32)
    batch = collate(encoded, [0, 1, 2], tokenizer.pad_token_id, regression=False)
    width = max(len(encoded.input_ids[i]) for i in range(3))
    assert batch["input_ids"].shape == (3, width)
    assert batch["attention_mask"].sum().item() == sum(len(encoded.input_ids[i]) for i in range(3))
    assert batch["labels"].tolist() == data.test.labels[:3]
