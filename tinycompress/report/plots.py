"""The report's plots: accuracy against size (chain and baselines) and the prune sweep."""

from __future__ import annotations

from pathlib import Path

from tinycompress.report.rows import Report, Row


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers, CI or over ssh
    import matplotlib.pyplot as plt

    return plt


def plot_size(report: Report, path: Path) -> None:
    """Primary test metric against size on disk, one point per version, named in the legend.

    The chain (fine-tuned → pruned → quantized) is joined by a line in that order; baselines
    (int8 without pruning) are squares off the line. Versions at the same spot (an ONNX export is
    a copy of the quantized file) share one point. A legend rather than labels beside the points:
    the int8 versions sit within a few MB and a fraction of a point of one another.
    """
    plt = _pyplot()
    metric = report.primary_metric
    spots: dict[tuple[float, float], list[Row]] = {}
    for r in report.rows:
        if r.status == "ok" and r.size_mb is not None and r.metrics.get(metric) is not None:
            spots.setdefault((round(r.size_mb, 3), r.metrics[metric]), []).append(r)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    chain = [spot for spot, rows in spots.items() if any(r.key != "baseline" for r in rows)]
    if len(chain) > 1:
        xs, ys = zip(*chain)  # in table order: original, fine-tuned, pruned, quantized, exports
        ax.plot(xs, ys, color="grey", linewidth=1, alpha=0.5, zorder=2)
    for i, ((size, score), rows) in enumerate(spots.items()):
        baseline = all(r.key == "baseline" for r in rows)
        names = " = ".join(r.label for r in rows)
        ax.scatter(
            [size],
            [score],
            s=60,
            marker="s" if baseline else "o",
            color=colors[i % len(colors)],
            zorder=3,
            label=f"{names}: {size:.1f} MB, {score:.4f}",
        )
    if spots:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(
            0.5, 0.5, "no version has both a size and a test metric", ha="center", va="center", transform=ax.transAxes
        )
    ax.margins(x=0.1, y=0.15)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel(f"test {metric} (GLUE validation)")
    ax.set_title(f"{report.task}: {metric} against size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(report: Report, path: Path) -> None:
    """The sweep's test metric against the fraction of heads removed, per criterion, with this chain's prune."""
    plt = _pyplot()
    metric = report.primary_metric
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    criteria = list(dict.fromkeys(r["criterion"] for r in report.sweep_rows if r["criterion"] != "unpruned"))
    for color, criterion in zip(colors, criteria):
        for recovered, style in ((False, "-o"), (True, "--s")):
            points = sorted(
                (r["head_ratio"], r["score"])
                for r in report.sweep_rows
                if r["criterion"] == criterion and r["recovered"] == recovered
            )
            if points:
                xs, ys = zip(*points)
                ax.plot(
                    xs,
                    ys,
                    style,
                    color=color,
                    markersize=4,
                    label=f"{criterion} + recovery" if recovered else criterion,
                )
    unpruned = [r["score"] for r in report.sweep_rows if r["criterion"] == "unpruned"]
    if unpruned:
        ax.axhline(unpruned[0], color="grey", linestyle=":", label="unpruned")
    prune = report.row("prune")
    ratio = _prune_ratio(report)
    if prune is not None and prune.status == "ok" and ratio is not None and prune.metrics.get(metric) is not None:
        # The sweep removes heads only; say so when this chain's prune removed FFN neurons too.
        extra = (
            ", FFN pruned too"
            if prune.ffn_kept is not None and prune.ffn_total and prune.ffn_kept < prune.ffn_total
            else ""
        )
        ax.scatter(
            [ratio],
            [prune.metrics[metric]],
            marker="*",
            s=160,
            color="black",
            zorder=4,
            label=f"{prune.checkpoint} (this chain{extra})",
        )
    ax.set_xlabel("fraction of attention heads removed")
    ax.set_ylabel(f"test {metric} (GLUE validation)")
    ax.set_title(f"{report.task}: pruning sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _prune_ratio(report: Report) -> float | None:
    """The first prune's fraction of all heads removed (comparable with the sweep's x axis)."""
    prune = report.row("prune")
    if prune is None or prune.heads_kept is None or not prune.heads_total:
        return None
    return 1 - prune.heads_kept / prune.heads_total
