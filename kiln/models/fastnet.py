"""FastNet: a small convolutional network for training CIFAR-style images to high accuracy in seconds on one GPU.

The design follows ideas published for fast CIFAR-10 training, rewritten here from their descriptions:

* David Page's DAWNBench ResNet (Myrtle.ai, "How to train your ResNet", 2018): few, wide layers with max-pooling;
  a global max pool; a bias-free linear head whose logits are scaled down by a fixed factor (large logits early in
  training saturate the softmax and slow learning).
* tysam-code's hlb-cifar10 (2022-2023) and Keller Jordan's airbench (2024, 94% on CIFAR-10 in a few seconds on
  one GPU): a first layer that is not learned but computed from the data: a 2x2 convolution whose filters
  *whiten* the 2x2 input patches (project them onto the eigenvectors of the patch covariance, each divided by the
  square root of its eigenvalue), in both signs so that the GELU after it loses no information; three groups of
  [conv3x3 -> maxpool2 -> BatchNorm -> GELU -> conv3x3 -> BatchNorm -> GELU] of widths about 64/256/256, pooling
  before the BatchNorm so that most of each group runs on a quarter of the pixels; BatchNorm scales frozen at 1
  (only the shifts learn) with a fast running-statistics momentum, since a training run lasts a few hundred steps.
  airbench's identity-initialised convolutions are an option (`identity_init`, train.identity_init), not the
  default: see `_conv` for why.

Layout, for a 32x32 RGB input: whitening 2x2 (12 patch dimensions x 2 signs = 24 channels, 32 -> 31 px), GELU;
group 64 (31 -> 15 px); group 256 (15 -> 7); group 256 (7 -> 3); global max pool; linear 256 -> classes; x 1/9.
Any input size of at least 2x2 works: a pool is skipped once the feature map is smaller than 2 pixels, so 8x8
digits (7 -> 3 -> 1 -> 1) and 28x28 MNIST (27 -> 13 -> 6 -> 3) build with the same definition.

The whitening filters come from `prepare(images)`, called once with a sample of normalized training images before
training (kiln.training.fit does so for any model that has the method). They are a parameter of the whitening
convolution, so they live in the state_dict and a saved model reloads without preparing again. Until `prepare` is
called the filters hold the whitening that fits pixels which are uncorrelated with unit variance (what per-channel
normalization approximates): each output channel is plus or minus one pixel of the 2x2 patch, so nothing is lost
and the model trains, just without the head start that decorrelated inputs give. Either way the filters are frozen
(`requires_grad=False`, from construction on), so a model behaves the same whether it was prepared, reloaded or
resumed from a checkpoint; the whitening bias stays trainable (it moves where the first GELU bends).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kiln.errors import ConfigError

WHITENING_KERNEL = 2  # 2x2 patches: the smallest that captures the strong correlation of neighbouring pixels
PREPARE_CHUNK = 512  # images per step when accumulating patch statistics: bounds prepare()'s memory


def _norm(channels: int, momentum: float) -> nn.BatchNorm2d:
    """BatchNorm whose scale is frozen at 1: with a following GELU and a scale-invariant next layer the scale adds
    nothing to learn, and freezing it removes a parameter group from a very short optimisation.

    `momentum` is torch's: the newest batch's weight in the running statistics. airbench's 0.6 is the running
    value's weight (it passes 1 - 0.6 to torch), so its setting is FastNet's default of 0.4; kiln used 0.6 in
    torch's sense until 2026-11-26 (an inverted reading), which weighted the last batch more than airbench does."""
    norm = nn.BatchNorm2d(channels, momentum=momentum)
    norm.weight.requires_grad_(False)
    return norm


def _conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """3x3 "same" convolution without bias (the BatchNorm after it has the shift), PyTorch's default init.

    Not the identity ("dirac") init airbench gives its first filters: on images with a constant background (8x8
    digits, MNIST) an identity chain carries a channel such as GELU(-pixel) whose max-pooled value is the
    background's in every image; BatchNorm then divides a zero variance by sqrt(eps), and a few SGD steps grew the
    weights by 1e7-1e9. Float accuracy hid it (BatchNorm is scale invariant), int8 calibration did not: 10%."""
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)


