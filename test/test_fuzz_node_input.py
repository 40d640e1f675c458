"""Fuzzed images and CameraInfo fed straight into lsm_node's subscription callbacks, in-process.

One node per image transport (raw sensor_msgs/Image, and CompressedImage with ``image_transport:=compressed``),
not spun: the test thread calls the callbacks the node registered (found in ``node.subscriptions``). Each example
is a stereo pair (same stamp on both sides, CameraInfo first) built valid or with one chosen defect, or free-form
from the strategies of test_fuzz_conversions. Properties: no exception escapes a callback; a pair with a defect is
counted once in ``statistics()['rejected']`` under the defect's reason and nothing is submitted for it; a valid pair
is submitted to the worker; each reason is logged as one warning (rate-limited: log_throttle_s = 3600 s); the
worker fails on nothing; afterwards the node still reconstructs a good pair and publishes it in metres.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from conftest import RosGraph, make_lsm_node, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rcl_interfaces.msg import Log
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header
from test_fuzz_conversions import (FORMATS, ODD_FORMATS, OTHER_ENCODINGS, PREFIXES, arbitrary_images,
                                   garbage_camera_infos)

from lsm_ros.msg import ReconstructionInfo
from lsm_ros.ros import conversions, diagnostics, input_checks
from lsm_ros.ros import node as lsm

pytestmark = pytest.mark.timeout(240)

EXAMPLES = {'raw': 120, 'compressed': 60}
STAMP_STEP_NS = 10_000_000_000            # 10 s between examples: far beyond camera_info_tolerance_s (0.5 s)
_stamps = itertools.count(1_000_000 * 1_000_000_000, STAMP_STEP_NS)
VALID, BAD_ENCODING, STALE, CHAOS = 'valid', 'bad_encoding', 'stale', 'chaos'
DEFECTS = (VALID, BAD_ENCODING, lsm.REJECT_IMAGE_DATA, lsm.REJECT_SIZE_MISMATCH, lsm.REJECT_NO_CAMERA_INFO,
           lsm.REJECT_BAD_CAMERA_INFO, STALE, CHAOS)
# What lsm_node's warning says for each input reason (rosout text, matched as a regular expression).
LOG_PATTERNS = {
    lsm.REJECT_ENCODING: r'image at [\d.]+ s has encoding .*lsm_node takes',
    lsm.REJECT_IMAGE_DATA: r'(left|right) (compressed )?image (\(.*\) )?at [\d.]+ s: .*: dropped',
    lsm.REJECT_SIZE_MISMATCH: r'both must have the same size',
    lsm.REJECT_NO_CAMERA_INFO: r'no CameraInfo on .* within camera_info_tolerance_s',
    lsm.REJECT_BAD_CAMERA_INFO: r'unusable CameraInfo',
    lsm.REJECT_STALE: r'not newer than the last',
}
# Failures of the network itself (not of the input): counted, logged by the node's own policy.
INFERENCE_REASONS = {lsm.REJECT_RECONSTRUCTION, getattr(lsm, 'REJECT_OUT_OF_MEMORY', 'out_of_memory')}


@dataclass
class Harness:
    """The node under test (not spun) with its input callbacks, and what a watcher node received."""

    transport: str
    node: Any
    callbacks: dict[str, Callable[[Any], None]]
    logs: list[Log] = field(default_factory=list)
    infos: list[ReconstructionInfo] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def warnings(self, pattern: str) -> list[str]:
        with self.lock:
            return [m.msg for m in self.logs if m.level == Log.WARN and m.name == self.node.get_logger().name
                    and re.search(pattern, m.msg)]

    def info(self, stamp_ns: int) -> ReconstructionInfo | None:
        with self.lock:
            return next((i for i in self.infos if conversions.stamp_to_nanoseconds(i.header.stamp) == stamp_ns),
                        None)


def _input_callbacks(node: Any) -> dict[str, Callable[[Any], None]]:
    """The callbacks the node registered for its four inputs, found by resolved topic name."""
    def wanted() -> dict[str, str]:
        topics = {'left_info': node.resolve_topic_name(lsm.LEFT_INFO_TOPIC),
                  'right_info': node.resolve_topic_name(lsm.RIGHT_INFO_TOPIC)}
        images = node.input_image_topic_names() if hasattr(node, 'input_image_topic_names') else {}
        topics['left_image'] = images.get('left') or node.resolve_topic_name(lsm.LEFT_IMAGE_TOPIC)
        topics['right_image'] = images.get('right') or node.resolve_topic_name(lsm.RIGHT_IMAGE_TOPIC)
        return topics

    def find() -> dict[str, Any]:
        by_topic = {subscription.topic_name: subscription.callback for subscription in node.subscriptions}
        return {key: by_topic.get(topic) for key, topic in wanted().items()}
    callbacks = find()
    if None in callbacks.values() and hasattr(node, 'trigger_configure'):  # a managed lifecycle node: bring it up
        node.trigger_configure()
        node.trigger_activate()
        callbacks = find()
    assert None not in callbacks.values(), (wanted(), [s.topic_name for s in node.subscriptions])
    return callbacks


@pytest.fixture(scope='module', params=['raw', 'compressed'])
def harness(request: pytest.FixtureRequest, ros_context: Any, tiny_reconstructor: Any) -> Iterator[Harness]:
    transport = request.param
    overrides: dict[str, Any] = dict(log_throttle_s=3600.0, camera_info_wait_s=0.0)  # reject at once
    if transport != 'raw':
        overrides['image_transport'] = transport
    node = make_lsm_node(tiny_reconstructor, ros_context, namespace=f'fuzz_{transport}', **overrides)
    watcher = Node(f'fuzz_{transport}_watcher', context=ros_context)
    executor = RosGraph(ros_context)
    try:
        state = Harness(transport=transport, node=node, callbacks=_input_callbacks(node))

        def keep(target: list[Any]) -> Callable[[Any], None]:
            def callback(msg: Any) -> None:
                with state.lock:
                    target.append(msg)
            return callback
        rosout = watcher.create_subscription(Log, '/rosout', keep(state.logs), QoSProfile(
            depth=1000, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        info = watcher.create_subscription(ReconstructionInfo, node.resolve_topic_name(lsm.INFO_TOPIC),
                                           keep(state.infos), QoSProfile(depth=50))
        executor.add(watcher)
        assert wait_until(lambda: rosout.get_publisher_count() >= 1 and info.get_publisher_count() >= 1, 30.0)
        yield state
    finally:
        executor.close()
        node.destroy_node()


# ------------------------------------------------------------------------------------------- generation
@dataclass
class FuzzPair:
    """One example: what to feed (None: not sent), the defect it was built with and the reason it must get."""

    defect: str
    reason: str | None
    left: Image | CompressedImage
    right: Image | CompressedImage
    left_info: CameraInfo | None
    right_info: CameraInfo | None
    info_offsets_ns: dict[str, int] = field(default_factory=dict)   # CameraInfo stamp - image stamp, per side
    min_side: int = 0                                                # smallest image side of a valid pair


def _raw(rng: np.random.Generator, encoding: str, height: int, width: int, padding: int) -> Image:
    channels = conversions.COLOR_ENCODINGS[encoding][0]
    rows = rng.integers(0, 256, (height, width * channels + padding), dtype=np.uint8)
    msg = Image(height=height, width=width, encoding=encoding, is_bigendian=int(rng.integers(0, 2)),
                step=width * channels + padding)
    msg.data = conversions.byte_array(rows)
    return msg


def _compressed(rng: np.random.Generator, codec: str, height: int, width: int) -> CompressedImage:
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return conversions.rgb_to_compressed_image_msg(rgb, Header(), codec=codec)


def _info(K: np.ndarray, width: int, height: int, baseline_m: float, d: list[float], model: str) -> CameraInfo:
    P = np.hstack([K, [[-K[0, 0] * baseline_m], [0.0], [0.0]]])
    info = conversions.model_camera_info(K, width, height, Header(), P=P)
    info.d, info.distortion_model = d, model
    return info


@st.composite
def raw_defects(draw: st.DrawFn, msg: Image) -> None:
    """Make ``msg`` inconsistent in place: truncated, oversized, a step below the row size, an empty or negative
    size, or huge sizes over tiny data."""
    channels = conversions.COLOR_ENCODINGS[msg.encoding][0]
    kind = draw(st.sampled_from(['truncated', 'oversized', 'small_step', 'empty', 'negative', 'huge']))
    data = bytes(msg.data)
    if kind == 'truncated':
        msg.data = conversions.byte_array(data[:draw(st.integers(0, len(data) - 1))])
    elif kind == 'oversized':
        msg.data = conversions.byte_array(data + bytes(draw(st.integers(1, 64))))
    elif kind == 'small_step':
        msg.step = draw(st.integers(0, msg.width * channels - 1))
        msg.data = conversions.byte_array(bytes(msg.step * msg.height))
    elif kind == 'empty':
        setattr(msg, draw(st.sampled_from(['width', 'height'])), 0)
    elif kind == 'negative':   # rclpy stores out-of-range values set in-process unchecked
        setattr(msg, draw(st.sampled_from(['width', 'height'])), draw(st.integers(-2**31, -1)))
    else:
        msg.height, msg.width = draw(st.integers(2**16, 2**31)), draw(st.integers(2**16, 2**31))
        msg.step = msg.width * channels


@st.composite
def compressed_defects(draw: st.DrawFn, msg: CompressedImage) -> None:
    """Make ``msg`` undecodable in place: truncated, empty, random bytes, another image format, a header claiming a
    huge size, or a format naming no supported codec."""
    kind = draw(st.sampled_from(['truncated', 'empty', 'random', 'pgm', 'huge', 'format']))
    data = bytes(msg.data)
    if kind == 'truncated':
        data = data[:draw(st.integers(1, len(data) - 1))]
    elif kind == 'empty':
        data = b''
    elif kind == 'random':
        data = draw(PREFIXES) + draw(st.binary(max_size=200))
    elif kind == 'pgm':
        data = b'P5\n2 2\n255\n\x00\x01\x02\x03'
    elif kind == 'huge':   # 9000x9000 in the PNG header or the JPEG frame header; nothing may be decoded
        data = bytearray(data)
        if data.startswith(conversions.PNG_SIGNATURE):
            data[16:24] = struct.pack('>II', 9000, 9000)
        else:
            sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
            data[sof + 5:sof + 9] = struct.pack('>HH', 9000, 9000)
        data = bytes(data)
    else:
        msg.format = draw(st.sampled_from([f for f in FORMATS if 'png' not in f.lower() and 'jp' not in f.lower()]
                                          + ['16UC1; compressedDepth png']))
    msg.data = conversions.byte_array(data)


@st.composite
def camera_info_defects(draw: st.DrawFn, info: CameraInfo, width: int) -> None:
    """Spoil ``info`` in place so that no calibration can be taken from it."""
    kind = draw(st.sampled_from(['k_zero', 'k_value', 'k_row', 'p_focal', 'p_value', 'size', 'no_size', 'k_length',
                                 'p_length']))
    K, P = np.asarray(info.k, dtype=float).copy(), np.asarray(info.p, dtype=float).copy()
    bad = st.sampled_from([np.nan, np.inf, -np.inf])
    if kind == 'k_zero':
        K[:] = 0.0
    elif kind == 'k_value':
        K[draw(st.sampled_from([0, 4]))] = draw(st.one_of(bad, st.floats(-1e6, 0.0)))
    elif kind == 'k_row':
        K[draw(st.sampled_from([3, 6, 7, 8]))] = draw(st.floats(2.0, 1e3))
    elif kind == 'p_focal':
        P[draw(st.sampled_from([0, 5]))] = draw(st.floats(-1e6, -1e-3))
    elif kind == 'p_value':
        P[draw(st.integers(0, 11))] = draw(bad)
    elif kind == 'size':
        info.width = width + draw(st.integers(1, 100))
    elif kind == 'no_size':
        info.height = 0
    info.k, info.p = K.tolist(), P.tolist()
    if kind == 'k_length':   # rclpy keeps wrongly sized arrays set in-process
        info.k = [float(v) for v in range(draw(st.sampled_from([0, 4, 8, 10, 16])))]
    elif kind == 'p_length':
        info.p = [1.0] * draw(st.sampled_from([0, 9, 11, 13]))


@st.composite
def chaos_images(draw: st.DrawFn, transport: str) -> Image | CompressedImage:
    if transport == 'raw':
        return draw(arbitrary_images())
    msg = CompressedImage(format=draw(ODD_FORMATS))
    if draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        msg.data = _compressed(rng, draw(st.sampled_from(conversions.COMPRESSED_CODECS)), draw(st.integers(1, 9)),
                               draw(st.integers(1, 9))).data
    else:
        msg.data = conversions.byte_array(draw(PREFIXES) + draw(st.binary(max_size=200)))
    return msg


@st.composite
def fuzz_pairs(draw: st.DrawFn, transport: str, defect: str | None = None) -> FuzzPair:
    """A pair with ``defect`` (one of DEFECTS; None: drawn too)."""
    defect = defect or draw(st.sampled_from(DEFECTS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    height, width = draw(st.integers(2, 24)), draw(st.integers(2, 24))

    def image(size: tuple[int, int]) -> Image | CompressedImage:
        if transport == 'raw':
            return _raw(rng, draw(st.sampled_from(conversions.SUPPORTED_IMAGE_ENCODINGS)), *size,
                        draw(st.integers(0, 4)))
        return _compressed(rng, draw(st.sampled_from(conversions.COMPRESSED_CODECS)), *size)
    images = {side: image((height, width)) for side in ('left', 'right')}
    fx, fy = draw(st.floats(5.0, 500.0)), draw(st.floats(5.0, 500.0))
    K = np.array([[fx, 0.0, draw(st.floats(0.0, width))], [0.0, fy, draw(st.floats(0.0, height))], [0, 0, 1.0]])
    distortion = draw(st.lists(st.floats(-1.0, 1.0), max_size=14))
    model = draw(st.sampled_from(['plumb_bob', 'rational_polynomial', 'equidistant', '']))
    baseline = draw(st.one_of(st.just(0.0), st.floats(0.01, 1.0), st.floats(-1.0, -0.01)))  # <= 0: not metric
    infos: dict[str, CameraInfo | None] = {'left': _info(K, width, height, 0.0, distortion, model),
                                           'right': _info(K, width, height, baseline, distortion, model)}
    offsets: dict[str, int] = {}
    side = draw(st.sampled_from(['left', 'right']))
    reason: str | None = defect
    if defect == BAD_ENCODING:
        if transport == 'raw':
            images[side].encoding = draw(st.one_of(st.sampled_from(OTHER_ENCODINGS), st.text(max_size=10)).filter(
                lambda e: e not in conversions.SUPPORTED_IMAGE_ENCODINGS))
            reason = lsm.REJECT_ENCODING
        else:
            images[side].format = draw(st.sampled_from(['theora', 'rgb8; zstd compressed', '32FC1; compressedDepth']))
            reason = lsm.REJECT_IMAGE_DATA
    elif defect == lsm.REJECT_IMAGE_DATA:
        draw((raw_defects if transport == 'raw' else compressed_defects)(images[side]))
    elif defect == lsm.REJECT_SIZE_MISMATCH:
        images[side] = image(draw(st.tuples(st.integers(2, 24), st.integers(2, 24)).filter(
            lambda size: size != (height, width))))
    elif defect == lsm.REJECT_NO_CAMERA_INFO:
        for missing in draw(st.sampled_from([('left',), ('right',), ('left', 'right')])):
            if draw(st.booleans()):
                infos[missing] = None
            else:   # sent, but stamped outside camera_info_tolerance_s (0.5 s)
                offsets[missing] = draw(st.sampled_from([-1, 1])) * draw(st.integers(600_000_000, 5_000_000_000))
    elif defect == lsm.REJECT_BAD_CAMERA_INFO:
        draw(camera_info_defects(infos[side], width))
    elif defect == STALE:
        reason = lsm.REJECT_STALE
    elif defect == CHAOS:
        images = {s: draw(chaos_images(transport)) for s in ('left', 'right')}
        infos = {s: draw(st.one_of(st.none(), garbage_camera_infos())) for s in ('left', 'right')}
        reason = None
    elif defect == VALID:
        reason = None
    return FuzzPair(defect, reason, images['left'], images['right'], infos['left'], infos['right'], offsets,
                    min(height, width))


# ---------------------------------------------------------------------------------------------- feeding
def _feed(harness: Harness, pair: FuzzPair, stamp_ns: int) -> None:
    """CameraInfo first, then left and right images, stamped ``stamp_ns`` (CameraInfo plus its offset), straight
    into the node's callbacks."""
    for key, msg in (('left_info', pair.left_info), ('right_info', pair.right_info),
                     ('left_image', pair.left), ('right_image', pair.right)):
        if msg is None:
            continue
        offset = pair.info_offsets_ns.get(key.split('_')[0], 0) if key.endswith('info') else 0
        msg.header = Header(stamp=conversions.nanoseconds_to_stamp(stamp_ns + offset), frame_id=f'fuzz_{key}')
        harness.callbacks[key](msg)


