"""Quantize, export and predict (stages 3-4) on the tiny fine-tuned BERT: finetune -> prune -> quantize -> export."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, assert_one_line_error
from typer.testing import CliRunner

from tinycompress.checkpoint.format import MANIFEST_NAME
from tinycompress.checkpoint.hf import load_hf_model
from tinycompress.checkpoint.store import Checkpoint, read_checkpoint
from tinycompress.checkpoint.workspace import parent_base
from tinycompress.cli.app import app
from tinycompress.config import load_config
from tinycompress.models.structure import head_counts
from tinycompress.stages.export import export
from tinycompress.stages.prune import prune
from tinycompress.stages.quantize import quantize

runner = CliRunner()
FAST = {"report.bench_runs": 5, "threads": 1}
# BertTokenizer in transformers 5 saves tokenizer.json + tokenizer_config.json (no vocab.txt).
COMMON_FILES = {"config.json", "tokenizer.json", "tokenizer_config.json", "README.md", MANIFEST_NAME}
LONG_TEXT = "the film was very good and the plot was quite dull " * 60  # far beyond max_length 32
TEXTS = ["a great and lovely film", "", LONG_TEXT]


@dataclass
class Chain:
    """finetune-v1 -> prune-v1 -> quantize-v1 (torch), quantize-v2 (onnx); export-v1 (onnx), export-v2 (torchscript)."""

    finetune: Checkpoint
    prune: Checkpoint
    torch_int8: Checkpoint
    onnx_int8: Checkpoint
    onnx_export: Checkpoint
    torchscript_export: Checkpoint

    @property
    def workspace(self) -> Path:
        return self.finetune.path.parent.parent


def build_chain(finetune_dir: Path, root: Path) -> Chain:
    target = root / "ws" / "sst2" / "finetune-v1"
    shutil.copytree(finetune_dir, target)
    finetune = read_checkpoint(target)
    # 3 of 8 heads: the two layers must keep different head counts (the per-layer fusion case).
    pruned = prune(
        load_config(
            None,
            {
                **FAST,
                "prune.ratio": 0.375,
                "prune.ffn_ratio": 0.2,
                "prune.recover_epochs": 0,
                "prune.importance_samples": 32,
            },
            base=parent_base(finetune, "prune"),
        ),
        finetune,
    )

    def quantized(**overrides):
        return quantize(load_config(None, {**FAST, **overrides}, base=parent_base(pruned, "quantize")), pruned)

    def exported(parent, fmt):
        return export(load_config(None, {**FAST, "export.format": fmt}, base=parent_base(parent, "export")), parent)

    torch_int8, onnx_int8 = quantized(**{"quantize.backend": "torch"}), quantized()
    return Chain(finetune, pruned, torch_int8, onnx_int8, exported(pruned, "onnx"), exported(pruned, "torchscript"))


@pytest.fixture(scope="module")
def chain(tiny_finetuned, tmp_path_factory) -> Chain:
    """Shared, read-only: tests that write get a private copy (``own_chain``)."""
    return build_chain(tiny_finetuned.path, tmp_path_factory.mktemp("chain"))


@pytest.fixture
def own_chain(chain, tmp_path) -> Chain:
    """A private copy of the chain's workspace (manifests store parents relatively, so it stays valid)."""
    shutil.copytree(chain.workspace, tmp_path / "ws")
    task = tmp_path / "ws" / "sst2"
    names = ("finetune-v1", "prune-v1", "quantize-v1", "quantize-v2", "export-v1", "export-v2")
    return Chain(*(read_checkpoint(task / name) for name in names))


