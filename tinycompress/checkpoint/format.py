"""The checkpoint folder format: every file name and manifest key, in one place."""

from __future__ import annotations

import re
from pathlib import Path


FORMAT_VERSION = 1


MANIFEST_NAME = "tinycompress.yaml"


# ``details`` flag of a checkpoint made only for comparison (``tinycompress run``'s unpruned int8
# baselines): never taken as the default parent of a later stage or the end of the newest chain.
BASELINE_FLAG = "baseline"


STAGE_DIR_PATTERN = re.compile(r"^(?P<stage>[a-z]+)-v(?P<version>\d+)$")


# Files that make up a model's weights and graph; "size on disk" in the report is their sum
# (tokenizer files, configs and the model card are the same for every version and left out).
MODEL_FILE_SUFFIXES = (".safetensors", ".onnx", ".data", ".pt")


ONNX_FILE = "model.onnx"


TORCHSCRIPT_FILE = "model.torchscript.pt"


TORCHSCRIPT_INT8_FILE = "model_int8.torchscript.pt"


def task_dir(workdir: str | Path, task: str) -> Path:
    return Path(workdir) / task
