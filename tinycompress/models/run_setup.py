"""What a run sets up before it touches a model: seed, threads, device, quiet Hugging Face logs."""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

from tinycompress.data.tasks import TaskSpec, get_task
from tinycompress.errors import TinycompressError

if TYPE_CHECKING:
    import torch

    from tinycompress.config import Config


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


def resolve_device(device: str) -> torch.device:
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


def prepare(config: Config) -> tuple[TaskSpec, torch.device, int]:
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
