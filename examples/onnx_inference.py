#!/usr/bin/env python
"""Classify texts with a tinycompress ONNX export using only onnxruntime and the tokenizer files.

    python examples/onnx_inference.py runs/sst2/export-v1 "a gripping, funny film" "dull and far too long"
    python examples/onnx_inference.py runs/sst2/export-v1 --json "a gripping, funny film"

This script deliberately does not import tinycompress: an export folder is everything a
deployment needs.

* ``model.onnx``: inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` for BERT-like
  models), int64 [batch, seq]; output ``logits`` [batch, labels]. Both axes are dynamic.
* ``tokenizer.json`` / ``tokenizer_config.json``: the tokenizer, whose ``model_max_length`` is
  the max length the model was trained and measured with, so ``truncation=True`` is enough.
* ``config.json``: ``id2label`` (label names) and ``problem_type`` (regression for STS-B).

For pair tasks (MRPC, QNLI, ...) separate the two sentences with a tab.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from transformers import AutoTokenizer


def load(folder: Path):
    """(session, tokenizer, config dict) of an export folder."""
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return session, tokenizer, config


def logits_for(session, tokenizer, text: str) -> np.ndarray:
    """Logits [labels] of one text (a tab splits a sentence pair)."""
    encoded = tokenizer(*text.split("\t", 1), truncation=True, return_tensors="np")
    feed = {}
    for graph_input in session.get_inputs():
        if graph_input.name in encoded:
            feed[graph_input.name] = encoded[graph_input.name].astype(np.int64)
        else:  # token_type_ids for a tokenizer that does not make them: one segment
            feed[graph_input.name] = np.zeros_like(encoded["input_ids"], dtype=np.int64)
    return session.run(["logits"], feed)[0][0]


def describe(config: dict, text: str, logits: np.ndarray) -> dict:
    """``{"text", "label", "probability"}``, or ``{"text", "score"}`` for regression."""
    if config.get("problem_type") == "regression" or len(logits) == 1:
        return {"text": text, "score": float(logits[0])}
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    best = int(probabilities.argmax())
    label = config.get("id2label", {}).get(str(best), str(best))
    return {"text": text, "label": label, "probability": float(probabilities[best])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="an export folder holding model.onnx")
    parser.add_argument("texts", nargs="+", help="texts to classify")
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    args = parser.parse_args(argv)
    session, tokenizer, config = load(args.folder)
    results = [describe(config, text, logits_for(session, tokenizer, text)) for text in args.texts]
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return
    for result in results:
        value = f"{result['score']:.4f}" if "score" in result else f"{result['label']}  {result['probability']:.4f}"
        print(f"{value}  {result['text']}")


if __name__ == "__main__":
    main()
