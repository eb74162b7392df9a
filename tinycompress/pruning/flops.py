"""Multiply-accumulate count of an encoder forward pass, pruned or not."""

from __future__ import annotations

from torch import nn

from tinycompress.models.arch import get_arch, get_module, layers
from tinycompress.models.structure import ffn_sizes, head_counts


def estimate_flops(model: nn.Module, seq_len: int) -> int:
    """Encoder FLOPs for one sequence of ``seq_len`` tokens (2 FLOPs per MAC).

    Counts the Q/K/V/output projections and both FFN Linears
    (``2 * T * in * out`` each) and the attention score (QK^T) and context
    (softmax . V) matmuls (``2 * T * T * heads * head_size`` each). Excludes
    embeddings, biases, LayerNorm, softmax, activations, pooler and classifier
    head: those are small and unaffected by pruning. A skipped attention block or
    FFN (no heads / no neurons left) counts 0.
    """
    if int(seq_len) != seq_len or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len}")
    spec = get_arch(model)
    total = 0
    for layer, heads, neurons in zip(layers(model), head_counts(model), ffn_sizes(model)):
        paths = (spec.query, spec.key, spec.value, spec.attn_out) if heads else ()
        paths += (spec.ffn_in, spec.ffn_out) if neurons else ()
        for path in paths:
            linear = get_module(layer, path)
            total += 2 * seq_len * linear.in_features * linear.out_features
        if heads:
            inner = get_module(layer, spec.query).out_features  # heads * head_size
            total += 2 * (2 * seq_len * seq_len * inner)
    return int(total)
