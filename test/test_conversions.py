"""numpy <-> ROS message conversions (no ROS graph needed)."""
from __future__ import annotations

import time

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from rclpy.serialization import deserialize_message, serialize_message
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import Header

from lsm_ros.ros import conversions as conv

pytestmark = pytest.mark.timeout(60)

HEADER = Header(stamp=Time(sec=12, nanosec=345), frame_id='cam0')


def _image(pixels: np.ndarray, encoding: str, step: int | None = None, data: bytes | None = None,
           bigendian: int = 0) -> Image:
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    step = width * channels if step is None else step
    if data is None:
        rows = np.zeros((height, step), np.uint8)
        rows[:, :width * channels] = pixels.reshape(height, -1)
        data = rows.tobytes()
    msg = Image(header=HEADER, height=height, width=width, encoding=encoding, is_bigendian=bigendian, step=step)
    msg.data = conv.byte_array(data)
    return msg


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize('encoding, make', [
    ('rgb8', lambda rgb: rgb),
    ('bgr8', lambda rgb: rgb[..., ::-1]),
    ('rgba8', lambda rgb: np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])),
    ('bgra8', lambda rgb: np.dstack([rgb[..., ::-1], np.full(rgb.shape[:2], 7, np.uint8)])),
])
@pytest.mark.parametrize('padding', [0, 5])
@pytest.mark.parametrize('bigendian', [0, 1])
def test_color_encodings_give_rgb(rgb: np.ndarray, encoding: str, make, padding: int, bigendian: int) -> None:
    pixels = make(rgb)
    msg = _image(pixels, encoding, step=pixels.shape[1] * pixels.shape[2] + padding, bigendian=bigendian)
    out = conv.image_to_numpy(msg)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize('padding', [0, 3])
def test_mono8_is_replicated_to_rgb(padding: int) -> None:
    mono = np.arange(35, dtype=np.uint8).reshape(5, 7)
    out = conv.image_to_numpy(_image(mono, 'mono8', step=7 + padding))
    assert out.shape == (5, 7, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], mono)


def test_rgb_and_mono_round_trip_through_cdr(rgb: np.ndarray) -> None:
    msg = deserialize_message(serialize_message(conv.rgb_to_image_msg(rgb, HEADER)), Image)
    assert (msg.encoding, msg.width, msg.height, msg.step, msg.header.frame_id) == ('rgb8', 7, 5, 21, 'cam0')
    np.testing.assert_array_equal(conv.image_to_numpy(msg), rgb)
    mono = rgb[..., 0].copy()
    np.testing.assert_array_equal(conv.image_to_numpy(conv.mono_to_image_msg(mono, HEADER))[..., 1], mono)


@pytest.mark.parametrize('encoding', ['16UC1', 'yuv422', 'bayer_rggb8', '32FC1', 'RGB8', ''])
def test_unsupported_encodings_are_refused(encoding: str) -> None:
    msg = _image(np.zeros((4, 4), np.uint8), 'mono8')
    msg.encoding = encoding
    with pytest.raises(conv.ImageConversionError, match='unsupported image encoding'):
        conv.image_to_numpy(msg)


def test_inconsistent_images_are_refused(rgb: np.ndarray) -> None:
    good = _image(rgb, 'rgb8')
    truncated = _image(rgb, 'rgb8', data=bytes(good.data)[:-1])
    with pytest.raises(conv.ImageConversionError, match='truncated'):
        conv.image_to_numpy(truncated)
    oversized = _image(rgb, 'rgb8', data=bytes(good.data) + b'\0' * 21)
    with pytest.raises(conv.ImageConversionError, match='oversized'):
        conv.image_to_numpy(oversized)
    small_step = _image(rgb, 'rgb8', step=20, data=bytes(100))
    with pytest.raises(conv.ImageConversionError, match='step 20 is smaller'):
        conv.image_to_numpy(small_step)
    empty = Image(header=HEADER, height=0, width=7, encoding='rgb8', step=21)
    with pytest.raises(conv.ImageConversionError, match='empty'):
        conv.image_to_numpy(empty)


def test_depth_round_trip_keeps_nan() -> None:
    depth = np.arange(12, dtype=np.float32).reshape(3, 4)
    depth[1, 2] = np.nan
    msg = deserialize_message(serialize_message(conv.depth_to_image_msg(depth, HEADER)), Image)
    assert (msg.encoding, msg.step, msg.is_bigendian) == ('32FC1', 16, 0)
    np.testing.assert_array_equal(conv.depth_image_to_numpy(msg), depth)  # NaN == NaN for assert_array_equal
    big = Image(header=HEADER, height=3, width=4, encoding='32FC1', is_bigendian=1, step=16)
    big.data = conv.byte_array(depth.astype('>f4').tobytes())
    np.testing.assert_array_equal(conv.depth_image_to_numpy(big), depth)


def _camera_info(K: np.ndarray, P: np.ndarray | None = None, width: int = 640, height: int = 480) -> CameraInfo:
    P = np.hstack([K, np.zeros((3, 1))]) if P is None else P
    return CameraInfo(header=HEADER, width=width, height=height, k=K.ravel().tolist(), p=P.ravel().tolist(),
                      r=np.eye(3).ravel().tolist(), d=[0.0] * 5, distortion_model='plumb_bob')


