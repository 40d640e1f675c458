"""lsm_node rendering over loopback: the ~/render service (good and bad requests, answers while the next pair runs)
and the render_views parameter (virtual views published after every reconstruction, midway frame on /tf).

The reconstructor is the real one with a tiny untrained LSM (``tiny_lsm_reconstructor``, model resolution 224).
Its untrained Gaussians lie behind the left camera (nothing to see), so every reconstruction's Gaussians are
replaced by a known scene (:func:`known_gaussians`: two fronto-parallel layers of the left view's pixels, a red one
at depth 2 in front of a blue one at depth 3, random features): the renders of the identity pose have known
alpha, depth and colour. Features and labels stay meaningless; their sizes, encodings and consistency with alpha
are checked, as are frames, stamps and intrinsics.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np
import pytest
from conftest import NodeHarness, gated_reconstruct, harness_fixture, wait_until
from geometry_msgs.msg import Point, Pose, PoseStamped, Quaternion
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage

from lsm_ros.pipeline import GaussianCloud, Reconstruction
from lsm_ros.rendering import SH_C0
from lsm_ros.ros import conversions
from lsm_ros.ros import node as lsm
from lsm_ros.semantics import DEFAULT_LABELS, NO_LABEL

pytestmark = pytest.mark.timeout(600)
PRODUCTS_TIMEOUT_S = 180.0          # generous: the 2-core machine may be shared
RENDER_TIMEOUT_S = 120.0
MODEL_SIZE = 224
VIEWS = ('left', 'right', 'midway')
SMALL_RENDER = dict(width=32, height=24, channels=['alpha'])   # a cheap good request
LAYER_DEPTHS = (2.0, 3.0)                  # known scene: the front and back layer's depth
LAYER_COLOURS = ((0.9, 0.2, 0.1), (0.1, 0.2, 0.9))


def known_gaussians(result: Reconstruction) -> GaussianCloud:
    """2·H·W Gaussians (as LSM's: one per pixel of both views) on the left view's pixel rays: view 1's rows at
    depth 2 (red), view 2's at depth 3 (blue); round, about 0.6 pixel wide, opacity 0.8; random 64-d features."""
    width, height = result.size
    u, v = np.meshgrid(np.arange(width), np.arange(height))
    rays = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=-1) @ np.linalg.inv(result.K_1).T
    means, scales, sh = [], [], []
    for depth, colour in zip(LAYER_DEPTHS, LAYER_COLOURS):
        means.append(rays * depth)
        sigma = 0.6 * depth / result.K_1[0, 0]
        scales.append(np.tile([sigma, sigma, sigma / 10], (u.size, 1)))
        coefficients = np.zeros((u.size, 16, 3))
        coefficients[:, 0] = (np.asarray(colour) - 0.5) / SH_C0
        sh.append(coefficients)
    count = 2 * u.size
    return GaussianCloud(
        means=np.concatenate(means).astype(np.float32), scales=np.concatenate(scales).astype(np.float32),
        rotations=np.tile(np.float32([0, 0, 0, 1]), (count, 1)), opacities=np.full((count, 1), 0.8, np.float32),
        sh=np.concatenate(sh).astype(np.float32),
        features=np.random.default_rng(0).normal(size=(count, 64)).astype(np.float32))


class RenderHarness(NodeHarness):
    """lsm_node (tiny LSM, render_views = all three, publish_tf) in namespace ``render``, a stereo publisher, and
    a client node keeping ~/info, ~/relative_pose ('pose'), /tf ('tf') and the render views ('<view>/image',
    '<view>/camera_info'), with a RenderView client."""

    timeout_s = PRODUCTS_TIMEOUT_S      # renders too (>= RENDER_TIMEOUT_S)

    def __init__(self, context: Any, reconstructor: Any) -> None:
        super().__init__(context, reconstructor, namespace='render', render_views=list(VIEWS), publish_tf=True)

    def add_entities(self, context: Any) -> None:
        topics = {'pose': (self.node.output_topic_names()[lsm.RELATIVE_POSE_TOPIC], PoseStamped),
                  'tf': (lsm.TF_TOPIC, TFMessage)}
        for view in VIEWS:
            image_topic, info_topic = self.node.render_view_topic_names(view)
            topics[f'{view}/image'] = (image_topic, Image)
            topics[f'{view}/camera_info'] = (info_topic, CameraInfo)
        self.keep(topics)

    def discovered(self) -> bool:
        return super().discovered() and self.render_client.service_is_ready() and self.products_published()


