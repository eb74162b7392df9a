"""Accuracy-driven int8 tuning (``quantize --tolerance``): the search with fake callables, fp32
fallback in the saved ONNX graph, and the stage end to end on the tiny fine-tuned BERT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from conftest import assert_one_line_error
from test_onnx_int8 import build_bert
from typer.testing import CliRunner

from tinycompress.checkpoint.store import read_checkpoint
from tinycompress.cli.app import app
from tinycompress.config import QuantizeSettings
from tinycompress.quantization.onnx_recipes import (
    OnnxTuningSources,
    onnx_node_groups,
    onnx_recipes,
    quantize_onnx_recipe,
    recipe_op_types,
)
from tinycompress.quantization.tuning import Recipe, tune

runner = CliRunner()

# ------------------------------------------------------------------ the search, with fakes

GROUPS = {"embeddings": ["emb"], "layer 0 attention": ["a0"], "layer 0 ffn": ["f0"], "layer 1 ffn": ["f1"]}
NODE_GROUP = {node: group for group, nodes in GROUPS.items() for node in nodes}


class Fakes:
    """build writes a meta file; the dev metric is the recipe's base plus what each fp32 group wins back."""

    def __init__(self, base: dict[str, float], gain: dict[str, float], speed: dict[str, float], sizes=None):
        self.base, self.gain, self.speed, self.sizes = base, gain, speed, sizes or {}
        self.built: list[tuple[str, tuple[str, ...]]] = []
        self.timed: list[list[str]] = []

    def build(self, recipe: Recipe, nodes, folder: Path) -> dict:
        folder.mkdir(parents=True)
        (folder / "model.bin").write_bytes(b"x" * (self.sizes.get(recipe.name, 100) + 10 * len(nodes)))
        (folder / "meta.json").write_text(json.dumps({"recipe": recipe.name, "nodes": list(nodes)}))
        self.built.append((recipe.name, tuple(nodes)))
        return {"quantized_ops": {"MatMul": 4 - len(nodes)}}

    def dev_metric(self, folder: Path) -> float:
        meta = json.loads((folder / "meta.json").read_text())
        return self.base[meta["recipe"]] + sum(self.gain.get(NODE_GROUP[n], 0.0) for n in meta["nodes"])

    def latencies(self, folders):
        self.timed.append(list(folders))
        return {
            name: {f"batch_{b}": {"median_ms": self.speed.get(name, 50.0) * b, "q1_ms": 0, "q3_ms": 0} for b in (1, 32)}
            for name in folders
        }

    def run(self, recipes, tolerance, tmp_path, **kwargs):
        return tune(
            [Recipe(name, {"mode": name}) for name in recipes],
            build=self.build,
            dev_metric=self.dev_metric,
            latencies=self.latencies,
            node_groups=lambda recipe: GROUPS,
            reference=0.900,
            tolerance=tolerance,
            metric="accuracy",
            scratch=tmp_path,
            **kwargs,
        )


def test_recipes_within_tolerance_pick_the_fastest_and_skip_node_exclusion(tmp_path):
    fakes = Fakes({"a": 0.8975, "b": 0.899, "c": 0.890}, {}, {"a": 3.0, "b": 2.0, "c": 1.0})
    result = fakes.run(["a", "b", "c"], 0.3, tmp_path)
    assert [c.name for c in result.candidates] == ["a", "b", "c"] and all(n == () for _, n in fakes.built)
    assert [c.within_tolerance for c in result.candidates] == [True, True, False]
    assert [round(c.drop_points, 6) for c in result.candidates] == [0.25, 0.1, 1.0]
    # c is fastest but outside the tolerance; b is the fastest within.
    assert result.chosen.name == "b" and result.within_tolerance and fakes.timed == [["a", "b"]]
    assert result.candidates[2].latency is None and result.sensitivity == {}
    record = result.to_dict()
    assert record["chosen"] == "b" and record["fp32_dev_metric"] == 0.9 and record["within_tolerance"] is True
    assert all(c["size_bytes"] > 100 for c in record["candidates"])


