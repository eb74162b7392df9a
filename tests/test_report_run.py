"""`tinycompress report` and `tinycompress run` (tinycompress.report, tinycompress.stages.pipeline) on tiny models."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import assert_one_line_error
from typer.testing import CliRunner

from tinycompress.checkpoint.store import read_checkpoint
from tinycompress.checkpoint.workspace import parent_base, resolve_input
from tinycompress.cli.app import app
from tinycompress.config import load_config
from tinycompress.errors import TinycompressError
from tinycompress.report.gather import build_report
from tinycompress.report.render import report_files, write_report
from tinycompress.stages.export import export
from tinycompress.stages.prune import prune
from tinycompress.stages.quantize import quantize

runner = CliRunner()
FAST = {"prune.importance_samples": 64, "prune.recover_epochs": 0, "report.bench_runs": 5, "threads": 1}
REPORT_FILES = {"report.md", "report.json", "report.csv", "accuracy_vs_size.png"}
CHAIN_LABELS = [
    "original",
    "fine-tuned",
    "pruned",
    "pruned + quantized",  # its export's model.onnx is the same file: shown once, as this row
    "exported (TorchScript fp32)",
]
ROW_KEYS = {
    "key",
    "label",
    "status",
    "checkpoint",
    "path",
    "artifact",
    "command",
    "runtime",
    "size_bytes",
    "size_mb",
    "metrics",
    "metrics_from",
    "parameters",
    "heads_kept",
    "heads_total",
    "ffn_kept",
    "ffn_total",
    "latency_ms",
    "latency_spread",
    "latency_source",
    "latency_machine",
    "compression",
    "speedup",
    "speedup_differs",
    "test_rows",
    "same_file_as",
    "notes",
}
REPORT_KEYS = {
    "schema",
    "task",
    "workspace",
    "created",
    "test_split",
    "metrics",
    "primary_metric",
    "chain",
    "rows",
    "latency",
    "stage_seconds",
    "stage_timing",
    "sweep",
    "footnotes",
    "tuning",  # quantize --tolerance records, by checkpoint (issue #12)
    "files",
}


def _copy_finetune(tiny_finetuned, workdir: Path):
    target = workdir / "sst2" / "finetune-v1"
    shutil.copytree(tiny_finetuned.path, target)
    return read_checkpoint(target)


@pytest.fixture(scope="module")
def chain(tiny_finetuned, tmp_path_factory):
    """finetune-v1 → prune-v1 → quantize-v1 (ONNX int8) → export-v1 (ONNX + TorchScript), made through the Python API."""
    workdir = tmp_path_factory.mktemp("chain")
    finetuned = _copy_finetune(tiny_finetuned, workdir)
    config = load_config(
        None, {**FAST, "prune.ratio": 0.5, "prune.ffn_ratio": 0.25}, base=parent_base(finetuned, "prune")
    )
    pruned = prune(config, finetuned)
    quantized = quantize(config, pruned)
    exported = export(
        config.model_copy(update={"export": config.export.model_copy(update={"format": "all"})}), quantized
    )
    return {"workdir": workdir, "finetune": finetuned, "prune": pruned, "quantize": quantized, "export": exported}


# ------------------------------------------------------------------------------ report: rows and values


def test_rows_are_the_chain_in_order_with_manifest_values(chain):
    report = build_report(workdir=chain["workdir"], task="sst2")
    finetuned, pruned, quantized, exported = (chain[s] for s in ("finetune", "prune", "quantize", "export"))

    assert [r.label for r in report.rows] == CHAIN_LABELS
    assert [r.checkpoint for r in report.rows] == [
        None,
        "finetune-v1",
        "prune-v1",
        "quantize-v1",
        "export-v1",
    ]
    assert report.chain == ["finetune-v1", "prune-v1", "quantize-v1", "export-v1"]
    assert all(r.status == "ok" for r in report.rows)
    original, fine, pr, qz, ts = report.rows

    assert original.metrics == {"accuracy": finetuned.metrics["original/test/accuracy"]}
    assert fine.metrics == {"accuracy": finetuned.metrics["test/accuracy"]}
    assert pr.metrics == {"accuracy": pruned.metrics["test/accuracy"]}
    assert qz.metrics == {"accuracy": quantized.metrics["test/accuracy"]}
    # The export's model.onnx is the quantized file copied (same sha256): one row, which says so.
    assert exported.manifest["files"]["model.onnx"] == quantized.manifest["files"]["model.onnx"]
    assert qz.same_file_as == ["export-v1/model.onnx"] and any("export-v1/model.onnx" in n for n in qz.notes)
    assert ts.metrics == {"accuracy": exported.metrics["torchscript/test/accuracy"]}

    # Size: model_bytes; the original has the fine-tuned architecture (same size, footnoted).
    assert original.size_bytes == fine.size_bytes == finetuned.manifest["model_bytes"]
    assert pr.size_bytes == pruned.manifest["model_bytes"] and qz.size_bytes == quantized.manifest["model_bytes"]
    assert ts.size_bytes == (exported.path / "model.torchscript.pt").stat().st_size
    assert any("original" in note and "fine-tuned model's fp32" in note for note in report.footnotes)

    assert [r.parameters for r in report.rows] == [finetuned.metrics["parameters"]] * 2 + [
        pruned.metrics["parameters"]
    ] * 3
    # Tiny BERT: 2 layers x 4 heads, FFN 37 per layer; prune 50 % of heads and 25 % of neurons.
    assert [(r.heads_kept, r.heads_total) for r in report.rows] == [(8, 8)] * 2 + [(pruned.metrics["heads"], 8)] * 3
    assert [(r.ffn_kept, r.ffn_total) for r in report.rows] == [(74, 74)] * 2 + [
        (pruned.metrics["ffn_neurons"], 74)
    ] * 3
    assert pruned.metrics["heads"] == 4 and pruned.metrics["ffn_neurons"] < 74

    # Latency from the manifests: only the quantize and ONNX export stages record one.
    assert report.latency["source"] == "manifests"
    assert qz.latency_ms == {k: quantized.details["latency"][k]["median_ms"] for k in ("batch_1", "batch_32")}
    assert qz.latency_spread == {
        k: {s: quantized.details["latency"][k][s] for s in ("q1_ms", "q3_ms", "min_ms", "max_ms", "runs")}
        for k in ("batch_1", "batch_32")
    }
    assert qz.latency_machine == quantized.details["latency"]["machine"]
    assert fine.latency_ms == {"batch_1": None, "batch_32": None} and ts.latency_source is None
    # No fine-tuned latency: no speed-up; compression is sizes only.
    assert all(r.speedup == {"batch_1": None, "batch_32": None} for r in report.rows)
    for row in report.rows:
        assert row.compression == pytest.approx(fine.size_bytes / row.size_bytes)
    assert report.stage_seconds["finetune"] == finetuned.metrics["train_seconds"]
    assert report.stage_seconds["quantize"] == quantized.metrics["quantize_seconds"]
    assert report.stage_seconds["export"] == exported.metrics["export_seconds"]
    assert report.stage_timing["export-v1"]["source"] == "manifest: metrics.export_seconds"
    assert any("GLUE validation set (GLUE test labels are hidden)" in note for note in report.footnotes)
    # The task folder or the export folder as target: the same chain.
    assert build_report(chain["workdir"] / "sst2").chain == build_report(exported.path).chain == report.chain


def test_bench_measures_every_row_with_the_same_inputs(chain):
    report = build_report(
        workdir=chain["workdir"], task="sst2", bench=True, bench_runs=5, threads=1, log=lambda _: None
    )
    assert (
        report.latency["source"] == "bench"
        and report.latency["machine"]["threads"] == 1
        and report.latency["runs"] == 5
    )
    fine = report.row("finetune")
    for row in report.rows:
        assert row.latency_source == "bench" and all(row.latency_ms[k] > 0 for k in ("batch_1", "batch_32")), row
        for key in ("batch_1", "batch_32"):
            assert row.speedup[key] == pytest.approx(fine.latency_ms[key] / row.latency_ms[key])
    assert report.row("original").latency_ms == fine.latency_ms
    assert any("measured now on" in note and "threads: 1" in note for note in report.footnotes)


def test_missing_stages_are_rows_with_their_command(chain, tiny_finetuned, tmp_path):
    # An explicit checkpoint ends the chain there; later stages exist elsewhere in the workspace.
    report = build_report(chain["prune"].path)
    assert [(r.label, r.status) for r in report.rows] == [
        ("original", "ok"),
        ("fine-tuned", "ok"),
        ("pruned", "ok"),
        ("pruned + quantized", "not run"),
        ("exported", "not run"),
    ]
    assert report.row("quantize").command == "tinycompress quantize --task sst2"
    assert report.row("export").command == "tinycompress export --task sst2"
    assert "quantize-v1" in report.row("quantize").notes[0]

    # Only a fine-tune: prune, quantize and export are "not run", the table says how to make them.
    _copy_finetune(tiny_finetuned, tmp_path)
    result = runner.invoke(app, ["report", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "pruned: not run — `tinycompress prune --task sst2 --speedup 2` makes it." in result.stdout
    data = json.loads((tmp_path / "sst2" / "report" / "report.json").read_text())
    assert [r["status"] for r in data["rows"]] == ["ok", "ok", "not run", "not run", "not run"]
    assert data["rows"][2]["command"] == "tinycompress prune --task sst2 --speedup 2"


def test_baselines_are_the_newest_unpruned_int8_of_each_backend(chain, tmp_path):
    """Quantize checkpoints made straight from the chain's fine-tune are "int8 only" rows after the chain."""
    import os

    workdir = tmp_path / "ws"
    shutil.copytree(chain["workdir"], workdir)
    finetuned, pruned = (
        read_checkpoint(workdir / "sst2" / "finetune-v1"),
        read_checkpoint(workdir / "sst2" / "prune-v1"),
    )
    config = load_config(None, FAST, base=parent_base(finetuned, "quantize"))
    old_onnx = quantize(config, finetuned)  # quantize-v2
    torch_int8 = quantize(
        config.model_copy(update={"quantize": config.quantize.model_copy(update={"backend": "torch"})}), finetuned
    )  # v3
    new_onnx = quantize(config, finetuned)  # quantize-v4
    not_a_baseline = quantize(
        load_config(None, FAST, base=parent_base(pruned, "quantize")), pruned
    )  # v5: made from the prune
    assert [c.name for c in (old_onnx, torch_int8, new_onnx, not_a_baseline)] == [
        "quantize-v2",
        "quantize-v3",
        "quantize-v4",
        "quantize-v5",
    ]

    report = build_report(workdir / "sst2" / "export-v1")
    assert [r.label for r in report.rows] == CHAIN_LABELS + [
        "int8 only, unpruned (ONNX Runtime)",
        "int8 only, unpruned (torch)",
    ]
    onnx_row, torch_row = report.rows[-2:]
    assert (torch_row.key, torch_row.checkpoint, torch_row.runtime) == ("baseline", "quantize-v3", "torch int8")
    assert (onnx_row.checkpoint, onnx_row.runtime) == ("quantize-v4", "onnx int8")
    assert (
        onnx_row.metrics == {"accuracy": new_onnx.metrics["test/accuracy"]}
        and onnx_row.size_bytes == new_onnx.model_bytes
    )
    fine = report.row("finetune")
    for row in (torch_row, onnx_row):  # the unpruned architecture, compared with the fine-tuned model
        assert (row.heads_kept, row.heads_total, row.ffn_kept, row.ffn_total) == (8, 8, 74, 74)
        assert row.parameters == fine.parameters and row.compression == pytest.approx(fine.size_bytes / row.size_bytes)
    assert (
        report.stage_timing["quantize-v4"]["stage"] == "baseline"
        and report.stage_seconds["quantize"] == report.stage_timing["quantize-v1"]["seconds"]
    )
    assert any("int8 only, unpruned" in note and "quantize-v4, quantize-v3" in note for note in report.footnotes)
    assert report.chain == ["finetune-v1", "prune-v1", "quantize-v1", "export-v1"]

    # Other settings are another kind of baseline, named by what differs from the plain recipe.
    per_channel = quantize(
        config.model_copy(update={"quantize": config.quantize.model_copy(update={"per_channel": True})}), finetuned
    )
    labels = {r.label: r.checkpoint for r in build_report(workdir / "sst2" / "export-v1").rows if r.key == "baseline"}
    assert labels == {
        "int8 only, unpruned (ONNX Runtime)": "quantize-v4",
        "int8 only, unpruned (ONNX Runtime, per-channel)": per_channel.name,
        "int8 only, unpruned (torch)": "quantize-v3",
    }
    # --no-baselines (or report.baselines: false) leaves them out.
    result = runner.invoke(
        app, ["report", str(workdir / "sst2" / "export-v1"), "--no-baselines", "--json", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert [r["label"] for r in json.loads(result.stdout)["rows"]] == CHAIN_LABELS

    # A baseline whose files no longer match its manifest is passed over for the older one.
    shutil.rmtree(per_channel.path)
    weights = next(p for p in new_onnx.path.iterdir() if p.name.endswith(".onnx"))
    os.chmod(weights, 0o644)
    weights.write_bytes(weights.read_bytes() + b"x")
    assert [r.checkpoint for r in build_report(workdir / "sst2" / "export-v1").rows if r.key == "baseline"] == [
        "quantize-v2",
        "quantize-v3",
    ]


# ------------------------------------------------------------------------------ report: files and JSON


def test_json_schema_through_the_cli(chain, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["report", "--workdir", str(chain["workdir"]), "--task", "sst2", "--json", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stdout holds only the JSON
    assert set(data) == REPORT_KEYS | {"out_dir"}
    assert (
        data["schema"] == 1
        and data["task"] == "sst2"
        and data["metrics"] == ["accuracy"]
        and data["primary_metric"] == "accuracy"
    )
    assert "GLUE validation" in data["test_split"]
    assert [r["label"] for r in data["rows"]] == CHAIN_LABELS
    for row in data["rows"]:
        assert set(row) == ROW_KEYS
        assert set(row["latency_ms"]) == set(row["speedup"]) == {"batch_1", "batch_32"}
    assert set(data["stage_seconds"]) == {"finetune", "prune", "quantize", "export"}
    assert set(data["latency"]) >= {"source"} and data["sweep"] is None
    assert json.loads((out / "report.json").read_text())["rows"] == data["rows"]
    assert "wrote" in result.stderr


def test_files_written_and_replaced(chain, tmp_path):
    sweep_dir = tmp_path / "ws"
    shutil.copytree(chain["workdir"], sweep_dir)
    report = build_report(workdir=sweep_dir, task="sst2")
    out = write_report(report)
    assert out == sweep_dir / "sst2" / "report"
    assert {p.name for p in out.iterdir()} == REPORT_FILES == set(report_files(report))
    png = (out / "accuracy_vs_size.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    with open(out / "report.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["label"] for r in rows] == CHAIN_LABELS and rows[1]["test_accuracy"] == str(
        chain["finetune"].metrics["test/accuracy"]
    )
    markdown = (out / "report.md").read_text()
    assert "GLUE validation set (GLUE test labels are hidden)" in markdown and "| pruned + quantized |" in markdown

    # A sweep CSV under runs/<task>/sweeps/ is found and plotted; the folder is replaced whole.
    (out / "stray.txt").write_text("old")
    sweeps = sweep_dir / "sst2" / "sweeps" / "prune"
    sweeps.mkdir(parents=True)
    (sweeps / "prune_sweep.csv").write_text(
        "criterion,head_ratio,recovered,recovery_train_rows,heads,test_accuracy,parameters,flops_seq128,seconds\n"
        "unpruned,0.0,False,0,8,0.9,100,1,0\ntaylor,0.25,False,0,6,0.85,90,1,0\ntaylor,0.5,False,0,4,0.8,80,1,0\n"
        "taylor,0.5,True,64,4,0.88,80,1,0\n"
    )
    report = build_report(workdir=sweep_dir, task="sst2")
    assert report.sweep["rows"] == 4 and report.sweep["criteria"] == ["taylor", "unpruned"]
    write_report(report)
    assert {p.name for p in out.iterdir()} == REPORT_FILES | {"prune_sweep.png"}
    assert (out / "prune_sweep.png").stat().st_size > 1000
    assert not any(p.name.startswith((".tmp-", ".old-")) for p in out.parent.iterdir())

    # A folder that is not an earlier report is never deleted.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(TinycompressError, match="not a tinycompress report folder"):
        write_report(report, foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_failed_replace_restores_the_earlier_report(chain, tmp_path, monkeypatch):
    """B8: when the new report cannot be renamed into place, the old one is put back."""
    import os

    workdir = tmp_path / "ws"
    shutil.copytree(chain["workdir"], workdir)
    report = build_report(workdir=workdir, task="sst2")
    out = write_report(report)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_rename, failed = os.rename, []

    def rename_failing_once(src, dst):
        if Path(src).name.startswith(".tmp-") and not failed:
            failed.append(src)
            raise OSError("simulated failure")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_failing_once)
    with pytest.raises(OSError, match="simulated failure"):
        write_report(report)
    assert failed and {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not any(p.name.startswith((".tmp-", ".old-")) for p in out.parent.iterdir())
    write_report(report)  # and the next attempt replaces it as usual
    assert {p.name for p in out.iterdir()} == set(before)


def test_report_errors_are_one_line(tmp_path, chain):
    assert_one_line_error(
        runner.invoke(app, ["report", "--workdir", str(tmp_path / "empty")]), "no checkpoints in workspace"
    )
    assert_one_line_error(
        runner.invoke(app, ["report", "--workdir", str(chain["workdir"]), "--task", "sst3"]), "unknown task 'sst3'"
    )
    assert_one_line_error(
        runner.invoke(app, ["report", "--workdir", str(chain["workdir"]), "--task", "rte"]),
        "no checkpoints for task rte",
    )
    assert_one_line_error(runner.invoke(app, ["report", str(tmp_path / "nowhere")]), "not found")
    assert_one_line_error(
        runner.invoke(app, ["report", "--workdir", str(chain["workdir"]), "--sweep", str(tmp_path / "x.csv")]),
        "sweep CSV not found",
    )


# ------------------------------------------------------------------------------ run


def _run_args(tiny_bert_dir, toy_glue, workdir, config_file, *extra):
    return [
        "run",
        "--model",
        str(tiny_bert_dir),
        "--data-dir",
        str(toy_glue),
        "--workdir",
        str(workdir),
        "--config",
        str(config_file),
        "--threads",
        "1",
        *extra,
    ]


def _folders(workdir: Path) -> set[str]:
    return {p.name for p in (workdir / "sst2").iterdir() if not p.name.startswith(".")}


def test_run_end_to_end_resumes_and_reruns_from_the_changed_stage(tiny_bert_dir, toy_glue, tmp_path):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "task": "sst2",
                "model": {"max_length": 32},
                "data": {"dev_fraction": 0.2},
                "finetune": {"epochs": 4, "learning_rate": 2e-3, "batch_size": 16, "warmup_ratio": 0.0},
                "prune": {"ratio": 0.5, "importance_samples": 64, "recover_epochs": 1},
                "report": {"bench_runs": 5},
            }
        )
    )
    workdir = tmp_path / "ws"
    args = _run_args(tiny_bert_dir, toy_glue, workdir, config_file)

    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    # The chain, then the two unpruned int8 baselines (ONNX Runtime, torch) of the fine-tuned model.
    made = {"finetune-v1", "prune-v1", "quantize-v1", "export-v1", "quantize-v2", "quantize-v3", "report"}
    assert _folders(workdir) == made
    assert "pruned + quantized" in first.stdout and "skip" not in first.stderr
    data = json.loads((workdir / "sst2" / "report" / "report.json").read_text())
    assert data["chain"] == ["finetune-v1", "prune-v1", "quantize-v1", "export-v1"]
    baselines = [(r["label"], r["checkpoint"], r["runtime"]) for r in data["rows"] if r["key"] == "baseline"]
    assert baselines == [
        ("int8 only, unpruned (ONNX Runtime)", "quantize-v2", "onnx int8"),
        ("int8 only, unpruned (torch)", "quantize-v3", "torch int8"),
    ]
    for version in ("quantize-v2", "quantize-v3"):
        baseline = read_checkpoint(workdir / "sst2" / version)
        assert baseline.manifest["parent"]["path"] == "finetune-v1" and baseline.details["baseline"] is True
    assert "baseline" not in read_checkpoint(workdir / "sst2" / "quantize-v1").details
    # The baselines are newer, but a later stage given no path still starts from the chain.
    assert resolve_input(None, workdir=workdir, task="sst2", stage="export").name == "quantize-v1"
    assert data["latency"]["source"] == "bench"  # run measures every row by default, baselines included
    assert all(
        r["latency_source"] == "bench" and r["speedup"]["batch_1"] > 0 for r in data["rows"] if r["status"] == "ok"
    )
    assert all(isinstance(data["stage_seconds"][s], float) for s in ("finetune", "prune", "quantize", "export"))
    assert {t["source"] for t in data["stage_timing"].values()} == {"run: wall time"}
    assert [data["stage_timing"][v]["stage"] for v in ("quantize-v1", "quantize-v2", "quantize-v3")] == [
        "quantize",
        "baseline",
        "baseline",
    ]
    assert data["stage_seconds"]["quantize"] == data["stage_timing"]["quantize-v1"]["seconds"]
    assert read_checkpoint(workdir / "sst2" / "prune-v1").manifest["config"]["prune"]["recover_epochs"] == 1

    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert _folders(workdir) == made
    assert "skip finetune:" in second.stderr and "finetune-v1 has the same config" in second.stderr
    for stage in ("prune", "quantize", "export", "baseline onnx int8", "baseline torch int8"):
        assert f"skip {stage}:" in second.stderr
    again = json.loads((workdir / "sst2" / "report" / "report.json").read_text())
    # Wall times timed by the first run are kept for the stages the second one skipped.
    assert again["stage_seconds"] == data["stage_seconds"] and again["stage_timing"] == data["stage_timing"]

    third = runner.invoke(app, args + ["--ratio", "0.25", "--no-bench"])
    assert third.exit_code == 0, third.output
    assert "skip finetune:" in third.stderr and "skip prune" not in third.stderr
    # A new ratio re-runs prune and what follows; the baselines do not depend on it.
    assert "skip baseline onnx int8:" in third.stderr and "skip baseline torch int8:" in third.stderr
    assert _folders(workdir) == made | {"prune-v2", "quantize-v4", "export-v2"}
    last = json.loads((workdir / "sst2" / "report" / "report.json").read_text())
    assert last["chain"] == ["finetune-v1", "prune-v2", "quantize-v4", "export-v2"]
    assert [r["checkpoint"] for r in last["rows"] if r["key"] == "baseline"] == ["quantize-v2", "quantize-v3"]
    assert read_checkpoint(workdir / "sst2" / "prune-v2").manifest["config"]["prune"]["ratio"] == 0.25
    assert read_checkpoint(workdir / "sst2" / "quantize-v4").manifest["parent"]["path"] == "prune-v2"


def test_run_refuses_bad_input_in_one_line(tmp_path):
    assert_one_line_error(
        runner.invoke(app, ["run", "--task", "sst3", "--workdir", str(tmp_path)]), "unknown task 'sst3'"
    )
    assert_one_line_error(runner.invoke(app, ["run", "--ratio", "1.5", "--workdir", str(tmp_path)]), "prune.ratio")
    assert not any(tmp_path.iterdir())


def test_stage_fingerprint_compares_the_stage_sections_with_absolute_paths(tmp_path, monkeypatch):
    from tinycompress.checkpoint.workspace import stage_fingerprint

    (tmp_path / "glue").mkdir()
    monkeypatch.chdir(tmp_path)
    relative = load_config(None, {"data.data_dir": "glue"})
    absolute = load_config(None, {"data.data_dir": str(tmp_path / "glue"), "threads": 3, "workdir": "elsewhere"})
    assert stage_fingerprint("export", relative) == stage_fingerprint("export", absolute)
    changed = load_config(None, {"data.data_dir": "glue", "quantize.backend": "torch"})
    assert stage_fingerprint("prune", changed) == stage_fingerprint("prune", relative)
    assert stage_fingerprint("quantize", changed) != stage_fingerprint("quantize", relative)


def test_prune_fingerprint_compares_the_distillation_rate_used():
    """A prune written before prune.recover_learning_rate existed (unset: it distilled at the
    fine-tune's rate) is reused by a run that gives that same rate explicitly, and only then."""
    from tinycompress.checkpoint.workspace import stage_fingerprint

    old = load_config(None, {"finetune.learning_rate": 5e-5}).to_dict()
    del old["prune"]["recover_learning_rate"]  # a manifest from before the key
    explicit = load_config(None, {"finetune.learning_rate": 5e-5, "prune.recover_learning_rate": 5e-5})
    other = load_config(None, {"finetune.learning_rate": 5e-5, "prune.recover_learning_rate": 1e-4})
    assert stage_fingerprint("prune", old) == stage_fingerprint("prune", explicit)
    assert stage_fingerprint("prune", old) != stage_fingerprint("prune", other)


def test_quantize_with_another_opset_is_not_reused(tiny_finetuned, tmp_path):
    """B4: quantize exports its ONNX graph with export.opset, so that belongs to its fingerprint."""
    from tinycompress.checkpoint.workspace import find_reusable, stage_fingerprint

    opset17, opset18 = load_config(None, {"export.opset": 17}), load_config(None, {"export.opset": 18})
    assert stage_fingerprint("prune", opset17) == stage_fingerprint("prune", opset18)
    assert stage_fingerprint("quantize", opset17) != stage_fingerprint("quantize", opset18)

    # A quantize checkpoint written with opset 17 is reused for 17, never for 18.
    finetuned = _copy_finetune(tiny_finetuned, tmp_path)
    config = load_config(None, {**FAST, "prune.ratio": 0.25}, base=parent_base(finetuned, "prune"))
    pruned = prune(config, finetuned)
    quantized = quantize(config, pruned)
    assert quantized.details["opset"] == 17
    assert find_reusable("quantize", config, pruned, log=lambda _: None).path == quantized.path
    other = config.model_copy(update={"export": config.export.model_copy(update={"opset": 18})})
    assert find_reusable("quantize", other, pruned, log=lambda _: None) is None


def test_distilbert_runs_the_whole_pipeline(tiny_distilbert_dir, toy_glue, tmp_path):
    """DistilBERT (no token_type_ids, other module names) through every stage and the report."""
    args = [
        "run",
        "--task",
        "sst2",
        "--model",
        str(tiny_distilbert_dir),
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
        "--ratio",
        "0.5",
        "--ffn-ratio",
        "0.25",
        "--recover-epochs",
        "1",
        "--no-bench",
        "--no-baselines",
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = {row["key"]: row for row in report["rows"]}
    assert "baseline" not in rows  # --no-baselines
    assert rows["prune"]["heads_kept"] == 4 and rows["prune"]["heads_total"] == 8
    assert rows["quantize"]["runtime"] == "onnx int8"
    assert rows["quantize"]["metrics"]["accuracy"] >= 0.9
    assert sorted(p.name for p in (tmp_path / "sst2").iterdir()) == [
        "export-v1",
        "finetune-v1",
        "prune-v1",
        "quantize-v1",
        "report",
    ]


def test_regression_pair_task_runs_the_whole_pipeline(tiny_bert_dir, toy_stsb, tmp_path):
    """STS-B: sentence pairs and one regression output through every stage, then predict."""
    args = [
        "run",
        "--task",
        "stsb",
        "--model",
        str(tiny_bert_dir),
        "--data-dir",
        str(toy_stsb),
        "--workdir",
        str(tmp_path),
        "--epochs",
        "3",
        "--lr",
        "2e-3",
        "--batch-size",
        "16",
        "--max-length",
        "32",
        "--threads",
        "1",
        "--ratio",
        "0.25",
        "--recover-epochs",
        "0",
        "--no-bench",
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = {row["key"]: row for row in json.loads(result.stdout)["rows"]}
    for key in ("finetune", "prune", "quantize", "baseline"):
        assert set(rows[key]["metrics"]) == {"pearson", "spearman"}
        assert all(value == value for value in rows[key]["metrics"].values())  # not NaN
    predicted = runner.invoke(
        app, ["predict", str(tmp_path / "stsb" / "export-v1"), "the film is good\tthe movie is good", "--json"]
    )
    assert predicted.exit_code == 0, predicted.output
    [only] = json.loads(predicted.stdout)
    assert isinstance(only["score"], float)


def test_walk_chain_stops_at_a_parent_changed_after_the_child(tmp_path):
    from tinycompress.checkpoint.format import MANIFEST_NAME
    from tinycompress.checkpoint.store import write_checkpoint
    from tinycompress.checkpoint.workspace import walk_chain

    def put(folder):
        (folder / "weights.bin").write_bytes(b"w")

    parent = write_checkpoint(tmp_path, "sst2", "finetune", put, config=load_config(), metrics={}, seed=1)
    child = write_checkpoint(tmp_path, "sst2", "prune", put, config=load_config(), metrics={}, seed=1, parent=parent)
    manifest = yaml.safe_load((parent.path / MANIFEST_NAME).read_text())
    manifest["metrics"] = {"test/accuracy": 0.99}
    (parent.path / MANIFEST_NAME).write_text(yaml.safe_dump(manifest))
    chain, notes = walk_chain(child)
    assert [c.name for c in chain] == ["prune-v1"]
    assert len(notes) == 1 and "changed after it was written" in notes[0]


def test_seed_table_benchmark_gives_mean_and_sample_std_per_row(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "seed_table", Path(__file__).resolve().parents[1] / "benchmarks" / "seed_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folders = []
    for seed, fine, pruned in ((42, 0.89, 0.88), (43, 0.90, None), (44, 0.91, 0.86)):
        (tmp_path / "sst2" / f"finetune-v{seed}").mkdir(parents=True)
        (tmp_path / "sst2" / f"finetune-v{seed}" / "tinycompress.yaml").write_text(yaml.safe_dump({"seed": seed}))
        rows = [
            {"key": "original", "label": "original", "status": "ok", "metrics": {"accuracy": 0.5}, "size_mb": 90.0},
            {"key": "finetune", "label": "fine-tuned", "status": "ok", "metrics": {"accuracy": fine}, "size_mb": 90.0},
        ]
        if pruned is not None:
            rows.append(
                {
                    "key": "prune",
                    "label": "pruned",
                    "status": "ok",
                    "metrics": {"accuracy": pruned},
                    "size_mb": 80.0 + seed - 42,
                }
            )
        report = {
            "task": "sst2",
            "workspace": str(tmp_path),
            "chain": [f"finetune-v{seed}"],
            "primary_metric": "accuracy",
            "rows": rows,
            "stage_seconds": {"finetune": 1000.0 + seed, "prune": None},
        }
        folder = tmp_path / f"report-{seed}"
        folder.mkdir()
        (folder / "report.json").write_text(json.dumps(report))
        folders.append(str(folder))
    module.main(folders)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| version | seed 42 | seed 43 | seed 44 | mean ± std (3 runs) | size (MB, mean) |"
    assert out[2] == "| fine-tuned | 0.8900 | 0.9000 | 0.9100 | 0.9000 ± 0.0100 | 90.0 |"  # stdev with n - 1
    assert out[3] == "| pruned | 0.8800 | — | 0.8600 | 0.8700 ± 0.0141 | 81.0 |"
    assert not any(line.startswith("| original") for line in out)
    assert out[-3:] == ["| 42 | 1,042 | — |", "| 43 | 1,043 | — |", "| 44 | 1,044 | — |"]


def test_a_failed_baseline_is_left_out_and_the_report_still_written(chain, tmp_path):
    from tinycompress.stages.pipeline import run_pipeline, stage_functions

    workdir = tmp_path / "ws"
    shutil.copytree(chain["workdir"], workdir)
    config = read_checkpoint(workdir / "sst2" / "export-v1").config.model_copy(update={"workdir": str(workdir)})

    def failing(config, parent):
        raise TinycompressError("no int8 kernels here")

    messages = []
    result = run_pipeline(config, bench=False, log=messages.append, stages=stage_functions() | {"baseline": failing})
    assert result.skipped == ["finetune", "prune", "quantize", "export"]  # the chain is reused ...
    assert result.baselines == {}  # ... and both baselines failed
    assert [m for m in messages if "int8 failed" in m] == [
        f"baseline {b} int8 failed, left out of the table: no int8 kernels here" for b in ("onnx", "torch")
    ]
    assert [r.label for r in result.report.rows] == CHAIN_LABELS
    assert (workdir / "sst2" / "report" / "report.json").is_file()