@pytest.fixture(scope='module')
def known_scene_reconstructor(tiny_lsm_reconstructor: Any) -> Iterator[Any]:
    """``tiny_lsm_reconstructor`` whose reconstructions carry :func:`known_gaussians` (for this module)."""
    assert tiny_lsm_reconstructor.semantic
    reconstruct = tiny_lsm_reconstructor.reconstruct

    def reconstruct_known_scene(*args: Any, **kwargs: Any) -> Reconstruction:
        result = reconstruct(*args, **kwargs)
        return dataclasses.replace(result, gaussians=known_gaussians(result))

    tiny_lsm_reconstructor.reconstruct = reconstruct_known_scene   # instance attribute, removed below
    try:
        yield tiny_lsm_reconstructor
    finally:
        del tiny_lsm_reconstructor.reconstruct


graph = harness_fixture(RenderHarness, 'known_scene_reconstructor')


@pytest.fixture(scope='module')
def products(graph: RenderHarness, stereo_frames: list[Any]) -> dict[str, Any]:
    """The products of the first stereo pair (reconstructed once per module)."""
    return graph.products(graph.publish(stereo_frames[0]))


def _rgb(msg: Image) -> np.ndarray:
    assert msg.encoding == 'rgb8' and msg.step == 3 * msg.width
    return np.frombuffer(msg.data, np.uint8).reshape(msg.height, msg.width, 3)


def _mono(msg: Image) -> np.ndarray:
    assert msg.encoding == 'mono8' and msg.step == msg.width
    return np.frombuffer(msg.data, np.uint8).reshape(msg.height, msg.width)


def _k(msg: CameraInfo) -> np.ndarray:
    return np.asarray(msg.k).reshape(3, 3)


def _pose(T: np.ndarray) -> Pose:
    x, y, z, w = Rotation.from_matrix(T[:3, :3]).as_quat()
    return Pose(position=Point(x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3])),
                orientation=Quaternion(x=float(x), y=float(y), z=float(z), w=float(w)))


