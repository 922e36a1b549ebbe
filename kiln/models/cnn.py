"""Classic small CNNs. Convolutions keep the spatial size ("same" padding) and a 2x2 max-pool follows only while
the feature map is at least 4 pixels wide, so the same definition fits 8x8 digits and 224x224 photos."""

from torch import nn


def _conv_stack(in_channels: int, widths: list[int], kernel: int, height: int, width: int):
    layers: list[nn.Module] = []
    for out_channels in widths:
        layers += [nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2), nn.ReLU(inplace=True)]
        if min(height, width) >= 4:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        in_channels = out_channels
    return nn.Sequential(*layers), in_channels * height * width


class SimpleCNN(nn.Module):
    """Conv32-Conv64-Conv64-Dense64, the well-known small CNN from the Keras/TensorFlow tutorials."""

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int):
        super().__init__()
        self.features, flat = _conv_stack(in_channels, [32, 64, 64], 3, height, width)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes)
        )

    def forward(self, images):
        return self.classifier(self.features(images))


class LeNet(nn.Module):
    """LeNet-5 shape: Conv6-Conv16 (5x5), then FC120-FC84."""

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int):
        super().__init__()
        self.features, flat = _conv_stack(in_channels, [6, 16], 5, height, width)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, images):
        return self.classifier(self.features(images))
