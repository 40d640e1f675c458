"""~/query's 3-D answer, called by a plain rclpy client as a manipulation stack would: lsm_node (tiny LSM) processes
a calibrated stereo pair (CameraInfo K, right P[0,3] = -fx*B), then the client checks the clouds, detections, camera
masks and regions of the response (frames, sizes, fields, that every point of a phrase's cloud projects, with the
input camera's K, into the phrase's camera mask).

The tiny LSM is untrained: its point maps are not on their pixels' rays. The reconstructor of this module puts each
pixel's point on its ray (the model's depth along the calibrated camera's ray, the right camera B to the right), as a
trained model's are, so the projection test checks the node's mapping of masks and points onto the input cameras.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np
import pytest
from conftest import TINY_PIPELINE, NodeHarness, wait_until

pytestmark = pytest.mark.timeout(900)

NAMESPACE = 'query3d'
SERVICE = f'/{NAMESPACE}/lsm_node/query'
WIDTH, HEIGHT = 320, 240                 # input images; at resolution 224: resized to 299x224, x 37..261 cropped
# The input pixels the model saw: columns x with (x + 0.5) * 299/320 in [37, 261), i.e. 40..278; every row.
EXPECTED_REGION = (40, 0, 239, 240)
FX, FY, CX, CY = 250.0, 250.0, 161.0, 118.0
BASELINE_M = 0.2
LEFT_FRAME, RIGHT_FRAME = 'arm_cam_left_optical', 'arm_cam_right_optical'
MIN_POINTS = 25                          # query_min_cluster_points of the node under test (default 10)
TIMEOUT_S = 120.0


def _camera_info(frame: str, tx: float) -> Any:
    from sensor_msgs.msg import CameraInfo
    K = [FX, 0.0, CX, 0.0, FY, CY, 0.0, 0.0, 1.0]
    return CameraInfo(header=_header(frame), width=WIDTH, height=HEIGHT, distortion_model='plumb_bob',
                      d=[0.0] * 5, k=K, r=[1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0],
                      p=[FX, 0.0, CX, tx, 0.0, FY, CY, 0.0, 0.0, 0.0, 1.0, 0.0])


def _header(frame: str) -> Any:
    from std_msgs.msg import Header
    return Header(frame_id=frame)


def _image(frame: str, seed: int) -> Any:
    from sensor_msgs.msg import Image
    u, v = np.meshgrid(np.arange(WIDTH), np.arange(HEIGHT))
    noise = np.random.default_rng(seed).integers(0, 60, size=(HEIGHT, WIDTH, 3))
    pixels = np.stack([(u * 255 // WIDTH), (v * 255 // HEIGHT), ((u // 40 + v // 40) % 2) * 200], axis=-1)
    pixels = np.clip(pixels + noise, 0, 255).astype(np.uint8)
    return Image(header=_header(frame), height=HEIGHT, width=WIDTH, encoding='rgb8', is_bigendian=0,
                 step=WIDTH * 3, data=pixels.tobytes())


def calibrated_frame(stamp_ns: int) -> Any:
    from lsm_ros.ros.bag_player import StereoFrame
    return StereoFrame(stamp_ns=stamp_ns, left_image=_image(LEFT_FRAME, 1), right_image=_image(RIGHT_FRAME, 2),
                       left_info=_camera_info(LEFT_FRAME, 0.0), right_info=_camera_info(RIGHT_FRAME, -FX * BASELINE_M))


def _input_K() -> np.ndarray:
    return np.array([[FX, 0, CX], [0, FY, CY], [0, 0, 1.0]])


def _on_rays(result: Any) -> Any:
    """Each pixel's point on its ray: depth = the model's |z| (finite, 0.5..5), the right camera at x = +B."""
    height, width = result.conf_1.shape
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    pixels = np.stack([u, v, np.ones_like(u)], axis=-1)
    for name, K, origin in (('pts3d_1', result.K_1, 0.0), ('pts3d_2', result.K_2, BASELINE_M)):
        depth = np.clip(np.nan_to_num(np.abs(getattr(result, name)[..., 2].astype(np.float64)), nan=1.0), 0.5, 5.0)
        points = (pixels @ np.linalg.inv(K).T) * depth[..., None]
        points[..., 0] += origin
        setattr(result, name, points.astype(np.float32))
    return result


@pytest.fixture(scope='module')
def rays_reconstructor() -> Iterator[Any]:
    """A tiny random LSM of this module whose reconstructions have their points on the pixel rays."""
    from lsm_ros.model.lsm import LsmConfig
    from lsm_ros.pipeline import Reconstructor
    reconstructor = Reconstructor.from_config(LsmConfig.tiny(), **TINY_PIPELINE)
    reconstruct = reconstructor.reconstruct
    reconstructor.reconstruct = lambda *args, **kwargs: _on_rays(reconstruct(*args, **kwargs))
    yield reconstructor


class ArmClient:
    """A manipulation stack's view of lsm_node: a plain rclpy node with a TextQuery client."""

    def __init__(self, context: Any, executor: Any) -> None:
        from rclpy.node import Node

        from lsm_ros.srv import TextQuery
        self.node = executor.add(Node('arm_query_client', context=context))
        self.client = self.node.create_client(TextQuery, SERVICE)

    def query(self, **fields: Any) -> Any:
        from lsm_ros.srv import TextQuery
        assert self.client.wait_for_service(timeout_sec=TIMEOUT_S), f'{SERVICE} not available'
        future = self.client.call_async(TextQuery.Request(**fields))
        assert wait_until(future.done, TIMEOUT_S), f'no answer to {fields}'
        return future.result()