def files(checkpoint_or_folder) -> set[str]:
    folder = getattr(checkpoint_or_folder, "path", checkpoint_or_folder)
    return {p.name for p in Path(folder).iterdir()}


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def evaluate_cli(folder: Path) -> dict:
    result = runner.invoke(app, ["evaluate", str(folder), "--json", "--threads", "1"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def predict_cli(folder: Path, texts: list[str]) -> list[dict]:
    result = runner.invoke(app, ["predict", str(folder), *texts, "--json", "--threads", "1", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ------------------------------------------------------------------------------ quantize


def assert_common_manifest(checkpoint: Checkpoint, chain: Chain) -> None:
    metrics, details = checkpoint.metrics, checkpoint.details
    assert checkpoint.manifest["parent"]["path"] == "prune-v1"
    assert metrics["parent/test/accuracy"] == chain.prune.metrics["test/accuracy"]
    assert metrics["parameters"] == chain.prune.metrics["parameters"]
    assert 0.0 <= metrics["test/accuracy"] <= 1.0 and metrics["test_rows"] == 80
    assert (
        details["attention_heads"] == head_counts(load_hf_model(chain.prune)[0])
        and len(set(details["attention_heads"])) == 2
    )
    assert set(details["versions"]) == {"onnxruntime", "torch"}
    assert {"cpu", "cores", "threads", "vector_extensions"} <= set(details["machine"]) and details["machine"][
        "threads"
    ] == 1
    latency = details["latency"]
    assert latency["batch_1"]["runs"] == latency["batch_32"]["runs"] == 5
    assert (
        0 < latency["batch_1"]["median_ms"] <= latency["batch_1"]["p90_ms"] and latency["machine"] == details["machine"]
    )
    # Measured on the artifact: `tinycompress evaluate` on the folder gives the same number.
    assert evaluate_cli(checkpoint.path)["test/accuracy"] == metrics["test/accuracy"]


def test_onnx_dynamic_quantize_round_trip(chain):
    q = chain.onnx_int8
    assert q.name == "quantize-v2" and files(q) == COMMON_FILES | {"model.onnx"}
    assert_common_manifest(q, chain)
    details = q.details
    assert (details["backend"], details["mode"], details["per_channel"], details["calibration_rows"]) == (
        "onnx",
        "dynamic",
        False,
        0,
    )
    assert "tuning" not in details and q.manifest["config"]["quantize"]["tolerance"] is None  # no --tolerance
    # Fused per layer with each layer's own head count, and the fused weights are int8 too.
    assert details["attention_fusion"] and details["fused_attention_heads"] == details["attention_heads"]
    assert details["quantized_ops"]["Attention"] == 2 and details["quantized_ops"]["EmbedLayerNormalization"] == 1
    assert details["quantized_ops"]["MatMul"] > 0 and details["fused_ops"]["SkipLayerNormalization"] > 0
    fp32_onnx = (chain.onnx_export.path / "model.onnx").stat().st_size
    assert q.manifest["model_bytes"] == (q.path / "model.onnx").stat().st_size < fp32_onnx / 2


def test_torch_quantize_round_trip(chain):
    q = chain.torch_int8
    assert q.name == "quantize-v1"
    assert files(q) == COMMON_FILES | {"int8_weights.safetensors", "int8_recipe.json"}
    assert_common_manifest(q, chain)
    # 2 layers x (Q, K, V, out, FFN in, FFN out) + pooler + classifier; the word embedding.
    assert q.details["quantized_ops"] == {"Linear": 14, "Embedding": 1}
    # Tiny model: fp32 biases, LayerNorms and per-row scales weigh relatively more than in a real one.
    assert q.manifest["model_bytes"] < chain.prune.manifest["model_bytes"] * 0.6


def test_static_quantize_leaves_no_temp_files(own_chain, tmp_path, monkeypatch):
    # ORT's shape inference and calibration have written temp files into the working directory.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    settings = {**FAST, "quantize.mode": "static", "quantize.per_channel": True, "quantize.calibration_samples": 40}
    q = quantize(load_config(None, settings, base=parent_base(own_chain.prune, "quantize")), own_chain.prune.path)
    assert q.name == "quantize-v3" and files(q) == COMMON_FILES | {"model.onnx"}
    details = q.details
    assert (details["mode"], details["per_channel"], details["calibration_rows"]) == ("static", True, 40)
    assert details["quantized_ops"]["MatMul"] > 0 and details["quantized_ops"]["DequantizeLinear"] > 0
    # Calibrated int8 keeps the parent's accuracy (80 test rows: 0.05 is 4 rows).
    assert q.metrics["parent/test/accuracy"] == own_chain.prune.metrics["test/accuracy"]
    assert q.metrics["test/accuracy"] == pytest.approx(q.metrics["parent/test/accuracy"], abs=0.05)
    assert list(cwd.iterdir()) == []


def test_quantize_refuses_an_unsupported_model_family_before_any_work(own_chain, monkeypatch):
    import tinycompress.stages.quantize as quantize_module
    from tinycompress.errors import TinycompressError

    def load_unsupported(checkpoint):
        model, tokenizer = load_hf_model(checkpoint)
        model.config.model_type = "gpt2"
        return model, tokenizer

    monkeypatch.setattr(quantize_module, "load_hf_model", load_unsupported)
    before = listing(own_chain.workspace)
    with pytest.raises(TinycompressError, match="'gpt2' is not supported; supported: bert, distilbert"):
        quantize(load_config(None, FAST, base=parent_base(own_chain.prune, "quantize")), own_chain.prune)
    assert listing(own_chain.workspace) == before


def test_cli_quantizes_newest_prune_and_an_explicit_finetune(own_chain):
    workspace = own_chain.workspace
    common = ["--bench-runs", "5", "--threads", "1"]
    result = runner.invoke(app, ["quantize", "--workdir", str(workspace), "--task", "sst2", *common])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout and "quantize-v3" in result.stdout and "latency" in result.stdout
    assert read_checkpoint(workspace / "sst2" / "quantize-v3").manifest["parent"]["path"] == "prune-v1"
    # The unpruned model, for comparison, with the torch backend and no int8 embedding.
    result = runner.invoke(
        app, ["quantize", str(own_chain.finetune.path), "--backend", "torch", "--no-embeddings", *common]
    )
    assert result.exit_code == 0, result.output
    unpruned = read_checkpoint(workspace / "sst2" / "quantize-v4")
    assert unpruned.manifest["parent"]["stage"] == "finetune" and unpruned.details["quantized_ops"]["Embedding"] == 0
    assert unpruned.metrics["parameters"] > own_chain.prune.metrics["parameters"]


# ------------------------------------------------------------------------------ export


def assert_parity(checkpoint: Checkpoint, expected: dict[str, str]) -> None:
    """``expected``: file -> precision. Every batch passed, within the recorded tolerance."""
    recorded = checkpoint.details["files"]
    assert {f: info["precision"] for f, info in recorded.items()} == expected
    for info in recorded.values():
        assert info["passed"] and [r["name"] for r in info["results"]] == ["short", "max_length", "mixed"]
        assert all(r["max_abs_diff"] <= info["atol"] and r["label_agreement_pct"] == 100.0 for r in info["results"])
    assert checkpoint.metrics["parity_passed"] is True


def test_fp32_exports_match_pytorch(chain):
    onnx, script = chain.onnx_export, chain.torchscript_export
    assert files(onnx) == COMMON_FILES | {"model.onnx"}
    assert files(script) == COMMON_FILES | {"model.torchscript.pt"}
    assert_parity(onnx, {"model.onnx": "fp32"})
    assert_parity(script, {"model.torchscript.pt": "fp32"})
    assert onnx.details["files"]["model.onnx"]["atol"] == 1e-4
    shapes = onnx.details["parity_batches"]  # max_length batch at the limit; mixed one padded
    assert shapes["max_length"] == [4, 32] and shapes["short"][1] < shapes["mixed"][1] <= 32
    for checkpoint, prefix in ((onnx, "onnx"), (script, "torchscript")):
        assert (
            checkpoint.metrics[f"{prefix}/test/accuracy"]
            == checkpoint.metrics["test/accuracy"]
            == chain.prune.metrics["test/accuracy"]
        )
    assert set(onnx.details["latency"]) == {"batch_1", "batch_32", "machine"}
    # The tokenizer saved with the export truncates at the model's max length on its own.
    assert json.loads((onnx.path / "tokenizer_config.json").read_text())["model_max_length"] == 32


def test_cli_export_defaults_to_newest_quantize_and_copies_the_int8_graph(own_chain):
    workspace = own_chain.workspace
    result = runner.invoke(app, ["export", "--workdir", str(workspace), "--task", "sst2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "export-v3" in result.stdout and result.stdout.count("✓") == 3 and "✗" not in result.stdout
    written = read_checkpoint(workspace / "sst2" / "export-v3")
    assert written.manifest["parent"]["path"] == "quantize-v2" and files(written) == COMMON_FILES | {"model.onnx"}
    assert (written.path / "model.onnx").read_bytes() == (own_chain.onnx_int8.path / "model.onnx").read_bytes()
    assert_parity(written, {"model.onnx": "int8"})
    assert written.details["files"]["model.onnx"]["atol"] == 0.1  # export.int8_atol, against the fp32 parent
    assert written.metrics["test/accuracy"] == own_chain.onnx_int8.metrics["test/accuracy"]


def test_export_all_of_torch_int8(own_chain):
    config = load_config(None, {**FAST, "export.format": "all"}, base=parent_base(own_chain.torch_int8, "export"))
    written = export(config, own_chain.torch_int8)
    assert files(written) == COMMON_FILES | {"model.onnx", "model.torchscript.pt", "model_int8.torchscript.pt"}
    assert_parity(written, {"model.onnx": "fp32", "model.torchscript.pt": "fp32", "model_int8.torchscript.pt": "int8"})
    assert written.details["files"]["model_int8.torchscript.pt"]["reference"] == "PyTorch int8 quantize-v1"
    assert written.metrics["torchscript_int8/test/accuracy"] == own_chain.torch_int8.metrics["test/accuracy"]
    # The int8 TorchScript file is torch's dynamic int8: scored one row at a time, as its source is.
    from tinycompress.inference.predictor import torchscript_predictor

    for file, dependent in (("model_int8.torchscript.pt", True), ("model.torchscript.pt", False)):
        assert torchscript_predictor(written.path, file).batch_dependent is dependent


def test_cli_export_to_output_folder(own_chain, tmp_path):
    workspace, target = own_chain.workspace, tmp_path / "deploy" / "sst2-fp32"
    before = listing(workspace)
    result = runner.invoke(
        app, ["export", str(own_chain.prune.path), "--format", "onnx", "--output", str(target), "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    written = read_checkpoint(target)
    assert files(written) == COMMON_FILES | {"model.onnx"} and written.version == 1
    assert written.parent().path == own_chain.prune.path.resolve()
    assert listing(workspace) == before and [p.name for p in target.parent.iterdir()] == ["sst2-fp32"]


@pytest.mark.parametrize(
    ("folder", "dependent"),
    [
        ("onnx_int8", True),
        ("torch_int8", True),
        ("prune", False),
        ("onnx_export", False),
        ("torchscript_export", False),
    ],
)
def test_dynamic_int8_is_scored_one_row_at_a_time(chain, folder, dependent, monkeypatch):
    import numpy as np

    import tinycompress.training.evaluation as evaluation
    from tinycompress.config import config_from_dict
    from tinycompress.data.batching import encode, padding_id
    from tinycompress.data.glue import load_config_data
    from tinycompress.data.tasks import get_task
    from tinycompress.inference.predictor import load_predictor

    checkpoint = getattr(chain, folder)
    predictor = load_predictor(checkpoint.path, threads=1)
    assert predictor.batch_dependent is dependent
    config, spec = config_from_dict(checkpoint.manifest["config"]), get_task("sst2")
    data = load_config_data(config, spec)
    encoded = encode(predictor.tokenizer, data.test, predictor.max_length)

    def logits(batch_size):
        pad = padding_id(predictor.tokenizer)
        return evaluation.predict_logits(None, encoded, batch_size=batch_size, pad_id=pad, forward=predictor.forward)

    # Dynamic int8 scales activations by the batch's range: batched, a row gets other logits
    # than alone. That is why its metrics run rows one at a time; fp32 is the same either way.
    assert np.allclose(logits(1), logits(64), rtol=0, atol=1e-5) is not dependent
    sizes = []
    real = evaluation.predict_logits
    monkeypatch.setattr(evaluation, "predict_logits", lambda *a, **k: sizes.append(k["batch_size"]) or real(*a, **k))
    metrics = evaluation.evaluate_predictor(predictor, config, spec, data)
    assert sizes == [1 if dependent else config.finetune.eval_batch_size]
    assert metrics["test/accuracy"] == checkpoint.metrics["test/accuracy"]  # the stage measured it so too


# ------------------------------------------------------------------------------ predict


@pytest.mark.parametrize("folder", ["prune", "onnx_int8", "torch_int8", "onnx_export", "torchscript_export"])
def test_predict_any_folder(chain, folder):
    predictions = predict_cli(getattr(chain, folder).path, TEXTS)
    assert [p["text"] for p in predictions] == TEXTS
    for prediction in predictions:
        assert prediction["label"] in ("negative", "positive") and 0.5 <= prediction["probability"] <= 1.0
        assert sum(prediction["probabilities"].values()) == pytest.approx(1.0)
    reference = predict_cli(chain.prune.path, TEXTS)
    atol = 1e-4 if folder in ("prune", "onnx_export", "torchscript_export") else 0.05
    for got, want in zip(predictions, reference):
        assert got["probabilities"]["positive"] == pytest.approx(want["probabilities"]["positive"], abs=atol)


def test_predict_text_file_and_plain_output(chain, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a great film\nbad and dull\n", encoding="utf-8")
    result = runner.invoke(app, ["predict", str(chain.onnx_export.path), "--file", str(texts), "--threads", "1"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].endswith("a great film") and lines[0].split()[0] in ("negative", "positive")


def test_example_script_runs_without_tinycompress(chain, tmp_path):
    script = REPO / "examples" / "onnx_inference.py"
    check = (
        "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
        "assert not [m for m in sys.modules if m.split('.')[0] == 'tinycompress'], 'imported tinycompress'"
    )
    out = subprocess.run(
        [sys.executable, "-c", check, str(script), str(chain.onnx_export.path), "--json", *TEXTS],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    example = json.loads(out.stdout)
    for got, want in zip(example, predict_cli(chain.onnx_export.path, TEXTS), strict=True):
        assert got["label"] == want["label"] and got["probability"] == pytest.approx(want["probability"], abs=1e-5)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "args, needles",
    [
        (["quantize", "{ws}/sst2/prune-v9"], ["not found"]),
        (["export", "{ws}/sst2/prune-v9"], ["not found"]),
        (["predict", "{ws}/sst2/prune-v9", "good"], ["not found"]),
        (["export", "{ws}/sst2/prune-v1", "--format", "zip"], ["export.format"]),
        (["quantize", "{ws}/sst2/prune-v1", "--backend", "tflite"], ["quantize.backend"]),
        (["quantize", "{ws}/sst2/prune-v1", "--mode", "static", "--backend", "torch"], ["static"]),
        (["quantize", "{ws}/sst2/quantize-v2"], ["is a quantize checkpoint", "already quantized"]),
        (["quantize", "{ws}/sst2/export-v1"], ["is an export checkpoint"]),
        (["export", "{ws}/sst2/prune-v1", "--output", "{existing}"], ["already exists"]),
        (["predict", "{ws}/sst2/export-v1"], ["no texts"]),
        (["predict", "{ws}/sst2/export-v1", "good", "--batch-size", "0"], ["--batch-size"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(chain, tmp_path, args, needles):
    existing = tmp_path / "existing"
    existing.mkdir()
    workspace = chain.workspace
    before = listing(workspace)
    args = [a.format(ws=workspace, existing=existing) for a in args]
    assert_one_line_error(runner.invoke(app, [*args, "--threads", "1"]), *needles)
    assert listing(workspace) == before and listing(tmp_path) == ["existing"]


# ------------------------------------------------------------------------------ benchmark script


def test_latency_benchmark_on_the_tiny_chain(chain, capsys):
    spec = importlib.util.spec_from_file_location("latency_benchmark", REPO / "benchmarks" / "latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = [
        "--finetuned",
        str(chain.finetune.path),
        "--pruned",
        str(chain.prune.path),
        "--pruned-int8",
        str(chain.onnx_int8.path),
        "--threads",
        "1",
        "--runs",
        "5",
        "--warmup",
        "1",
        "--json",
    ]
    assert module.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    variants = [r["variant"].split() for r in report["results"]]
    assert [v[0] for v in variants] == ["fine-tuned", "pruned", "pruned", "pruned", "unpruned", "pruned"]
    assert report["results"][0]["batch_1"]["speedup"] == report["results"][0]["batch_32"]["speedup"] == 1.0
    assert all(r["batch_32"]["runs"] == 5 and r["batch_32"]["median_ms"] > 0 for r in report["results"])
    assert report["machine"]["threads"] == 1
