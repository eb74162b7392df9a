"""The commands' work: one module per stage (finetune, prune, quantize, export) and per other
command (evaluate, predict, report, env, the run pipeline)."""
