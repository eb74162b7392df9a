"""Hugging Face model folders: save a model (pruned or not) with its tokenizer, build and load it back."""

from __future__ import annotations

import json
from pathlib import Path

from tinycompress.checkpoint.format import HEAD_ATTR, MODEL_CONFIG_FILE, STRUCTURE_ATTR, WEIGHTS_FILE
from tinycompress.checkpoint.store import Checkpoint
from tinycompress.errors import TinycompressError


def save_tokenizer(directory: Path, tokenizer, max_length: int) -> None:
    """The tokenizer files, with ``model_max_length`` set to the length the model was measured
    with, so plain ``AutoTokenizer(..., truncation=True)`` users truncate the same way."""
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(directory)


def save_config_and_tokenizer(directory: Path, model_config, tokenizer, max_length: int) -> None:
    """``config.json`` (labels, architecture, pruned structure) and the tokenizer files: what a
    folder holding an ONNX graph or int8 weights needs besides them to be loaded and run."""
    model_config.save_pretrained(directory)
    save_tokenizer(directory, tokenizer, max_length)


def save_hf_model(directory: Path, model, tokenizer, max_length: int) -> None:
    """HF-format weights (safetensors), config and tokenizer files.

    ``architectures`` in ``config.json`` names the Hugging Face class (``BertForSequenceClassification``
    also for a mean head, whose ``tinycompress_head`` field says how tinycompress rebuilds it), so
    tools that look the class up by name find it.
    """
    from tinycompress.models.heads import hf_class_name

    model.save_pretrained(directory, safe_serialization=True)
    architectures = [hf_class_name(model)]
    if model.config.architectures != architectures:
        # save_pretrained wrote (and set on the config) the subclass's name.
        model.config.architectures = architectures
        config_file = directory / MODEL_CONFIG_FILE
        saved = json.loads(config_file.read_text(encoding="utf-8"))
        saved["architectures"] = architectures
        config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_tokenizer(directory, tokenizer, max_length)


def build_model_skeleton(folder: str | Path, config=None):
    """An fp32 HF classifier with the architecture of ``folder/config.json`` (pruned shapes and
    head type included) and meaningless weights, in eval mode: the frame the weights are loaded into.

    ``config`` is that folder's config when the caller has already read it.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = config if config is not None else AutoConfig.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_config(config)
    structure = getattr(config, STRUCTURE_ATTR, None)
    if structure:
        from tinycompress.models.structure import apply_structure_

        apply_structure_(model, structure)
    if getattr(config, HEAD_ATTR, None):
        from tinycompress.models.heads import apply_head_

        apply_head_(model, getattr(config, HEAD_ATTR))
    return model.eval()


def load_hf_model(checkpoint: Checkpoint):
    """(model, tokenizer) from a PyTorch checkpoint, in eval mode, shapes rebuilt if pruned.

    Weights come from safetensors only; never from pickles.
    """
    path = checkpoint.path
    if not (path / WEIGHTS_FILE).is_file():
        raise TinycompressError(
            f"{path} holds no PyTorch weights ({WEIGHTS_FILE}); it is a {checkpoint.stage} checkpoint",
            "pass a finetune or prune checkpoint",
        )
    return load_hf_model_folder(path)


def load_hf_model_folder(path: Path):
    """(model, tokenizer) from a Hugging Face model folder (``config.json`` + safetensors weights),
    in eval mode, with the pruned shapes and head type its config records."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    if getattr(config, STRUCTURE_ATTR, None) or getattr(config, HEAD_ATTR, None):
        # Pruned layers have shapes config.json alone cannot express, and a mean head lacks the
        # [CLS] pooler: build the full model, shrink it to the recorded structure and head,
        # then load the weights strictly.
        from safetensors.torch import load_file

        model = build_model_skeleton(path, config)
        state = load_file(path / WEIGHTS_FILE)
        missing, unexpected = model.load_state_dict(state, strict=False)
        persistent_missing = [k for k in missing if not k.endswith("position_ids")]
        if persistent_missing or unexpected:
            raise TinycompressError(
                f"{path}: weights do not match the recorded structure ({(persistent_missing + unexpected)[:3]})",
                "re-run the prune stage",
            )
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)
