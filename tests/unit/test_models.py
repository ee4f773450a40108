"""Model registry and architectures: shapes, input adaptation, errors, checkpoints, trainability."""

from __future__ import annotations

import io

import pytest
import torch
import torchvision
from torch import nn

from distdl.config import ModelConfig
from distdl.errors import UserError
from distdl.models import (
    ResNet18,
    SmallCNN,
    build_checked,
    build_model,
    check_name,
    model_names,
)


def _build(name: str, *, in_channels: int = 3, image_size: int = 32, num_classes: int = 10,
           **fields) -> nn.Module:
    return build_model(ModelConfig(name=name, **fields), num_classes=num_classes,
                       in_channels=in_channels, image_size=image_size)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("image_size", [8, 32])
@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_registry_models_give_logits(name: str, image_size: int, in_channels: int) -> None:
    model = _build(name, in_channels=in_channels, image_size=image_size, num_classes=7)
    out = model(torch.randn(2, in_channels, image_size, image_size))  # training mode: BN on 2 examples
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_large_images(name: str) -> None:
    model = _build(name, in_channels=3, image_size=224, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 5)


def test_deep_small_cnn_runs_on_8x8() -> None:
    # Six pools would shrink 8x8 below 1x1 without ceil_mode.
    model = _build("small_cnn", in_channels=1, image_size=8, width=4, depth=6)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v3_small"])
def test_torchvision_models_adapt_to_grayscale(name: str) -> None:
    model = _build(name, in_channels=1, image_size=32, num_classes=4)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)


def test_torchvision_three_channels_keep_original_stem() -> None:
    reference = torchvision.models.get_model("resnet18", weights=None, num_classes=4)
    assert _params(_build("torchvision:resnet18", in_channels=3, num_classes=4)) == _params(reference)


@pytest.mark.parametrize("name", ["foo", "torchvision:not_a_model", "resnet-18"])
def test_unknown_names_raise_user_error(name: str) -> None:
    with pytest.raises(UserError) as info:
        _build(name)
    message = str(info.value)
    assert name.removeprefix("torchvision:") in message
    assert "\n" not in message
    assert "resnet18" in message  # lists valid choices
    with pytest.raises(UserError) as checked:
        check_name(name)  # what the CLI asks before Ray starts: the same answer
    assert str(checked.value) == message


def test_model_names_lists_builtin_and_torchvision() -> None:
    names = model_names()
    assert names[:2] == ["small_cnn", "resnet18"]
    assert {"torchvision:resnet18", "torchvision:mobilenet_v3_small"} <= set(names)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_state_dict_round_trips_with_weights_only(name: str) -> None:
    torch.manual_seed(0)
    source = _build(name, in_channels=1, image_size=8).eval()
    torch.manual_seed(1)
    target = _build(name, in_channels=1, image_size=8).eval()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_small_cnn_batch_norm_switch() -> None:
    plain = SmallCNN(1, 10, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))
    normed = SmallCNN(1, 10, batch_norm=True)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in normed.modules()) == 4
    assert all(m.bias is None for m in normed.modules() if isinstance(m, nn.Conv2d))


def test_small_cnn_is_small_and_follows_config() -> None:
    model = _build("small_cnn", in_channels=1, image_size=8, width=32, depth=2, dropout=0.3)
    assert 10_000 < _params(model) < 100_000  # CPU training speed depends on it
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64]
    assert model.dropout.p == 0.3


def test_resnet18_matches_standard_size() -> None:
    # Same stem, stages and head as the ImageNet ResNet-18, so the parameter counts agree exactly.
    ours = ResNet18(3, 1000, image_size=224, width=64)
    assert _params(ours) == _params(torchvision.models.resnet18(weights=None))


def test_resnet18_stem_depends_on_image_size() -> None:
    small = ResNet18(3, 10, image_size=32).stem
    large = ResNet18(3, 10, image_size=224).stem
    assert small[0].kernel_size == (3, 3) and small[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in small)
    assert large[0].kernel_size == (7, 7) and large[0].stride == (2, 2)
    assert any(isinstance(m, nn.MaxPool2d) for m in large)


def test_resnet18_residual_branches_start_at_zero() -> None:
    model = ResNet18(3, 10, image_size=32, width=8)
    gammas = [block.bn2.weight for stage in model.stages for block in stage]
    assert len(gammas) == 8
    assert all(torch.count_nonzero(g) == 0 for g in gammas)


def test_small_cnn_overfits_a_tiny_batch() -> None:
    torch.manual_seed(0)
    model = SmallCNN(1, 10, width=16, depth=2, dropout=0.0)
    x, y = torch.randn(32, 1, 8, 8), torch.arange(32) % 10
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize(("name", "shape", "batch", "reason"), [
    ("torchvision:alexnet", (1, 8, 8), 2, "Output size is too small"),
    ("torchvision:vit_b_16", (1, 8, 8), 2, "Input shape indivisible by patch size"),
    ("resnet18", (1, 8, 8), 1, "Expected more than 1 value per channel when training"),
])
def test_a_model_that_cannot_train_on_the_images_is_one_line(name, shape, batch, reason):
    with pytest.raises(UserError) as info:
        build_checked(ModelConfig(name=name), num_classes=10, shape=shape, batch=batch)
    message = str(info.value)
    assert message.startswith(f"model {name} cannot train on {batch} image")
    assert reason in message and "\n" not in message


def test_a_model_that_trains_on_the_images_is_returned():
    model = build_checked(ModelConfig(name="resnet18"), num_classes=10, shape=(1, 8, 8), batch=2)
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