class ConvGroup(nn.Sequential):
    """conv3x3 -> maxpool2 (or nothing, on a map too small to halve) -> BN -> GELU -> conv3x3 -> BN -> GELU."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool, norm_momentum: float):
        super().__init__(
            _conv(in_channels, out_channels),
            nn.MaxPool2d(2) if pool else nn.Identity(),
            _norm(out_channels, norm_momentum),
            nn.GELU(),
            _conv(out_channels, out_channels),
            _norm(out_channels, norm_momentum),
            nn.GELU(),
        )


class ResidualConvGroup(nn.Module):
    """A ConvGroup with a third conv: conv -> pool -> BN -> GELU = x; then x + (conv -> BN -> GELU -> conv -> BN
    -> GELU)(x), or with `activate_after_add` GELU(x + (conv -> BN -> GELU -> conv -> BN)(x)). The skip lets the
    deeper group train as fast as the shallow one in a short schedule."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool, norm_momentum: float,
                 activate_after_add: bool = False):  # fmt: skip
        super().__init__()
        self.entry = nn.Sequential(
            _conv(in_channels, out_channels),
            nn.MaxPool2d(2) if pool else nn.Identity(),
            _norm(out_channels, norm_momentum),
            nn.GELU(),
        )
        body = [_conv(out_channels, out_channels), _norm(out_channels, norm_momentum), nn.GELU(),
                _conv(out_channels, out_channels), _norm(out_channels, norm_momentum)]  # fmt: skip
        # GELU has no parameters, so either layout keeps the same state_dict keys.
        self.body = nn.Sequential(*body) if activate_after_add else nn.Sequential(*body, nn.GELU())
        self.exit = nn.GELU() if activate_after_add else nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.entry(images)
        return self.exit(features + self.body(features))


class FastNet(nn.Module):
    """Whitening 2x2 conv, three ConvGroups, global max pool, scaled bias-free linear head. See the module doc.

    `depth` 3 uses ResidualConvGroups (three convs per group) instead: see FastNetWide and FastNetLean."""

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        num_classes: int,
        widths: Sequence[int] = (64, 256, 256),
        head_scale: float = 1 / 9,
        norm_momentum: float = 0.4,
        whitening_eps: float = 5e-4,
        depth: int = 2,
        activate_after_add: bool = False,
    ):
        super().__init__()
        if min(height, width) < WHITENING_KERNEL:
            raise ConfigError(
                f"fastnet needs images of at least {WHITENING_KERNEL}x{WHITENING_KERNEL} pixels, got {height}x{width}"
            )
        if depth not in (2, 3):
            raise ConfigError(f"fastnet depth must be 2 or 3 convolutions per group, got {depth}")
        if activate_after_add and depth != 3:
            raise ConfigError("activate_after_add places the GELU after a residual add, which only depth 3 has")
        self.in_channels = in_channels
        self.whitening_eps = whitening_eps
        self.head_scale = head_scale
        patch_dims = in_channels * WHITENING_KERNEL**2
        self.whiten = nn.Conv2d(in_channels, 2 * patch_dims, WHITENING_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self._set_whitening(torch.eye(patch_dims, dtype=torch.float64), torch.zeros(patch_dims, dtype=torch.float64))

        # Track the map size so that a group on a map smaller than 2 px skips its pool (as kiln's ResNet-9 does).
        rows, cols = height - WHITENING_KERNEL + 1, width - WHITENING_KERNEL + 1
        groups, channels = [], 2 * patch_dims
        for group_width in widths:
            pool = min(rows, cols) >= 2
            if pool:
                rows, cols = rows // 2, cols // 2
            if depth == 3:
                groups.append(ResidualConvGroup(channels, group_width, pool, norm_momentum, activate_after_add))
            else:
                groups.append(ConvGroup(channels, group_width, pool, norm_momentum))
            channels = group_width
        self.features = nn.Sequential(
            nn.GELU(),
            *groups,
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),  # flatten (a reshape), not .view: works on channels_last tensors too
        )
        self.head = nn.Linear(channels, num_classes, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.whiten(images))) * self.head_scale

    @torch.no_grad()
    def prepare(self, images: torch.Tensor) -> None:
        """Set the whitening filters from `images` (normalized float [N, C, H, W], training data) and freeze them.

        Computes the mean and covariance of every 2x2 patch of every image in float64 on the CPU (deterministic:
        fixed chunk order, no GPU kernels), then its eigendecomposition. Each eigenvector v with eigenvalue l
        becomes two filters, +v / sqrt(l + eps) and -v / sqrt(l + eps), with biases that centre them, so the
        features have zero mean and covariance diag(l / (l + eps)) on these images: the identity wherever the data
        varies (eps keeps directions of almost no variance, such as constant borders, from being amplified).
        Filters are ordered by decreasing eigenvalue; each eigenvector's sign is fixed by its largest component.
        """
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            expected = f"[N, {self.in_channels}, H, W]"
            raise ValueError(f"prepare() wants normalized images {expected}, got {tuple(images.shape)}")
        if images.shape[0] == 0 or min(images.shape[2:]) < WHITENING_KERNEL:
            raise ValueError(f"prepare() needs at least one image of 2x2 pixels or more, got {tuple(images.shape)}")
        patch_dims = self.in_channels * WHITENING_KERNEL**2
        total = torch.zeros(patch_dims, dtype=torch.float64)
        products = torch.zeros(patch_dims, patch_dims, dtype=torch.float64)
        count = 0
        for start in range(0, images.shape[0], PREPARE_CHUNK):
            chunk = images[start : start + PREPARE_CHUNK].detach().to("cpu", torch.float64)
            patches = _patches(chunk)  # [n, patch_dims, positions]
            total += patches.sum(dim=(0, 2))
            products += torch.bmm(patches, patches.transpose(1, 2)).sum(dim=0)
            count += patches.shape[0] * patches.shape[2]
        mean = total / count
        covariance = products / count - torch.outer(mean, mean)
        covariance = (covariance + covariance.T) / 2  # exactly symmetric for eigh, despite rounding
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
        # eigh may return v or -v; pinning the sign keeps the filter order reproducible across LAPACK builds.
        largest = eigenvectors.abs().argmax(dim=0)
        eigenvectors = eigenvectors * torch.sign(eigenvectors[largest, torch.arange(patch_dims)])
        filters = eigenvectors.T / torch.sqrt(eigenvalues + self.whitening_eps).unsqueeze(1)
        self._set_whitening(filters, mean)

    def whitening_bias(self) -> nn.Parameter:
        """The whitening layer's bias: it moves where the first GELU bends, and train.whiten_bias_epochs gives it a
        schedule of its own."""
        return self.whiten.bias

    @torch.no_grad()
    def identity_init(self) -> None:
        """Re-initialise each 3x3 convolution so that its first output channels pass its input channels through
        unchanged (dirac init, as airbench does; the other filters keep their random init). A deep net then starts
        close to its shallow part, which speeds up a short run on natural images. Not the default: see `_conv`."""
        for module in self.features.modules():
            if isinstance(module, nn.Conv2d):
                weight = module.weight
                nn.init.dirac_(weight[: weight.shape[1]])

    def _set_whitening(self, filters: torch.Tensor, mean: torch.Tensor) -> None:
        """Load the rows of `filters` [patch_dims, patch_dims] in both signs, with biases that centre patches at
        `mean`, into the whitening conv (on its device and dtype)."""
        both_signs = torch.cat([filters, -filters])
        weight = self.whiten.weight
        bias = self.whiten.bias
        with torch.no_grad():
            weight.copy_(both_signs.reshape(weight.shape).to(weight))
            bias.copy_((-both_signs @ mean).to(bias))
        weight.requires_grad_(False)


