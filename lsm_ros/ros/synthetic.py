"""A small synthetic stereo sequence, written as a rosbag2 with the EuRoC bag's topic layout.

Used when the EuRoC bag is absent. The scene (a room: floor, back and side walls, two boxes; every surface
with a deterministic random texture) is ray cast with numpy for a calibrated, *already rectified* stereo
rig (identical intrinsics, R = I, no distortion, right camera ``baseline_m`` along +x). The rig moves a
little between frames. Frames are REP 103 optical frames (x right, y down, z forward); the world frame is the
first left camera's.

Topics (as in ``euroc_v101_stereo_rosbag2``): ``/stereo/{left,right}/image_raw`` (rgb8, frame ids
``cam0``/``cam1``) and ``/stereo/{left,right}/camera_info`` (plumb_bob, zero distortion; K = P[:3,:3];
right ``P[0,3] = -fx * B``). Images are named ``image_raw`` like EuRoC's although they need no
rectification (rectifying them is the identity).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rclpy.serialization import serialize_message
from scipy.spatial.transform import Rotation

from lsm_ros.ros import conversions

LEFT_FRAME = 'cam0'
RIGHT_FRAME = 'cam1'
TOPICS = {'left_image': '/stereo/left/image_raw', 'right_image': '/stereo/right/image_raw',
          'left_info': '/stereo/left/camera_info', 'right_info': '/stereo/right/camera_info'}
_FIRST_STAMP_NS = 1_700_000_000 * 1_000_000_000


@dataclass(frozen=True)
class StereoRig:
    """A rectified stereo camera: pinhole intrinsics shared by both cameras, right camera at +x baseline."""

    width: int = 320
    height: int = 240
    focal_px: float = 260.0
    baseline_m: float = 0.12

    @property
    def K(self) -> np.ndarray:
        """(3,3) intrinsics of both cameras."""
        return np.array([[self.focal_px, 0.0, (self.width - 1) / 2.0],
                         [0.0, self.focal_px, (self.height - 1) / 2.0], [0.0, 0.0, 1.0]])

    def projection(self, side: str) -> np.ndarray:
        """(3,4) ROS CameraInfo P of ``side``: [K | 0] left, [K | (-fx*B, 0, 0)] right."""
        P = np.hstack([self.K, np.zeros((3, 1))])
        if side == 'right':
            P[0, 3] = -self.focal_px * self.baseline_m
        return P


# Axis-aligned boxes (min corner, max corner) in the world frame, metres; planes (axis, offset).
_BOXES = (np.array([[-1.0, 0.1, 2.2], [-0.2, 1.0, 3.0]]),
          np.array([[0.5, -0.6, 3.2], [1.1, 1.0, 3.8]]))
_PLANES = ((1, 1.0), (2, 5.0), (0, -2.5), (0, 2.5), (1, -1.8))  # floor, back wall, left/right walls, ceiling
_SURFACE_COLORS = np.array([[170, 140, 110], [120, 150, 190], [190, 120, 120], [120, 190, 140], [200, 200, 200],
                            [220, 180, 60], [90, 200, 210]], dtype=np.float64)


def _texture(points: np.ndarray, surface: np.ndarray, normal_axis: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic random texture (N,3) float in [0, 255]: hashed 5 cm cells times smooth stripes."""
    coords = np.empty((points.shape[0], 2))
    for axis in range(3):
        on_axis = normal_axis == axis
        others = [a for a in range(3) if a != axis]
        coords[on_axis] = points[on_axis][:, others]
    cells = np.floor(coords / 0.05).astype(np.int64)
    hashed = (cells[:, 0] * 73856093) ^ (cells[:, 1] * 19349663) ^ (surface * 83492791) ^ (seed * 2654435761)
    hashed = (hashed ^ (hashed >> 13)) * 1274126177
    noise = ((hashed >> 8) & 0xFF).astype(np.float64) / 255.0
    stripes = 0.5 + 0.5 * np.sin(coords[:, 0] * 23.0) * np.cos(coords[:, 1] * 17.0)
    shade = 0.45 + 0.4 * noise + 0.15 * stripes
    return np.clip(_SURFACE_COLORS[surface % len(_SURFACE_COLORS)] * shade[:, None], 0, 255)


