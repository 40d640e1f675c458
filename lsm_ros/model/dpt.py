"""DPT head of DUSt3R (dense prediction from four token layers) and its output post-processing.

Shape letters: B batch, N = (H/p)(W/p) tokens of an H x W image with patch size p, C channels.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DepthMode = tuple[str, float, float]
ConfMode = tuple[str, float, float]
DEPTH_MODES = ('linear', 'square', 'exp')
CONF_MODES = ('exp', 'sigmoid')


def _upsample2x(x: Tensor) -> Tensor:
    """Bilinear x2 with align_corners=True, (B, C, h, w) -> (B, C, 2h, 2w)."""
    return F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=True)


class ResidualConvUnit(nn.Module):
    """x + conv2(relu(conv1(relu(x)))) with 3x3 convolutions (bias, no normalisation)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, h, w) -> (B, C, h, w)."""
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FusionBlock(nn.Module):
    """DPT feature fusion: (x + residual1(skip)) -> residual2 -> bilinear x2 -> 1x1 out_conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.residual1 = ResidualConvUnit(channels)
        self.residual2 = ResidualConvUnit(channels)
        self.out_conv = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        """x (B, C, h, w), skip (B, C, h, w) or None -> (B, C, 2h, 2w)."""
        if skip is not None:
            x = x + self.residual1(skip)
        return self.out_conv(_upsample2x(self.residual2(x)))


class Reassemble(nn.Module):
    """Token grid -> feature map of one DPT level: 1x1 projection, then a resampling convolution.

    ``scale`` 4 and 2: transposed convolution (kernel = stride = scale); 1: none; 0.5: 3x3 stride-2 convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, scale: float) -> None:
        super().__init__()
        self.project = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        if scale in (2, 4):
            self.resample: nn.Module = nn.ConvTranspose2d(out_channels, out_channels, kernel_size=int(scale),
                                                          stride=int(scale))
        elif scale == 1:
            self.resample = nn.Identity()
        elif scale == 0.5:
            self.resample = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=2, padding=1)
        else:
            raise ValueError(f'unsupported reassemble scale {scale}')

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C_in, h, w) -> (B, C_out, h*scale, w*scale) (ceil for scale 0.5)."""
        return self.resample(self.project(x))


class OutputConvs(nn.Module):
    """conv3x3 F -> F/2, bilinear x2, conv3x3 F/2 -> last, ReLU, conv1x1 last -> out."""

    def __init__(self, feature_dim: int, last_dim: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(feature_dim, feature_dim // 2, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(feature_dim // 2, last_dim, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(last_dim, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, F, h, w) -> (B, out, 2h, 2w)."""
        return self.conv3(F.relu(self.conv2(_upsample2x(self.conv1(x)))))


class DPTHead(nn.Module):
    """DPT regression head on four token layers (shallow to deep), output at the full image resolution.

    Levels 0..3 are reassembled at 4x, 2x, 1x and 0.5x the patch grid, projected to ``feature_dim`` by 3x3
    convolutions without bias, fused from the deepest level up (each fusion doubles the resolution; the deepest
    one is cropped to level 2's size), and decoded by :class:`OutputConvs` to ``out_channels`` maps.
    """

    SCALES = (4, 2, 1, 0.5)

    def __init__(self, token_dims: Sequence[int], layer_dims: Sequence[int] = (96, 192, 384, 768),
                 feature_dim: int = 256, last_dim: int = 128, out_channels: int = 4, patch_size: int = 16) -> None:
        super().__init__()
        if len(token_dims) != 4 or len(layer_dims) != 4:
            raise ValueError('DPTHead needs four token dims and four layer dims')
        self.patch_size = patch_size
        self.reassemble = nn.ModuleList(
            Reassemble(t, c, s) for t, c, s in zip(token_dims, layer_dims, self.SCALES))
        self.feature_convs = nn.ModuleList(
            nn.Conv2d(c, feature_dim, kernel_size=3, padding=1, bias=False) for c in layer_dims)
        self.fusion = nn.ModuleList(FusionBlock(feature_dim) for _ in range(4))
        self.output = OutputConvs(feature_dim, last_dim, out_channels)

    def forward(self, layers: Sequence[Tensor], image_size: tuple[int, int]) -> Tensor:
        """layers: four tokens (B, N, C_i), row-major on the patch grid of an image of ``image_size`` (H, W)
        -> raw head output (B, out_channels, H, W)."""
        grid_h, grid_w = image_size[0] // self.patch_size, image_size[1] // self.patch_size
        maps = [proj(reassemble(tokens.transpose(1, 2).unflatten(2, (grid_h, grid_w))))
                for tokens, reassemble, proj in zip(layers, self.reassemble, self.feature_convs)]
        path = self.fusion[3](maps[3])[:, :, :maps[2].shape[2], :maps[2].shape[3]]
        for level in (2, 1, 0):
            path = self.fusion[level](path, maps[level])
        return self.output(path)


def _check_unbounded(mode: DepthMode) -> None:
    if not (mode[1] == -math.inf and mode[2] == math.inf):
        raise ValueError(f'depth_mode bounds must be (-inf, inf), got {mode}')


def dense_points(xyz: Tensor, mode: DepthMode) -> Tensor:
    """Raw head channels (..., 3) -> 3-D points (..., 3), same frame.

    'linear': xyz; 'square': xyz/|xyz| * |xyz|^2; 'exp': xyz/|xyz| * expm1(|xyz|), |xyz| clamped >= 1e-8 in the
    division. Only unbounded modes (-inf, inf) exist.
    """
    name = mode[0]
    _check_unbounded(mode)
    if name == 'linear':
        return xyz
    norm = xyz.norm(dim=-1, keepdim=True)
    direction = xyz / norm.clamp(min=1e-8)
    if name == 'square':
        return direction * norm.square()
    if name == 'exp':
        return direction * torch.expm1(norm)
    raise ValueError(f'unknown depth mode {name!r}; expected one of {DEPTH_MODES}')


def dense_confidence(x: Tensor, mode: ConfMode) -> Tensor:
    """Raw confidence channel (...) -> confidence (...).

    'exp': vmin + min(exp(x), vmax - vmin); 'sigmoid': vmin + (vmax - vmin) * sigmoid(x).
    """
    name, vmin, vmax = mode
    if name == 'exp':
        return vmin + x.exp().clamp(max=vmax - vmin)
    if name == 'sigmoid':
        return (vmax - vmin) * torch.sigmoid(x) + vmin
    raise ValueError(f'unknown confidence mode {name!r}; expected one of {CONF_MODES}')


def postprocess(raw: Tensor, depth_mode: DepthMode, conf_mode: ConfMode) -> tuple[Tensor, Tensor]:
    """Raw head output (B, 4, H, W) -> points (B, H, W, 3) and confidence (B, H, W)."""
    channels_last = raw.permute(0, 2, 3, 1)
    return dense_points(channels_last[..., :3], depth_mode), dense_confidence(channels_last[..., 3], conf_mode)
