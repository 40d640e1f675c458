"""LSM's pixel-aligned Gaussian head: PTv3 point features → anisotropic semantic 3-D Gaussians (pure PyTorch).

One Gaussian per input pixel, rows ordered (view, row, column). Quaternions are returned with the **real part
last** (x, y, z, w), as the official head does. Colours are spherical harmonics of degree 3, stored
coefficient-major as (16, 3 RGB); the DC term carries the input colour as a residual.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .knn import knn_squared_distances

SH_C0 = 0.28209479177387814  # Y_0^0 of the real spherical harmonics
MIN_SQUARED_DISTANCE = 1e-7  # floor of the mean squared neighbour distance before the square root
KNN_NEIGHBOURS = 3


@dataclass(frozen=True)
class GaussianHeadConfig:
    """The official ``gaussian_head_config`` (d_gs_feats, rgb_residual) and fixed LSM choices."""

    point_feature_dim: int = 64      # PTv3 output channels
    feature_dim: int = 64            # d_gs_feats: semantic feature per Gaussian
    sh_degree: int = 3
    rgb_residual: bool = True        # add the input colour to the SH DC term
    min_scale_factor: float = 0.1    # scales are clamped to [min, max] x median neighbour distance
    max_scale_factor: float = 3.0

    @property
    def sh_coefficients(self) -> int:
        return (self.sh_degree + 1) ** 2

    @property
    def split_sizes(self) -> tuple[int, int, int, int, int]:
        """Channel split of the projection: scale, rotation, opacity, SH, feature."""
        return 3, 4, 1, 3 * self.sh_coefficients, self.feature_dim


def sh_degree_multipliers(sh_degree: int) -> Tensor:
    """(K,) multiplier per SH coefficient: 1 for the DC term, ``0.5 * 0.25**degree`` for the others."""
    degrees = torch.cat([torch.full((2 * d + 1,), d) for d in range(sh_degree + 1)])
    return torch.where(degrees == 0, torch.ones(()), 0.5 * 0.25 ** degrees.double()).float()


def knn_mean_squared_distance(points: Tensor, k: int = KNN_NEIGHBOURS) -> Tensor:
    """(N,) mean of the squared distances from each point of (N, 3) ``points`` to its ``k`` nearest *other* points.

    Exact. The quantity of 3DGS's ``distCUDA2``: points at distance 0 count, squared distances are evaluated in
    float32 as dx²+dy²+dz², sorted ascending and averaged. Computed in torch on the points' device by a Morton-range
    search (:mod:`lsm_ros.model.knn`). A point with a non-finite coordinate is infinitely far from every point: it
    is nobody's neighbour and its own value is +inf (as is the value of a point with fewer than ``k`` finite others).
    Raises ``ValueError`` for ``N <= k``.
    """
    if points.shape[0] <= k:
        raise ValueError(f'need more than {k} points for the neighbour distances, got {points.shape[0]}')
    squared = knn_squared_distances(points, k)
    total = squared[:, 0]
    for column in range(1, k):
        total = total + squared[:, column]
    return total / k


def quaternion_xyzw_to_matrix(quaternions: Tensor, eps: float = 1e-8) -> Tensor:
    """(..., 4) quaternions (x, y, z, w), not necessarily unit → (..., 3, 3) rotation matrices."""
    x, y, z, w = quaternions.unbind(-1)
    two_s = 2.0 / ((quaternions * quaternions).sum(-1) + eps)
    rows = (1 - two_s * (y * y + z * z), two_s * (x * y - z * w), two_s * (x * z + y * w),
            two_s * (x * y + z * w), 1 - two_s * (x * x + z * z), two_s * (y * z - x * w),
            two_s * (x * z - y * w), two_s * (y * z + x * w), 1 - two_s * (x * x + y * y))
    return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))


def covariance_matrices(scales: Tensor, rotations_xyzw: Tensor) -> Tensor:
    """(N,3,3) covariances ``R S Sᵀ Rᵀ`` from (N,3) scales and (N,4) quaternions (x, y, z, w)."""
    rotation = quaternion_xyzw_to_matrix(rotations_xyzw)
    scale = torch.diag_embed(scales)
    return rotation @ scale @ scale.transpose(-1, -2) @ rotation.transpose(-1, -2)


class GaussianHead(nn.Module):
    """Linear(64 → 3+4+1+48+64) per point, then the LSM activations.

    State-dict keys match the official ``gaussian_head.*`` entries (``gaussian_proj.weight/bias``).
    """

    def __init__(self, config: GaussianHeadConfig | None = None) -> None:
        super().__init__()
        self.config = config or GaussianHeadConfig()
        self.gaussian_proj = nn.Linear(self.config.point_feature_dim, sum(self.config.split_sizes))
        self.register_buffer('sh_multipliers', sh_degree_multipliers(self.config.sh_degree), persistent=False)

    def forward(self, point_features: Tensor, means: Tensor, colors: Tensor, feature_residual: Tensor,
                knn_squared_distance: Tensor | None = None) -> dict[str, Tensor]:
        """Gaussians of one sample.

        Args:
            point_features: (N, 64) PTv3 output at level 0, rows in pixel order.
            means: (N, 3) Gaussian centres (the merged point maps, view 1's frame).
            colors: (N, 3) input colours in [-1, 1].
            feature_residual: (N, 64) LSeg residual feature of each pixel (``feature_reduction`` output).
            knn_squared_distance: (N,) precomputed :func:`knn_mean_squared_distance` of ``means`` (optional).

        Returns ``means`` (N,3), ``scales`` (N,3), ``rotations`` (N,4) unit (x, y, z, w), ``opacities`` (N,1),
        ``sh`` (N,16,3), ``features`` (N,64), ``covariances`` (N,3,3), ``knn_mean_sq_dist`` (N,).
        """
        cfg = self.config
        raw = self.gaussian_proj(point_features)
        scales, rotations, opacities, sh, features = torch.split(raw, cfg.split_sizes, dim=-1)

        if knn_squared_distance is None:
            knn_squared_distance = knn_mean_squared_distance(means)
        distance = torch.sqrt(torch.clamp_min(knn_squared_distance, MIN_SQUARED_DISTANCE))
        median = torch.median(distance)  # the lower middle value for an even count, as torch defines it
        scales = torch.clamp(torch.exp(scales) * distance[:, None], min=cfg.min_scale_factor * median,
                             max=cfg.max_scale_factor * median)
        rotations = F.normalize(rotations, dim=-1)
        opacities = torch.sigmoid(opacities)

        sh = sh.unflatten(-1, (cfg.sh_coefficients, 3))
        if cfg.rgb_residual:
            rgb01 = colors * 0.5 + 0.5
            sh = torch.cat([sh[:, :1] + ((rgb01 - 0.5) / SH_C0)[:, None], sh[:, 1:]], dim=1)
        sh = sh * self.sh_multipliers[None, :, None]
        return dict(means=means, scales=scales, rotations=rotations, opacities=opacities, sh=sh,
                    features=features + feature_residual, covariances=covariance_matrices(scales, rotations),
                    knn_mean_sq_dist=knn_squared_distance)
