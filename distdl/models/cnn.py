"""A small VGG-style CNN: fast on CPU, strong enough for 8x8 digits, works up to 224x224."""

from __future__ import annotations

from torch import Tensor, nn


class SmallCNN(nn.Module):
    """`depth` blocks of two 3x3 convs and a 2x2 max-pool, then global average pooling and a linear head."""

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 32, depth: int = 2,
                 dropout: float = 0.1, batch_norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(depth):
            out = width * 2**i  # double the channels as each pool halves the side
            layers += [*_conv(channels, out, batch_norm), *_conv(out, out, batch_norm)]
            # ceil_mode keeps a 1x1 map at 1x1, so deep nets still run on 8x8 inputs
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # any input size maps to one vector per image
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits of shape (N, num_classes)."""
        return self.fc(self.dropout(self.pool(self.features(x)).flatten(1)))


def _conv(cin: int, cout: int, batch_norm: bool) -> list[nn.Module]:
    """conv3x3 (+BN) + ReLU; the conv drops its bias when BN follows, since BN's shift replaces it."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)
    return [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)] if batch_norm else [conv, nn.ReLU(inplace=True)]
