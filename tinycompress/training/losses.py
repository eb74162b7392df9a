"""Losses of one batch: cross-entropy / MSE, or distillation from a teacher (logits, and optionally
hidden states layer by layer)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tinycompress.training.evaluation import model_inputs


def distillation_loss(student_logits, teacher_logits, labels, *, temperature: float, alpha: float, regression: bool):
    """alpha * soft loss against the teacher + (1 - alpha) * hard loss against the labels.

    Soft loss: KL divergence of temperature-softened distributions, scaled by T² (Hinton et
    al. 2015) so its gradients keep their size as T changes; for regression, MSE to the teacher.
    """
    if regression:
        soft = F.mse_loss(student_logits.squeeze(-1), teacher_logits.squeeze(-1))
        hard = F.mse_loss(student_logits.squeeze(-1), labels)
    else:
        t = temperature
        soft = (
            F.kl_div(F.log_softmax(student_logits / t, -1), F.softmax(teacher_logits / t, -1), reduction="batchmean")
            * t
            * t
        )
        hard = F.cross_entropy(student_logits, labels)
    return alpha * soft + (1 - alpha) * hard


def hidden_state_loss(student_hidden, teacher_hidden, attention_mask=None, layer_map: Sequence[int] | None = None):
    """Mean over student layers of the MSE between each layer's output and its teacher layer's.

    ``student_hidden`` / ``teacher_hidden``: the models' ``hidden_states`` (index 0 the embedding
    output, index i + 1 layer i's output), hidden sizes equal. Student layer i is compared with
    teacher layer ``layer_map[i]`` (default: the identity, which needs equal layer counts). Only
    tokens with ``attention_mask`` 1 count; the MSE averages over those tokens and hidden units.
    """
    n_student, n_teacher = len(student_hidden) - 1, len(teacher_hidden) - 1
    if layer_map is None:
        if n_student != n_teacher:
            raise ValueError(
                f"student has {n_student} layers and teacher {n_teacher}: pass layer_map (each student "
                "layer's teacher layer index)"
            )
        layer_map = range(n_student)
    if len(layer_map) != n_student or any(not 0 <= j < n_teacher for j in layer_map):
        raise ValueError(
            f"layer_map must give one teacher layer in 0..{n_teacher - 1} per student layer ({n_student}), "
            f"got {list(layer_map)}"
        )
    if n_student == 0:
        return student_hidden[0].new_zeros(())
    keep = attention_mask.bool() if attention_mask is not None else None
    losses = []
    for i, j in enumerate(layer_map):
        student, teacher = student_hidden[i + 1], teacher_hidden[j + 1]
        if keep is not None:
            student, teacher = student[keep], teacher[keep]  # [tokens, hidden]
        losses.append(F.mse_loss(student, teacher))
    return torch.stack(losses).mean()


def batch_loss(
    model,
    batch: dict,
    device,
    *,
    regression: bool,
    teacher=None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    layer_weight: float = 0.0,
    layer_map: Sequence[int] | None = None,
):
    """The training loss of one collated batch (labels included): cross-entropy or MSE, or with a
    ``teacher`` the :func:`distillation_loss`. ``batch`` is consumed (its labels are popped).

    With ``layer_weight`` > 0 (a teacher is then required), ``layer_weight`` times the
    :func:`hidden_state_loss` (student layer i against teacher layer ``layer_map[i]``) is added;
    with 0 (the default) hidden states are not even requested.
    """
    if layer_weight < 0:
        raise ValueError(f"layer_weight must be >= 0, got {layer_weight}")
    if layer_weight > 0 and teacher is None:
        raise ValueError("layer_weight > 0 distils hidden states: it needs a teacher")
    labels = batch.pop("labels").to(device)
    inputs = model_inputs(batch, device)
    if layer_weight > 0:
        outputs = model(**inputs, output_hidden_states=True)
        with torch.no_grad():
            teacher_outputs = teacher(**inputs, output_hidden_states=True)
        loss = distillation_loss(
            outputs.logits,
            teacher_outputs.logits,
            labels,
            temperature=temperature,
            alpha=alpha,
            regression=regression,
        )
        layers = hidden_state_loss(
            outputs.hidden_states, teacher_outputs.hidden_states, inputs.get("attention_mask"), layer_map
        )
        return loss + layer_weight * layers
    logits = model(**inputs).logits
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits
        return distillation_loss(
            logits, teacher_logits, labels, temperature=temperature, alpha=alpha, regression=regression
        )
    if regression:
        return F.mse_loss(logits.squeeze(-1), labels)
    return F.cross_entropy(logits, labels)
