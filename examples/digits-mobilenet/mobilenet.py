"""A MobileNetV2-style network (Sandler et al., 2018), written as any PyTorch user would.

Nothing in it is fedprune's: inverted residual blocks (1x1 expansion, 3x3 depthwise, 1x1
linear projection), BatchNorm after every convolution, ReLU6, and a residual add where the
shapes allow. fedprune builds it through `build`, swaps BatchNorm for GroupNorm (per-sample
gradient clipping cannot go through batch statistics), and prunes its width per device from the
dependency graph: a depthwise convolution keeps the channels its expansion keeps, and the two
sides of each residual add keep the same channels.
"""

from __future__ import annotations

from torch import nn


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
            activation: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if activation:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden),  # depthwise
                   conv_bn(hidden, cout, 1, activation=False)]          # linear bottleneck
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion, output channels, blocks, first stride): MobileNetV2's table (expansion 6, seven
    # stages, 224x224 input) cut to three stages and expansion 3 for 16x16 digits
    SETTINGS = ((1, 16, 1, 1), (3, 24, 2, 2), (3, 32, 2, 2))

    def __init__(self, in_channels: int, num_classes: int, last_channels: int = 96) -> None:
        super().__init__()
        cin = 16
        blocks: list[nn.Module] = [conv_bn(in_channels, cin, 3)]
        for expand, cout, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        blocks.append(conv_bn(cin, last_channels, 1))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """fedprune's model contract: (channels, height, width) and the class count -> an nn.Module."""
    return MobileNetV2(input_shape[0], num_classes)
