"""Vocabulary pruning: drop the word-embedding rows a task never uses (as TextPruner does).

The word embedding is half of a small encoder (30,522 x 384 of all-MiniLM-L6-v2's 22.7 M
parameters), yet one GLUE task uses a fraction of the WordPiece vocabulary. The steps:

1. :func:`collect_token_counts` / :func:`count_ids` count the ids the task's texts produce,
   tokenized exactly as the model sees them (pairs together, ``max_length`` truncation);
2. :func:`select_vocab` keeps the seen ids (optionally by frequency / top-k) plus every special
   and added token, sorted;
3. :func:`prune_embeddings_` slices ``model.get_input_embeddings()`` to those rows and remaps
   ``config.vocab_size`` and the config's special token ids;
4. :func:`rewrite_tokenizer` returns a tokenizer that emits the new ids directly: new id = rank
   of the old id among the kept ones, in ``tokenizer.json`` (WordPiece vocab, added tokens,
   post-processor, padding) and ``vocab.txt`` alike.

A WordPiece word whose pieces are not all kept is re-segmented into kept pieces when it can be
(``playing`` -> ``play ##ing`` once ``playing`` is dropped), else it becomes one ``[UNK]`` (its
kept pieces are lost too). :func:`tokenization_report` measures both on a text set.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tinycompress.checkpoint.format import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, VOCAB_FILE
from tinycompress.data.batching import as_text_row, encode

# Config fields holding token ids; each must survive pruning and be remapped with the rows.
CONFIG_TOKEN_FIELDS = (
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "cls_token_id",
    "unk_token_id",
    "mask_token_id",
)


FP32_BYTES = 4


def count_ids(id_lists: Iterable[Sequence[int]]) -> Counter:
    """How often each token id occurs in ``id_lists`` (one list of ids per row)."""
    counts: Counter = Counter()
    for ids in id_lists:
        counts.update(ids)
    return counts


def collect_token_counts(tokenizer, texts: Sequence[str | Sequence[str]], max_length: int) -> Counter:
    """Token id -> count over ``texts`` (strings, or tuples for sentence pairs).

    Tokenized by :func:`tinycompress.data.batching.encode`, i.e. exactly as the model sees them at
    training and test time: both texts of a pair, special tokens added, truncated to
    ``max_length`` (tokens past it never reach the model, so they need no row).
    """
    from tinycompress.data.glue import Examples

    if max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length}")
    rows = [as_text_row(text) for text in texts]
    if not rows:
        return Counter()
    if len({len(row) for row in rows}) != 1:
        raise ValueError("texts must all be single sentences or all be pairs")
    return count_ids(encode(tokenizer, Examples(rows, None), max_length).input_ids)


def special_ids(tokenizer) -> set[int]:
    """Ids of every special token (pad, unk, cls, sep, mask, ...) and every added token."""
    ids = {int(i) for i in tokenizer.all_special_ids}
    ids |= {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    return ids


def config_token_ids(model) -> dict[str, int]:
    """The token ids ``model.config`` names (pad_token_id, ...), for those that are set."""
    found = {}
    for field in CONFIG_TOKEN_FIELDS:
        value = getattr(model.config, field, None)
        if isinstance(value, int) and not isinstance(value, bool):
            found[field] = value
    return found


def select_vocab(
    counts: Mapping[int, int],
    tokenizer,
    min_frequency: int = 1,
    top_k: int | None = None,
    always_keep: Iterable[int] = (),
) -> list[int]:
    """The sorted old ids to keep: ids seen at least ``min_frequency`` times, at most ``top_k``.

    ``top_k`` keeps the most frequent (ties: the lower id, so the choice is deterministic) and
    counts ordinary tokens only: every special and added token of ``tokenizer`` and every id in
    ``always_keep`` (e.g. the config's pad_token_id) is kept on top, seen or not.
    """
    if int(min_frequency) != min_frequency or min_frequency < 1:
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k}")
    forced = special_ids(tokenizer) | {int(i) for i in always_keep}
    frequent = [(int(i), int(c)) for i, c in counts.items() if c >= min_frequency and int(i) not in forced]
    frequent.sort(key=lambda item: (-item[1], item[0]))
    if top_k is not None:
        frequent = frequent[:top_k]
    return sorted(forced | {i for i, _ in frequent})


def _check_kept(kept_ids: Sequence[int], size: int | None = None) -> list[int]:
    kept = [int(i) for i in kept_ids]
    if not kept:
        raise ValueError("kept_ids is empty; keep at least the special tokens")
    if any(b <= a for a, b in zip(kept, kept[1:])):
        raise ValueError("kept_ids must be strictly increasing (sorted, no duplicates)")
    if kept[0] < 0 or (size is not None and kept[-1] >= size):
        raise ValueError(f"kept_ids must lie in 0..{(size or 0) - 1}, got {kept[0]}..{kept[-1]}")
    return kept


def id_map(kept_ids: Sequence[int]) -> dict[int, int]:
    """Old id -> new id: the rank of the old id among the kept ones (relative order is kept)."""
    return {old: new for new, old in enumerate(_check_kept(kept_ids))}


def embedding_bytes(model) -> int:
    """Bytes of the word embedding in fp32 (rows x width x 4), whatever dtype it is held in."""
    weight = model.get_input_embeddings().weight
    return int(weight.shape[0] * weight.shape[1] * FP32_BYTES)


def check_prunable(model, tokenizer) -> None:
    """Raise ValueError unless ``model`` + ``tokenizer`` can be vocabulary-pruned here.

    Needs a fast (tokenizers) WordPiece tokenizer, whose vocabulary can be cut without breaking
    merges as BPE's would, and a model without an output embedding (an LM head tied to the rows
    would have to shrink with them).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"vocabulary pruning needs a fast (tokenizers) tokenizer, not {type(tokenizer).__name__}")
    kind = json.loads(backend.to_str()).get("model", {}).get("type")
    if kind != "WordPiece":
        raise ValueError(f"vocabulary pruning supports WordPiece tokenizers (BERT, DistilBERT, MiniLM), not {kind}")
    if model.get_input_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no input embedding to prune")
    if model.get_output_embeddings() is not None:
        raise ValueError(
            f"{type(model).__name__} has an output embedding (LM head); only classifiers can be vocabulary-pruned"
        )
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the embedding only {rows} rows")


