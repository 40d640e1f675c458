"""Gaussian splatting renderer: 3-D Gaussians + one pinhole camera -> RGB, expected depth, alpha, N-D features.

One functional API, :func:`render_gaussians`, with two backends that follow gsplat 1.5.3's ``rasterization``
in its 'classic' mode (packed, 16x16 tiles, no antialiasing compensation):

- ``'gsplat'`` (CUDA tensors): ``gsplat.rasterization`` itself;
- ``'torch'`` (any device, meant for CPU): our own exact compositor in pure PyTorch, vectorised over
  (Gaussian, pixel) pairs; it never imports gsplat.

:func:`render_gaussians_reference` is a brute-force oracle for tests (every pixel against every Gaussian, one
Gaussian at a time in depth order, as gsplat's per-pixel kernel does) with its own projection code.

Conventions
-----------
- Camera: ``world_to_camera`` (4,4) maps world points to the OpenCV / REP 103 optical frame (x right, y down,
  z forward); for LSM the world frame is view 1's camera frame.
- Pixels: ``K`` is an OpenCV matrix ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]``: pixel (u, v) (column u, row v)
  has its centre at image coordinates (u, v). gsplat puts pixel centres at (u + 0.5, v + 0.5), so the gsplat
  backend is given ``cx + 0.5, cy + 0.5`` and the torch backend evaluates Gaussians at integer coordinates; the
  rules that gsplat states in its own coordinates (view-frustum clamp, on-image test, tiles) are applied by the
  torch backend after the same half-pixel shift. Image edges are at -0.5 and W - 0.5 (H - 0.5).
- Quaternions: ``rotations_xyzw`` is (x, y, z, w), real part last (LSM's order), not necessarily unit; gsplat
  takes (w, x, y, z).

The gsplat 1.5.3 rules matched (sources under ``gsplat/cuda``): EWA projection with the perspective Jacobian
evaluated at x/z, y/z clamped to the image plus 30 % of the half field of view on each side
(``include/Utils.cuh: persp_proj``); ``eps2d`` added to the 2-D covariance diagonal and Gaussians with a
non-positive determinant culled (``add_blur``); near/far culling ``near <= z <= far``, opacities below 1/255
culled and the opacity-aware radius ``ceil(min(3.33, sqrt(2 ln(255 opacity))) sqrt(cov_ii))``, off-image
culling (``csrc/ProjectionEWA3DGSPacked.cu``); 16x16 tiles from ``floor/ceil((mean -/+ radius) / 16)``
(``csrc/IntersectTile.cu``), front to back by camera depth, ties in Gaussian order (stable radix sort);
per pixel ``sigma = 0.5 (a dx^2 + c dy^2) + b dx dy``, ``alpha = min(0.999, opacity exp(-sigma))``, skip
``sigma < 0`` or ``alpha < 1/255``, stop before the Gaussian that would bring the transmittance ``T`` to
``<= 1e-4`` (``csrc/RasterizeToPixels3DGSFwd.cu``); colours ``max(SH(mean - camera centre) + 0.5, 0)``
(``csrc/SphericalHarmonicsCUDA.cu``, ``rendering.py``); expected depth ``sum(w z) / max(alpha, 1e-10)``
('ED' mode) and the background weighted by the final ``T`` (``rendering.py``).

The torch backend evaluates a Gaussian on the pixels of its gsplat tiles that lie in its ellipse
``sigma <= ln(255 opacity)`` (grown by 1e-3 px): outside it alpha < 1/255, which gsplat skips, so the result is
gsplat's rule exactly, not an approximation. It returns the Gaussians' dtype (float32 or float64) and runs in
bands of image rows to bound memory. Measured by ``scripts/bench_render.py``.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

_log = logging.getLogger(__name__)

Backend = Literal['auto', 'torch', 'gsplat']

TILE_SIZE = 16                   # gsplat's default tile size (pixels)
ALPHA_THRESHOLD = 1.0 / 255.0    # gsplat's ALPHA_THRESHOLD: smaller alphas (and opacities) are skipped
ALPHA_MAX = 0.999                # alpha clamp
TRANSMITTANCE_MIN = 1e-4         # a pixel stops before the Gaussian that brings T to <= this
RADIUS_SIGMAS = 3.33             # upper bound of the opacity-aware radius, in standard deviations
FRUSTUM_MARGIN = 0.3             # the Jacobian clamp: image plus this fraction of the half field of view
DEPTH_ALPHA_MIN = 1e-10          # expected depth divides by max(alpha, this)

# Torch backend bands of image rows: at most this many candidate pairs (about 100 bytes a pair while a band is
# composited; small bands also keep the working set in cache) and pixels (so that a pixel key fits an int16,
# shifted by _KEY_SHIFT).
_PAIRS_PER_BAND = 1 << 19
_BAND_PIXELS = 1 << 16
_KEY_SHIFT = 1 << 15
# Candidate pixels are taken within the alpha >= 1/255 ellipse grown by this margin (pixels, plus a relative
# part), so that rounding never drops a pixel that the exact alpha test keeps.
_SUPPORT_MARGIN_PX = 1e-3
_SUPPORT_MARGIN_REL = 1e-4

# Real spherical harmonics up to degree 3 (the 3DGS / gsplat constants).
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
         1.445305721320277, -0.5900435899266435)
MAX_SH_DEGREE = 3
_CAMERA_ATOL = 1e-6              # tolerance on the fixed entries of world_to_camera and K (0 or 1)
_RADIUS_MAX = 1 << 30            # radii are stored as int32 (beyond any image, so the tiles are unchanged)


@dataclass(frozen=True)
class RenderOutput:
    """One rendered view; every tensor on the input device, in the Gaussians' dtype.

    ``rgb`` (H,W,3) (None without SH; not clamped above 1, as in gsplat), ``depth`` (H,W) expected camera z
    (0 where alpha is 0; None when not asked for), ``alpha`` (H,W) accumulated opacity, ``features`` (H,W,C)
    (None without features).
    """
    rgb: Tensor | None
    depth: Tensor | None
    alpha: Tensor
    features: Tensor | None


@dataclass(frozen=True)
class Projection:
    """Per-Gaussian screen-space quantities (N rows, culled ones included).

    ``means2d`` (N,2) in the OpenCV pixel convention, ``conics`` (N,3) ``(a, b, c)`` of the inverse blurred 2-D
    covariance ``[[a, b], [b, c]]``, ``depths`` (N,) camera z, ``radii`` (N,2) int32 gsplat radii in pixels, (0, 0)
    for a culled Gaussian.
    """
    means2d: Tensor
    conics: Tensor
    depths: Tensor
    radii: Tensor

    @property
    def visible(self) -> Tensor:
        """(N,) bool: the Gaussian reaches at least one tile of the image."""
        return (self.radii > 0).all(dim=-1)


@dataclass(frozen=True)
class _Scene:
    """Validated inputs: Gaussians (N rows) in one dtype/device, camera as tensors of the same dtype/device."""
    means: Tensor
    rotations_xyzw: Tensor
    scales: Tensor
    opacities: Tensor              # (N,)
    sh: Tensor | None
    features: Tensor | None
    world_to_camera: Tensor
    K: Tensor
    width: int
    height: int
    background: Tensor | None
    near_plane: float
    far_plane: float
    eps2d: float


# --------------------------------------------------------------------------------------------------- public API

def render_gaussians(means: Tensor, rotations_xyzw: Tensor, scales: Tensor, opacities: Tensor, sh: Tensor | None,
                     features: Tensor | None, world_to_camera: Tensor, K: Tensor, width: int, height: int, *,
                     background: Tensor | None = None, near_plane: float = 0.01, far_plane: float = 1e10,
                     eps2d: float = 0.3, render_depth: bool = True, backend: Backend = 'auto') -> RenderOutput:
    """Render N Gaussians into a ``height`` x ``width`` image of one camera.

    Args:
        means: (N,3) centres in the world frame. rotations_xyzw: (N,4) quaternions (x, y, z, w), world frame.
        scales: (N,3) standard deviations along the rotated axes (world units). opacities: (N,) or (N,1).
        sh: (N,K,3) SH coefficients, K = (d+1)^2 with d <= 3 (DC first), or None for no rgb.
        features: (N,C) per-Gaussian features, or None.
        world_to_camera: (4,4) world -> camera (OpenCV optical frame). K: (3,3) OpenCV intrinsics.
        background: (3,) rgb behind the Gaussians (added with weight 1 - alpha); None = black.
        render_depth: also render the expected depth.
        backend: 'gsplat' (CUDA tensors only), 'torch', or 'auto' (gsplat on CUDA, torch elsewhere).

    The Gaussians must share one floating dtype and device (gsplat: float32); the camera may be any array-like.
    The torch backend runs without autograd. ValueError on bad shapes, dtypes or camera.
    """
    scene = _validate(means, rotations_xyzw, scales, opacities, sh, features, world_to_camera, K, width, height,
                      background, near_plane, far_plane, eps2d)
    use_gsplat = _choose_backend(backend, scene.means.device)
    if use_gsplat and scene.means.dtype != torch.float32:
        raise ValueError(f'the gsplat backend renders float32 Gaussians, not {scene.means.dtype}')
    _log.debug('rendering %d Gaussians at %dx%d with the %s backend', len(scene.means), width, height,
               'gsplat' if use_gsplat else 'torch')
    if len(scene.means) == 0:
        n_channels = (3 if sh is not None else 0) + int(render_depth) + (0 if features is None else features.shape[1])
        nothing = scene.means.new_zeros(height, width)
        return _assemble(nothing[..., None].expand(-1, -1, n_channels), nothing, scene, render_depth)
    if use_gsplat:
        return _render_gsplat(scene, render_depth)
    return _render_torch(scene, render_depth)


def render_gaussians_reference(means: Tensor, rotations_xyzw: Tensor, scales: Tensor, opacities: Tensor,
                               sh: Tensor | None, features: Tensor | None, world_to_camera: Tensor, K: Tensor,
                               width: int, height: int, *, background: Tensor | None = None,
                               near_plane: float = 0.01, far_plane: float = 1e10, eps2d: float = 0.3,
                               render_depth: bool = True) -> RenderOutput:
    """Brute-force oracle of :func:`render_gaussians` for small scenes (tests): float64 on the CPU.

    Projects with its own code (matrix Jacobian, ``torch.linalg.inv``), then visits the Gaussians one at a time
    front to back and updates every pixel of their tiles as gsplat's per-pixel loop does. Cost O(N·H·W).
    Returns float64 tensors on the CPU.
    """
    scene = _validate(means, rotations_xyzw, scales, opacities, sh, features, world_to_camera, K, width, height,
                      background, near_plane, far_plane, eps2d)
    f64 = dict(dtype=torch.float64, device='cpu')
    mu = scene.means.to(**f64)
    q = scene.rotations_xyzw.to(**f64)
    opacity = scene.opacities.to(**f64)
    view = scene.world_to_camera.to(**f64)
    intrinsics = scene.K.to(**f64)
    fx, fy, cx, cy = (float(v) for v in (intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]))

    # Rotation R = (w^2 - v.v) I + 2 v v^T + 2 w [v]x of the unit quaternion (v, w).
    q = q / q.norm(dim=-1, keepdim=True)
    v, w = q[:, :3], q[:, 3]
    cross = torch.zeros(len(q), 3, 3, **f64)
    cross[:, 0, 1], cross[:, 0, 2], cross[:, 1, 2] = -v[:, 2], v[:, 1], -v[:, 0]
    cross = cross - cross.transpose(1, 2)
    rotation = ((w * w - (v * v).sum(-1))[:, None, None] * torch.eye(3, **f64) + 2 * v[:, :, None] * v[:, None, :]
                + 2 * w[:, None, None] * cross)
    covariance = rotation @ torch.diag_embed(scene.scales.to(**f64) ** 2) @ rotation.transpose(1, 2)
    p = mu @ view[:3, :3].T + view[:3, 3]
    covariance = view[:3, :3] @ covariance @ view[:3, :3].T
    z = p[:, 2]
    # Jacobian at the clamped direction; limits in gsplat's pixel-edge coordinates (principal point + 0.5).
    half_x, half_y = FRUSTUM_MARGIN * width / (2 * fx), FRUSTUM_MARGIN * height / (2 * fy)
    ux = (p[:, 0] / z).clamp(-(cx + 0.5) / fx - half_x, (width - cx - 0.5) / fx + half_x)
    uy = (p[:, 1] / z).clamp(-(cy + 0.5) / fy - half_y, (height - cy - 0.5) / fy + half_y)
    jacobian = torch.zeros(len(p), 2, 3, **f64)
    jacobian[:, 0, 0], jacobian[:, 0, 2] = fx / z, -fx * ux / z
    jacobian[:, 1, 1], jacobian[:, 1, 2] = fy / z, -fy * uy / z
    cov2d = jacobian @ covariance @ jacobian.transpose(1, 2) + scene.eps2d * torch.eye(2, **f64)
    det = torch.linalg.det(cov2d)
    centre = torch.stack([fx * p[:, 0] / z + cx, fy * p[:, 1] / z + cy], dim=-1)
    extent = torch.sqrt(2 * torch.log(opacity / ALPHA_THRESHOLD).clamp(min=0)).clamp(max=RADIUS_SIGMAS)
    radius = torch.ceil(extent[:, None] * torch.sqrt(torch.diagonal(cov2d, dim1=1, dim2=2).clamp(min=0)))
    edge_centre = centre + 0.5
    keep = ((z >= scene.near_plane) & (z <= scene.far_plane) & (det > 0) & (opacity >= ALPHA_THRESHOLD)
            & (radius > 0).all(-1) & (edge_centre + radius > 0).all(-1)
            & (edge_centre[:, 0] - radius[:, 0] < width) & (edge_centre[:, 1] - radius[:, 1] < height))
    ids = keep.nonzero().squeeze(1)
    ids = ids[torch.sort(z[ids], stable=True).indices]
    precision = torch.linalg.inv(cov2d[ids])

    channels = []
    if scene.sh is not None:
        camera_centre = torch.linalg.solve(view[:3, :3], -view[:3, 3])
        channels.append((evaluate_sh(scene.sh.to(**f64)[ids], mu[ids] - camera_centre) + 0.5).clamp(min=0))
    if render_depth:
        channels.append(z[ids, None])
    if scene.features is not None:
        channels.append(scene.features.to(**f64)[ids])
    values = torch.cat(channels, dim=1) if channels else torch.zeros(len(ids), 0, **f64)

    rows, cols = torch.meshgrid(torch.arange(height, **f64), torch.arange(width, **f64), indexing='ij')
    tile_rows, tile_cols = rows // TILE_SIZE, cols // TILE_SIZE
    transmittance = torch.ones(height, width, **f64)
    done = torch.zeros(height, width, dtype=torch.bool)
    image = torch.zeros(height, width, values.shape[1], **f64)
    for k, g in enumerate(ids.tolist()):
        first = torch.floor((edge_centre[g] - radius[g]) / TILE_SIZE)
        last = torch.ceil((edge_centre[g] + radius[g]) / TILE_SIZE)   # exclusive
        in_tiles = ((tile_cols >= first[0]) & (tile_cols < last[0]) & (tile_rows >= first[1])
                    & (tile_rows < last[1]))
        d = torch.stack([cols - centre[g, 0], rows - centre[g, 1]], dim=-1)
        sigma = 0.5 * torch.einsum('hwi,ij,hwj->hw', d, precision[k], d)
        alpha = (opacity[g] * torch.exp(-sigma)).clamp(max=ALPHA_MAX)
        active = in_tiles & ~done & (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)
        next_t = transmittance * (1 - alpha)
        finished = active & (next_t <= TRANSMITTANCE_MIN)
        done |= finished
        blend = active & ~finished
        image += torch.where(blend, alpha * transmittance, 0.0)[..., None] * values[k]
        transmittance = torch.where(blend, next_t, transmittance)
    return _assemble(image, 1 - transmittance, scene, render_depth)


def project_gaussians(means: Tensor, rotations_xyzw: Tensor, scales: Tensor, opacities: Tensor,
                      world_to_camera: Tensor, K: Tensor, width: int, height: int, *, near_plane: float = 0.01,
                      far_plane: float = 1e10, eps2d: float = 0.3) -> Projection:
    """gsplat's packed EWA projection of N Gaussians (shapes as in :func:`render_gaussians`), in the input dtype.

    A Gaussian is culled (radii (0, 0)) outside ``near_plane <= z <= far_plane``, with a non-positive blurred
    determinant, an opacity below 1/255, a zero radius, or a radius box off the image; NaNs are culled too.
    """
    scene = _validate(means, rotations_xyzw, scales, opacities, None, None, world_to_camera, K, width, height,
                      None, near_plane, far_plane, eps2d)
    return _project(scene)


def evaluate_sh(sh: Tensor, directions: Tensor) -> Tensor:
    """(N,K,3) real SH coefficients, K = (d+1)^2 with d <= 3, at (N,3) directions (normalised here) -> (N,3)."""
    if sh.dim() != 3 or sh.shape[-1] != 3 or sh.shape[1] not in _SH_SIZES:
        raise ValueError(f'sh must be (N, K, 3) with K in {_SH_SIZES}, got {tuple(sh.shape)}')
    if directions.shape != (sh.shape[0], 3):
        raise ValueError(f'directions must be ({sh.shape[0]}, 3), got {tuple(directions.shape)}')
    return torch.einsum('nk,nkc->nc', _sh_basis(sh.shape[1], directions.to(sh.dtype)), sh)


# ------------------------------------------------------------------------------------------------- validation

_SH_SIZES = tuple((d + 1) ** 2 for d in range(MAX_SH_DEGREE + 1))


def _validate(means: Any, rotations_xyzw: Any, scales: Any, opacities: Any, sh: Any, features: Any,
              world_to_camera: Any, K: Any, width: Any, height: Any, background: Any, near_plane: float,
              far_plane: float, eps2d: float) -> _Scene:
    if not isinstance(means, Tensor) or means.dim() != 2 or means.shape[1] != 3:
        raise ValueError(f'means must be an (N, 3) tensor, got {_describe(means)}')
    if means.dtype not in (torch.float32, torch.float64):
        raise ValueError(f'means must be float32 or float64, got {means.dtype}')
    n, dtype, device = means.shape[0], means.dtype, means.device

    def gaussian_tensor(value: Any, name: str, shape: tuple[int, ...]) -> Tensor:
        if not isinstance(value, Tensor) or tuple(value.shape) != shape:
            raise ValueError(f'{name} must be a tensor of shape {shape}, got {_describe(value)}')
        if value.dtype != dtype or value.device != device:
            raise ValueError(f'{name} must be {dtype} on {device} like means, got {value.dtype} on {value.device}')
        return value

    rotations_xyzw = gaussian_tensor(rotations_xyzw, 'rotations_xyzw', (n, 4))
    scales = gaussian_tensor(scales, 'scales', (n, 3))
    if isinstance(opacities, Tensor) and opacities.dim() == 2:
        opacities = gaussian_tensor(opacities, 'opacities', (n, 1))[:, 0]
    opacities = gaussian_tensor(opacities, 'opacities', (n,))
    if sh is not None:
        if not isinstance(sh, Tensor) or sh.dim() != 3 or sh.shape[1] not in _SH_SIZES:
            raise ValueError(f'sh must be (N, K, 3) with K in {_SH_SIZES}, got {_describe(sh)}')
        sh = gaussian_tensor(sh, 'sh', (n, sh.shape[1], 3))
    if features is not None:
        if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[1] < 1:
            raise ValueError(f'features must be (N, C) with C >= 1, got {_describe(features)}')
        features = gaussian_tensor(features, 'features', (n, features.shape[1]))

    def camera_tensor(value: Any, name: str, shape: tuple[int, ...]) -> Tensor:
        try:
            array = np.asarray(value.detach().cpu() if isinstance(value, Tensor) else value, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f'{name} must be a {shape} array of numbers: {error}') from None
        if array.shape != shape or not np.isfinite(array).all():
            raise ValueError(f'{name} must be a finite {shape} array, got shape {array.shape}')
        return torch.as_tensor(array, dtype=dtype, device=device)

    world_to_camera = camera_tensor(world_to_camera, 'world_to_camera', (4, 4))
    view = world_to_camera.double().cpu()
    if not torch.allclose(view[3], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64), rtol=0, atol=_CAMERA_ATOL):
        raise ValueError(f'world_to_camera must have the last row (0, 0, 0, 1), got {view[3].tolist()}')
    if abs(float(torch.linalg.det(view[:3, :3]))) < 1e-12:
        raise ValueError('world_to_camera has a singular rotation part')
    K = camera_tensor(K, 'K', (3, 3))
    k = K.double().cpu()
    fixed = torch.stack([k[0, 1], k[1, 0], k[2, 0], k[2, 1], k[2, 2] - 1])
    if k[0, 0] <= 0 or k[1, 1] <= 0 or fixed.abs().max() > _CAMERA_ATOL:
        raise ValueError(f'K must be [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0, got {k.tolist()}')
    for name, value in (('width', width), ('height', height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f'{name} must be an integer >= 1, got {value!r}')
    if background is not None:
        if sh is None:
            raise ValueError('background applies to rgb, which needs sh')
        background = camera_tensor(background, 'background', (3,))
    if not (math.isfinite(near_plane) and math.isfinite(far_plane) and 0 < near_plane < far_plane):
        raise ValueError(f'need 0 < near_plane < far_plane, got {near_plane}, {far_plane}')
    if not (math.isfinite(eps2d) and eps2d >= 0):
        raise ValueError(f'eps2d must be finite and >= 0, got {eps2d}')
    return _Scene(means, rotations_xyzw, scales, opacities, sh, features, world_to_camera, K, int(width),
                  int(height), background, float(near_plane), float(far_plane), float(eps2d))


def _describe(value: Any) -> str:
    return f'{type(value).__name__} of shape {tuple(value.shape)}' if hasattr(value, 'shape') else repr(value)


def _choose_backend(backend: Any, device: torch.device) -> bool:
    """True for gsplat."""
    if backend == 'auto':
        return device.type == 'cuda'
    if backend == 'torch':
        return False
    if backend == 'gsplat':
        if device.type != 'cuda':
            raise ValueError(f"backend 'gsplat' needs CUDA tensors, got tensors on {device}")
        return True
    raise ValueError(f"backend must be 'auto', 'torch' or 'gsplat', got {backend!r}")


# ---------------------------------------------------------------------------------------------- shared pieces

def _sh_basis(k: int, directions: Tensor) -> Tensor:
    """(N,k) real SH basis at the normalised directions (3DGS sign convention)."""
    x, y, z = (directions / directions.norm(dim=-1, keepdim=True)).unbind(-1)
    basis = [torch.full_like(x, SH_C0)]
    if k > 1:
        basis += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if k > 4:
        xx, yy, zz = x * x, y * y, z * z
        basis += [SH_C2[0] * x * y, SH_C2[1] * y * z, SH_C2[2] * (2 * zz - xx - yy), SH_C2[3] * x * z,
                  SH_C2[4] * (xx - yy)]
    if k > 9:
        basis += [SH_C3[0] * y * (3 * xx - yy), SH_C3[1] * x * y * z, SH_C3[2] * y * (4 * zz - xx - yy),
                  SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy), SH_C3[4] * x * (4 * zz - xx - yy),
                  SH_C3[5] * z * (xx - yy), SH_C3[6] * x * (xx - 3 * yy)]
    return torch.stack(basis, dim=-1)


def _colours(scene: _Scene) -> Tensor:
    """(N,3) gsplat colours: max(SH(mean - camera centre) + 0.5, 0)."""
    assert scene.sh is not None
    view = scene.world_to_camera
    camera_centre = torch.linalg.solve(view[:3, :3], -view[:3, 3])
    return (evaluate_sh(scene.sh, scene.means - camera_centre) + 0.5).clamp(min=0)


def _project(scene: _Scene) -> Projection:
    """Vectorised gsplat projection (see :func:`project_gaussians`), closed-form 2x2 algebra."""
    x, y, z, w = (scene.rotations_xyzw / scene.rotations_xyzw.norm(dim=-1, keepdim=True)).unbind(-1)
    rotation = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], dim=-1)
    # M = R_cw R S: the covariance in the camera frame is M M^T.
    view_rotation, view_translation = scene.world_to_camera[:3, :3], scene.world_to_camera[:3, 3]
    m = view_rotation @ (rotation.view(-1, 3, 3) * scene.scales[:, None, :])
    p = scene.means @ view_rotation.T + view_translation
    px, py, pz = p.unbind(-1)
    fx, fy, cx, cy = scene.K[0, 0], scene.K[1, 1], scene.K[0, 2], scene.K[1, 2]
    width, height = scene.width, scene.height
    half_x, half_y = FRUSTUM_MARGIN * 0.5 * width / fx, FRUSTUM_MARGIN * 0.5 * height / fy
    ux = torch.minimum(torch.maximum(px / pz, -(cx + 0.5) / fx - half_x), (width - cx - 0.5) / fx + half_x)
    uy = torch.minimum(torch.maximum(py / pz, -(cy + 0.5) / fy - half_y), (height - cy - 0.5) / fy + half_y)
    # Rows of J M with J = [[fx/z, 0, -fx ux/z], [0, fy/z, -fy uy/z]].
    jm_x = (fx / pz)[:, None] * (m[:, 0] - ux[:, None] * m[:, 2])
    jm_y = (fy / pz)[:, None] * (m[:, 1] - uy[:, None] * m[:, 2])
    s_xx = (jm_x * jm_x).sum(-1) + scene.eps2d
    s_xy = (jm_x * jm_y).sum(-1)
    s_yy = (jm_y * jm_y).sum(-1) + scene.eps2d
    det = s_xx * s_yy - s_xy * s_xy
    conics = torch.stack([s_yy / det, -s_xy / det, s_xx / det], dim=-1)
    means2d = torch.stack([fx * px / pz + cx, fy * py / pz + cy], dim=-1)
    opacity = scene.opacities
    extent = torch.sqrt(2 * torch.log(opacity / ALPHA_THRESHOLD).clamp(min=0)).clamp(max=RADIUS_SIGMAS)
    radii = torch.ceil(extent[:, None] * torch.sqrt(torch.stack([s_xx, s_yy], dim=-1).clamp(min=0)))
    edge = means2d + 0.5                                   # gsplat's pixel-edge coordinates
    # Written so that NaN fails every test.
    valid = ((pz >= scene.near_plane) & (pz <= scene.far_plane) & (det > 0) & (opacity >= ALPHA_THRESHOLD)
             & (radii > 0).all(-1) & (edge[:, 0] + radii[:, 0] > 0) & (edge[:, 0] - radii[:, 0] < width)
             & (edge[:, 1] + radii[:, 1] > 0) & (edge[:, 1] - radii[:, 1] < height))
    radii = torch.where(valid[:, None], radii, 0).clamp(max=_RADIUS_MAX).to(torch.int32)
    return Projection(means2d=means2d, conics=conics, depths=pz, radii=radii)


def _assemble(image: Tensor, alpha: Tensor, scene: _Scene, render_depth: bool) -> RenderOutput:
    """Split (H,W,[3 rgb][1 weighted z][C]) accumulations into a RenderOutput (background, expected depth)."""
    start = 0
    rgb = depth = features = None
    if scene.sh is not None:
        rgb = image[..., :3]
        if scene.background is not None:
            rgb = rgb + (1 - alpha)[..., None] * scene.background.to(rgb)
        start = 3
    if render_depth:
        depth = image[..., start] / alpha.clamp(min=DEPTH_ALPHA_MIN)
        start += 1
    if scene.features is not None:
        features = image[..., start:]
    return RenderOutput(rgb=rgb, depth=depth, alpha=alpha, features=features)


# ----------------------------------------------------------------------------------------------- torch backend

@torch.no_grad()
def _render_torch(scene: _Scene, render_depth: bool) -> RenderOutput:
    """Exact compositor over (Gaussian, pixel) pairs, one band of image rows at a time.

    Visible Gaussians are sorted by depth (stable). Their candidate pixels (gsplat tiles within the exact
    alpha >= 1/255 ellipse) are row spans ordered by (row, depth); the pairs of the spans, sorted stably by pixel,
    list every pixel's Gaussians front to back. The transmittance before each pair comes from a segmented float64
    cumulative sum of log(1 - alpha), and gsplat's 1e-4 stop is a prefix rule per pixel. A sparse (pixels x N)
    weight matrix times [1 | rgb | z] and times the features gives alpha and every channel.
    """
    width, height = scene.width, scene.height
    dtype, device = scene.means.dtype, scene.means.device
    proj = _project(scene)
    ids = proj.visible.nonzero().squeeze(1)
    ids = ids[torch.sort(proj.depths[ids], stable=True).indices]
    columns = [torch.ones(len(scene.means), 1, dtype=dtype, device=device)]
    if scene.sh is not None:
        columns.append(_colours(scene))
    if render_depth:
        columns.append(proj.depths[:, None])
    values = torch.cat(columns, dim=1)
    n_channels = values.shape[1] + (0 if scene.features is None else scene.features.shape[1])
    image = torch.zeros(height * width, n_channels, dtype=dtype, device=device)
    spans = _row_spans(proj, ids, scene.opacities, width, height)
    for top, bottom, first, last in _bands(spans, width, height):
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='Sparse CSR tensor support is in beta')
            weights = _band_weights(spans, first, last, top, bottom, width, len(scene.means))
            image[top * width:bottom * width, :values.shape[1]] = weights @ values
            if scene.features is not None:
                image[top * width:bottom * width, values.shape[1]:] = weights @ scene.features
    image = image.view(height, width, -1)
    return _assemble(image[..., 1:], image[..., 0], scene, render_depth)


@dataclass(frozen=True)
class _RowSpans:
    """Candidate pixels as S non-empty row spans of visible Gaussians, ordered by (row, depth).

    ``row``, ``first`` (first column), ``length`` (columns), ``gaussian`` (original index): (S,) int64.
    ``model`` (5,S) in the render dtype: ``-centre x`` and ``half_a``, ``b_dy``, ``half_c_dy2``, ``opacity``
    such that, with ``dx = column - centre x``, gsplat's ``sigma = 0.5 (a dx^2 + c dy^2) + b dx dy`` is
    ``dx (half_a dx + b_dy) + half_c_dy2``.
    """
    row: Tensor
    first: Tensor
    length: Tensor
    gaussian: Tensor
    model: Tensor


def _row_spans(proj: Projection, ids: Tensor, opacities: Tensor, width: int, height: int) -> _RowSpans:
    """Each visible Gaussian's candidate pixels, row by row: its gsplat tiles within its alpha >= 1/255 ellipse.

    ``ids`` (V,) depth-sorted visible Gaussians, ``opacities`` (N,). The ellipse {sigma <= L}, L = ln(255
    opacity), grown by a small margin, holds every pixel that can pass the alpha test, so leaving out the tiles'
    other pixels changes nothing; the exact test is done per pair. Extents in float64.
    """
    device = ids.device
    f64 = dict(dtype=torch.float64, device=device)
    centre = proj.means2d.index_select(0, ids).to(**f64)
    a, b, c = proj.conics.index_select(0, ids).to(**f64).unbind(-1)
    radii = proj.radii.index_select(0, ids).to(**f64)
    # Tile ranges in pixels (gsplat: floor/ceil of (edge centre -/+ radius) / tile, clamped to the tile grid).
    edge = centre + 0.5
    tiles = torch.tensor([math.ceil(width / TILE_SIZE), math.ceil(height / TILE_SIZE)], **f64)
    tile_first = torch.minimum(torch.floor((edge - radii) / TILE_SIZE).clamp(min=0), tiles) * TILE_SIZE
    tile_end = torch.minimum(torch.ceil((edge + radii) / TILE_SIZE).clamp(min=0), tiles) * TILE_SIZE
    # Ellipse half extents sqrt(2 L cov_ii), cov = inverse conic; rows: a dx^2 + 2 b dy dx + c dy^2 <= 2 L.
    level = 2 * torch.log(opacities.index_select(0, ids).to(torch.float64) / ALPHA_THRESHOLD).clamp(min=0)
    det = a * c - b * b
    half = torch.sqrt(level[:, None] * torch.stack([c / det, a / det], dim=-1))
    margin = half * _SUPPORT_MARGIN_REL + _SUPPORT_MARGIN_PX
    low = torch.maximum(torch.ceil(centre - half - margin), tile_first).clamp(min=0)
    high = torch.minimum(torch.minimum(torch.floor(centre + half + margin), tile_end - 1),
                         torch.tensor([width - 1, height - 1], **f64))
    n_rows = (high[:, 1] - low[:, 1] + 1).clamp(min=0).to(torch.int64)
    entry = torch.repeat_interleave(torch.arange(len(ids), device=device), n_rows)
    row = low[:, 1].to(torch.int64).index_select(0, entry) + torch.arange(len(entry), device=device) \
        - (torch.cumsum(n_rows, 0) - n_rows).index_select(0, entry)
    by_row = torch.sort(row.to(torch.int16 if height <= _KEY_SHIFT else torch.int32), stable=True).indices
    entry, row = entry.index_select(0, by_row), row.index_select(0, by_row)      # (row, depth) order
    # Per row, dx in -b dy / a -+ sqrt(2 L a - det dy^2) / a, within the tiles' and the ellipse's box.
    per_gaussian = torch.stack([centre[:, 1], level * a, det, 1 / a, -b / a, centre[:, 0], margin[:, 0], low[:, 0],
                                high[:, 0]], dim=1).index_select(0, entry)
    cy, level_a, det, inv_a, slope, cx, margin_x, low_x, high_x = per_gaussian.unbind(1)
    dy = row.to(torch.float64) - cy
    root = torch.sqrt(level_a - det * dy * dy).nan_to_num_(0.0) * inv_a
    middle = cx + slope * dy
    first = torch.maximum(torch.ceil(middle - root - margin_x), low_x)
    last = torch.minimum(torch.floor(middle + root + margin_x), high_x)
    keep = (last >= first).nonzero().squeeze(1)
    entry, row, first, last = (t.index_select(0, keep) for t in (entry, row, first, last))
    # The pixel model in the render dtype, from the projection's own numbers.
    gaussian = ids.index_select(0, entry)
    conic = proj.conics.index_select(0, gaussian).T
    centre = proj.means2d.index_select(0, gaussian).T
    dy = row.to(centre.dtype) - centre[1]
    model = torch.stack([-centre[0], 0.5 * conic[0], conic[1] * dy, 0.5 * conic[2] * dy * dy,
                         opacities.index_select(0, gaussian)])
    return _RowSpans(row=row, first=first.to(torch.int64), length=(last - first + 1).to(torch.int64),
                     gaussian=gaussian, model=model)


def _bands(spans: _RowSpans, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """(top, bottom, first span, end span) of consecutive row bands, each of at most _BAND_PIXELS pixels and
    about _PAIRS_PER_BAND pairs (at least one row)."""
    pairs_per_row = torch.zeros(height, dtype=torch.int64, device=spans.row.device)
    pairs_per_row.index_add_(0, spans.row, spans.length)
    rows_per_band = max(1, _BAND_PIXELS // width)
    bands, top, total = [], 0, 0
    for row, count in enumerate(pairs_per_row.tolist()):
        if row > top and (total + count > _PAIRS_PER_BAND or row - top == rows_per_band):
            bands.append(top)
            top, total = row, 0
        total += count
    bands.append(top)
    limits = bands + [height]
    edges = torch.searchsorted(spans.row, torch.tensor(limits, device=spans.row.device)).tolist()
    return [(limits[k], limits[k + 1], edges[k], edges[k + 1]) for k in range(len(bands))]


def _band_weights(spans: _RowSpans, start: int, stop: int, top: int, bottom: int, width: int,
                  n_gaussians: int) -> Tensor:
    """Sparse CSR (pixels of rows [top, bottom), n_gaussians) compositing weights alpha * T from the spans
    [start, stop) (those of these rows)."""
    device, dtype = spans.row.device, spans.model.dtype
    n_pixels = (bottom - top) * width
    length = spans.length[start:stop]
    n_pairs = int(length.sum()) if stop > start else 0
    crow = torch.zeros(n_pixels + 1, dtype=torch.int64, device=device)
    if n_pairs == 0:
        return torch.sparse_csr_tensor(crow, crow[:0], spans.model.new_zeros(0), size=(n_pixels, n_gaussians),
                                       check_invariants=False)
    first_pixel = (spans.row[start:stop] - top) * width + spans.first[start:stop]
    # Pixel keys of the pairs, span after span, by a cumulative sum of steps (+1 within a span); int16 keys
    # (shifted) when the band has at most 2^16 pixels: a faster stable sort.
    span_start = torch.cumsum(length, 0) - length
    step = torch.ones(n_pairs, dtype=torch.int32, device=device)
    jump = first_pixel.clone()
    jump[1:] -= first_pixel[:-1] + length[:-1] - 1
    jump[0] -= _KEY_SHIFT
    step[span_start] = jump.to(torch.int32)
    key = torch.cumsum(step, 0, dtype=torch.int32)
    if n_pixels <= _BAND_PIXELS:
        key = key.to(torch.int16)
    span_of_pair = torch.zeros(n_pairs, dtype=torch.int32, device=device)
    span_of_pair[span_start[1:]] = 1
    span_of_pair = torch.cumsum(span_of_pair, 0, dtype=torch.int32)
    # Sort by pixel (stable: each pixel's pairs stay front to back), then evaluate the pairs in that order.
    key, order = torch.sort(key, stable=True)
    span_of_pair = span_of_pair.index_select(0, order)
    pixel = key.to(torch.int32) + _KEY_SHIFT
    column = torch.arange(width, dtype=dtype, device=device).repeat(bottom - top)
    neg_mx, half_a, b_dy, half_c_dy2, opacity = (row[start:stop].index_select(0, span_of_pair) for row in spans.model)
    dx = column.index_select(0, pixel).add_(neg_mx)
    sigma = dx.mul(half_a).add_(b_dy).mul_(dx).add_(half_c_dy2)
    alpha = torch.exp(-sigma).mul_(opacity).clamp_(max=ALPHA_MAX)
    alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_THRESHOLD), alpha, 0.0)
    log_pass = torch.log1p(-alpha)                               # log(1 - alpha) per pair
    exclusive = torch.cumsum(log_pass, 0, dtype=torch.float64).sub_(log_pass)
    counts = torch.bincount(pixel, minlength=n_pixels)
    crow[1:] = torch.cumsum(counts, 0)
    segment_base = exclusive.index_select(0, crow[:-1].clamp(max=n_pairs - 1))
    log_t_before = exclusive.sub_(segment_base.index_select(0, pixel)).to(dtype)
    # gsplat stops before the pair that brings T to <= 1e-4: keep pairs with log T after > log 1e-4 (a prefix).
    weight = torch.where(log_pass.add_(log_t_before) > math.log(TRANSMITTANCE_MIN),
                         torch.exp(log_t_before).mul_(alpha), 0.0)
    columns = spans.gaussian[start:stop].index_select(0, span_of_pair)
    return torch.sparse_csr_tensor(crow, columns, weight, size=(n_pixels, n_gaussians), check_invariants=False)


# ---------------------------------------------------------------------------------------------- gsplat backend

def _render_gsplat(scene: _Scene, render_depth: bool) -> RenderOutput:
    """gsplat.rasterization (packed, classic, 16x16 tiles) on CUDA: one call for rgb from SH (with the expected
    depth), one for the features (with the depth when there is no rgb)."""
    import gsplat   # only here: the torch backend never touches gsplat

    rgb = depth = features = alpha = None
    if scene.sh is not None:
        mode = 'RGB+ED' if render_depth else 'RGB'
        image, alpha = _gsplat_rasterize(gsplat, scene, scene.sh, math.isqrt(scene.sh.shape[1]) - 1, mode,
                                         scene.background)
        rgb, depth = image[..., :3], image[..., 3] if render_depth else None
    if scene.features is not None:
        with_depth = render_depth and depth is None
        image, alpha = _gsplat_rasterize(gsplat, scene, scene.features, None, 'RGB+ED' if with_depth else 'RGB',
                                         None)
        features = image[..., :scene.features.shape[1]]
        if with_depth:
            depth = image[..., -1]
    if alpha is None:           # neither rgb nor features: alpha (and the depth) alone
        image, alpha = _gsplat_rasterize(gsplat, scene, scene.means.new_zeros(len(scene.means), 1), None,
                                         'ED' if render_depth else 'RGB', None)
        depth = image[..., 0] if render_depth else None
    return RenderOutput(rgb=rgb, depth=depth, alpha=alpha, features=features)


def _gsplat_rasterize(gsplat: Any, scene: _Scene, colours: Tensor, sh_degree: int | None, mode: str,
                      background: Tensor | None) -> tuple[Tensor, Tensor]:
    """One gsplat.rasterization call for the scene's camera -> (H,W,channels) image, (H,W) alpha. gsplat takes
    (w, x, y, z) quaternions and puts pixel centres at +0.5, hence ``cx + 0.5, cy + 0.5``."""
    K = scene.K.clone()
    K[:2, 2] += 0.5
    image, alpha, _ = gsplat.rasterization(
        scene.means, scene.rotations_xyzw[:, [3, 0, 1, 2]], scene.scales, scene.opacities, colours,
        scene.world_to_camera[None], K[None], scene.width, scene.height, near_plane=scene.near_plane,
        far_plane=scene.far_plane, eps2d=scene.eps2d, sh_degree=sh_degree, packed=True, tile_size=TILE_SIZE,
        backgrounds=None if background is None else background[None], render_mode=mode, rasterize_mode='classic')
    return image[0], alpha[0, ..., 0]
