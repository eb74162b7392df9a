"""Bad input data fails cleanly (issue #15): every problem with a GLUE TSV, and a training loss
that stops being finite, is one :class:`TinycompressError` naming where, never another exception,
and nothing is written.

The property-based tests feed ``read_tsv`` arbitrary bytes and near-valid TSVs (random rows, tabs,
labels, line endings, encodings); the number of examples comes from the hypothesis profile loaded
in conftest ("ci": 300, "fuzz": 10,000).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import assert_one_line_error, tiny_finetune_overrides, write_toy_stsb
from hypothesis import event, given
from hypothesis import strategies as st
from typer.testing import CliRunner

from tinycompress.cli.app import app
from tinycompress.config import load_config
from tinycompress.data.glue import Examples, load_task_data, read_tsv
from tinycompress.data.tasks import get_task
from tinycompress.errors import TinycompressError

runner = CliRunner()
SST2, STSB, COLA = get_task("sst2"), get_task("stsb"), get_task("cola")
SST2_HEADER = "sentence\tlabel\n"
STSB_HEADER = "sentence1\tsentence2\tscore\n"


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def _sst2_folder(root: Path, *, train: str | bytes, validation: str | bytes = SST2_HEADER + "ok \t1\n") -> Path:
    _write(root / "sst2" / "train.tsv", train)
    _write(root / "sst2" / "validation.tsv", validation)
    return root


def _load(root: Path, task: str = "sst2"):
    return load_task_data(get_task(task), data_dir=str(root), dev_fraction=0.2, seed=0)


def _finetune_cli(data_dir: Path, workdir: Path, *extra: str):
    return runner.invoke(app, ["finetune", "--data-dir", str(data_dir), "--workdir", str(workdir), *extra])


def _no_checkpoint(workdir: Path) -> bool:
    return not workdir.exists() or not any(workdir.rglob("*-v*"))


# --- encodings ----------------------------------------------------------------------------------


def test_utf16_tsv_is_refused_naming_the_file(tmp_path):
    train = _write(tmp_path / "sst2" / "train.tsv", (SST2_HEADER + "good \t1\n").encode("utf-16"))  # with BOM
    with pytest.raises(TinycompressError) as caught:
        read_tsv(train, SST2, with_labels=True)
    assert str(caught.value) == (
        f"{train} is UTF-16 text, not UTF-8 — re-save it as UTF-8 (e.g. `iconv -f UTF-16 -t UTF-8`)"
    )


def test_latin1_tsv_is_refused_naming_file_line_and_byte(tmp_path):
    train = _write(tmp_path / "sst2" / "train.tsv", (SST2_HEADER + "good \t1\ncaf\xe9 \t0\n").encode("latin-1"))
    with pytest.raises(TinycompressError) as caught:
        read_tsv(train, SST2, with_labels=True)
    assert str(caught.value) == (
        f"{train}:3: not UTF-8 text (byte 0xe9 at offset 26) — re-save the file as UTF-8 (e.g. `iconv -f latin1 -t UTF-8`)"
    )


def test_bad_byte_after_a_utf8_bom_is_located_in_the_file(tmp_path):
    # The offset and byte are those of the file, byte-order mark included.
    train = _write(tmp_path / "train.tsv", b"\xef\xbb\xbf" + (SST2_HEADER + "caf\xe9 \t0\n").encode("latin-1"))
    with pytest.raises(TinycompressError, match=r"train.tsv:2: not UTF-8 text \(byte 0xe9 at offset 21\)"):
        read_tsv(train, SST2, with_labels=True)


def test_utf8_with_bom_and_crlf_still_reads(tmp_path):
    train = _write(
        tmp_path / "train.tsv", (SST2_HEADER + "café \t1\r\n\r\nbad\t0").replace("\n", "\r\n").encode("utf-8-sig")
    )
    rows = read_tsv(train, SST2, with_labels=True)
    assert (rows.texts, rows.labels) == ([("café",), ("bad",)], [1, 0])


def test_classic_header_check_reads_through_the_shared_reader(tmp_path):
    # A classic CoLA file is header-less; a non-UTF-8 one fails as one error, not a UnicodeDecodeError.
    _write(tmp_path / "CoLA" / "train.tsv", "gj04\t1\t\tGood .\n".encode("utf-16"))
    _write(tmp_path / "CoLA" / "dev.tsv", "gj04\t1\t\tGood .\n")
    with pytest.raises(TinycompressError, match=r"CoLA/train.tsv is UTF-16 text, not UTF-8"):
        _load(tmp_path, "cola")


# --- labels -------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999"])
def test_non_finite_regression_label_names_file_and_line(tmp_path, label):
    write_toy_stsb(tmp_path, n_train=6, n_test=3)
    train = tmp_path / "stsb" / "train.tsv"
    lines = train.read_text().splitlines()
    lines[3] = "\t".join(lines[3].split("\t")[:2] + [label])
    train.write_text("\n".join(lines) + "\n")
    with pytest.raises(TinycompressError) as caught:
        _load(tmp_path, "stsb")
    assert str(caught.value) == (
        f"{train}:4: label '{label}' is not a finite number — stsb scores are finite numbers, e.g. 3.8"
    )


def test_non_finite_label_in_the_test_split_too(tmp_path):
    write_toy_stsb(tmp_path, n_train=6, n_test=3)
    validation = tmp_path / "stsb" / "validation.tsv"
    validation.write_text(STSB_HEADER + "a\tb\t2.5\nc\td\t inf \n")
    with pytest.raises(TinycompressError, match=rf"^{validation}:3: label 'inf' is not a finite number"):
        _load(tmp_path, "stsb")


# --- empty splits -------------------------------------------------------------------------------


def test_header_only_train_is_one_error(tmp_path):
    _sst2_folder(tmp_path, train=SST2_HEADER + "\n\n")  # trailing blank lines are not rows either
    with pytest.raises(TinycompressError) as caught:
        _load(tmp_path)
    train = tmp_path / "sst2" / "train.tsv"
    assert str(caught.value) == (
        f"{train}: has a header but no rows — add the data rows, or point --data-dir at the full GLUE TSV files"
    )


def test_header_only_validation_is_one_error(tmp_path):
    _sst2_folder(tmp_path, train=SST2_HEADER + "good \t1\nbad \t0\n", validation=SST2_HEADER)
    with pytest.raises(TinycompressError, match=rf"^{tmp_path / 'sst2' / 'validation.tsv'}: has a header but no rows"):
        _load(tmp_path)


def test_empty_file_is_one_error(tmp_path):
    _sst2_folder(tmp_path, train=b"\xef\xbb\xbf")  # a UTF-8 byte-order mark and nothing else
    with pytest.raises(TinycompressError, match=r"train.tsv: the file is empty"):
        _load(tmp_path)


def test_one_row_train_cannot_give_both_train_and_dev(tmp_path):
    _sst2_folder(tmp_path, train=SST2_HEADER + "good \t1\n")
    with pytest.raises(TinycompressError) as caught:
        _load(tmp_path)
    assert str(caught.value) == (
        f"{tmp_path / 'sst2' / 'train.tsv'} has 1 row(s): too few to carve a dev split (data.dev_fraction 0.2) "
        "and keep training rows — it needs at least 2 rows"
    )
    # Two rows are enough: one for dev, one for training.
    _sst2_folder(tmp_path, train=SST2_HEADER + "good \t1\nbad \t0\n")
    data = _load(tmp_path)
    assert (len(data.train), len(data.dev), len(data.test)) == (1, 1, 1)


# --- through the CLI: one `error:` line naming the file, exit 1, no checkpoint folder -------------


@pytest.mark.parametrize(
    "train, validation, bad_file, needle",
    [
        ((SST2_HEADER + "good \t1\n").encode("utf-16"), SST2_HEADER + "ok \t1\n", "train.tsv", "is UTF-16 text"),
        ((SST2_HEADER + "caf\xe9 \t1\n").encode("latin-1"), SST2_HEADER + "ok \t1\n", "train.tsv:2", "not UTF-8"),
        (SST2_HEADER, SST2_HEADER + "ok \t1\n", "train.tsv", "has a header but no rows"),
        (SST2_HEADER + "good \t1\nbad \t0\n", SST2_HEADER, "validation.tsv", "has a header but no rows"),
        (SST2_HEADER + "good \t1\n", SST2_HEADER + "ok \t1\n", "train.tsv", "needs at least 2 rows"),
    ],
    ids=["utf16", "latin1", "header-only-train", "header-only-validation", "one-row-train"],
)
def test_cli_bad_sst2_data(tmp_path, train, validation, bad_file, needle):
    data = _sst2_folder(tmp_path / "glue", train=train, validation=validation)
    result = _finetune_cli(data, tmp_path / "ws")
    assert result.exit_code == 1
    assert_one_line_error(result, str(data / "sst2" / bad_file), needle)
    assert _no_checkpoint(tmp_path / "ws")


@pytest.mark.parametrize("label", ["nan", "inf"])
def test_cli_non_finite_stsb_label(tmp_path, label):
    data = write_toy_stsb(tmp_path / "glue", n_train=6, n_test=3)
    train = data / "stsb" / "train.tsv"
    train.write_text(STSB_HEADER + "a\tb\t1.0\nc\td\t" + label + "\n")
    result = _finetune_cli(data, tmp_path / "ws", "--task", "stsb")
    assert result.exit_code == 1
    assert_one_line_error(result, f"{train}:3: label '{label}' is not a finite number")
    assert _no_checkpoint(tmp_path / "ws")


# --- a non-finite training loss -----------------------------------------------------------------


def test_huge_learning_rate_stops_with_one_error_and_no_checkpoint(tiny_bert_dir, toy_glue, tmp_path):
    args = ["--model", str(tiny_bert_dir), "--epochs", "2", "--lr", "1e30", "--batch-size", "16"]
    result = _finetune_cli(toy_glue, tmp_path, *args, "--max-length", "32", "--threads", "1")
    assert result.exit_code == 1 and "Traceback" not in result.output
    # The progress bar may have drawn its line on stderr before; the error is the one `error:` line, last.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().splitlines()[-1] == errors[0]
    assert errors[0].startswith("error: fine-tune: the training loss became nan at epoch 1/2, step ")
    assert errors[0].endswith(
        "; stopped before writing a checkpoint — lower the learning rate (now 1e+30: --lr, or --recover-lr for the distillation after pruning) or check the training labels"
    )
    assert _no_checkpoint(tmp_path)


def test_non_finite_loss_names_epoch_and_step(tiny_bert_dir, toy_glue, tmp_path, monkeypatch):
    import tinycompress.training.loop as training
    from tinycompress.stages.finetune import finetune

    real_loss, calls = training.batch_loss, []

    def loss_turning_inf_at_step_15(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * math.inf if len(calls) == 15 else loss

    monkeypatch.setattr(training, "batch_loss", loss_turning_inf_at_step_15)
    config = load_config(None, tiny_finetune_overrides(tiny_bert_dir, toy_glue, tmp_path, **{"finetune.epochs": 2}))
    with pytest.raises(TinycompressError) as caught:
        finetune(config)
    # 192 training rows in batches of 16: 12 steps an epoch, so call 15 is epoch 2, step 3.
    assert str(caught.value) == (
        "fine-tune: the training loss became inf at epoch 2/2, step 3/12; stopped before writing a checkpoint"
        " — lower the learning rate (now 0.002: --lr, or --recover-lr for the distillation after pruning) or check the training labels"
    )
    assert len(calls) == 15 and _no_checkpoint(tmp_path)


def test_recovery_training_says_which_loop_failed(tiny_bert_dir, toy_glue, tmp_path, monkeypatch):
    # prune's distillation recovery runs the same loop, described as "recover".
    import tinycompress.training.loop as training
    from tinycompress.data.batching import encode, padding_id
    from tinycompress.models.pretrained import load_pretrained_classifier

    config = load_config(None, tiny_finetune_overrides(tiny_bert_dir, toy_glue, tmp_path))
    data = _load(toy_glue)
    model, tokenizer, _ = load_pretrained_classifier(str(tiny_bert_dir), SST2, 0)
    train_enc, dev_enc = encode(tokenizer, data.train, 32), encode(tokenizer, data.dev, 32)
    monkeypatch.setattr(training, "batch_loss", lambda *a, **k: training.torch.tensor(math.nan, requires_grad=True))
    with pytest.raises(TinycompressError, match=r"^recover: the training loss became nan at epoch 1/1, step 1/12;"):
        training.train(
            model,
            train_enc,
            dev_enc,
            SST2,
            config.finetune,
            pad_id=padding_id(tokenizer),
            device="cpu",
            seed=0,
            epochs=1,
            description="recover",
        )


# --- property-based: read_tsv never fails with anything but a TinycompressError ------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _check_read(path: Path, spec, *, headerless: bool = False) -> Examples | None:
    """read_tsv's result, checked; None when it refused the file (with an error naming it)."""
    try:
        rows = read_tsv(path, spec, with_labels=True, headerless=headerless)
    except TinycompressError as exc:
        assert str(path) in str(exc)
        event("refused")  # --hypothesis-show-statistics: how many examples get past the checks
        return None
    event("read")
    assert isinstance(rows, Examples) and len(rows) > 0 and rows.labels is not None
    assert len(rows.labels) == len(rows.texts)
    assert all(len(row) == len(spec.tsv_text_columns) and all(isinstance(t, str) for t in row) for row in rows.texts)
    if spec.is_regression:
        assert all(isinstance(label, float) and math.isfinite(label) for label in rows.labels)
    else:
        assert all(type(label) is int and 0 <= label < spec.num_labels for label in rows.labels)
    return rows


