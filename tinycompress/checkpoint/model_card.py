"""The README.md model card every checkpoint folder carries (Hugging Face's front matter, so a
folder pushed to the hub is described; the metrics table; where the provenance is)."""

from __future__ import annotations

from typing import Any

import yaml

from tinycompress.checkpoint.format import MANIFEST_NAME


def model_card(task: str, stage: str, version: int, base_model: str, metrics: dict[str, Any]) -> str:
    """The folder's README.md: a Hugging Face model card (front matter, test metrics table)."""
    metric_names = sorted({k.split("/")[-1] for k in metrics if k.startswith("test/")})
    front = {
        "base_model": base_model,
        "datasets": ["nyu-mll/glue"],
        "metrics": metric_names,
        "pipeline_tag": "text-classification",
        "library_name": "transformers",
        "tags": ["tinycompress", stage, task],
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {task} · {stage}-v{version}",
        "",
        f"Written by `tinycompress {stage}`. Test metrics are on the GLUE validation set "
        "(GLUE test labels are hidden).",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    lines += ["", f"Provenance, config and file checksums: `{MANIFEST_NAME}`.", ""]
    return "\n".join(lines)
