"""lsm_node's products alone (lsm_ros.ros.publishers.ProductPublishers) with a fake lifecycle node and a real tiny LSM
reconstruction: every product stamped and framed by its pair, ~/info, the pose and /tf only with a pose, the
semantic products and render views, and a failed publish not stopping the others."""
from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from rclpy.qos import DurabilityPolicy
from sensor_msgs.msg import PointField

from lsm_ros.config import NodeConfig, PipelineConfig
from lsm_ros.ros import conversions, diagnostics, names
from lsm_ros.ros.counters import NodeCounters
from lsm_ros.ros.diagnostics import LatencyMonitor
from lsm_ros.ros.inputs import PreparedPair
from lsm_ros.ros.params import ParameterSnapshot
from lsm_ros.ros.publishers import ProductPublishers
from lsm_ros.ros.runtime import warmup_pair

pytestmark = pytest.mark.timeout(300)
STAMP_NS = 1_700_000_000_123_456_789


class FakePublisher:
    def __init__(self, topic: str, fail: bool = False) -> None:
        self.topic, self.fail, self.messages, self.active = topic, fail, [], False

    def publish(self, msg: Any) -> None:
        if self.fail:
            raise RuntimeError('publisher gone')
        self.messages.append(msg)

    def on_activate(self, state: Any) -> None:
        self.active = True


class FakeNode:
    def __init__(self, failing: tuple[str, ...] = ()) -> None:
        self.lifecycle_state = names.STATE_ACTIVE
        self.context = SimpleNamespace(ok=lambda: self.ok)
        self.ok = True
        self.failing = failing
        self.publishers: dict[str, FakePublisher] = {}
        self.destroyed: list[str] = []

    def create_lifecycle_publisher(self, msg_type: Any, topic: str, qos: Any) -> FakePublisher:
        assert qos in (names.PRODUCT_QOS, names.TF_QOS, names.LABEL_INFO_QOS)
        self.publishers[topic] = FakePublisher(topic, topic in self.failing)
        self.publishers[topic].qos = qos
        return self.publishers[topic]

    def destroy_lifecycle_publisher(self, publisher: FakePublisher) -> None:
        self.destroyed.append(publisher.topic)

    def messages(self, topic: str) -> list[Any]:
        return self.publishers[topic].messages if topic in self.publishers else []


@pytest.fixture(scope='module')
def reconstruction(tiny_lsm_reconstructor: Any) -> Any:
    left, right = warmup_pair(tiny_lsm_reconstructor.config.resolution)
    return tiny_lsm_reconstructor.reconstruct(left, right)


def with_pose(result: Any, success: bool) -> Any:
    T = np.eye(4)
    T[0, 3] = 0.25
    pose = dataclasses.replace(result.pose, success=success, T_1_2=T if success else np.eye(4),
                               message='' if success else 'too few inliers (test)')
    return dataclasses.replace(result, pose=pose, T_1_2=pose.T_1_2)


def make(failing: tuple[str, ...] = ()) -> tuple[ProductPublishers, FakeNode, NodeCounters, LatencyMonitor]:
    node = FakeNode(failing)
    counters = NodeCounters(lambda: logging.getLogger('test_node_publishers'), 0.0)
    latency = LatencyMonitor(window=10)
    return ProductPublishers(node, counters, latency), node, counters, latency


def pair(**node_config: Any) -> PreparedPair:
    rgb = np.zeros((4, 4, 3), np.uint8)
    return PreparedPair(stamp_ns=STAMP_NS, left_rgb=rgb, right_rgb=rgb, calibration=None, left_frame='cam_left',
                        right_frame='cam_right', estimated_right_frame='cam_right_estimated', received_s=0.0,
                        settings=ParameterSnapshot(PipelineConfig(), NodeConfig(**node_config)))


