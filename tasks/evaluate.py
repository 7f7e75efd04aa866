"""Test-split evaluation shared by the ELMo classifiers and the TF-IDF baseline."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
)

from storage.paths import atomic_write_bytes, write_json  # noqa: E402


def evaluate(
    y_true: np.ndarray, y_pred: np.ndarray, label_names: list[str], out: Path, title: str
) -> dict[str, float]:
    """Writes metrics.json (merged), classification_report.txt and confusion_matrix.png."""
    labels = list(range(len(label_names)))
    metrics = {
        "test_accuracy": float(accuracy_score(y_true, y_pred)),
        "test_macro_f1": float(f1_score(y_true, y_pred, average="macro", labels=labels)),
        "test_weighted_f1": float(f1_score(y_true, y_pred, average="weighted", labels=labels)),
        "test_precision": float(
            precision_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)
        ),
        "test_recall": float(
            recall_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)
        ),
        "test_precision_weighted": float(
            precision_score(y_true, y_pred, average="weighted", labels=labels, zero_division=0)
        ),
        "test_recall_weighted": float(
            recall_score(y_true, y_pred, average="weighted", labels=labels, zero_division=0)
        ),
    }
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=label_names, digits=4, zero_division=0
    )
    atomic_write_bytes(out / "classification_report.txt", report.encode())
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ConfusionMatrixDisplay(cm, display_labels=label_names).plot(
        ax=ax, colorbar=False, values_format="d"
    )
    ax.set_title(f"{title}: test accuracy {metrics['test_accuracy']:.4f}")
    fig.tight_layout()
    tmp = out / ".confusion_matrix.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out / "confusion_matrix.png")
    write_json(out / "confusion_matrix.json", cm.tolist())
    return metrics


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
            import json

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
