"""A pruned model's structure: kept heads and FFN neurons per layer, slicing layers to it, and rebuilding it on load.

transformers 5.x has no ``prune_heads``, so removal is done here: Q/K/V output rows,
output-projection input columns, FFN-in rows and FFN-out columns are sliced into new, smaller
``nn.Linear`` modules. This works because BERT and DistilBERT attention in transformers 5.x
reshape with ``-1`` heads, so a narrower Linear simply means fewer heads.

Zero-width blocks
-----------------
A layer may keep no heads, or no FFN neurons. Its attention block (or FFN) is then *skipped*:
the module named by :attr:`ArchSpec.attn_skip` (``ffn_skip``) becomes a :class:`SkippedBlock`
computing ``LayerNorm(x + b)``, ``b`` the output projection's bias, which is exactly what the
block computes with every unit masked. It keeps that bias (a :class:`BiasOnly` at the output
projection's path) and the LayerNorm at their usual paths, so their state-dict keys do not
change, and it holds no zero-width Linear (zero-size tensors break ONNX export and ORT int8
quantization). A layer left with neither heads nor neurons is removed from the encoder and the
config's layer count lowered. Unlike skipping, this is *not* output-preserving: the removed layer
still computed ``LN2(LN1(x + b1) + b2)``, the layer-removed model computes ``x``.

Recorded structure
------------------
The resulting structure is recorded in ``model.config.tinycompress_pruning`` (saved to
config.json by ``save_pretrained``) so that ``apply_structure_`` can rebuild the same shapes on
a freshly built model before loading a state dict::

    {"heads_kept": [[original head ids], ...],   # per present layer; [] = attention skipped
     "intermediate_sizes": [int, ...],            # per present layer; 0 = FFN skipped
     "layers_kept": [original layer ids, ...],    # only once a layer has been removed,
     "layers_total": int}                         # with the unpruned layer count

Head indices in ``heads_to_keep`` always refer to the *current* positions in the model;
``heads_kept`` in the recorded structure always holds *original* head ids (positions in the
unpruned model), and ``layers_kept`` original layer ids. A record without ``layers_kept``
(every record written before layers could be removed) means no layer was removed. The saved
config.json already holds the reduced layer count, so a model built from it has exactly the
present layers, which the per-layer lists describe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from tinycompress.models.arch import ArchSpec, BlockSkip, get_arch, get_module, layers, set_module
from tinycompress.models.config_fields import LAYERS_TOTAL_KEY, STRUCTURE_ATTR

LAYERS_KEPT = "layers_kept"
LAYERS_TOTAL = LAYERS_TOTAL_KEY


# ------------------------------------------------------------------------ skipped blocks


class BiasOnly(nn.Module):
    """What is left of an output projection whose every input (head or neuron) was removed: its bias.

    Sits at the projection's path, so the state-dict key ``<path>.bias`` is unchanged.
    ``forward(x)`` returns the bias broadcast to ``x``'s leading dims (what the Linear gives
    for an all-zero input).
    """

    in_features = 0

    def __init__(self, bias: Tensor, requires_grad: bool = True):
        super().__init__()
        self.bias = nn.Parameter(bias, requires_grad=requires_grad)

    @property
    def out_features(self) -> int:
        return self.bias.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.bias.expand(*x.shape[:-1], self.bias.shape[0])

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}"


class Passthrough(nn.Module):
    """Stands in for a module feeding a skipped block (BERT's ``intermediate``): returns its input."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return x


class SkippedParts(nn.Module):
    """Plain container keeping the dotted paths (e.g. ``output.dense``) of a skipped block's parts."""


class SkippedBlock(nn.Module):
    """An attention block or FFN with every unit removed: ``LayerNorm(x + b)``, or just ``b``.

    ``x`` is positional argument ``residual_arg`` of the call (the block's input, which the
    residual connection adds back); ``b`` is the :class:`BiasOnly` at ``bias_path``. With a
    ``norm_path`` (the LayerNorm lives inside the replaced module, as in BERT) the result is
    ``LayerNorm(x + b)``; without (the parent layer adds ``x`` and normalises, as in DistilBERT)
    it is ``b`` broadcast to ``x``. ``returns_weights``: return ``(output, None)`` like an
    attention module returning its weights. No MatMul, no zero-size tensor. (In training mode
    the replaced module's dropout on ``b`` is not applied.)
    """

    def __init__(self, bias_path: str, norm_path: str | None, residual_arg: int, returns_weights: bool):
        super().__init__()
        self.bias_path = bias_path
        self.norm_path = norm_path
        self.residual_arg = residual_arg
        self.returns_weights = returns_weights

    def forward(self, *args, **kwargs):
        if len(args) <= self.residual_arg:
            raise TypeError(
                f"SkippedBlock expects the block input as positional argument {self.residual_arg}, got {len(args)}"
            )
        x = args[self.residual_arg]
        bias = get_module(self, self.bias_path).bias
        out = bias.expand_as(x) if self.norm_path is None else get_module(self, self.norm_path)(x + bias)
        return (out, None) if self.returns_weights else out

    def extra_repr(self) -> str:
        norm = f"{self.norm_path}(x + b)" if self.norm_path else "b"
        return f"{norm}, b={self.bias_path}.bias"


def _relative(path: str, prefix: str) -> str | None:
    return path[len(prefix) + 1 :] if path.startswith(prefix + ".") else None


def _place(root: nn.Module, path: str, module: nn.Module) -> None:
    """``set_module`` creating ``SkippedParts`` containers for missing intermediate names."""
    parent = root
    *parents, name = path.split(".")
    for part in parents:
        if not hasattr(parent, part):
            parent.add_module(part, SkippedParts())
        parent = getattr(parent, part)
    parent.add_module(name, module)


def _is_skipped(layer: nn.Module, skip: BlockSkip) -> bool:
    return isinstance(get_module(layer, skip.module), SkippedBlock)


def _skip_block(layer: nn.Module, skip: BlockSkip, bias_path: str, norm_path: str) -> None:
    """Replace ``skip.module`` of ``layer`` by a SkippedBlock keeping the bias at ``bias_path``
    and, if it lies inside the replaced module, the LayerNorm at ``norm_path``."""
    rel_bias = _relative(bias_path, skip.module)
    if rel_bias is None:
        raise ValueError(f"arch table: {bias_path!r} must lie inside the skipped module {skip.module!r}")
    rel_norm = _relative(norm_path, skip.module)
    old = get_module(layer, skip.module)
    linear = get_module(layer, bias_path)
    if linear.bias is not None:
        bias, requires_grad = linear.bias.detach().clone(), linear.bias.requires_grad
    else:  # a bias-free projection adds nothing: keep an explicit zero bias
        bias = torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)
        requires_grad = False
    block = SkippedBlock(rel_bias, rel_norm, skip.residual_arg, skip.returns_weights)
    _place(block, rel_bias, BiasOnly(bias, requires_grad))
    if rel_norm is not None:
        _place(block, rel_norm, get_module(layer, norm_path))
    block.train(old.training)
    set_module(layer, skip.module, block)
    for path in skip.passthrough:
        passthrough = Passthrough()
        passthrough.train(old.training)
        set_module(layer, path, passthrough)


