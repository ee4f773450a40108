"""One Predictor for every front end: evaluation, Ray Data batch inference and Ray Serve.

It applies exactly the preprocessing of training (uint8 HWC -> float CHW -> normalize with the
statistics stored in the checkpoint), so a served model sees what the trained model saw.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from distdl import runtime
from distdl.data.transforms import normalize, per_channel, resize_uint8, to_float_chw
from distdl.train import checkpoint

log = logging.getLogger(__name__)


class Predictor:
    def __init__(self, model: nn.Module, meta: dict[str, Any], device: torch.device | None = None,
                 *, channels_last: bool = True, mixed_precision: bool = True):
        """Both apply on GPU only: `mixed_precision` runs the model under autocast (bf16 where
        supported), and `channels_last` suits convolutions in mixed precision there. On CPU the
        layout sped some models and slowed others (ResNet-18 at 32x32, batches of 16, by 6%
        here), so the Predictor keeps NCHW there."""
        self.device = device or torch.device("cuda" if runtime.cuda_available() else "cpu")
        self._memory_format = (torch.channels_last if channels_last and self.device.type == "cuda"
                               else torch.contiguous_format)
        self.model = fold_batch_norm(model).to(self.device, memory_format=self._memory_format)
        self.meta = meta
        self.classes: list[str] = meta["classes"]
        self.input_shape: tuple[int, int, int] = tuple(meta["input_shape"])
        self._mean, self._std = (per_channel(meta["normalization"][key], self.device)
                                 for key in ("mean", "std"))
        self._dtype = runtime.autocast_dtype(self.device) if mixed_precision else None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device | None = None, *,
                        channels_last: bool = True, mixed_precision: bool = True) -> Predictor:
        model, meta = checkpoint.load_model(path)
        return cls(model, meta, device, channels_last=channels_last,
                   mixed_precision=mixed_precision)

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images (N, H, W, C), resized to the model's input if needed -> model input."""
        channels, height, width = self.input_shape
        if images.ndim == 3:
            images = images[..., None]
        if images.shape[1:3] != (height, width):
            images = np.stack([resize_uint8(image, (height, width)) for image in images])
        if images.shape[3] != channels:
            raise ValueError(f"images have {images.shape[3]} channels; the model takes {channels}")
        x = torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return normalize(to_float_chw(x, self._memory_format), self._mean, self._std)

    @torch.inference_mode()
    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (N, num_classes) for uint8 images (N, H, W, C)."""
        x = self.preprocess(images)
        if self._dtype is not None:
            with torch.autocast(self.device.type, dtype=self._dtype):
                logits = self.model(x)
        else:
            logits = self.model(x)
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def predict_in_passes(self, images: np.ndarray, size: int) -> np.ndarray:
        """`predict` in forward passes of at most `size` images, so that the memory of a pass
        stays bounded however many images come."""
        return np.concatenate([self.predict(images[start:start + size])
                               for start in range(0, len(images), size)])


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """The model in eval mode, with each batch norm that follows a convolution folded into that
    convolution's weights: the same function, one layer fewer to run per pair.

    Folding needs a traceable forward (torch.fx); a model without one runs as it is.
    """
    model = model.eval()
    try:
        return fuse(model)
    except Exception as error:  # tracing fails in many ways (TraceError, TypeError, ...)
        log.warning("running %s without folding batch norm: %s", type(model).__name__, error)
        return model
