"""Parity of an exported or quantized model against PyTorch: max |delta| of the logits and label agreement per batch."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tinycompress.data.batching import as_text_row, encode_rows
from tinycompress.errors import TinycompressError
from tinycompress.exporters.onnx import feed_for, model_input_names

# Rows of each parity batch: the shortest texts, texts joined past max_length, a mix of lengths.
PARITY_ROWS = {"short": 4, "max_length": 4, "mixed": 8}


def torch_logits_fn(model: torch.nn.Module) -> Callable[..., np.ndarray]:
    """Wrap a torch classifier as ``fn(input_ids, attention_mask, token_type_ids=None)``
    returning numpy logits, the same call signature as ``OnnxClassifier``.

    Runs under ``no_grad`` in whatever mode the model is in (call ``.eval()`` first).
    """
    names = model_input_names(model)

    def run(input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> np.ndarray:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feed = {k: torch.from_numpy(v) for k, v in feed_for(batch, names).items()}
        with torch.no_grad():
            out = model(**feed)
        logits = out[0] if isinstance(out, tuple) else getattr(out, "logits", out)
        return logits.detach().float().cpu().numpy()

    return run


@dataclass(frozen=True)
class ParityResult:
    """Comparison of candidate vs reference logits on one batch."""

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float  # NaN if either side produced NaN
    label_agreement_pct: float  # % of rows whose argmax label matches
    atol: float
    passed: bool  # max_abs_diff <= atol (NaN never passes)


def _named_batches(batches) -> list[tuple[str, Mapping[str, Any]]]:
    items = list(batches.items()) if isinstance(batches, Mapping) else [(f"batch{i}", b) for i, b in enumerate(batches)]
    if not items:
        raise ValueError("parity_check needs at least one batch")
    return [(str(name), batch) for name, batch in items]


def parity_check(
    reference_fn: Callable[..., Any],
    candidate_fn: Callable[..., Any],
    batches: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    *,
    atol: float,
) -> list[ParityResult]:
    """Compare two logits functions batch by batch.

    Args:
        reference_fn, candidate_fn: called as ``fn(**batch)`` and returning logits
            [batch, num_labels] (numpy or torch); e.g. ``torch_logits_fn(model)`` and an
            ``OnnxClassifier``. Batches must therefore hold only model inputs.
        batches: ``{name: batch}`` or a list of batches (named ``batch0``, ``batch1``...).
        atol: largest allowed ``max |reference - candidate|``.

    Returns:
        One ``ParityResult`` per batch. Raises ``ValueError`` if the two functions return
        logits of different shapes (that is a bug, not a tolerance question).
    """
    if not isinstance(atol, (int, float)) or not atol >= 0:
        raise ValueError(f"atol must be a number >= 0, got {atol!r}")
    results = []
    for name, batch in _named_batches(batches):
        ref = _as_logits(reference_fn(**batch))
        cand = _as_logits(candidate_fn(**batch))
        if ref.shape != cand.shape:
            raise ValueError(f"batch {name!r}: logits shape {cand.shape} != reference {ref.shape}")
        diff = float(np.max(np.abs(ref - cand))) if ref.size else 0.0
        if np.isnan(ref).any() or np.isnan(cand).any():
            diff = float("nan")
        agree = float(np.mean(ref.argmax(-1) == cand.argmax(-1)) * 100.0) if ref.size else 100.0
        passed = math.isfinite(diff) and diff <= atol
        results.append(ParityResult(name, tuple(ref.shape), diff, agree, float(atol), passed))
    return results


def _as_logits(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def format_parity(results: Iterable[ParityResult]) -> list[str]:
    """Render results as lines like ``✓ short  max|Δ|=1.2e-06 labels 100.0%``."""
    results = list(results)
    width = max((len(r.name) for r in results), default=0)
    return [
        f"{'✓' if r.passed else '✗'} {r.name:<{width}}  max|Δ|={r.max_abs_diff:.1e} labels {r.label_agreement_pct:.1f}%"
        for r in results
    ]


def parity_batches(tokenizer, rows: Sequence, max_length: int) -> dict[str, dict]:
    """``{"short", "max_length", "mixed"}`` batches (int64 torch tensors) of real test rows.

    ``short``: the shortest rows. ``max_length``: consecutive rows joined until longer than
    ``max_length`` tokens, then truncated, so every row is exactly at the limit (real sentences
    are rarely that long). ``mixed``: rows spread over the length distribution, padded to the
    longest. Rows are strings or tuples (pair tasks).
    """
    rows = [as_text_row(r) for r in rows]
    if not rows:
        raise TinycompressError(
            "the test split is empty; parity needs test sentences", "check data.max_test_samples and the data folder"
        )
    lengths = [len(ids) for ids in encode_rows(tokenizer, rows, max_length, return_tensors=None)["input_ids"]]
    by_length = sorted(range(len(rows)), key=lambda i: (lengths[i], i))
    mixed_count = min(PARITY_ROWS["mixed"], len(rows))
    mixed = [by_length[round(k * (len(rows) - 1) / max(mixed_count - 1, 1))] for k in range(mixed_count)]
    return {
        "short": encode_rows(tokenizer, [rows[i] for i in by_length[: PARITY_ROWS["short"]]], max_length),
        "max_length": encode_rows(
            tokenizer, _long_rows(tokenizer, rows, max_length, PARITY_ROWS["max_length"]), max_length
        ),
        "mixed": encode_rows(tokenizer, [rows[i] for i in mixed], max_length),
    }


def _long_rows(tokenizer, rows: list[tuple], max_length: int, count: int) -> list[tuple]:
    """``count`` rows, each consecutive rows joined (column by column) past ``max_length`` tokens."""
    long_rows = []
    for start in range(count):
        joined = rows[start % len(rows)]
        # Bounded: every row adds at least a word; the cap only guards against all-empty texts.
        for step in range(1, 4 * max_length):
            if len(encode_rows(tokenizer, [joined], max_length + 1, return_tensors=None)["input_ids"][0]) > max_length:
                break
            extra = rows[(start + step) % len(rows)]
            joined = tuple(f"{a} {b}" for a, b in zip(joined, extra))
        long_rows.append(joined)
    return long_rows
