"""Structured pruning of attention heads and FFN neurons.

transformers 5.x has neither ``prune_heads`` nor ``head_mask``, so this module
does both jobs itself:

* scoring: multiplicative gates (all ones) are inserted with forward pre-hooks
  on the attention output projection (per head) and the FFN output Linear (per
  neuron); gradients of the loss w.r.t. those gates give the importance scores;
* removal: Q/K/V output rows, output-projection input columns, FFN-in rows and
  FFN-out columns are sliced into new, smaller ``nn.Linear`` modules. This works
  because BERT and DistilBERT attention in transformers 5.x reshape with ``-1``
  heads, so a narrower Linear simply means fewer heads.

The resulting structure is recorded in ``model.config.tinycompress_pruning``
(saved to config.json by ``save_pretrained``) so that ``apply_structure_`` can
rebuild the same shapes on a freshly built model before loading a state dict.

Head indices in ``heads_to_keep`` / scores always refer to the *current*
positions in the model; ``heads_kept`` in the recorded structure always holds
*original* head ids (positions in the unpruned model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tinycompress.arch import ArchSpec, get_arch, get_module, layers, set_module

CRITERIA: tuple[str, ...] = ("taylor", "fisher", "magnitude", "random")
SCHEDULES: tuple[str, ...] = ("linear", "geometric")
STRUCTURE_ATTR = "tinycompress_pruning"

LossFn = Callable[[object, Mapping[str, Tensor]], Tensor]


# --------------------------------------------------------------------------- #
# Current shapes
# --------------------------------------------------------------------------- #


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
        "the model was resized outside tinycompress.pruning"
    )


# --------------------------------------------------------------------------- #
# Gates
# --------------------------------------------------------------------------- #


@dataclass
class Gates:
    """Gate tensors, one per encoder layer, each all ones with requires_grad.

    Shape is ``[n]`` (shared by all samples) or ``[batch_size, n]`` (one gate
    per sample, see ``gated``), where n is the layer's current head / neuron count.
    """

    heads: list[Tensor]
    neurons: list[Tensor]


def _gate_hook(gate: Tensor, group_size: int):
    """Forward pre-hook multiplying the last input dim, viewed as
    ``[n_groups, group_size]``, by ``gate`` (``[n]`` or ``[batch, n]``)."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        grouped = x.unflatten(-1, (-1, group_size))  # [..., n, group_size]
        if gate.dim() == 1:
            scale = gate[:, None]
        else:
            if gate.shape[0] != x.shape[0]:
                raise ValueError(f"Per-sample gates built for batch {gate.shape[0]}, got batch {x.shape[0]}")
            # [B, n] -> [B, 1, ..., 1, n, 1] to broadcast over the sequence dims.
            scale = gate.view(gate.shape[0], *([1] * (grouped.dim() - 3)), gate.shape[1], 1)
        return ((grouped * scale).flatten(-2), *rest)

    return hook


def _new_gate(n: int, batch_size: int | None, like: Tensor) -> Tensor:
    shape = (n,) if batch_size is None else (batch_size, n)
    return torch.ones(shape, dtype=like.dtype, device=like.device, requires_grad=True)