@pytest.fixture(scope='module')
def arm(ros_context: Any, rays_reconstructor: Any) -> Iterator[tuple[NodeHarness, ArmClient]]:
    with NodeHarness(ros_context, rays_reconstructor, namespace=NAMESPACE,
                     query_min_cluster_points=MIN_POINTS) as harness:
        client = ArmClient(ros_context, harness.executor)
        harness.play(calibrated_frame(1_700_000_000_000_000_000))
        yield harness, client


def _mono(msg: Any) -> np.ndarray:
    assert msg.encoding == 'mono8' and msg.step == msg.width
    return np.frombuffer(msg.data, np.uint8).reshape(msg.height, msg.width)


def _cloud(msg: Any) -> dict[str, np.ndarray]:
    from sensor_msgs.msg import PointField
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == [
        (name, 4 * i, PointField.FLOAT32, 1) for i, name in enumerate(('x', 'y', 'z', 'rgb', 'probability'))]
    assert (msg.height, msg.point_step, msg.row_step, msg.is_bigendian, msg.is_dense) == \
        (1, 20, 20 * msg.width, False, True)
    points = np.frombuffer(msg.data, np.dtype([(f.name, '<f4') for f in msg.fields])).reshape(msg.width)
    return {'xyz': np.stack([points['x'], points['y'], points['z']], axis=-1).astype(np.float64),
            'probability': points['probability'], 'rgb': points['rgb'].view('<u4')}


def _project(xyz: np.ndarray, origin_x: float) -> tuple[np.ndarray, np.ndarray]:
    """Input-image pixels (column, row) of points of the left frame, seen by a camera at (origin_x, 0, 0)."""
    uvw = (xyz - [origin_x, 0.0, 0.0]) @ _input_K().T
    return np.round(uvw[:, 0] / uvw[:, 2]).astype(int), np.round(uvw[:, 1] / uvw[:, 2]).astype(int)


