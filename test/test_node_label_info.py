"""~/semantic/label_info (vision_msgs/LabelInfo) of lsm_node with the semantic model (tiny LSM), over loopback: it is
latched (transient local), so a subscription created after the node published still gets it, and it is published
again when the labels parameter changes."""
from __future__ import annotations

import threading
from typing import Any

import pytest
from conftest import make_lsm_node, wait_until
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from vision_msgs.msg import LabelInfo

from lsm_ros.ros import node as lsm

pytestmark = pytest.mark.timeout(180)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


class LateSubscriber:
    """A node of its own whose LabelInfo subscription is created now, spun on its own executor thread."""

    def __init__(self, context: Any, topic: str, name: str) -> None:
        self.node = Node(name, context=context)
        self.messages: list[LabelInfo] = []
        self._lock = threading.Lock()
        self.node.create_subscription(LabelInfo, topic, self._keep, LATCHED)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _keep(self, msg: LabelInfo) -> None:
        with self._lock:
            self.messages.append(msg)

    def class_maps(self) -> list[list[tuple[int, str]]]:
        with self._lock:
            return [[(c.class_id, c.class_name) for c in m.class_map] for m in self.messages]

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=5.0)
        self.thread.join(10.0)
        self.node.destroy_node()


def test_label_info_reaches_a_late_subscriber_and_follows_the_labels(tiny_lsm_reconstructor: Any,
                                                                     ros_context: Any) -> None:
    node = make_lsm_node(tiny_lsm_reconstructor, ros_context, 'label_info', labels=['mug', 'table'])
    subscribers: list[LateSubscriber] = []
    try:
        topic = node.output_topic_names()[lsm.SEMANTIC_LABEL_INFO_TOPIC]
        assert topic == '/label_info/lsm_node/semantic/label_info'
        [info] = node.get_publishers_info_by_topic(topic)
        assert info.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL
        # the node published on activation, before any subscription existed
        late = LateSubscriber(ros_context, topic, 'late_label_info_subscriber')
        subscribers.append(late)
        assert wait_until(lambda: late.class_maps() == [[(0, 'mug'), (1, 'table')]], 30.0), late.class_maps()
        assert late.messages[0].header.stamp.sec > 0
        assert node.set_parameters([Parameter('labels', value=['mug', 'table', 'floor'])])[0].successful
        changed = [[(0, 'mug'), (1, 'table')], [(0, 'mug'), (1, 'table'), (2, 'floor')]]
        assert wait_until(lambda: late.class_maps() == changed, 30.0), late.class_maps()
        assert node.set_parameters([Parameter('point_stride', value=2)])[0].successful   # labels unchanged
        later = LateSubscriber(ros_context, topic, 'later_label_info_subscriber')
        subscribers.append(later)
        assert wait_until(lambda: later.class_maps() == changed[1:], 30.0), later.class_maps()  # the latest only
        assert late.class_maps() == changed                  # nothing republished for an unrelated parameter
    finally:
        for subscriber in subscribers:
            subscriber.close()
        node.destroy_node()
