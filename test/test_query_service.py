"""lsm_node with the semantic model over loopback: ~/semantic/labels, ~/semantic/overlay, the ~/points label
field, the labels parameter and the ~/query service (good and bad requests, answers while the next pair runs).

The reconstructor is the real one with a tiny untrained LSM (``tiny_lsm_reconstructor``): labels and masks are
meaningless, their shapes, frames, stamps and mutual consistency are what is checked.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from conftest import NodeHarness, gated_reconstruct, harness_fixture, wait_until
from sensor_msgs.msg import Image, PointCloud2, PointField

from lsm_ros.ros import conversions
from lsm_ros.ros import node as lsm
from lsm_ros.semantics import DEFAULT_LABELS, MAX_PHRASE_CHARS, MAX_PHRASES, NO_LABEL

pytestmark = pytest.mark.timeout(900)
PRODUCTS_TIMEOUT_S = 180.0          # generous: the 2-core machine may be shared
QUERY_TIMEOUT_S = 60.0
PRODUCT_TYPES = {lsm.POINTS_TOPIC: PointCloud2, lsm.SEMANTIC_LABELS_TOPIC: Image,   # and ~/info
                 lsm.SEMANTIC_OVERLAY_TOPIC: Image}


class SemanticHarness(NodeHarness):
    """lsm_node (tiny LSM) in namespace ``semantic``, a stereo publisher, and a client node keeping its ~/info,
    ~/points and semantic images (:meth:`play` waits for them all, :meth:`products`), with a TextQuery client."""

    timeout_s = PRODUCTS_TIMEOUT_S

    def __init__(self, context: Any, reconstructor: Any) -> None:
        assert reconstructor.semantic
        super().__init__(context, reconstructor, namespace='semantic')

    def add_entities(self, context: Any) -> None:
        topics = self.node.output_topic_names()
        self.keep({key: (topics[key], msg_type) for key, msg_type in PRODUCT_TYPES.items()})

    def discovered(self) -> bool:
        return super().discovered() and self.query_client.service_is_ready() and self.products_published()

    def set_labels(self, value: Any) -> Any:
        from rclpy.parameter import Parameter
        return self.node.set_parameters([Parameter('labels', value=value)])[0]


graph = harness_fixture(SemanticHarness, 'tiny_lsm_reconstructor')


def _mono(msg: Image) -> np.ndarray:
    assert msg.encoding == 'mono8' and msg.step == msg.width
    return np.frombuffer(msg.data, np.uint8).reshape(msg.height, msg.width)


def test_labelled_cloud_and_mask_messages_round_trip() -> None:
    from rclpy.serialization import deserialize_message, serialize_message
    from std_msgs.msg import Header
    rng = np.random.default_rng(2)
    xyz = rng.normal(size=(50, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, size=(50, 3), dtype=np.uint8)
    confidence = rng.uniform(1, 3, size=50).astype(np.float32)
    labels = rng.integers(0, 64, size=50)
    header = Header(frame_id='cam0')
    msg = deserialize_message(serialize_message(conversions.pointcloud2_from_points(
        xyz, rgb, confidence, header, labels=labels)), PointCloud2)
    assert (msg.point_step, msg.row_step) == (24, 24 * 50)
    cloud = conversions.pointcloud2_to_numpy(msg)
    np.testing.assert_array_equal(cloud['xyz'], xyz)
    np.testing.assert_array_equal(cloud['rgb_u8'], rgb)
    np.testing.assert_array_equal(cloud['confidence'], confidence)
    np.testing.assert_array_equal(cloud['label'], labels)
    with pytest.raises(ValueError, match='labels must be'):
        conversions.pointcloud2_from_points(xyz, rgb, confidence, header, labels=np.full(50, -1))
    mask = rng.uniform(size=(4, 6)) > 0.5
    mask_msg = conversions.mask_to_image_msg(mask, header)
    np.testing.assert_array_equal(_mono(mask_msg), mask.astype(np.uint8) * 255)
    with pytest.raises(ValueError, match='bool'):
        conversions.mask_to_image_msg(mask.astype(np.uint8), header)


def test_query_before_the_first_reconstruction_is_refused(graph: SemanticHarness) -> None:
    response = graph.query(phrases=['chair'])
    assert not response.success and 'no reconstruction yet' in response.message
    assert list(response.masks) == [] and list(response.scores) == []


def test_geometry_only_node_refuses_queries_and_keeps_its_outputs(ros_context: Any, tiny_reconstructor: Any) -> None:
    assert not tiny_reconstructor.semantic
    with NodeHarness(ros_context, tiny_reconstructor, namespace='geometry_only') as geometry:
        assert set(geometry.node.output_topic_names()) == set(lsm.OUTPUT_TOPICS)
        response = geometry.query(phrases=['chair'])
        assert not response.success and 'geometry-only' in response.message, response.message


def test_semantic_products_of_a_stereo_pair(graph: SemanticHarness, stereo_frames: list[Any]) -> None:
    frame = stereo_frames[0]
    stamp_ns = graph.play(frame)
    products = graph.products(stamp_ns)
    left_frame = frame.left_image.header.frame_id
    info = products[lsm.INFO_TOPIC]
    assert list(info.labels) == list(DEFAULT_LABELS)
    width, height = info.width, info.height

    labels_msg = products[lsm.SEMANTIC_LABELS_TOPIC]
    assert (labels_msg.width, labels_msg.height, labels_msg.header.frame_id) == (width, height, left_frame)
    labels = _mono(labels_msg)
    assert labels.max() < len(DEFAULT_LABELS)

    overlay_msg = products[lsm.SEMANTIC_OVERLAY_TOPIC]
    assert (overlay_msg.encoding, overlay_msg.width, overlay_msg.height) == ('rgb8', width, height)
    assert overlay_msg.header.frame_id == left_frame

    cloud_msg = products[lsm.POINTS_TOPIC]
    assert [f.name for f in cloud_msg.fields] == ['x', 'y', 'z', 'rgb', 'confidence', 'label']
    label_field = cloud_msg.fields[-1]
    assert (label_field.datatype, label_field.offset, cloud_msg.point_step) == (PointField.UINT32, 20, 24)
    cloud = conversions.pointcloud2_to_numpy(cloud_msg)
    assert len(cloud['label']) == info.num_points > 0
    assert cloud['label'].max() < len(DEFAULT_LABELS) and np.isfinite(cloud['xyz']).all()

    # a query without phrases answers the active label set: its left label image is ~/semantic/labels
    response = graph.query(views='left', label_images=True)
    assert response.success, response.message
    assert list(response.phrases) == list(DEFAULT_LABELS) and list(response.views) == ['left']
    assert conversions.stamp_to_nanoseconds(response.stamp) == stamp_ns
    np.testing.assert_array_equal(_mono(response.label_images[0]), labels)


def test_query_answers_masks_label_images_and_scores(graph: SemanticHarness, stereo_frames: list[Any]) -> None:
    if graph.last_stamp_ns == 0:
        graph.play(stereo_frames[0])
    response = graph.query(phrases=[' chair', 'table '], threshold=0.0, views='', label_images=True)
    assert response.success, response.message
    assert list(response.phrases) == ['chair', 'table'] and list(response.views) == ['left', 'right']
    assert conversions.stamp_to_nanoseconds(response.stamp) == graph.last_stamp_ns
    frames = [response.left_frame_id, response.right_frame_id]
    assert all(frames) and frames[0] != frames[1]
    assert len(response.masks) == 2 * 2 and len(response.label_images) == 2
    masks = np.stack([_mono(m) for m in response.masks]).reshape(2, 2, *_mono(response.masks[0]).shape)
    labels = np.stack([_mono(m) for m in response.label_images])
    assert set(np.unique(masks)) <= {0, 255}
    for position, frame_id in enumerate(frames):             # view-major: masks[v * P + p]
        for p in range(2):
            msg = response.masks[position * 2 + p]
            assert msg.header.frame_id == frame_id and msg.header.stamp == response.stamp
            np.testing.assert_array_equal(masks[position, p] == 255, labels[position] == p)
        assert response.label_images[position].header.frame_id == frame_id
    scores = np.asarray(response.scores)
    np.testing.assert_allclose(scores, (masks == 255).mean(axis=(0, 2, 3)), rtol=1e-5)
    assert scores.sum() == pytest.approx(1.0, abs=1e-5)            # threshold 0: every pixel has a label
    assert all(0.0 <= p <= 1.0 for p in response.max_probabilities)
    assert max(response.max_probabilities) >= 0.5                    # two phrases: a pixel's best one has >= 0.5
    assert all(-1.0 - 1e-5 <= s <= 1.0 + 1e-5 for s in response.max_similarities)

    strict = graph.query(phrases=['chair', 'table'], threshold=0.9, views='right', label_images=True)
    assert strict.success, strict.message
    assert list(strict.views) == ['right'] and len(strict.masks) == 2 and len(strict.label_images) == 1
    strict_masks = np.stack([_mono(m) for m in strict.masks]) == 255
    assert not (strict_masks & ~(masks[1] == 255)).any()          # a stricter mask is inside the arg-max mask
    strict_labels = _mono(strict.label_images[0])
    np.testing.assert_array_equal(strict_labels == NO_LABEL, ~strict_masks.any(axis=0))
    assert list(graph.query(phrases=['chair'], label_images=False).label_images) == []

    # the 3-D answer beside it: a cloud per phrase and the detections in the left frame, camera masks (view-major) at
    # the input images' size in their frames, covering the same share of the region the model saw as the masks do
    frame = stereo_frames[0]
    assert len(response.clouds) == 2 and len(response.camera_masks) == 2 * 2 and len(response.camera_regions) == 2
    assert all(c.header.frame_id == frames[0] and c.header.stamp == response.stamp for c in response.clouds)
    assert [f.name for f in response.clouds[0].fields] == ['x', 'y', 'z', 'rgb', 'probability']
    assert response.detections.header.frame_id == frames[0]
    assert {d.results[0].hypothesis.class_id for d in response.detections.detections} <= {'chair', 'table'}
    for position, image in enumerate((frame.left_image, frame.right_image)):
        region = response.camera_regions[position]
        assert 0 < region.width <= image.width and 0 < region.height <= image.height
        for p in range(2):
            msg = response.camera_masks[position * 2 + p]
            assert (msg.width, msg.height, msg.header.frame_id) == (image.width, image.height, frames[position])
            camera_mask = _mono(msg) == 255
            seen = camera_mask[region.y_offset:region.y_offset + region.height,
                               region.x_offset:region.x_offset + region.width]
            assert seen.sum() == camera_mask.sum()                  # nothing outside the region the model saw
            assert seen.mean() == pytest.approx((masks[position, p] == 255).mean(), abs=0.05)


@pytest.mark.parametrize('fields,reason', [
    (dict(phrases=['chair', '']), 'phrase 1 is empty'),
    (dict(phrases=['   ']), 'phrase 0 is empty'),
    (dict(phrases=[f'thing {i}' for i in range(MAX_PHRASES + 1)]), f'at most {MAX_PHRASES}'),
    (dict(phrases=['x' * (MAX_PHRASE_CHARS + 1)]), f'at most {MAX_PHRASE_CHARS}'),
    (dict(phrases=['chair', 'Chair']), 'repeats phrase 0'),
    (dict(phrases=['chair'], views='top'), "'left', 'right', 'both'"),
    (dict(phrases=['chair'], threshold=1.5), '[0, 1]'),
    (dict(phrases=['chair'], threshold=-0.1), '[0, 1]'),
    (dict(phrases=['chair'], threshold=float('nan')), '[0, 1]'),
    (dict(phrases=['a ' * 99]), 'ValueError'),                    # 99 CLIP tokens > 77 (the tokenizer refuses)
    (dict(phrases=['chair'], cluster_distance=-0.5), 'cluster_distance'),
    (dict(phrases=['chair'], cluster_distance=float('nan')), 'cluster_distance'),
])
def test_bad_requests_are_refused_and_the_node_keeps_working(graph: SemanticHarness, stereo_frames: list[Any],
                                                             fields: dict[str, Any], reason: str) -> None:
    if graph.last_stamp_ns == 0:
        graph.play(stereo_frames[0])
    refused_before = graph.node.statistics()['counts'].get('queries_refused', 0)
    response = graph.query(**fields)
    assert not response.success and reason in response.message, response.message
    assert list(response.masks) == [] and list(response.phrases) == []
    assert graph.node.statistics()['counts']['queries_refused'] == refused_before + 1
    good = graph.query(phrases=['chair', 'floor'])
    assert good.success and len(good.masks) == 4, good.message


def test_query_is_answered_while_the_next_pair_is_reconstructed(graph: SemanticHarness,
                                                                stereo_frames: list[Any]) -> None:
    if graph.last_stamp_ns == 0:
        graph.play(stereo_frames[0])
    answered_stamp = graph.last_stamp_ns
    with gated_reconstruct(graph.node.reconstructor, PRODUCTS_TIMEOUT_S) as gate:
        next_stamp = graph.publish(stereo_frames[1])
        assert wait_until(gate.entered.is_set, 60.0), graph.node.statistics()
        started = time.monotonic()
        response = graph.query(phrases=['chair', 'table'])
        assert response.success, response.message
        assert conversions.stamp_to_nanoseconds(response.stamp) == answered_stamp
        assert not gate.release.is_set() and time.monotonic() - started < QUERY_TIMEOUT_S
        assert next_stamp not in graph.info_stamps()         # the next pair is still being reconstructed
    graph.products(next_stamp)
    later = graph.query(phrases=['chair', 'table'])
    assert later.success and conversions.stamp_to_nanoseconds(later.stamp) == next_stamp


def test_labels_parameter_sets_the_active_label_set(graph: SemanticHarness, stereo_frames: list[Any]) -> None:
    from rcl_interfaces.msg import ParameterType
    descriptor = graph.node.describe_parameter('labels')
    assert descriptor.type == ParameterType.PARAMETER_STRING_ARRAY and descriptor.description
    assert str(MAX_PHRASES) in descriptor.additional_constraints
    assert list(graph.node.get_parameter('labels').value) == list(DEFAULT_LABELS)

    for bad in (['chair', ' CHAIR'], ['  '], [f't{i}' for i in range(MAX_PHRASES + 1)], ['x' * 201]):
        result = graph.set_labels(bad)
        assert not result.successful and 'labels' in result.reason, (bad, result.reason)
    assert graph.node.node_config.labels == DEFAULT_LABELS

    custom = ['floor', 'wall', 'robot']
    assert graph.set_labels(custom).successful
    try:
        assert graph.node.node_config.labels == tuple(custom)
        products = graph.products(graph.play(stereo_frames[2 % len(stereo_frames)]))
        assert list(products[lsm.INFO_TOPIC].labels) == custom
        assert _mono(products[lsm.SEMANTIC_LABELS_TOPIC]).max() < len(custom)
        assert conversions.pointcloud2_to_numpy(products[lsm.POINTS_TOPIC])['label'].max() < len(custom)
        response = graph.query(phrases=[])                  # no phrases: the active label set
        assert response.success and list(response.phrases) == custom and len(response.masks) == 2 * len(custom)
    finally:
        assert graph.set_labels(list(DEFAULT_LABELS)).successful