def test_every_product_is_published_with_the_pairs_stamp_and_frames(reconstruction: Any,
                                                                    tiny_lsm_reconstructor: Any) -> None:
    products, node, counters, latency = make()
    products.create(semantic=True, render_views=())
    assert all(p.active for p in node.publishers.values())   # created while active: enabled at once
    assert set(node.publishers) == set(names.OUTPUT_TOPICS) | set(names.SEMANTIC_TOPICS)
    p = pair(labels=('wall', 'floor'))
    result = with_pose(reconstruction, True)
    labelled = products.label(p, result, tiny_lsm_reconstructor)
    products.publish(p, result, labelled, tiny_lsm_reconstructor)
    right_framed = {names.RIGHT_DEPTH_TOPIC, names.RIGHT_MODEL_INFO_TOPIC}
    for topic in set(names.OUTPUT_TOPICS) | {names.SEMANTIC_LABELS_TOPIC, names.SEMANTIC_OVERLAY_TOPIC}:
        [msg] = node.messages(topic)
        assert conversions.stamp_to_nanoseconds(msg.header.stamp) == STAMP_NS, topic
        assert msg.header.frame_id == ('cam_right' if topic in right_framed else 'cam_left'), topic
    [cloud] = node.messages(names.POINTS_TOPIC)
    assert [f.name for f in cloud.fields] == ['x', 'y', 'z', 'rgb', 'confidence', 'label']
    width, height = result.size
    assert cloud.width == 2 * width * height
    [info] = node.messages(names.INFO_TOPIC)
    assert (info.width, info.height, info.pose_valid, list(info.labels)) == (width, height, True, ['wall', 'floor'])
    assert info.num_points == cloud.width and info.total_time_s > 0
    assert info.pose_source == result.pose_source and info.pose_source in ('pnp', 'stereo_calibration')
    [labels] = node.messages(names.SEMANTIC_LABELS_TOPIC)
    assert (labels.encoding, labels.width, labels.height) == ('mono8', width, height)
    assert counters.snapshot()[0] == {'processed': 1} and latency.stats().samples == 1
    assert products.last_scale == (diagnostics.SCALE_MODEL_UNITS, result.scale_source, None)
    assert node.messages(names.TF_TOPIC) == []          # publish_tf is off
    products.destroy()
    products.forget()
    assert sorted(node.destroyed) == sorted(node.publishers) and products.last_scale[0] == diagnostics.SCALE_UNKNOWN


def test_without_a_pose_neither_relative_pose_nor_tf_and_the_failure_is_counted(reconstruction: Any,
                                                                                tiny_lsm_reconstructor: Any) -> None:
    products, node, counters, _ = make()
    products.create(semantic=False, render_views=())
    products.publish(pair(publish_tf=True), with_pose(reconstruction, False), None, tiny_lsm_reconstructor)
    assert node.messages(names.RELATIVE_POSE_TOPIC) == [] and names.TF_TOPIC not in node.publishers
    assert counters.snapshot()[0] == {'pose_failures': 1, 'processed': 1}
    [info] = node.messages(names.INFO_TOPIC)
    assert not info.pose_valid and list(info.labels) == []
    [cloud] = node.messages(names.POINTS_TOPIC)
    assert 'label' not in [f.name for f in cloud.fields]


def test_tf_goes_left_to_right_and_midway_and_is_refused_for_one_frame(reconstruction: Any,
                                                                      tiny_lsm_reconstructor: Any) -> None:
    products, node, counters, _ = make()
    products.create(semantic=True, render_views=('midway',))
    products.publish(pair(publish_tf=True, render_views=('midway',)), with_pose(reconstruction, True), None,
                     tiny_lsm_reconstructor)
    [tf] = node.messages(names.TF_TOPIC)
    assert [(t.header.frame_id, t.child_frame_id) for t in tf.transforms] == [   # never the right image's frame
        ('cam_left', 'cam_right_estimated'), ('cam_left', 'cam_left_midway')]
    assert tf.transforms[0].transform.translation.x == pytest.approx(0.25)
    assert tf.transforms[1].transform.translation.x == pytest.approx(0.125)
    image_topic, info_topic = names.render_view_topics('midway')
    [rendered] = node.messages(image_topic)
    assert rendered.header.frame_id == 'cam_left_midway' and rendered.encoding == 'rgb8'
    assert len(node.messages(info_topic)) == 1
    same = dataclasses.replace(pair(publish_tf=True), estimated_right_frame='cam_left')
    products.publish(same, with_pose(reconstruction, True), None, tiny_lsm_reconstructor)
    assert len(node.messages(names.TF_TOPIC)) == 1      # not a transform of a frame to itself


