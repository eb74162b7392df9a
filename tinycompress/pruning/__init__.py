"""Structured pruning: importance scores of heads and FFN neurons, selecting and removing them
step by step, FLOPs estimates, and vocabulary (embedding row) pruning."""
