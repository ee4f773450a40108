"""The Predictor on CPU: batch norm folded into convolutions, and training's preprocessing."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from distdl.config import DataConfig, ModelConfig
from distdl.data.transforms import normalize, to_float_chw
from distdl.inference.predictor import Predictor, fold_batch_norm
from distdl.models import build_model
from distdl.train import checkpoint

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def _trained_like(name: str, seed: int = 0) -> nn.Module:
    """A model whose batch norms hold statistics and affine terms far from their initial ones,
    as after training, so that a wrong fold shows."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name=name, dropout=0.0), num_classes=10, in_channels=3,
                        image_size=16)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    return model.eval()


def _save(directory, name: str, model: nn.Module) -> None:
    """A checkpoint of `model` for 16x16 RGB images of 10 classes."""
    meta = checkpoint.make_meta(model=ModelConfig(name=name, dropout=0.0),
                                classes=[str(c) for c in range(10)], input_shape=(3, 16, 16),
                                normalization={"mean": MEAN, "std": STD}, data=DataConfig())
    checkpoint.save(directory, model, meta)


def _batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_folding_removes_every_batch_norm_and_keeps_the_function(name):
    model = _trained_like(name)
    x = torch.randn(4, 3, 16, 16)
    before = _batch_norms(model)
    folded = fold_batch_norm(model)
    assert before > 0 and _batch_norms(folded) == 0
    assert _batch_norms(model) == before  # the caller's model is left as it was
    with torch.inference_mode():
        expected, got = model(x), folded(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


class _DataDependent(nn.Module):
    """A forward that branches on a tensor's value, which torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x)).mean(dim=(2, 3))
        return y if y.sum() > 0 else -y


def test_a_model_that_cannot_be_traced_runs_unfolded(caplog):
    model = _DataDependent().eval()
    with caplog.at_level(logging.WARNING, logger="distdl.inference.predictor"):
        assert fold_batch_norm(model) is model
    assert "without folding batch norm" in caplog.text


def test_predict_applies_training_preprocessing(tmp_path):
    model = _trained_like("resnet18")
    _save(tmp_path, "resnet18", model)
    images = np.random.default_rng(1).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    probs = Predictor.from_checkpoint(tmp_path, torch.device("cpu")).predict(images)
    with torch.inference_mode():
        logits = model(normalize(to_float_chw(images), MEAN, STD))
    assert probs.shape == (5, 10) and probs.dtype == np.float32
    assert np.allclose(probs, torch.softmax(logits, dim=1).numpy(), atol=1e-5)


def test_many_images_are_predicted_in_passes_of_bounded_size(tmp_path):
    _save(tmp_path, "small_cnn", _trained_like("small_cnn"))
    predictor = Predictor.from_checkpoint(tmp_path, torch.device("cpu"))
    images = np.random.default_rng(2).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    whole = predictor.predict(images)
    passes = []
    predict = predictor.predict
    predictor.predict = lambda part: passes.append(len(part)) or predict(part)
    assert np.allclose(predictor.predict_in_passes(images, 3), whole, atol=1e-5)
    assert passes == [3, 3, 1]
