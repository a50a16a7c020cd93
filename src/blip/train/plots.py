"""Loss curves from a run's log.jsonl (matplotlib, headless)."""
from __future__ import annotations

import json
from pathlib import Path

LOSSES = ("loss_ita", "loss_itm", "loss_lm")


def read_log(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(rows: list[dict], out_png: str | Path, title: str = "pretraining",
                priors: dict[str, float] | None = None) -> Path:
    """One panel per loss of a run's log rows (`read_log`) against the optimizer step; `priors` draws a dashed line where a loss sits
    when nothing is learnt (e.g. ITC's log(batch), ITM's label entropy). Steps where a loss was not
    computed (logged as 0, e.g. ITC-only warmup steps) are left out of its curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [k for k in LOSSES if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        pts = [(r["step"], r[name]) for r in rows if r.get(name)]
        if pts:
            ax.plot(*zip(*pts), lw=1.6)
        if priors and name in priors:
            ax.axhline(priors[name], ls="--", c="gray", lw=1, label="nothing learnt")
            ax.legend(fontsize=8)
        ax.set_title(name.replace("loss_", "").upper())
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
