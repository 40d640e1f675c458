"""Cameras from one DUSt3R forward pass: focal, relative pose, depth and metric scale, in torch on any device.

Frames are REP 103 optical frames (x right, y down, z forward). DUSt3R returns, for a pair (view 1, view 2):

- ``pts3d_1`` (H,W,3): the 3-D point of each pixel of view 1, in view 1's frame;
- ``pts3d_2`` (H,W,3): the 3-D point of each pixel of view 2, also in view 1's frame;
- ``conf_1``, ``conf_2`` (H,W): confidences, >= 1.

Pixel convention: OpenCV/ROS, pixel (row i, column j) is at image coordinates (x, y) = (j, i).
A pose ``T_a_b`` (4,4) is the pose of frame b in frame a: ``X_a = R X_b + t``.

One code path on every device. The tensor-resident cores (:func:`focal_weiszfeld`, :func:`relative_pose`,
:func:`stereo_rig_scale`) take torch tensors (or numpy, moved to the CPU) and return tensors on the input's device
without a host synchronisation: hypotheses, scoring, robust refinement and every success test run on the device
(dense per-point work in float32 on CUDA, float64 on the CPU; the small systems in float64). The wrappers
(:func:`estimate_focal_weiszfeld`, :func:`estimate_relative_pose`, :func:`estimate_stereo_rig_scale`) copy the
result to the host once and return numpy/float. A leading batch axis of size 1 is dropped.

No OpenCV or scipy here: the former OpenCV path lives in ``test/pose_oracle.py`` as the tests' oracle.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_log = logging.getLogger(__name__)

# DUSt3R's reference focal: that of a 60 degree field of view over the long image side.
_HALF_FOV_REFERENCE_RAD = np.deg2rad(30.0)
# Fewest correspondences accepted for a pose (the linear hypotheses use 6).
_MIN_PNP_POINTS = 6
# Minimal-sample hypotheses drawn per unit of ``iterations``, how many are scored at once, and the number of
# candidates (a random subset) they are scored on.
_HYPOTHESES_PER_ITERATION = 8
_HYPOTHESIS_CHUNK = 400
_SCORING_POINTS = 384
# Range of the estimated focal, in units of the long image side.
_FOCAL_RANGE = (0.05, 20.0)
# Robust refinement: Levenberg–Marquardt iterations of each pass (inliers recomputed between passes), smallest
# scale (pixels) of the Cauchy loss.
_REFINEMENT_ITERATIONS = (6, 4, 4)
# Candidates (a random subset) of the refinement passes but the last, which uses all.
_REFINEMENT_SUBSET = 2048
_MIN_LOSS_SCALE_PX = 1e-3
# Ratio of the second to the largest spread (squared, of the covariance) below which points lie on a line.
_COLLINEAR_RATIO_SQUARED = 1e-12
# Newton iterations of the polar decomposition that projects a 3x3 matrix onto the rotations.
_POLAR_ITERATIONS = 8

# Failure codes of RelativePoseTensors.status (0: success).
POSE_OK, POSE_BAD_K, POSE_FEW_FINITE, POSE_FEW_CONFIDENT, POSE_COLLINEAR, POSE_NO_HYPOTHESIS, POSE_FEW_INLIERS = \
    range(7)

# Stereo rig: IRLS iterations of the scale fit (the robust sigma re-estimated every _RIG_SCALE_EVERY), fewest
# pixels it needs, Cauchy constant (x the robust sigma).
_RIG_ITERATIONS = 15
_RIG_SCALE_EVERY = 5
_RIG_MIN_PIXELS = 16
_CAUCHY_C = 2.3849


# ---------------------------------------------------------------------------------------------------- conversions
def _dense_dtype(device: torch.device) -> torch.dtype:
    """float64 on the CPU (cheap, exact), float32 for the dense per-point work on accelerators."""
    return torch.float64 if device.type == 'cpu' else torch.float32


def _to_device(tensor: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """``tensor`` on ``device``; a host tensor is queued without waiting (non_blocking: no stream
    synchronisation for small constants and given matrices)."""
    if device is None or tensor.device == torch.device(device):
        return tensor
    return tensor.to(device, non_blocking=tensor.device.type == 'cpu')


def _host_tensor(data: Any, device: torch.device) -> torch.Tensor:
    """float64 tensor of host ``data`` on ``device`` (see :func:`_to_device`)."""
    return _to_device(torch.as_tensor(np.asarray(data, dtype=np.float64)), device)


def _as_tensor(array: Any, name: str, trailing_shape: tuple[int, ...], device: torch.device | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """numpy or torch -> tensor of shape (H,W)+trailing_shape on its device (``device`` for numpy or when given),
    in ``dtype`` (default: :func:`_dense_dtype`). A leading batch axis of 1 is dropped; ValueError for other
    shapes."""
    if isinstance(array, torch.Tensor):
        tensor = array.detach()
    else:
        tensor = torch.from_numpy(np.asarray(array, dtype=np.float64))
    if device is not None:
        tensor = _to_device(tensor, device)
    expected_ndim = 2 + len(trailing_shape)
    if tensor.ndim == expected_ndim + 1 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != expected_ndim or tuple(tensor.shape[2:]) != trailing_shape:
        wanted = 'x'.join(['H', 'W'] + [str(s) for s in trailing_shape])
        raise ValueError(f'{name} must have shape {wanted} (optionally with a leading batch axis of 1), '
                         f'got {tuple(tensor.shape)}')
    return tensor.to(dtype or _dense_dtype(tensor.device))


def _as_matrix(array: Any, name: str, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """numpy or torch -> float64 tensor of ``shape`` on ``device``."""
    tensor = array.detach() if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array, np.float64))
    if tuple(tensor.shape) != shape:
        raise ValueError(f'{name} must be {shape[0]}x{shape[1]}, got shape {tuple(tensor.shape)}')
    return _to_device(tensor.to(torch.float64), device)


def _as_pose(T: Any, name: str) -> np.ndarray:
    if hasattr(T, 'detach'):
        T = T.detach().cpu().numpy()
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4):
        raise ValueError(f'{name} must be a 4x4 homogeneous transform, got shape {T.shape}')
    return T


def invert_pose(T_a_b: Any) -> Any:
    """Inverse of a rigid transform: (4,4) T_a_b -> T_b_a (a tensor for a tensor, on its device; else numpy)."""
    if isinstance(T_a_b, torch.Tensor):
        rotation, translation = T_a_b[..., :3, :3], T_a_b[..., :3, 3]
        T_b_a = torch.zeros_like(T_a_b)
        T_b_a[..., :3, :3] = rotation.transpose(-1, -2)
        T_b_a[..., :3, 3] = -(rotation.transpose(-1, -2) @ translation[..., None])[..., 0]
        T_b_a[..., 3, 3] = 1.0
        return T_b_a
    T_a_b = _as_pose(T_a_b, 'T_a_b')
    rotation, translation = T_a_b[:3, :3], T_a_b[:3, 3]
    T_b_a = np.eye(4)
    T_b_a[:3, :3] = rotation.T
    T_b_a[:3, 3] = -rotation.T @ translation
    return T_b_a


def reference_focal(height: int, width: int) -> float:
    """Focal (pixels) of a 60-degree field of view over the longer image side (DUSt3R's ``focal_base``)."""
    return max(height, width) / (2 * np.tan(_HALF_FOV_REFERENCE_RAD))


def intrinsics_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """(3,3) pinhole camera matrix."""
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def pixel_grid(height: int, width: int) -> np.ndarray:
    """(H,W,2) float64 image coordinates: ``grid[i, j] = (j, i)``."""
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    return np.stack([xs, ys], axis=-1)


def _pixel_grid_tensor(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H,W,2) image coordinates ``(j, i)`` as a tensor."""
    ys = torch.arange(height, device=device, dtype=dtype)[:, None].expand(height, width)
    xs = torch.arange(width, device=device, dtype=dtype)[None, :].expand(height, width)
    return torch.stack([xs, ys], dim=-1)


# ---------------------------------------------------------------------------------------------------- focal
def focal_weiszfeld(pts3d: Any, principal_point: tuple[float, float] | None = None, iterations: int = 10, *,
                    min_focal: float = 0.0, max_focal: float = math.inf) -> torch.Tensor:
    """Tensor core of :func:`estimate_focal_weiszfeld`: a 0-d float64 tensor on the input's device, NaN when no
    point is usable. No host synchronisation."""
    points = _as_tensor(pts3d, 'pts3d', (3,))
    height, width = points.shape[:2]
    if principal_point is None:
        principal_point = (width / 2, height / 2)
    xy_over_z = torch.nan_to_num(points[..., :2] / points[..., 2:3], nan=0.0, posinf=0.0, neginf=0.0)
    centred = _pixel_grid_tensor(height, width, points.device, points.dtype) \
        - _host_tensor(principal_point, points.device).to(points.dtype)
    xy_over_z, centred = xy_over_z.reshape(-1, 2), centred.reshape(-1, 2)
    # Points with x/z = y/z = 0 add nothing to either sum: no need to leave them out.
    dot_xy_pixel = (xy_over_z * centred).sum(-1)
    dot_xy_xy = (xy_over_z * xy_over_z).sum(-1)
    denominator = dot_xy_xy.sum()
    focal = dot_xy_pixel.sum() / denominator
    for _ in range(iterations):
        distance = torch.linalg.vector_norm(centred - focal * xy_over_z, dim=-1)
        weight = 1.0 / distance.clamp_min(1e-8)
        focal = (weight * dot_xy_pixel).sum() / (weight * dot_xy_xy).sum()
    focal = torch.where(denominator > 0, focal.double(), torch.full_like(focal, math.nan, dtype=torch.float64))
    focal_base = reference_focal(height, width)
    low, high = min_focal * focal_base, max_focal * focal_base
    return torch.where(torch.isnan(focal), focal, focal.clamp(low, high))


def estimate_focal_weiszfeld(pts3d: Any, principal_point: tuple[float, float] | None = None,
                             iterations: int = 10, *, min_focal: float = 0.0, max_focal: float = np.inf) -> float:
    """Focal (pixels) of a camera from its point map ``pts3d`` (H,W,3) in its own frame, as DUSt3R's
    ``estimate_focal_knowing_depth(focal_mode='weiszfeld')``.

    Minimises ``sum |pixel - pp - f * (x, y) / z|`` over f: closed-form least-squares start, then
    ``iterations`` re-weighted least-squares steps with weights ``1 / max(distance, 1e-8)``. ``principal_point``
    defaults to (W/2, H/2). Points whose x/z or y/z is not finite contribute 0 for that coordinate (as DUSt3R's
    ``nan_to_num``). The result is clipped to ``[min_focal, max_focal] * max(H, W) / (2 tan 30 deg)``.
    Raises ValueError when no point is usable. Runs on the input's device (:func:`focal_weiszfeld`), one copy.
    """
    focal = float(focal_weiszfeld(pts3d, principal_point, iterations, min_focal=min_focal, max_focal=max_focal))
    if math.isnan(focal):
        raise ValueError('no usable point to estimate the focal (all x/z, y/z are zero or not finite)')
    return focal


def intrinsics_from_points(pts3d: Any, min_focal: float = 0.0, max_focal: float = math.inf
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pinhole intrinsics of a view from its point map (H,W,3) in its own frame, on the input's device, without a
    host synchronisation: (K (3,3) float64 with the Weiszfeld focal clipped to ``[min_focal, max_focal]`` x the
    60-degree-FOV focal and the principal point at the image centre, ``estimated`` () bool: False where no point
    was usable and the 60-degree-FOV focal was used instead)."""
    points = _as_tensor(pts3d, 'pts3d', (3,))
    height, width = points.shape[:2]
    focal = focal_weiszfeld(points, min_focal=min_focal, max_focal=max_focal)
    estimated = torch.isfinite(focal)
    focal = torch.where(estimated, focal, torch.full_like(focal, reference_focal(height, width)))
    K = torch.eye(3, dtype=torch.float64, device=points.device)
    K[0, 0] = K[1, 1] = focal
    K[0, 2], K[1, 2] = width / 2.0, height / 2.0
    return K, estimated


# ---------------------------------------------------------------------------------------------------- small 3-D maths
def _det3(M: torch.Tensor) -> torch.Tensor:
    """(...,3,3) -> (...) determinant (closed form; no linear-algebra library call)."""
    return (M[..., 0, :] * torch.linalg.cross(M[..., 1, :], M[..., 2, :])).sum(-1)


def _cofactor3(M: torch.Tensor) -> torch.Tensor:
    """(...,3,3) -> cofactor matrix (= det(M) M^-T)."""
    r0, r1, r2 = M[..., 0, :], M[..., 1, :], M[..., 2, :]
    return torch.stack([torch.linalg.cross(r1, r2), torch.linalg.cross(r2, r0), torch.linalg.cross(r0, r1)], -2)


def _nearest_rotation(M: torch.Tensor) -> torch.Tensor:
    """(...,3,3) with det > 0 -> the nearest rotation (orthogonal polar factor), by scaled Newton iterations
    ``X <- (g X + X^-T / g) / 2`` with ``g = |det X|^(-1/3)`` (closed-form 3x3 inverse: no solver, no sync)."""
    X = M
    for _ in range(_POLAR_ITERATIONS):
        det = _det3(X)
        gamma = det.abs().clamp_min(1e-300).pow(-1.0 / 3.0)[..., None, None]
        inverse_transpose = _cofactor3(X) / det[..., None, None]
        X = 0.5 * (gamma * X + inverse_transpose / gamma)
    return X


def _skew(v: torch.Tensor) -> torch.Tensor:
    """(...,3) -> (...,3,3) cross-product matrix [v]x."""
    zero = torch.zeros_like(v[..., 0])
    return torch.stack([torch.stack([zero, -v[..., 2], v[..., 1]], -1),
                        torch.stack([v[..., 2], zero, -v[..., 0]], -1),
                        torch.stack([-v[..., 1], v[..., 0], zero], -1)], -2)


def _exp_so3(omega: torch.Tensor) -> torch.Tensor:
    """(...,3) rotation vector -> (...,3,3) rotation matrix (Rodrigues; Taylor near 0)."""
    theta_sq = (omega * omega).sum(-1)
    theta = theta_sq.sqrt()
    small = theta_sq < 1e-12
    safe = torch.where(small, torch.ones_like(theta), theta)
    a = torch.where(small, 1.0 - theta_sq / 6.0, torch.sin(safe) / safe)
    b = torch.where(small, 0.5 - theta_sq / 24.0, (1.0 - torch.cos(safe)) / (safe * safe))
    K = _skew(omega)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand(K.shape)
    return eye + a[..., None, None] * K + b[..., None, None] * (K @ K)


def _minimal_dlt(X: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Projection matrices from 6 correspondences each: (B,6,3) points, (B,6) image coordinates -> (B,3,4),
    the exact null vector of 11 of the 12 DLT equations (generalised cross product by 11x11 determinants)."""
    batch = X.shape[0]
    Xh = torch.cat([X, torch.ones_like(X[..., :1])], -1)                       # (B,6,4)
    zeros = torch.zeros_like(Xh)
    rows_x = torch.cat([Xh, zeros, -x[..., None] * Xh], -1)                     # (B,6,12)
    rows_y = torch.cat([zeros, Xh, -y[..., None] * Xh], -1)
    A = torch.stack([rows_x, rows_y], 2).reshape(batch, 12, 12)[:, :11]         # (B,11,12)
    columns = torch.arange(11, device=X.device)
    keep = columns + (columns[None, :] >= torch.arange(12, device=X.device)[:, None]).long()   # (12,11): j != k
    minors = A[:, :, keep].permute(0, 2, 1, 3)                                  # (B,12,11,11)
    signs = 1.0 - 2.0 * (torch.arange(12, device=X.device) % 2).to(X.dtype)
    null = signs * torch.linalg.det(minors)                                     # (B,12)
    null = null / torch.linalg.vector_norm(null, dim=-1, keepdim=True).clamp_min(1e-300)
    return null.reshape(batch, 3, 4)


def _decompose_projection(P: torch.Tensor, focal_known: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B,3,4) ``lambda diag(f, f, 1) [R | t]`` in normalised image coordinates -> R (B,3,3), t (B,3), f (B,)
    (f = 1 when the focal is known). f from the row norms, the sign from det > 0, R by the polar factor."""
    M, p4 = P[..., :3], P[..., 3]
    norms = torch.linalg.vector_norm(M, dim=-1)                                  # (B,3)
    if focal_known:
        focal = torch.ones_like(norms[:, 0])
    else:
        focal = torch.sqrt(0.5 * (norms[:, 0] ** 2 + norms[:, 1] ** 2)) / norms[:, 2].clamp_min(1e-300)
        focal = focal.clamp(*_FOCAL_RANGE)
    scale = norms[:, 2] * torch.where(_det3(M) < 0, -1.0, 1.0)
    unscale = torch.stack([1.0 / focal, 1.0 / focal, torch.ones_like(focal)], -1) / scale[:, None]
    return _nearest_rotation(M * unscale[..., None]), p4 * unscale, focal


def _reprojection_errors(points: torch.Tensor, centred_pixels: torch.Tensor, R: torch.Tensor, t: torch.Tensor,
                         fx: torch.Tensor, fy: torch.Tensor) -> torch.Tensor:
    """Squared pixel errors (...,N) of points (N,3) moved by R (...,3,3), t (...,3) and projected with focals
    fx, fy (...) onto principal-point-centred pixels (N,2); +inf behind the camera or where not finite."""
    dtype = points.dtype
    camera = torch.matmul(R.to(dtype), points.T) + t.to(dtype)[..., :, None]                    # (...,3,N)
    z = camera[..., 2, :]
    ex = fx.to(dtype)[..., None] * camera[..., 0, :] / z - centred_pixels[:, 0]
    ey = fy.to(dtype)[..., None] * camera[..., 1, :] / z - centred_pixels[:, 1]
    squared = ex * ex + ey * ey
    return torch.where((z > 0) & torch.isfinite(squared), squared, torch.full_like(squared, math.inf))


# ---------------------------------------------------------------------------------------------------- relative pose
@dataclass(frozen=True)
class RelativePose:
    """Result of :func:`estimate_relative_pose`.

    - ``T_1_2`` (4,4): pose of camera 2 in camera 1's frame (``X_1 = R X_2 + t``), in DUSt3R's units;
      identity when ``success`` is False.
    - ``focal_2``: focal of camera 2 in pixels (``K_2[0, 0]`` when K_2 was given; estimated otherwise,
      NaN if that failed); ``K_2`` (3,3): the camera matrix used for view 2.
    - ``num_candidates``: confident, finite points used (after subsampling); ``num_inliers``: those
      within the reprojection threshold of the final pose.
    - ``reprojection_rmse_px``: RMS reprojection error of the inliers (NaN if none).
    """

    T_1_2: np.ndarray
    focal_2: float
    K_2: np.ndarray
    num_inliers: int
    num_candidates: int
    reprojection_rmse_px: float
    success: bool
    message: str


@dataclass(frozen=True)
class RelativePoseTensors:
    """Device-resident result of :func:`relative_pose` (every field a tensor on the input's device, float64 unless
    said): ``T_1_2`` (4,4), ``K_2`` (3,3), ``focal_2`` (), ``num_inliers`` () int64, ``num_candidates`` () int64,
    ``reprojection_rmse_px`` (), ``success`` () bool, ``status`` () int64 (POSE_OK or a POSE_* failure code),
    ``num_finite`` () int64 and ``confidence_threshold`` () (for the message). :meth:`to_numpy` copies it to the
    host once."""

    T_1_2: torch.Tensor
    K_2: torch.Tensor
    focal_2: torch.Tensor
    num_inliers: torch.Tensor
    num_candidates: torch.Tensor
    reprojection_rmse_px: torch.Tensor
    success: torch.Tensor
    status: torch.Tensor
    num_finite: torch.Tensor
    confidence_threshold: torch.Tensor
    focal_known: bool

    def to_numpy(self) -> RelativePose:
        """The host :class:`RelativePose` (one device-to-host copy), with its message."""
        packed = torch.cat([self.T_1_2.reshape(-1), self.K_2.reshape(-1), torch.stack([
            self.focal_2, self.num_inliers.double(), self.num_candidates.double(), self.reprojection_rmse_px,
            self.success.double(), self.status.double(), self.num_finite.double(),
            self.confidence_threshold.double()])]).cpu().numpy()
        T_1_2, K_2 = packed[:16].reshape(4, 4).copy(), packed[16:25].reshape(3, 3).copy()
        focal, inliers, candidates, rmse, success, status, finite, threshold = packed[25:].tolist()
        inliers, candidates, status, finite = int(inliers), int(candidates), int(status), int(finite)
        messages = {
            POSE_OK: f'{inliers}/{candidates} inliers, RMSE {rmse:.3g} px'
                     + ('' if self.focal_known else f', focal {focal:.2f} px'),
            POSE_BAD_K: f'K_2 is not a valid camera matrix: {K_2.tolist()}',
            POSE_FEW_FINITE: f'only {finite} finite points (need {_MIN_PNP_POINTS})',
            POSE_FEW_CONFIDENT: f'only {candidates} points with confidence >= {threshold:.3g} '
                                f'(need {_MIN_PNP_POINTS})',
            POSE_COLLINEAR: 'the confident points (or their pixels) lie on a line',
            POSE_NO_HYPOTHESIS: 'RANSAC found no pose with enough inliers',
            POSE_FEW_INLIERS: f'too few inliers: {inliers} of {candidates} candidates',
        }
        if status != POSE_OK:
            _log.debug('relative pose failed: %s', messages[status])
        return RelativePose(T_1_2=T_1_2, focal_2=focal, K_2=K_2, num_inliers=inliers, num_candidates=candidates,
                            reprojection_rmse_px=rmse, success=bool(success), message=messages[status])


def _is_degenerate(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """() bool: the masked rows of (N,D) ``values`` lie on a line (or a point), in float64."""
    weights = mask.double()
    count = weights.sum().clamp_min(1.0)
    values = values.double()
    mean = (values * weights[:, None]).sum(0) / count
    centred = (values - mean) * weights[:, None]
    cov = centred.T @ centred / count
    trace = torch.diagonal(cov).sum()
    dims = cov.shape[0]
    second_invariant = sum(cov[i, i] * cov[j, j] - cov[i, j] ** 2 for i in range(dims) for j in range(i + 1, dims))
    return ~(trace > 0) | (second_invariant <= _COLLINEAR_RATIO_SQUARED * trace * trace)


def _refine_pose(points: torch.Tensor, centred_pixels: torch.Tensor, confidence: torch.Tensor, R: torch.Tensor,
                 t: torch.Tensor, focal: torch.Tensor, norm_x: torch.Tensor, norm_y: torch.Tensor,
                 refine_focal: bool, iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Confidence-weighted robust Levenberg–Marquardt of (R, t[, focal]) on the points with ``confidence`` > 0.

    Minimises ``sum_i c_i s^2 log(1 + e_i^2 / s^2)`` (Cauchy loss of the pixel error e_i, c_i the confidence) over
    a left rotation increment, the translation and (``refine_focal``) the log of the normalised focal ``focal``
    (pixels = focal * norm). Iteratively re-weighted damped Gauss–Newton with an analytic Jacobian; ``s`` follows
    the median error (at least _MIN_LOSS_SCALE_PX). Fixed iteration count; a step is kept only if it lowers the
    cost (``torch.where``), so nothing leaves the device. Shapes: points (N,3), centred_pixels (N,2),
    confidence (N,), R (3,3), t (3,), focal/norm_x/norm_y (). Returns (R, t, focal), float64."""
    dtype = points.dtype
    active = confidence > 0
    confidence = confidence / (confidence.sum() / active.sum().clamp_min(1)).clamp_min(1e-300)
    num_params = 7 if refine_focal else 6
    eye = torch.eye(num_params, dtype=torch.float64, device=points.device)

    def evaluate(R: torch.Tensor, t: torch.Tensor, focal: torch.Tensor):
        camera = points @ R.to(dtype).T + t.to(dtype)
        z = camera[:, 2]
        fx, fy = (focal * norm_x).to(dtype), (focal * norm_y).to(dtype)
        errors = torch.stack([fx * camera[:, 0] / z, fy * camera[:, 1] / z], -1) - centred_pixels
        squared = (errors * errors).sum(-1)
        valid = active & (z > 0) & torch.isfinite(squared)
        return camera, errors, squared, valid

    def robust_cost(squared: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        terms = confidence * scale ** 2 * torch.log1p(squared / scale ** 2)
        broken = (active & ~valid).any()
        cost = torch.where(valid, terms, torch.zeros_like(terms)).sum().double()
        return torch.where(broken, torch.full_like(cost, math.inf), cost)

    damping = torch.full((), 1e-3, dtype=torch.float64, device=points.device)
    R, t, focal = R.double(), t.double(), focal.double()
    camera, errors, squared, valid = evaluate(R, t, focal)
    for _ in range(iterations):
        distances = torch.where(valid, squared.sqrt(), torch.full_like(squared, math.nan))
        scale = torch.nan_to_num(torch.nanmedian(distances), nan=_MIN_LOSS_SCALE_PX).clamp_min(_MIN_LOSS_SCALE_PX)
        weights = torch.where(valid, confidence / (1.0 + squared / scale ** 2), torch.zeros_like(squared))

        # Jacobian (N,2,P) of the pixel errors w.r.t. (rotation increment, translation[, log focal]), closed form:
        # d(camera)/d(omega) = -[R X]x, d(pixel)/d(camera) = [[fx/z, 0, -fx x/z^2], [0, fy/z, -fy y/z^2]].
        x, y, z = (torch.where(valid, c, torch.ones_like(c)) for c in camera.unbind(-1))
        fx, fy = (focal * norm_x).to(dtype), (focal * norm_y).to(dtype)
        r0, r1, r2 = (points @ R.to(dtype).T).unbind(-1)
        inv_z = 1.0 / z
        u_over_z, v_over_z = x * inv_z, y * inv_z
        zeros = torch.zeros_like(x)
        row_u = [fx * (-u_over_z * r1), fx * (r2 * inv_z + u_over_z * r0), fx * (-r1 * inv_z),
                 fx * inv_z, zeros, -fx * u_over_z * inv_z]
        row_v = [fy * (-r2 * inv_z - v_over_z * r1), fy * (v_over_z * r0), fy * (r0 * inv_z),
                 zeros, fy * inv_z, -fy * v_over_z * inv_z]
        if refine_focal:
            row_u.append(fx * u_over_z)
            row_v.append(fy * v_over_z)
        jacobian_u, jacobian_v = torch.stack(row_u, -1).double(), torch.stack(row_v, -1).double()      # (N,P)
        residual = torch.where(valid[:, None], errors, torch.zeros_like(errors)).double()
        weighted_u, weighted_v = jacobian_u * weights.double()[:, None], jacobian_v * weights.double()[:, None]
        hessian = weighted_u.T @ jacobian_u + weighted_v.T @ jacobian_v
        gradient = weighted_u.T @ residual[:, 0] + weighted_v.T @ residual[:, 1]

        cost = robust_cost(squared, valid, scale)
        damped = hessian + damping * (torch.diag(torch.diagonal(hessian)) + 1e-12 * eye)
        step, _ = torch.linalg.solve_ex(damped, -gradient)
        step = torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0)
        new_R = _exp_so3(step[:3]) @ R
        new_t = t + step[3:6]
        new_focal = (focal * torch.exp(step[6])).clamp(*_FOCAL_RANGE) if refine_focal else focal
        new_camera, new_errors, new_squared, new_valid = evaluate(new_R, new_t, new_focal)
        accept = robust_cost(new_squared, new_valid, scale) <= cost
        R, t, focal = torch.where(accept, new_R, R), torch.where(accept, new_t, t), torch.where(accept, new_focal,
                                                                                                  focal)
        camera = torch.where(accept, new_camera, camera)
        errors = torch.where(accept, new_errors, errors)
        squared = torch.where(accept, new_squared, squared)
        valid = torch.where(accept, new_valid, valid)
        damping = torch.where(accept, (damping / 10.0).clamp_min(1e-9), (damping * 10.0).clamp_max(1e8))
    return R, t, focal


def relative_pose(pts3d_2_in_1: Any, conf_2: Any, K_2: Any = None, *,
                  principal_point: tuple[float, float] | None = None,
                  min_conf: float = 1.0, conf_quantile: float = 0.3, max_points: int = 5000,
                  reprojection_error_px: float = 5.0, iterations: int = 100,
                  min_inlier_fraction: float = 0.25, rng_seed: int = 0) -> RelativePoseTensors:
    """Tensor core of :func:`estimate_relative_pose` (same arguments): everything on the input's device, no host
    synchronisation. See :func:`estimate_relative_pose` for the method."""
    points_grid = _as_tensor(pts3d_2_in_1, 'pts3d_2_in_1', (3,))
    device, dtype = points_grid.device, points_grid.dtype
    confidence = _as_tensor(conf_2, 'conf_2', (), device=device, dtype=dtype)
    height, width = points_grid.shape[:2]
    if tuple(confidence.shape) != (height, width):
        raise ValueError(f'conf_2 has shape {tuple(confidence.shape)}, pts3d_2_in_1 has '
                         f'{tuple(points_grid.shape)}')
    f64 = dict(dtype=torch.float64, device=device)
    focal_known = K_2 is not None
    if focal_known:
        K = _as_matrix(K_2, 'K_2', (3, 3), device)
        K_ok = torch.isfinite(K).all() & (K[0, 0] > 0) & (K[1, 1] > 0)
        K_safe = torch.where(K_ok, K, torch.eye(3, **f64))
        norm_x, norm_y, cx, cy = K_safe[0, 0], K_safe[1, 1], K_safe[0, 2], K_safe[1, 2]
    else:
        if principal_point is None:
            principal_point = (width / 2, height / 2)
        K = _host_tensor(intrinsics_matrix(math.nan, math.nan, *principal_point), device)
        K_ok = torch.ones((), dtype=torch.bool, device=device)
        norm_x = norm_y = torch.full((), float(max(width, height)), **f64)
        cx, cy = K[0, 2], K[1, 2]
    generator = torch.Generator(device=device)
    generator.manual_seed(rng_seed)

    # 1. Confident, finite candidates: a uniform random subset of at most max_points (valid ones first).
    flat_points, flat_conf = points_grid.reshape(-1, 3), confidence.reshape(-1)
    finite = torch.isfinite(flat_points).all(-1) & torch.isfinite(flat_conf)
    num_finite = finite.sum()
    quantile = torch.nanquantile(torch.where(finite, flat_conf, torch.full_like(flat_conf, math.nan)),
                                 conf_quantile).double()
    threshold = torch.where(torch.isnan(quantile), torch.full_like(quantile, min_conf), quantile.clamp_min(min_conf))
    candidate = finite & (flat_conf >= threshold.to(dtype))
    slots = min(int(max_points), height * width)
    # Uniform random subset without a host sync: the first `slots` candidates of a random permutation, scattered
    # to their rank (slot `slots` collects the rest); unfilled slots are invalid.
    permutation = torch.randperm(height * width, generator=generator, device=device)
    permuted_candidate = candidate[permutation]
    rank = torch.cumsum(permuted_candidate.long(), 0) - 1
    target = torch.where(permuted_candidate & (rank < slots), rank, torch.full_like(rank, slots))
    order = torch.zeros(slots + 1, dtype=torch.long, device=device).scatter_(0, target, permutation)[:slots]
    num_candidates = candidate.sum().clamp_max(slots)
    valid = torch.arange(slots, device=device) < num_candidates
    points = torch.where(valid[:, None], flat_points[order], torch.zeros_like(flat_points[order]))
    columns, rows = order % width, torch.div(order, width, rounding_mode='floor')
    pixels = torch.stack([columns, rows], -1).to(dtype)
    centred_pixels = pixels - torch.stack([cx, cy]).to(dtype)
    weights = torch.where(valid, flat_conf[order], torch.zeros_like(flat_conf[order]))
    degenerate = _is_degenerate(points, valid) | _is_degenerate(pixels, valid)

    # 2. Hypotheses: exact 6-point DLT in conditioned coordinates, all scored at once (truncated squared error).
    valid64 = valid.double()
    count64 = valid64.sum().clamp_min(1.0)
    mean = (points.double() * valid64[:, None]).sum(0) / count64
    spread = (((points.double() - mean) ** 2).sum(-1) * valid64).sum() / count64
    sigma = (spread / 3.0).sqrt().clamp_min(1e-12)
    conditioned = ((points.double() - mean) / sigma) * valid64[:, None]
    x_norm = centred_pixels[:, 0].double() / norm_x
    y_norm = centred_pixels[:, 1].double() / norm_y
    # P acts on conditioned points: P [X; 1] = P_c [(X - mean) / sigma; 1]  ->  P = P_c @ T_cond.
    T_cond = torch.eye(4, **f64) / sigma
    T_cond[:3, 3] = -mean / sigma
    T_cond[3, 3] = 1.0
    scoring = min(slots, _SCORING_POINTS)
    score_points, score_pixels, score_valid = points[:scoring], centred_pixels[:scoring], valid[:scoring]
    threshold_sq = float(reprojection_error_px) ** 2
    num_hypotheses = max(1, int(iterations)) * _HYPOTHESES_PER_ITERATION
    best_cost = torch.full((), math.inf, **f64)
    best_R, best_t, best_focal = torch.eye(3, **f64), torch.zeros(3, **f64), torch.ones((), **f64)
    for start in range(0, num_hypotheses, _HYPOTHESIS_CHUNK):
        batch = min(_HYPOTHESIS_CHUNK, num_hypotheses - start)
        draw = torch.rand(batch, _MIN_PNP_POINTS, generator=generator, device=device, dtype=torch.float64)
        sample = (draw * count64).long().clamp(0, slots - 1)
        P = _minimal_dlt(conditioned[sample], x_norm[sample], y_norm[sample]) @ T_cond
        R, t, focal = _decompose_projection(P, focal_known)
        squared = _reprojection_errors(score_points, score_pixels, R, t, focal * norm_x, focal * norm_y)
        truncated = torch.where(score_valid, squared.clamp_max(threshold_sq), torch.zeros_like(squared))
        cost = truncated.sum(-1).double() + threshold_sq * (~score_valid).sum()
        finite_hypothesis = torch.isfinite(R).all(-1).all(-1) & torch.isfinite(t).all(-1) & torch.isfinite(focal)
        cost = torch.where(finite_hypothesis, cost, torch.full_like(cost, math.inf))
        index = torch.argmin(cost).reshape(1)  # a tensor index (indexing with a 0-d tensor would sync)
        chunk_cost = cost.index_select(0, index)[0]
        better = chunk_cost < best_cost
        best_cost = torch.where(better, chunk_cost, best_cost)
        best_R = torch.where(better, R.index_select(0, index)[0], best_R)
        best_t = torch.where(better, t.index_select(0, index)[0], best_t)
        best_focal = torch.where(better, focal.index_select(0, index)[0], best_focal)

    def inliers_of(R: torch.Tensor, t: torch.Tensor, focal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        squared = _reprojection_errors(points, centred_pixels, R, t, focal * norm_x, focal * norm_y)
        return valid & (squared < threshold_sq), squared

    inliers, _ = inliers_of(best_R, best_t, best_focal)
    hypothesis_found = torch.isfinite(best_cost) & (inliers.sum() >= _MIN_PNP_POINTS)

    # 3. Confidence-weighted robust refinement on the inliers, inliers recomputed between passes.
    R, t, focal = best_R, best_t, best_focal
    for number, refinement_iterations in enumerate(_REFINEMENT_ITERATIONS):
        used = slots if number == len(_REFINEMENT_ITERATIONS) - 1 else min(slots, _REFINEMENT_SUBSET)
        R, t, focal = _refine_pose(points[:used], centred_pixels[:used],
                                   torch.where(inliers, weights, torch.zeros_like(weights))[:used],
                                   R, t, focal, norm_x, norm_y, not focal_known, refinement_iterations)
        inliers, squared = inliers_of(R, t, focal)

    num_inliers = inliers.sum()
    rmse = (torch.where(inliers, squared, torch.zeros_like(squared)).sum().double()
            / num_inliers.clamp_min(1)).sqrt()
    rmse = torch.where(num_inliers > 0, rmse, torch.full_like(rmse, math.nan))
    if focal_known:
        K_used = K
    else:
        K_used = K.clone()
        K_used[0, 0] = K_used[1, 1] = focal * norm_x
    enough_inliers = (num_inliers >= _MIN_PNP_POINTS) & \
        (num_inliers.double() >= min_inlier_fraction * num_candidates.double())
    status = torch.full((), POSE_OK, dtype=torch.int64, device=device)
    for failed, code in ((~enough_inliers, POSE_FEW_INLIERS), (~hypothesis_found, POSE_NO_HYPOTHESIS),
                         (degenerate, POSE_COLLINEAR), (num_candidates < _MIN_PNP_POINTS, POSE_FEW_CONFIDENT),
                         (num_finite < _MIN_PNP_POINTS, POSE_FEW_FINITE), (~K_ok, POSE_BAD_K)):
        status = torch.where(failed, torch.full_like(status, code), status)
    success = status == POSE_OK
    T_2_1 = torch.eye(4, **f64)
    T_2_1[:3, :3], T_2_1[:3, 3] = R, t
    T_1_2 = torch.where(success, invert_pose(T_2_1), torch.eye(4, **f64))
    early_failure = status >= POSE_COLLINEAR  # nothing was estimated: report the given K (NaN focal if none)
    K_used = torch.where(early_failure, K, K_used)
    return RelativePoseTensors(
        T_1_2=T_1_2, K_2=K_used, focal_2=K_used[0, 0], num_inliers=torch.where(early_failure, 0, num_inliers),
        num_candidates=num_candidates, reprojection_rmse_px=torch.where(early_failure, math.nan, rmse),
        success=success, status=status, num_finite=num_finite, confidence_threshold=threshold,
        focal_known=focal_known)


def estimate_relative_pose(pts3d_2_in_1: Any, conf_2: Any, K_2: Any = None, *,
                           principal_point: tuple[float, float] | None = None,
                           min_conf: float = 1.0, conf_quantile: float = 0.3, max_points: int = 5000,
                           reprojection_error_px: float = 5.0, iterations: int = 100,
                           min_inlier_fraction: float = 0.25, rng_seed: int = 0) -> RelativePose:
    """Pose of camera 2 in camera 1's frame from view 2's point map in frame 1 (PnP), on the input's device.

    ``pts3d_2_in_1`` (H,W,3): view 2's pixels in frame 1; ``conf_2`` (H,W) their confidence; ``K_2`` (3,3) or
    None. Tensors on any device or numpy (CPU).

    1. Candidates: finite points with ``conf >= max(min_conf, quantile(conf, conf_quantile))``; at most
       ``max_points`` of them, a uniform random subset drawn with a ``torch.Generator`` on the device seeded
       with ``rng_seed`` (deterministic per device).
    2. RANSAC, batched: ``8 * iterations`` minimal hypotheses, each the exact linear (DLT) camera of 6 random
       candidates in conditioned coordinates; with ``K_2`` the normalised camera gives [R|t], without it the
       camera ``diag(f, f, 1)[R|t]`` gives the focal too (principal point ``principal_point``, default
       (W/2, H/2)); the rotation is the polar factor. All hypotheses are scored at once on up to 384
       candidates by the truncated squared reprojection error (threshold ``reprojection_error_px``).
    3. The best one's inliers: confidence-weighted robust Levenberg–Marquardt (Cauchy loss) of the pose (and the
       focal when unknown), inliers recomputed, three passes.

    Success needs at least ``min_inlier_fraction`` of the candidates (and 6 points) within the threshold at the
    end. Never raises on degenerate input (too few confident points, non-finite values, points on a line): the
    result then has ``success=False``, the identity pose and a message. Raises ValueError only for wrong shapes.
    The whole computation stays on the device (:func:`relative_pose`); the result is copied to the host once.
    """
    return relative_pose(pts3d_2_in_1, conf_2, K_2, principal_point=principal_point, min_conf=min_conf,
                         conf_quantile=conf_quantile, max_points=max_points,
                         reprojection_error_px=reprojection_error_px, iterations=iterations,
                         min_inlier_fraction=min_inlier_fraction, rng_seed=rng_seed).to_numpy()


# ---------------------------------------------------------------------------------------------------- frames, depth
def points_in_frame(pts3d: Any, T_frame_from_1: Any) -> Any:
    """(H,W,3) points in frame 1 -> the same points in another frame; ``T_frame_from_1`` (4,4) maps frame-1
    coordinates to that frame's (``X_f = R X_1 + t``; for camera v that is ``inv(T_1_v)``). A tensor input gives
    a tensor on its device (its dtype; half precisions widened to float32); numpy gives float64 numpy."""
    if isinstance(pts3d, torch.Tensor):
        wide = pts3d.dtype in (torch.float32, torch.float64)
        points = _as_tensor(pts3d, 'pts3d', (3,), dtype=pts3d.dtype if wide else torch.float32)
        T = _as_matrix(T_frame_from_1, 'T_frame_from_1', (4, 4), points.device).to(points.dtype)
        return points @ T[:3, :3].T + T[:3, 3]
    points = np.asarray(pts3d, dtype=np.float64)
    if points.ndim == 4 and points.shape[0] == 1:
        points = points[0]
    if points.ndim != 3 or points.shape[2] != 3:
        raise ValueError(f'pts3d must have shape HxWx3, got {points.shape}')
    T = _as_pose(T_frame_from_1, 'T_frame_from_1')
    return points @ T[:3, :3].T + T[:3, 3]


def depth_in_own_frame(pts3d_in_1: Any, T_1_v: Any) -> Any:
    """(H,W) depth (z in camera v's frame) of view v's points given in frame 1, with ``T_1_v`` the pose of
    camera v in frame 1. NaN where z <= 0 or not finite. Tensor in, tensor out (same device); numpy otherwise."""
    if isinstance(pts3d_in_1, torch.Tensor):
        T = _as_matrix(T_1_v, 'T_1_v', (4, 4), pts3d_in_1.device)
        depth = points_in_frame(pts3d_in_1, invert_pose(T))[..., 2]
        return torch.where(torch.isfinite(depth) & (depth > 0), depth, torch.full_like(depth, math.nan))
    depth = points_in_frame(pts3d_in_1, invert_pose(T_1_v))[..., 2]
    return np.where(np.isfinite(depth) & (depth > 0), depth, np.nan)


# ---------------------------------------------------------------------------------------------------- metric scale
def stereo_baseline_from_projection(P_right: Any) -> float | None:
    """Baseline in metres from a right camera's projection matrix (3,4) or its 12 values (row-major), per the
    ROS CameraInfo convention ``P[0, 3] = -fx * B``: ``B = -P[0, 3] / P[0, 0]`` (positive for the right
    camera of a rig). None if ``P[0, 3] == 0`` (a left/mono camera) or P is invalid."""
    try:
        P = np.asarray(P_right, dtype=np.float64).reshape(3, 4)
    except (TypeError, ValueError):
        return None
    fx, fx_baseline = P[0, 0], P[0, 3]
    if not (np.isfinite(fx) and np.isfinite(fx_baseline)) or fx <= 0 or fx_baseline == 0:
        return None
    return float(-fx_baseline / fx)


def metric_scale_from_baseline(T_1_2: Any, baseline_m: float) -> float:
    """Factor that turns DUSt3R's units into metres: ``baseline_m / |t|`` of the estimated ``T_1_2`` (4,4).

    Raises ValueError if ``baseline_m`` is not positive and finite, or ``|t|`` is about 0 (no translation to
    scale by)."""
    T = _as_pose(T_1_2, 'T_1_2')
    if not (np.isfinite(baseline_m) and baseline_m > 0):
        raise ValueError(f'baseline must be positive and finite, got {baseline_m}')
    translation_norm = float(np.linalg.norm(T[:3, 3]))
    if not (np.isfinite(translation_norm) and translation_norm > 1e-9):
        raise ValueError(f'the estimated translation is ~0 (|t| = {translation_norm:.3g}): '
                         'cannot derive a metric scale from the baseline')
    return float(baseline_m / translation_norm)


# ---------------------------------------------------------------------------------------------------- stereo rig
@dataclass(frozen=True)
class StereoRigScale:
    """Result of :func:`estimate_stereo_rig_scale` (host values).

    - ``scale``: metres per model unit (NaN when ``success`` is False);
    - ``T_1_2`` (4,4): pose of the right camera in the left frame, in MODEL units: ``R = I``,
      ``t = (B / scale, 0, 0)`` (identity when ``success`` is False); ``baseline_m``: B;
    - ``num_pixels``: view-2 pixels that agree with the fit (within ``inlier_threshold_px`` of disparity);
      ``num_candidates``: confident, finite pixels in front of camera 1 that entered the fit;
    - ``disparity_rmse_px``: RMS disparity residual of those pixels; ``vertical_rmse_px``: their RMS row error
      ``v - cy - fy y / z`` (rectification / geometry check, independent of the scale);
    - ``spread``: robust relative spread of the per-pixel scales around the fit (1.4826 x weighted MAD / value).
    """

    scale: float
    T_1_2: np.ndarray
    baseline_m: float
    num_pixels: int
    num_candidates: int
    disparity_rmse_px: float
    vertical_rmse_px: float
    spread: float
    success: bool
    message: str


@dataclass(frozen=True)
class StereoRigScaleTensors:
    """Device-resident result of :func:`stereo_rig_scale`: ``scale`` (), ``T_1_2`` (4,4), ``num_pixels`` () int64,
    ``num_candidates`` () int64, ``disparity_rmse_px`` (), ``vertical_rmse_px`` (), ``spread`` (), ``success``
    () bool; float64 on the input's device. :meth:`to_numpy` copies it once."""

    scale: torch.Tensor
    T_1_2: torch.Tensor
    baseline_m: float
    num_pixels: torch.Tensor
    num_candidates: torch.Tensor
    disparity_rmse_px: torch.Tensor
    vertical_rmse_px: torch.Tensor
    spread: torch.Tensor
    success: torch.Tensor

    def to_numpy(self) -> StereoRigScale:
        packed = torch.cat([self.T_1_2.reshape(-1), torch.stack([
            self.scale, self.num_pixels.double(), self.num_candidates.double(), self.disparity_rmse_px,
            self.vertical_rmse_px, self.spread, self.success.double()])]).cpu().numpy()
        T_1_2 = packed[:16].reshape(4, 4).copy()
        scale, pixels, candidates, rmse, vertical, spread, success = packed[16:].tolist()
        pixels, candidates, success = int(pixels), int(candidates), bool(success)
        if success:
            message = (f'stereo rig: scale {scale:.4g} m/unit from {pixels}/{candidates} pixels, disparity RMSE '
                       f'{rmse:.3g} px, spread {100 * spread:.3g} %, row RMSE {vertical:.3g} px')
        elif candidates < _RIG_MIN_PIXELS:
            message = (f'stereo rig: only {candidates} confident pixels of view 2 in front of camera 1 '
                       f'(need {_RIG_MIN_PIXELS})')
        else:
            message = (f'stereo rig: no consistent scale (scale {scale:.4g}, {pixels}/{candidates} pixels agree): '
                       'the point map does not place view 2 to the right of view 1 by the baseline')
        return StereoRigScale(scale=scale, T_1_2=T_1_2, baseline_m=self.baseline_m, num_pixels=pixels,
                              num_candidates=candidates, disparity_rmse_px=rmse, vertical_rmse_px=vertical,
                              spread=spread, success=success, message=message)


def _weighted_median(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """() weighted median of (N,) values (weights >= 0; NaN when all weights are 0). No host synchronisation."""
    values = torch.where(weights > 0, values, torch.full_like(values, math.inf))
    order = torch.argsort(values)
    sorted_values, cumulative = values[order], torch.cumsum(weights[order], 0)
    total = cumulative[-1]
    index = (cumulative < 0.5 * total).sum().clamp_max(values.numel() - 1).reshape(1)
    median = sorted_values.index_select(0, index)[0]
    return torch.where(total > 0, median, torch.full_like(median, math.nan))


def stereo_rig_scale(pts3d_2_in_1: Any, conf_2: Any, K_2: Any, baseline_m: float, *, min_conf: float = 1.0,
                     conf_quantile: float = 0.3, inlier_threshold_px: float = 3.0,
                     min_inlier_fraction: float = 0.25) -> StereoRigScaleTensors:
    """Tensor core of :func:`estimate_stereo_rig_scale` (same arguments), on the input's device, no host
    synchronisation."""
    points = _as_tensor(pts3d_2_in_1, 'pts3d_2_in_1', (3,))
    device, dtype = points.device, points.dtype
    confidence = _as_tensor(conf_2, 'conf_2', (), device=device, dtype=dtype)
    height, width = points.shape[:2]
    if tuple(confidence.shape) != (height, width):
        raise ValueError(f'conf_2 has shape {tuple(confidence.shape)}, pts3d_2_in_1 has {tuple(points.shape)}')
    baseline_m = float(baseline_m)
    if not (math.isfinite(baseline_m) and baseline_m > 0):
        raise ValueError(f'baseline_m must be positive and finite, got {baseline_m}')
    K = _as_matrix(K_2, 'K_2', (3, 3), device)
    fx, fy, cx, cy = (K[0, 0].to(dtype), K[1, 1].to(dtype), K[0, 2].to(dtype), K[1, 2].to(dtype))
    f64 = dict(dtype=torch.float64, device=device)

    X, Y, Z = points.reshape(-1, 3).unbind(-1)
    flat_conf = confidence.reshape(-1)
    pixels = _pixel_grid_tensor(height, width, device, dtype).reshape(-1, 2)
    finite = torch.isfinite(points.reshape(-1, 3)).all(-1) & torch.isfinite(flat_conf) & (Z > 0)
    quantile = torch.nanquantile(torch.where(finite, flat_conf, torch.full_like(flat_conf, math.nan)),
                                 conf_quantile).double()
    threshold = torch.where(torch.isnan(quantile), torch.full_like(quantile, min_conf), quantile.clamp_min(min_conf))
    candidate = finite & (flat_conf >= threshold.to(dtype)) & torch.isfinite(K).all() & (K[0, 0] > 0)
    Z_safe = torch.where(candidate, Z, torch.ones_like(Z))
    # Right camera at (B,0,0) m in the left frame; a model point X is s X metres: the pixel column of view 2 is
    # u = cx + fx (s X - B) / (s Z), i.e. the residual r = a w - d is LINEAR in w = 1/s, with the disparity
    # d = cx + fx X / Z - u (pixels, from the point map) and a = fx B / Z (pixels per unit of w).
    a = torch.where(candidate, fx * baseline_m / Z_safe, torch.zeros_like(Z))
    d = torch.where(candidate, cx + fx * X / Z_safe - pixels[:, 0], torch.zeros_like(Z))
    vertical = torch.where(candidate, cy + fy * Y / Z_safe - pixels[:, 1], torch.zeros_like(Z))
    conf_weight = torch.where(candidate, flat_conf, torch.zeros_like(flat_conf)).double()
    a64, d64 = a.double(), d.double()
    # Start: weighted median of the per-pixel w = d / a (weights c a^2: the pixel-domain precision).
    per_pixel = d64 / torch.where(candidate, a64, torch.ones_like(a64))
    w = _weighted_median(per_pixel, conf_weight * a64 * a64)
    for iteration in range(_RIG_ITERATIONS):  # IRLS, Cauchy loss on the disparity residual, scale from the MAD
        residual = a64 * w - d64
        if iteration % _RIG_SCALE_EVERY == 0:   # the MAD (a sort) only every few iterations
            sigma = 1.4826 * _weighted_median(residual.abs(), conf_weight)
            c = (_CAUCHY_C * sigma).clamp_min(1e-3)
        irls = conf_weight / (1.0 + (residual / c) ** 2)
        w = (irls * a64 * d64).sum() / (irls * a64 * a64).sum().clamp_min(1e-300)
    residual = a64 * w - d64
    inliers = candidate & (residual.abs() < inlier_threshold_px)
    num_pixels, num_candidates = inliers.sum(), candidate.sum()
    inlier_weight = inliers.double()
    count = inlier_weight.sum().clamp_min(1.0)
    disparity_rmse = ((residual ** 2 * inlier_weight).sum() / count).sqrt()
    vertical_rmse = ((vertical.double() ** 2 * inlier_weight).sum() / count).sqrt()
    spread = 1.4826 * _weighted_median((per_pixel - w).abs(), conf_weight * a64 * a64 * inlier_weight) / w.abs()
    success = torch.isfinite(w) & (w > 0) & (num_pixels >= _RIG_MIN_PIXELS) & \
        (num_pixels.double() >= min_inlier_fraction * num_candidates.double())
    scale = torch.where(success, 1.0 / w, torch.full_like(w, math.nan))
    T_1_2 = torch.eye(4, **f64)
    T_1_2[0, 3] = torch.where(success, w * baseline_m, torch.zeros_like(w))
    return StereoRigScaleTensors(scale=scale, T_1_2=T_1_2, baseline_m=baseline_m, num_pixels=num_pixels,
                                 num_candidates=num_candidates, disparity_rmse_px=disparity_rmse,
                                 vertical_rmse_px=vertical_rmse, spread=spread, success=success)


def estimate_stereo_rig_scale(pts3d_2_in_1: Any, conf_2: Any, K_2: Any, baseline_m: float, *,
                              min_conf: float = 1.0, conf_quantile: float = 0.3, inlier_threshold_px: float = 3.0,
                              min_inlier_fraction: float = 0.25) -> StereoRigScale:
    """Metric scale and relative pose of a calibrated, rectified stereo rig, without PnP.

    The rig's calibration fixes the pose of the right camera (view 2) in the left frame (view 1): ``R = I``,
    ``t = (B, 0, 0)`` metres (right ``P[0, 3] = -fx B``); only the scale ``s`` (metres per model unit) of the point
    map is unknown. For every confident pixel (u, v) of view 2 with model point ``X`` (in frame 1,
    ``pts3d_2_in_1`` (H,W,3), confidence ``conf_2`` (H,W)), ``K_2`` (3,3) (view 2 at model resolution) must map
    ``s X - t`` onto it: ``(u - cx) s Z = fx (s X_x - B)``. With ``w = 1/s`` this is linear in pixels:
    ``r = (fx B / Z) w - d``, ``d = cx + fx X_x / Z - u`` the disparity the point map predicts, so the fit is a
    1-D robust least squares in the natural noise domain (far points, with a tiny ``fx B / Z``, weigh little; no
    near-zero denominator is ever divided by): a confidence-weighted median start, then IRLS with a Cauchy loss
    scaled by the MAD. Candidates: finite points in front of camera 1 with ``conf >= max(min_conf,
    quantile(conf, conf_quantile))``. Success needs a positive finite scale and at least ``min_inlier_fraction``
    of the candidates (and 16 pixels) within ``inlier_threshold_px`` of it.

    Returns :class:`StereoRigScale` (pose in model units, ``t = (B / s, 0, 0)``, and quality figures). Raises
    ValueError for wrong shapes or a non-positive baseline; degenerate input gives ``success=False``.
    """
    return stereo_rig_scale(pts3d_2_in_1, conf_2, K_2, baseline_m, min_conf=min_conf, conf_quantile=conf_quantile,
                            inlier_threshold_px=inlier_threshold_px,
                            min_inlier_fraction=min_inlier_fraction).to_numpy()


def is_rectified_stereo_rig(K_left: Any, K_right: Any, P_right: Any, tolerance: float = 1e-6) -> bool:
    """True when two CameraInfo calibrations describe a rectified stereo rig whose right camera sits at
    ``(B, 0, 0)`` in the left frame: the right ``P`` (3,4) has ``P[0, 3] = -fx B`` with B > 0 and no other
    translation (``P[1, 3] = P[2, 3] = 0``), and both rectified intrinsics (the ``P[:3, :3]`` the images are
    rectified to, ``K_left``/``K_right``) agree. The rectification rotations (CameraInfo ``R``) are not needed:
    they map the raw cameras to the rectified ones the images already are in."""
    try:
        P = np.asarray(P_right, dtype=np.float64).reshape(3, 4)
        K_l = np.asarray(K_left, dtype=np.float64).reshape(3, 3)
        K_r = np.asarray(K_right, dtype=np.float64).reshape(3, 3)
    except (TypeError, ValueError):
        return False
    if stereo_baseline_from_projection(P) is None or P[0, 3] >= 0:
        return False
    if not (np.isfinite(K_l).all() and np.isfinite(K_r).all()):
        return False
    scale = max(abs(P[0, 0]), 1.0)
    return bool(abs(P[1, 3]) <= tolerance * scale and abs(P[2, 3]) <= tolerance
                and np.allclose(K_l, K_r, rtol=tolerance, atol=tolerance * scale))
