"""tinycompress: make small Transformer classifiers smaller and faster."""
__version__ = "0.1.0"
