"""Losses of one batch: cross-entropy / MSE, or distillation from a teacher."""

from __future__ import annotations

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


def batch_loss(
    model, batch: dict, device, *, regression: bool, teacher=None, temperature: float = 2.0, alpha: float = 0.5
):
    """The training loss of one collated batch (labels included): cross-entropy or MSE, or with a
    ``teacher`` the :func:`distillation_loss`. ``batch`` is consumed (its labels are popped)."""
    labels = batch.pop("labels").to(device)
    inputs = model_inputs(batch, device)
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
