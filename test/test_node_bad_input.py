"""Bad input to lsm_node: each bad pair is rejected with a clear warning and no output; the node goes on."""
from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import pytest
from conftest import NodeHarness, ProductCollector, harness_fixture, wait_until
from rcl_interfaces.msg import Log
from sensor_msgs.msg import Image

from lsm_ros.ros import conversions
from lsm_ros.ros import node as lsm

pytestmark = pytest.mark.timeout(180)
MS = 1_000_000


class BadInputHarness(NodeHarness):
    """lsm_node (tiny DUSt3R) in namespace ``bad_input``, a stereo publisher (frames published with the stamps the
    tests choose), and a :class:`ProductCollector` of its products and /rosout."""

    def __init__(self, context: Any, reconstructor: Any) -> None:
        # log_throttle_s 0: every warning is logged, so each one can be checked on /rosout
        super().__init__(context, reconstructor, namespace='bad_input', log_throttle_s=0.0)

    def add_entities(self, context: Any) -> None:
        self.collector = ProductCollector(context, self.node)
        self.executor.add(self.collector.node)

    def discovered(self) -> bool:
        return super().discovered() and self.collector.connected()


graph = harness_fixture(BadInputHarness)


def _with(image: Image, **fields: Any) -> Image:
    out = copy.copy(image)
    for name, value in fields.items():
        setattr(out, name, conversions.byte_array(value) if name == 'data' else value)
    return out


def _cropped(image: Image, width: int) -> Image:
    channels = conversions.COLOR_ENCODINGS[image.encoding][0]
    rows = np.frombuffer(image.data, np.uint8).reshape(image.height, image.step)
    return _with(image, width=width, step=width * channels, data=rows[:, :width * channels].copy())


def _rejected(node: Any) -> dict[str, int]:
    return dict(node.statistics()['rejected'])


def _expect_rejection(node: Any, collector: ProductCollector, reason: str, log_fragment: str,
                      publish: Any) -> int:
    before = _rejected(node).get(reason, 0)
    logs_before = len(collector.logs)
    stamp_ns = publish()
    assert wait_until(lambda: _rejected(node).get(reason, 0) > before, 10.0), (reason, node.statistics())
    assert wait_until(lambda: any(log_fragment in m.msg and m.level == Log.WARN
                                  for m in collector.logs[logs_before:]), 10.0), \
        (log_fragment, [m.msg for m in collector.logs[logs_before:]])
    return stamp_ns