def test_camera_info_matrices_and_baseline() -> None:
    K = np.array([[500.0, 0, 320], [0, 501.0, 240], [0, 0, 1]])
    P_right = np.array([[450.0, 0, 310, -450.0 * 0.12], [0, 450.0, 235, 0], [0, 0, 1, 0]])
    info = _camera_info(K, P_right)
    K_out, P_out, width, height = conv.camera_info_to_matrices(info)
    np.testing.assert_allclose(K_out, K)
    np.testing.assert_allclose(P_out, P_right)
    assert (width, height) == (640, 480)
    assert conv.stereo_baseline_from_camera_info(info) == pytest.approx(0.12)
    np.testing.assert_allclose(conv.rectified_intrinsics(info), P_right[:, :3])   # image_rect: P
    assert conv.stereo_baseline_from_camera_info(_camera_info(K)) is None           # left camera: P[0,3] = 0
    no_p = _camera_info(K, np.zeros((3, 4)))
    np.testing.assert_allclose(conv.rectified_intrinsics(no_p), K)                   # no P: K
    assert conv.stereo_baseline_from_camera_info(no_p) is None


def test_unusable_camera_info_is_refused() -> None:
    with pytest.raises(conv.CameraInfoError, match='all zeros'):
        conv.camera_info_to_matrices(_camera_info(np.zeros((3, 3))))
    with pytest.raises(conv.CameraInfoError, match='image size'):
        conv.camera_info_to_matrices(_camera_info(np.diag([500.0, 500.0, 1.0]), width=0))
    bad = np.diag([500.0, 500.0, 1.0])
    bad[0, 2] = np.nan
    with pytest.raises(conv.CameraInfoError, match='non-finite'):
        conv.camera_info_to_matrices(_camera_info(bad))


def test_model_camera_info() -> None:
    K = np.array([[200.0, 0, 112], [0, 200.0, 112], [0, 0, 1]])
    info = conv.model_camera_info(K, 224, 224, HEADER)
    assert (info.width, info.height, info.distortion_model, list(info.d)) == (224, 224, 'plumb_bob', [0.0] * 5)
    np.testing.assert_allclose(np.reshape(info.k, (3, 3)), K)
    np.testing.assert_allclose(np.reshape(info.p, (3, 4)), np.hstack([K, np.zeros((3, 1))]))
    np.testing.assert_allclose(np.reshape(info.r, (3, 3)), np.eye(3))


