"""Deployment exports of a classifier: ONNX (and its ONNX Runtime fusion), TorchScript, and their
parity checks against PyTorch."""
