"""The checkpoint folder format: every file name and manifest key, in one place."""

from __future__ import annotations

import re
from pathlib import Path

# Defined with the models (which sit below checkpoint and must not import it), in a module
# without torch; named here so that every checkpoint name can be found in this one place.
from tinycompress.models.config_fields import LAYERS_TOTAL_KEY as LAYERS_TOTAL_KEY
from tinycompress.models.config_fields import STRUCTURE_ATTR as STRUCTURE_ATTR

FORMAT_VERSION = 1

MANIFEST_NAME = "tinycompress.yaml"

# ``details`` flag of a checkpoint made only for comparison (``tinycompress run``'s unpruned int8
# baselines): never taken as the default parent of a later stage or the end of the newest chain.
BASELINE_FLAG = "baseline"

STAGE_DIR_PATTERN = re.compile(r"^(?P<stage>[a-z]+)-v(?P<version>\d+)$")

# Files that make up a model's weights and graph; "size on disk" in the report is their sum
# (tokenizer files, configs and the model card are the same for every version and left out).
MODEL_FILE_SUFFIXES = (".safetensors", ".onnx", ".data", ".pt")

# HF-format PyTorch weights (finetune and prune checkpoints); never pickles.
WEIGHTS_FILE = "model.safetensors"

# The HF model config: labels, architecture and, for pruned models, ``STRUCTURE_ATTR``.
MODEL_CONFIG_FILE = "config.json"

# Tokenizer files (the fast tokenizer, a WordPiece vocabulary, the tokenizer's settings).
TOKENIZER_FILE = "tokenizer.json"

VOCAB_FILE = "vocab.txt"

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# The model card every checkpoint folder gets.
MODEL_CARD_FILE = "README.md"

ONNX_FILE = "model.onnx"

TORCHSCRIPT_FILE = "model.torchscript.pt"

TORCHSCRIPT_INT8_FILE = "model_int8.torchscript.pt"

# The torch int8 backend's checkpoint: the int8 tensors themselves, and which modules they replace.
INT8_WEIGHTS_FILE = "int8_weights.safetensors"

INT8_RECIPE_FILE = "int8_recipe.json"


def task_dir(workdir: str | Path, task: str) -> Path:
    return Path(workdir) / task
