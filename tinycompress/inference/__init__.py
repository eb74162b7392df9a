"""Running any model folder: one predictor interface over PyTorch, ONNX Runtime, torch int8 and
TorchScript, an ONNX Runtime session wrapper, and latency measurement."""
