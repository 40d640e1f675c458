"""``lsm_node``'s input: subscriptions, stereo pairing, checks and the CameraInfo wait, producing checked pairs.

Subscribes (SensorDataQoS, overridable with the ``qos_overrides.<topic>.subscription.<policy>`` parameters; relative
names as stereo_image_proc's, so they remap):

- ``left/image_rect``, ``right/image_rect`` (sensor_msgs/Image: rgb8, bgr8, mono8, rgba8, bgra8), or with
  ``image_transport:=compressed`` sensor_msgs/CompressedImage (JPEG, PNG) on ``<base topic>/compressed``, the base
  topic resolved with its remapping as image_transport does (``left/image_rect:=/cam/left/image_rect`` ->
  ``/cam/left/image_rect/compressed``);
- ``left/camera_info``, ``right/camera_info`` (sensor_msgs/CameraInfo), used when ``use_camera_info``: the
  intrinsics of the *rectified* images are ``P[:3,:3]`` (``K`` when P is all zeros) and the right camera's
  ``P[0,3] = -fx * B`` gives the baseline that makes the products metric (:mod:`lsm_ros.ros.calibration`).

Images are paired by :class:`~lsm_ros.ros.sync.StereoSynchronizer` and checked in the subscription callback
(:mod:`lsm_ros.ros.input_checks`); a pair is processed with one snapshot of the parameters, taken when it is formed.
A bad pair (sizes, encoding, data, an image too small for the model's resize and crop, CameraInfo, stale stamp) is
logged (rate-limited), counted once and goes no further. A pair whose CameraInfo has not arrived yet waits for it
(``camera_info_wait_s``, one pair at a time). A checked pair goes to ``submit`` (the worker).

:class:`StereoInputs` needs no node: the node gives it callables (parameters, clock, whether it processes, where
checked pairs go) and, for :meth:`StereoInputs.subscribe`, anything with ``create_subscription``,
``destroy_subscription`` and ``resolve_topic_name``.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from lsm_ros.config import NodeConfig
from lsm_ros.pipeline import CameraCalibration
from lsm_ros.ros import conversions
from lsm_ros.ros.calibration import pair_calibration
from lsm_ros.ros.counters import NodeCounters
from lsm_ros.ros.diagnostics import TopicRateMonitor
from lsm_ros.ros.input_checks import InputRejected, check_pair_images, decode_image
from lsm_ros.ros.names import (COMPRESSED_SUFFIX, DEFAULT_LEFT_FRAME, DEFAULT_RIGHT_FRAME, LEFT_IMAGE_TOPIC,
                               LEFT_INFO_TOPIC, REJECT_NO_CAMERA_INFO, REJECT_STALE, REJECT_TOO_OLD,
                               RIGHT_IMAGE_TOPIC, RIGHT_INFO_TOPIC, stamp_text)
from lsm_ros.ros.params import ParameterSnapshot
from lsm_ros.ros.sync import DROP_DUPLICATE, DROP_LATE, SYNC_DROP_REASONS, CameraInfoCache, Side, StereoPair, \
    StereoSynchronizer

ESTIMATED_FRAME_SUFFIX = '_estimated'   # default estimated right frame: <right camera frame>_estimated
STALE_PARTNER_MEMORY = 16        # late images per side remembered to count a late pair once
INFO_TOPICS: dict[Side, str] = {'left': LEFT_INFO_TOPIC, 'right': RIGHT_INFO_TOPIC}
IMAGE_TOPICS: dict[Side, str] = {'left': LEFT_IMAGE_TOPIC, 'right': RIGHT_IMAGE_TOPIC}


@dataclass
class ReceivedImage:
    """An image message (raw or compressed) and when it arrived (monotonic seconds)."""

    msg: Image | CompressedImage
    received_s: float


@dataclass
class PreparedPair:
    """A checked pair, ready for the network: RGB arrays, calibration, the frames of its products and the
    parameters it is processed with (one snapshot, taken when the pair was formed)."""

    stamp_ns: int
    left_rgb: np.ndarray          # (H, W, 3) uint8 RGB
    right_rgb: np.ndarray         # (H, W, 3) uint8 RGB
    calibration: CameraCalibration | None
    left_frame: str
    right_frame: str
    estimated_right_frame: str    # child frame of /tf: where the estimated relative pose puts the right camera
    received_s: float             # monotonic time the later image of the pair arrived
    settings: ParameterSnapshot


@dataclass
class PairAwaitingCameraInfo:
    """A checked pair (decoded, without its calibration) held until its CameraInfo arrives (or ``deadline_s``,
    monotonic, passes)."""

    pair: PreparedPair
    deadline_s: float
    message: str                  # the rejection to report if it expires


class SubscriberNode(Protocol):
    """What :meth:`StereoInputs.subscribe` needs of a node."""

    def create_subscription(self, msg_type: Any, topic: str, callback: Callable[[Any], None], qos: Any,
                            **kwargs: Any) -> Any: ...

    def destroy_subscription(self, subscription: Any) -> Any: ...

    def resolve_topic_name(self, topic: str) -> str: ...


# Input QoS overridable the standard rclpy way: parameters qos_overrides.<topic>.subscription.<policy> (reliability,
# history, depth; read-only, set at start-up: -p or a params file), e.g.
# qos_overrides./stereo/left/image_rect.subscription.reliability:=reliable
QOS_OVERRIDES = QoSOverridingOptions.with_default_policies()


def input_qos() -> QoSProfile:
    """SensorDataQoS (best effort, keep last 5), a copy: rclpy applies the QoS overrides to the profile it is given."""
    return copy.copy(qos_profile_sensor_data)


def sync_settings(config: NodeConfig) -> dict[str, Any]:
    """The :class:`StereoSynchronizer` arguments of a node config."""
    return dict(approximate=config.approximate_sync, tolerance_ns=round(config.sync_tolerance_s * 1e9),
                queue_size=config.sync_queue_size)


class StereoInputs:
    """Subscriptions, pairing and checking of one configuration of the node (see the module docstring).

    ``settings()``: the parameter snapshot a new pair is processed with; ``resolution(settings)``: the model's input
    resolution; ``now_ns()``: the node clock (``max_input_age_s``); ``active()``: whether pairs are processed
    (otherwise images are counted in ``inactive_drops``); ``state()``: the lifecycle state for log lines;
    ``accepting()``: whether a checked pair can be submitted now; ``submit(pair)``: hands it on (False: refused,
    counted as ``pairs_discarded_inactive``); ``resolve_topic(name)``: a topic's resolved name for messages.
    """

    def __init__(self, *, counters: NodeCounters, topic_monitor: TopicRateMonitor,
                 settings: Callable[[], ParameterSnapshot], resolution: Callable[[ParameterSnapshot], int],
                 now_ns: Callable[[], int], active: Callable[[], bool], state: Callable[[], str],
                 accepting: Callable[[], bool], submit: Callable[[PreparedPair], bool],
                 resolve_topic: Callable[[str], str], clock: Callable[[], float] = time.monotonic) -> None:
        self._counters, self._monitor = counters, topic_monitor
        self._settings, self._resolution, self._now_ns = settings, resolution, now_ns
        self._active, self._state, self._accepting, self._submit_to = active, state, accepting, submit
        self._resolve_topic, self._clock = resolve_topic, clock
        self._lock = counters.lock
        self.synchronizer: StereoSynchronizer[ReceivedImage] | None = None
        self._synchronizer_settings: dict[str, Any] = {}
        self.camera_infos: CameraInfoCache[CameraInfo] | None = None
        # late images counted as a stale pair whose partner (the other side's late image) has not come yet
        self._stale_unpaired: dict[Side, collections.deque[int]] = {
            side: collections.deque(maxlen=STALE_PARTNER_MEMORY) for side in ('left', 'right')}
        self._last_accepted_stamp_ns: int | None = None
        self._awaiting_camera_info: PairAwaitingCameraInfo | None = None   # see camera_info_wait_s
        self._subscriptions: list[Any] = []
        self.topics: dict[str, str] = {}     # 'left', 'right', 'left_info', 'right_info' -> resolved topic

    # ------------------------------------------------------------------------------------------ life cycle
    def open(self, config: NodeConfig) -> None:
        """Configure: a new synchronizer and CameraInfo cache; no pair held, no stamp accepted yet."""
        self.synchronizer = self._make_synchronizer(config)
        self.camera_infos = CameraInfoCache()
        with self._lock:
            self._awaiting_camera_info = None
            self._last_accepted_stamp_ns = None
        self._counters.forget_once('inactive_images')

    def subscribe(self, node: SubscriberNode, transport: str, use_camera_info: bool) -> None:
        """Image subscriptions (raw, or CompressedImage on <resolved base topic>/compressed) and CameraInfo; the
        images (and with ``use_camera_info`` the CameraInfos) are watched on /diagnostics."""
        image_type = CompressedImage if transport == 'compressed' else Image
        suffix = COMPRESSED_SUFFIX if transport == 'compressed' else ''
        self.topics = {}
        # CameraInfo first: when an image and its CameraInfo are ready in the same wait, the executor takes them in
        # creation order.
        for side, topic in INFO_TOPICS.items():
            subscription = node.create_subscription(CameraInfo, topic, self._camera_info_callback(side),
                                                    input_qos(), qos_overriding_options=QOS_OVERRIDES)
            self._subscriptions.append(subscription)
            self.topics[f'{side}_info'] = subscription.topic_name
        for side, base in IMAGE_TOPICS.items():
            # image_transport resolves (remaps) the base topic, then appends the transport's suffix
            topic = node.resolve_topic_name(base) + suffix if suffix else base
            subscription = node.create_subscription(image_type, topic, self._image_callback(side),
                                                    input_qos(), qos_overriding_options=QOS_OVERRIDES)
            self._subscriptions.append(subscription)
            self.topics[side] = subscription.topic_name
        for side in ('left', 'right'):
            self._monitor.watch(self.topics[side], required=True)
        self.watch_camera_infos(use_camera_info)

    def unsubscribe(self, node: SubscriberNode) -> None:
        """Destroy the subscriptions (no more callbacks)."""
        for subscription in self._subscriptions:
            node.destroy_subscription(subscription)
        self._subscriptions, self.topics = [], {}

    def pause(self) -> None:
        """Deactivate: images queued for pairing are forgotten."""
        if self.synchronizer is not None:
            self.synchronizer.reset()

    def close(self) -> None:
        """Cleanup: queued images, the CameraInfo cache, the held pair and the stale-pair memory are dropped, the
        topic monitor forgets the topics (configure watches them again)."""
        self.pause()
        self.camera_infos = None
        with self._lock:
            self._awaiting_camera_info = None
            for unpaired in self._stale_unpaired.values():
                unpaired.clear()
        self._monitor.forget()

    def reconfigure(self, config: NodeConfig) -> None:
        """A parameter change: a new synchronizer when its settings changed (queued images are forgotten); the
        CameraInfo topics required on /diagnostics with ``use_camera_info``."""
        if self.synchronizer is not None and sync_settings(config) != self._synchronizer_settings:
            self.synchronizer = self._make_synchronizer(config)
        self.watch_camera_infos(config.use_camera_info)

    def watch_camera_infos(self, required: bool) -> None:
        """Follow the CameraInfo topics on /diagnostics: required with ``use_camera_info`` (else a silent one is no
        problem)."""
        for key in ('left_info', 'right_info'):
            topic = self.topics.get(key)
            if topic is not None:
                self._monitor.watch(topic, required=required)

    def _make_synchronizer(self, config: NodeConfig) -> StereoSynchronizer[ReceivedImage]:
        self._synchronizer_settings = sync_settings(config)
        return StereoSynchronizer(**self._synchronizer_settings)

    def sync_drop_counts(self) -> dict[str, int]:
        """Images the synchronizer dropped, by reason (zeros while unconfigured)."""
        synchronizer = self.synchronizer
        return synchronizer.drop_counts if synchronizer is not None else dict.fromkeys(SYNC_DROP_REASONS, 0)

    # ------------------------------------------------------------------------------------------ callbacks
    def _image_callback(self, side: Side) -> Callable[[Image | CompressedImage], None]:
        return lambda msg: self.on_image(side, msg)

    def _camera_info_callback(self, side: Side) -> Callable[[CameraInfo], None]:
        return lambda msg: self.on_camera_info(side, msg)

    def on_image(self, side: Side, msg: Image | CompressedImage) -> None:
        """An image of ``side``: counted, paired; a completed pair is checked and submitted."""
        self._counters.count(f'{side}_images')
        stamp_ns = conversions.stamp_to_nanoseconds(msg.header.stamp)
        topic = self.topics.get(side)
        if topic is not None:
            self._monitor.record(topic, stamp_ns)
        synchronizer = self.synchronizer
        if not self._active() or synchronizer is None:
            self._counters.inactive_drop()
            self._counters.info_once('inactive_images', f'images arrive while lsm_node is {self._state()}: they '
                                     'are counted (statistics inactive_drops), not processed')
            return
        result = synchronizer.add(side, stamp_ns, ReceivedImage(msg, self._clock()))
        if result.rejected == DROP_LATE and self._new_stale_pair(side, stamp_ns, synchronizer.tolerance_ns):
            self._counters.reject(REJECT_STALE, f'{side} image stamp {stamp_ns * 1e-9:.6f} s is not newer than the '
                                  'last paired stamp: dropped (a restarted source or bag needs a restart of lsm_node)')
        elif result.rejected == DROP_DUPLICATE:
            self._counters.warnings.warning(f'duplicate_{side}', f'{side} image with an already queued stamp '
                                            f'{stamp_ns * 1e-9:.6f} s: dropped')
        if result.pair is not None:
            self.on_pair(result.pair)

    def on_camera_info(self, side: Side, msg: CameraInfo) -> None:
        """A CameraInfo of ``side``: counted, cached; a pair waiting for it is tried again."""
        self._counters.count(f'{side}_camera_infos')
        stamp_ns = conversions.stamp_to_nanoseconds(msg.header.stamp)
        topic = self.topics.get(f'{side}_info')
        if topic is not None:
            self._monitor.record(topic, stamp_ns)
        cache = self.camera_infos
        if cache is not None:
            cache.update(side, stamp_ns, msg)
            self.retry_pair_awaiting_camera_info()

    def _new_stale_pair(self, side: Side, stamp_ns: int, tolerance_ns: int) -> bool:
        """A late image (not newer than the last pair): True when it is a new stale pair to count, False when it is
        the partner (stamp within ``tolerance_ns``, the synchronizer's) of the other side's late image counted
        already. So ``rejected['stale_stamp']`` counts a late pair once, and a lone late image once."""
        other: Side = 'right' if side == 'left' else 'left'
        with self._lock:
            waiting = self._stale_unpaired[other]
            partners = [s for s in waiting if abs(s - stamp_ns) <= tolerance_ns]
            if partners:
                waiting.remove(min(partners, key=lambda s: abs(s - stamp_ns)))
                return False
            self._stale_unpaired[side].append(stamp_ns)
            return True

    # ------------------------------------------------------------------------------------------ pairs
    def on_pair(self, pair: StereoPair[ReceivedImage]) -> None:
        """A synchronised pair: checked, calibrated, then submitted, held for its CameraInfo or rejected."""
        self._counters.count('pairs')
        settings = self._settings()   # the one set of parameters this pair is processed with
        try:
            checked = self.prepare_pair(pair, settings)
        except InputRejected as exc:
            self._counters.reject(exc.reason, str(exc))
            return
        try:
            prepared = self._calibrated(checked)
        except InputRejected as exc:
            wait_s = settings.node.camera_info_wait_s
            if exc.reason == REJECT_NO_CAMERA_INFO and wait_s > 0:
                self._await_camera_info(PairAwaitingCameraInfo(checked, self._clock() + wait_s, str(exc)))
            else:
                self._counters.reject(exc.reason, str(exc))
            return
        self._submit(prepared)

    def _await_camera_info(self, waiting: PairAwaitingCameraInfo) -> None:
        """Hold a pair whose CameraInfo is missing; the pair it replaces is rejected (missing_camera_info)."""
        with self._lock:
            replaced, self._awaiting_camera_info = self._awaiting_camera_info, waiting
        if replaced is not None:
            self._counters.reject(REJECT_NO_CAMERA_INFO, replaced.message)

    def retry_pair_awaiting_camera_info(self) -> None:
        """Try the held pair again (a CameraInfo arrived, or the deadline may have passed): submitted when its
        CameraInfo is there now, held on while it may still come, rejected otherwise."""
        with self._lock:
            waiting, self._awaiting_camera_info = self._awaiting_camera_info, None
        if waiting is None:
            return
        try:   # the stamp checks and the CameraInfo lookup again; the images were decoded and checked once
            self._check_stamp(waiting.pair.stamp_ns, waiting.pair.settings.node)
            prepared = self._calibrated(waiting.pair)
        except InputRejected as exc:
            if exc.reason == REJECT_NO_CAMERA_INFO and self._clock() < waiting.deadline_s:
                with self._lock:
                    if self._awaiting_camera_info is None:   # else a newer pair took the slot: this one goes
                        self._awaiting_camera_info = waiting
                        return
            self._counters.reject(exc.reason, str(exc))
            return
        self._submit(prepared)

    def _submit(self, prepared: PreparedPair) -> None:
        """Hand a checked pair on (it replaces a still pending one), or count it when not accepted."""
        if not self._accepting():
            self._counters.count('pairs_discarded_inactive')
            return
        with self._lock:
            self._last_accepted_stamp_ns = prepared.stamp_ns
            held = self._awaiting_camera_info
            if held is not None and held.pair.stamp_ns < prepared.stamp_ns:
                self._awaiting_camera_info = None   # overtaken by a newer pair: it would be stale now
            else:
                held = None
        if held is not None:
            self._counters.reject(REJECT_NO_CAMERA_INFO, held.message)
        if not self._submit_to(prepared):   # e.g. stopped by a concurrent cleanup
            self._counters.count('pairs_discarded_inactive')

    def _check_stamp(self, stamp_ns: int, cfg: NodeConfig) -> None:
        """Raise :class:`InputRejected` for a pair not newer than the last accepted one, or older than
        ``max_input_age_s``."""
        text = stamp_text(stamp_ns)
        with self._lock:
            last = self._last_accepted_stamp_ns
        if last is not None and stamp_ns <= last:
            raise InputRejected(REJECT_STALE, f'pair at {text} is not newer than the last processed pair '
                                f'({last * 1e-9:.6f} s): dropped')
        if cfg.max_input_age_s > 0:
            age_s = (self._now_ns() - stamp_ns) * 1e-9
            if age_s > cfg.max_input_age_s:
                raise InputRejected(REJECT_TOO_OLD, f'pair at {text} is {age_s:.3f} s old, more than '
                                    f'max_input_age_s = {cfg.max_input_age_s} s: dropped')

    def prepare_pair(self, pair: StereoPair[ReceivedImage], settings: ParameterSnapshot) -> PreparedPair:
        """Check a synchronised pair (stamp, encodings, data, sizes) and convert it for the network, without its
        calibration; raises :class:`InputRejected`."""
        cfg = settings.node
        stamp_ns = pair.stamp_ns
        text = stamp_text(stamp_ns)
        self._check_stamp(stamp_ns, cfg)
        left_msg, right_msg = pair.left.msg, pair.right.msg
        left, right = decode_image('left', left_msg, text), decode_image('right', right_msg, text)
        check_pair_images(left, right, self._resolution(settings), text)
        left_frame = cfg.left_frame_id or left_msg.header.frame_id or self._default_frame('left', DEFAULT_LEFT_FRAME)
        right_frame = cfg.right_frame_id or right_msg.header.frame_id or \
            self._default_frame('right', DEFAULT_RIGHT_FRAME)
        return PreparedPair(stamp_ns=stamp_ns, left_rgb=left, right_rgb=right, calibration=None,
                            left_frame=left_frame, right_frame=right_frame,
                            estimated_right_frame=cfg.estimated_right_frame_id or right_frame + ESTIMATED_FRAME_SUFFIX,
                            received_s=max(pair.left.received_s, pair.right.received_s), settings=settings)

    def _calibrated(self, checked: PreparedPair) -> PreparedPair:
        """``checked`` with the calibration of its CameraInfo when ``use_camera_info`` (else as it is); raises
        :class:`InputRejected` (missing or unusable CameraInfo)."""
        cfg = checked.settings.node
        if not cfg.use_camera_info:
            return checked
        height, width = checked.left_rgb.shape[:2]
        calibration = pair_calibration(self.camera_infos, checked.stamp_ns, (width, height),
                                       cfg.camera_info_tolerance_s, lambda side: self._resolve_topic(INFO_TOPICS[side]),
                                       self._counters.info_once)
        return dataclasses.replace(checked, calibration=calibration)

    def _default_frame(self, side: str, frame: str) -> str:
        self._counters.info_once(f'frame_{side}', f'{side} image has no frame_id and {side}_frame_id is empty: '
                                 f'using {frame!r}')
        return frame