def prune_embeddings_(model, kept_ids: Sequence[int]) -> None:
    """Keep only rows ``kept_ids`` (sorted old ids) of the word embedding, in place.

    Row ``kept_ids[r]`` becomes row ``r``. ``config.vocab_size`` becomes ``len(kept_ids)`` and
    the config's token ids (pad_token_id, ...) and the embedding's padding_idx are remapped, so
    ``from_pretrained`` rebuilds the same shapes. Raises ValueError if one of those ids is dropped.
    """
    import torch
    from torch import nn

    old = model.get_input_embeddings()
    kept = _check_kept(kept_ids, old.num_embeddings)
    mapping = {o: n for n, o in enumerate(kept)}
    named = config_token_ids(model)
    if old.padding_idx is not None:
        named["embedding padding_idx"] = old.padding_idx
    dropped = {name: i for name, i in named.items() if i not in mapping}
    if dropped:
        raise ValueError(f"kept_ids drop ids the model needs: {dropped}")
    weight = old.weight
    new = nn.Embedding(
        len(kept),
        old.embedding_dim,
        padding_idx=None if old.padding_idx is None else mapping[old.padding_idx],
        max_norm=old.max_norm,
        norm_type=old.norm_type,
        scale_grad_by_freq=old.scale_grad_by_freq,
        sparse=old.sparse,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight[torch.tensor(kept, dtype=torch.long, device=weight.device)])
    new.weight.requires_grad_(weight.requires_grad)
    model.set_input_embeddings(new)
    model.config.vocab_size = len(kept)
    for field, value in config_token_ids(model).items():
        setattr(model.config, field, mapping[value])


def _remap_processor(processor: dict | None, mapping: Mapping[int, int]) -> None:
    """Remap, in place, the special token ids a tokenizers post-processor inserts."""
    if not processor:
        return

    def new(old: int, where: str) -> int:
        if int(old) not in mapping:
            raise ValueError(f"the post-processor's {where} (id {old}) is not among kept_ids")
        return mapping[int(old)]

    kind = processor.get("type")
    if kind == "TemplateProcessing":
        for name, spec in (processor.get("special_tokens") or {}).items():
            spec["ids"] = [new(i, name) for i in spec["ids"]]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            token, old = processor[key]
            processor[key] = [token, new(old, token)]
    elif kind == "Sequence":
        for inner in processor.get("processors") or []:
            _remap_processor(inner, mapping)


