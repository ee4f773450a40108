"""Decoding image files: wide pixel modes, EXIF orientation (Pillow, numpy; no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from distdl.data.transforms import decode_image


def _encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _decode(data: bytes, channels: int = 1) -> np.ndarray:
    return decode_image(data, channels=channels, size=None, max_pixels=10_000)


@pytest.mark.parametrize("channels", [1, 3])
def test_sixteen_bit_pixels_keep_their_brightness(channels):
    """Pillow's own convert() clips 16-bit values at 255: dark and bright would both be white."""
    for value in (2000, 60000):
        image = Image.fromarray(np.full((4, 5), value, np.uint16))
        assert Image.open(io.BytesIO(_encoded(image))).mode == "I;16"
        pixels = _decode(_encoded(image), channels)
        assert pixels.shape == (4, 5, channels)
        assert np.all(pixels == round(value * 255 / 65535))


def test_float_and_32_bit_pixels():
    floats = Image.fromarray(np.full((3, 3), 0.5, np.float32))
    assert np.all(_decode(_encoded(floats, "TIFF")) == 128)
    ints = Image.fromarray(np.full((3, 3), 30000, np.int32))
    assert ints.mode == "I"
    assert np.all(_decode(_encoded(ints, "TIFF")) == round(30000 * 255 / 65535))


def test_exif_orientation_turns_the_pixels_upright():
    """A phone stores a portrait photo as landscape pixels with Orientation 6 (turn 90°)."""
    stored = np.zeros((10, 20, 3), np.uint8)
    stored[:, :4] = 255  # a bright band at the stored left edge: the top once turned
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6
    data = _encoded(Image.fromarray(stored), "JPEG", exif=exif.tobytes(), quality=95)
    pixels = _decode(data, channels=3)
    assert pixels.shape == (20, 10, 3)
    assert pixels[:3].mean() > 200 and pixels[-3:].mean() < 50