def render_view(rig: StereoRig, T_world_camera: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ray cast one camera: (rgb (H,W,3) uint8, depth (H,W) float32 along the optical axis, metres)."""
    v, u = np.mgrid[0:rig.height, 0:rig.width].astype(np.float64)
    rays_camera = np.stack([(u - rig.K[0, 2]) / rig.focal_px, (v - rig.K[1, 2]) / rig.focal_px,
                            np.ones_like(u)], axis=-1).reshape(-1, 3)
    rotation, origin = T_world_camera[:3, :3], T_world_camera[:3, 3]
    rays = rays_camera @ rotation.T
    count = rays.shape[0]
    best_t = np.full(count, np.inf)
    surface = np.zeros(count, dtype=np.int64)
    normal_axis = np.zeros(count, dtype=np.int64)
    with np.errstate(divide='ignore', invalid='ignore'):
        for index, (axis, offset) in enumerate(_PLANES):
            t = (offset - origin[axis]) / rays[:, axis]
            hit = (t > 1e-6) & (t < best_t)
            best_t[hit], surface[hit], normal_axis[hit] = t[hit], index, axis
        for index, (lower, upper) in enumerate(_BOXES, start=len(_PLANES)):
            t_lower, t_upper = (lower - origin) / rays, (upper - origin) / rays
            t_near = np.minimum(t_lower, t_upper)
            t_enter, t_exit = t_near.max(axis=1), np.maximum(t_lower, t_upper).min(axis=1)
            hit = (t_enter <= t_exit) & (t_enter > 1e-6) & (t_enter < best_t)
            best_t[hit], surface[hit], normal_axis[hit] = t_enter[hit], index, t_near[hit].argmax(axis=1)
    points = origin + rays * best_t[:, None]
    rgb = _texture(points, surface, normal_axis, seed)
    depth = best_t  # rays have unit z in the camera frame, so the ray parameter is the depth
    return rgb.reshape(rig.height, rig.width, 3).astype(np.uint8), depth.reshape(rig.height, rig.width).astype(
        np.float32)


def rig_pose(frame: int) -> np.ndarray:
    """(4,4) pose of the left camera in the world frame at ``frame``: a slow sideways drift and yaw."""
    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler('y', 1.5 * frame, degrees=True).as_matrix()
    T[:3, 3] = (0.04 * frame, -0.01 * frame, 0.03 * frame)
    return T


def render_stereo_frame(rig: StereoRig, frame: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Left/right rgb and depth of one frame: keys left_rgb, right_rgb, left_depth, right_depth."""
    T_world_left = rig_pose(frame)
    T_left_right = np.eye(4)
    T_left_right[0, 3] = rig.baseline_m
    left_rgb, left_depth = render_view(rig, T_world_left, seed)
    right_rgb, right_depth = render_view(rig, T_world_left @ T_left_right, seed)
    return dict(left_rgb=left_rgb, right_rgb=right_rgb, left_depth=left_depth, right_depth=right_depth)


def write_synthetic_stereo_bag(path: str | Path, *, frames: int = 6, rig: StereoRig = StereoRig(),
                               rate_hz: float = 4.0, seed: int = 0) -> Path:
    """Render ``frames`` stereo frames and write them as a rosbag2 (sqlite3) at ``path`` (must not exist).

    Deterministic for given arguments. Returns ``path``.
    """
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    path = Path(path)
    if path.exists():
        raise FileExistsError(f'{path} exists: rosbag2 writers need a new directory')
    typestore = get_typestore(Stores.ROS2_KILTED)
    with Writer(path, version=8) as writer:
        connections = {
            key: writer.add_connection(topic, 'sensor_msgs/msg/Image' if key.endswith('image')
                                       else 'sensor_msgs/msg/CameraInfo', typestore=typestore)
            for key, topic in TOPICS.items()}
        for frame in range(frames):
            stamp_ns = _FIRST_STAMP_NS + round(frame * 1e9 / rate_hz)
            stamp = conversions.nanoseconds_to_stamp(stamp_ns)
            views = render_stereo_frame(rig, frame, seed)
            for side, frame_id in (('left', LEFT_FRAME), ('right', RIGHT_FRAME)):
                header = conversions.make_header(stamp, frame_id)
                info = conversions.model_camera_info(rig.K, rig.width, rig.height, header, P=rig.projection(side))
                image = conversions.rgb_to_image_msg(views[f'{side}_rgb'], conversions.make_header(stamp, frame_id))
                writer.write(connections[f'{side}_image'], stamp_ns, serialize_message(image))
                writer.write(connections[f'{side}_info'], stamp_ns, serialize_message(info))
    return path
