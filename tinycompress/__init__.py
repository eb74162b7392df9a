"""tinycompress: make small Transformer classifiers smaller and faster."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tinycompress")  # the one place it is written: pyproject.toml
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
