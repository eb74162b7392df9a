"""The report's latency protocol (tinycompress.report): interleaved bench, spread and "≈", identical artifacts, ONNX fp32."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from test_report_run import chain  # noqa: F401  (the module-scoped tiny chain fixture)

from tinycompress.checkpoint.store import Checkpoint
from tinycompress.inference import latency as latency_module
from tinycompress.report.gather import build_report
from tinycompress.report.identical import merge_identical
from tinycompress.report.render import print_report, table_cells, to_csv, to_markdown
from tinycompress.report.rows import Report, Row, compute_ratios

KEYS = ("batch_1", "batch_32")


def _timing(median: float, q1: float, q3: float, runs: int = 20) -> dict:
    return {
        "median_ms": median,
        "q1_ms": q1,
        "q3_ms": q3,
        "min_ms": q1 - 0.05,
        "max_ms": q3 + 0.5,
        "p90_ms": q3 + 0.1,
        "runs": runs,
    }


def _report(rows: list[Row]) -> Report:
    return Report(
        task="sst2",
        workspace="runs",
        metrics=["accuracy"],
        rows=rows,
        chain=[r.checkpoint for r in rows if r.checkpoint],
        latency={"source": "bench"},
        stage_seconds={},
        stage_timing={},
        sweep=None,
        footnotes=[],
    )


# ------------------------------------------------------------------------------ rendering: spread and ≈


def test_spread_is_printed_next_to_latency_and_overlapping_speedups_say_approximately():
    machine = {"cpu": "x", "threads": 1}

    def row(key, label, checkpoint, b1, b32, source="bench"):
        made = Row(key=key, label=label, status="ok", checkpoint=checkpoint, runtime="r", size_bytes=1_000_000)
        made.set_latency({"batch_1": b1, "batch_32": b32}, source, machine)
        return made

    fine = row("finetune", "fine-tuned", "finetune-v1", _timing(1.90, 1.85, 2.01), _timing(40.0, 39.0, 41.0))
    # Batch 1: IQR overlaps the fine-tuned one (≈); batch 32: clearly apart (plain ratio).
    close = row("prune", "pruned", "prune-v1", _timing(1.86, 1.80, 1.95), _timing(20.0, 19.5, 20.5))
    # A manifest without a spread: the median alone, the plain ratio (differs is unknown).
    bare = row("quantize", "pruned + quantized", "quantize-v1", {"median_ms": 0.95}, {"median_ms": 10.0})
    rows = [fine, close, bare]
    compute_ratios(rows)
    assert close.speedup_differs == {"batch_1": False, "batch_32": True}
    assert bare.speedup_differs == {"batch_1": None, "batch_32": None} and bare.latency_spread["batch_1"] is None
    assert fine.speedup_differs == {"batch_1": None, "batch_32": None}  # the reference itself

    report = _report(rows)
    headers, body = table_cells(report)
    cells = {r[0]: dict(zip(headers, r)) for r in body}
    assert cells["fine-tuned"]["b1 ms (IQR)"] == "1.90 (1.85–2.01)"
    assert cells["fine-tuned"]["b32 ms (IQR)"] == "40.0 (39.0–41.0)"
    assert cells["fine-tuned"]["speed-up b1"] == "1.00×"
    assert cells["pruned"]["b1 ms (IQR)"] == "1.86 (1.80–1.95)"
    assert cells["pruned"]["speed-up b1"] == f"≈{1.90 / 1.86:.2f}×" == "≈1.02×"
    assert cells["pruned"]["speed-up b32"] == "2.00×"
    assert (
        cells["pruned + quantized"]["b1 ms (IQR)"] == "0.95" and cells["pruned + quantized"]["b32 ms (IQR)"] == "10.0"
    )
    assert cells["pruned + quantized"]["speed-up b1"] == "2.00×"

    markdown = to_markdown(report)
    assert "| 1.86 (1.80–1.95) | 20.0 (19.5–20.5) |" in markdown and "| ≈1.02× | 2.00× |" in markdown

    from rich.console import Console

    console = Console(record=True, width=250)
    print_report(report, console)
    text = console.export_text()
    assert "1.86 (1.80–1.95)" in text and "≈1.02×" in text

    by_label = {r["label"]: r for r in csv.DictReader(io.StringIO(to_csv(report)))}
    pruned = by_label["pruned"]
    assert (pruned["latency_b1_ms"], pruned["latency_b1_q1_ms"], pruned["latency_b1_q3_ms"]) == ("1.86", "1.8", "1.95")
    assert (pruned["latency_b1_min_ms"], pruned["latency_b1_max_ms"], pruned["latency_b32_runs"]) == (
        "1.75",
        "2.45",
        "20",
    )
    assert (pruned["speedup_b1_differs"], pruned["speedup_b32_differs"]) == ("False", "True")
    assert by_label["pruned + quantized"]["latency_b1_q1_ms"] == "" and by_label["pruned + quantized"][
        "speedup_b1_differs"
    ] == ("")
    assert report.to_dict()["rows"][1]["latency_spread"]["batch_1"] == {
        "q1_ms": 1.80,
        "q3_ms": 1.95,
        "min_ms": 1.75,
        "max_ms": 2.45,
        "runs": 20,
    }


# ------------------------------------------------------------------------------ identical artifacts


def _checkpoint(name: str, files: dict[str, str]) -> Checkpoint:
    return Checkpoint(path=Path("/nowhere") / name, manifest={"files": files})


def test_only_byte_identical_artifacts_are_merged():
    def row(key, checkpoint, artifact=None):
        return Row(
            key=key, label=f"{key} {artifact or ''}".strip(), status="ok", checkpoint=checkpoint, artifact=artifact
        )

    checkpoints = [
        _checkpoint("quantize-v1", {"model.onnx": "aaa", "config.json": "c1", "README.md": "r"}),
        _checkpoint("export-v1", {"model.onnx": "aaa", "model.torchscript.pt": "ttt", "config.json": "c2"}),
        _checkpoint("quantize-v2", {"model.onnx": "aab", "config.json": "c1"}),  # one byte differs
        # safetensors folders: the same weights with another config.json are not the same model
        _checkpoint("finetune-v1", {"model.safetensors": "www", "config.json": "c1"}),
        _checkpoint("prune-v1", {"model.safetensors": "www", "config.json": "c3"}),
    ]
    quantized, onnx, torchscript = (
        row("quantize", "quantize-v1"),
        row("export", "export-v1", "model.onnx"),
        row("export", "export-v1", "model.torchscript.pt"),
    )
    other, fine, pruned = row("baseline", "quantize-v2"), row("finetune", "finetune-v1"), row("prune", "prune-v1")
    rows = [fine, pruned, quantized, onnx, torchscript, other]
    pairs = merge_identical(rows, checkpoints)
    assert rows == [fine, pruned, quantized, torchscript, other]
    assert pairs == [(quantized, onnx)]
    assert quantized.same_file_as == ["export-v1/model.onnx"]
    assert quantized.notes == [
        "export-v1/model.onnx (export model.onnx) is the same file (identical sha256): shown once, as this row"
    ]
    assert not any(r.same_file_as for r in (fine, pruned, torchscript, other))


def test_the_export_copy_of_an_onnx_quantize_is_shown_once(chain):  # noqa: F811
    report = build_report(workdir=chain["workdir"], task="sst2")
    assert [(r.checkpoint, r.artifact) for r in report.rows if r.key in ("quantize", "export")] == [
        ("quantize-v1", None),
        ("export-v1", "model.torchscript.pt"),
    ]
    quantized = report.row("quantize")
    assert quantized.same_file_as == ["export-v1/model.onnx"]
    assert any("export-v1/model.onnx" in note and "same file" in note for note in quantized.notes)
    assert any(
        note.startswith("pruned + quantized (quantize-v1): export-v1/model.onnx is the same file")
        for note in report.footnotes
    )


# ------------------------------------------------------------------------------ bench: one interleaved measurement


def test_bench_times_every_row_in_one_interleaved_call(chain, monkeypatch):  # noqa: F811
    calls = []

    def fake_measure_predictors(predictors, texts, *, max_length, runs, warmup):
        calls.append({"names": list(predictors), "runs": runs, "warmup": warmup, "texts": len(texts)})
        return {
            name: {
                "batch_1": _timing(1.0 + i, 0.9 + i, 1.1 + i),
                "batch_32": _timing(10.0 * (i + 1), 10.0 * (i + 1) - 0.5, 10.0 * (i + 1) + 0.5),
            }
            for i, name in enumerate(predictors)
        }

    monkeypatch.setattr(latency_module, "measure_predictors", fake_measure_predictors)
    report = build_report(
        workdir=chain["workdir"], task="sst2", bench=True, bench_runs=7, threads=1, log=lambda _: None
    )
    assert len(calls) == 1, calls
    # Every row with a model (the original borrows the fine-tuned latency), the ONNX fp32 row made
    # now, and the export's copy of the quantized file (timed again under its own name), in table order.
    assert calls[0]["names"] == [
        "finetune-v1",
        "prune-v1",
        "prune-v1 (ONNX Runtime fp32, made now)",
        "quantize-v1",
        "export-v1/model.torchscript.pt",
        "export-v1/model.onnx",
    ]
    assert calls[0]["runs"] == 7 and calls[0]["texts"] > 0
    assert report.latency["rounds"] == 7 and report.latency["statistic"] == "median, IQR"
    assert report.latency["warmup"] == calls[0]["warmup"]
    assert report.latency["models"] == calls[0]["names"]
    fine, pruned = report.row("finetune"), report.row("prune")
    assert fine.latency_ms == {"batch_1": 1.0, "batch_32": 10.0}
    assert fine.latency_spread["batch_1"] == {"q1_ms": 0.9, "q3_ms": 1.1, "min_ms": 0.85, "max_ms": 1.6, "runs": 20}
    assert report.row("original").latency_spread == fine.latency_spread
    assert pruned.latency_ms == {"batch_1": 2.0, "batch_32": 20.0}
    # IQRs 0.9-1.1 and 1.9-2.1 (9.5-10.5 and 19.5-20.5) do not overlap: a plain ratio.
    assert pruned.speedup_differs == {"batch_1": True, "batch_32": True}
    [check] = report.latency["same_file"]
    assert (check["first"], check["second"]) == ("quantize-v1", "export-v1/model.onnx")
    assert check["batch_1"]["first"]["median_ms"] == 4.0 and check["batch_1"]["second"]["median_ms"] == 6.0
    assert check["batch_1"]["relative_difference"] == pytest.approx(0.5)
    assert any(note.startswith("repeatability: quantize-v1 and export-v1/model.onnx") for note in report.footnotes)


def test_bench_adds_an_onnx_runtime_fp32_row_of_the_pruned_model(chain):  # noqa: F811
    report = build_report(
        workdir=chain["workdir"], task="sst2", bench=True, bench_runs=3, threads=1, log=lambda _: None
    )
    labels = [r.label for r in report.rows]
    assert labels[labels.index("pruned") + 1] == "pruned, ONNX Runtime fp32"
    row = report.row("onnx_fp32")
    pruned = report.row("prune")
    assert (row.checkpoint, row.runtime, row.path, row.latency_source) == ("prune-v1", "onnx fp32", None, "bench")
    assert all(row.latency_ms[k] > 0 for k in KEYS) and all(row.latency_spread[k]["runs"] == 3 for k in KEYS)
    assert all(row.speedup[k] > 0 for k in KEYS)
    assert row.metrics == pruned.metrics and row.metrics_from == "prune-v1 (same weights, fp32)"
    # The fp32 graph (the file made now, gone with its temporary folder): above the int8 file.
    assert row.size_bytes > report.row("quantize").size_bytes
    assert (row.heads_kept, row.ffn_kept, row.parameters) == (pruned.heads_kept, pruned.ffn_kept, pruned.parameters)
    assert any(note.startswith("pruned, ONNX Runtime fp32 = prune-v1 exported now") for note in report.footnotes)
    headers, body = table_cells(report)
    cells = dict(zip(headers, next(c for c in body if c[0] == "pruned, ONNX Runtime fp32")))
    assert cells["checkpoint"] == "prune-v1 (exported now)" and "(" in cells["b1 ms (IQR)"]
    # Every ok row is measured with a spread; without --bench the row is not shown.
    assert all(r.latency_spread["batch_1"] is not None for r in report.rows if r.status == "ok")
    assert report.latency["same_file"][0]["batch_32"]["second"]["runs"] == 3
    assert "onnx_fp32" not in {r.key for r in build_report(workdir=chain["workdir"], task="sst2").rows}