def test_sensitivity_stops_at_the_first_group_within_tolerance(tmp_path):
    # Best recipe: b (0.895, 0.5 points down). Keeping layer 0 attention fp32 wins back 0.3 points.
    fakes = Fakes({"a": 0.890, "b": 0.895}, {"embeddings": 0.001, "layer 0 attention": 0.003}, {})
    result = fakes.run(["a", "b"], 0.3, tmp_path)
    names = [c.name for c in result.candidates]
    assert names == ["a", "b", "b+fp32[embeddings]", "b+fp32[layer 0 attention]"]  # not layer 0/1 ffn
    assert [c.phase for c in result.candidates] == ["recipe", "recipe", "sensitivity", "sensitivity"]
    assert result.candidates[3].fp32_nodes == ("a0",) and result.candidates[3].fp32_groups == ("layer 0 attention",)
    assert result.chosen.name == "b+fp32[layer 0 attention]" and result.within_tolerance
    # The first recipe is timed too, as the full-int8 reference point.
    assert fakes.timed == [["a", "b+fp32[layer 0 attention]"]]


def test_fallback_adds_the_most_sensitive_groups_until_within_tolerance(tmp_path):
    gains = {"embeddings": 0.001, "layer 0 attention": 0.0005, "layer 0 ffn": 0.002, "layer 1 ffn": 0.0}
    fakes = Fakes({"a": 0.894}, gains, {})
    result = fakes.run(["a"], 0.3, tmp_path)  # needs 0.003 back: ffn0 + emb
    names = [c.name for c in result.candidates]
    assert names == [
        "a",
        "a+fp32[embeddings]",
        "a+fp32[layer 0 attention]",
        "a+fp32[layer 0 ffn]",
        "a+fp32[layer 1 ffn]",
        "a+fp32[2 groups]",
    ]
    assert result.sensitivity == {
        "embeddings": pytest.approx(0.895),
        "layer 0 attention": pytest.approx(0.8945),
        "layer 0 ffn": pytest.approx(0.896),
        "layer 1 ffn": pytest.approx(0.894),
    }
    last = result.candidates[-1]
    assert (
        last.phase == "fallback"
        and last.fp32_groups == ("layer 0 ffn", "embeddings")
        and last.fp32_nodes == ("f0", "emb")
    )
    assert last.within_tolerance and result.chosen is last  # stopped there: no 3-group candidate


def test_nothing_within_tolerance_keeps_the_most_accurate_and_says_so(tmp_path):
    fakes = Fakes({"a": 0.880, "b": 0.885}, {"layer 0 ffn": 0.001}, {})
    result = fakes.run(["a", "b"], 0.3, tmp_path, max_fp32_groups=2)
    assert not any(c.within_tolerance for c in result.candidates)
    # 2 recipes, 4 sensitivity candidates, 1 fallback (2 groups: the cap).
    assert [c.phase for c in result.candidates] == ["recipe"] * 2 + ["sensitivity"] * 4 + ["fallback"]
    # Best dev metric 0.886: "b+fp32[layer 0 ffn]" and the 2-group fallback tie; the one with fewer fp32 nodes wins.
    assert result.chosen.name == "b+fp32[layer 0 ffn]" and not result.within_tolerance
    record = result.to_dict()
    assert record["within_tolerance"] is False and "best dev metric" in record["choice_rule"]
    assert fakes.timed == [["a", "b+fp32[layer 0 ffn]"]] and result.chosen.latency is not None


