"""`distdl evaluate`: accuracy, per-class accuracy and a confusion matrix for a checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from distdl.config import DataConfig
from distdl.errors import UserError
from distdl.inference.predictor import Predictor

REPORT_FILE = "evaluation.json"
CONFUSION_FILE = "confusion_matrix.png"
_BATCH = 1024


def evaluate(checkpoint_path: str, *, data: str | None, output: Path) -> dict[str, Any]:
    """Score the checkpoint's validation split, or every image of `data` when given.
    `checkpoint_path` is one that `locate` returned."""
    from distdl.data.sources import load_images

    predictor = _load(checkpoint_path)
    data_cfg = DataConfig(**predictor.meta["data"])
    if data:
        data_cfg = dataclasses.replace(data_cfg, source=data, image_size=predictor.input_shape[1])
    images = load_images(data_cfg)
    if images.classes != predictor.classes:
        raise UserError(f"the classes of {data_cfg.source} ({', '.join(images.classes)}) are not "
                        f"the model's ({', '.join(predictor.classes)})")
    if images.image_shape[0] != predictor.input_shape[0]:
        raise UserError(f"the images of {data_cfg.source} have {images.image_shape[0]} colour "
                        f"channels; the model takes {predictor.input_shape[0]}")
    dataset = images.val if data is None else images.train.union(images.val)
    matrix = confusion(predictor, dataset)
    report = summarize(matrix, predictor.classes)
    report.update(checkpoint=str(checkpoint_path), data=data_cfg.source,
                  split="validation" if data is None else "all")
    write(report, matrix, predictor.classes, output)
    return report


def _load(path: str) -> Predictor:
    if "://" in path:
        import ray.train

        with ray.train.Checkpoint(path).as_directory() as local:
            return Predictor.from_checkpoint(local)
    return Predictor.from_checkpoint(path)


def locate(path: str) -> str:
    """The checkpoint that `path` names (itself, or a run's best), checked as far as it can be
    without Ray: a local one must exist and hold readable metadata; a URI is checked as read."""
    from distdl.train import checkpoint

    path = checkpoint.resolve(path)
    if "://" not in path:
        if not Path(path).exists():
            raise UserError(f"checkpoint not found: {path}")
        checkpoint.load_meta(path)
    return path


def confusion(predictor: Predictor, dataset) -> np.ndarray:
    """Counts of (true class, predicted class) over the dataset."""
    n = len(predictor.classes)
    matrix = np.zeros((n, n), dtype=np.int64)
    for batch in dataset.iter_batches(batch_size=_BATCH, batch_format="numpy"):
        predicted = predictor.predict(batch["image"]).argmax(axis=1)
        np.add.at(matrix, (batch["label"].astype(np.int64), predicted), 1)
    return matrix


def summarize(matrix: np.ndarray, classes: list[str]) -> dict[str, Any]:
    totals = matrix.sum(axis=1)
    per_class = {
        name: {"accuracy": float(matrix[i, i] / totals[i]) if totals[i] else None,
               "count": int(totals[i])}
        for i, name in enumerate(classes)
    }
    total = int(matrix.sum())
    return {
        "accuracy": float(np.trace(matrix) / total) if total else 0.0,
        "examples": total,
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }


def write(report: dict[str, Any], matrix: np.ndarray, classes: list[str], output: Path) -> None:
    from distdl.plots import confusion_matrix

    output.mkdir(parents=True, exist_ok=True)
    (output / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    confusion_matrix(matrix, classes, output / CONFUSION_FILE)


def format_report(report: dict[str, Any]) -> str:
    lines = [f"accuracy {report['accuracy']:.4f} on {report['examples']} examples "
             f"({report['data']}, {report['split']})", "", "class       accuracy   count"]
    for name, row in report["per_class"].items():
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        lines.append(f"{name[:10]:<10}  {acc:>8}  {row['count']:>6}")
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    lines += [" ".join(f"{c:>4}" for c in row) for row in report["confusion_matrix"]]
    return "\n".join(lines)
