"""Run any model folder on texts: label and probability per text (regression: the score).

    tinycompress predict runs/sst2/export-v1 "a gripping, funny film" "dull and far too long"
    tinycompress predict runs/sst2/quantize-v1 --file reviews.txt --json

The folder may be an export (ONNX through ONNX Runtime, TorchScript through ``torch.jit``) or a
finetune / prune / quantize checkpoint (see :func:`tinycompress.inference.predictor.load_predictor`); its
own tokenizer is used. Texts longer than the model's max length are truncated; an empty text is
a valid (if uninformative) input. For pair tasks (MRPC, QNLI, ...) separate the two sentences
with a tab.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tinycompress.data.batching import encode, padding_id
from tinycompress.data.glue import Examples
from tinycompress.errors import TinycompressError
from tinycompress.text_files import read_text

DEFAULT_BATCH_SIZE = 32


def read_texts(texts: Sequence[str] | None, file: str | Path | None) -> list[str]:
    """The texts given as arguments followed by those in ``file`` (one per line, kept in order,
    blank lines included, so outputs line up with input lines)."""
    collected = list(texts or [])
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise TinycompressError(f"text file not found: {path}", "pass an existing file with one text per line")
        collected += read_text(path, what="text file").splitlines()
    if not collected:
        raise TinycompressError(
            "no texts to predict", 'pass texts as arguments (tinycompress predict FOLDER "text" ...) or --file F'
        )
    return collected


def _rows(text: str, segments: int | None) -> tuple[str, ...]:
    # A tab separates the two sentences of a pair task. A one-sentence task's text is one segment
    # whatever it holds; for a folder that does not say its task, a tab still splits.
    if segments == 1 or "\t" not in text:
        return (text,)
    return tuple(text.split("\t", 1))


def text_logits(predictor, texts: Sequence[str], batch_size: int) -> np.ndarray:
    """Logits [len(texts), labels]. Texts with the same number of segments are encoded together
    and run ``batch_size`` consecutive texts at a time (the order they were given, not grouped
    by length) through :func:`tinycompress.training.evaluation.predict_logits`."""
    from tinycompress.training.evaluation import predict_logits

    rows = [_rows(t, predictor.segments) for t in texts]
    out: np.ndarray | None = None
    for arity in sorted({len(r) for r in rows}):
        indices = [i for i, r in enumerate(rows) if len(r) == arity]
        encoded = encode(predictor.tokenizer, Examples([rows[i] for i in indices], None), predictor.max_length)
        logits = predict_logits(
            None,
            encoded,
            batch_size=batch_size,
            pad_id=padding_id(predictor.tokenizer),
            forward=predictor.forward,
            group_by_length=False,
        )
        if out is None:
            out = np.zeros((len(texts), logits.shape[-1]), dtype=np.float32)
        out[indices] = logits
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def to_predictions(predictor, texts: Sequence[str], logits: np.ndarray) -> list[dict[str, Any]]:
    """One dict per text: ``{"text", "label", "probability", "probabilities"}``, or for
    regression ``{"text", "score"}``."""
    if predictor.is_regression:
        return [{"text": t, "score": float(row[0])} for t, row in zip(texts, logits)]
    names = predictor.label_names
    predictions = []
    for text, probs in zip(texts, _softmax(logits)):
        best = int(probs.argmax())
        predictions.append(
            {
                "text": text,
                "label": names[best] if best < len(names) else str(best),
                "probability": float(probs[best]),
                "probabilities": {names[i] if i < len(names) else str(i): float(p) for i, p in enumerate(probs)},
            }
        )
    return predictions


def predict(
    path: str | Path, texts: Sequence[str], *, batch_size: int = DEFAULT_BATCH_SIZE, threads: int | None = None
) -> list[dict[str, Any]]:
    """Predictions of the model folder ``path`` for ``texts`` (see :func:`to_predictions`).

    Raises TinycompressError for no texts, a batch size below 1, or a missing / model-less folder.
    """
    from tinycompress.inference.predictor import load_predictor
    from tinycompress.models.run_setup import configure_threads, quiet_hf

    if not texts:
        raise TinycompressError("no texts to predict", "pass texts as arguments or --file F")
    if batch_size < 1:
        raise TinycompressError(f"--batch-size must be at least 1, got {batch_size}")
    if threads is not None:
        # The schema's own check, so --threads means and is refused the same in every command.
        from tinycompress.config import load_config

        threads = load_config(overrides={"threads": threads}).threads
    quiet_hf()
    predictor = load_predictor(path, threads=configure_threads(threads))
    return to_predictions(predictor, texts, text_logits(predictor, texts, batch_size))


def format_prediction(prediction: dict[str, Any], width: int = 80) -> str:
    """``positive  0.9731  a gripping, funny film`` (texts shortened to ``width`` characters)."""
    text = " ".join(prediction["text"].split())
    text = text if len(text) <= width else text[: width - 1] + "…"
    if "score" in prediction:
        return f"{prediction['score']:.4f}  {text}"
    return f"{prediction['label']}  {prediction['probability']:.4f}  {text}"