VALID_LABELS = {
    "sst2": ["0", "1", " 1 ", "negative", "positive", "٠"],
    "stsb": ["0", "3.8", " 5.000 ", "-0.5", "1e3", "1_0"],
    "cola": ["0", "1", "acceptable", "unacceptable"],
}
ODD_LABELS = ["", "x", "2", "-1", "1.0", "1_0", "nan", "NaN", "inf", "-inf", "Infinity", "1e999", "1e308", "0x1"]
HEADERS = {"sst2": ["sentence", "label"], "stsb": ["sentence1", "sentence2", "score"]}
ODD_FIELDS = ["", " ", '"', '" a', "\\", "\t", "\r", "\n", "\x00", "\ufeff", "\x85", "\u2028", "é" * 3]
ODD_ENCODINGS = ["utf-8-sig", "utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252"]


def _mostly(draw, good, odd):
    """``good`` nine times in ten, else ``odd``: files stay close enough to valid to be read."""
    return draw(odd if draw(st.integers(0, 9)) == 0 else good)


@st.composite
def near_valid_tsv(draw, task: str, headerless: bool = False) -> bytes:
    """A TSV close to valid: the task's header (unless header-less), then rows that are mostly
    well formed, with odd texts, labels, column counts, blank lines, line endings and encodings."""
    spec = get_task(task)
    columns = list(spec.classic_headerless_columns) if headerless else HEADERS[task]
    if not headerless and draw(st.booleans()):  # extra columns, in any order, as in real GLUE files
        columns = draw(st.permutations(columns + ["index", "genre"]))
    label_column = columns.index(spec.tsv_label_column)
    good_label = st.sampled_from(VALID_LABELS[task])
    if not spec.is_regression:
        good_label |= st.integers(0, spec.num_labels - 1).map(str)
    else:
        good_label |= st.floats(-10, 10).map(repr)
    odd_label = st.sampled_from(ODD_LABELS) | st.floats().map(repr) | st.text(max_size=6)
    good_field = st.text(st.characters(blacklist_characters="\t\n\r\x00", blacklist_categories=("Cs",)), max_size=12)
    odd_field = st.sampled_from(ODD_FIELDS) | st.text(max_size=12)
    lines = [] if headerless else ["\t".join(columns)]
    for _ in range(draw(st.integers(0, 6))):
        width = len(columns) + _mostly(draw, st.just(0), st.sampled_from([-1, 1, -len(columns)]))
        fields = [_mostly(draw, good_field, odd_field) for _ in range(max(width, 0))]
        if label_column < len(fields):
            fields[label_column] = _mostly(draw, good_label, odd_label)
        lines.append(_mostly(draw, st.just("\t".join(fields)), st.just("")))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = newline.join(lines) + (newline if draw(st.booleans()) else "")
    data = text.encode(_mostly(draw, st.just("utf-8"), st.sampled_from(ODD_ENCODINGS)), errors="replace")
    if draw(st.integers(0, 19)) == 0:  # a truncated file, possibly mid-character
        data = data[: draw(st.integers(0, len(data)))]
    return data


