"""`distdl evaluate`: accuracy, per-class accuracy and a confusion matrix for a checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs

from distdl.config import DataConfig
from distdl.errors import UserError
from distdl.inference.predictor import Predictor
from distdl.storage import probe
from distdl.train.checkpoint import section

REPORT_FILE = "evaluation.json"
CONFUSION_FILE = "confusion_matrix.png"
_BATCH = 1024


def evaluate(checkpoint_path: str, *, data: str | None, output: Path) -> dict[str, Any]:
    """Score the checkpoint's validation split, or every image of `data` when given.
    `checkpoint_path` is one that `locate` returned."""
    from distdl.data.sources import load_images

    predictor = _load(checkpoint_path)
    data_cfg = section(predictor.meta, "data", DataConfig, checkpoint_path)
    if data:
        data_cfg = dataclasses.replace(data_cfg, source=data)
    # At the model's own (H, W): the images are resized once, as they were for training.
    images = load_images(data_cfg, size=tuple(predictor.input_shape[1:]), whole=bool(data))
    labels = _model_labels(images.classes, predictor.classes, data_cfg.source)
    dataset = images.val if data is None else images.train.union(images.val)
    matrix = confusion(predictor, dataset, labels)
    report = summarize(matrix, predictor.classes)
    report.update(checkpoint=str(checkpoint_path), data=data_cfg.source,
                  split="validation" if data is None else "all", skipped=images.skipped)
    write(report, matrix, predictor.classes, output)
    return report


def _model_labels(classes: list[str], model_classes: list[str], source: str) -> np.ndarray:
    """The model's label for each of the data's classes, matched by name: a test set may hold
    some of the model's classes only, in any order."""
    unknown = [name for name in classes if name not in model_classes]
    if unknown:
        raise UserError(f"{source} has classes the model does not know: {', '.join(unknown)} "
                        f"(the model's: {', '.join(model_classes)})")
    return np.array([model_classes.index(name) for name in classes], dtype=np.int64)


def _load(path: str) -> Predictor:
    if "://" in path:
        import ray.train

        with ray.train.Checkpoint(path).as_directory() as local:
            return Predictor.from_checkpoint(local)
    return Predictor.from_checkpoint(path)


def locate(path: str) -> str:
    """The checkpoint that `path` names (itself, or a run's best), checked as far as it can be
    without Ray: a local one must exist and hold readable metadata; a URI must answer, in
    bounded time, and exist (its metadata is read with the weights)."""
    from distdl.train import checkpoint

    path = checkpoint.resolve(path)
    remote = "://" in path
    if remote:
        exists = probe(path, what="checkpoint") != pyarrow.fs.FileType.NotFound
    else:
        exists = Path(path).exists()
    if not exists:
        raise UserError(f"checkpoint not found: {path}")
    if not remote:
        checkpoint.load_meta(path)
    return path


def confusion(predictor: Predictor, dataset, labels: np.ndarray) -> np.ndarray:
    """Counts of (true class, predicted class) over the dataset; `labels` maps the dataset's
    labels to the model's."""
    n = len(predictor.classes)
    matrix = np.zeros((n, n), dtype=np.int64)
    channels = predictor.input_shape[0]
    for batch in dataset.iter_batches(batch_size=_BATCH, batch_format="numpy"):
        images = match_channels(batch["image"], channels)
        predicted = predictor.predict(images).argmax(axis=1)
        np.add.at(matrix, (labels[batch["label"]], predicted), 1)
    return matrix


def match_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (N, H, W, C) images with `channels` channels: gray repeated into RGB, or RGB
    reduced to its luminance (ITU-R 601, as Pillow's mode L), as a file source would have
    read them for a model of that many channels."""
    if images.shape[-1] == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return (luma + 0.5).astype(np.uint8)[..., None]


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
    width = max(len("class"), *(len(name) for name in report["per_class"]))
    skipped = report.get("skipped", 0)
    lines = [f"accuracy {report['accuracy']:.4f} on {report['examples']} examples "
             f"({report['data']}, {report['split']})"
             + (f"; skipped {skipped} unreadable image{'s' * (skipped > 1)}" if skipped else ""),
             "", f"{'class':<{width}}  accuracy   count"]
    for name, row in report["per_class"].items():
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        lines.append(f"{name:<{width}}  {acc:>8}  {row['count']:>6}")
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    lines += [" ".join(f"{c:>4}" for c in row) for row in report["confusion_matrix"]]
    return "\n".join(lines)
