"""A two-hidden-layer perceptron: the baseline every image model should beat."""

from torch import nn


class MLP(nn.Module):
    def __init__(self, in_channels: int, height: int, width: int, num_classes: int, hidden: int = 256):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * height * width, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden // 2),
            nn.ReLU(inplace=True),
            nn.Linear(hidden // 2, num_classes),
        )

    def forward(self, images):
        return self.layers(images)
