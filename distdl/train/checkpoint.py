"""The checkpoint directory that connects every stage.

    model.pt        the model's state_dict (tensors only: loads with torch.load(weights_only=True))
    meta.json       what is needed to rebuild and use the model: architecture, classes, input
                    shape, normalization, data source, metrics, versions
    train_state.pt  optimizer, schedule and epoch, to resume training (tensors and numbers only)
"""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import distdl
from distdl.config import DataConfig, ModelConfig, build_section
from distdl.errors import UserError
from distdl.train import rundir

if TYPE_CHECKING:  # imported where used: `distdl train`'s driver reads and writes metadata only
    import torch
    from torch import nn

T = TypeVar("T")

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
TRAIN_STATE_FILE = "train_state.pt"
FORMAT_VERSION = 1
# What `distdl tune` writes in its output folder at the end. It, and result.json in the run
# directory of `distdl train`, name the best checkpoint, so either folder can stand for it.
TUNE_RESULT_FILE = "tune_result.json"


def make_meta(
    *,
    model: ModelConfig,
    classes: list[str],
    input_shape: tuple[int, int, int],
    normalization: dict[str, list[float]],
    data: DataConfig,
    torch_version: str | None = None,
) -> dict[str, Any]:
    """Everything about a checkpoint that does not change from epoch to epoch.

    `torch_version`: as torch.__version__ gives it, where the caller has it without importing
    torch (the driver of `distdl train` gets it from model_check); None imports torch.
    """
    if torch_version is None:
        import torch

        # Plain text: torch's own version type would make every process that unpickles the
        # meta import torch, Ray Train's controller included.
        torch_version = str(torch.__version__)
    return {
        "format": FORMAT_VERSION,
        "task": "image_classification",
        "model": dataclasses.asdict(model),
        "classes": list(classes),
        "input_shape": list(input_shape),
        "normalization": normalization,
        "data": dataclasses.asdict(data),
        "versions": {
            "distdl": distdl.__version__,
            "torch": torch_version,
            "python": platform.python_version(),
        },
    }


def save(
    directory: str | Path,
    model: nn.Module,
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> Path:
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / MODEL_FILE)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if train_state is not None:
        torch.save(train_state, directory / TRAIN_STATE_FILE)
    return directory


def resolve(path: str) -> str:
    """`path`, or for a folder that `distdl train` or `distdl tune` wrote, its best checkpoint:
    users point at `runs/NAME` as readily as at the checkpoint inside it."""
    directory = Path(path).expanduser()
    if "://" in path or (directory / META_FILE).is_file():
        return path
    for name in (rundir.RESULT_FILE, TUNE_RESULT_FILE):
        if (directory / name).is_file():
            return _best_checkpoint(directory / name)
    saved = sorted(directory.glob(f"checkpoint_*/{META_FILE}"))  # named by time: latest last
    if saved:
        raise UserError(f"{path} names no best checkpoint until its run ends; give one of its "
                        f"checkpoints, such as the latest: {saved[-1].parent}")
    return path


def _best_checkpoint(result_file: Path) -> str:
    try:
        best = json.loads(result_file.read_text()).get("best_checkpoint")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise UserError(f"cannot read {result_file}: {exc}") from None
    if not best:
        raise UserError(f"{result_file} names no best checkpoint: that run saved none")
    return best


def load_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise UserError(f"not a distdl checkpoint: {directory} has no {META_FILE}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"corrupt checkpoint metadata {path}: {exc}") from None
    if not isinstance(meta, dict):
        raise UserError(f"corrupt checkpoint metadata {path}: a JSON object was expected")
    missing = {"model", "classes", "input_shape", "normalization"} - meta.keys()
    if missing:
        raise UserError(f"corrupt checkpoint metadata {path}: missing {', '.join(sorted(missing))}")
    shape, classes = meta["input_shape"], meta["classes"]
    if not (isinstance(shape, list) and len(shape) == 3
            and all(isinstance(n, int) and n > 0 for n in shape)):
        raise UserError(f"corrupt checkpoint metadata {path}: input_shape must be [C, H, W], "
                        f"got {shape!r}")
    if not (isinstance(classes, list) and len(classes) >= 2
            and all(isinstance(c, str) for c in classes)):
        raise UserError(f"corrupt checkpoint metadata {path}: classes must be a list of at "
                        "least two names")
    if not _normalization_fits(meta["normalization"], channels=shape[0]):
        raise UserError(f"corrupt checkpoint metadata {path}: normalization must be "
                        f'{{"mean": [...], "std": [...]}}, each one number per channel '
                        f"({shape[0]}), the std above 0")
    return meta


def _normalization_fits(norm: Any, *, channels: int) -> bool:
    def numbers(values: Any) -> bool:
        return (isinstance(values, list) and len(values) == channels
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values))

    return (isinstance(norm, dict) and numbers(norm.get("mean")) and numbers(norm.get("std"))
            and all(v > 0 for v in norm["std"]))


def section(meta: dict[str, Any], name: str, kind: type[T], directory: str | Path) -> T:
    """A config section of the metadata, e.g. the model's, with its fields' names and types
    checked as a config file's are; a UserError when it is missing or does not check."""
    try:
        return build_section(kind, meta.get(name), prefix=f"{name}.")
    except UserError as exc:
        raise UserError(f"corrupt checkpoint metadata {Path(directory) / META_FILE}: its "
                        f"'{name}' section cannot be read ({exc})") from None


def load_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    import torch

    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise UserError(f"not a distdl checkpoint: {directory} has no {MODEL_FILE}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        # Not torch's text: it advises weights_only=False, which would run the file's code.
        raise UserError(f"corrupt checkpoint weights {path}: not a state_dict that "
                        f"torch.load(weights_only=True) reads ({type(exc).__name__})") from None


def load_model(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model described by `meta.json` and load its weights (CPU, eval mode)."""
    from distdl.models import build_model

    meta = load_meta(directory)
    channels, height, _ = meta["input_shape"]
    model = build_model(
        section(meta, "model", ModelConfig, directory),
        num_classes=len(meta["classes"]),
        in_channels=channels,
        image_size=height,
    )
    try:
        model.load_state_dict(load_state_dict(directory))
    except RuntimeError as exc:
        # torch's first line only names the model class; the next one names a tensor.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = (lines[1:] or lines or [type(exc).__name__])[0]
        raise UserError(f"checkpoint {directory} does not match its meta.json: "
                        f"{detail[:300]}") from None
    return model.eval(), meta


def load_train_state(directory: str | Path) -> dict[str, Any]:
    import torch

    return torch.load(Path(directory) / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
