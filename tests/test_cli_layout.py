"""The CLI layer stays light (no torch at import) and states the schema's defaults in --help."""

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tinycompress.cli.app as cli_app
from tinycompress.cli.app import app
from tinycompress.cli.options import config_flags, schema_field
from tinycompress.config import Config

runner = CliRunner()
COMMANDS = ("run", "finetune", "prune", "quantize", "export", "report", "predict", "evaluate", "env")
HEAVY = ("torch", "transformers", "numpy", "onnx", "onnxruntime")


def flat(text: str) -> str:
    """Help text without Rich's box borders and line wrapping."""
    return " ".join(text.replace("│", " ").split())


@pytest.mark.parametrize("module", ["tinycompress.config", "tinycompress.cli", "tinycompress.cli.app"])
def test_importing_the_cli_loads_no_heavy_library(module):
    code = f"import sys, {module}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert f" {command} " in flat(result.stdout), command


@pytest.mark.parametrize(
    "command, flag, key",
    [
        ("prune", "--speedup", "prune.speedup"),
        ("prune", "--importance-samples", "prune.importance_samples"),
        ("run", "--speedup", "prune.speedup"),
        ("finetune", "--lr,--learning-rate", "finetune.learning_rate"),
        ("finetune", "--epochs", "finetune.epochs"),
        ("quantize", "--calibration-samples", "quantize.calibration_samples"),
        ("quantize", "--mode", "quantize.mode"),
        ("export", "--opset", "export.opset"),
        ("report", "--runs", "report.bench_runs"),
        ("evaluate", "--seed", "seed"),
    ],
)
def test_help_states_the_schema_default(command, flag, key):
    default = Config().model_dump()
    for part in key.split("."):
        default = default[part]
    shown = f"{default:g}".replace("e-0", "e-") if isinstance(default, float) else str(default)
    description = schema_field(key).description
    text = flat(runner.invoke(app, [command, "--help"], env={"COLUMNS": "300"}).stdout)
    assert f"{flag} " in text
    assert f"{description} (default: from the config, {shown} if unset)." in text, (flag, text)


def test_speedup_default_is_the_schema_default_and_ratios_say_what_unset_means():
    text = flat(runner.invoke(app, ["prune", "--help"], env={"COLUMNS": "300"}).stdout)
    assert f"(default: from the config, {Config().prune.speedup:g} if unset)" in text
    assert "prunes by ratios instead of a target." in text and "None if unset" not in text


def test_every_schema_field_is_described():
    def fields(model, prefix=""):
        for name, field in model.model_fields.items():
            if hasattr(field.annotation, "model_fields"):
                yield from fields(field.annotation, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", field

    assert [key for key, field in fields(Config) if not field.description] == []


def test_flags_map_to_config_keys_declared_once():
    # One declaration per option: run and prune share --ratio and its key; flags not given
    # stay None (load_config skips them); options that are not settings are left out.
    def flags(command, **given):
        return config_flags(command, {name: None for name in inspect.signature(command).parameters} | given)

    run = flags(cli_app.run, ratio=0.3, workdir=Path("ws"), sweep=Path("s.csv"))
    assert run["prune.ratio"] == 0.3 and run["workdir"] == "ws" and run["report.bench"] is None
    assert not {"sweep", "out", "config", "as_json"} & set(run)
    assert flags(cli_app.prune, ratio=0.3)["prune.ratio"] == 0.3
    assert (
        flags(cli_app.quantize, embeddings=False, bench_runs=9).items()
        >= {"quantize.quantize_embeddings": False, "report.bench_runs": 9}.items()
    )
    assert flags(cli_app.report, bench_runs=7)["report.bench_runs"] == 7