def _good_pair(transport: str, seed: int) -> FuzzPair:
    """A calibrated pair (baseline 0.12 m) that lsm_node must accept and reconstruct in metres."""
    rng = np.random.default_rng(seed)
    K = np.array([[60.0, 0.0, 16.0], [0.0, 60.0, 12.0], [0.0, 0.0, 1.0]])
    if transport == 'raw':
        left, right = _raw(rng, 'rgb8', 24, 32, 0), _raw(rng, 'bgr8', 24, 32, 3)
    else:
        left, right = _compressed(rng, 'png', 24, 32), _compressed(rng, 'jpeg', 24, 32)
    return FuzzPair(VALID, None, left, right, _info(K, 32, 24, 0.0, [0.0] * 5, 'plumb_bob'),
                    _info(K, 32, 24, 0.12, [0.0] * 5, 'plumb_bob'), min_side=24)


def _state(node: Any) -> tuple[dict[str, int], int]:
    """(input rejections per reason, pairs submitted to the worker); inference failures are asynchronous."""
    statistics = node.statistics()
    rejected = {k: v for k, v in statistics['rejected'].items() if k not in INFERENCE_REASONS}
    return rejected, statistics['worker']['submitted']


def _changes(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)
            if after.get(k, 0) != before.get(k, 0)}


