"""Manifests guard themselves (own checksum, typed fields), writers fail before the work when they
cannot write, temporaries of dead writers are cleaned by host and process, and predict's inputs
fail cleanly (issue #15)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import assert_one_line_error
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from tinycompress.checkpoint import store, temporaries
from tinycompress.checkpoint.format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SELF_CHECKSUM_KEY,
    WEIGHTS_FILE,
    manifest_digest,
)
from tinycompress.checkpoint.store import (
    read_checkpoint,
    record_command_line,
    sha256_file,
    write_checkpoint,
)
from tinycompress.checkpoint.temporaries import remove_orphaned_temporaries, temporary_path
from tinycompress.cli.app import app
from tinycompress.config import load_config
from tinycompress.errors import TinycompressError

runner = CliRunner()
FIXTURE_V1 = Path(__file__).parent / "fixtures" / "format_v1" / "sst2" / "finetune-v1"


def _workspace_copy(checkpoint, tmp_path: Path) -> Path:
    """A copy of a checkpoint's whole workspace (so tests may damage it), and the copied folder."""
    workspace = tmp_path / "ws"
    shutil.copytree(checkpoint.path.parent.parent, workspace)
    return workspace / checkpoint.path.parent.name / checkpoint.path.name


def _edit_manifest(folder: Path, change) -> None:
    path = folder / MANIFEST_NAME
    manifest = yaml.safe_load(path.read_text(encoding="utf-8"))
    change(manifest)
    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")


def _small_checkpoint(workdir: Path, files: dict[str, bytes] | None = None, **kwargs):
    def put(folder):
        for name, data in (files or {"weights.bin": b"w"}).items():
            (folder / name).write_bytes(data)

    kwargs.setdefault("metrics", {})
    return write_checkpoint(workdir, "sst2", "finetune", put, config=load_config(), seed=1, **kwargs)


# --- the manifest's own checksum ---------------------------------------------------------------


def test_new_manifests_carry_their_own_checksum(tmp_path):
    checkpoint = _small_checkpoint(tmp_path, metrics={"test/accuracy": 0.875, "odd": float("nan")})
    manifest = checkpoint.manifest
    assert manifest["format_version"] == FORMAT_VERSION == 2
    assert manifest[SELF_CHECKSUM_KEY] == manifest_digest(manifest)
    text = (checkpoint.path / MANIFEST_NAME).read_text(encoding="utf-8")
    assert text.rstrip().splitlines()[-1] == f"{SELF_CHECKSUM_KEY}: {manifest[SELF_CHECKSUM_KEY]}"
    # The digest does not depend on key order or YAML layout, only on the content.
    reordered = dict(reversed(list(manifest.items())))
    assert manifest_digest(reordered) == manifest[SELF_CHECKSUM_KEY]


def test_an_edited_metric_is_refused(tmp_path):
    checkpoint = _small_checkpoint(tmp_path, metrics={"test/accuracy": 0.875})
    _edit_manifest(checkpoint.path, lambda m: m["metrics"].update({"test/accuracy": 0.999}))
    with pytest.raises(TinycompressError, match="was edited after it was written"):
        read_checkpoint(checkpoint.path)
    # Without verifying files too: the manifest is the index every other reader trusts.
    with pytest.raises(TinycompressError, match="was edited after it was written"):
        read_checkpoint(checkpoint.path, verify=False)
    _edit_manifest(checkpoint.path, lambda m: m.pop(SELF_CHECKSUM_KEY))
    with pytest.raises(TinycompressError, match="was edited after it was written"):
        read_checkpoint(checkpoint.path)


def test_edited_manifest_is_refused_by_evaluate_prune_and_report(tiny_finetuned, tmp_path):
    folder = _workspace_copy(tiny_finetuned, tmp_path)
    _edit_manifest(folder, lambda m: m["metrics"].update({"test/accuracy": 0.999}))
    before = sorted(p.name for p in folder.parent.iterdir())
    for args in (
        ["evaluate", str(folder)],
        ["prune", str(folder), "--ratio", "0.5", "--recover-epochs", "0"],
        ["prune", "--workdir", str(folder.parent.parent), "--task", "sst2", "--ratio", "0.5"],
        ["report", str(folder.parent.parent), "--no-bench"],
    ):
        assert_one_line_error(runner.invoke(app, args), str(folder / MANIFEST_NAME), "was edited")
    assert sorted(p.name for p in folder.parent.iterdir()) == before  # nothing written


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("version", "/", "version"),
        ("version", 0, "version"),
        ("version", True, "version"),
        ("parent", {"path": None}, "parent"),
        ("parent", {"path": "x", "stage": "finetune", "manifest_sha256": "zz"}, "parent.manifest_sha256"),
        ("files", ["a"], "files"),
        ("files", {"weights.bin": 7}, "files.weights.bin"),
        ("format_version", "2", "format_version"),
        ("config", None, "config"),
        ("stage", 3, "stage"),
        ("metrics", [1, 2], "metrics"),
    ],
)
def test_wrongly_typed_fields_are_named(tmp_path, field, value, named):
    checkpoint = _small_checkpoint(tmp_path)
    _edit_manifest(checkpoint.path, lambda m: m.update({field: value}))
    with pytest.raises(TinycompressError, match=rf"{MANIFEST_NAME} is corrupt \({named}"):
        read_checkpoint(checkpoint.path)


