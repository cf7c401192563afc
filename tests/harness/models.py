"""Networks fedprune has no code for, written the way a user writes them, registered by name.

`mobilenet_style`: a small MobileNetV2 (Sandler et al., 2018): inverted residual blocks (1x1
expansion, 3x3 depthwise, 1x1 linear projection), BatchNorm after every convolution, in-place
ReLU6, and a residual add where the shapes allow. Everything the built-in layer lists never had
(BatchNorm for Opacus to replace, depthwise convolutions whose channels follow the expansion,
adds that couple channels across blocks) is in it, so the model tests (tests/test_models.py,
tests/test_slicing.py) and the width-pruning benchmark (benchmarks/width_pruning.py) use it as
the stand-in for "any model".

`signal_cnn`: a 1-D convolutional network on (channels, length) signals, with a depthwise
convolution: what a cost model written for images would get wrong.

Importing this module registers both names (`register_model`), as a user's package would.
"""

from __future__ import annotations

from torch import nn

from edge_sdk.models import register_model

MOBILENET = "mobilenet_style"
SIGNAL_CNN = "signal_cnn"


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
            activation: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups,
                                         bias=False),
                               nn.BatchNorm2d(cout)]
    if activation:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden),   # depthwise
                   conv_bn(hidden, cout, 1, activation=False)]           # linear bottleneck
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetStyle(nn.Module):
    # (expansion, output channels, blocks, first stride): MobileNetV2's table cut for 28x28 inputs
    SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2))

    def __init__(self, in_channels: int, num_classes: int, last_channels: int = 64) -> None:
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


@register_model(MOBILENET)
def mobilenet_style(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return MobileNetStyle(input_shape[0], num_classes)


class SignalCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(in_channels, 12, 5, padding=2), nn.ReLU(),
            nn.Conv1d(12, 12, 3, padding=1, groups=12), nn.ReLU(),   # depthwise
            nn.Conv1d(12, 24, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(24, num_classes)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=2))


@register_model(SIGNAL_CNN)
def signal_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return SignalCNN(input_shape[0], num_classes)