def rewrite_tokenizer_json(data: Mapping[str, Any], kept_ids: Sequence[int]) -> dict[str, Any]:
    """A copy of a ``tokenizer.json`` mapping whose ids are the ranks of ``kept_ids``.

    Rewrites the WordPiece ``model.vocab`` (dropped tokens vanish, so WordPiece yields [UNK] or
    other kept pieces for them), the ``added_tokens`` ids, the post-processor's special token ids
    and the padding id. Raises ValueError for a non-WordPiece model, an unknown kept id, or a
    dropped added token, [UNK] or post-processor token.
    """
    data = copy.deepcopy(dict(data))
    model = data.get("model") or {}
    if model.get("type") != "WordPiece":
        raise ValueError(f"vocabulary pruning supports WordPiece tokenizers, not {model.get('type')}")
    mapping = id_map(kept_ids)
    id_to_token = {int(i): token for token, i in model["vocab"].items()}
    added = {int(a["id"]): a["content"] for a in data.get("added_tokens") or []}
    unknown = [i for i in mapping if i not in id_to_token and i not in added]
    if unknown:
        raise ValueError(f"kept_ids hold ids the tokenizer does not have, e.g. {unknown[:3]}")
    dropped_added = sorted(content for i, content in added.items() if i not in mapping)
    if dropped_added:
        raise ValueError(f"kept_ids drop added/special tokens {dropped_added[:5]}; keep every one (see special_ids)")
    unk = model.get("unk_token")
    if unk is not None and model["vocab"].get(unk) not in mapping:
        raise ValueError(f"kept_ids drop the unknown token {unk}; WordPiece needs it for dropped words")
    model["vocab"] = {id_to_token[old]: new for old, new in mapping.items() if old in id_to_token}
    for token in data.get("added_tokens") or []:
        token["id"] = mapping[int(token["id"])]
    _remap_processor(data.get("post_processor"), mapping)
    padding = data.get("padding")
    if padding and padding.get("pad_id") is not None:
        if int(padding["pad_id"]) not in mapping:
            raise ValueError(f"kept_ids drop the padding id {padding['pad_id']}")
        padding["pad_id"] = mapping[int(padding["pad_id"])]
    return data


def rewrite_tokenizer_files(folder: str | Path, kept_ids: Sequence[int]) -> None:
    """Rewrite a saved tokenizer in ``folder`` to the kept vocabulary, consistently.

    ``tokenizer.json`` (see :func:`rewrite_tokenizer_json`), ``vocab.txt`` (line = id, so the
    kept lines in order) and the ids keying ``added_tokens_decoder`` in
    ``tokenizer_config.json``, whichever of them the folder holds.
    """
    folder = Path(folder)
    json_path, txt_path, config_path = folder / TOKENIZER_FILE, folder / VOCAB_FILE, folder / TOKENIZER_CONFIG_FILE
    if not json_path.is_file() and not txt_path.is_file():
        raise ValueError(f"{folder} holds neither {TOKENIZER_FILE} nor {VOCAB_FILE}")
    mapping = id_map(kept_ids)
    data = json.loads(json_path.read_text(encoding="utf-8")) if json_path.is_file() else None
    if txt_path.is_file():
        lines = txt_path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if data is not None:
            # Both files exist: they must agree now, or the rewrite would make them disagree.
            vocab = data["model"]["vocab"]
            if any(vocab.get(token) != i for i, token in enumerate(lines)) or len(lines) != len(vocab):
                raise ValueError(f"{txt_path} and {json_path} disagree; cannot rewrite them consistently")
        # Ids past the end of vocab.txt are added tokens, which live in tokenizer.json only.
        txt_path.write_text("".join(lines[old] + "\n" for old in mapping if old < len(lines)), encoding="utf-8")
    if data is not None:
        json_path.write_text(
            json.dumps(rewrite_tokenizer_json(data, kept_ids), ensure_ascii=False, indent=2), encoding="utf-8"
        )
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        decoder = config.get("added_tokens_decoder")
        if decoder:
            missing = [v.get("content") for k, v in decoder.items() if int(k) not in mapping]
            if missing:
                raise ValueError(f"kept_ids drop added tokens {missing[:5]}")
            config["added_tokens_decoder"] = {str(mapping[int(k)]): v for k, v in decoder.items()}
            config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")


def rewrite_tokenizer(tokenizer, kept_ids: Sequence[int]):
    """A new tokenizer (same class, same settings) whose ids are the ranks of ``kept_ids``.

    Built by saving ``tokenizer``, rewriting the files (:func:`rewrite_tokenizer_files`) and
    loading them back with ``AutoTokenizer``, exactly as a pruned checkpoint folder will be
    loaded. Every special token is checked to have its remapped id.
    """
    from transformers import AutoTokenizer

    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"vocabulary pruning needs a fast (tokenizers) tokenizer, not {type(tokenizer).__name__}")
    mapping = id_map(kept_ids)
    with tempfile.TemporaryDirectory(prefix="tinycompress-vocab-") as folder:
        tokenizer.save_pretrained(folder)
        rewrite_tokenizer_files(folder, kept_ids)
        new = AutoTokenizer.from_pretrained(folder)
    # The saved files were the only source; fail here rather than on a silently wrong id later.
    for token, old in zip(tokenizer.all_special_tokens, tokenizer.convert_tokens_to_ids(tokenizer.all_special_tokens)):
        if new.convert_tokens_to_ids(token) != mapping[old]:
            raise ValueError(
                f"rewritten tokenizer maps {token} to {new.convert_tokens_to_ids(token)}, expected {mapping[old]}"
            )
    if len(new) != len(mapping):
        raise ValueError(f"rewritten tokenizer has {len(new)} tokens, expected {len(mapping)}")
    return new


