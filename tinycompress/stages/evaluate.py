"""Measure any model on a task's test set (the GLUE validation split).

tinycompress evaluate default --task sst2          # the "original" model
tinycompress evaluate runs/sst2/prune-v1
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinycompress.checkpoint.format import MANIFEST_NAME, MODEL_CONFIG_FILE, ONNX_FILE
from tinycompress.checkpoint.store import read_checkpoint
from tinycompress.config import load_config
from tinycompress.errors import TinycompressError
from tinycompress.training.evaluation import evaluate_predictor


def _looks_like_path(target: str) -> bool:
    """True for paths (absolute, ./, ../, ~, or under an existing folder); False for hub ids."""
    path = Path(target).expanduser()
    return path.is_absolute() or target.startswith((".", "~")) or (len(path.parts) > 1 and path.parent.is_dir())


def evaluate_target(target: str, *, config_file=None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics of a checkpoint / export folder, or of a pretrained model with a fresh head."""
    from tinycompress.inference.predictor import load_predictor, torch_predictor
    from tinycompress.models.pretrained import count_parameters, load_pretrained_classifier
    from tinycompress.models.run_setup import prepare

    path = Path(target).expanduser()
    if not path.exists() and _looks_like_path(target):
        raise TinycompressError(
            f"model or checkpoint folder not found: {target}", "pass an existing folder, 'default' or an HF model id"
        )
    checkpoint = read_checkpoint(path) if (path / MANIFEST_NAME).is_file() else None
    if (
        checkpoint is None
        and path.is_dir()
        and not (path / MODEL_CONFIG_FILE).is_file()
        and not (path / ONNX_FILE).is_file()
    ):
        raise TinycompressError(
            f"{path} holds no model", "pass a checkpoint folder, 'default', an HF id or a model folder"
        )
    base = checkpoint.manifest["config"] if checkpoint is not None else None
    config = load_config(config_file, overrides, base=base)
    spec, _, _ = prepare(config)
    if checkpoint is not None and config.task != checkpoint.task:
        raise TinycompressError(
            f"{path} was trained for task {checkpoint.task}, not {config.task}",
            "drop --task or pass a checkpoint of that task",
        )
    if checkpoint is not None or (path / ONNX_FILE).is_file():
        predictor = load_predictor(checkpoint if checkpoint is not None else path)
        parameters = count_parameters(predictor.model) if predictor.model is not None else None
    else:
        model, tokenizer, _ = load_pretrained_classifier(target, spec, config.seed)
        predictor = torch_predictor(model, tokenizer)
        parameters = count_parameters(model)
    metrics: dict[str, Any] = evaluate_predictor(predictor, config, spec)
    if parameters is not None:
        metrics["parameters"] = parameters
    return metrics