def test_a_file_name_leaving_the_folder_is_refused(tmp_path):
    checkpoint = _small_checkpoint(tmp_path)

    def escape(manifest):
        manifest["files"]["../../outside"] = manifest["files"]["weights.bin"]
        manifest[SELF_CHECKSUM_KEY] = manifest_digest(manifest)

    _edit_manifest(checkpoint.path, escape)
    with pytest.raises(TinycompressError, match="points outside the folder"):
        read_checkpoint(checkpoint.path)


def test_format_1_manifests_are_read_and_said_to_predate_the_checksum(tmp_path, capsys):
    folder = tmp_path / "finetune-v1"
    shutil.copytree(FIXTURE_V1, folder)
    checkpoint = read_checkpoint(folder)
    read_checkpoint(folder)
    assert checkpoint.manifest["format_version"] == 1
    notes = [line for line in capsys.readouterr().err.splitlines() if "predates" in line]
    assert len(notes) == 1 and str(folder) in notes[0]
    # What a format-1 manifest has is still verified: its files.
    (folder / WEIGHTS_FILE).write_bytes(b"changed")
    with pytest.raises(TinycompressError, match="model.safetensors is corrupt"):
        read_checkpoint(folder)


# --- hints, file modes, safetensors ------------------------------------------------------------


def test_hints_say_the_command_that_made_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "_command_line", None)
    record_command_line(["tinycompress", "finetune", "--task", "sst2", "--epochs", "5", "--data-dir", "my data"])
    checkpoint = _small_checkpoint(tmp_path)
    assert checkpoint.manifest["command"] == "tinycompress finetune --task sst2 --epochs 5 --data-dir 'my data'"
    (checkpoint.path / "weights.bin").write_bytes(b"damaged")
    with pytest.raises(TinycompressError, match="re-run `tinycompress finetune --task sst2 --epochs 5"):
        read_checkpoint(checkpoint.path)
    # A checkpoint written from Python (no command line) gets the stage's usual command.
    monkeypatch.setattr(store, "_command_line", None)
    other = _small_checkpoint(tmp_path / "other")
    assert "command" not in other.manifest
    (other.path / "weights.bin").write_bytes(b"damaged")
    with pytest.raises(TinycompressError, match="re-run `tinycompress finetune --task sst2`"):
        read_checkpoint(other.path)


def test_checkpoint_files_share_one_mode(tmp_path):
    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        checkpoint = write_checkpoint(
            tmp_path,
            "sst2",
            "finetune",
            lambda folder: save_file({"w": torch.zeros(2)}, str(folder / WEIGHTS_FILE)),
            config=load_config(),
            seed=1,
        )
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in checkpoint.path.iterdir()}
    assert modes == {WEIGHTS_FILE: 0o644, "README.md": 0o644, MANIFEST_NAME: 0o644}


def _reseal(folder: Path) -> None:
    """Recompute every checksum, as a careless tool rewriting the folder would."""

    def refresh(manifest):
        manifest["files"] = {name: sha256_file(folder / name) for name in manifest["files"]}
        manifest[SELF_CHECKSUM_KEY] = manifest_digest(manifest)

    _edit_manifest(folder, refresh)


def test_a_file_that_is_not_safetensors_is_named(tiny_finetuned, tmp_path):
    folder = _workspace_copy(tiny_finetuned, tmp_path)
    (folder / WEIGHTS_FILE).write_bytes(b"\xff" * 64)  # a huge "header length"
    _reseal(folder)
    with pytest.raises(TinycompressError, match=rf"{WEIGHTS_FILE} is not a safetensors file"):
        read_checkpoint(folder)
    assert_one_line_error(runner.invoke(app, ["predict", str(folder), "fine"]), "is not a safetensors file")
    (folder / WEIGHTS_FILE).write_bytes((8).to_bytes(8, "little") + b"[1,2,3] " + b"\0" * 16)
    _reseal(folder)
    assert_one_line_error(runner.invoke(app, ["evaluate", str(folder)]), "header is not a JSON object")