def test_bad_pairs_are_rejected_and_a_good_pair_still_works(graph: BadInputHarness,
                                                            stereo_frames: list[Any]) -> None:
    node, collector, publisher = graph.node, graph.collector, graph.publisher
    frame, later = stereo_frames[0], stereo_frames[1]
    stamp = frame.stamp_ns
    graph.info(publisher.publish(frame))                # waits for its ~/info

    left, right = frame.left_image, frame.right_image
    bad_stamps = [
        _expect_rejection(node, collector, lsm.REJECT_SIZE_MISMATCH, 'same size', lambda: publisher.publish(
            frame, stamp + 10 * MS, right_image=_cropped(right, right.width - 64))),
        _expect_rejection(node, collector, lsm.REJECT_ENCODING, "'16UC1'", lambda: publisher.publish(
            frame, stamp + 20 * MS, left_image=_with(left, encoding='16UC1', step=2 * left.width,
                                                       data=bytes(2 * left.width * left.height)))),
        _expect_rejection(node, collector, lsm.REJECT_ENCODING, "'yuv422'", lambda: publisher.publish(
            frame, stamp + 30 * MS, right_image=_with(right, encoding='yuv422', step=2 * right.width,
                                                        data=bytes(2 * right.width * right.height)))),
        _expect_rejection(node, collector, lsm.REJECT_IMAGE_DATA, 'truncated', lambda: publisher.publish(
            frame, stamp + 40 * MS, left_image=_with(left, data=bytes(left.data)[:len(left.data) // 2]))),
        # no CameraInfo within camera_info_tolerance_s (0.5 s) of this stamp
        _expect_rejection(node, collector, lsm.REJECT_NO_CAMERA_INFO, 'use_camera_info:=false',
                          lambda: publisher.publish(frame, stamp + 10_000 * MS, with_camera_info=False)),
        # older than the last pair
        _expect_rejection(node, collector, lsm.REJECT_STALE, 'not newer', lambda: publisher.publish(
            frame, stamp + 50 * MS)),
    ]
    # too old for max_input_age_s (the bag's stamps are years old)
    node.set_parameters([_parameter('max_input_age_s', 1.0)])
    try:
        bad_stamps.append(_expect_rejection(node, collector, lsm.REJECT_TOO_OLD, 'max_input_age_s',
                                            lambda: publisher.publish(later, stamp + 20_000 * MS)))
    finally:
        node.set_parameters([_parameter('max_input_age_s', 0.0)])

    assert node.statistics()['worker']['failed'] == 0
    recovered = publisher.publish(later, stamp + 30_000 * MS)
    graph.info(recovered)
    assert wait_until(lambda: all(collector.by_stamp(k, recovered) for k in lsm.OUTPUT_TOPICS), 10.0)
    for key in lsm.OUTPUT_TOPICS:                     # nothing was published for any bad pair
        for bad in bad_stamps:
            assert collector.by_stamp(key, bad) == [], (key, bad)
    statistics = node.statistics()
    assert statistics['counts']['processed'] == 2
    assert statistics['worker']['submitted'] == 2
    # bad input never reaches the network: no inference failure, no out-of-memory, still active
    assert lsm.REJECT_RECONSTRUCTION not in statistics['rejected'] and statistics['out_of_memory'] == 0
    assert statistics['failed_pairs_in_a_row'] == 0 and statistics['lifecycle_state'] == 'active'


def test_camera_info_of_another_size_is_rejected_and_use_camera_info_false_estimates(
        graph: BadInputHarness, stereo_frames: list[Any]) -> None:
    node, collector, publisher = graph.node, graph.collector, graph.publisher
    frame = stereo_frames[2]
    base = frame.stamp_ns + 100_000 * MS
    small_left = _cropped(frame.left_image, frame.left_image.width - 64)
    small_right = _cropped(frame.right_image, frame.right_image.width - 64)
    _expect_rejection(node, collector, lsm.REJECT_BAD_CAMERA_INFO, 'CameraInfo is for', lambda: publisher.publish(
        frame, base, left_image=small_left, right_image=small_right))
    node.set_parameters([_parameter('use_camera_info', False)])
    try:
        stamp_ns = publisher.publish(frame, base + 1_000 * MS, left_image=small_left, right_image=small_right,
                                     with_camera_info=False)
        info = graph.info(stamp_ns)
        assert info.intrinsics_source == 'estimated' and not info.metric_scale and info.baseline_m == 0.0
        assert info.scale_source == 'none' and info.scale_factor == 1.0
    finally:
        node.set_parameters([_parameter('use_camera_info', True)])


def test_camera_info_delivered_after_its_images_is_waited_for(graph: BadInputHarness,
                                                              stereo_frames: list[Any]) -> None:
    """CameraInfo travels on its own topics: a pair whose CameraInfo comes 0.3 s after the images waits for it
    (camera_info_wait_s = 1 s) and is reconstructed with it, not rejected as missing_camera_info."""
    node, publisher = graph.node, graph.publisher
    frame = stereo_frames[3]
    stamp_ns = frame.stamp_ns + 200_000 * MS
    before = _rejected(node).get(lsm.REJECT_NO_CAMERA_INFO, 0)
    publisher.publish(frame, stamp_ns, with_camera_info=False)
    time.sleep(0.3)
    for key in ('left_info', 'right_info'):
        info = copy.copy(getattr(frame, key))
        info.header = copy.copy(info.header)
        info.header.stamp = conversions.nanoseconds_to_stamp(stamp_ns)
        publisher.publishers[key].publish(info)
    assert graph.info(stamp_ns).intrinsics_source == 'camera_info'
    assert _rejected(node).get(lsm.REJECT_NO_CAMERA_INFO, 0) == before


def _parameter(name: str, value: Any) -> Any:
    from rclpy.parameter import Parameter
    return Parameter(name, value=value)
