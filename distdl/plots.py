"""PNG figures: training curves and confusion matrices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def training_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss (train and validation) and validation accuracy per epoch."""
    epochs = [m["epoch"] for m in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [m["train_loss"] for m in history], marker="o", label="train")
    loss_ax.plot(epochs, [m["val_loss"] for m in history], marker="o", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    loss_ax.legend()
    acc_ax.plot(epochs, [m["val_accuracy"] for m in history], marker="o", color="tab:green")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Validation accuracy", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def trial_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """Validation accuracy per epoch, one line per label (a Tune trial)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in curves.items():
        ax.plot([e for e, _ in points], [a for _, a in points], marker="o", label=label)
    ax.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy per trial",
           ylim=(0, 1))
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_matrix(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    """Rows are true classes, columns predictions; counts written in each cell."""
    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if count > threshold else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
