"""A pruned model's structure: kept heads and FFN neurons per layer, slicing layers to it, and rebuilding it on load.

transformers 5.x has no ``prune_heads``, so removal is done here: Q/K/V output rows,
output-projection input columns, FFN-in rows and FFN-out columns are sliced into new, smaller
``nn.Linear`` modules. This works because BERT and DistilBERT attention in transformers 5.x
reshape with ``-1`` heads, so a narrower Linear simply means fewer heads.

The resulting structure is recorded in ``model.config.tinycompress_pruning`` (saved to
config.json by ``save_pretrained``) so that ``apply_structure_`` can rebuild the same shapes on
a freshly built model before loading a state dict.

Head indices in ``heads_to_keep`` always refer to the *current* positions in the model;
``heads_kept`` in the recorded structure always holds *original* head ids (positions in the
unpruned model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from tinycompress.models.arch import ArchSpec, get_arch, get_module, layers, set_module
from tinycompress.models.config_fields import STRUCTURE_ATTR


def head_counts(model: nn.Module) -> list[int]:
    """Number of attention heads currently present in each encoder layer."""
    spec = get_arch(model)
    head_size = spec.head_size(model.config)
    return [get_module(layer, spec.query).out_features // head_size for layer in layers(model)]


def ffn_sizes(model: nn.Module) -> list[int]:
    """Number of FFN neurons currently present in each encoder layer."""
    spec = get_arch(model)
    return [get_module(layer, spec.ffn_in).out_features for layer in layers(model)]


def current_head_ids(model: nn.Module) -> list[list[int]]:
    """Original head id of every head currently in the model, per layer.

    Taken from ``config.tinycompress_pruning`` when it matches the module
    shapes; an unpruned model gets ``0..H-1``. Raises ValueError when the model
    is pruned but the recorded structure does not describe it.
    """
    spec = get_arch(model)
    counts = head_counts(model)
    structure = getattr(model.config, STRUCTURE_ATTR, None)
    if structure and [len(ids) for ids in structure.get("heads_kept", [])] == counts:
        return [list(ids) for ids in structure["heads_kept"]]
    full = spec.num_heads(model.config)
    if all(count == full for count in counts):
        return [list(range(full)) for _ in counts]
    raise ValueError(
        f"Model head counts {counts} do not match config.{STRUCTURE_ATTR}; "
        "the model was resized outside tinycompress.models.structure"
    )


def _sliced_linear(linear: nn.Linear, index: Tensor, dim: int) -> nn.Linear:
    """New Linear keeping ``index`` along weight dim 0 (outputs) or 1 (inputs)."""
    index = index.to(linear.weight.device)
    weight = linear.weight.detach().index_select(dim, index)
    # Built on the meta device: initialising weights we overwrite anyway is wasted work.
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        bias = linear.bias.detach()
        bias = bias.index_select(0, index) if dim == 0 else bias.clone()
        new.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    new.train(linear.training)
    return new


def _validate_keep(keep: Sequence[Sequence[int]], counts: Sequence[int], unit: str) -> list[list[int]]:
    """Sorted, validated copy of per-layer kept indices."""
    if len(keep) != len(counts):
        raise ValueError(f"Expected kept {unit} for {len(counts)} layers, got {len(keep)}")
    result = []
    for layer, (indices, count) in enumerate(zip(keep, counts)):
        indices = sorted(int(i) for i in indices)
        if not indices:
            raise ValueError(f"Layer {layer} would keep no {unit}; at least one is required")
        if len(set(indices)) != len(indices) or indices[0] < 0 or indices[-1] >= count:
            raise ValueError(f"Layer {layer}: kept {unit} {indices} must be unique and within 0..{count - 1}")
        result.append(indices)
    return result


def _slice_heads(model: nn.Module, spec: ArchSpec, keep: list[list[int]]) -> None:
    head_size = spec.head_size(model.config)
    for layer, indices in zip(layers(model), keep):
        heads = torch.tensor(indices)
        rows = (heads[:, None] * head_size + torch.arange(head_size)).flatten()
        for path in (spec.query, spec.key, spec.value):
            set_module(layer, path, _sliced_linear(get_module(layer, path), rows, dim=0))
        set_module(layer, spec.attn_out, _sliced_linear(get_module(layer, spec.attn_out), rows, dim=1))
        # Forward reshapes with -1 heads, but keep the attributes truthful
        # for code that reads them (e.g. exporters, repr, attention backends).
        attention = get_module(layer, spec.attention_module)
        if spec.head_count_attr:
            setattr(attention, spec.head_count_attr, len(indices))
        if spec.all_head_size_attr:
            setattr(attention, spec.all_head_size_attr, len(indices) * head_size)


def _slice_neurons(model: nn.Module, spec: ArchSpec, keep: list[list[int]]) -> None:
    for layer, indices in zip(layers(model), keep):
        index = torch.tensor(indices)
        set_module(layer, spec.ffn_in, _sliced_linear(get_module(layer, spec.ffn_in), index, dim=0))
        set_module(layer, spec.ffn_out, _sliced_linear(get_module(layer, spec.ffn_out), index, dim=1))


def _record_structure(model: nn.Module, head_ids: list[list[int]]) -> None:
    setattr(
        model.config,
        STRUCTURE_ATTR,
        {"heads_kept": [[int(i) for i in ids] for ids in head_ids], "intermediate_sizes": ffn_sizes(model)},
    )


@torch.no_grad()
def prune_heads_(model: nn.Module, heads_to_keep: Sequence[Sequence[int]]) -> None:
    """Remove attention heads in place, keeping ``heads_to_keep[l]`` (current
    positions) in layer l, and update ``config.tinycompress_pruning``."""
    spec = get_arch(model)
    keep = _validate_keep(heads_to_keep, head_counts(model), "heads")
    original_ids = current_head_ids(model)
    _slice_heads(model, spec, keep)
    _record_structure(model, [[ids[i] for i in k] for ids, k in zip(original_ids, keep)])


@torch.no_grad()
def prune_neurons_(model: nn.Module, neurons_to_keep: Sequence[Sequence[int]]) -> None:
    """Remove FFN neurons in place, keeping ``neurons_to_keep[l]`` (current
    positions) in layer l, and update ``config.tinycompress_pruning``."""
    spec = get_arch(model)
    keep = _validate_keep(neurons_to_keep, ffn_sizes(model), "neurons")
    original_ids = current_head_ids(model)
    _slice_neurons(model, spec, keep)
    _record_structure(model, original_ids)


@torch.no_grad()
def apply_structure_(model: nn.Module, structure: Mapping | None = None) -> None:
    """Resize a freshly built, unpruned model to a recorded pruning structure.

    ``structure`` defaults to ``model.config.tinycompress_pruning`` (present when
    the config came from a pruned checkpoint's config.json). Weight values are
    not meaningful afterwards: load the pruned state dict next.
    """
    spec = get_arch(model)
    structure = structure if structure is not None else getattr(model.config, STRUCTURE_ATTR, None)
    if not structure or "heads_kept" not in structure or "intermediate_sizes" not in structure:
        raise ValueError("structure must be a dict with 'heads_kept' and 'intermediate_sizes'")
    n_layers = len(layers(model))
    full_heads, full_ffn = spec.num_heads(model.config), spec.ffn_size(model.config)
    if head_counts(model) != [full_heads] * n_layers or ffn_sizes(model) != [full_ffn] * n_layers:
        raise ValueError("apply_structure_ needs a freshly built, unpruned model")
    heads_kept = _validate_keep(structure["heads_kept"], [full_heads] * n_layers, "heads")
    sizes = [int(s) for s in structure["intermediate_sizes"]]
    if len(sizes) != n_layers or not all(1 <= s <= full_ffn for s in sizes):
        raise ValueError(f"intermediate_sizes must be {n_layers} ints in 1..{full_ffn}, got {sizes}")
    # In the unpruned model position == original id, so the recorded ids are the positions.
    _slice_heads(model, spec, heads_kept)
    _slice_neurons(model, spec, [list(range(s)) for s in sizes])
    _record_structure(model, heads_kept)