def test_candidates_the_measurement_cannot_tell_apart_are_decided_by_dev_metric(tmp_path):
    # a is the fastest median, b is as fast within the spread and more accurate: b wins.
    fakes = Fakes({"a": 0.8975, "b": 0.899}, {}, {"a": 2.0, "b": 2.1})
    assert fakes.run(["a", "b"], 0.3, tmp_path / "plain").chosen.name == "a"
    tied = fakes.run(["a", "b"], 0.3, tmp_path / "tied", same_speed=lambda x, y: True)
    assert tied.chosen.name == "b" and "tied" in tied.to_dict()["choice_rule"]


def test_among_candidates_tied_on_speed_a_much_smaller_file_wins(tmp_path):
    # b (fp32 embeddings, say) is as fast within the spread and more accurate on dev, but 3x larger:
    # a wins; c is 5 % larger than a, which counts as the same size, and more accurate: c wins.
    fakes = Fakes({"a": 0.8975, "b": 0.899}, {}, {"a": 2.0, "b": 2.0}, sizes={"a": 1000, "b": 3000})
    assert fakes.run(["a", "b"], 0.3, tmp_path / "big", same_speed=lambda x, y: True).chosen.name == "a"
    fakes = Fakes({"a": 0.8975, "c": 0.899}, {}, {"a": 2.0, "c": 2.0}, sizes={"a": 1000, "c": 1050})
    assert fakes.run(["a", "c"], 0.3, tmp_path / "near", same_speed=lambda x, y: True).chosen.name == "c"


def test_a_nan_dev_metric_is_never_within_nor_best(tmp_path):
    fakes = Fakes({"a": float("nan"), "b": 0.899}, {}, {"a": 1.0, "b": 2.0})
    result = fakes.run(["a", "b"], 0.3, tmp_path)
    assert [c.within_tolerance for c in result.candidates] == [False, True] and result.chosen.name == "b"
    with pytest.raises(ValueError, match="NaN"):
        tune(
            [Recipe("a", {})],
            build=fakes.build,
            dev_metric=fakes.dev_metric,
            latencies=fakes.latencies,
            node_groups=lambda recipe: GROUPS,
            reference=float("nan"),
            tolerance=0.3,
            metric="accuracy",
            scratch=tmp_path / "nan",
        )


def test_the_fallback_never_keeps_every_group_in_fp32(tmp_path):
    fakes = Fakes({"a": 0.880}, {}, {})  # nothing wins anything back
    result = fakes.run(["a"], 0.3, tmp_path)
    assert max(len(c.fp32_groups) for c in result.candidates) == len(GROUPS) - 1
    assert not result.within_tolerance


def test_tune_refuses_bad_arguments(tmp_path):
    fakes = Fakes({}, {}, {})
    with pytest.raises(ValueError, match="at least one recipe"):
        fakes.run([], 0.3, tmp_path)
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        fakes.run(["a"], -1, tmp_path)


# ------------------------------------------------------------------ fp32 nodes in the saved graph


def test_recipes_start_with_the_configured_one_and_have_no_duplicates():
    names = [r.name for r in onnx_recipes(QuantizeSettings())]
    assert names[0] == "dynamic-u8s8-per-tensor" and len(names) == len(set(names))
    assert "dynamic-u8u8-per-tensor" in names and "static-qdq-entropy-per-tensor" in names
    assert "dynamic-u8s8-per-tensor-fp32-embeddings" in names and "dynamic-u8s8-per-channel-reduce-range" in names
    static_first = onnx_recipes(QuantizeSettings(mode="static", per_channel=True))
    assert static_first[0].name == "static-qdq-minmax-per-channel"
    assert [r.name for r in onnx_recipes(QuantizeSettings(), static=False)] == names[:5]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return OnnxTuningSources(build_bert(), tmp_path_factory.mktemp("sources"), opset=17)


def _weights(graph: onnx.GraphProto) -> dict[str, int]:
    return {init.name: init.data_type for init in graph.initializer}