def oov_rate(id_lists: Iterable[Sequence[int]], kept_ids: Iterable[int], ignore_ids: Iterable[int] = ()) -> float:
    """Fraction of the tokens in ``id_lists`` (old ids) that are not kept.

    Ids in ``ignore_ids`` (pass the special ids: [CLS]/[SEP] are kept by construction and would
    only dilute the rate) are left out of both counts; 0.0 when no token is left.
    """
    kept, ignore = set(kept_ids), set(ignore_ids)
    total = missing = 0
    for ids in id_lists:
        for i in ids:
            if i in ignore:
                continue
            total += 1
            missing += i not in kept
    return missing / total if total else 0.0


def tokenization_report(
    old_tokenizer, new_tokenizer, texts: Sequence[str | Sequence[str]], max_length: int, kept_ids: Sequence[int]
) -> dict[str, Any]:
    """What vocabulary pruning does to ``texts``, compared word by word (same pre-tokenization).

    Keys (rates over non-special tokens): ``tokens`` (under the old tokenizer), ``oov_rate``
    (share of those not kept), ``unk_rate_before`` / ``unk_rate_after``, ``rows_with_oov``
    (share of rows), and over words holding a dropped piece: ``words_affected``,
    ``words_to_unk`` (the whole word is now one [UNK]), ``words_resegmented`` (now spelled with
    other kept pieces), ``kept_pieces_lost`` (kept pieces inside words that became [UNK]).
    """
    rows = [as_text_row(text) for text in texts]
    kept = set(_check_kept(kept_ids))
    report: dict[str, Any] = {"rows": len(rows)}
    if not rows:
        return report | {
            "tokens": 0,
            "oov_rate": 0.0,
            "unk_rate_before": 0.0,
            "unk_rate_after": 0.0,
            "rows_with_oov": 0.0,
            "words_affected": 0,
            "words_to_unk": 0,
            "words_resegmented": 0,
            "kept_pieces_lost": 0,
        }
    columns = [list(c) for c in zip(*rows)]

    def encode(tokenizer):
        return tokenizer(*columns, truncation=True, max_length=max_length, padding=False)

    old, new = encode(old_tokenizer), encode(new_tokenizer)
    old_unk, new_unk = old_tokenizer.unk_token_id, new_tokenizer.unk_token_id
    # [UNK] is special but is what the rates count, so only the other specials are skipped.
    old_special, new_special = special_ids(old_tokenizer) - {old_unk}, special_ids(new_tokenizer) - {new_unk}
    tokens = oov = unk_before = tokens_after = unk_after = rows_with_oov = 0
    affected = to_unk = resegmented = lost = 0
    for row in range(len(rows)):
        old_words = _words(old, row, old_special)
        new_words = _words(new, row, new_special)
        row_oov = False
        for word, pieces in old_words.items():
            tokens += len(pieces)
            unk_before += sum(p == old_unk for p in pieces)
            dropped = [p for p in pieces if p not in kept]
            oov += len(dropped)
            if not dropped:
                continue
            row_oov, affected = True, affected + 1
            # Truncation can cut a re-segmented word differently; count only words present in both.
            if new_words.get(word) == [new_unk]:
                to_unk += 1
                lost += len(pieces) - len(dropped) - sum(p == old_unk for p in pieces)
            elif word in new_words:
                resegmented += 1
        rows_with_oov += row_oov
        for pieces in new_words.values():
            tokens_after += len(pieces)
            unk_after += sum(p == new_unk for p in pieces)
    return report | {
        "tokens": tokens,
        "oov_rate": oov / tokens if tokens else 0.0,
        "unk_rate_before": unk_before / tokens if tokens else 0.0,
        "unk_rate_after": unk_after / tokens_after if tokens_after else 0.0,
        "rows_with_oov": rows_with_oov / len(rows),
        "words_affected": affected,
        "words_to_unk": to_unk,
        "words_resegmented": resegmented,
        "kept_pieces_lost": lost,
    }


def _words(encoding, row: int, specials: set[int]) -> dict[tuple[int, int], list[int]]:
    """(sequence, word index) -> the non-special ids of that word, for one encoded row."""
    words: dict[tuple[int, int], list[int]] = {}
    ids = encoding["input_ids"][row]
    for token_id, word, sequence in zip(ids, encoding.word_ids(row), encoding.sequence_ids(row)):
        if word is None or token_id in specials:
            continue
        words.setdefault((sequence, word), []).append(token_id)
    return words