def test_query_answers_in_3d_on_the_input_cameras(arm: tuple[NodeHarness, ArmClient]) -> None:
    harness, client = arm
    phrases = ['chair', 'table', 'floor']
    response = client.query(phrases=phrases, threshold=0.0, views='both')
    assert response.success, response.message
    logging.getLogger(__name__).info('%s: %d detections, cloud sizes %s', response.message,
                                     len(response.detections.detections), [c.width for c in response.clouds])
    count = len(phrases)
    stamp = response.stamp
    assert (response.left_frame_id, response.right_frame_id) == (LEFT_FRAME, RIGHT_FRAME)
    # the 2-D answer is still there: model-size masks, view-major
    masks = np.stack([_mono(m) for m in response.masks]).reshape(2, count, *_mono(response.masks[0]).shape) == 255
    # camera masks: view-major, the input size and frame, 0/255, nothing outside the region the model saw, and
    # the same pixels as the model masks (each input pixel of the region takes one model pixel)
    assert len(response.camera_masks) == 2 * count and len(response.camera_regions) == 2
    for region in response.camera_regions:
        assert (region.x_offset, region.y_offset, region.width, region.height) == EXPECTED_REGION
        assert not region.do_rectify
    camera = np.stack([_mono(m) for m in response.camera_masks]).reshape(2, count, HEIGHT, WIDTH)
    assert set(np.unique(camera)) <= {0, 255}
    x, y, w, h = EXPECTED_REGION
    for v, frame in enumerate((LEFT_FRAME, RIGHT_FRAME)):
        for p in range(count):
            msg = response.camera_masks[v * count + p]
            assert (msg.header.frame_id, msg.header.stamp, msg.width, msg.height) == (frame, stamp, WIDTH, HEIGHT)
        outside = np.ones((HEIGHT, WIDTH), bool)
        outside[y:y + h, x:x + w] = False
        assert not camera[v][:, outside].any()
        assert (camera[v][:, ~outside] == 255).sum(axis=0).tolist() == [1] * (w * h)    # one phrase per pixel
        np.testing.assert_allclose((camera[v][:, ~outside] == 255).mean(axis=1), masks[v].mean(axis=(1, 2)),
                                   atol=0.05)
    # clouds: one per phrase, left optical frame, x y z rgb probability; the left view's points first
    assert len(response.clouds) == count
    for p, cloud_msg in enumerate(response.clouds):
        assert (cloud_msg.header.frame_id, cloud_msg.header.stamp) == (LEFT_FRAME, stamp)
        cloud = _cloud(cloud_msg)
        n_left, n_right = int(masks[0, p].sum()), int(masks[1, p].sum())
        assert len(cloud['xyz']) == n_left + n_right                # every pixel of the masks has a finite point
        assert np.isfinite(cloud['xyz']).all() and (cloud['rgb'] >> 24 == 0).all()
        assert ((cloud['probability'] >= 1.0 / count - 1e-6) & (cloud['probability'] <= 1.0)).all()
        for view, (points, origin) in enumerate(((cloud['xyz'][:n_left], 0.0),
                                                 (cloud['xyz'][n_left:], BASELINE_M))):
            u, v = _project(points, origin)
            inside = (u >= 0) & (u < WIDTH) & (v >= 0) & (v < HEIGHT)
            assert inside.all()
            assert (camera[view, p][v, u] == 255).all(), f'{phrases[p]}: points of view {view} off the camera mask'
    # detections: phrase by phrase, best first, the phrase as class; boxes hold their objects' points
    detections = response.detections
    assert (detections.header.frame_id, detections.header.stamp) == (LEFT_FRAME, stamp)
    phrase_of = [phrases.index(d.results[0].hypothesis.class_id) for d in detections.detections]
    assert phrase_of == sorted(phrase_of)
    from lsm_ros.query3d import PhrasePoints, detect_objects
    distance = harness.node.get_parameter('query_cluster_distance').value
    for p, phrase in enumerate(phrases):
        mine = [d for d in detections.detections if d.results[0].hypothesis.class_id == phrase]
        assert [d.id for d in mine] == [f'{p}/{rank}' for rank in range(len(mine))]
        scores = [d.results[0].hypothesis.score for d in mine]
        assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
        cloud = _cloud(response.clouds[p])
        low, high = (cloud['xyz'].min(axis=0), cloud['xyz'].max(axis=0)) if len(cloud['xyz']) else (0.0, 0.0)
        # the objects the documented algorithm (lsm_ros.query3d) finds in the cloud: the wiring loses nothing
        count_points = len(cloud['xyz'])
        expected = detect_objects(PhrasePoints(phrase, cloud['xyz'].astype(np.float32),
                                               np.zeros((count_points, 3), np.uint8), cloud['probability'],
                                               np.zeros(count_points, np.uint8), np.arange(count_points)),
                                  distance, MIN_POINTS)
        assert len(expected) == len(mine)
        for d, theirs in zip(mine, expected):
            assert d.header.frame_id == LEFT_FRAME and d.header.stamp == stamp and len(d.results) == 1
            assert d.results[0].pose.pose == d.bbox.center
            rotation = _rotation(d.bbox.center.orientation)
            assert np.linalg.det(rotation) == pytest.approx(1.0)
            size = np.array([d.bbox.size.x, d.bbox.size.y, d.bbox.size.z])
            centre = np.array([d.bbox.center.position.x, d.bbox.center.position.y, d.bbox.center.position.z])
            assert (size >= 0).all() and (centre >= low - 1e-6).all() and (centre <= high + 1e-6).all()
            assert d.results[0].hypothesis.score == pytest.approx(theirs.score, rel=1e-6)
            np.testing.assert_allclose(size, theirs.box.size, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(centre, theirs.box.center, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(rotation, theirs.box.rotation, atol=1e-5)
            object_points = cloud['xyz'][theirs.point_indices]
            assert theirs.num_points >= MIN_POINTS
            # the box spans its object: 2nd to 98th percentile along its axes
            local = (object_points - centre) @ rotation
            np.testing.assert_allclose(np.percentile(local, 98, axis=0) - np.percentile(local, 2, axis=0), size,
                                       rtol=1e-4, atol=1e-6)
        assert sum(d.num_points for d in expected) <= count_points


def _rotation(q: Any) -> np.ndarray:
    from scipy.spatial.transform import Rotation
    quaternion = np.array([q.x, q.y, q.z, q.w])
    assert np.linalg.norm(quaternion) == pytest.approx(1.0, abs=1e-6)
    return Rotation.from_quat(quaternion).as_matrix()


def test_cluster_distance_of_the_request_and_one_view(arm: tuple[NodeHarness, ArmClient]) -> None:
    _, client = arm
    whole = client.query(phrases=['chair', 'table'], views='left', cluster_distance=1000.0)
    assert whole.success, whole.message
    assert list(whole.views) == ['left'] and len(whole.camera_masks) == 2 and len(whole.camera_regions) == 1
    masks = [_mono(m) == 255 for m in whole.masks]
    for p, cloud_msg in enumerate(whole.clouds):
        cloud = _cloud(cloud_msg)
        assert len(cloud['xyz']) == masks[p].sum()                 # the left view's points only
        u, v = _project(cloud['xyz'], 0.0)
        assert (_mono(whole.camera_masks[p])[v, u] == 255).all()
        mine = [d for d in whole.detections.detections if d.results[0].hypothesis.class_id == ['chair', 'table'][p]]
        # one object holding every point of the phrase (a distance beyond the scene joins them all)
        assert len(mine) == (1 if len(cloud['xyz']) >= MIN_POINTS else 0)
        if mine:
            assert mine[0].results[0].hypothesis.score == pytest.approx(float(cloud['probability'].mean()), rel=1e-5)
    for bad in (-0.1, float('nan'), float('inf')):
        refused = client.query(phrases=['chair'], cluster_distance=bad)
        assert not refused.success and 'cluster_distance' in refused.message, refused.message
        assert list(refused.clouds) == [] and list(refused.camera_masks) == []