def test_dynamic_nodes_to_exclude_stay_fp32_in_the_saved_graph(sources, tmp_path):
    recipe = onnx_recipes(QuantizeSettings())[0]
    groups = onnx_node_groups(sources.fused, recipe_op_types(recipe.settings))
    assert list(groups) == ["embeddings", "layer 0 attention", "layer 0 ffn", "layer 1 attention", "layer 1 ffn"]
    assert groups["layer 0 attention"][0] == "Attention_0" and len(groups["layer 1 ffn"]) == 2
    kept = groups["embeddings"] + groups["layer 0 attention"]
    details = quantize_onnx_recipe(sources, recipe.settings, tmp_path / "model.onnx", nodes_to_exclude=kept)
    assert details["quantized_ops"] == {"MatMul": 7, "Gather": 0, "Attention": 1, "EmbedLayerNormalization": 0}
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    nodes, weights = {n.name: n for n in graph.node}, _weights(graph)
    original = {n.name: n.op_type for n in onnx.load(str(sources.fused)).graph.node}
    for name in kept:  # same op type as in the fp32 graph, reading fp32 weights only
        assert nodes[name].op_type == original[name]
        assert all(weights[i] == onnx.TensorProto.FLOAT for i in nodes[name].input if i in weights)
    # ... while the layer-1 attention is int8.
    assert "Attention_1" not in nodes and "QAttention" in {n.op_type for n in graph.node}


def test_static_nodes_to_exclude_get_no_quantize_dequantize(sources, tmp_path):
    recipe = next(r for r in onnx_recipes(QuantizeSettings()) if r.name == "static-qdq-minmax-per-tensor")
    groups = onnx_node_groups(sources.raw, recipe_op_types(recipe.settings))
    assert len(groups["layer 0 attention"]) == 6  # Q, K, V, scores, context, output projection
    kept = groups["layer 1 ffn"]
    ids = torch.randint(0, 100, (4, 12))
    calibration = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    quantize_onnx_recipe(
        sources, recipe.settings, tmp_path / "model.onnx", nodes_to_exclude=kept, calibration=calibration
    )
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    reads_dq = {n.name: any(producers.get(i) == "DequantizeLinear" for i in n.input) for n in graph.node}
    assert not any(reads_dq[name] for name in kept)
    assert all(reads_dq[name] for name in groups["layer 1 attention"])


# ------------------------------------------------------------------ the stage, end to end


def _workspace(tiny_finetuned, tmp_path) -> Path:
    target = tmp_path / "ws" / "sst2" / "finetune-v1"
    shutil.copytree(tiny_finetuned.path, target)
    return target


COMMON = ["--threads", "1", "--bench-runs", "5"]


