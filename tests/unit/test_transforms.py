"""Pure transforms: decoding, resizing, float conversion and normalization (no Ray)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from distdl.data.transforms import decode_image, normalize, resize_uint8, to_float_chw


def _encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _random_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_to_float_chw_layout_and_range():
    images = _random_image((2, 5, 7, 3))
    out = to_float_chw(images)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 5, 7) and out.is_contiguous()
    assert out[1, 2, 4, 6].item() == pytest.approx(images[1, 4, 6, 2] / 255.0)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_to_float_chw_channels_last_holds_the_same_values_without_moving_pixels():
    images = torch.from_numpy(_random_image((2, 5, 7, 3)))
    out = to_float_chw(images, torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, to_float_chw(images))
    # NHWC is channels_last already: the float tensor's strides are the uint8 tensor's.
    assert out.stride() == images.permute(0, 3, 1, 2).stride()


def test_to_float_chw_takes_tensors_and_read_only_arrays_without_warning():
    images = _random_image((3, 4, 4, 1))
    images.flags.writeable = False  # as Ray hands batches out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_numpy = to_float_chw(images)
    assert torch.equal(from_numpy, to_float_chw(torch.from_numpy(images.copy())))


def test_to_float_chw_rejects_wrong_input():
    with pytest.raises(ValueError, match="uint8"):
        to_float_chw(np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="N, H, W, C"):
        to_float_chw(np.zeros((4, 4, 3), dtype=np.uint8))


def test_normalize_per_channel():
    x = torch.rand(4, 3, 6, 6)
    mean, std = [0.1, 0.5, 0.9], [0.2, 0.3, 0.4]
    out = normalize(x, mean, std)
    assert torch.allclose(out[:, 2], (x[:, 2] - 0.9) / 0.4)
    stats_mean, stats_std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3), unbiased=False)
    standardized = normalize(x, stats_mean.tolist(), stats_std.tolist())
    assert torch.allclose(standardized.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(standardized.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_resize_keeps_channels_and_constant_images(channels):
    image = np.full((10, 6, channels), 77, dtype=np.uint8)
    out = resize_uint8(image, 16)
    assert out.shape == (16, 16, channels) and out.dtype == np.uint8
    assert (out == 77).all()
    assert resize_uint8(image, (5, 12)).shape == (5, 12, channels)


def test_resize_downsampling_averages():
    stripes = np.zeros((8, 8, 1), dtype=np.uint8)
    stripes[:, ::2] = 200  # antialiased downsampling blends the stripes instead of picking one
    out = resize_uint8(stripes, 2)
    assert np.all(np.abs(out.astype(int) - 100) <= 10)


def test_resize_same_size_is_unchanged():
    image = _random_image((8, 8, 3))
    assert np.array_equal(resize_uint8(image, 8), image)


def test_decode_png_round_trip_and_channels():
    rgb = _random_image((6, 9, 3))
    assert np.array_equal(decode_image(_encode(rgb), channels=3, size=None, max_pixels=10**6), rgb)
    gray = decode_image(_encode(rgb), channels=1, size=None, max_pixels=10**6)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))[..., None]
    assert gray.shape == (6, 9, 1) and np.array_equal(gray, expected)


def test_decode_converts_modes_and_resizes():
    gray_png = _encode(_random_image((10, 10)))
    assert decode_image(gray_png, channels=3, size=None, max_pixels=10**6).shape == (10, 10, 3)
    rgba_png = _encode(_random_image((10, 10, 4)))
    assert decode_image(rgba_png, channels=3, size=4, max_pixels=10**6).shape == (4, 4, 3)
    jpeg = _encode(_random_image((12, 20, 3)), "JPEG")
    assert decode_image(jpeg, channels=1, size=(6, 10), max_pixels=10**6).shape == (6, 10, 1)


@pytest.mark.parametrize("data", [
    _encode(_random_image((32, 32, 3)))[:200],  # truncated PNG
    b"definitely not an image",
    b"",
])
def test_decode_rejects_corrupt_data(data):
    with pytest.raises(ValueError, match="not a readable image"):
        decode_image(data, channels=3, size=None, max_pixels=10**6)


def test_decode_rejects_images_over_max_pixels():
    with pytest.raises(ValueError, match="larger than 99 pixels"):
        decode_image(_encode(_random_image((10, 10, 3))), channels=3, size=None, max_pixels=99)


def test_decode_rejects_unsupported_channel_count():
    with pytest.raises(ValueError, match="channels"):
        decode_image(_encode(_random_image((4, 4, 3))), channels=2, size=None, max_pixels=10**6)
