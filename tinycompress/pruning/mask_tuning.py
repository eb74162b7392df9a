"""Retraining-free mask tuning: rescale the heads and FFN neurons a pruned model kept so that each
layer reconstructs its teacher layer (Kwon et al. 2022, "A Fast Post-Training Pruning Framework
for Transformers", §4.3).

Pruning removes whole heads and neurons; what is left no longer adds up to what the layer
computed before. Each block (attention, FFN) of a BERT-style layer ends in
``LayerNorm(x + b + sum_u C_u)``, where ``C_u`` is unit u's contribution through the block's output
Linear: for head h ``ctx[:, h-slice] @ W_O[:, h-slice]^T``, for neuron j ``act_j * W_2[:, j]``.
A scale ``m_u`` per kept unit is fitted by linear least squares so that the student's pre-LayerNorm
sum matches the teacher's over all (non-padding) tokens of some calibration batches, then folded
into the unit's input columns of the output Linear: no new parameters, no change of shapes.

Layers are tuned in order, each on the student's own inputs as produced by the already tuned
layers before it, so later layers also correct what earlier ones could not. Both models are run one
layer at a time on cached layer inputs (:class:`_LayerRunner`), not from the embeddings each time.
The normal equations are accumulated batch by batch (never all tokens at once) with the trick that
makes 1536 neurons cheap: with X the output Linear's input (tokens x D) and W its weight (hidden x D),
``G = blocksum((X^T X) ⊙ (W^T W))`` and ``r = blocksum(colsum(X ⊙ (Y W)))``, where ``blocksum``
adds up the D x D entries (D entries) of each unit (a head owns head_size columns, a neuron one).

Example (``pruned`` made from ``teacher`` with :func:`~tinycompress.models.structure.prune_heads_`)::

    report = tune_masks_(pruned, teacher, calibration_batches)
    report["layers"][0]["attention"]  # {"units": 6, "error_before": 0.031, "error_after": 0.012, ...}
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tinycompress.models.arch import get_arch, get_module, layers
from tinycompress.models.structure import ffn_sizes, head_counts

# A fitted scale beyond ±10 means least squares is using a nearly dead or nearly collinear unit to
# cancel others on the calibration tokens: a fit of noise that does not carry over to new inputs.
# Such weights would also widen the range int8 quantization must cover for the whole output Linear
# (per-tensor scales), costing every other unit precision. Kwon et al.'s released code uses the same
# bound but stops tuning altogether (this layer and all later ones) once a scale crosses it; we
# clamp the offending units instead and keep the block's scales only if the error, re-checked with
# the clamped values, still goes down (pruning MiniLM on SST-2 by 50-75 %, only 1-2 neurons of the
# last layer's FFN hit the bound). The other layers are tuned as usual.
SCALE_LIMIT = 10.0

DEFAULT_DAMPING = 1e-2


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what is needed has been captured."""


@dataclass
class _Normal:
    """Normal equations of one block, in float64, with what the relative error needs."""

    xtx: Tensor  # sum of X^T X over tokens, D x D
    xyw: Tensor  # sum of X ⊙ (Y W) over tokens, D
    yy: float = 0.0  # sum of ||y||² (y: target minus everything but the units' contributions)
    target_sum: Tensor | None = None  # sum of the targets over tokens, hidden
    target_sq: float = 0.0  # sum of ||target||²
    tokens: int = 0

    @classmethod
    def empty(cls, width: int, device) -> _Normal:
        return cls(
            torch.zeros(width, width, dtype=torch.float64, device=device),
            torch.zeros(width, dtype=torch.float64, device=device),
        )

    def add(self, x: Tensor, weight: Tensor, current: Tensor, target: Tensor) -> None:
        """Add tokens: ``x`` (tokens x D) the output Linear's input, ``weight`` its weight (hidden x
        D), ``current`` (tokens x hidden) the student's pre-LayerNorm sum, ``target`` the teacher's."""
        # y = target - (everything but the units) = target - current + x W^T (the bias stays in current)
        y = target - current + x @ weight.T
        self.xtx += (x.T @ x).double()
        self.xyw += (x * (y @ weight)).sum(0).double()
        self.yy += float(y.double().pow(2).sum())
        total = target.double().sum(0)
        self.target_sum = total if self.target_sum is None else self.target_sum + total
        self.target_sq += float(target.double().pow(2).sum())
        self.tokens += x.shape[0]

    def system(self, weight: Tensor, group: int) -> tuple[Tensor, Tensor]:
        """(G, r) over units of ``group`` consecutive input columns each."""
        w = weight.detach().double()
        full = self.xtx * (w.T @ w)
        n = full.shape[0] // group
        gram = full.view(n, group, n, group).sum((1, 3))
        rhs = self.xyw.view(n, group).sum(1)
        return gram, rhs

    def variance(self) -> float:
        """Sum over tokens of ||target - mean target||²: the relative error's denominator."""
        if not self.tokens:
            return 0.0
        return max(self.target_sq - float(self.target_sum.pow(2).sum()) / self.tokens, 0.0)