# ------------------------------------------------------------------------ reading the structure


def head_counts(model: nn.Module) -> list[int]:
    """Number of attention heads currently present in each encoder layer (0: attention skipped)."""
    spec = get_arch(model)
    head_size = spec.head_size(model.config)
    return [
        0 if _is_skipped(layer, spec.attn_skip) else get_module(layer, spec.query).out_features // head_size
        for layer in layers(model)
    ]


def ffn_sizes(model: nn.Module) -> list[int]:
    """Number of FFN neurons currently present in each encoder layer (0: FFN skipped)."""
    spec = get_arch(model)
    return [
        0 if _is_skipped(layer, spec.ffn_skip) else get_module(layer, spec.ffn_in).out_features
        for layer in layers(model)
    ]


def current_layer_ids(model: nn.Module) -> list[int]:
    """Original layer id (position in the unpruned model) of every encoder layer present.

    From ``layers_kept`` of ``config.tinycompress_pruning``; ``0..n-1`` when no layer was
    removed (unpruned models, records without ``layers_kept``). Raises ValueError when the
    recorded ids do not match the model's layer count.
    """
    n_layers = len(layers(model))
    structure = getattr(model.config, STRUCTURE_ATTR, None) or {}
    ids = structure.get(LAYERS_KEPT)
    if ids is None:
        return list(range(n_layers))
    if len(ids) != n_layers:
        raise ValueError(
            f"config.{STRUCTURE_ATTR} records {len(ids)} layers but the model has {n_layers}; "
            "the model was resized outside tinycompress.models.structure"
        )
    return [int(i) for i in ids]


