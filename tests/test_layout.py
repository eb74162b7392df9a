"""The stage table, and checkpoints written before the package layout changed.

``fixtures/format_v1`` was written by tinycompress at commit ee04044 (the flat layout, checkpoint
format 1) with ``fixtures/format_v1/make_fixture.py``: a tiny random BERT fine-tuned on the toy
SST-2 of conftest, pruned, int8-quantized (ONNX Runtime) and exported, plus what that code's
``predict`` returned for four sentences on each folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import write_toy_sst2

from tinycompress.checkpoint.store import read_checkpoint
from tinycompress.checkpoint.workspace import resolve_input, stage_fingerprint
from tinycompress.config import Config
from tinycompress.stage_graph import BASELINE_FINGERPRINT, STAGE_ORDER, STAGES, producing_command

FIXTURE = Path(__file__).parent / "fixtures" / "format_v1"
CHAIN = ("finetune-v1", "prune-v1", "quantize-v1", "export-v1")


# ------------------------------------------------------------------------------ the STAGES table


def test_stage_order_and_default_parents():
    assert STAGE_ORDER == ("finetune", "prune", "quantize", "export")
    assert {name: spec.default_parents for name, spec in STAGES.items()} == {
        "finetune": (),
        "prune": ("finetune",),
        "quantize": ("prune",),
        "export": ("quantize", "prune", "finetune"),
    }
    assert {name: spec.parents for name, spec in STAGES.items()} == {
        "finetune": (),
        "prune": ("finetune", "prune"),
        "quantize": ("finetune", "prune"),
        "export": ("finetune", "prune", "quantize"),
    }
    for spec in STAGES.values():
        assert set(spec.default_parents) <= set(spec.parents)


def test_fingerprints_name_existing_config_keys_and_grow_along_the_chain():
    base = ("task", "seed", "model", "data", "finetune")
    assert STAGES["finetune"].fingerprint == base
    assert STAGES["prune"].fingerprint == base + ("prune",)
    assert STAGES["quantize"].fingerprint == base + ("prune", "quantize", "export.opset")
    assert STAGES["export"].fingerprint == base + ("prune", "quantize", "export")
    assert base + ("quantize", "export.opset") == BASELINE_FINGERPRINT  # a new --ratio keeps the baselines
    defaults = Config().to_dict()
    for spec in STAGES.values():
        for key in spec.fingerprint:
            node = defaults
            for part in key.split("."):
                assert part in node, f"{spec.name}: {key}"
                node = node[part]
    # A changed prune ratio changes prune's fingerprint, not finetune's.
    changed = Config().model_copy(update={"prune": Config().prune.model_copy(update={"ratio": 0.25})})
    assert stage_fingerprint("finetune", changed) == stage_fingerprint("finetune", Config())
    assert stage_fingerprint("prune", changed) != stage_fingerprint("prune", Config())


def test_labels_commands_and_functions():
    assert [STAGES[s].label for s in STAGE_ORDER] == ["fine-tuned", "pruned", "pruned + quantized", "exported"]
    assert producing_command("prune", "sst2") == "tinycompress prune --task sst2 --speedup 2"
    assert producing_command("finetune", None) == "tinycompress finetune"
    for spec in STAGES.values():
        function = spec.load_function()
        assert callable(function) and function.__name__ == spec.name
        assert function.__module__ == f"tinycompress.stages.{spec.name}"


def test_resolve_input_follows_the_default_parents(tmp_path):
    workdir = tmp_path / "ws"
    shutil.copytree(FIXTURE / "sst2", workdir / "sst2")
    assert resolve_input(None, workdir=workdir, task="sst2", stage="prune").name == "finetune-v1"
    assert resolve_input(None, workdir=workdir, task="sst2", stage="quantize").name == "prune-v1"
    assert resolve_input(None, workdir=workdir, task="sst2", stage="export").name == "quantize-v1"
    shutil.rmtree(workdir / "sst2" / "quantize-v1")
    assert resolve_input(None, workdir=workdir, task="sst2", stage="export").name == "prune-v1"


# ------------------------------------------------------------------------------ format 1 folders


@pytest.fixture()
def old_workspace(tmp_path) -> tuple[Path, Path]:
    workdir = tmp_path / "ws"
    shutil.copytree(FIXTURE / "sst2", workdir / "sst2")
    return workdir, write_toy_sst2(tmp_path / "glue")


def test_old_checkpoints_verify_and_predict_what_the_old_code_predicted(old_workspace):
    from tinycompress.stages.predict import predict

    workdir, _ = old_workspace
    expected = json.loads((FIXTURE / "expected_predictions.json").read_text())
    for name in CHAIN:
        checkpoint = read_checkpoint(workdir / "sst2" / name)
        assert checkpoint.manifest["format_version"] == 1
        got = predict(checkpoint.path, expected["texts"], threads=1)
        for new, old in zip(got, expected["predictions"][name], strict=True):
            assert new["label"] == old["label"]
            for label, probability in old["probabilities"].items():
                assert new["probabilities"][label] == pytest.approx(probability, abs=1e-6), (name, new["text"])


def test_old_checkpoints_evaluate_to_their_recorded_metrics(old_workspace):
    from tinycompress.stages.evaluate import evaluate_target

    workdir, glue = old_workspace
    for name in CHAIN:
        checkpoint = read_checkpoint(workdir / "sst2" / name)
        metrics = evaluate_target(str(checkpoint.path), overrides={"data.data_dir": str(glue), "threads": 1})
        assert metrics["test/accuracy"] == checkpoint.metrics["test/accuracy"]


def test_old_chain_reports_and_takes_a_new_stage(old_workspace):
    from tinycompress.checkpoint.workspace import parent_base
    from tinycompress.config import load_config
    from tinycompress.stages.quantize import quantize
    from tinycompress.stages.report import run_report

    workdir, glue = old_workspace
    report, written = run_report(
        workdir / "sst2" / "export-v1", overrides={"report.bench": False}, out_dir=workdir / "report"
    )
    assert [(row.label, row.status, row.checkpoint, row.metrics["accuracy"]) for row in report.rows] == [
        ("original", "ok", None, 0.5),
        ("fine-tuned", "ok", "finetune-v1", 1.0),
        ("pruned", "ok", "prune-v1", 1.0),
        ("pruned + quantized", "ok", "quantize-v1", 1.0),  # export-v1/model.onnx is the same file: one row
    ]
    assert report.row("quantize").same_file_as == ["export-v1/model.onnx"]
    assert sorted(p.name for p in written.iterdir()) == [
        "accuracy_vs_size.png",
        "report.csv",
        "report.json",
        "report.md",
    ]
    # The new code quantizes an old prune checkpoint; the parent link verifies.
    parent = read_checkpoint(workdir / "sst2" / "prune-v1")
    overrides = {"data.data_dir": str(glue), "quantize.backend": "torch", "report.bench_runs": 5, "threads": 1}
    written_now = quantize(load_config(None, overrides, base=parent_base(parent, "quantize")), parent)
    assert written_now.name == "quantize-v2" and written_now.parent().path == parent.path
    assert written_now.metrics["test/accuracy"] == parent.metrics["test/accuracy"]


# ------------------------------------------------------------------------------ the import rules
# The one-way layering and the independence of the stages are import-linter contracts
# (pyproject.toml, `lint-imports` in .ci/run); these two rules are not expressible there.

PACKAGE = Path(__file__).resolve().parents[1] / "tinycompress"


def test_no_import_cycles_between_modules():
    import grimp

    graph = grimp.build_graph("tinycompress")  # every import, including those inside functions
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if not imported.startswith("tinycompress.") or imported.endswith("__init__"):
                continue
            if state.get(imported) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(imported) :] + [imported]))
            if imported not in state:
                visit(imported)
        path.pop()
        state[module] = 2

    for module in sorted(graph.modules):
        if module not in state:
            visit(module)


def test_no_module_imports_another_modules_private_names():
    import ast

    offenders = []
    for file in sorted([*PACKAGE.rglob("*.py"), *PACKAGE.parent.joinpath("tests").glob("*.py")]):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("tinycompress"):
                continue
            offenders += [f"{file.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            if any(part.startswith("_") for part in node.module.split(".")):
                offenders.append(f"{file.name}: {node.module}")
    assert offenders == []


def test_a_checkpoint_written_before_a_config_field_existed_is_still_reused(old_workspace):
    from tinycompress.checkpoint.workspace import find_reusable

    workdir, _ = old_workspace
    quantized = read_checkpoint(workdir / "sst2" / "quantize-v1")
    assert "tolerance" not in quantized.manifest["config"]["quantize"]  # the field came later
    config = quantized.config.model_copy(update={"workdir": str(workdir)})
    assert config.quantize.tolerance is None
    assert find_reusable("quantize", config, quantized.parent()).path == quantized.path
