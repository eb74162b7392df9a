"""The checkpoint folder format: every file name and manifest key, in one place."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Defined with the models (which sit below checkpoint and must not import it), in a module
# without torch; named here so that every checkpoint name can be found in this one place.
from tinycompress.models.config_fields import HEAD_ATTR as HEAD_ATTR
from tinycompress.models.config_fields import LAYERS_TOTAL_KEY as LAYERS_TOTAL_KEY
from tinycompress.models.config_fields import STRUCTURE_ATTR as STRUCTURE_ATTR

# 2 added the manifest's own checksum (SELF_CHECKSUM_KEY); format 1 folders are still read.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)

MANIFEST_NAME = "tinycompress.yaml"

# The sha256 of the manifest's canonical content (:func:`manifest_digest`), stored in the
# manifest itself, so an edited metric or config is refused on read. It guards against edits and
# damage, not against someone who recomputes it: the files' checksums are what the weights rely on.
SELF_CHECKSUM_KEY = "self_sha256"

# The command line that wrote the folder (format 2), quoted for a shell; hints say it back.
COMMAND_KEY = "command"

# ``details`` flag of a checkpoint made only for comparison (``tinycompress run``'s unpruned int8
# baselines): never taken as the default parent of a later stage or the end of the newest chain.
BASELINE_FLAG = "baseline"

STAGE_DIR_PATTERN = re.compile(r"^(?P<stage>[a-z]+)-v(?P<version>\d+)$")

# Files that make up a model's weights and graph; "size on disk" in the report is their sum
# (tokenizer files, configs and the model card are the same for every version and left out).
MODEL_FILE_SUFFIXES = (".safetensors", ".onnx", ".data", ".pt")

# HF-format PyTorch weights (finetune and prune checkpoints); never pickles.
WEIGHTS_FILE = "model.safetensors"

# The HF model config: labels, architecture, for pruned models ``STRUCTURE_ATTR``, for a mean head ``HEAD_ATTR``.
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


# `finetune --search`: the Optuna study's journal (JSON lines, Optuna's own file storage) and one
# CSV row per trial, copied into the fine-tune checkpoint the search ends with. While a search
# runs (and after Ctrl-C, to resume it) the journal lives in the task's SEARCH_DIR.
SEARCH_JOURNAL_FILE = "search_journal.jsonl"

SEARCH_TRIALS_FILE = "search_trials.csv"

SEARCH_DIR = "searches"


def task_dir(workdir: str | Path, task: str) -> Path:
    return Path(workdir) / task


def search_journal_path(workdir: str | Path, task: str, study_name: str) -> Path:
    """Where the journal of the study ``study_name`` lives while it runs and between resumes."""
    return task_dir(workdir, task) / SEARCH_DIR / f"{study_name}.jsonl"


_SHA256 = r"^[0-9a-f]{64}$"


class _Strict(BaseModel):
    # Types are checked as written (no "7" -> 7); keys a later version adds are kept.
    model_config = ConfigDict(strict=True, extra="allow")


class ParentLink(_Strict):
    path: str = Field(min_length=1)
    stage: str
    manifest_sha256: str = Field(pattern=_SHA256)


class Manifest(_Strict):
    """The typed fields of ``tinycompress.yaml`` that the tool relies on."""

    format_version: int
    stage: str = Field(pattern=r"^[a-z]+$")
    task: str = Field(min_length=1)
    version: int = Field(ge=1)
    created: str | None = None
    base_model: str | None = None
    parent: ParentLink | None = None
    seed: int | None = None
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {}
    config: dict[str, Any]
    versions: dict[str, str] = {}
    files: dict[str, str]
    size_bytes: int | None = Field(None, ge=0)
    model_bytes: int | None = Field(None, ge=0)
    command: str | None = None
    self_sha256: str | None = Field(None, pattern=_SHA256)


def _canonical(value: Any) -> Any:
    """``value`` with mapping keys as strings and non-finite floats spelled out, for JSON."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's content without :data:`SELF_CHECKSUM_KEY`: JSON with sorted keys,
    so it does not depend on how a YAML library lays the file out."""
    content = {k: v for k, v in manifest.items() if k != SELF_CHECKSUM_KEY}
    text = json.dumps(_canonical(content), sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
