"""ORACLE ONLY: the former OpenCV/scipy relative-pose path of ``lsm_ros.cameras`` (PnP-RANSAC with SQPnP, DUSt3R's
focal search, Weiszfeld focal refinement, confidence-weighted Cauchy Levenberg-Marquardt on the host in numpy).

Kept verbatim as the reference the torch implementation (:func:`lsm_ros.cameras.estimate_relative_pose`) is
compared against in the tests and in ``scripts/pose_accuracy.py``. NOT used by the pipeline, the node or the CLI.
Also holds the ICL-NUIM loaders shared by the tests and the accuracy script.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import PIL.Image
from scipy.spatial.transform import Rotation

from lsm_ros.cameras import RelativePose, intrinsics_matrix, invert_pose, pixel_grid
from lsm_ros.preprocess import plan_crop

_log = logging.getLogger(__name__)

_MIN_PNP_POINTS = 6
_FOCAL_SEARCH = np.geomspace(0.5, 3.0, 21)
_FOCAL_REFINEMENT_ROUNDS = 3
_MIN_LOSS_SCALE_PX = 1e-3
_REFINEMENT_ITERATIONS = 50
_COLLINEAR_RATIO = 1e-6


def _to_numpy(array, name: str, trailing_shape: tuple[int, ...]) -> np.ndarray:
    """numpy or torch -> float64 numpy of shape (H,W)+trailing_shape (a leading batch axis of 1 is dropped)."""
    if hasattr(array, 'detach'):
        array = array.detach().cpu().numpy()
    array = np.asarray(array, dtype=np.float64)
    expected_ndim = 2 + len(trailing_shape)
    if array.ndim == expected_ndim + 1 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != expected_ndim or array.shape[2:] != trailing_shape:
        raise ValueError(f'{name} has shape {array.shape}')
    return array


def _weiszfeld_focal(xy_over_z: np.ndarray, centred_pixels: np.ndarray, iterations: int) -> float:
    dot_xy_pixel = np.sum(xy_over_z * centred_pixels, axis=-1)
    dot_xy_xy = np.sum(xy_over_z * xy_over_z, axis=-1)
    if not np.sum(dot_xy_xy) > 0:
        raise ValueError('no usable point to estimate the focal')
    focal = np.sum(dot_xy_pixel) / np.sum(dot_xy_xy)
    for _ in range(iterations):
        distance = np.linalg.norm(centred_pixels - focal * xy_over_z, axis=-1)
        weight = 1.0 / np.clip(distance, 1e-8, None)
        focal = np.sum(weight * dot_xy_pixel) / np.sum(weight * dot_xy_xy)
    return float(focal)


def estimate_focal_weiszfeld_numpy(pts3d, principal_point=None, iterations: int = 10) -> float:
    """The former numpy Weiszfeld focal (no clipping): oracle of :func:`lsm_ros.cameras.estimate_focal_weiszfeld`."""
    points = _to_numpy(pts3d, 'pts3d', (3,))
    height, width = points.shape[:2]
    if principal_point is None:
        principal_point = (width / 2, height / 2)
    points = points.reshape(-1, 3)
    with np.errstate(divide='ignore', invalid='ignore'):
        xy_over_z = np.nan_to_num(points[:, :2] / points[:, 2:3], nan=0.0, posinf=0.0, neginf=0.0)
    contributing = np.flatnonzero(np.any(xy_over_z != 0.0, axis=-1))
    rows, cols = np.divmod(contributing, width)
    centred = np.stack([cols, rows], axis=-1) - np.asarray(principal_point, dtype=np.float64)
    return _weiszfeld_focal(xy_over_z[contributing], centred, iterations)


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


def estimate_relative_pose_opencv(pts3d_2_in_1: Any, conf_2: Any, K_2: Any = None, *,
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


# --- ICL-NUIM ground truth (see ../shared/data/icl_nuim_slambook2/SOURCE.txt) ---------------------------------------

SHARED = Path(os.environ.get('LSM_ROS_SHARED', Path(__file__).resolve().parents[1].parent / 'shared'))
ICL = SHARED / 'data' / 'icl_nuim_slambook2'
ICL_K = intrinsics_matrix(481.2, 480.0, 319.5, 239.5)  # fy made positive, see SOURCE.txt
_FLIP_Y = np.diag([1.0, -1.0, 1.0, 1.0])


def pose_matrix(rotvec, translation) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
    T[:3, 3] = translation
    return T


def back_project(depth: np.ndarray, K: np.ndarray, pixels: np.ndarray | None = None) -> np.ndarray:
    """(H,W) depth -> (H,W,3) points in the camera frame; NaN where depth <= 0."""
    pixels = pixel_grid(*depth.shape) if pixels is None else pixels
    x = (pixels[..., 0] - K[0, 2]) / K[0, 0]
    y = (pixels[..., 1] - K[1, 2]) / K[1, 1]
    points = np.stack([x * depth, y * depth, depth], axis=-1)
    points[~(depth > 0)] = np.nan
    return points


def icl_camera_to_world(frame: int) -> np.ndarray:
    """T_world_camera of frame 1..5 for the standard pinhole (fy > 0): F T_wc F."""
    tx, ty, tz, qx, qy, qz, qw = np.loadtxt(ICL / 'pose.txt')[frame - 1]
    return _FLIP_Y @ pose_matrix(Rotation.from_quat([qx, qy, qz, qw]).as_rotvec(), [tx, ty, tz]) @ _FLIP_Y


def icl_relative_pose(frame_1: int, frame_2: int) -> np.ndarray:
    """Ground-truth T_1_2 (4,4), metres."""
    return invert_pose(icl_camera_to_world(frame_1)) @ icl_camera_to_world(frame_2)


def icl_depth(frame: int) -> np.ndarray:
    return np.asarray(PIL.Image.open(ICL / 'depth' / f'{frame}.png'), dtype=np.float64) / 5000.0


def icl_model_points(frame: int, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Points of ``frame`` at model resolution (own frame) as DUSt3R would give them, and K_model.

    Each model pixel's ray comes from K_model; its depth from the nearest input pixel of the same ray."""
    depth = icl_depth(frame)
    crop = plan_crop((depth.shape[1], depth.shape[0]), resolution)  # type: ignore[arg-type]
    K_model = crop.intrinsics_to_model(ICL_K)
    width, height = crop.model_size
    model_pixels = pixel_grid(height, width)
    input_pixels = (model_pixels - crop.pixels_to_model(np.zeros(2))) / np.array(crop.scale)
    rows = np.clip(np.round(input_pixels[..., 1]).astype(int), 0, depth.shape[0] - 1)
    cols = np.clip(np.round(input_pixels[..., 0]).astype(int), 0, depth.shape[1] - 1)
    return back_project(depth[rows, cols], K_model, model_pixels), K_model


def rotation_error_deg(T_estimated: np.ndarray, T_true: np.ndarray) -> float:
    return float(np.degrees(Rotation.from_matrix(T_estimated[:3, :3].T @ T_true[:3, :3]).magnitude()))


def translation_direction_error_deg(T_estimated: np.ndarray, T_true: np.ndarray) -> float:
    a, b = T_estimated[:3, 3], T_true[:3, 3]
    cosine = a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300)
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


# --- host synchronisation counter ----------------------------------------------------------------------------------

def host_sync_counter():
    """The tests' TorchDispatchMode counting host synchronisations (``syncs`` per op name, ``total``):
    ``with host_sync_counter() as c: ...``."""
    from host_sync import HostSyncCounter
    return HostSyncCounter()
