"""STAGE_GRAPH"""

from __future__ import annotations



STAGES = ("finetune", "prune", "quantize", "export")


# The stage whose newest checkpoint a stage takes when given no input path.
PARENT_STAGE = {"prune": ("finetune",), "quantize": ("prune",), "export": ("quantize", "prune", "finetune")}


def producing_command(stage: str, task: str | None) -> str:
    task_flag = f" --task {task}" if task else ""
    return {
        "finetune": f"tinycompress finetune{task_flag}",
        "prune": f"tinycompress prune{task_flag} --ratio 0.5",
        "quantize": f"tinycompress quantize{task_flag}",
        "export": f"tinycompress export{task_flag}",
    }.get(stage, f"tinycompress {stage}{task_flag}")


ACCEPTED_PARENTS = {
    "prune": ("finetune", "prune"),
    "quantize": ("finetune", "prune"),
    "export": ("finetune", "prune", "quantize"),
}


PIPELINE_STAGES = ("finetune", "prune", "quantize", "export")


# The config sections (or dotted single keys) that decide what a stage produces, given its parent.
# Sections of earlier stages are included: the parent's identity already pins them, but a
# checkpoint made with other upstream settings (e.g. different data) must not be mistaken for
# this run's. Quantize exports the ONNX graph it quantizes with export.opset.
_BASE_SECTIONS = ("task", "seed", "model", "data", "finetune")


STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "finetune": _BASE_SECTIONS,
    "prune": _BASE_SECTIONS + ("prune",),
    "quantize": _BASE_SECTIONS + ("prune", "quantize", "export.opset"),
    "export": _BASE_SECTIONS + ("prune", "quantize", "export"),
}


# The baselines: the unpruned fine-tuned model quantized the usual way (dynamic int8 with default
# settings, ONNX Runtime as Optimum does it, and torch), made by `run` beside the main chain so
# that the table compares pruning + quantization with quantization alone, measured together.
# Their fingerprint leaves out the prune section: a new --ratio does not make them again.
BASELINE_BACKENDS = ("onnx", "torch")


BASELINE_SECTIONS = _BASE_SECTIONS + ("quantize", "export.opset")