def test_rendered_view_conversions() -> None:
    header = Header(frame_id='cam0')
    rgb = np.array([[[0.0, 0.5, 1.0], [-0.2, 1.7, np.nan]]], dtype=np.float32)
    np.testing.assert_array_equal(_rgb(conversions.unit_rgb_to_image_msg(rgb, header)), [[[0, 128, 255], [0, 255, 0]]])
    with pytest.raises(ValueError, match='floats'):
        conversions.unit_rgb_to_image_msg(np.zeros((1, 2, 3), np.uint8), header)
    alpha = np.array([[0.25, np.nan], [1.0, 0.0]], dtype=np.float64)
    msg = conversions.float_image_to_msg(alpha, header)
    assert (msg.encoding, msg.width, msg.height, msg.step) == ('32FC1', 2, 2, 8)
    np.testing.assert_array_equal(conversions.depth_image_to_numpy(msg), alpha.astype(np.float32))

    K = np.array([[200.0, 0.0, 111.5], [0.0, 210.0, 100.0], [0.0, 0.0, 1.0]])
    half = conversions.resized_intrinsics(K, (224, 224), (112, 112))
    np.testing.assert_allclose(half, [[100.0, 0.0, 55.5], [0.0, 105.0, 49.75], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(conversions.resized_intrinsics(half, (112, 112), (224, 224)), K)

    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler('y', 10.0, degrees=True).as_matrix()
    T[:3, 3] = (0.2, -0.1, 0.05)
    np.testing.assert_allclose(conversions.checked_pose_msg_to_matrix(_pose(T)), T, atol=1e-12)
    np.testing.assert_allclose(conversions.checked_pose_msg_to_matrix(Pose()), np.eye(4))   # default w = 1
    for pose, reason in ((Pose(orientation=Quaternion(w=0.0)), 'all-zero quaternion'),
                         (Pose(orientation=Quaternion(w=1.01)), 'unit quaternion'),
                         (Pose(position=Point(x=float('inf'))), 'non-finite')):
        with pytest.raises(ValueError, match=reason):
            conversions.checked_pose_msg_to_matrix(pose)
    midway = lsm.midway_pose(T)
    np.testing.assert_allclose(midway[:3, 3], T[:3, 3] / 2)
    np.testing.assert_allclose(midway[:3, :3] @ midway[:3, :3], T[:3, :3], atol=1e-12)


def test_render_views_parameter(graph: RenderHarness) -> None:
    from rcl_interfaces.msg import ParameterType
    from rclpy.parameter import Parameter
    descriptor = graph.node.describe_parameter('render_views')
    assert descriptor.type == ParameterType.PARAMETER_STRING_ARRAY and 'midway' in descriptor.additional_constraints
    assert graph.node.node_config.render_views == VIEWS
    for bad, reason in ((['left', 'top'], "unknown view 'top'"), (['left', 'left'], 'listed twice')):
        result = graph.node.set_parameters([Parameter('render_views', value=bad)])[0]
        assert not result.successful and reason in result.reason, result.reason
    assert graph.node.node_config.render_views == VIEWS


def test_render_before_the_first_reconstruction_is_refused(graph: RenderHarness) -> None:
    response = graph.render(channels=[])               # an empty request
    assert not response.success and 'no reconstruction yet' in response.message, response.message
    assert response.rgb.width == 0 and response.camera_info.width == 0


def test_geometry_only_node_refuses_renders(ros_context: Any, tiny_reconstructor: Any) -> None:
    with NodeHarness(ros_context, tiny_reconstructor, namespace='render_geometry_only') as geometry:
        geometry.timeout_s = RENDER_TIMEOUT_S
        response = geometry.render(channels=['labels'])
        assert not response.success and 'geometry-only' in response.message, response.message


def test_identity_pose_renders_the_left_view(graph: RenderHarness, products: dict[str, Any],
                                             stereo_frames: list[Any]) -> None:
    info = products[lsm.INFO_TOPIC]
    assert (info.width, info.height) == (MODEL_SIZE, MODEL_SIZE)
    response = graph.render(channels=['rgb', 'depth', 'alpha'])
    assert response.success, response.message
    assert conversions.stamp_to_nanoseconds(response.stamp) == graph.last_stamp_ns
    left_frame = stereo_frames[0].left_image.header.frame_id
    right_frame = stereo_frames[0].right_image.header.frame_id
    assert (response.left_frame_id, response.right_frame_id) == (left_frame, right_frame)
    for image in (response.rgb, response.depth, response.alpha, response.camera_info):
        assert (image.width, image.height, image.header.frame_id) == (MODEL_SIZE, MODEL_SIZE, left_frame)
        assert image.header.stamp == response.stamp
    np.testing.assert_allclose(_k(response.camera_info), np.reshape(info.k_left, (3, 3)))
    alpha = conversions.depth_image_to_numpy(response.alpha)
    depth = conversions.depth_image_to_numpy(response.depth)
    assert np.isfinite(alpha).all() and alpha.min() >= 0.0 and alpha.max() <= 1.0 + 1e-6
    covered = alpha >= 0.5
    assert covered[2:-2, 2:-2].all()                   # the known scene fills the view (its edges may fade)
    assert np.isfinite(depth[covered]).all() and np.isnan(depth[~covered]).all()
    assert LAYER_DEPTHS[0] - 1e-3 <= depth[covered].min() and depth[covered].max() <= LAYER_DEPTHS[1]
    assert np.median(depth[covered]) == pytest.approx(LAYER_DEPTHS[0], abs=0.1)    # the front layer hides the back
    rgb = _rgb(response.rgb)
    np.testing.assert_allclose(np.median(rgb[covered], axis=0), np.multiply(LAYER_COLOURS[0], 255), atol=20)
    assert response.features.width == response.labels.width == 0 and list(response.phrases) == []

    default = graph.render(channels=[])                # no channels: rgb and depth
    assert default.success and default.rgb.width == default.depth.width == MODEL_SIZE
    assert default.alpha.width == 0
    np.testing.assert_array_equal(_rgb(default.rgb), _rgb(response.rgb))


def test_shifted_pose_custom_camera_features_and_labels(graph: RenderHarness, products: dict[str, Any]) -> None:
    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler('y', 5.0, degrees=True).as_matrix()
    T[:3, 3] = (0.05, 0.0, 0.0)
    k = [120.0, 0.0, 79.5, 0.0, 120.0, 59.5, 0.0, 0.0, 1.0]
    response = graph.render(pose=_pose(T), k=k, width=160, height=120, phrases=[' chair', 'floor '],
                            channels=['features', 'labels', 'alpha', 'features'])
    assert response.success, response.message
    assert response.rgb.width == response.depth.width == 0
    assert (response.camera_info.width, response.camera_info.height) == (160, 120)
    np.testing.assert_array_equal(response.camera_info.k, k)
    assert list(response.phrases) == ['chair', 'floor']
    covered = conversions.depth_image_to_numpy(response.alpha) >= 0.5
    assert covered.shape == (120, 160) and covered.any()
    features = _rgb(response.features)
    labels = _mono(response.labels)
    assert not features[~covered].any() and features[covered].any()
    assert (labels[covered] < 2).all() and (labels[~covered] == NO_LABEL).all()

    active = graph.render(width=112, height=112, channels=['labels'])    # k zeros: K_1 at the requested size
    assert active.success and list(active.phrases) == list(DEFAULT_LABELS), active.message
    np.testing.assert_allclose(_k(active.camera_info), conversions.resized_intrinsics(
        np.reshape(products[lsm.INFO_TOPIC].k_left, (3, 3)), (MODEL_SIZE, MODEL_SIZE), (112, 112)))
    assert _mono(active.labels).shape == (112, 112)


@pytest.mark.parametrize('fields,reason', [
    (dict(pose=Pose(orientation=Quaternion(w=0.0))), 'all-zero quaternion'),
    (dict(pose=Pose(orientation=Quaternion(x=0.5, w=1.0))), 'unit quaternion'),
    (dict(pose=Pose(position=Point(z=float('nan')))), 'non-finite'),
    (dict(k=[-100.0, 0, 50, 0, 100, 50, 0, 0, 1], width=100, height=100), 'k must be'),
    (dict(k=[100.0, 3, 50, 0, 100, 50, 0, 0, 1], width=100, height=100), 'k must be'),
    (dict(k=[100.0, 0, float('nan'), 0, 100, 50, 0, 0, 1], width=100, height=100), 'k must be'),
    (dict(width=4096, height=100), 'exceeds 2048'),
    (dict(width=100, height=0), 'both be'),
    (dict(width=2048, height=1024, channels=['rgb', 'features']), 'features and labels are rendered at up to'),
    (dict(channels=['rgb', 'normals']), "unknown channel(s) ['normals']"),
    (dict(channels=['labels'], phrases=['chair', 'Chair']), 'repeats phrase 0'),
    (dict(channels=['rgb'], phrases=['chair']), "'labels' channel"),
])
def test_bad_requests_are_refused_and_the_node_keeps_working(graph: RenderHarness, products: dict[str, Any],
                                                             fields: dict[str, Any], reason: str) -> None:
    refused_before = graph.node.statistics()['counts'].get('renders_refused', 0)
    response = graph.render(**fields)
    assert not response.success and reason in response.message, response.message
    assert response.rgb.width == 0 and response.camera_info.width == 0
    assert graph.node.statistics()['counts']['renders_refused'] == refused_before + 1
    good = graph.render(**SMALL_RENDER)
    assert good.success and (good.alpha.width, good.alpha.height) == (32, 24), good.message


def test_render_views_are_published_after_each_reconstruction(graph: RenderHarness, products: dict[str, Any],
                                                              stereo_frames: list[Any]) -> None:
    info = products[lsm.INFO_TOPIC]
    assert info.pose_valid
    left_frame = stereo_frames[0].left_image.header.frame_id
    right_frame = stereo_frames[0].right_image.header.frame_id
    K_left, K_right = np.reshape(info.k_left, (3, 3)), np.reshape(info.k_right, (3, 3))
    expected = {'left': (left_frame, K_left), 'right': (right_frame, K_right),
                'midway': (left_frame + lsm.MIDWAY_FRAME_SUFFIX, (K_left + K_right) / 2)}
    for view, (frame, K) in expected.items():
        image, camera_info = products[f'{view}/image'], products[f'{view}/camera_info']
        assert _rgb(image).shape == (MODEL_SIZE, MODEL_SIZE, 3)
        assert image.header == camera_info.header and image.header.frame_id == frame
        assert (camera_info.width, camera_info.height) == (MODEL_SIZE, MODEL_SIZE)
        np.testing.assert_allclose(_k(camera_info), K)
    identity = graph.render(channels=['rgb'])
    assert identity.success, identity.message
    np.testing.assert_array_equal(_rgb(products['left/image']), _rgb(identity.rgb))

    right = graph.render(pose=products['pose'].pose, k=info.k_right, channels=['rgb'])   # the right camera
    assert right.success, right.message
    difference = np.abs(_rgb(products['right/image']).astype(int) - _rgb(right.rgb))
    assert difference.max() <= 1                         # the pose went through a quaternion

    transforms = {t.child_frame_id: t.transform for t in products['tf'].transforms}
    estimated_right = right_frame + '_estimated'                # /tf never claims the right image's own frame
    assert set(transforms) == {estimated_right, left_frame + lsm.MIDWAY_FRAME_SUFFIX}
    to_right = transforms[estimated_right].translation
    to_midway = transforms[left_frame + lsm.MIDWAY_FRAME_SUFFIX].translation
    np.testing.assert_allclose([to_midway.x, to_midway.y, to_midway.z],
                               np.array([to_right.x, to_right.y, to_right.z]) / 2, rtol=1e-6, atol=1e-9)


def test_render_is_answered_while_the_next_pair_is_reconstructed(graph: RenderHarness, products: dict[str, Any],
                                                                 stereo_frames: list[Any]) -> None:
    answered_stamp = graph.last_stamp_ns
    with gated_reconstruct(graph.node.reconstructor, PRODUCTS_TIMEOUT_S) as gate:   # around the known-scene wrapper
        next_stamp = graph.publish(stereo_frames[1])
        assert wait_until(gate.entered.is_set, 60.0), graph.node.statistics()
        response = graph.render(**SMALL_RENDER)
        assert response.success, response.message
        assert conversions.stamp_to_nanoseconds(response.stamp) == answered_stamp
        assert not gate.release.is_set() and next_stamp not in graph.info_stamps()
    graph.products(next_stamp)
    later = graph.render(**SMALL_RENDER)
    assert later.success and conversions.stamp_to_nanoseconds(later.stamp) == next_stamp
    assert graph.node.statistics()['counts'].get('render_view_failures', 0) == 0
