"""lsm_node end to end over loopback: the real Reconstructor (tiny random DUSt3R), real rclpy, real messages.

Stereo frames come from the EuRoC bag when present (else the synthetic bag), rectified like the demo.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from conftest import (NODE_TIMEOUT_S, STEREO_REMAPS, NodeHarness, ProductCollector, harness_fixture, make_lsm_node,
                      wait_until)

from lsm_ros.ros import conversions
from lsm_ros.ros import node as lsm

pytestmark = pytest.mark.timeout(180)
MAX_LATENCY_S = 20.0


class ProductHarness(NodeHarness):
    """lsm_node (tiny DUSt3R) in namespace ``lsm`` with a :class:`ProductCollector` of all its products."""

    def add_entities(self, context: Any) -> None:
        self.collector = ProductCollector(context, self.node)
        self.executor.add(self.collector.node)

    def discovered(self) -> bool:
        return super().discovered() and self.collector.connected()

    def play_products(self, frame: Any) -> tuple[int, float]:
        """Publish a frame and wait for its ~/info, then for its other products; returns (stamp, seconds until the
        ~/info arrived)."""
        start = time.monotonic()
        stamp_ns = self.publish(frame)
        assert wait_until(lambda: self.collector.by_stamp(lsm.INFO_TOPIC, stamp_ns), NODE_TIMEOUT_S), \
            f'no ~/info for {stamp_ns}: {self.node.statistics()}'
        latency_s = time.monotonic() - start
        others = [k for k in lsm.OUTPUT_TOPICS if k != lsm.INFO_TOPIC]
        assert wait_until(lambda: all(self.collector.by_stamp(k, stamp_ns) for k in others), 10.0), \
            {k: len(self.collector.by_stamp(k, stamp_ns)) for k in others}
        return stamp_ns, latency_s


graph = harness_fixture(ProductHarness)


def test_the_plain_node_is_active_at_once_and_reports_its_state(graph: ProductHarness) -> None:
    node = graph.node
    assert node.get_parameter('managed').value is False and node.get_parameter('image_transport').value == 'raw'
    assert node.lifecycle_state == lsm.STATE_ACTIVE
    statistics = node.statistics()
    assert statistics['lifecycle_state'] == 'active' and statistics['worker_running'] and statistics['model_on_device']
    assert statistics['inactive_drops'] == 0 and statistics['out_of_memory'] == 0
    assert statistics['failed_pairs_in_a_row'] == 0
    for name in ('managed', 'image_transport', 'torch_threads'):
        descriptor = node.describe_parameter(name)
        assert descriptor.read_only and descriptor.description, name
        assert 'read-only' in graph.set_parameters(**{name: node.get_parameter(name).value})[0].reason


def test_node_subscribes_to_the_remapped_inputs(graph: ProductHarness) -> None:
    subscribed = {s.topic_name for s in graph.node.subscriptions}
    assert set(STEREO_REMAPS.values()) <= subscribed
    assert graph.node.output_topic_names() == {
        topic: '/lsm/lsm_node/' + topic[2:] for topic in lsm.OUTPUT_TOPICS}


def test_every_product_of_a_stereo_pair(graph: ProductHarness, stereo_frames: list[Any]) -> None:
    frame = stereo_frames[0]
    stamp_ns, latency_s = graph.play_products(frame)
    assert latency_s < MAX_LATENCY_S
    collector = graph.collector
    left_frame, right_frame = frame.left_image.header.frame_id, frame.right_image.header.frame_id
    assert left_frame and right_frame and left_frame != right_frame

    info = collector.by_stamp(lsm.INFO_TOPIC, stamp_ns)[0]
    width, height = info.width, info.height
    assert (width, height) == (224, 224)                     # model resolution of the tiny test pipeline
    assert info.header.frame_id == left_frame
    # the bag's CameraInfos describe a rectified rig: the pose is the calibration's, the scale a dense fit (metric
    # when the point map fits one: the tiny untrained model may not, then model units are taken as metres)
    baseline_m = conversions.stereo_baseline_from_camera_info(frame.right_info)
    assert info.baseline_m == pytest.approx(baseline_m)
    assert info.pose_source == 'stereo_calibration' and info.pose_valid
    assert (info.scale_source, info.scale_factor > 0) == (('stereo_rig', True) if info.metric_scale else ('none', True))
    assert info.intrinsics_source == 'camera_info'
    assert 0 < info.inference_time_s <= info.total_time_s < MAX_LATENCY_S

    cloud_msg = collector.by_stamp(lsm.POINTS_TOPIC, stamp_ns)[0]
    assert cloud_msg.header.frame_id == left_frame
    assert [f.name for f in cloud_msg.fields] == ['x', 'y', 'z', 'rgb', 'confidence']
    assert (cloud_msg.height, cloud_msg.point_step, cloud_msg.is_dense) == (1, 20, True)
    assert 0 < cloud_msg.width == info.num_points <= 2 * width * height
    cloud = conversions.pointcloud2_to_numpy(cloud_msg)
    assert np.isfinite(cloud['xyz']).all() and (cloud['confidence'] >= 1.0).all()
    if frame.left_image.encoding == 'mono8':                # grey input: grey points
        assert (cloud['rgb_u8'][:, 0] == cloud['rgb_u8'][:, 2]).all()

    for key, frame_id in ((lsm.LEFT_DEPTH_TOPIC, left_frame), (lsm.RIGHT_DEPTH_TOPIC, right_frame)):
        depth_msg = collector.by_stamp(key, stamp_ns)[0]
        assert (depth_msg.encoding, depth_msg.width, depth_msg.height) == ('32FC1', width, height)
        assert depth_msg.header.frame_id == frame_id
        depth = conversions.depth_image_to_numpy(depth_msg)
        assert np.isnan(depth).any() or (depth[np.isfinite(depth)] > 0).all()

    for key, frame_id, k in ((lsm.LEFT_MODEL_INFO_TOPIC, left_frame, info.k_left),
                             (lsm.RIGHT_MODEL_INFO_TOPIC, right_frame, info.k_right)):
        camera_info = collector.by_stamp(key, stamp_ns)[0]
        assert (camera_info.width, camera_info.height, camera_info.header.frame_id) == (width, height, frame_id)
        np.testing.assert_allclose(camera_info.k, k)
        assert camera_info.k[0] > 0 and camera_info.k[4] > 0
    # the rectified input's focal (P[0,0]), scaled to the model resolution: 224 / min(input W, H)
    expected_fx = frame.left_info.p[0] * 224 / min(frame.left_image.width, frame.left_image.height)
    assert info.k_left[0] == pytest.approx(expected_fx, rel=0.02)

    pose = collector.by_stamp(lsm.RELATIVE_POSE_TOPIC, stamp_ns)[0]
    assert pose.header.frame_id == left_frame
    q = pose.pose.orientation
    assert np.linalg.norm([q.x, q.y, q.z, q.w]) == pytest.approx(1.0)
    # the rig's right camera: (B, 0, 0) from the left one, unrotated (B in metres, or in model units taken as metres)
    t = pose.pose.position
    np.testing.assert_allclose([t.x, t.y, t.z, abs(q.w)], [baseline_m, 0.0, 0.0, 1.0], atol=1e-6)
    assert collector.messages[lsm.TF_TOPIC] == []            # publish_tf is false by default


def test_publish_tf_parameter_adds_the_transform(graph: ProductHarness, stereo_frames: list[Any]) -> None:
    results = graph.set_parameters(publish_tf=True)
    assert results[0].successful, results[0].reason
    try:
        frame = stereo_frames[1]
        stamp_ns, _ = graph.play_products(frame)
        assert wait_until(lambda: graph.collector.by_stamp(lsm.TF_TOPIC, stamp_ns), 10.0)
        transform = graph.collector.by_stamp(lsm.TF_TOPIC, stamp_ns)[0].transforms[0]
        assert transform.header.frame_id == frame.left_image.header.frame_id
        # the estimated right camera, never the right image's own frame (robot_state_publisher owns that one)
        assert transform.child_frame_id == frame.right_image.header.frame_id + '_estimated'
        pose = graph.collector.by_stamp(lsm.RELATIVE_POSE_TOPIC, stamp_ns)[0].pose
        t = transform.transform.translation
        np.testing.assert_allclose([t.x, t.y, t.z], [pose.position.x, pose.position.y, pose.position.z])
    finally:
        assert graph.set_parameters(publish_tf=False)[0].successful


def test_invalid_parameter_values_are_rejected_with_a_reason(graph: ProductHarness) -> None:
    refused = {'resolution': 512, 'device': 'cuda', 'min_confidence': 0.5, 'point_stride': 0,
               'sync_tolerance_s': 'fast', 'sync_queue_size': 5000, 'max_input_age_s': -1.0}
    for name, value in refused.items():
        result = graph.set_parameters(**{name: value})[0]
        assert not result.successful, name
        assert name in result.reason or 'type' in result.reason, result.reason
    assert 'read-only' in graph.set_parameters(resolution=512)[0].reason
    assert graph.node.get_parameter('resolution').value == 224
    assert graph.node.get_parameter('min_confidence').value == 1.0

    accepted = graph.set_parameters(min_confidence=1.5, point_stride=2)
    try:
        assert all(r.successful for r in accepted)
        assert graph.node.reconstructor.config.min_confidence == 1.5
        assert graph.node.node_config.point_stride == 2
    finally:
        assert all(r.successful for r in graph.set_parameters(min_confidence=1.0, point_stride=1))
    assert graph.node.reconstructor.config.min_confidence == 1.0


def test_parameter_descriptors_describe_ranges_and_choices(graph: ProductHarness) -> None:
    descriptors = {d.name: d for d in graph.node.describe_parameters(['resolution', 'min_confidence', 'point_stride'])}
    assert descriptors['resolution'].read_only and '224, 256, 512' in descriptors['resolution'].additional_constraints
    assert descriptors['min_confidence'].floating_point_range[0].from_value == 1.0
    assert descriptors['point_stride'].integer_range[0].to_value == 64
    assert all(d.description for d in descriptors.values())


def test_node_without_checkpoint_explains_how_to_pass_one(ros_context: Any) -> None:
    with pytest.raises(ValueError, match='dust3r_checkpoint:='):
        make_lsm_node(None, ros_context, namespace='no_weights')
