"""Transformer classifiers: loading pretrained ones, where each family keeps its prunable modules,
the pruned structure recorded in the config, and device / thread / seed setup."""