def teacher_layer_positions(student: nn.Module, teacher: nn.Module, *, last_to_last: bool = False) -> list[int]:
    """For each layer of ``student`` (pruned from ``teacher``), the position in ``teacher`` of the
    same original layer. ``last_to_last``: the student's last layer answers to the teacher's last
    instead -- when trailing layers were removed, the student's last layer feeds the classifier, as
    the teacher's last does (CoFi maps layers to the teacher's in the same spirit for distillation).
    Raises ValueError when a student layer is not in ``teacher``."""
    teacher_ids = current_layer_ids(teacher)
    missing = [i for i in current_layer_ids(student) if i not in teacher_ids]
    if missing:
        raise ValueError(f"the student's layers {missing} are not in the teacher (layers {teacher_ids})")
    positions = [teacher_ids.index(i) for i in current_layer_ids(student)]
    if positions and last_to_last:
        positions[-1] = len(teacher_ids) - 1
    return positions


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
    """Sorted, validated copy of per-layer kept indices; an empty list is allowed (the block is skipped)."""
    if len(keep) != len(counts):
        raise ValueError(f"Expected kept {unit} for {len(counts)} layers, got {len(keep)}")
    result = []
    for layer, (indices, count) in enumerate(zip(keep, counts)):
        indices = sorted(int(i) for i in indices)
        if indices and (len(set(indices)) != len(indices) or indices[0] < 0 or indices[-1] >= count):
            raise ValueError(f"Layer {layer}: kept {unit} {indices} must be unique and within 0..{count - 1}")
        result.append(indices)
    return result


def _slice_heads(model: nn.Module, spec: ArchSpec, keep: list[list[int]]) -> None:
    head_size = spec.head_size(model.config)
    for layer, indices in zip(layers(model), keep):
        if _is_skipped(layer, spec.attn_skip):
            continue  # no heads left to slice; _validate_keep made sure indices == []
        if not indices:
            _skip_block(layer, spec.attn_skip, spec.attn_out, spec.attn_norm)
            continue
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
        if _is_skipped(layer, spec.ffn_skip):
            continue
        if not indices:
            _skip_block(layer, spec.ffn_skip, spec.ffn_out, spec.ffn_norm)
            continue
        index = torch.tensor(indices)
        set_module(layer, spec.ffn_in, _sliced_linear(get_module(layer, spec.ffn_in), index, dim=0))
        set_module(layer, spec.ffn_out, _sliced_linear(get_module(layer, spec.ffn_out), index, dim=1))


def _remove_layers(model: nn.Module, spec: ArchSpec, positions: Sequence[int]) -> None:
    """Drop the encoder layers at ``positions`` and lower the config's layer count."""
    base = getattr(model, "base_model", model)
    old = get_module(base, spec.layers_path)
    drop = set(positions)
    kept = nn.ModuleList([layer for i, layer in enumerate(old) if i not in drop])
    kept.train(old.training)
    set_module(base, spec.layers_path, kept)
    setattr(model.config, spec.layers_field, len(kept))
    if spec.encoder_layer_count_attr:
        parent_path = spec.layers_path.rpartition(".")[0]
        parent = get_module(base, parent_path) if parent_path else base
        setattr(parent, spec.encoder_layer_count_attr, len(kept))


def _record_structure(
    model: nn.Module, head_ids: list[list[int]], layer_ids: list[int] | None, layers_total: int | None = None
) -> None:
    """Write ``config.tinycompress_pruning``; ``layer_ids`` None: no layer was ever removed."""
    structure = {"heads_kept": [[int(i) for i in ids] for ids in head_ids], "intermediate_sizes": ffn_sizes(model)}
    if layer_ids is not None:
        structure[LAYERS_KEPT] = [int(i) for i in layer_ids]
        structure[LAYERS_TOTAL] = int(layers_total)
    setattr(model.config, STRUCTURE_ATTR, structure)


def _finish(model: nn.Module, spec: ArchSpec, head_ids: list[list[int]], drop_empty_layers: bool) -> list[int]:
    """Remove emptied layers (if asked) and record the structure; returns the removed positions."""
    structure = getattr(model.config, STRUCTURE_ATTR, None) or {}
    layer_ids = current_layer_ids(model)
    layers_total = structure.get(LAYERS_TOTAL, len(layer_ids))
    removed = []
    if drop_empty_layers:
        removed = [i for i, (h, n) in enumerate(zip(head_counts(model), ffn_sizes(model))) if h == 0 and n == 0]
    if removed:
        _remove_layers(model, spec, removed)
        head_ids = [ids for i, ids in enumerate(head_ids) if i not in removed]
        layer_ids = [lid for i, lid in enumerate(layer_ids) if i not in removed]
    # Once a layer is gone the record says which remain, even when they are 0..n-1.
    _record_structure(model, head_ids, layer_ids if removed or LAYERS_KEPT in structure else None, layers_total)
    return removed