def _error(gram: Tensor, rhs: Tensor, yy: float, scales: Tensor) -> float:
    """||sum_u m_u C_u - y||² from the normal equations."""
    return float(scales @ gram @ scales - 2 * scales @ rhs) + yy


def _fit_block(normal: _Normal, linear: nn.Linear, group: int, damping: float) -> dict:
    """Solve for the block's unit scales, fold them into ``linear`` when they lower the error, and
    report what happened."""
    gram, rhs = normal.system(linear.weight, group)
    n = rhs.shape[0]
    ones = torch.ones(n, dtype=torch.float64, device=gram.device)
    before = _error(gram, rhs, normal.yy, ones)
    scales, clamped = ones, 0
    diagonal = float(gram.diagonal().mean()) if n else 0.0
    if diagonal > 0 and math.isfinite(diagonal):
        # Ridge towards 1 (the unchanged model), not towards 0: with few calibration tokens or
        # units that barely fire, the damping leaves a unit as it was rather than switching it off.
        # Scaled by the mean diagonal so that ``damping`` means the same at any activation size.
        lam = damping * diagonal
        eye = torch.eye(n, dtype=torch.float64, device=gram.device)
        solved = torch.linalg.solve(gram + lam * eye, rhs + lam * ones)
        if bool(torch.isfinite(solved).all()):
            clamped = int((solved.abs() > SCALE_LIMIT).sum())
            scales = solved.clamp(-SCALE_LIMIT, SCALE_LIMIT)
    after = _error(gram, rhs, normal.yy, scales)
    # Least squares includes m = 1, so the error can only go down; the check catches clamping and
    # a numerically failed solve, and keeps the layer as it was then.
    applied = after < before
    if applied:
        columns = scales.repeat_interleave(group).to(linear.weight.dtype)
        linear.weight.mul_(columns)
    else:
        scales, after = ones, before
    variance = normal.variance() or 1.0
    return {
        "units": n,
        "tokens": normal.tokens,
        "error_before": max(before, 0.0) / variance,
        "error_after": max(after, 0.0) / variance,
        "applied": applied,
        "clamped": clamped,
        "scale_min": float(scales.min()) if n else 1.0,
        "scale_max": float(scales.max()) if n else 1.0,
        "scale_mean": float(scales.mean()) if n else 1.0,
    }


