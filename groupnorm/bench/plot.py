"""The main job's picture (``--plot FILE.png``): speed-ups per row against torch eager and
torch.compile, and the bandwidth ours achieves against the memory floor. Needs matplotlib
(``pip install -e ".[plot]"``); drawn off screen (Agg), so no display is needed."""
from __future__ import annotations

import textwrap
from typing import List

from .overview import Row


def plot_rows(rows: List[Row], path: str, title: str = "") -> None:
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install -e \".[plot]\"") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.case}\n{r.dtype} {r.layout}" for r in rows]
    at = list(range(len(rows)))
    fig, (speed, bandwidth) = plt.subplots(2, 1, figsize=(max(8.0, 0.75 * len(rows) + 2), 8), sharex=True)
    bars = (("forward vs eager", "fwd_vs_eager", "#1f77b4"), ("forward vs compile", "fwd_vs_compile", "#aec7e8"),
            ("training step vs eager", "train_vs_eager", "#d62728"),
            ("training step vs compile", "train_vs_compile", "#ff9896"))
    width = 0.8 / len(bars)
    for k, (label, key, colour) in enumerate(bars):
        values = [getattr(r, key) or 0.0 for r in rows]
        speed.bar([i + (k - 1.5) * width for i in at], values, width, label=label, color=colour)
    speed.axhline(1.0, color="black", linewidth=0.8)
    speed.set_ylabel("speed-up (their time / ours)")
    speed.legend(fontsize=8, ncol=4, loc="upper left")
    speed.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=8)

    width = 0.4
    bandwidth.bar([i - width / 2 for i in at], [r.fwd_gbps for r in rows], width, label="forward", color="#1f77b4")
    bandwidth.bar([i + width / 2 for i in at], [r.train_gbps for r in rows], width, label="training step",
                  color="#d62728")
    bandwidth.scatter(at, [r.floor_gbps for r in rows], marker="_", s=400, color="black", zorder=3,
                      label="memory floor (copy speed)")
    bandwidth.set_ylabel("GB/s (least bytes moved / time)")
    bandwidth.legend(fontsize=8, loc="upper left")
    bandwidth.set_xticks(at)
    bandwidth.set_xticklabels(labels, fontsize=7, rotation=45, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