@contextmanager
def gated(model: nn.Module, batch_size: int | None = None):
    """Install head and FFN-neuron gates on ``model``; yield them as ``Gates``.

    With ``batch_size`` set, each sample gets its own gate row (``[B, n]``).
    Samples never interact in these encoders, so ``d(sum of per-sample
    losses)/d gate[b]`` is exactly sample b's gradient: per-sample gradients
    from a single backward pass. Hooks are removed on exit, even on error.
    """
    spec = get_arch(model)
    head_size = spec.head_size(model.config)
    gates = Gates(heads=[], neurons=[])
    handles = []
    try:
        for layer in layers(model):
            attn_out = get_module(layer, spec.attn_out)
            ffn_out = get_module(layer, spec.ffn_out)
            head_gate = _new_gate(attn_out.in_features // head_size, batch_size, attn_out.weight)
            neuron_gate = _new_gate(ffn_out.in_features, batch_size, ffn_out.weight)
            handles.append(attn_out.register_forward_pre_hook(_gate_hook(head_gate, head_size)))
            handles.append(ffn_out.register_forward_pre_hook(_gate_hook(neuron_gate, 1)))
            gates.heads.append(head_gate)
            gates.neurons.append(neuron_gate)
        yield gates
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------- #
# Importance
# --------------------------------------------------------------------------- #


@dataclass
class Importance:
    """Importance scores (higher = more important) at current positions.

    ``head_scores[l]`` has one entry per head currently in layer l and
    ``neuron_scores[l]`` one per FFN neuron; lists because layers may differ in
    size after pruning. ``head_matrix()`` stacks heads to ``[L, H]`` when uniform.
    """

    criterion: str
    head_scores: list[Tensor]
    neuron_scores: list[Tensor]

    def head_matrix(self) -> Tensor:
        """Head scores as an ``[L, H]`` tensor; ValueError if layers differ in head count."""
        if len({len(s) for s in self.head_scores}) > 1:
            raise ValueError("Layers have different head counts; use head_scores (a list) instead")
        return torch.stack(self.head_scores)


def compute_importance(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]] | None,
    criterion: str,
    loss_fn: LossFn | None = None,
    seed: int = 0,
) -> Importance:
    """Score every head and FFN neuron of ``model``.

    Args:
        batches: iterable of dicts usable as ``model(**batch)`` (include
            ``labels`` unless ``loss_fn`` is given). Only read by the gradient
            criteria; may be None for "magnitude" / "random".
        criterion:
            * "taylor" (Michel et al. 2019): ``sum over batches |dL/dgate|``
              with L the batch-mean loss; head scores are then divided by
              their layer's L2 norm, as in the paper. Neuron scores are left
              unnormalised (layers may have very different widths, where a
              per-layer unit norm would bias the global ranking).
            * "fisher" (Kwon et al. 2022): ``sum over samples (dL_i/dgate)^2``,
              the empirical Fisher diagonal. Per-sample gradients come from
              per-sample gates (see ``gated``): one forward/backward per batch,
              exact, no torch.func and no batch-size-1 loop.
            * "magnitude": L2 norm of each head's Q/K/V output rows plus its
              output-projection input columns; of each neuron's FFN-in row plus
              FFN-out column (weights only, no biases).
            * "random": uniform(0, 1) from ``torch.Generator().manual_seed(seed)``.
        loss_fn: optional ``loss_fn(outputs, batch)`` returning per-sample
            losses ``[B]`` (preferred) or a scalar batch-mean loss. By default
            ``outputs.loss`` is used and assumed to be the mean of per-sample
            losses (true for HF sequence classification: CE, MSE, BCE); for
            token-level losses pass a per-sample ``loss_fn``.

    The model is scored in eval mode (no dropout) and its mode is restored
    afterwards; parameter ``.grad`` fields are never touched.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"Unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if criterion == "magnitude":
        return _magnitude_importance(model)
    if criterion == "random":
        return _random_importance(model, seed)
    if batches is None:
        raise ValueError(f"criterion {criterion!r} needs batches")
    return _gradient_importance(model, batches, criterion, loss_fn)


def _batch_size(batch: Mapping[str, Tensor]) -> int:
    for value in batch.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("Batch has no tensor to take the batch size from")


def _loss_sum_and_mean(outputs, batch, loss_fn: LossFn | None, batch_size: int) -> tuple[Tensor, Tensor]:
    """(sum of per-sample losses, batch-mean loss) for one batch."""
    loss = getattr(outputs, "loss", None) if loss_fn is None else loss_fn(outputs, batch)
    if loss is None:
        raise ValueError("Model returned no loss: include 'labels' in the batches or pass loss_fn")
    if loss.dim() == 0:
        return loss * batch_size, loss
    if loss.shape == (batch_size,):
        return loss.sum(), loss.mean()
    raise ValueError(f"loss_fn must return a scalar or shape [{batch_size}], got {tuple(loss.shape)}")


def _gradient_importance(model, batches, criterion: str, loss_fn: LossFn | None) -> Importance:
    device = next(model.parameters()).device
    head_acc = [torch.zeros(n, device=device) for n in head_counts(model)]
    neuron_acc = [torch.zeros(n, device=device) for n in ffn_sizes(model)]
    seen_batches = 0
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for batch in batches:
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                batch_size = _batch_size(batch)
                with gated(model, batch_size=batch_size) as gates:
                    loss_sum, loss_mean = _loss_sum_and_mean(model(**batch), batch, loss_fn, batch_size)
                    target = loss_mean if criterion == "taylor" else loss_sum
                    # autograd.grad (not backward) so parameter .grad stays untouched.
                    grads = torch.autograd.grad(target, [*gates.heads, *gates.neurons])
                for acc, grad in zip([*head_acc, *neuron_acc], grads):
                    grad = grad.detach().float()
                    # taylor: summing per-sample rows gives the batch-mean gradient.
                    acc += grad.sum(0).abs() if criterion == "taylor" else grad.pow(2).sum(0)
                seen_batches += 1
    finally:
        model.train(was_training)
    if seen_batches == 0:
        raise ValueError("batches was empty: gradient criteria need at least one batch")
    if criterion == "taylor":
        head_acc = [_unit_l2(scores) for scores in head_acc]
    return Importance(criterion, [s.cpu() for s in head_acc], [s.cpu() for s in neuron_acc])


def _unit_l2(scores: Tensor) -> Tensor:
    """Divide by the L2 norm; an all-zero layer stays zero instead of NaN."""
    norm = scores.norm(p=2)
    return scores / norm if norm > 0 else scores


@torch.no_grad()
def _magnitude_importance(model: nn.Module) -> Importance:
    spec = get_arch(model)
    head_size = spec.head_size(model.config)
    hidden = getattr(model.config, spec.hidden_field)
    head_scores, neuron_scores = [], []
    for layer in layers(model):
        n_heads = get_module(layer, spec.query).out_features // head_size
        squared = torch.zeros(n_heads)
        for path in (spec.query, spec.key, spec.value):
            weight = get_module(layer, path).weight.float().cpu()  # [n*d, hidden]
            squared += weight.view(n_heads, head_size, hidden).pow(2).sum((1, 2))
        out_weight = get_module(layer, spec.attn_out).weight.float().cpu()  # [hidden, n*d]
        squared += out_weight.view(-1, n_heads, head_size).pow(2).sum((0, 2))
        head_scores.append(squared.sqrt())
        ffn_in = get_module(layer, spec.ffn_in).weight.float().cpu()  # [I, hidden]
        ffn_out = get_module(layer, spec.ffn_out).weight.float().cpu()  # [hidden, I]
        neuron_scores.append((ffn_in.pow(2).sum(1) + ffn_out.pow(2).sum(0)).sqrt())
    return Importance("magnitude", head_scores, neuron_scores)


def _random_importance(model: nn.Module, seed: int) -> Importance:
    generator = torch.Generator().manual_seed(seed)
    head_scores = [torch.rand(n, generator=generator) for n in head_counts(model)]
    neuron_scores = [torch.rand(n, generator=generator) for n in ffn_sizes(model)]
    return Importance("random", head_scores, neuron_scores)


# --------------------------------------------------------------------------- #
# Selection (pure)
# --------------------------------------------------------------------------- #

Scores = Tensor | Sequence[Tensor]


def _score_list(scores: Scores) -> list[Tensor]:
    if torch.is_tensor(scores):
        if scores.dim() != 2:
            raise ValueError(f"Score tensor must be [layers, units], got shape {tuple(scores.shape)}")
        return list(scores)
    result = [torch.as_tensor(s).detach().flatten().float().cpu() for s in scores]
    if not result:
        raise ValueError("Scores are empty: need at least one layer")
    return result


def count_to_remove(ratio: float, total: int) -> int:
    """``ratio * total`` rounded half up; ValueError unless ``0 <= ratio < 1``."""
    if not 0 <= ratio < 1:  # also rejects NaN
        raise ValueError(f"Pruning ratio must be in [0, 1), got {ratio}")
    return math.floor(ratio * total + 0.5)


def _check_min(min_per_layer: int, unit: str) -> None:
    if min_per_layer < 1:
        # A layer with 0 heads cannot run: attention reshapes with -1 heads,
        # which is undefined for a zero-width tensor. Zero-width FFNs would
        # run but break quantisation / ONNX export downstream.
        raise ValueError(
            f"min {unit} per layer must be >= 1 (removing a whole sub-layer is unsupported), got {min_per_layer}"
        )


def _check_capacity(counts: Sequence[int], n_remove: int, min_per_layer: int, unit: str) -> None:
    capacity = sum(max(count - min_per_layer, 0) for count in counts)
    if n_remove > capacity:
        raise ValueError(
            f"Cannot remove {n_remove} {unit} out of {sum(counts)}: at most {capacity} can go "
            f"while keeping >= {min_per_layer} per layer"
        )


def select_lowest(scores: Scores, n_remove: int, min_per_layer: int = 1, unit: str = "units") -> list[list[int]]:
    """Kept indices per layer after removing the ``n_remove`` lowest-scored
    units globally (across layers), never leaving a layer below ``min_per_layer``.

    Ties are broken by (layer, index), lowest first, so results are deterministic.
    """
    layer_scores = _score_list(scores)
    _check_min(min_per_layer, unit)
    counts = [len(s) for s in layer_scores]
    if n_remove < 0:
        raise ValueError(f"n_remove must be >= 0, got {n_remove}")
    _check_capacity(counts, n_remove, min_per_layer, unit)
    flat = torch.cat([s.float() for s in layer_scores])
    if torch.isnan(flat).any():
        raise ValueError("Scores contain NaN")
    layer_of = torch.cat([torch.full((c,), l) for l, c in enumerate(counts)]).tolist()
    offsets = [sum(counts[:l]) for l in range(len(counts))]
    remaining = list(counts)
    removed: set[int] = set()
    for pos in torch.argsort(flat, stable=True).tolist():
        if len(removed) == n_remove:
            break
        layer = layer_of[pos]
        if remaining[layer] > min_per_layer:
            removed.add(pos)
            remaining[layer] -= 1
    return [[i for i in range(c) if offsets[l] + i not in removed] for l, c in enumerate(counts)]


def select_heads(head_scores: Scores, ratio: float, min_heads_per_layer: int = 1) -> list[list[int]]:
    """Kept head indices (current positions) per layer after removing
    ``round(ratio * total heads)`` heads, lowest global score first.

    ``head_scores``: ``[L, H]`` tensor or list of 1-D tensors (one per layer).
    Raises ValueError for ratio outside [0, 1), ``min_heads_per_layer < 1`` or
    a ratio the per-layer minimum makes impossible.
    """
    layer_scores = _score_list(head_scores)
    n_remove = count_to_remove(ratio, sum(len(s) for s in layer_scores))
    return select_lowest(layer_scores, n_remove, min_heads_per_layer, unit="heads")


def select_neurons(ffn_scores: Scores, ratio: float, min_per_layer: int = 1) -> list[list[int]]:
    """Same as ``select_heads`` for FFN neurons; returns kept neuron indices per layer."""
    layer_scores = _score_list(ffn_scores)
    n_remove = count_to_remove(ratio, sum(len(s) for s in layer_scores))
    return select_lowest(layer_scores, n_remove, min_per_layer, unit="neurons")


# --------------------------------------------------------------------------- #
# Removal and reload
# --------------------------------------------------------------------------- #


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


# --------------------------------------------------------------------------- #
# Size and cost
# --------------------------------------------------------------------------- #


def estimate_flops(model: nn.Module, seq_len: int) -> int:
    """Encoder FLOPs for one sequence of ``seq_len`` tokens (2 FLOPs per MAC).

    Counts the Q/K/V/output projections and both FFN Linears
    (``2 * T * in * out`` each) and the attention score (QK^T) and context
    (softmax . V) matmuls (``2 * T * T * heads * head_size`` each). Excludes
    embeddings, biases, LayerNorm, softmax, activations, pooler and classifier
    head: those are small and unaffected by pruning.
    """
    if int(seq_len) != seq_len or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len}")
    spec = get_arch(model)
    total = 0
    for layer in layers(model):
        for path in (spec.query, spec.key, spec.value, spec.attn_out, spec.ffn_in, spec.ffn_out):
            linear = get_module(layer, path)
            total += 2 * seq_len * linear.in_features * linear.out_features
        inner = get_module(layer, spec.query).out_features  # heads * head_size
        total += 2 * (2 * seq_len * seq_len * inner)
    return int(total)


# --------------------------------------------------------------------------- #
# Iterative pruning
# --------------------------------------------------------------------------- #


@dataclass
class StepRecord:
    """What one pruning step removed. Heads are original head ids; neurons are
    positions in the model as it was passed to ``prune_iteratively``."""

    step: int
    heads_removed: list[list[int]]
    neurons_removed: list[list[int]]
    heads_remaining: int
    neurons_remaining: int


@dataclass
class PruningRecord:
    """Per-step removals plus the final scores of the surviving units (the
    last step's scores restricted to kept units, aligned with the final model)."""

    steps: list[StepRecord] = field(default_factory=list)
    final_importance: Importance | None = None

    def to_dict(self) -> dict:
        """JSON-serialisable summary."""
        final = self.final_importance
        return {
            "steps": [vars(step).copy() for step in self.steps],
            "final_importance": None
            if final is None
            else {
                "criterion": final.criterion,
                "head_scores": [s.tolist() for s in final.head_scores],
                "neuron_scores": [s.tolist() for s in final.neuron_scores],
            },
        }


def cumulative_schedule(total: int, target: int, steps: int, schedule: str = "linear") -> list[int]:
    """Cumulative number removed after steps 1..steps, ending exactly at ``target``.

    "linear" removes about target/steps each step; "geometric" keeps the same
    *fraction* each step (larger cuts first, smaller later, as the model shrinks).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps}")
    if target == 0:
        return [0] * steps
    if schedule == "linear":
        cumulative = [math.floor(target * k / steps + 0.5) for k in range(1, steps + 1)]
    else:
        keep_fraction = (total - target) / total
        cumulative = [total - math.floor(total * keep_fraction ** (k / steps) + 0.5) for k in range(1, steps + 1)]
    cumulative[-1] = target
    return cumulative


def _restrict(scores: list[Tensor], keep: list[list[int]]) -> list[Tensor]:
    return [s[torch.tensor(k, dtype=torch.long)] for s, k in zip(scores, keep)]


def _dropped(ids: list[list[int]], keep: list[list[int]]) -> list[list[int]]:
    """ids[l][pos] for every position not in keep[l]."""
    dropped = []
    for layer_ids, kept in zip(ids, keep):
        kept = set(kept)
        dropped.append([i for pos, i in enumerate(layer_ids) if pos not in kept])
    return dropped


def prune_iteratively(
    model: nn.Module,
    batches_fn: Callable[[], Iterable[Mapping[str, Tensor]]] | None,
    criterion: str,
    head_ratio: float,
    ffn_ratio: float,
    steps: int,
    min_heads_per_layer: int = 1,
    min_neurons_per_layer: int = 1,
    schedule: str = "linear",
    loss_fn: LossFn | None = None,
    seed: int = 0,
) -> PruningRecord:
    """Prune heads and FFN neurons in ``steps`` rounds, re-scoring before each.

    Ratios are fractions of the heads / neurons present when called; after the
    last step exactly ``round(ratio * total)`` of each are gone (``schedule``
    decides the split, see ``cumulative_schedule``). ``batches_fn()`` must
    return a fresh iterable of batches each call (it is called once per step;
    may be None for "magnitude" / "random"). "random" uses ``seed + step``.
    Raises ValueError up front if the targets are infeasible.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"Unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    _check_min(min_heads_per_layer, "heads")
    _check_min(min_neurons_per_layer, "neurons")
    heads0, neurons0 = head_counts(model), ffn_sizes(model)
    head_target = count_to_remove(head_ratio, sum(heads0))
    neuron_target = count_to_remove(ffn_ratio, sum(neurons0))
    # Every removal lowers the removable capacity by exactly one, so checking
    # the totals once guarantees every step is feasible.
    _check_capacity(heads0, head_target, min_heads_per_layer, "heads")
    _check_capacity(neurons0, neuron_target, min_neurons_per_layer, "neurons")
    head_cum = [0] + cumulative_schedule(sum(heads0), head_target, steps, schedule)
    neuron_cum = [0] + cumulative_schedule(sum(neurons0), neuron_target, steps, schedule)

    record = PruningRecord()
    neuron_ids = [list(range(n)) for n in neurons0]
    for step in range(1, steps + 1):
        batches = batches_fn() if batches_fn is not None else None
        importance = compute_importance(model, batches, criterion, loss_fn=loss_fn, seed=seed + step - 1)
        head_keep = select_lowest(
            importance.head_scores, head_cum[step] - head_cum[step - 1], min_heads_per_layer, "heads"
        )
        neuron_keep = select_lowest(
            importance.neuron_scores, neuron_cum[step] - neuron_cum[step - 1], min_neurons_per_layer, "neurons"
        )
        heads_removed = _dropped(current_head_ids(model), head_keep)
        neurons_removed = _dropped(neuron_ids, neuron_keep)
        prune_heads_(model, head_keep)
        prune_neurons_(model, neuron_keep)
        neuron_ids = [[ids[i] for i in k] for ids, k in zip(neuron_ids, neuron_keep)]
        record.steps.append(
            StepRecord(step, heads_removed, neurons_removed, sum(head_counts(model)), sum(ffn_sizes(model)))
        )
        record.final_importance = Importance(
            criterion, _restrict(importance.head_scores, head_keep), _restrict(importance.neuron_scores, neuron_keep)
        )
    return record
