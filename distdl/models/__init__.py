"""Model registry: a ModelConfig and the data's shape in, a plain randomly initialized nn.Module out."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distdl.config import ModelConfig
from distdl.errors import UserError
from distdl.model_names import TORCHVISION, check_name, model_names
from distdl.models.cnn import SmallCNN
from distdl.models.resnet import ResNet18

__all__ = ["TORCHVISION", "ResNet18", "SmallCNN", "build_checked", "build_model", "check_name",
           "model_names"]

# Builder arguments some torchvision models need to train as plain classifiers on our inputs:
# auxiliary heads would make forward return a tuple in training mode, and skipping their slow
# scipy-based init also silences a FutureWarning.
_TV_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}


def build_model(cfg: ModelConfig, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Build the model `cfg.name` names, randomly initialized, for the given classes and input shape."""
    check_name(cfg.name)
    if cfg.name == "small_cnn":
        return SmallCNN(in_channels, num_classes, width=cfg.width, depth=cfg.depth,
                        dropout=cfg.dropout, batch_norm=cfg.batch_norm)
    if cfg.name == "resnet18":
        return ResNet18(in_channels, num_classes, image_size=image_size, width=cfg.width,
                        dropout=cfg.dropout)
    return _torchvision_model(cfg.name.removeprefix(TORCHVISION), num_classes, in_channels, image_size)


def build_checked(cfg: ModelConfig, *, num_classes: int, shape: tuple[int, int, int], batch: int,
                  fix: str = "set another data.image_size or train.batch_size, or choose another "
                             "model") -> nn.Module:
    """`build_model`, then one training-mode forward pass of `batch` blank images of `shape`
    (C, H, W). A model that cannot train on them (torchvision's alexnet on 8x8 digits, a ViT
    whose patch does not divide the side, batch norm on one image) fails here, in one line,
    rather than in every worker and every restart. `fix` ends the error line."""
    try:
        model = build_model(cfg, num_classes=num_classes, in_channels=shape[0],
                            image_size=shape[1])
        with torch.no_grad():
            model.train()(torch.zeros(batch, *shape))
    except (RuntimeError, ValueError, AssertionError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"model {cfg.name} cannot train on {batch} image{'s' * (batch > 1)} of "
                        f"{'x'.join(map(str, shape))} (C x H x W) at a time: {reason}; "
                        f"{fix}") from None
    return model


def _torchvision_model(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A torchvision classifier with random weights, its first conv adapted to `in_channels`."""
    import torchvision

    kwargs = dict(_TV_KWARGS.get(name, {}))
    if name.startswith("vit_"):
        kwargs["image_size"] = image_size  # ViTs size their position embeddings to the input
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first Conv2d for a fresh one with the same settings but `in_channels` inputs."""
    path, old = next((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d))
    parent_path, _, attr = path.rpartition(".")
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, stride=old.stride,
                    padding=old.padding, dilation=old.dilation, groups=old.groups,
                    bias=old.bias is not None, padding_mode=old.padding_mode)
    setattr(model.get_submodule(parent_path), attr, new)
