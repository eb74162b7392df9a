"""Importance scores of attention heads and FFN neurons: taylor, fisher, magnitude, random.

transformers 5.x has no ``head_mask``, so the gradient criteria insert multiplicative gates
(all ones) with forward pre-hooks on the attention output projection (per head) and the FFN
output Linear (per neuron); gradients of the loss w.r.t. those gates give the scores.
Removing the lowest-scoring units is :mod:`tinycompress.models.structure`'s job.

Scores always refer to the *current* positions in the model (a pruned layer's remaining
heads are numbered from 0 again); the recorded structure maps them to original head ids.
A layer whose attention block or FFN is skipped (no heads / neurons left) gets an empty
score tensor (and an empty gate) for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tinycompress.models.arch import ArchSpec, get_arch, get_module, layers
from tinycompress.models.structure import ffn_sizes, head_counts

CRITERIA: tuple[str, ...] = ("taylor", "fisher", "magnitude", "random")


LossFn = Callable[[object, Mapping[str, Tensor]], Tensor]

# How the gradient criteria sum their raw scores over the processes of a distributed run (each
# scored its own share of the batches); None: one process. Set with `summed_over_processes`.
_SUM_OVER_PROCESSES: ContextVar[Callable[[Tensor], Tensor] | None] = ContextVar("sum_over_processes", default=None)


@contextmanager
def summed_over_processes(sum_fn: Callable[[Tensor], Tensor] | None):
    """Within this block, the gradient criteria (taylor, fisher) add up their raw scores and
    batch counts with ``sum_fn`` (e.g. :meth:`tinycompress.training.distributed.Processes.sum`,
    an all-reduce) before any normalisation: processes that each scored a share of the batches
    then all get the scores of all the batches. Every process must score alike inside it;
    magnitude and random read no data and are not summed. ``None`` changes nothing."""
    token = _SUM_OVER_PROCESSES.set(sum_fn)
    try:
        yield
    finally:
        _SUM_OVER_PROCESSES.reset(token)


@dataclass
class Gates:
    """Gate tensors, one per encoder layer, each all ones with requires_grad.

    Shape is ``[n]`` (shared by all samples) or ``[batch_size, n]`` (one gate
    per sample, see ``gated``), where n is the layer's current head / neuron count
    (0 for a skipped block: the gate is empty and hooked to nothing).
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
        for layer, n_heads, n_neurons in zip(layers(model), head_counts(model), ffn_sizes(model)):
            for path, n, group_size, out in (
                (spec.attn_out, n_heads, head_size, gates.heads),
                (spec.ffn_out, n_neurons, 1, gates.neurons),
            ):
                module = get_module(layer, path)  # a Linear, or a skipped block's BiasOnly (n == 0)
                gate = _new_gate(n, batch_size, module.bias if n == 0 else module.weight)
                if n:
                    handles.append(module.register_forward_pre_hook(_gate_hook(gate, group_size)))
                out.append(gate)
        yield gates
    finally:
        for handle in handles:
            handle.remove()


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
    normalize: bool = True,
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
              per-layer unit norm would bias the global ranking). ``normalize=False``
              leaves the head scores raw too (comparable across layers and with
              neuron scores, as a search trading heads against neurons needs).
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
        normalize: per-layer L2 normalisation of taylor's head scores (see above);
            no effect on the other criteria.

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
    return _gradient_importance(model, batches, criterion, loss_fn, normalize)


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


def batch_loss_sum(model: nn.Module, batch: Mapping[str, Tensor], loss_fn: LossFn | None = None) -> tuple[float, int]:
    """(sum of the per-sample losses, batch size) of ``model`` on one labelled ``batch``."""
    size = _batch_size(batch)
    return float(_loss_sum_and_mean(model(**batch), batch, loss_fn, size)[0]), size


def process_sum(values: Tensor) -> Tensor:
    """``values`` summed over the processes inside :func:`summed_over_processes` (else as they are)."""
    sum_fn = _SUM_OVER_PROCESSES.get()
    return values if sum_fn is None else sum_fn(values)


def _gradient_importance(model, batches, criterion: str, loss_fn: LossFn | None, normalize: bool) -> Importance:
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
                    # Empty gates (skipped blocks) are not in the graph: allow_unused.
                    all_gates = [*gates.heads, *gates.neurons]
                    grads = torch.autograd.grad(target, all_gates, allow_unused=True)
                for acc, grad, gate in zip([*head_acc, *neuron_acc], grads, all_gates):
                    grad = (torch.zeros_like(gate) if grad is None else grad).detach().float()
                    # taylor: summing per-sample rows gives the batch-mean gradient.
                    acc += grad.sum(0).abs() if criterion == "taylor" else grad.pow(2).sum(0)
                seen_batches += 1
    finally:
        model.train(was_training)
    head_acc, neuron_acc, seen_batches = _summed(head_acc, neuron_acc, seen_batches)
    if seen_batches == 0:
        raise ValueError("batches was empty: gradient criteria need at least one batch")
    if criterion == "taylor" and normalize:
        head_acc = [_unit_l2(scores) for scores in head_acc]
    return Importance(criterion, [s.cpu() for s in head_acc], [s.cpu() for s in neuron_acc])


def _summed(heads: list[Tensor], neurons: list[Tensor], batches: int) -> tuple[list[Tensor], list[Tensor], int]:
    """The accumulators and batch count summed with :func:`process_sum`, in one call (one all-reduce)."""
    parts = [*heads, *neurons]
    flat = torch.cat([*parts, torch.tensor([float(batches)], device=parts[0].device if parts else None)])
    total = process_sum(flat)
    sizes = [len(p) for p in parts]
    pieces = list(total[: sum(sizes)].split(sizes))
    return pieces[: len(heads)], pieces[len(heads) :], int(round(total[-1].item()))


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
    for layer, n_heads, n_neurons in zip(layers(model), head_counts(model), ffn_sizes(model)):
        if n_heads == 0:
            head_scores.append(torch.zeros(0))
        else:
            head_scores.append(_head_magnitude(layer, spec, n_heads, head_size, hidden))
        if n_neurons == 0:
            neuron_scores.append(torch.zeros(0))
        else:
            ffn_in = get_module(layer, spec.ffn_in).weight.float().cpu()  # [I, hidden]
            ffn_out = get_module(layer, spec.ffn_out).weight.float().cpu()  # [hidden, I]
            neuron_scores.append((ffn_in.pow(2).sum(1) + ffn_out.pow(2).sum(0)).sqrt())
    return Importance("magnitude", head_scores, neuron_scores)


def _head_magnitude(layer: nn.Module, spec: ArchSpec, n_heads: int, head_size: int, hidden: int) -> Tensor:
    """L2 norm of each head's Q/K/V output rows and output-projection input columns."""
    squared = torch.zeros(n_heads)
    for path in (spec.query, spec.key, spec.value):
        weight = get_module(layer, path).weight.float().cpu()  # [n*d, hidden]
        squared += weight.view(n_heads, head_size, hidden).pow(2).sum((1, 2))
    out_weight = get_module(layer, spec.attn_out).weight.float().cpu()  # [hidden, n*d]
    squared += out_weight.view(-1, n_heads, head_size).pow(2).sum((0, 2))
    return squared.sqrt()


def _random_importance(model: nn.Module, seed: int) -> Importance:
    generator = torch.Generator().manual_seed(seed)
    head_scores = [torch.rand(n, generator=generator) for n in head_counts(model)]
    neuron_scores = [torch.rand(n, generator=generator) for n in ffn_sizes(model)]
    return Importance("random", head_scores, neuron_scores)