def test_a_failed_publish_is_counted_the_others_go_out_and_nothing_goes_at_shutdown(
        reconstruction: Any, tiny_lsm_reconstructor: Any) -> None:
    products, node, counters, _ = make(failing=(names.LEFT_DEPTH_TOPIC,))
    products.create(semantic=False, render_views=())
    products.publish(pair(), with_pose(reconstruction, True), None, tiny_lsm_reconstructor)
    assert counters.snapshot()[0]['publish_failures'] == 1
    assert all(len(node.messages(t)) == 1 for t in names.OUTPUT_TOPICS if t != names.LEFT_DEPTH_TOPIC)
    node.ok = False
    products.publish(pair(), with_pose(reconstruction, True), None, tiny_lsm_reconstructor)
    assert counters.snapshot()[0]['unpublished_at_shutdown'] == len(names.OUTPUT_TOPICS)
    assert len(node.messages(names.POINTS_TOPIC)) == 1


def test_label_info_is_latched_and_published_when_the_label_set_changes() -> None:
    products, node, _, _ = make()
    products.create(semantic=True, render_views=())
    publisher = node.publishers[names.SEMANTIC_LABEL_INFO_TOPIC]
    assert publisher.qos.durability == DurabilityPolicy.TRANSIENT_LOCAL and publisher.qos.depth == 1
    stamp = conversions.nanoseconds_to_stamp(STAMP_NS)
    products.publish_label_info(('wall', 'floor'), conversions.make_header(stamp, ''))
    products.publish_label_info(('wall', 'floor'), conversions.make_header(stamp, ''))     # unchanged: not again
    products.publish_label_info(('chair',), conversions.make_header(stamp, ''))
    assert [[(c.class_id, c.class_name) for c in m.class_map] for m in publisher.messages] == [
        [(0, 'wall'), (1, 'floor')], [(0, 'chair')]]
    products.destroy()
    products.create(semantic=True, render_views=())           # a new configuration publishes its labels again
    products.publish_label_info(('chair',), conversions.make_header(stamp, ''))
    assert len(node.publishers[names.SEMANTIC_LABEL_INFO_TOPIC].messages) == 1
    geometry, geometry_node, _, _ = make()
    geometry.create(semantic=False, render_views=())
    geometry.publish_label_info(('chair',), conversions.make_header(stamp, ''))
    assert names.SEMANTIC_LABEL_INFO_TOPIC not in geometry_node.publishers


def test_the_point_cloud_label_field_is_pcl_compatible(reconstruction: Any, tiny_lsm_reconstructor: Any) -> None:
    products, node, _, _ = make()
    products.create(semantic=True, render_views=())
    p = pair(labels=('wall', 'floor'))
    products.publish(p, reconstruction, products.label(p, reconstruction, tiny_lsm_reconstructor),
                     tiny_lsm_reconstructor)
    [cloud] = node.messages(names.POINTS_TOPIC)
    fields = {f.name: f for f in cloud.fields}
    assert fields['rgb'].datatype == PointField.FLOAT32
    assert (fields['label'].offset, fields['label'].datatype, fields['label'].count) == (20, PointField.UINT32, 1)
    labels = conversions.pointcloud2_to_numpy(cloud)['label']
    assert labels.dtype == np.uint32 and set(np.unique(labels)) <= {0, 1}     # indices of the two labels
