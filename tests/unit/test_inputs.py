"""What HTTP clients send -> uint8 images, and each client mistake -> its status and message."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from distdl.inference import inputs
from distdl.inference.inputs import BadInput, Limits

GREY = (1, 8, 8)
RGB = (3, 16, 16)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _status(call) -> tuple[int, str]:
    with pytest.raises(BadInput) as caught:
        call()
    return caught.value.status, str(caught.value)


def test_png_decodes_to_the_model_input_size_and_channels():
    rgb = np.random.default_rng(0).integers(0, 256, (32, 24, 3), dtype=np.uint8)
    grey = inputs.decode(_png(rgb), input_shape=GREY, limits=Limits())
    assert grey.shape == (8, 8, 1) and grey.dtype == np.uint8
    same = np.full((16, 16, 3), 7, np.uint8)
    assert np.array_equal(inputs.decode(_png(same), input_shape=RGB, limits=Limits()), same)


@pytest.mark.parametrize("data, status, words", [
    (b"", 400, "empty"),
    (b"GIF89a-not-really", 400, "not a readable image"),
    (_png(np.zeros((8, 8), np.uint8))[:40], 400, "not a readable image"),
    (_png(np.zeros((101, 100), np.uint8)), 413, "larger than"),
])
def test_bad_image_bodies(data, status, words):
    got, message = _status(lambda: inputs.decode(data, input_shape=GREY,
                                                 limits=Limits(max_pixels=10_000)))
    assert got == status and words in message


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` 8-bit grey pixels and holds none of them: all
    that Pillow reads before it refuses an image as a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def test_an_image_past_pillows_own_bomb_limit_is_413_like_any_too_large():
    got, message = _status(lambda: inputs.decode(_png_header(15_000, 15_000), input_shape=GREY,
                                                 limits=Limits()))
    assert (got, message) == (413, "body: image is larger than 16000000 pixels")


def test_json_instances_of_any_size_are_resized():
    small = np.arange(64).reshape(8, 8).tolist()
    large = np.full((16, 16, 1), 200).tolist()
    images = inputs.from_json({"instances": [small, large]}, input_shape=GREY, limits=Limits())
    assert images.shape == (2, 8, 8, 1) and images.dtype == np.uint8
    assert images[0, 0, 1, 0] == 1 and images[1].min() == 200


@pytest.mark.parametrize("payload, status, words", [
    ([1, 2], 400, "must be an object"),
    ({"images": []}, 400, "must be an object"),
    ({"instances": "x"}, 400, "must be a list"),
    ({"instances": []}, 400, "no images"),
    ({"instances": [[[1, 2], [3]]]}, 400, "rectangular"),
    ({"instances": [[["a"]]]}, 400, "rectangular"),
    ({"instances": [[["1", "2"], ["3", "4"]]]}, 400, "array of numbers"),
    ({"instances": [[[True, False], [True, True]]]}, 400, "array of numbers"),
    ({"instances": [[[10 ** 40]]]}, 400, "array of numbers"),
    ({"instances": [[1, 2, 3]]}, 400, "shape"),
    ({"instances": [[[]]]}, 400, "no pixels"),
    ({"instances": [[[float("nan")]]]}, 400, "NaN"),
    ({"instances": [[[float("inf")]]]}, 400, "infinite"),
    ({"instances": [[[-1]]]}, 400, "[0, 255]"),
    ({"instances": [[[0]]] * 5}, 413, "limit is 4"),
])
def test_bad_json_payloads(payload, status, words):
    got, message = _status(lambda: inputs.from_json(payload, input_shape=GREY,
                                                    limits=Limits(max_instances=4)))
    assert got == status and words in message


def test_rgb_model_refuses_greyscale_arrays():
    got, message = _status(lambda: inputs.from_json({"instances": [[[1, 2], [3, 4]]]},
                                                    input_shape=RGB, limits=Limits()))
    assert got == 400 and "(H, W, 3)" in message


def test_body_size_limit_is_413():
    inputs.check_body_size(100, Limits(max_body_bytes=100))
    assert _status(lambda: inputs.check_body_size(101, Limits(max_body_bytes=100)))[0] == 413


def test_the_images_of_one_request_share_the_pixel_limit():
    limits = Limits(max_pixels=1000)
    inputs.check_total_pixels(1000, limits)
    with pytest.raises(BadInput, match="1001 pixels in all") as error:
        inputs.check_total_pixels(1001, limits)
    assert error.value.status == 413


def test_json_arrays_share_the_pixel_limit_too():
    limits = Limits(max_pixels=1000)
    square = np.zeros((30, 30)).tolist()  # 900 pixels: one fits, two do not
    assert inputs.from_json({"instances": [square]}, input_shape=GREY, limits=limits).shape[0] == 1
    got, message = _status(lambda: inputs.from_json({"instances": [square, square]},
                                                    input_shape=GREY, limits=limits))
    assert (got, "1800 pixels in all" in message) == (413, True)
    large = np.zeros((40, 40)).tolist()
    got, message = _status(lambda: inputs.from_json({"instances": [large]}, input_shape=GREY,
                                                    limits=limits))
    assert (got, "40x40 pixels, more than the limit of 1000" in message) == (413, True)


def test_any_image_type_and_octet_streams_are_image_bodies():
    assert all(map(inputs.is_image_body, ["image/png", "image/x-portable-graymap",
                                          "application/octet-stream"]))
    assert not any(map(inputs.is_image_body, ["text/plain", "application/json", ""]))


def test_media_type_ignores_parameters_and_case():
    assert inputs.media_type("Multipart/Form-Data; boundary=x") == "multipart/form-data"
    assert inputs.media_type(None) == ""


def test_top_k_orders_classes_by_probability():
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    first, second = inputs.top_k(probs, ["a", "b", "c"], k=9)
    assert first["class_name"] == "b"
    assert [s["class_name"] for s in first["top_k"]] == ["b", "c", "a"]
    assert second["class_index"] == 0 and second["top_k"][0]["probability"] == pytest.approx(0.5)