def test_fuzzed_pairs_are_rejected_by_reason_logged_once_and_the_node_still_works(harness: Harness) -> None:
    node, transport = harness.node, harness.transport
    expected: dict[str, int] = {}
    accepted_min_side: list[int] = []
    _feed(harness, _good_pair(transport, 1), next(_stamps))   # a first pair, so that a stale stamp can be stale
    assert node.statistics()['worker']['submitted'] == 1, node.statistics()
    chaos_outcomes = [({}, 1)] + [({reason: 1}, 0) for reason in LOG_PATTERNS]

    def feed_one(pair: FuzzPair) -> None:
        rejected_before, submitted_before = _state(node)
        # a stale pair: both images older than the last pair the synchronizer formed
        stamp_ns = 1_000 if pair.defect == STALE else next(_stamps)
        _feed(harness, pair, stamp_ns)      # any exception escaping a callback fails the test here
        rejected_after, submitted_after = _state(node)
        rejected = _changes(rejected_before, rejected_after)
        submitted = submitted_after - submitted_before
        if pair.defect == VALID:
            assert (rejected, submitted) == ({}, 1), node.statistics()
        elif pair.defect == STALE:   # both images late: one stale pair, counted once
            assert (rejected, submitted) == ({lsm.REJECT_STALE: 1}, 0), (pair, node.statistics())
        elif pair.defect == CHAOS:
            assert (rejected, submitted) in chaos_outcomes, (rejected, submitted, pair)
        else:
            assert (rejected, submitted) == ({pair.reason: 1}, 0), (pair, node.statistics())
        if submitted:
            accepted_min_side.append(pair.min_side if pair.defect == VALID else min(np.shape(
                conversions.image_to_numpy(pair.left) if transport == 'raw'
                else conversions.compressed_image_to_numpy(pair.left))[:2]))
        for reason, count in rejected.items():
            expected[reason] = expected.get(reason, 0) + count

    # every kind of defect is fuzzed (its own examples: a drawn kind could miss one), in a fixed order
    for defect in DEFECTS:
        settings(max_examples=max(4, EXAMPLES[transport] // len(DEFECTS)), deadline=None, derandomize=True,
                 database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(
            given(fuzz_pairs(transport, defect))(feed_one))()
    wanted = {lsm.REJECT_IMAGE_DATA, lsm.REJECT_SIZE_MISMATCH, lsm.REJECT_NO_CAMERA_INFO, lsm.REJECT_BAD_CAMERA_INFO,
              lsm.REJECT_STALE} | ({lsm.REJECT_ENCODING} if transport == 'raw' else set())
    assert set(expected) >= wanted, expected
    assert node.wait_idle(60.0)
    statistics = node.statistics()
    worker = statistics['worker']
    assert worker['failed'] == 0, statistics           # no exception escaped the worker either
    assert worker['submitted'] == worker['processed'] + worker['dropped'], worker
    failed = sum(statistics['rejected'].get(reason, 0) for reason in INFERENCE_REASONS)
    assert statistics['counts'].get('processed', 0) + failed == worker['processed'], statistics
    # what passes the input checks, the network takes: nothing fails on the worker, no accepted image is too small
    assert failed == 0, statistics
    assert min(accepted_min_side) >= input_checks.MIN_IMAGE_SIDE_PX, accepted_min_side
    for reason, count in expected.items():
        assert statistics['rejected'][reason] == count, (reason, statistics)
    # rate-limited: one warning per reason (log_throttle_s = 3600 s), however many pairs were rejected for it
    for reason in expected:
        assert wait_until(lambda: harness.warnings(LOG_PATTERNS[reason]), 10.0), (reason, harness.logs[-5:])
        assert len(harness.warnings(LOG_PATTERNS[reason])) == 1, harness.warnings(LOG_PATTERNS[reason])
    assert sum(expected.values()) > 2 * len(expected)
    # the diagnostics built from these statistics report every reason
    health = diagnostics.health_from_statistics(statistics, time_s=0.0, model_state=diagnostics.MODEL_READY,
                                                device=str(node.reconstructor.device))
    processing = next(s for s in diagnostics.build_statuses(health) if s.name.endswith(diagnostics.STATUS_PROCESSING))
    values = {kv.key: kv.value for kv in processing.values}
    assert processing.level == diagnostics.WARN and processing.hardware_id == 'cpu'
    for reason in expected:
        assert values[f'rejected: {reason}'] == str(statistics['rejected'][reason]) and reason in processing.message

    # a good, calibrated pair is still reconstructed and published, posed by its rectified rig's calibration (metric
    # too when the point map fits the baseline, which the tiny untrained model need not)
    processed = statistics['counts'].get('processed', 0)
    stamp_ns = next(_stamps)
    _feed(harness, _good_pair(transport, 2), stamp_ns)
    assert wait_until(lambda: node.statistics()['counts'].get('processed', 0) == processed + 1, 60.0), \
        node.statistics()
    assert wait_until(lambda: harness.info(stamp_ns) is not None, 10.0)
    info = harness.info(stamp_ns)
    assert info.pose_valid and info.pose_source == 'stereo_calibration' and info.baseline_m == pytest.approx(0.12)


@pytest.mark.parametrize('height,width', [(1, 8), (8, 1), (1, 1)])
def test_an_image_too_small_for_the_network_is_rejected_at_the_callback(harness: Harness, height: int, width: int,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A side under 2 pixels is rejected as bad_image_data before the worker: it does not displace a pending
    pair and never fails in the network."""
    rng = np.random.default_rng(3)
    K = np.array([[10.0, 0.0, width / 2], [0.0, 10.0, height / 2], [0.0, 0.0, 1.0]])
    if harness.transport == 'raw':
        left, right = _raw(rng, 'rgb8', height, width, 0), _raw(rng, 'rgb8', height, width, 0)
    else:
        left, right = _compressed(rng, 'png', height, width), _compressed(rng, 'png', height, width)
    pair = FuzzPair(VALID, None, left, right, _info(K, width, height, 0.0, [], ''),
                    _info(K, width, height, 0.1, [], ''))
    node = harness.node
    before = node.statistics()
    rejected_before, submitted_before = _state(node)
    warned: list[tuple[str, str]] = []
    monkeypatch.setattr(node._warnings, 'warning', lambda key, message: warned.append((key, message)) or True)
    _feed(harness, pair, next(_stamps))
    rejected_after, submitted_after = _state(node)
    assert (_changes(rejected_before, rejected_after), submitted_after - submitted_before) == \
        ({lsm.REJECT_IMAGE_DATA: 1}, 0)
    assert warned == [(lsm.REJECT_IMAGE_DATA, warned[0][1])], warned
    assert re.fullmatch(rf"left image at [\d.]+ s: {width}x{height} pixels is too small: the model's "
                        r'pre-processing needs at least 2x2 pixels: dropped', warned[0][1]), warned
    assert node.wait_idle(30.0)
    after = node.statistics()
    assert all(after['rejected'].get(r, 0) == before['rejected'].get(r, 0) for r in INFERENCE_REASONS), after


@pytest.mark.parametrize('width,height,resolution,problem', [
    (8, 1, 224, 'too small'), (1, 1, 512, 'too small'), (1000, 2, 512, 'too elongated for resolution 512'),
    (2, 2, 224, None), (24, 2, 512, None), (640, 480, 256, None)])
def test_model_input_problem_names_the_minimum_the_pre_processing_needs(width: int, height: int, resolution: int,
                                                                       problem: str | None) -> None:
    found = lsm.model_input_problem(width, height, resolution)
    assert (found is None) == (problem is None) and (problem is None or problem in found), found
    if problem is None:   # what the check lets through, the pre-processing really takes
        from lsm_ros.preprocess import preprocess_image
        image = np.zeros((height, width, 3), np.uint8)
        assert preprocess_image(image, resolution).tensor.shape[-1] > 0


def _right_info(p03: float, fx: float = 50.0) -> CameraInfo:
    return CameraInfo(p=[fx, 0.0, 10.0, p03, 0.0, 50.0, 10.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def test_the_no_baseline_message_says_what_was_seen() -> None:
    assert conversions.stereo_baseline_from_camera_info(_right_info(-6.0)) == pytest.approx(0.12)  # a good one
    kind, text = lsm.no_baseline_reason(_right_info(0.0))
    assert kind == 'zero' and 'P[0,3] = -fx*B is 0' in text
    kind, text = lsm.no_baseline_reason(_right_info(6.0))
    assert kind == 'wrong_sign' and 'P[0,3] = 6 > 0' in text and 'B = -P[0,3]/fx = -0.12' in text
    assert 'is 0' not in text and 'swapped' in text
    kind, text = lsm.no_baseline_reason(_right_info(-6.0, fx=0.0))
    assert kind == 'no_projection' and 'P[0,0] = fx = 0' in text
    kind, text = lsm.no_baseline_reason(_right_info(float('nan')))
    assert kind == 'not_finite' and 'nan' in text


def test_a_wrongly_signed_baseline_is_logged_as_such(harness: Harness) -> None:
    """The node's info line for a pair without a baseline says what P[0,3] was: 0, or the wrong sign (each kind is
    logged once per node, maybe already by an earlier fuzzed pair: its numbers are checked in the test above)."""
    good = _good_pair(harness.transport, 4)
    K = np.array([[60.0, 0.0, 16.0], [0.0, 60.0, 12.0], [0.0, 0.0, 1.0]])
    for baseline, fragment in ((0.0, r'P\[0,3\] = -fx\*B is 0'),
                               (-0.125, r'P\[0,3\] = [\d.e+]+ > 0, which is a negative baseline B = -P\[0,3\]/fx = -')):
        pair = dataclasses.replace(good, right_info=_info(K, 32, 24, baseline, [0.0] * 5, 'plumb_bob'))
        _, submitted_before = _state(harness.node)
        _feed(harness, pair, next(_stamps))
        assert _state(harness.node)[1] == submitted_before + 1      # still reconstructed, in model units

        def logged() -> bool:
            with harness.lock:
                return any(m.level == Log.INFO and re.search(fragment, m.msg) and 'model units' in m.msg
                           for m in harness.logs)
        assert wait_until(logged, 10.0), [(m.level, m.msg) for m in harness.logs if "CameraInfo" in m.msg]
    assert harness.node.wait_idle(60.0)