# --- temporaries -------------------------------------------------------------------------------


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_temporaries_are_removed_by_host_process_and_age(tmp_path):
    host = temporaries._host()
    dead, live = _dead_pid(), os.getpid()
    names = {
        "dead_here": f".tmp-finetune-{host}-{dead}-0000dead",
        "live_here": f".tmp-finetune-{host}-{live}-0000beef",
        "dead_report": f".tmp-report-{host}-{dead}-00000001",
        "dead_file": f".tmp-costtable-{host}-{dead}-00000002.json",
        "other_host_new": f".tmp-finetune-otherbox-{dead}-00000003",
        "other_host_old": f".tmp-finetune-otherbox-{dead}-00000004",
        "legacy_dead": f".tmp-prune-{dead}-00000005",
        "legacy_report_new": ".tmp-report-00000006",
        "legacy_report_old": ".tmp-report-00000007",
        "unrelated": ".tmp-notes",
    }
    for key, name in names.items():
        (tmp_path / name).write_text("x") if key == "dead_file" else (tmp_path / name).mkdir()
    two_days_ago = time.time() - 2 * 24 * 3600
    for key in ("other_host_old", "legacy_report_old"):
        os.utime(tmp_path / names[key], (two_days_ago, two_days_ago))
    remove_orphaned_temporaries(tmp_path)
    kept = {key for key, name in names.items() if (tmp_path / name).exists()}
    assert kept == {"live_here", "other_host_new", "legacy_report_new", "unrelated"}


def test_temporary_names_carry_host_and_process(tmp_path):
    name = temporary_path(tmp_path, "report_target2", ".json").name
    assert name.startswith(f".tmp-report_target2-{temporaries._host()}-{os.getpid()}-") and name.endswith(".json")


def test_a_killed_report_leaves_nothing_behind_the_next_one(tiny_finetuned, tmp_path):
    folder = _workspace_copy(tiny_finetuned, tmp_path)
    orphan = folder.parent / f".tmp-report-{temporaries._host()}-{_dead_pid()}-0badc0de"
    orphan.mkdir()
    (orphan / "report.md").write_text("half")
    result = runner.invoke(app, ["report", str(folder.parent.parent), "--no-bench"])
    assert result.exit_code == 0, result.output
    assert not orphan.exists()
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]


# --- pre-flight: an unwritable place fails before the work ----------------------------------


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any model load fails the test loudly (it would show as 'unexpected ...' in the error line)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the pre-flight")

    import tinycompress.stages.finetune as finetune_stage
    import tinycompress.stages.prune_job as prune_job

    monkeypatch.setattr(finetune_stage, "load_pretrained_classifier", refuse)
    monkeypatch.setattr(prune_job, "load_hf_model", refuse)


def test_a_workdir_that_is_a_file_fails_before_training(tiny_bert_dir, toy_glue, tmp_path, no_model_loading):
    afile = tmp_path / "afile"
    afile.write_text("")
    flags = ["--task", "sst2", "--model", str(tiny_bert_dir), "--data-dir", str(toy_glue), "--workdir", str(afile)]
    for command in ("finetune", "run"):
        assert_one_line_error(
            runner.invoke(app, [command, *flags, "--epochs", "1", "--max-train-samples", "8"]),
            f"cannot write to {afile / 'sst2'}",
            "is a file",
            "pass a writable --workdir",
        )
    assert afile.read_text() == ""


def test_prune_quantize_export_and_report_check_their_destination_first(tiny_finetuned, tmp_path, no_model_loading):
    afile = tmp_path / "afile"
    afile.write_text("")
    parent = str(tiny_finetuned.path)
    for args in (
        ["prune", parent, "--ratio", "0.5", "--workdir", str(afile)],
        ["quantize", parent, "--workdir", str(afile)],
        ["export", parent, "--workdir", str(afile)],
    ):
        assert_one_line_error(runner.invoke(app, args), "cannot write to", "is a file")
    assert_one_line_error(
        runner.invoke(app, ["export", parent, "--output", str(afile / "deploy")]), "cannot write to", "is a file"
    )
    assert_one_line_error(
        runner.invoke(app, ["report", str(tiny_finetuned.path.parent.parent), "--out", str(afile / "r")]),
        "cannot write to",
        "is a file",
    )
    not_a_report = tmp_path / "busy"
    not_a_report.mkdir()
    (not_a_report / "notes.txt").write_text("mine")
    assert_one_line_error(
        runner.invoke(app, ["report", str(tiny_finetuned.path.parent.parent), "--out", str(not_a_report)]),
        "is not a tinycompress report folder",
    )
    assert (not_a_report / "notes.txt").read_text() == "mine"


# --- predict's inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("threads", ["-1", "0"])
def test_predict_threads_below_one_are_refused_like_everywhere(tiny_finetuned, threads):
    assert_one_line_error(
        runner.invoke(app, ["predict", str(tiny_finetuned.path), "fine", "--threads", threads]),
        "threads",
        "greater than or equal to 1",
    )


