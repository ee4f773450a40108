"""Turning what an HTTP client sends into uint8 images the Predictor takes (no Ray, no web server).

Every mistake a client can make becomes a `BadInput` with the HTTP status to answer and a
message that names the problem, so the service can reply 4xx and keep serving.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from distdl.data.transforms import decode_image, resize_uint8


class BadInput(ValueError):
    """A client mistake: answered with `status` and `{"error": message}`."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What one request may carry. The defaults suit images up to a few megapixels."""

    max_body_bytes: int = 8 * 1024 * 1024
    # Per image, and for one request's images in all: refused before decoding or resizing.
    max_pixels: int = 16_000_000
    max_instances: int = 64
    body_timeout_s: float = 10.0  # for the whole body to arrive: 8 MiB at 7 Mbit/s


def check_body_size(size: int, limits: Limits) -> None:
    if size > limits.max_body_bytes:
        raise BadInput(f"request body of {size} bytes is larger than the limit of "
                       f"{limits.max_body_bytes} bytes", status=413)


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def is_image_body(kind: str) -> bool:
    """Whether a body of media type `kind` is one encoded image. Pillow reads the format from
    the bytes, so any image/* type goes to it (image/x-portable-graymap too, which
    mimetypes gives .pgm files), as does application/octet-stream; one it cannot read gets 400."""
    return kind.startswith("image/") or kind == "application/octet-stream"


def decode(data: bytes, *, input_shape: tuple[int, int, int], limits: Limits,
           what: str = "body") -> np.ndarray:
    """One encoded image (PNG, JPEG, ...) -> uint8 (H, W, C) at the model's input size."""
    if not data:
        raise BadInput(f"the {what} is empty: send an encoded image")
    channels, height, width = input_shape
    try:
        return decode_image(data, channels=channels, size=(height, width),
                            max_pixels=limits.max_pixels)
    except ValueError as exc:
        status = 413 if "larger than" in str(exc) else 400
        raise BadInput(f"{what}: {exc}", status=status) from None


def pixels(data: bytes) -> int:
    """The pixels an encoded image's header declares, 0 where there is no readable header:
    what decoding it will cost, known before decoding."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width * image.height
    except Exception:  # Pillow raises many types on bad data; decode() names the problem
        return 0


def check_total_pixels(total: int, limits: Limits) -> None:
    """The images of one request together may hold max_pixels, as one image may: decoding
    costs CPU and memory by the pixel, and 64 images each just under the limit would take a
    replica gigabytes and seconds."""
    if total > limits.max_pixels:
        raise BadInput(f"the request's images hold {total} pixels in all, more than the limit of "
                       f"{limits.max_pixels}: send them in several requests", status=413)


def count_instances(n: int, limits: Limits) -> None:
    if n == 0:
        raise BadInput("the request holds no images")
    if n > limits.max_instances:
        raise BadInput(f"{n} images in one request; the limit is {limits.max_instances}",
                       status=413)


def from_json(payload: Any, *, input_shape: tuple[int, int, int], limits: Limits) -> np.ndarray:
    """`{"instances": [pixel array, ...]}` -> uint8 (N, H, W, C).

    A pixel array is (H, W) or (H, W, C) numbers in [0, 255]; other sizes are resized.
    """
    if not isinstance(payload, dict) or "instances" not in payload:
        raise BadInput('JSON body must be an object {"instances": [pixel array, ...]}')
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise BadInput('"instances" must be a list of pixel arrays')
    count_instances(len(instances), limits)
    arrays = [_pixels(item, i, input_shape[0], limits) for i, item in enumerate(instances)]
    if len(arrays) > 1:  # resizing costs by the pixel, as decoding does
        check_total_pixels(sum(a.shape[0] * a.shape[1] for a in arrays), limits)
    return np.stack([resize_uint8(a, input_shape[1:]) for a in arrays])


def _pixels(item: Any, index: int, channels: int, limits: Limits) -> np.ndarray:
    """One checked pixel array -> uint8 (H, W, C) at its own size."""
    where = f"instances[{index}]"
    try:
        array = np.asarray(item)
    except ValueError:  # ragged
        array = np.asarray(None)
    # Numbers only: numpy would read "7" and true as pixel values.
    if array.dtype.kind not in "iuf":
        raise BadInput(f"{where} is not a rectangular array of numbers")
    array = array.astype(np.float64)
    if array.ndim == 2 and channels == 1:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] != channels:
        expected = f"(H, W) or (H, W, {channels})" if channels == 1 else f"(H, W, {channels})"
        raise BadInput(f"{where} has shape {array.shape}; expected {expected}")
    if 0 in array.shape:
        raise BadInput(f"{where} holds no pixels")
    if array.shape[0] * array.shape[1] > limits.max_pixels:
        raise BadInput(f"{where} has {array.shape[0]}x{array.shape[1]} pixels, more than the "
                       f"limit of {limits.max_pixels}", status=413)
    if not np.isfinite(array).all():
        raise BadInput(f"{where} holds NaN or infinite values")
    if array.min() < 0 or array.max() > 255:
        raise BadInput(f"{where} has values outside [0, 255]")
    return np.rint(array).astype(np.uint8)


def top_k(probs: np.ndarray, classes: list[str], k: int) -> list[dict[str, Any]]:
    """One prediction per row of class probabilities: the best class and the k most likely."""
    k = max(1, min(k, len(classes)))
    results = []
    for row in probs:
        order = np.argsort(-row)[:k]
        best = int(order[0])
        results.append({
            "class_index": best,
            "class_name": classes[best],
            "top_k": [{"class_index": int(i), "class_name": classes[i],
                       "probability": _finite(float(row[i]))} for i in order],
        })
    return results


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 0.0
