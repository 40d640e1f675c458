"""lsm_node's input part alone (lsm_ros.ros.inputs.StereoInputs): pairing, checks, the CameraInfo wait, stale pairs,
inactive images and the subscriptions, with fake callables and a fake node (no rclpy Context)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header

from conftest import LogRecords
from lsm_ros.config import NodeConfig, PipelineConfig
from lsm_ros.ros import conversions, names
from lsm_ros.ros.counters import NodeCounters
from lsm_ros.ros.diagnostics import TopicRateMonitor
from lsm_ros.ros.inputs import PreparedPair, StereoInputs
from lsm_ros.ros.params import ParameterSnapshot

pytestmark = pytest.mark.timeout(60)
SECOND = 1_000_000_000
K = np.array([[40.0, 0.0, 16.0], [0.0, 40.0, 12.0], [0.0, 0.0, 1.0]])


@dataclass
class Harness:
    """StereoInputs with its callables as plain attributes a test can change."""

    node_config: NodeConfig = field(default_factory=NodeConfig)
    active: bool = True
    accepting: bool = True
    now_s: float = 100.0                   # the arrival clock (monotonic seconds)
    submitted: list[PreparedPair] = field(default_factory=list)
    recorder: LogRecords = field(default_factory=LogRecords)

    def __post_init__(self) -> None:
        logger = logging.getLogger(f'test_node_inputs.{id(self)}')
        logger.addHandler(self.recorder)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        self.counters = NodeCounters(lambda: logger, log_throttle_s=0.0)
        self.monitor = TopicRateMonitor(window_s=5.0)
        self.inputs = StereoInputs(
            counters=self.counters, topic_monitor=self.monitor,
            settings=lambda: ParameterSnapshot(PipelineConfig(resolution=224), self.node_config),
            resolution=lambda settings: settings.pipeline.resolution, now_ns=lambda: 0,
            active=lambda: self.active, state=lambda: 'inactive', accepting=lambda: self.accepting,
            submit=self._submit, resolve_topic=lambda topic: f'/resolved/{topic}', clock=lambda: self.now_s)
        self.inputs.open(self.node_config)

    def _submit(self, pair: PreparedPair) -> bool:
        self.submitted.append(pair)
        return True

    def rejected(self) -> dict[str, int]:
        return self.counters.snapshot()[1]

    def feed(self, stamp_ns: int, left: Image | CompressedImage | None = None, right: Image | None = None,
             *, infos: bool = True, baseline_m: float = 0.1) -> None:
        """A pair at ``stamp_ns`` (CameraInfo first when ``infos``)."""
        if infos:
            self.info(stamp_ns, baseline_m)
        self.inputs.on_image('left', left or image(stamp_ns))
        self.inputs.on_image('right', right or image(stamp_ns))

    def info(self, stamp_ns: int, baseline_m: float = 0.1) -> None:
        for side, b in (('left', 0.0), ('right', baseline_m)):
            P = np.hstack([K, [[-K[0, 0] * b], [0.0], [0.0]]])
            msg = conversions.model_camera_info(K, 32, 24, header(stamp_ns), P=P)
            self.inputs.on_camera_info(side, msg)


def header(stamp_ns: int, frame: str = '') -> Header:
    return conversions.make_header(conversions.nanoseconds_to_stamp(stamp_ns), frame)


def image(stamp_ns: int, *, width: int = 32, height: int = 24, encoding: str = 'rgb8', frame: str = 'cam') -> Image:
    rgb = np.random.default_rng(stamp_ns % 1000).integers(0, 256, (height, width, 3), dtype=np.uint8)
    msg = conversions.rgb_to_image_msg(rgb, header(stamp_ns, frame))
    msg.encoding = encoding if encoding != 'rgb8' else msg.encoding
    return msg


def test_a_good_pair_is_checked_calibrated_and_submitted_with_its_snapshot() -> None:
    h = Harness()
    h.feed(5 * SECOND, left=image(5 * SECOND, frame='left_optical'), right=image(5 * SECOND, frame='right_optical'))
    [pair] = h.submitted
    assert pair.stamp_ns == 5 * SECOND and pair.left_rgb.shape == (24, 32, 3) and pair.left_rgb.dtype == np.uint8
    assert (pair.left_frame, pair.right_frame) == ('left_optical', 'right_optical')
    assert pair.estimated_right_frame == 'right_optical_estimated'
    assert pair.calibration is not None and pair.calibration.baseline_m == pytest.approx(0.1)
    np.testing.assert_allclose(pair.calibration.K_left, K)
    assert pair.settings.node is h.node_config and pair.received_s == 100.0
    counts, rejected, inactive = h.counters.snapshot()
    assert counts == {'left_images': 1, 'right_images': 1, 'left_camera_infos': 1, 'right_camera_infos': 1,
                      'pairs': 1} and rejected == {} and inactive == 0


@pytest.mark.parametrize('left,right,reason', [
    (image(1, encoding='16UC1'), image(1), names.REJECT_ENCODING),
    (image(1, width=1), image(1, width=1), names.REJECT_IMAGE_DATA),
    (image(1, width=30), image(1), names.REJECT_SIZE_MISMATCH),
])
def test_a_bad_pair_is_rejected_once_by_reason_and_warned(left: Image, right: Image, reason: str) -> None:
    h = Harness()
    left.header.stamp = right.header.stamp = conversions.nanoseconds_to_stamp(SECOND)
    h.feed(SECOND, left=left, right=right)
    assert h.submitted == [] and h.rejected() == {reason: 1}
    assert [level for level, message in h.recorder.records if 'dropped' in message] == ['WARNING']


def test_the_frame_parameters_win_over_the_headers() -> None:
    h = Harness(node_config=NodeConfig(left_frame_id='l', right_frame_id='r', estimated_right_frame_id='r_guess'))
    h.feed(SECOND)
    [pair] = h.submitted
    assert (pair.left_frame, pair.right_frame, pair.estimated_right_frame) == ('l', 'r', 'r_guess')


def test_the_defaults_name_frames_when_neither_parameter_nor_header_does() -> None:
    h = Harness()
    h.feed(SECOND, left=image(SECOND, frame=''), right=image(SECOND, frame=''))
    h.feed(2 * SECOND, left=image(2 * SECOND, frame=''), right=image(2 * SECOND, frame=''))
    assert {(p.left_frame, p.right_frame) for p in h.submitted} == {(names.DEFAULT_LEFT_FRAME,
                                                                     names.DEFAULT_RIGHT_FRAME)}
    assert len([m for _, m in h.recorder.records if 'has no frame_id' in m]) == 2   # once per side


def test_a_pair_waits_for_its_camera_info_and_expires_when_it_never_comes() -> None:
    h = Harness()                                     # camera_info_wait_s = 1 s by default
    h.feed(SECOND, infos=False)
    assert h.submitted == [] and h.rejected() == {}   # held
    h.info(SECOND)
    assert [p.stamp_ns for p in h.submitted] == [SECOND] and h.rejected() == {}
    h.feed(2 * SECOND, infos=False)
    h.now_s += 0.5
    h.inputs.retry_pair_awaiting_camera_info()        # the diagnostics timer: still within the wait
    assert h.rejected() == {}
    h.now_s += 0.6
    h.inputs.retry_pair_awaiting_camera_info()
    assert h.rejected() == {names.REJECT_NO_CAMERA_INFO: 1} and len(h.submitted) == 1
    assert any('/resolved/left/camera_info' in m for _, m in h.recorder.records)


def test_without_a_wait_a_pair_lacking_camera_info_is_rejected_at_once() -> None:
    h = Harness(node_config=NodeConfig(camera_info_wait_s=0.0))
    h.feed(SECOND, infos=False)
    assert h.rejected() == {names.REJECT_NO_CAMERA_INFO: 1}


def test_camera_info_without_baseline_is_used_and_said_once() -> None:
    h = Harness()
    h.feed(SECOND, baseline_m=0.0)
    h.feed(2 * SECOND, baseline_m=0.0)
    assert [p.calibration.baseline_m for p in h.submitted] == [None, None]
    assert len([m for _, m in h.recorder.records if 'no stereo baseline' in m]) == 1


def test_late_images_count_one_stale_pair_and_an_old_pair_is_refused() -> None:
    h = Harness()
    h.feed(5 * SECOND)
    h.feed(3 * SECOND)                                # both images late: one stale pair
    assert h.rejected() == {names.REJECT_STALE: 1} and len(h.submitted) == 1
    h.inputs.on_image('left', image(1 * SECOND))      # a lone late image: one more
    assert h.rejected() == {names.REJECT_STALE: 2}


def test_images_while_inactive_are_counted_not_paired() -> None:
    h = Harness(active=False)
    h.feed(SECOND)
    assert h.submitted == [] and h.counters.snapshot()[2] == 2
    assert len([m for _, m in h.recorder.records if 'counted (statistics inactive_drops)' in m]) == 1


def test_a_pair_not_accepted_is_discarded_and_a_reconfigured_sync_forgets_queued_images() -> None:
    h = Harness(accepting=False)
    h.feed(SECOND)
    assert h.submitted == [] and h.counters.snapshot()[0]['pairs_discarded_inactive'] == 1
    h.accepting = True
    h.inputs.on_image('left', image(2 * SECOND))
    synchronizer = h.inputs.synchronizer
    h.inputs.reconfigure(NodeConfig(sync_queue_size=3))
    assert h.inputs.synchronizer is not synchronizer and h.inputs.synchronizer.queued('left') == 0
    h.inputs.reconfigure(NodeConfig(sync_queue_size=3))          # same settings: kept
    assert h.inputs.synchronizer.queue_size == 3


class FakeSubscription:
    def __init__(self, msg_type: Any, topic: str, callback: Callable[[Any], None], qos: Any) -> None:
        self.msg_type, self.topic_name, self.callback, self.qos = msg_type, topic, callback, qos


class FakeNode:
    def __init__(self) -> None:
        self.subscriptions: list[FakeSubscription] = []
        self.destroyed: list[FakeSubscription] = []

    def create_subscription(self, msg_type: Any, topic: str, callback: Callable[[Any], None], qos: Any,
                            **kwargs: Any) -> FakeSubscription:
        name = topic if topic.startswith('/') else f'/ns/{topic}'
        self.subscriptions.append(FakeSubscription(msg_type, name, callback, qos))
        return self.subscriptions[-1]

    def destroy_subscription(self, subscription: FakeSubscription) -> None:
        self.destroyed.append(subscription)

    def resolve_topic_name(self, topic: str) -> str:
        return f'/cam/{topic}'


@pytest.mark.parametrize('transport', ['raw', 'compressed'])
def test_subscribe_creates_camera_info_first_then_images_and_watches_them(transport: str) -> None:
    h, node = Harness(), FakeNode()
    h.inputs.subscribe(node, transport, use_camera_info=True)
    image_type = CompressedImage if transport == 'compressed' else Image
    images = (['/cam/left/image_rect/compressed', '/cam/right/image_rect/compressed'] if transport == 'compressed'
              else ['/ns/left/image_rect', '/ns/right/image_rect'])
    assert [(s.msg_type, s.topic_name) for s in node.subscriptions] == [
        (CameraInfo, '/ns/left/camera_info'), (CameraInfo, '/ns/right/camera_info'),
        (image_type, images[0]), (image_type, images[1])]
    assert h.inputs.topics == {'left_info': '/ns/left/camera_info', 'right_info': '/ns/right/camera_info',
                               'left': images[0], 'right': images[1]}
    node.subscriptions[0].callback(conversions.model_camera_info(K, 32, 24, header(SECOND)))
    assert h.counters.snapshot()[0] == {'left_camera_infos': 1}
    assert set(h.monitor.snapshot()) == set(h.inputs.topics.values())
    h.inputs.unsubscribe(node)
    assert node.destroyed == node.subscriptions and h.inputs.topics == {}
    h.inputs.close()
    assert h.inputs.camera_infos is None and h.monitor.snapshot() == {}
