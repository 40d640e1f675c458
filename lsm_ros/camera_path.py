"""Camera paths between the two views of a reconstruction, for novel-view videos (numpy only).

Poses are ``T_left_camera`` (4,4): the pose of a camera in the left (view 1) optical frame, ``X_left = T X_cam``
(REP 103 optical axes: x right, y down, z forward). Between two poses the rotation follows the quaternion slerp
(constant angular speed on the shortest arc) and the optical centre a straight line at constant speed; pinhole
intrinsics (3,3) are interpolated linearly. Every interpolation returns its endpoints exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PATH_MODES: tuple[str, ...] = ('there_and_back', 'one_way')
RIGID_TOLERANCE = 1e-6     # largest |R R^T - I| entry accepted as a rotation
_SLERP_MIN_ANGLE = 1e-9    # below this half-angle (radians) slerp falls back to the normalised lerp


def check_rigid(T: np.ndarray, name: str = 'T') -> np.ndarray:
    """``T`` as a float64 (4,4) rigid transform; ValueError unless it is finite with last row (0, 0, 0, 1) and a
    proper rotation (orthonormal within RIGID_TOLERANCE, determinant +1)."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4):
        raise ValueError(f'{name} must be a 4x4 transform, got shape {T.shape}')
    if not np.isfinite(T).all():
        raise ValueError(f'{name} has non-finite entries')
    if not np.array_equal(T[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f'{name} must have the last row (0, 0, 0, 1), got {T[3].tolist()}')
    R = T[:3, :3]
    if np.abs(R @ R.T - np.eye(3)).max() > RIGID_TOLERANCE or np.linalg.det(R) <= 0:
        raise ValueError(f'{name} is not rigid: its 3x3 block is not a rotation (orthonormal, determinant +1)')
    return T


def check_intrinsics(K: np.ndarray, name: str = 'K') -> np.ndarray:
    """``K`` as a float64 (3,3) pinhole matrix; ValueError unless finite, fx, fy > 0 and last row (0, 0, 1)
    (within 1e-9)."""
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3) or not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0 \
            or not np.allclose(K[2], [0.0, 0.0, 1.0], rtol=0.0, atol=1e-9):
        raise ValueError(f'{name} must be a finite 3x3 pinhole matrix with fx, fy > 0 and last row (0, 0, 1)')
    return K


def _check_count(count: int) -> int:
    if int(count) != count or count < 2:
        raise ValueError(f'count must be an integer >= 2 (both endpoints), got {count!r}')
    return int(count)


def rotation_to_quaternion(R: np.ndarray) -> np.ndarray:
    """(3,3) rotation → (4,) unit quaternion (x, y, z, w) with w >= 0 (Shepperd's method: stable everywhere)."""
    R = np.asarray(R, dtype=np.float64)
    trace = np.trace(R)
    if trace > max(R[0, 0], R[1, 1], R[2, 2]):
        s = 2.0 * np.sqrt(1.0 + trace)
        q = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1], 0.25 * s * s]) / s
    else:
        i = int(np.argmax(np.diag(R)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + R[i, i] - R[j, j] - R[k, k])
        q = np.empty(4)
        q[i] = 0.25 * s
        q[j] = (R[j, i] + R[i, j]) / s
        q[k] = (R[k, i] + R[i, k]) / s
        q[3] = (R[k, j] - R[j, k]) / s
    q /= np.linalg.norm(q)
    return -q if q[3] < 0 else q


def quaternion_to_rotation(q: np.ndarray) -> np.ndarray:
    """(..., 4) quaternions (x, y, z, w), normalised here → (..., 3, 3) rotations."""
    q = np.asarray(q, dtype=np.float64)
    x, y, z, w = np.moveaxis(q / np.linalg.norm(q, axis=-1, keepdims=True), -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], axis=-1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], axis=-1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], axis=-1)], axis=-2)


