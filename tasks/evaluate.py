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