def test_predict_file_in_latin1_is_named(tiny_finetuned, tmp_path):
    texts = tmp_path / "reviews.txt"
    texts.write_bytes("un film tr\xe8s dr\xf4le\n".encode("latin-1"))
    assert_one_line_error(
        runner.invoke(app, ["predict", str(tiny_finetuned.path), "--file", str(texts)]), str(texts), "not UTF-8"
    )


def test_a_tab_is_text_on_single_sentence_tasks(tiny_finetuned):
    from tinycompress.stages.predict import predict

    with_tab, with_space = predict(tiny_finetuned.path, ["good\tfilm", "good film"], threads=1)
    assert with_tab["text"] == "good\tfilm"
    assert with_tab["probabilities"] == pytest.approx(with_space["probabilities"], abs=1e-6)


# --- property: any manifest bytes load or raise the project's error ---------------------------


_FUZZ_ROOT = Path(tempfile.mkdtemp(prefix="tc-manifest-fuzz-"))
_BASE = None


def _base_checkpoint():
    global _BASE
    if _BASE is None:
        _BASE = _small_checkpoint(_FUZZ_ROOT / "base")
    return _BASE


def _fresh_folder() -> Path:
    base = _base_checkpoint()
    folder = Path(tempfile.mkdtemp(dir=_FUZZ_ROOT)) / "finetune-v1"
    shutil.copytree(base.path, folder)
    return folder


def _reads_or_refuses(folder: Path) -> None:
    try:
        checkpoint = read_checkpoint(folder)
        checkpoint.config  # noqa: B018 -- the typed config is part of reading a manifest
        checkpoint.parent()
    except TinycompressError:
        pass
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


@given(st.binary(max_size=2048))
def test_any_manifest_bytes_load_or_raise_our_error(data):
    folder = _fresh_folder()
    (folder / MANIFEST_NAME).write_bytes(data)
    _reads_or_refuses(folder)


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["/", "..", "finetune", "sst2", "0" * 64, "a" * 64, ".nan", ""]),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.one_of(st.text(max_size=8), _scalars), inner, max_size=3)
    ),
    max_leaves=8,
)
_keys = st.sampled_from(
    [
        "format_version",
        "stage",
        "task",
        "version",
        "parent",
        "files",
        "config",
        "metrics",
        "details",
        "seed",
        "size_bytes",
        "model_bytes",
        "command",
        SELF_CHECKSUM_KEY,
        "extra",
    ]
)


@given(st.dictionaries(_keys, _values, max_size=4), st.sets(_keys, max_size=3), st.booleans())
def test_any_changed_manifest_fields_load_or_raise_our_error(changes, removed, reseal):
    folder = _fresh_folder()

    def change(manifest):
        manifest.update(changes)
        for key in removed:
            manifest.pop(key, None)
        if reseal:  # a checksum that matches the changed content: the types must still hold
            manifest[SELF_CHECKSUM_KEY] = manifest_digest(manifest)

    try:
        _edit_manifest(folder, change)
    except (yaml.YAMLError, TypeError, ValueError):
        shutil.rmtree(folder.parent, ignore_errors=True)
        return  # a value YAML cannot write is not a file anyone could have
    _reads_or_refuses(folder)


def test_fine_tuned_workspace_still_reads_after_the_fuzz_fixtures(tiny_finetuned):
    assert read_checkpoint(tiny_finetuned.path).manifest[SELF_CHECKSUM_KEY]


def teardown_module(module):
    shutil.rmtree(_FUZZ_ROOT, ignore_errors=True)


def _alias_bomb(levels: int = 8) -> str:
    """Each level refers to the one before nine times: 9**levels values from a few hundred bytes."""
    lines = ["l0: &l0 [1, 2, 3, 4, 5, 6, 7, 8, 9]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "text",
    ["a: " + "[" * 5000 + "]" * 5000, "a: &a [*a]\nformat_version: 2\n", _alias_bomb()],
    ids=["deep", "alias-cycle", "alias-bomb"],
)
def test_hostile_yaml_manifests_are_refused(tmp_path, text):
    checkpoint = _small_checkpoint(tmp_path)
    (checkpoint.path / MANIFEST_NAME).write_text(text, encoding="utf-8")
    with pytest.raises(TinycompressError, match="is corrupt"):
        read_checkpoint(checkpoint.path)


def test_a_garbled_manifest_is_named(tiny_finetuned, tmp_path):
    folder = _workspace_copy(tiny_finetuned, tmp_path)
    text = (folder / MANIFEST_NAME).read_text(encoding="utf-8")
    (folder / MANIFEST_NAME).write_bytes(text.replace("sst2", "sst\xe9").encode("latin-1"))
    assert_one_line_error(runner.invoke(app, ["evaluate", str(folder)]), str(folder / MANIFEST_NAME), "not UTF-8")
