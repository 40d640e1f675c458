"""Cameras from one DUSt3R forward pass: focal, relative pose, depth and metric scale.

Frames are REP 103 optical frames (x right, y down, z forward). DUSt3R returns, for a pair (view 1, view 2):

- ``pts3d_1`` (H,W,3): the 3-D point of each pixel of view 1, in view 1's frame;
- ``pts3d_2`` (H,W,3): the 3-D point of each pixel of view 2, also in view 1's frame;
- ``conf_1``, ``conf_2`` (H,W): confidences, >= 1.

Pixel convention: OpenCV/ROS, pixel (row i, column j) is at image coordinates (x, y) = (j, i).
A pose ``T_a_b`` (4,4) is the pose of frame b in frame a: ``X_a = R X_b + t``.

Inputs may be numpy arrays or torch tensors (converted to float64 numpy; a leading batch axis of size 1 is
dropped). Outputs are numpy float64.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from scipy.spatial.transform import Rotation

_log = logging.getLogger(__name__)

# DUSt3R's reference focal: that of a 60 degree field of view over the long image side.
_HALF_FOV_REFERENCE_RAD = np.deg2rad(30.0)
# Fewest correspondences accepted for PnP (OpenCV's RANSAC draws 4 or 5 per hypothesis).
_MIN_PNP_POINTS = 6
# Tentative focals of the focal search, in units of the long image side (as DUSt3R's fast_pnp).
_FOCAL_SEARCH = np.geomspace(0.5, 3.0, 21)
# Rounds of (Weiszfeld focal in frame 2, PnP with that focal) after the focal search.
_FOCAL_REFINEMENT_ROUNDS = 3
# Smallest scale (pixels) of the robust loss of the final refinement, and its iteration limit.
_MIN_LOSS_SCALE_PX = 1e-3
_REFINEMENT_ITERATIONS = 50
# Ratio of the smallest to the largest spread below which points count as lying on a line.
_COLLINEAR_RATIO = 1e-6


def _to_numpy(array: Any, name: str, trailing_shape: tuple[int, ...]) -> np.ndarray:
    """numpy or torch -> float64 numpy of shape (H,W)+trailing_shape (a leading batch axis of 1 is dropped)."""
    if hasattr(array, 'detach'):
        array = array.detach().cpu().numpy()
    array = np.asarray(array, dtype=np.float64)
    expected_ndim = 2 + len(trailing_shape)
    if array.ndim == expected_ndim + 1 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != expected_ndim or array.shape[2:] != trailing_shape:
        wanted = 'x'.join(['H', 'W'] + [str(s) for s in trailing_shape])
        raise ValueError(f'{name} must have shape {wanted} (optionally with a leading batch axis of 1), '
                         f'got {array.shape}')
    return array


def _as_pose(T: Any, name: str) -> np.ndarray:
    if hasattr(T, 'detach'):
        T = T.detach().cpu().numpy()
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4):
        raise ValueError(f'{name} must be a 4x4 homogeneous transform, got shape {T.shape}')
    return T


def invert_pose(T_a_b: np.ndarray) -> np.ndarray:
    """Inverse of a rigid transform: (4,4) T_a_b -> T_b_a."""
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


def _weiszfeld_focal(xy_over_z: np.ndarray, centred_pixels: np.ndarray, iterations: int) -> float:
    """argmin_f sum |centred_pixel - f * xy_over_z| over (N,2) arrays: L2 start, then IRLS (DUSt3R's rule)."""
    dot_xy_pixel = np.sum(xy_over_z * centred_pixels, axis=-1)
    dot_xy_xy = np.sum(xy_over_z * xy_over_z, axis=-1)
    if not np.sum(dot_xy_xy) > 0:
        raise ValueError('no usable point to estimate the focal (all x/z, y/z are zero or not finite)')
    focal = np.sum(dot_xy_pixel) / np.sum(dot_xy_xy)
    for _ in range(iterations):
        distance = np.linalg.norm(centred_pixels - focal * xy_over_z, axis=-1)
        weight = 1.0 / np.clip(distance, 1e-8, None)
        focal = np.sum(weight * dot_xy_pixel) / np.sum(weight * dot_xy_xy)
    return float(focal)


def estimate_focal_weiszfeld(pts3d: Any, principal_point: tuple[float, float] | None = None,
                             iterations: int = 10, *, min_focal: float = 0.0, max_focal: float = np.inf) -> float:
    """Focal (pixels) of a camera from its point map ``pts3d`` (H,W,3) in its own frame, as DUSt3R's
    ``estimate_focal_knowing_depth(focal_mode='weiszfeld')``.

    Minimises ``sum |pixel - pp - f * (x, y) / z|`` over f: closed-form least-squares start, then
    ``iterations`` re-weighted least-squares steps with weights ``1 / max(distance, 1e-8)``. ``principal_point``
    defaults to (W/2, H/2). Points whose x/z or y/z is not finite contribute 0 for that coordinate (as DUSt3R's
    ``nan_to_num``). The result is clipped to ``[min_focal, max_focal] * max(H, W) / (2 tan 30 deg)``.
    Raises ValueError when no point is usable.
    """
    points = _to_numpy(pts3d, 'pts3d', (3,))
    height, width = points.shape[:2]
    if principal_point is None:
        principal_point = (width / 2, height / 2)
    points = points.reshape(-1, 3)
    with np.errstate(divide='ignore', invalid='ignore'):
        xy_over_z = points[:, :2] / points[:, 2:3]
    xy_over_z = np.nan_to_num(xy_over_z, nan=0.0, posinf=0.0, neginf=0.0)
    # Points with x/z = y/z = 0 add nothing to either sum below: leave them out (same result, faster).
    contributing = np.flatnonzero(np.any(xy_over_z != 0.0, axis=-1))
    xy_over_z = xy_over_z[contributing]
    rows, cols = np.divmod(contributing, width)
    centred_pixels = np.stack([cols, rows], axis=-1) - np.asarray(principal_point, dtype=np.float64)

    focal = _weiszfeld_focal(xy_over_z, centred_pixels, iterations)
    focal_base = reference_focal(height, width)
    return float(np.clip(focal, min_focal * focal_base, max_focal * focal_base))


@dataclass(frozen=True)
class RelativePose:
    """Result of :func:`estimate_relative_pose`.

    - ``T_1_2`` (4,4): pose of camera 2 in camera 1's frame (``X_1 = R X_2 + t``), in DUSt3R's units;
      identity when ``success`` is False.
    - ``focal_2``: focal of camera 2 in pixels (``K_2[0, 0]`` when K_2 was given; estimated otherwise,
      NaN if that failed); ``K_2`` (3,3): the camera matrix used for view 2.
    - ``num_candidates``: confident, finite points given to PnP (after subsampling); ``num_inliers``: those
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


@dataclass
class _PnPSolution:
    rotvec: np.ndarray  # (3,) camera 2 <- frame 1
    translation: np.ndarray  # (3,)
    focal: float
    inliers: np.ndarray  # (N,) bool over the candidates


def _project(points_1: np.ndarray, rotation_2_1: np.ndarray, translation_2_1: np.ndarray,
             K: np.ndarray) -> np.ndarray:
    """(N,3) points in frame 1 -> (N,2) pixels of camera 2; NaN behind the camera."""
    points_2 = points_1 @ rotation_2_1.T + translation_2_1
    z = points_2[:, 2:3]
    with np.errstate(divide='ignore', invalid='ignore'):
        normalised = np.where(z > 0, points_2[:, :2] / z, np.nan)
    return normalised @ K[:2, :2].T + K[:2, 2]


def _reprojection_errors(points: np.ndarray, pixels: np.ndarray, rotvec: np.ndarray, translation: np.ndarray,
                         K: np.ndarray) -> np.ndarray:
    """(N,) pixel distance between the projections of ``points`` and ``pixels``; inf behind the camera."""
    projected = _project(points, Rotation.from_rotvec(rotvec).as_matrix(), translation, K)
    errors = np.linalg.norm(projected - pixels, axis=-1)
    return np.where(np.isfinite(errors), errors, np.inf)


def _with_focal(K: np.ndarray, focal: float) -> np.ndarray:
    K = K.copy()
    K[0, 0] = K[1, 1] = focal
    return K


def _ransac_pnp(points: np.ndarray, pixels: np.ndarray, K: np.ndarray, reprojection_error_px: float,
                iterations: int) -> _PnPSolution | None:
    """OpenCV's PnP-RANSAC (SQPNP); None if it fails."""
    try:
        found, rotvec, translation, inlier_indices = cv2.solvePnPRansac(
            points, pixels, K, None, iterationsCount=iterations, reprojectionError=reprojection_error_px,
            confidence=0.999, flags=cv2.SOLVEPNP_SQPNP)
    except cv2.error as exc:
        _log.debug('solvePnPRansac failed: %s', exc)
        return None
    if not found or inlier_indices is None or len(inlier_indices) < _MIN_PNP_POINTS:
        return None
    rotvec, translation = rotvec.reshape(3), translation.reshape(3)
    inliers = _reprojection_errors(points, pixels, rotvec, translation, K) < reprojection_error_px
    return _PnPSolution(rotvec=rotvec, translation=translation, focal=float(K[0, 0]), inliers=inliers)


def _search_focal(points: np.ndarray, pixels: np.ndarray, K_centre: np.ndarray, image_size: int,
                  reprojection_error_px: float, iterations: int) -> _PnPSolution | None:
    """PnP-RANSAC over DUSt3R's tentative focals; the solution with the most inliers."""
    best: _PnPSolution | None = None
    for focal in _FOCAL_SEARCH * image_size:
        solution = _ransac_pnp(points, pixels, _with_focal(K_centre, focal), reprojection_error_px, iterations)
        if solution is not None and (best is None or solution.inliers.sum() > best.inliers.sum()):
            best = solution
    return best


def _weiszfeld_focal_in_frame_2(points: np.ndarray, pixels: np.ndarray, solution: _PnPSolution,
                                principal_point: tuple[float, float]) -> float:
    """Weiszfeld focal of view 2 (as :func:`estimate_focal_weiszfeld`) from its inliers moved into frame 2."""
    rotation = Rotation.from_rotvec(solution.rotvec).as_matrix()
    inlier_points = points[solution.inliers] @ rotation.T + solution.translation
    with np.errstate(divide='ignore', invalid='ignore'):
        xy_over_z = np.nan_to_num(inlier_points[:, :2] / inlier_points[:, 2:3], nan=0.0, posinf=0.0, neginf=0.0)
    centred_pixels = pixels[solution.inliers] - np.asarray(principal_point)
    return _weiszfeld_focal(xy_over_z, centred_pixels, iterations=10)


def _refine_weighted(points: np.ndarray, pixels: np.ndarray, weights: np.ndarray, solution: _PnPSolution,
                     K: np.ndarray, refine_focal: bool) -> _PnPSolution:
    """Confidence-weighted, robust Levenberg–Marquardt on the inliers' reprojection errors.

    Minimises ``sum_i w_i s^2 log(1 + e_i^2 / s^2)`` (Cauchy loss of the pixel error ``e_i``, weights ``w_i`` =
    confidences) over the pose (rotation as a left increment) and, when ``refine_focal``, the focal (as a
    log-scale factor), by iteratively re-weighted damped Gauss–Newton with an analytic Jacobian. The scale ``s``
    follows the median inlier error (at least ``_MIN_LOSS_SCALE_PX``), so that near-threshold outliers that
    RANSAC kept do not bias the result while the confident inliers dominate it.
    """
    mask = solution.inliers
    inlier_points, inlier_pixels = points[mask], pixels[mask]
    confidences = weights[mask] / np.mean(weights[mask])
    rotation = Rotation.from_rotvec(solution.rotvec).as_matrix()
    translation, focal = solution.translation.copy(), solution.focal
    num_params = 7 if refine_focal else 6

    def evaluate(rotation: np.ndarray, translation: np.ndarray, focal: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Camera-frame points (N,3), pixel errors (N,2) (NaN behind the camera) and the camera matrix."""
        K_current = _with_focal(K, focal) if refine_focal else K
        points_2 = inlier_points @ rotation.T + translation
        return points_2, _project(inlier_points, rotation, translation, K_current) - inlier_pixels, K_current

    def robust_cost(errors: np.ndarray, scale: float) -> float:
        squared = np.nan_to_num(np.sum(errors ** 2, axis=-1), nan=np.inf)
        return float(np.sum(confidences * scale ** 2 * np.log1p(squared / scale ** 2)))

    damping = 1e-3
    points_2, errors, K_current = evaluate(rotation, translation, focal)
    for _ in range(_REFINEMENT_ITERATIONS):
        squared = np.sum(errors ** 2, axis=-1)
        valid = np.isfinite(squared)
        if valid.sum() < _MIN_PNP_POINTS:
            break
        scale = max(float(np.median(np.sqrt(squared[valid]))), _MIN_LOSS_SCALE_PX)
        point_weights = np.where(valid, confidences / (1.0 + np.nan_to_num(squared) / scale ** 2), 0.0)

        # Jacobian of the pixel errors (N,2,P) w.r.t. (rotation increment, translation[, log focal]).
        x, y, z = (np.where(valid, c, 1.0) for c in points_2.T)
        d_pixel_d_point = np.zeros((len(x), 2, 3))
        d_pixel_d_point[:, 0, 0] = K_current[0, 0] / z
        d_pixel_d_point[:, 0, 2] = -K_current[0, 0] * x / z ** 2
        d_pixel_d_point[:, 1, 1] = K_current[1, 1] / z
        d_pixel_d_point[:, 1, 2] = -K_current[1, 1] * y / z ** 2
        rotated = inlier_points @ rotation.T
        skew = np.zeros((len(x), 3, 3))  # d(exp(w) R X)/dw at w = 0 is -[R X]_x
        skew[:, 0, 1], skew[:, 0, 2], skew[:, 1, 2] = rotated[:, 2], -rotated[:, 1], rotated[:, 0]
        skew[:, 1, 0], skew[:, 2, 0], skew[:, 2, 1] = -rotated[:, 2], rotated[:, 1], -rotated[:, 0]
        jacobian = np.zeros((len(x), 2, num_params))
        jacobian[:, :, :3] = d_pixel_d_point @ skew
        jacobian[:, :, 3:6] = d_pixel_d_point
        if refine_focal:
            jacobian[:, 0, 6] = K_current[0, 0] * x / z
            jacobian[:, 1, 6] = K_current[1, 1] * y / z
        residual = np.where(valid[:, None], errors, 0.0)
        weighted_jacobian = jacobian * point_weights[:, None, None]
        hessian = np.einsum('nip,niq->pq', weighted_jacobian, jacobian)
        gradient = np.einsum('nip,ni->p', weighted_jacobian, residual)

        cost = robust_cost(errors, scale)
        while True:
            damped = hessian + damping * np.diag(np.diag(hessian) + 1e-12)
            try:
                step = -np.linalg.solve(damped, gradient)
            except np.linalg.LinAlgError:
                step = np.zeros(num_params)
            new_rotation = Rotation.from_rotvec(step[:3]).as_matrix() @ rotation
            new_translation = translation + step[3:6]
            new_focal = focal * float(np.exp(step[6])) if refine_focal else focal
            new_points_2, new_errors, new_K = evaluate(new_rotation, new_translation, new_focal)
            new_cost = robust_cost(new_errors, scale)
            if new_cost <= cost or damping > 1e8:
                break
            damping *= 10.0
        if new_cost > cost:
            break
        rotation, translation, focal = new_rotation, new_translation, new_focal
        points_2, errors, K_current = new_points_2, new_errors, new_K
        damping = max(damping / 10.0, 1e-9)
        if np.max(np.abs(step)) < 1e-12 * (1.0 + np.linalg.norm(translation)):
            break
    return _PnPSolution(rotvec=Rotation.from_matrix(rotation).as_rotvec(), translation=translation,
                        focal=float(focal), inliers=mask)


def _spread_is_degenerate(values: np.ndarray) -> bool:
    """True if the (N,D) values lie on a line (or a point)."""
    singular_values = np.linalg.svd(values - values.mean(axis=0), compute_uv=False)
    return not singular_values[0] > 0 or singular_values[1] < _COLLINEAR_RATIO * singular_values[0]


def _failure(message: str, K_2: np.ndarray, num_candidates: int = 0) -> RelativePose:
    _log.debug('relative pose failed: %s', message)
    return RelativePose(T_1_2=np.eye(4), focal_2=float(K_2[0, 0]), K_2=K_2, num_inliers=0,
                        num_candidates=num_candidates, reprojection_rmse_px=float('nan'), success=False,
                        message=message)


def estimate_relative_pose(pts3d_2_in_1: Any, conf_2: Any, K_2: Any = None, *,
                           principal_point: tuple[float, float] | None = None,
                           min_conf: float = 1.0, conf_quantile: float = 0.3, max_points: int = 5000,
                           reprojection_error_px: float = 5.0, iterations: int = 100,
                           min_inlier_fraction: float = 0.25, rng_seed: int = 0) -> RelativePose:
    """Pose of camera 2 in camera 1's frame from view 2's point map in frame 1, by PnP.

    ``pts3d_2_in_1`` (H,W,3): view 2's pixels in frame 1; ``conf_2`` (H,W) their confidence.

    1. Candidates: finite points with ``conf >= max(min_conf, quantile(conf, conf_quantile))``; at most
       ``max_points`` of them, drawn with ``numpy.random.default_rng(rng_seed)``.
    2. PnP-RANSAC (OpenCV, SQPNP, ``iterations`` iterations, ``reprojection_error_px`` threshold) between the
       candidates' pixel coordinates and their 3-D points. Without ``K_2``: the focal is searched like DUSt3R's
       ``fast_pnp`` (tentative focals ``geomspace(S/2, 3S, 21)``, ``S = max(W, H)``, most inliers wins), then
       refined by Weiszfeld on the inliers moved into frame 2 (alternated with PnP), with the principal point
       ``principal_point`` (default (W/2, H/2)).
    3. Confidence-weighted robust Levenberg–Marquardt (Cauchy loss) on the inliers (pose, and focal when it is
       estimated); the inliers are then recomputed and, if they changed, the refinement is repeated once.

    Success needs at least ``min_inlier_fraction`` of the candidates (and 6 points) within the threshold at the
    end. Never raises on degenerate input (too few confident points, non-finite values, points on a line): the
    result then has ``success=False``, the identity pose and a message. Raises ValueError only for wrong shapes.
    """
    points_grid = _to_numpy(pts3d_2_in_1, 'pts3d_2_in_1', (3,))
    confidence = _to_numpy(conf_2, 'conf_2', ())
    height, width = points_grid.shape[:2]
    if confidence.shape != (height, width):
        raise ValueError(f'conf_2 has shape {confidence.shape}, pts3d_2_in_1 has {points_grid.shape}')
    focal_known = K_2 is not None
    if focal_known:
        K_2 = np.asarray(K_2.detach().cpu().numpy() if hasattr(K_2, 'detach') else K_2, dtype=np.float64)
        if K_2.shape != (3, 3):
            raise ValueError(f'K_2 must be 3x3, got shape {K_2.shape}')
        K = K_2
    else:
        if principal_point is None:
            principal_point = (width / 2, height / 2)
        K = intrinsics_matrix(np.nan, np.nan, *principal_point)
    if focal_known and not (np.all(np.isfinite(K)) and K[0, 0] > 0 and K[1, 1] > 0):
        return _failure(f'K_2 is not a valid camera matrix: {K.tolist()}', K)

    # 1. Confident, finite candidates.
    finite = np.all(np.isfinite(points_grid), axis=-1) & np.isfinite(confidence)
    if finite.sum() < _MIN_PNP_POINTS:
        return _failure(f'only {int(finite.sum())} finite points (need {_MIN_PNP_POINTS})', K)
    threshold = max(min_conf, float(np.quantile(confidence[finite], conf_quantile)))
    candidate_indices = np.flatnonzero(finite & (confidence >= threshold))
    if candidate_indices.size > max_points:
        rng = np.random.default_rng(rng_seed)
        candidate_indices = np.sort(rng.choice(candidate_indices, max_points, replace=False))
    num_candidates = int(candidate_indices.size)
    if num_candidates < _MIN_PNP_POINTS:
        return _failure(f'only {num_candidates} points with confidence >= {threshold:.3g} '
                        f'(need {_MIN_PNP_POINTS})', K, num_candidates)
    points = points_grid.reshape(-1, 3)[candidate_indices]
    pixels = pixel_grid(height, width).reshape(-1, 2)[candidate_indices]
    weights = confidence.reshape(-1)[candidate_indices]
    if _spread_is_degenerate(points) or _spread_is_degenerate(pixels):
        return _failure('the confident points (or their pixels) lie on a line', K, num_candidates)

    # 2. PnP-RANSAC, with the focal search and refinement when K_2 is unknown.
    if focal_known:
        solution = _ransac_pnp(points, pixels, K, reprojection_error_px, iterations)
    else:
        solution = _search_focal(points, pixels, K, max(width, height), reprojection_error_px, iterations)
        for _ in range(_FOCAL_REFINEMENT_ROUNDS):
            if solution is None:
                break
            try:
                focal = _weiszfeld_focal_in_frame_2(points, pixels, solution, (K[0, 2], K[1, 2]))
            except ValueError:
                break
            refined = _ransac_pnp(points, pixels, _with_focal(K, focal), reprojection_error_px, iterations)
            if refined is None:
                break
            solution = refined
    if solution is None:
        return _failure('PnP-RANSAC found no pose', K, num_candidates)

    # 3. Confidence-weighted refinement on the inliers.
    for _ in range(2):
        K_start = K if focal_known else _with_focal(K, solution.focal)
        solution = _refine_weighted(points, pixels, weights, solution, K_start, refine_focal=not focal_known)
        K_used = K if focal_known else _with_focal(K, solution.focal)
        errors = _reprojection_errors(points, pixels, solution.rotvec, solution.translation, K_used)
        inliers = errors < reprojection_error_px
        if np.array_equal(inliers, solution.inliers) or inliers.sum() < _MIN_PNP_POINTS:
            break
        solution.inliers = inliers

    num_inliers = int(inliers.sum())
    rmse = float(np.sqrt(np.mean(errors[inliers] ** 2))) if num_inliers else float('nan')
    T_2_1 = np.eye(4)
    T_2_1[:3, :3] = Rotation.from_rotvec(solution.rotvec).as_matrix()
    T_2_1[:3, 3] = solution.translation
    T_1_2 = invert_pose(T_2_1)
    focal_2 = float(K_used[0, 0])
    if num_inliers < max(_MIN_PNP_POINTS, min_inlier_fraction * num_candidates):
        return RelativePose(T_1_2=np.eye(4), focal_2=focal_2, K_2=K_used, num_inliers=num_inliers,
                            num_candidates=num_candidates, reprojection_rmse_px=rmse, success=False,
                            message=f'too few inliers: {num_inliers} of {num_candidates} candidates')
    message = (f'{num_inliers}/{num_candidates} inliers, RMSE {rmse:.3g} px'
               + ('' if focal_known else f', focal {focal_2:.2f} px'))
    return RelativePose(T_1_2=T_1_2, focal_2=focal_2, K_2=K_used, num_inliers=num_inliers,
                        num_candidates=num_candidates, reprojection_rmse_px=rmse, success=True, message=message)


def points_in_frame(pts3d: Any, T_frame_from_1: Any) -> np.ndarray:
    """(H,W,3) points in frame 1 -> the same points in another frame; ``T_frame_from_1`` (4,4) maps frame-1
    coordinates to that frame's (``X_f = R X_1 + t``; for camera v that is ``inv(T_1_v)``)."""
    points = _to_numpy(pts3d, 'pts3d', (3,))
    T = _as_pose(T_frame_from_1, 'T_frame_from_1')
    return points @ T[:3, :3].T + T[:3, 3]


def depth_in_own_frame(pts3d_in_1: Any, T_1_v: Any) -> np.ndarray:
    """(H,W) depth (z in camera v's frame) of view v's points given in frame 1, with ``T_1_v`` the pose of
    camera v in frame 1. NaN where z <= 0 or not finite."""
    depth = points_in_frame(pts3d_in_1, invert_pose(T_1_v))[..., 2]
    return np.where(np.isfinite(depth) & (depth > 0), depth, np.nan)


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