def slerp(q_a: np.ndarray, q_b: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Spherical linear interpolation of unit quaternions (x, y, z, w) on the shortest arc: (F,) fractions in
    [0, 1] → (F, 4) unit quaternions, ``q_a`` at 0 and ``±q_b`` at 1 (the same rotation)."""
    q_a = np.asarray(q_a, dtype=np.float64) / np.linalg.norm(q_a)
    q_b = np.asarray(q_b, dtype=np.float64) / np.linalg.norm(q_b)
    cos_half_angle = float(q_a @ q_b)
    if cos_half_angle < 0:           # q and -q are the same rotation: take the shorter way round
        q_b, cos_half_angle = -q_b, -cos_half_angle
    t = np.asarray(fractions, dtype=np.float64).reshape(-1, 1)
    half_angle = np.arccos(min(cos_half_angle, 1.0))
    if half_angle < _SLERP_MIN_ANGLE:
        q = (1.0 - t) * q_a + t * q_b
    else:
        q = (np.sin((1.0 - t) * half_angle) * q_a + np.sin(t * half_angle) * q_b) / np.sin(half_angle)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def poses_at(T_a: np.ndarray, T_b: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """(F,4,4) rigid poses at ``fractions`` (F,) in [0, 1] of the way from ``T_a`` to ``T_b`` (both (4,4)
    rigid): slerp of the rotation, linear translation; fraction 0 gives ``T_a`` and 1 gives ``T_b`` exactly."""
    T_a, T_b = check_rigid(T_a, 'T_a'), check_rigid(T_b, 'T_b')
    t = np.asarray(fractions, dtype=np.float64).reshape(-1)
    if not (np.isfinite(t).all() and (t >= 0).all() and (t <= 1).all()):
        raise ValueError('fractions must lie in [0, 1]')
    poses = np.tile(np.eye(4), (len(t), 1, 1))
    poses[:, :3, :3] = quaternion_to_rotation(slerp(rotation_to_quaternion(T_a[:3, :3]),
                                                    rotation_to_quaternion(T_b[:3, :3]), t))
    poses[:, :3, 3] = (1.0 - t)[:, None] * T_a[:3, 3] + t[:, None] * T_b[:3, 3]
    poses[t == 0.0] = T_a
    poses[t == 1.0] = T_b
    return poses


def interpolate_poses(T_a: np.ndarray, T_b: np.ndarray, count: int) -> np.ndarray:
    """``count`` (>= 2) poses evenly spaced from ``T_a`` to ``T_b`` (both (4,4) rigid) → (count,4,4); the first is
    ``T_a`` and the last ``T_b`` exactly. ValueError for non-rigid transforms or count < 2."""
    return poses_at(T_a, T_b, np.linspace(0.0, 1.0, _check_count(count)))


def intrinsics_at(K_a: np.ndarray, K_b: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """(F,3,3) pinhole matrices linearly interpolated at ``fractions`` (F,) in [0, 1]; endpoints exact."""
    K_a, K_b = check_intrinsics(K_a, 'K_a'), check_intrinsics(K_b, 'K_b')
    t = np.asarray(fractions, dtype=np.float64).reshape(-1, 1, 1)
    return (1.0 - t) * K_a + t * K_b


def interpolate_intrinsics(K_a: np.ndarray, K_b: np.ndarray, count: int) -> np.ndarray:
    """``count`` (>= 2) pinhole matrices evenly spaced from ``K_a`` to ``K_b`` (both (3,3)) → (count,3,3)."""
    return intrinsics_at(K_a, K_b, np.linspace(0.0, 1.0, _check_count(count)))


def path_fractions(frames: int, mode: str = 'there_and_back') -> np.ndarray:
    """(frames,) position of each frame on the way from view 1 (0) to view 2 (1).

    'one_way': evenly from 0 to 1, both included. 'there_and_back': evenly from 0 up to 1 (included) in
    ``frames // 2 + 1`` frames, then back down towards 0 without repeating either end, so that the video loops
    (frame 0 follows the last frame one step later). ValueError for frames < 2 or an unknown mode."""
    if mode not in PATH_MODES:
        raise ValueError(f'unknown path mode {mode!r}; choose from {PATH_MODES}')
    frames = _check_count(frames)
    if mode == 'one_way':
        return np.linspace(0.0, 1.0, frames)
    there = np.linspace(0.0, 1.0, frames // 2 + 1)
    back = np.linspace(1.0, 0.0, frames - len(there) + 2)[1:-1]
    return np.concatenate([there, back])


@dataclass(frozen=True)
class CameraPath:
    """Virtual cameras along a path between the two views of a reconstruction."""

    fractions: np.ndarray   # (F,) position between view 1 (0) and view 2 (1)
    poses: np.ndarray       # (F,4,4) T_left_camera: camera pose in the left optical frame (X_left = T X_cam)
    intrinsics: np.ndarray  # (F,3,3) pinhole matrices, at the size of K_1 and K_2

    def __len__(self) -> int:
        return len(self.fractions)


def camera_path(T_1_2: np.ndarray, K_1: np.ndarray, K_2: np.ndarray, frames: int,
                mode: str = 'there_and_back') -> CameraPath:
    """The path of a reconstruction's video: from view 1 (the left camera: identity pose, ``K_1``) to view 2
    (pose ``T_1_2`` (4,4) in the left frame, ``K_2``), and back for 'there_and_back' (:func:`path_fractions`).
    Frame 0 is view 1 exactly. ValueError for a non-rigid ``T_1_2``, bad intrinsics, frames < 2 or an unknown
    mode."""
    T_1_2 = check_rigid(T_1_2, 'T_1_2')
    fractions = path_fractions(frames, mode)
    return CameraPath(fractions=fractions, poses=poses_at(np.eye(4), T_1_2, fractions),
                      intrinsics=intrinsics_at(K_1, K_2, fractions))


def visible_depth_range(points: np.ndarray, poses: np.ndarray, intrinsics: np.ndarray, size: tuple[int, int],
                        percentiles: tuple[float, float] = (2.0, 98.0),
                        max_points: int = 65536) -> tuple[float, float] | None:
    """One depth range for every frame of a path, so that a depth colour map stays steady over a video.

    The ``percentiles`` of the depth (camera z) of ``points`` (N,3, left frame; e.g. the Gaussians' means) over
    all cameras of the path — ``poses`` (F,4,4) T_left_camera and ``intrinsics`` (F,3,3) at ``size`` (width,
    height) — counting each point where it is in front of the camera and projects inside the image. At most
    ``max_points`` finite points (evenly strided) are used. None when no point is seen."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    points = points[np.isfinite(points).all(axis=1)]
    points = points[::max(1, -(-len(points) // max_points))]
    width, height = size
    seen = []
    for T, K in zip(np.asarray(poses, dtype=np.float64), np.asarray(intrinsics, dtype=np.float64)):
        in_camera = (points - T[:3, 3]) @ T[:3, :3]          # row-vector form of R^T (X - t)
        in_camera = in_camera[in_camera[:, 2] > 0]
        pixels = in_camera @ K.T
        u, v = pixels[:, 0] / pixels[:, 2], pixels[:, 1] / pixels[:, 2]
        inside = (u >= -0.5) & (u < width - 0.5) & (v >= -0.5) & (v < height - 0.5)
        seen.append(in_camera[inside, 2])
    depths = np.concatenate(seen) if seen else np.empty(0)
    if not depths.size:
        return None
    low, high = np.percentile(depths, percentiles)
    return float(low), float(high)
