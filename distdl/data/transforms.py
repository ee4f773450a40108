"""Pure image transforms shared by training, batch inference and serving (numpy, PIL, torch; no Ray).

Images travel as uint8 arrays in HWC order (a batch is NHWC) until the model's input, where
`to_float_chw` makes float32 NCHW in [0, 1] and `normalize` applies the training statistics.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

Size = int | tuple[int, int]
"""A square side in pixels, or (height, width)."""


def to_float_chw(images_uint8_nhwc: np.ndarray | torch.Tensor,
                 memory_format: torch.memory_format | None = None) -> torch.Tensor:
    """uint8 images (N, H, W, C) -> float32 tensor (N, C, H, W) with values in [0, 1].

    `memory_format` defaults to contiguous NCHW; `torch.channels_last` keeps the pixels where
    they are, as NHWC is that layout already.
    """
    import torch  # here, not at the top: Ray Data decode tasks import this module, torch costs seconds

    images = images_uint8_nhwc
    if isinstance(images, np.ndarray):
        # Ray hands out read-only views; torch warns on those, and copying uint8 is cheap.
        images = torch.from_numpy(images if images.flags.writeable else images.copy())
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images of shape (N, H, W, C), got {images.dtype} "
                         f"{tuple(images.shape)}")
    layout = torch.contiguous_format if memory_format is None else memory_format
    return images.permute(0, 3, 1, 2).contiguous(memory_format=layout).float().div_(255.0)


def normalize(x: torch.Tensor, mean: Sequence[float] | torch.Tensor,
              std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel of an (N, C, H, W) float tensor; returns a new tensor."""
    mean_t, std_t = (per_channel(v, x.device, x.dtype) for v in (mean, std))
    return (x - mean_t) / std_t


def per_channel(values: Sequence[float] | torch.Tensor, device,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-channel values as a (1, C, 1, 1) tensor on `device`, to broadcast over NCHW.

    Callers that normalize many batches make it once: from a list, each call copies the values
    to the device (a host-to-device copy on GPU); from such a tensor, nothing is copied.
    """
    import torch

    return torch.as_tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


def resize_uint8(image_hwc: np.ndarray, size: Size) -> np.ndarray:
    """Resize a uint8 (H, W, C) image to `size`, keeping its channels (bilinear, antialiased)."""
    height, width = _hw(size)
    if image_hwc.shape[:2] == (height, width):
        return image_hwc
    # Pillow resizes channels independently, so one path serves any channel count.
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image_hwc[..., c]))
                   .resize((width, height), Image.Resampling.BILINEAR))
        for c in range(image_hwc.shape[2])
    ]
    return np.stack(channels, axis=-1)


# Pillow's own decompression-bomb limit (twice its MAX_IMAGE_PIXELS): it refuses larger images.
PILLOW_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS


def decode_image(data: bytes, *, channels: int, size: Size | None, max_pixels: int) -> np.ndarray:
    """Decode PNG/JPEG/... bytes to uint8 (H, W, channels), resized to `size` when given.

    `channels` is 1 (mode L) or 3 (RGB; alpha is dropped). Raises ValueError when the data is
    not a readable image or has more than `max_pixels` pixels (a decompression-bomb guard).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise ValueError(f"image of {img.width}x{img.height} pixels is larger than "
                                 f"{max_pixels} pixels")
            img.load()  # decodes; raises on bad data
            ImageOps.exif_transpose(img, in_place=True)  # a phone photo's pixels lie sideways
            if img.mode in _WIDE_MODES:
                img = _to_8_bit(img)
            mode = "L" if channels == 1 else "RGB"
            if img.mode != mode:  # each step copies the image: skip those with nothing to do
                img = img.convert(mode)
            if size is not None:
                height, width = _hw(size)
                if img.size != (width, height):
                    img = img.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(img)
    except ValueError:
        raise
    except Image.DecompressionBombError:
        # Pillow refuses an image of over PILLOW_MAX_PIXELS as it opens it, before the check
        # above; callers keep max_pixels below that, so the image is over max_pixels too.
        raise ValueError(f"image is larger than {max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise ValueError("not a readable image: not PNG, JPEG or another format Pillow "
                         "reads") from None
    except Exception as exc:  # Pillow's decoders raise many types on corrupt data
        raise ValueError(f"not a readable image: {exc}") from None
    return pixels[..., None] if channels == 1 else pixels


_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
"""Pillow's modes of 16-bit and 32-bit pixels, which its own convert() clips at 255."""


def _to_8_bit(img: Image.Image) -> Image.Image:
    """A one-channel image of wide pixels -> mode L: integers (16-bit PNG and TIFF files open as
    I;16 or I) are read as 0..65535, floats as 0..1, the convention of float pixel arrays."""
    pixels = np.asarray(img, dtype=np.float64)
    scale = 255.0 if img.mode == "F" else 255.0 / 65535.0
    return Image.fromarray((np.clip(pixels * scale, 0.0, 255.0) + 0.5).astype(np.uint8), "L")


def _hw(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
