"""Post-training int8 quantization: ONNX Runtime (dynamic or static QDQ) and PyTorch (dynamic
int8 Linear + int8 embedding, with its safetensors format)."""