@pytest.mark.parametrize("task", ["sst2", "stsb"])
@given(data=st.binary())
def test_read_tsv_on_arbitrary_bytes(scratch, task, data):
    _check_read(_write(scratch / f"bytes-{task}.tsv", data), get_task(task))


@given(data=st.binary())
def test_read_tsv_headerless_on_arbitrary_bytes(scratch, data):
    _check_read(_write(scratch / "bytes-cola.tsv", data), COLA, headerless=True)


@pytest.mark.parametrize("task", ["sst2", "stsb"])
@given(data=st.data())
def test_read_tsv_on_near_valid_files(scratch, task, data):
    _check_read(_write(scratch / f"near-{task}.tsv", data.draw(near_valid_tsv(task))), get_task(task))


@given(data=near_valid_tsv("cola", headerless=True))
def test_read_tsv_headerless_on_near_valid_files(scratch, data):
    _check_read(_write(scratch / "near-cola.tsv", data), COLA, headerless=True)


CLEAN_TEXT = st.text(st.characters(blacklist_characters="\t\n\r\x00\ufeff", blacklist_categories=("Cs",)), max_size=12)


@given(
    rows=st.lists(st.tuples(CLEAN_TEXT, CLEAN_TEXT, st.floats(-10, 10, allow_nan=False)), min_size=1, max_size=6),
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    bom=st.booleans(),
)
def test_well_formed_stsb_reads_back_exactly(scratch, rows, newline, bom):
    text = newline.join(["sentence1\tsentence2\tscore"] + [f"{a}\t{b}\t{score!r}" for a, b, score in rows]) + newline
    path = _write(scratch / "clean-stsb.tsv", text.encode("utf-8-sig" if bom else "utf-8"))
    read = _check_read(path, STSB)
    assert read is not None
    assert read.texts == [(a.strip(), b.strip()) for a, b, _ in rows]
    assert read.labels == [score for _, _, score in rows]


@given(train=near_valid_tsv("sst2"))
def test_load_task_data_gives_non_empty_splits_or_one_error(scratch, train):
    root = _sst2_folder(scratch / "load", train=train)
    try:
        data = _load(root)
    except TinycompressError as exc:
        assert str(root / "sst2") in str(exc)
        return
    assert len(data.train) >= 1 and len(data.dev) >= 1 and len(data.test) == 1
