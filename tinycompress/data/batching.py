"""Tokenized splits and their batches: encoding, seeded subsets, length-grouped batch order, padding."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tinycompress.data.glue import Examples

# The inputs an HF text classifier may take, in the order ONNX graphs and traced modules declare them.
MODEL_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def as_text_row(row: str | Sequence[str]) -> tuple[str, ...]:
    """A task row as a tuple of texts: a string is a one-sentence row, a sequence of strings
    (a sentence pair) becomes a tuple of them."""
    return (row,) if isinstance(row, str) else tuple(row)


def zero_token_type_ids(input_ids):
    """``token_type_ids`` for inputs that come without them (tokenizers without segments, callers
    that leave them out): every token in segment 0, shaped like ``input_ids``.

    A numpy array gets a numpy array, anything else a torch tensor, of the same integer type.
    """
    import numpy as np

    if isinstance(input_ids, np.ndarray):
        return np.zeros_like(input_ids)
    import torch

    return torch.zeros_like(torch.as_tensor(input_ids))


@dataclass
class Encoded:
    """Token ids per row (unpadded) and labels; padding happens per batch."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list | None

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, indices: Sequence[int]) -> Encoded:
        """These rows, in the order of ``indices``."""
        return Encoded(
            [self.input_ids[i] for i in indices],
            None if self.token_type_ids is None else [self.token_type_ids[i] for i in indices],
            None if self.labels is None else [self.labels[i] for i in indices],
        )


def encode_rows(
    tokenizer, rows: Sequence[str | Sequence[str]], max_length: int, *, return_tensors: str | None = "pt"
) -> dict:
    """Model inputs (only :data:`MODEL_INPUT_NAMES`) for text rows, truncated to ``max_length`` tokens.

    The one place texts become token ids. A row is a string or a tuple of one or two strings
    (a sentence pair); all rows must have the same number. ``return_tensors`` "pt" or "np":
    int64 tensors / arrays padded to the longest row; None: unpadded lists of ids per row.
    """
    rows = [as_text_row(row) for row in rows]
    columns = [list(column) for column in zip(*rows)] or [[]]
    padded = return_tensors is not None
    encoded = tokenizer(*columns, truncation=True, max_length=max_length, padding=padded, return_tensors=return_tensors)
    return {name: value for name, value in encoded.items() if name in MODEL_INPUT_NAMES}


def encode(tokenizer, examples: Examples, max_length: int) -> Encoded:
    """Token ids of every row of a split, unpadded (batches are padded by :func:`collate`)."""
    out = encode_rows(tokenizer, examples.texts, max_length, return_tensors=None)
    return Encoded(out["input_ids"], out.get("token_type_ids"), examples.labels)


def subset_rows(encoded: Encoded, rows: int, seed: int) -> Encoded:
    """``rows`` seeded-random rows of ``encoded`` (all of them when there are fewer), in order.

    Random rather than the first rows: a train split is in file order, which may be sorted by
    source or label.
    """
    chosen = sorted(random.Random(seed).sample(range(len(encoded)), min(rows, len(encoded))))

    def pick(column):
        return None if column is None else [column[i] for i in chosen]

    return Encoded(pick(encoded.input_ids), pick(encoded.token_type_ids), pick(encoded.labels))


def batch_order(
    lengths: Sequence[int], batch_size: int, *, shuffle: bool, group_by_length: bool, seed: int
) -> list[list[int]]:
    """Row indices per batch.

    With grouping, rows are shuffled, cut into mega-batches of 50 batches, sorted by length
    inside each, and the batches shuffled again (as HF's LengthGroupedSampler): padding drops
    to nearly nothing while the batches stay random.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        mega = batch_size * 50
        order = [i for s in range(0, len(order), mega) for i in sorted(order[s : s + mega], key=lambda j: -lengths[j])]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if shuffle and group_by_length:
        rng.shuffle(batches)
    return batches


def padding_id(tokenizer) -> int:
    """The id to pad batches with; 0 for tokenizers that define no pad token (padding is
    masked out by the attention mask, so any valid id works)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def collate(
    encoded: Encoded, indices: Sequence[int], pad_id: int, *, regression: bool, with_labels: bool = True
) -> dict:
    """A padded batch of tensors for ``model(**batch)``."""
    import torch

    width = max(len(encoded.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    types = torch.zeros((len(indices), width), dtype=torch.long) if encoded.token_type_ids is not None else None
    for row, i in enumerate(indices):
        n = len(encoded.input_ids[i])
        ids[row, :n] = torch.tensor(encoded.input_ids[i])
        mask[row, :n] = 1
        if types is not None:
            types[row, :n] = torch.tensor(encoded.token_type_ids[i])
    batch = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        batch["token_type_ids"] = types
    if with_labels and encoded.labels is not None:
        dtype = torch.float32 if regression else torch.long
        batch["labels"] = torch.tensor([encoded.labels[i] for i in indices], dtype=dtype)
    return batch


def iterate_batches(
    encoded: Encoded,
    batch_size: int,
    pad_id: int,
    *,
    regression: bool,
    shuffle: bool = False,
    group_by_length: bool = True,
    seed: int = 0,
) -> Iterator[tuple[list[int], dict]]:
    """(row indices, padded batch) pairs covering every row once."""
    lengths = [len(x) for x in encoded.input_ids]
    for indices in batch_order(lengths, batch_size, shuffle=shuffle, group_by_length=group_by_length, seed=seed):
        yield indices, collate(encoded, indices, pad_id, regression=regression)