def _patches(images: torch.Tensor) -> torch.Tensor:
    """Every 2x2 patch of `images` [N, C, H, W] as [N, C*4, (H-1)*(W-1)], each patch listed as (channel, row,
    column): the order of a flattened conv filter. Four shifted slices stacked; much faster on the CPU than
    nn.functional.unfold, which computes the same thing."""
    rows, cols = images.shape[2] - WHITENING_KERNEL + 1, images.shape[3] - WHITENING_KERNEL + 1
    shifted = [
        images[:, :, row : row + rows, col : col + cols]
        for row in range(WHITENING_KERNEL)
        for col in range(WHITENING_KERNEL)
    ]
    return torch.stack(shifted, dim=2).reshape(images.shape[0], images.shape[1] * WHITENING_KERNEL**2, -1)


class FastNetWide(FastNet):
    """FastNet for longer runs: groups of 128/512/512 channels with three convolutions each (a residual pair after
    the pooling conv), about 6x FastNet's arithmetic. The shape of airbench96's network, which reaches 93-94 % on
    CIFAR-10 in tens of seconds on one GPU; written from that description."""

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int, **options):
        options = {"widths": (128, 512, 512), "depth": 3, **options}
        super().__init__(in_channels, height, width, num_classes, **options)


class FastNetLean(FastNet):
    """The later, leaner airbench96 network (its repository's legacy/airbench96.py, 96.0 % on CIFAR-10 in 25 % less
    time than airbench 0.1.8's train96 on FastNetWide's shape, and airbench96_faster.py's main network): groups of
    128/384/512 channels with three convolutions each, GELU after the residual add, and torch's default BatchNorm
    momentum (0.1: the run is thousands of steps, not hundreds). About 3/4 of FastNetWide's arithmetic. Written
    from those descriptions. Not copied: their BatchNorm eps of 1e-12 (kiln keeps torch's 1e-5, which changes
    CIFAR-10 logits by about 1e-5, and keeps a channel that never varies, as on flat digit backgrounds, from being
    amplified a millionfold)."""

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int, **options):
        options = {"widths": (128, 384, 512), "depth": 3, "norm_momentum": 0.1, "activate_after_add": True, **options}
        super().__init__(in_channels, height, width, num_classes, **options)
