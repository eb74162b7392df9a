"""Fine-tuning and evaluation: the training loop (with distillation), losses, task metrics and
logits over a split."""
