"""ResNet-9 in the DAWNBench shape (Page, 2018): prep 64, [128 + residual], 256, [512 + residual], max-pool,
a linear head scaled by 1/8. Pools are skipped once the map is smaller than 2 pixels, so small inputs work."""

import torch
from torch import nn


def conv_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, features):
        return features + self.body(features)


class ResNet9(nn.Module):
    def __init__(self, in_channels: int, height: int, width: int, num_classes: int, head_scale: float = 0.125):
        super().__init__()
        size = min(height, width)

        def pool():
            nonlocal size
            if size >= 2:
                size //= 2
                return nn.MaxPool2d(2)
            return nn.Identity()

        self.features = nn.Sequential(
            conv_bn(in_channels, 64),
            conv_bn(64, 128),
            pool(),
            Residual(128),
            conv_bn(128, 256),
            pool(),
            conv_bn(256, 512),
            pool(),
            Residual(512),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(512, num_classes, bias=False)
        self.head_scale = head_scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images)) * self.head_scale