def test_cli_tolerance_writes_one_tuned_folder(tiny_finetuned, tmp_path):
    parent = _workspace(tiny_finetuned, tmp_path)
    result = runner.invoke(app, ["quantize", str(parent), "--tolerance", "0.3", *COMMON])
    assert result.exit_code == 0, result.output
    task = parent.parent
    assert sorted(p.name for p in task.iterdir()) == ["finetune-v1", "quantize-v1"]
    q = read_checkpoint(task / "quantize-v1")
    tuning = q.details["tuning"]
    assert tuning["tolerance"] == 0.3 and tuning["metric"] == "accuracy" and tuning["split"] == "dev"
    candidates = {c["name"]: c for c in tuning["candidates"]}
    recipes = [c for c in tuning["candidates"] if c["phase"] == "recipe"]
    assert [c["name"] for c in recipes] == [r.name for r in onnx_recipes(QuantizeSettings())]
    chosen = candidates[tuning["chosen"]]
    assert chosen["within_tolerance"] and chosen["drop_points"] <= 0.3 and tuning["within_tolerance"]
    assert chosen["latency"]["batch_32"]["median_ms"] > 0 and "q1_ms" in chosen["latency"]["batch_1"]
    for candidate in tuning["candidates"]:
        assert {"recipe", "fp32_nodes", "dev_metric", "drop_points", "size_bytes", "within_tolerance"} <= set(candidate)
        assert candidate["drop_points"] == pytest.approx(
            (tuning["fp32_dev_metric"] - candidate["dev_metric"]) * 100, abs=1e-3
        )
    # The written model is the chosen candidate's, and its manifest describes the chosen recipe.
    assert q.model_bytes == chosen["size_bytes"] and q.details["mode"] == chosen["recipe"]["mode"]
    assert q.manifest["config"]["quantize"]["tolerance"] == 0.3
    assert f"tuned: {chosen['name']} of {len(tuning['candidates'])} candidates" in result.stdout
    assert 0.0 <= q.metrics["test/accuracy"] <= 1.0
    # The report shows the search: a footnote and, in report.md, every candidate.
    from tinycompress.report.render import to_markdown
    from tinycompress.stages.report import run_report

    report, _ = run_report(q.path, overrides={"report.bench": False}, out_dir=tmp_path / "report", log=lambda m: None)
    assert report.tuning == {"quantize-v1": tuning}
    assert any(note.startswith("quantize-v1: int8 tuned for a tolerance of 0.3") for note in report.footnotes)
    markdown = to_markdown(report)
    assert "## int8 tuning: quantize-v1" in markdown
    assert all(f"| {c['name']} | {c['phase']} |" in markdown for c in tuning["candidates"])


def test_no_tolerance_means_no_tuning(tiny_finetuned, tmp_path):
    parent = _workspace(tiny_finetuned, tmp_path)
    result = runner.invoke(app, ["quantize", str(parent), *COMMON])
    assert result.exit_code == 0, result.output
    q = read_checkpoint(parent.parent / "quantize-v1")
    assert "tuning" not in q.details and "tuned" not in result.stdout
    assert q.manifest["config"]["quantize"]["tolerance"] is None


def test_tolerance_with_torch_backend_is_refused(tiny_finetuned, tmp_path):
    parent = _workspace(tiny_finetuned, tmp_path)
    result = runner.invoke(app, ["quantize", str(parent), "--backend", "torch", "--tolerance", "0.3", *COMMON])
    assert_one_line_error(result, "quantize.tolerance", "--backend onnx")
    assert sorted(p.name for p in parent.parent.iterdir()) == ["finetune-v1"]


def test_nothing_within_tolerance_keeps_the_best_and_warns(tiny_finetuned, tmp_path, monkeypatch):
    import tinycompress.training.evaluation as evaluation

    real = evaluation.evaluate_predictor_dev

    def harsh(predictor, config, spec, data=None):
        """fp32 torch: the real dev metric; every ONNX candidate: 0.5 lower, fp32 nodes or not."""
        metrics = real(predictor, config, spec, data)
        if predictor.kind == "onnx":
            metrics["dev/accuracy"] -= 0.5
        return metrics

    monkeypatch.setattr(evaluation, "evaluate_predictor_dev", harsh)
    parent = _workspace(tiny_finetuned, tmp_path)
    result = runner.invoke(app, ["quantize", str(parent), "--tolerance", "0.3", *COMMON])
    assert result.exit_code == 0, result.output
    task = parent.parent
    assert sorted(p.name for p in task.iterdir()) == ["finetune-v1", "quantize-v1"]  # no .tmp-* left
    tuning = read_checkpoint(task / "quantize-v1").details["tuning"]
    assert tuning["within_tolerance"] is False and not any(c["within_tolerance"] for c in tuning["candidates"])
    phases = [c["phase"] for c in tuning["candidates"]]
    # 5 groups one at a time, then 2..4 together (all 5 in fp32 would be the fp32 graph again).
    assert phases.count("sensitivity") == 5 and phases.count("fallback") == 3
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "no int8 candidate is within 0.3 points" in warnings[0]
    assert "raise --tolerance" in warnings[0] and "NOT within" in result.stdout