@torch.no_grad()
def prune_heads_(model: nn.Module, heads_to_keep: Sequence[Sequence[int]], *, drop_empty_layers: bool = True) -> None:
    """Remove attention heads in place, keeping ``heads_to_keep[l]`` (current
    positions) in layer l, and update ``config.tinycompress_pruning``.

    An empty list skips layer l's attention block (see the module docstring); a layer
    then left with neither heads nor FFN neurons is removed from the encoder, unless
    ``drop_empty_layers`` is False (then :func:`drop_empty_layers_` removes it later).
    """
    spec = get_arch(model)
    keep = _validate_keep(heads_to_keep, head_counts(model), "heads")
    original_ids = current_head_ids(model)
    _slice_heads(model, spec, keep)
    _finish(model, spec, [[ids[i] for i in k] for ids, k in zip(original_ids, keep)], drop_empty_layers)


@torch.no_grad()
def prune_neurons_(
    model: nn.Module, neurons_to_keep: Sequence[Sequence[int]], *, drop_empty_layers: bool = True
) -> None:
    """Remove FFN neurons in place, keeping ``neurons_to_keep[l]`` (current
    positions) in layer l, and update ``config.tinycompress_pruning``.

    An empty list skips layer l's FFN; a layer then left with neither heads nor
    neurons is removed unless ``drop_empty_layers`` is False (as in :func:`prune_heads_`).
    """
    spec = get_arch(model)
    keep = _validate_keep(neurons_to_keep, ffn_sizes(model), "neurons")
    original_ids = current_head_ids(model)
    _slice_neurons(model, spec, keep)
    _finish(model, spec, original_ids, drop_empty_layers)


@torch.no_grad()
def drop_empty_layers_(model: nn.Module) -> list[int]:
    """Remove, in place, every encoder layer left with neither heads nor FFN neurons.

    Returns the positions (before removal) of the layers removed; updates the config's layer
    count and ``config.tinycompress_pruning`` (``layers_kept``). Not output-preserving: see the
    module docstring.
    """
    spec = get_arch(model)
    return _finish(model, spec, current_head_ids(model), drop_empty_layers=True)


@torch.no_grad()
def apply_structure_(model: nn.Module, structure: Mapping | None = None) -> None:
    """Resize a freshly built, unpruned model to a recorded pruning structure.

    ``structure`` defaults to ``model.config.tinycompress_pruning`` (present when
    the config came from a pruned checkpoint's config.json). The model must be built from
    that same config.json: its layer count is already the reduced one, and ``heads_kept`` /
    ``intermediate_sizes`` describe its present layers (``[]`` / 0: the block is skipped).
    Weight values are not meaningful afterwards: load the pruned state dict next.
    """
    spec = get_arch(model)
    structure = structure if structure is not None else getattr(model.config, STRUCTURE_ATTR, None)
    if not structure or "heads_kept" not in structure or "intermediate_sizes" not in structure:
        raise ValueError("structure must be a dict with 'heads_kept' and 'intermediate_sizes'")
    n_layers = len(layers(model))
    full_heads, full_ffn = spec.num_heads(model.config), spec.ffn_size(model.config)
    if head_counts(model) != [full_heads] * n_layers or ffn_sizes(model) != [full_ffn] * n_layers:
        raise ValueError("apply_structure_ needs a freshly built, unpruned model")
    if len(structure["heads_kept"]) != n_layers:
        raise ValueError(
            f"structure describes {len(structure['heads_kept'])} layers but the model has {n_layers}; "
            f"build the model from the pruned config.json (its {spec.layers_field} is the reduced count)"
        )
    heads_kept = _validate_keep(structure["heads_kept"], [full_heads] * n_layers, "heads")
    sizes = [int(s) for s in structure["intermediate_sizes"]]
    if len(sizes) != n_layers or not all(0 <= s <= full_ffn for s in sizes):
        raise ValueError(f"intermediate_sizes must be {n_layers} ints in 0..{full_ffn}, got {sizes}")
    layer_ids = structure.get(LAYERS_KEPT)
    if layer_ids is not None:
        layer_ids = [int(i) for i in layer_ids]
        if (
            len(layer_ids) != n_layers
            or any(b <= a for a, b in zip(layer_ids, layer_ids[1:]))
            or min(layer_ids, default=0) < 0
        ):
            raise ValueError(f"{LAYERS_KEPT} must be {n_layers} increasing ids >= 0, got {layer_ids}")
    # In the unpruned model position == original id, so the recorded ids are the positions.
    _slice_heads(model, spec, heads_kept)
    _slice_neurons(model, spec, [list(range(s)) for s in sizes])
    layers_total = int(structure.get(LAYERS_TOTAL, 1 + max(layer_ids, default=-1))) if layer_ids is not None else None
    _record_structure(model, heads_kept, layer_ids, layers_total)