def test_pointcloud_layout_packing_and_round_trip() -> None:
    rng = np.random.default_rng(1)
    xyz = rng.normal(size=(50, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, (50, 3), dtype=np.uint8)
    rgb[0] = (0x12, 0x34, 0x56)
    confidence = rng.uniform(1, 5, 50).astype(np.float32)
    msg = deserialize_message(serialize_message(conv.pointcloud2_from_points(xyz, rgb, confidence, HEADER)),
                              PointCloud2)
    assert (msg.height, msg.width, msg.point_step, msg.row_step, msg.is_dense, msg.is_bigendian) == \
        (1, 50, 20, 1000, True, False)
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == [
        ('x', 0, PointField.FLOAT32, 1), ('y', 4, PointField.FLOAT32, 1), ('z', 8, PointField.FLOAT32, 1),
        ('rgb', 12, PointField.FLOAT32, 1), ('confidence', 16, PointField.FLOAT32, 1)]
    raw = np.frombuffer(msg.data, dtype=np.uint8).reshape(50, 20)
    assert raw[0, 12:16].view('<u4')[0] == 0x00123456   # PCL/RViz packing: 0x00RRGGBB
    cloud = conv.pointcloud2_to_numpy(msg)
    np.testing.assert_array_equal(cloud['xyz'], xyz)
    np.testing.assert_array_equal(cloud['rgb_u8'], rgb)
    np.testing.assert_array_equal(cloud['confidence'], confidence)


def test_labelled_pointcloud_has_pcl_point_xyzrgbl_label() -> None:
    """The label field as PCL's PointXYZRGBL declares it (uint32 ``label``, at its offset 20; ``rgb`` FLOAT32, which
    PCL accepts for ``rgba``), so pcl::fromROSMsg keeps it; values beyond a byte survive."""
    rng = np.random.default_rng(4)
    xyz = rng.normal(size=(6, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, (6, 3), dtype=np.uint8)
    labels = np.array([0, 1, 255, 256, 70000, 2**32 - 1], dtype=np.int64)
    msg = deserialize_message(serialize_message(conv.pointcloud2_from_points(
        xyz, rgb, np.ones(6, np.float32), HEADER, labels=labels)), PointCloud2)
    fields = {f.name: (f.offset, f.datatype, f.count) for f in msg.fields}
    assert fields['label'] == (20, PointField.UINT32, 1) and fields['rgb'] == (12, PointField.FLOAT32, 1)
    assert (msg.point_step, msg.row_step) == (24, 24 * 6)
    raw = np.frombuffer(msg.data, dtype=np.uint8).reshape(6, 24)
    np.testing.assert_array_equal(raw[:, 20:24].copy().view('<u4')[:, 0], labels)
    np.testing.assert_array_equal(conv.pointcloud2_to_numpy(msg)['label'], labels)
    for bad in (np.full(6, -1), np.full(6, 2**32), np.full(6, 0.5), np.zeros(5, np.int64)):
        with pytest.raises(ValueError, match='labels must be'):
            conv.pointcloud2_from_points(xyz, rgb, np.ones(6, np.float32), HEADER, labels=bad)


def test_empty_pointcloud() -> None:
    msg = conv.pointcloud2_from_points(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8),
                                       np.zeros(0, np.float32), HEADER)
    assert msg.width == 0 and len(msg.data) == 0
    assert conv.pointcloud2_to_numpy(msg)['xyz'].shape == (0, 3)


def test_large_conversions_are_fast() -> None:
    count = 2 * 256 * 256  # both views of a 256x256 model image
    rng = np.random.default_rng(2)
    xyz = rng.normal(size=(count, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, (count, 3), dtype=np.uint8)
    confidence = np.ones(count, np.float32)
    start = time.perf_counter()
    msg = conv.pointcloud2_from_points(xyz, rgb, confidence, HEADER)
    cloud_s = time.perf_counter() - start
    image = conv.rgb_to_image_msg(rng.integers(0, 256, (480, 752, 3), dtype=np.uint8), HEADER)
    start = time.perf_counter()
    conv.image_to_numpy(image)
    image_s = time.perf_counter() - start
    assert len(msg.data) == count * 20
    assert cloud_s < 0.5 and image_s < 0.1, (cloud_s, image_s)


def test_pose_and_transform_from_matrix() -> None:
    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler('xyz', [10, -20, 30], degrees=True).as_matrix()
    T[:3, 3] = (0.11, -0.02, 0.003)
    pose = conv.pose_stamped_from_matrix(T, HEADER)
    assert pose.header.frame_id == 'cam0'
    q = pose.pose.orientation
    assert np.linalg.norm([q.x, q.y, q.z, q.w]) == pytest.approx(1.0) and q.w >= 0
    np.testing.assert_allclose(conv.pose_msg_to_matrix(pose.pose), T, atol=1e-12)
    np.testing.assert_allclose([q.x, q.y, q.z, q.w], Rotation.from_matrix(T[:3, :3]).as_quat() *
                               np.sign(Rotation.from_matrix(T[:3, :3]).as_quat()[3]), atol=1e-12)
    transform = conv.transform_stamped_from_matrix(T, HEADER, 'cam1')
    assert (transform.header.frame_id, transform.child_frame_id) == ('cam0', 'cam1')
    t = transform.transform.translation
    np.testing.assert_allclose([t.x, t.y, t.z], T[:3, 3])
    np.testing.assert_allclose(conv.quaternion_msg_to_matrix(transform.transform.rotation), T[:3, :3], atol=1e-12)
    # identity: (0, 0, 0, 1); a slightly non-orthonormal rotation still gives a unit quaternion
    assert conv.pose_stamped_from_matrix(np.eye(4), HEADER).pose.orientation.w == pytest.approx(1.0)
    noisy = T.copy()
    noisy[:3, :3] *= 1.001
    q = conv.pose_stamped_from_matrix(noisy, HEADER).pose.orientation
    assert np.linalg.norm([q.x, q.y, q.z, q.w]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        conv.pose_stamped_from_matrix(np.full((4, 4), np.nan), HEADER)


def test_stamps() -> None:
    stamp = Time(sec=1403715273, nanosec=262142976)
    assert conv.stamp_to_nanoseconds(stamp) == 1403715273262142976
    assert conv.nanoseconds_to_stamp(1403715273262142976) == stamp
    assert conv.stamp_to_seconds(stamp) == pytest.approx(1403715273.262143)
    header = conv.make_header(stamp, 'x')
    assert header.stamp == stamp and header.stamp is not stamp


@pytest.mark.parametrize('make', [
    lambda: conv.mono_to_image_msg(np.zeros((1, 10), np.uint8)[:, :5], HEADER),
    lambda: conv.mono_to_image_msg(np.ascontiguousarray(np.zeros((1, 1, 3), np.uint8)[:, :, 1]), HEADER),
    lambda: conv.rgb_to_image_msg(np.zeros((1, 8, 3), np.uint8)[:, :4], HEADER),
    lambda: conv.depth_to_image_msg(np.zeros((1, 6), np.float32)[:, 1:4], HEADER),
])
def test_one_row_views_get_the_step_of_their_width(make) -> None:
    """Regression (found by fuzzing): step came from strides[0], which numpy leaves at the parent's row size for a
    one-row view, so the message said step 10 with 5 bytes of data."""
    msg = make()
    assert msg.step * msg.height == len(msg.data)
    assert msg.step == msg.width * {'mono8': 1, 'rgb8': 3, '32FC1': 4}[msg.encoding]
