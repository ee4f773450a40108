"""`distdl evaluate`'s pieces that need no Ray: label matching, channels, the report."""

from __future__ import annotations

import numpy as np
import pytest

from distdl import evaluate
from distdl.errors import UserError


def test_a_test_set_may_hold_some_of_the_model_classes_in_any_order():
    labels = evaluate._model_labels(["cat", "ant"], ["ant", "bee", "cat"], "imagefolder:x")
    assert labels.tolist() == [2, 0]
    with pytest.raises(UserError, match="classes the model does not know: dog"):
        evaluate._model_labels(["ant", "dog"], ["ant", "bee", "cat"], "imagefolder:x")


def test_channels_are_matched_to_the_model():
    gray = np.arange(12, dtype=np.uint8).reshape(1, 3, 4, 1)
    rgb = evaluate.match_channels(gray, 3)
    assert rgb.shape == (1, 3, 4, 3) and all(np.array_equal(rgb[..., c:c + 1], gray)
                                            for c in range(3))
    assert np.array_equal(evaluate.match_channels(rgb, 1), gray)  # gray RGB keeps its values
    red = np.zeros((1, 1, 1, 3), np.uint8)
    red[..., 0] = 200
    assert evaluate.match_channels(red, 1).item() == round(0.299 * 200)


def test_the_report_prints_whole_class_names():
    matrix = np.array([[3, 1], [0, 0]])
    report = evaluate.summarize(matrix, ["category_01", "category_02"])
    report.update(data="digits", split="validation")
    text = evaluate.format_report(report)
    assert "category_01    0.7500       4" in text
    assert "category_02         -       0" in text
