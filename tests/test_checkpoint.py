import os

import pytest
import yaml

from tinycompress.checkpoint.format import MANIFEST_NAME
from tinycompress.checkpoint.store import read_checkpoint, write_checkpoint
from tinycompress.checkpoint.workspace import resolve_input, stage_versions
from tinycompress.config import load_config
from tinycompress.errors import TinycompressError


def _write(workdir, files: dict[str, bytes], **kwargs):
    def put(folder):
        for name, data in files.items():
            (folder / name).write_bytes(data)

    return write_checkpoint(
        workdir, "sst2", "finetune", put, config=load_config(), metrics={"test/accuracy": 0.5}, seed=1, **kwargs
    )


def test_versions_are_never_overwritten(tmp_path):
    first = _write(tmp_path, {"weights.bin": b"one"})
    second = _write(tmp_path, {"weights.bin": b"two"})
    assert (first.name, second.name) == ("finetune-v1", "finetune-v2")
    assert (first.path / "weights.bin").read_bytes() == b"one"
    assert sorted(os.listdir(first.path)) == sorted(["README.md", MANIFEST_NAME, "weights.bin"])
    manifest = yaml.safe_load((second.path / MANIFEST_NAME).read_text())
    assert manifest["version"] == 2 and manifest["stage"] == "finetune" and manifest["seed"] == 1
    assert set(manifest["files"]) == {"README.md", "weights.bin"}
    assert manifest["config"]["task"] == "sst2" and "torch" in manifest["versions"]


def test_lineage_records_parent_and_its_checksum(tmp_path):
    parent = _write(tmp_path, {"weights.bin": b"p"})
    child = write_checkpoint(
        tmp_path,
        "sst2",
        "prune",
        lambda f: (f / "x.bin").write_bytes(b"c"),
        config=load_config(),
        metrics={},
        seed=1,
        parent=parent,
    )
    assert child.manifest["parent"]["path"] == "finetune-v1"
    assert child.parent().path == parent.path.resolve()
    assert resolve_input(None, workdir=tmp_path, task="sst2", stage="quantize").path == child.path


def test_failure_while_writing_leaves_nothing(tmp_path):
    _write(tmp_path, {"weights.bin": b"ok"})

    def explode(folder):
        (folder / "weights.bin").write_bytes(b"half")
        raise KeyboardInterrupt  # as if Ctrl-C arrived mid-write

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, "sst2", "finetune", explode, config=load_config(), metrics={}, seed=1)
    assert sorted(os.listdir(tmp_path / "sst2")) == ["finetune-v1"]
    assert [v for v, _ in stage_versions(tmp_path, "sst2", "finetune")] == [1]


def test_leftover_temporary_folder_is_not_a_checkpoint(tmp_path):
    (tmp_path / "sst2" / ".tmp-finetune-dead").mkdir(parents=True)
    with pytest.raises(TinycompressError, match="no finetune checkpoint for task sst2"):
        resolve_input(None, workdir=tmp_path, task="sst2", stage="prune")


def test_corrupt_and_missing_files_are_named(tmp_path):
    checkpoint = _write(tmp_path, {"weights.bin": b"weights"})
    (checkpoint.path / "weights.bin").write_bytes(b"weightz")
    with pytest.raises(TinycompressError, match=r"weights.bin is corrupt .*tinycompress finetune --task sst2"):
        read_checkpoint(checkpoint.path)
    (checkpoint.path / "weights.bin").unlink()
    with pytest.raises(TinycompressError, match="weights.bin listed in the manifest is missing"):
        read_checkpoint(checkpoint.path)


def test_format_version_and_garbage_manifest(tmp_path):
    checkpoint = _write(tmp_path, {"a": b"1"})
    manifest_path = checkpoint.path / MANIFEST_NAME
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest_path.write_text(yaml.safe_dump(manifest))
    with pytest.raises(TinycompressError, match="checkpoint format 99"):
        read_checkpoint(checkpoint.path)
    manifest_path.write_text("::: not yaml {")
    with pytest.raises(TinycompressError, match="corrupt"):
        read_checkpoint(checkpoint.path)
    with pytest.raises(TinycompressError, match="not a tinycompress checkpoint"):
        read_checkpoint(tmp_path)
    with pytest.raises(TinycompressError, match="not found"):
        read_checkpoint(tmp_path / "nope")


def test_folder_without_manifest_is_skipped_not_overwritten(tmp_path):
    stray = tmp_path / "sst2" / "finetune-v1"
    stray.mkdir(parents=True)
    (stray / "partial.bin").write_bytes(b"left by someone")
    written = _write(tmp_path, {"weights.bin": b"w"})
    assert written.name == "finetune-v2"
    assert (stray / "partial.bin").read_bytes() == b"left by someone"
    assert sorted(os.listdir(tmp_path / "sst2")) == ["finetune-v1", "finetune-v2"]


def test_files_not_in_the_manifest_are_refused(tmp_path):
    checkpoint = _write(tmp_path, {"weights.bin": b"w"})
    (checkpoint.path / "model.torchscript.pt").write_bytes(b"not ours")
    with pytest.raises(TinycompressError, match="model.torchscript.pt is not listed in the manifest"):
        read_checkpoint(checkpoint.path)


def test_parent_changed_after_the_child_was_written(tmp_path):
    parent = _write(tmp_path, {"weights.bin": b"p"})
    child = write_checkpoint(
        tmp_path,
        "sst2",
        "prune",
        lambda f: (f / "x.bin").write_bytes(b"c"),
        config=load_config(),
        metrics={},
        seed=1,
        parent=parent,
    )
    manifest_path = parent.path / MANIFEST_NAME
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["metrics"]["test/accuracy"] = 0.99
    manifest_path.write_text(yaml.safe_dump(manifest))
    with pytest.raises(TinycompressError, match="changed after it was written"):
        child.parent()


def test_temporary_folder_of_a_dead_writer_is_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    orphan = tmp_path / "sst2" / f".tmp-finetune-{dead.stdout.strip()}-deadbeef"
    live = tmp_path / "sst2" / f".tmp-finetune-{os.getpid()}-cafe0000"
    orphan.mkdir(parents=True)
    live.mkdir()
    _write(tmp_path, {"weights.bin": b"w"})
    assert sorted(os.listdir(tmp_path / "sst2")) == sorted([live.name, "finetune-v1"])