class _LayerRunner:
    """Runs one model's encoder a layer at a time on every calibration batch, keeping each batch's
    hidden state between layers, so tuning layer i costs a pass through layer i, not layers 0..i.

    The arguments besides the hidden state that the encoder hands its layers (attention mask in
    whatever form the attention implementation wants, flags) are recorded once per batch at layer
    0 and replayed for every layer: BERT and DistilBERT encoders pass all layers the same ones.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Mapping[str, Tensor]]):
        self.layers = layers(model)
        self.next = 0  # index of the layer ``states`` are the input of
        self.states: list[Tensor] = []
        self.calls: list[tuple[tuple, dict]] = []
        device = next(model.parameters()).device

        def record(module, args, kwargs):
            if not args:
                raise ValueError("encoder layers must get their hidden state as the first positional argument")
            self.states.append(args[0].detach())
            self.calls.append((args[1:], kwargs))
            raise _Stop

        handle = self.layers[0].register_forward_pre_hook(record, with_kwargs=True)
        try:
            for batch in batches:
                with contextlib.suppress(_Stop):  # nothing past the embeddings is needed
                    model(**{k: v.to(device) for k, v in batch.items()})
        finally:
            handle.remove()

    def run(
        self,
        index: int,
        paths: Sequence[str] = (),
        each: Callable[[int, dict[str, Tensor]], None] | None = None,
        *,
        stop: bool = False,
        advance: bool = False,
    ) -> None:
        """Run layer ``index`` on every batch's current state and call ``each(batch index, {path:
        first input of the module at path})`` for the modules at ``paths`` (relative to the layer),
        one batch at a time. ``stop``: end each pass at the last of them. ``advance``: the layer's
        outputs become the states (the next layer's inputs)."""
        if index != self.next:
            raise ValueError(
                f"layer {index} needs the inputs of layer {index}, but the states are at layer {self.next}"
            )
        layer = self.layers[index]
        captured: dict[str, Tensor] = {}
        handles = []

        def hook_for(path: str, last: bool):
            def hook(module, args, kwargs):
                captured[path] = (args[0] if args else next(iter(kwargs.values()))).detach()
                if last and stop:
                    raise _Stop

            return hook

        try:
            for k, path in enumerate(paths):
                module = get_module(layer, path)
                handles.append(module.register_forward_pre_hook(hook_for(path, k == len(paths) - 1), with_kwargs=True))
            for b, (state, (args, kwargs)) in enumerate(zip(self.states, self.calls)):
                captured.clear()
                output = None
                with contextlib.suppress(_Stop):
                    output = layer(state, *args, **kwargs)
                missing = [p for p in paths if p not in captured]
                if missing:
                    raise ValueError(f"layer {index} never ran {', '.join(missing)}; is that block skipped?")
                if advance:
                    self.states[b] = output[0] if isinstance(output, tuple) else output
                if each is not None:
                    each(b, captured)
        finally:
            for handle in handles:
                handle.remove()
        if advance:
            self.next += 1

    def advance_to(self, index: int) -> None:
        """Run the layers before ``index`` that the states have not been through yet."""
        while self.next < index:
            self.run(self.next, advance=True)


def _tune_block(
    runner: _LayerRunner,
    index: int,
    out_path: str,
    norm_path: str,
    linear: nn.Linear,
    group: int,
    masks: Sequence[Tensor],
    targets: Sequence[Mapping[str, Tensor]],
    damping: float,
) -> dict:
    """Accumulate one block's normal equations over the batches (the student's pre-LayerNorm sum
    at ``norm_path`` against the teacher's), then fit and fold its scales (:func:`_fit_block`)."""
    normal = _Normal.empty(linear.in_features, linear.weight.device)

    def add(b: int, got: dict[str, Tensor]) -> None:
        mask = masks[b]
        normal.add(got[out_path][mask], linear.weight, got[norm_path][mask], targets[b][norm_path])

    runner.run(index, [out_path, norm_path], add, stop=True)
    return _fit_block(normal, linear, group, damping)


def _model_batches(batches: Iterable[Mapping[str, Tensor]], device) -> list[dict]:
    out = []
    for batch in batches:
        # Labels would only make HF compute a loss the early-stopped pass never reaches.
        out.append({k: v.to(device) for k, v in batch.items() if k != "labels" and torch.is_tensor(v)})
    return out


def _token_mask(batch: Mapping[str, Tensor]) -> Tensor:
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones(batch["input_ids"].shape, dtype=torch.bool, device=batch["input_ids"].device)
    return mask.bool()


def _check_layer_map(layer_map: Sequence[int] | None, n_student: int, n_teacher: int) -> list[int]:
    if layer_map is None:
        if n_student != n_teacher:
            raise ValueError(
                f"student has {n_student} layers and teacher {n_teacher}: pass layer_map (each student "
                "layer's teacher layer index)"
            )
        return list(range(n_student))
    layer_map = [int(j) for j in layer_map]
    increasing = all(a < b for a, b in zip(layer_map, layer_map[1:]))
    if len(layer_map) != n_student or not increasing or any(not 0 <= j < n_teacher for j in layer_map):
        raise ValueError(
            f"layer_map must give one teacher layer in 0..{n_teacher - 1} per student layer ({n_student}), "
            f"in increasing order, got {layer_map}"
        )
    return layer_map


@torch.no_grad()
def tune_masks_(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    layer_map: Sequence[int] | None = None,
    damping: float = DEFAULT_DAMPING,
) -> dict:
    """Rescale ``student``'s kept heads and FFN neurons in place so each layer reconstructs its
    teacher layer's pre-LayerNorm sums; returns the reconstruction errors before and after.

    Args:
        student: the pruned model (task head or bare encoder); its attention-output and FFN-out
            Linear weights are changed in place, nothing else (shapes included).
        teacher: the model it was pruned from (same family and hidden size), not changed.
        batches: calibration batches usable as ``model(**batch)`` (``labels`` are dropped),
            iterated once. Padding tokens (``attention_mask`` 0) are left out of the fit.
        layer_map: teacher layer index of each student layer, increasing (default: the identity,
            which needs equal layer counts); for students whose layers were removed.
        damping: ridge strength towards the unchanged scales (1), relative to the mean diagonal of
            the normal equations.

    Cost: about one teacher forward pass and three of the student over the batches. Memory: four
    hidden-state tensors of the whole calibration set (student's and teacher's layer inputs, padded;
    the teacher's two targets) on the student's device: ~180 MB for 2048 SST-2 rows at hidden size
    384, up to ~1.6 GB for 2048 rows of 128 tokens.

    Blocks with no units (0 heads or 0 neurons) are skipped. A block's new scales are kept only if
    they lower its error on the calibration tokens; each is clamped to ±``SCALE_LIMIT``.

    Returns ``{"damping", "scale_limit", "rows", "tokens", "seconds", "layers": [...]}`` with one
    entry per student layer: ``{"layer": i, "teacher_layer": j, "attention": block | None,
    "ffn": block | None}`` (None: skipped), a block being ``{"units", "tokens", "error_before",
    "error_after", "applied", "clamped", "scale_min", "scale_max", "scale_mean"}``. Errors are
    relative: ``||student sum - teacher sum||² / ||teacher sum - its mean||²`` over the tokens.
    """
    start = time.perf_counter()
    spec = get_arch(student)
    if get_arch(teacher) != spec:
        raise ValueError("student and teacher must be of the same model family")
    if getattr(student.config, spec.hidden_field) != getattr(teacher.config, spec.hidden_field):
        raise ValueError("student and teacher must have the same hidden size")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    layer_map = _check_layer_map(layer_map, len(layers(student)), len(layers(teacher)))
    device = next(student.parameters()).device
    batches = _model_batches(batches, device)
    masks = [_token_mask(b) for b in batches]
    head_size = spec.head_size(student.config)
    heads, neurons = head_counts(student), ffn_sizes(student)
    student_mode, teacher_mode = student.training, teacher.training
    student.eval()
    teacher.eval()
    report_layers = []
    try:
        if layer_map:
            student_run, teacher_run = _LayerRunner(student, batches), _LayerRunner(teacher, batches)
        for i, j in enumerate(layer_map):
            entry = {"layer": i, "teacher_layer": j, "attention": None, "ffn": None}
            report_layers.append(entry)
            layer = layers(student)[i]
            # A block without units may have no output Linear at all: look only at those tuned.
            attn_out = get_module(layer, spec.attn_out) if heads[i] else None
            ffn_out = get_module(layer, spec.ffn_out) if neurons[i] else None
            if attn_out is not None or ffn_out is not None:
                teacher_run.advance_to(j)
                # The teacher's pre-LayerNorm sums at its non-padding tokens, per batch.
                targets: list[dict[str, Tensor]] = []
                teacher_run.run(
                    j,
                    [spec.attn_norm] * (attn_out is not None) + [spec.ffn_norm] * (ffn_out is not None),
                    lambda b, got, store=targets: store.append({k: v.to(device)[masks[b]] for k, v in got.items()}),
                    advance=True,
                )
                if attn_out is not None:
                    entry["attention"] = _tune_block(
                        student_run, i, spec.attn_out, spec.attn_norm, attn_out, head_size, masks, targets, damping
                    )
                if ffn_out is not None:  # on the outputs of the attention just tuned
                    entry["ffn"] = _tune_block(
                        student_run, i, spec.ffn_out, spec.ffn_norm, ffn_out, 1, masks, targets, damping
                    )
                del targets
            if i + 1 < len(layer_map):
                student_run.run(i, advance=True)
    finally:
        student.train(student_mode)
        teacher.train(teacher_mode)
    return {
        "damping": damping,
        "scale_limit": SCALE_LIMIT,
        "rows": sum(int(m.shape[0]) for m in masks),
        "tokens": sum(int(m.sum()) for m in masks),
        "seconds": round(time.perf_counter() - start, 1),
        "layers": report_layers,
    }
