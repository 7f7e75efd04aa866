"""Charts a stage or a run leaves beside its outputs: training curves, the run's comparison."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_curves(points: list[dict], keys: list[str], out: Path, title: str) -> None:
    """Line plots of history points (one panel per key) -> curves.png."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        pts = sorted((p["step"], p["value"]) for p in points if p["key"] == key)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".")
        ax.set_title(key)
        ax.set_xlabel("step" if key in ("train_loss", "tokens_per_s") else "epoch")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = out / ".curves.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out / "curves.png")


def comparison_chart(rows: list[dict], out: Path, title: str) -> None:
    """One picture of a run: test accuracy and macro F1 of every model (strategies, ablations,
    baseline) side by side, and the scalar-mix layer weights each strategy ended with (read
    from the stage folders' layer_weights.json) -> a PNG at ``out``."""
    names = [r["name"] for r in rows]
    acc = [r["metrics"]["test_accuracy"] for r in rows]
    f1 = [r["metrics"]["test_macro_f1"] for r in rows]
    weights = {}
    for r in rows:
        p = Path(r["dir"]) / "layer_weights.json"
        if p.exists():
            weights[r["name"].removeprefix("classifier-")] = json.loads(p.read_text())["weights"]
    fig, axes = plt.subplots(
        1, 2 if weights else 1, figsize=(12 if weights else 7, 4.2), squeeze=False
    )
    ax = axes[0][0]
    x = np.arange(len(names))
    for off, vals, label in ((-0.2, acc, "test accuracy"), (0.2, f1, "macro F1")):
        bars = ax.bar(x + off, vals, 0.4, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    lo = max(0.0, min(acc + f1) - 0.1)
    ax.set_ylim(lo, min(1.0, max(acc + f1) + 0.05))
    ax.set_xticks(x, [n.removeprefix("classifier-") for n in names], rotation=20)
    ax.set_title("test split")
    ax.legend(loc="lower right", fontsize=8)
    if weights:
        ax = axes[0][1]
        n_layers = len(next(iter(weights.values())))
        width = 0.8 / len(weights)
        for i, (name, w) in enumerate(weights.items()):
            ax.bar(np.arange(n_layers) + (i - (len(weights) - 1) / 2) * width, w, width, label=name)
        ax.set_xticks(np.arange(n_layers), [f"layer {k}" for k in range(n_layers)])
        ax.set_title("scalar-mix layer weights (softmax)")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
