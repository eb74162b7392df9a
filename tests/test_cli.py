import json
import subprocess
import sys

import pytest
import torch
from conftest import assert_one_line_error
from typer.testing import CliRunner

from tinycompress.cli.app import app
from tinycompress.errors import TinycompressError

runner = CliRunner()


COMMANDS = ("run", "finetune", "prune", "quantize", "export", "report", "predict", "evaluate", "env")


def test_help_lists_commands_and_examples():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    # Every command, in the order a user meets them.
    listed = [
        line.split()[1] for line in result.stdout.splitlines() if len(line.split()) > 1 and line.split()[1] in COMMANDS
    ]
    assert listed == list(COMMANDS)
    for command in COMMANDS:
        sub = runner.invoke(app, [command, "--help"])
        assert sub.exit_code == 0, sub.output
        assert "Examples:" in sub.stdout and f"$ tinycompress {command}" in sub.stdout, command


def test_help_does_not_promise_defaults_a_parent_config_can_change():
    sub = runner.invoke(app, ["prune", "--help"])
    text = " ".join(sub.stdout.replace("│", " ").split())  # undo Rich's wrapping into boxes
    assert "(default: 2)" not in text and "measured latency table" in text
    assert "(default: from the config, 2 if unset)" in text


def test_help_is_instant_without_torch():
    # Heavy libraries load inside commands, so --help never imports torch.
    code = "import sys; from tinycompress.cli import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "tinycompress", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "finetune" in out.stdout


def test_unknown_task(tmp_path):
    assert_one_line_error(
        runner.invoke(app, ["finetune", "--task", "sst3", "--workdir", str(tmp_path)]), "unknown task 'sst3'", "sst2"
    )
    assert not any(tmp_path.iterdir())


def test_bad_flag_values_listed_together(tmp_path):
    result = runner.invoke(app, ["finetune", "--epochs", "0", "--lr", "-1", "--workdir", str(tmp_path)])
    assert_one_line_error(result, "finetune.epochs", "finetune.learning_rate")


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune: {epochs: 3\n")
    assert_one_line_error(runner.invoke(app, ["finetune", "--config", str(bad)]), "malformed YAML", "bad.yaml")


def test_malformed_tsv(tmp_path):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text("sentence\tlabel\ngood \t1\nbad \t5\n")
    (tmp_path / "sst2" / "validation.tsv").write_text("sentence\tlabel\ngood \t1\n")
    result = runner.invoke(app, ["finetune", "--data-dir", str(tmp_path), "--workdir", str(tmp_path / "ws")])
    assert_one_line_error(result, "train.tsv:3", "out of range")
    assert not (tmp_path / "ws").exists() or not any((tmp_path / "ws").rglob("*-v*"))


def test_missing_and_corrupt_checkpoint(tmp_path, tiny_finetuned):
    assert_one_line_error(runner.invoke(app, ["evaluate", str(tmp_path / "nothing")]), "not found")
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_finetuned.path, copy)
    (copy / "model.safetensors").write_bytes(b"garbage")
    assert_one_line_error(
        runner.invoke(app, ["evaluate", str(copy)]), "model.safetensors is corrupt", "tinycompress finetune"
    )


def test_debug_variable_shows_traceback(tmp_path):
    result = runner.invoke(app, ["evaluate", str(tmp_path / "nothing")], env={"TINYCOMPRESS_DEBUG": "1"})
    # The exception itself escapes (for its traceback) instead of becoming an `error:` line.
    assert result.exit_code != 0 and isinstance(result.exception, TinycompressError)
    assert "not found" in str(result.exception)
    assert "error:" not in result.stderr


def test_finetune_and_evaluate_through_the_cli(tiny_bert_dir, toy_glue, tmp_path):
    args = [
        "finetune",
        "--model",
        str(tiny_bert_dir),
        "--data-dir",
        str(toy_glue),
        "--workdir",
        str(tmp_path),
        "--epochs",
        "10",
        "--lr",
        "2e-3",
        "--batch-size",
        "16",
        "--max-length",
        "32",
        "--threads",
        "1",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout and (tmp_path / "sst2" / "finetune-v1" / "tinycompress.yaml").is_file()
    evaluated = runner.invoke(app, ["evaluate", str(tmp_path / "sst2" / "finetune-v1"), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)
    from tinycompress.checkpoint.store import read_checkpoint

    assert metrics["test/accuracy"] == pytest.approx(
        read_checkpoint(tmp_path / "sst2" / "finetune-v1").metrics["test/accuracy"]
    )


def test_evaluate_original_model_is_seeded(tiny_bert_dir, toy_glue):
    args = ["evaluate", str(tiny_bert_dir), "--task", "sst2", "--data-dir", str(toy_glue), "--json", "--seed", "3"]
    first, second = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout) == json.loads(second.stdout)
    # The seed picks the head: another seed is another model (its accuracy may still coincide
    # on 80 toy rows, so compare logits).
    assert torch.equal(original_logits(tiny_bert_dir, 3), original_logits(tiny_bert_dir, 3))
    assert not torch.allclose(original_logits(tiny_bert_dir, 3), original_logits(tiny_bert_dir, 4))


def original_logits(model_dir, seed: int) -> torch.Tensor:
    """Logits of the pretrained model with the fresh head `evaluate` gives it for ``seed``."""
    from tinycompress.data.batching import encode_rows
    from tinycompress.data.tasks import get_task
    from tinycompress.models.pretrained import load_pretrained_classifier

    model, tokenizer, _ = load_pretrained_classifier(str(model_dir), get_task("sst2"), seed)
    with torch.no_grad():
        return model.eval()(**encode_rows(tokenizer, ["the film was good", "a bad and dull plot"], 32)).logits


def test_env_reports_model_and_data(toy_glue):
    result = runner.invoke(app, ["env", "--json", "--data-dir", str(toy_glue)])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["versions"]["torch"] == torch.__version__
    assert "sst2" in report["data_dir"] and report["threads"] >= 1


@pytest.mark.parametrize(
    "args, needle",
    [(["prune", "--ratio", "abc"], "--ratio"), (["finetune", "--bogus"], "--bogus"), (["nosuch"], "nosuch")],
)
def test_usage_errors_from_the_console_script_are_one_line(args, needle):
    out = subprocess.run([sys.executable, "-m", "tinycompress", *args], capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
