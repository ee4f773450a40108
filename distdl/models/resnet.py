"""ResNet-18 with a stem chosen by image size, written out so its width and stem can vary."""

from __future__ import annotations

from torch import Tensor, nn

SMALL_IMAGE = 64
"""Below this side (pixels) the stem keeps full resolution, as in the CIFAR ResNets."""


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]) with `width` base channels; runs on 8x8 up to 224x224."""

    def __init__(self, in_channels: int, num_classes: int, *, image_size: int, width: int = 64,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = _stem(in_channels, width, image_size)
        stages, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """He init for convs; zero the last BN gamma of each residual branch."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, BasicBlock):
                # Each block then starts as the identity, so the deep net trains like a shallow one
                # at first and tolerates larger learning rates (Goyal et al., 2017).
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits of shape (N, num_classes)."""
        return self.fc(self.dropout(self.pool(self.stages(self.stem(x))).flatten(1)))


def _stem(in_channels: int, width: int, image_size: int) -> nn.Sequential:
    """3x3 stride-1 stem for small images; the ImageNet 7x7/2 conv and 3x3/2 max-pool otherwise."""
    if image_size < SMALL_IMAGE:
        # Downsampling 4x up front would leave a 32x32 image at 8x8 before the first stage.
        return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                             nn.BatchNorm2d(width), nn.ReLU(inplace=True))
    return nn.Sequential(nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                         nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, stride=2, padding=1))
