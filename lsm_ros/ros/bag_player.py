"""Play a rosbag2 (sqlite3 or MCAP, read with ``rosbags``) on ROS 2 topics, for demos and tests.

Messages go out as the bag's raw CDR bytes (``publisher.publish(bytes)``), renamed by a topic remap table,
with the original timing scaled by ``rate`` (0: as fast as possible) or paced by a callback called before
each stereo pair. Messages are deserialised only when they must change:

- ``rectify``: raw stereo images (``image_raw``) are undistorted and rectified with the (K, D, R, P) of
  their CameraInfo, as ``image_proc``'s rectify does, and published as ``image_rect``; the CameraInfo goes
  out unchanged (its P is the rectified camera's projection, which ``lsm_node`` uses for ``image_rect``);
- ``loop``: from the second pass on, header stamps are shifted by whole bag durations so that they keep
  increasing (``lsm_node`` drops pairs that are not newer than the last one).

Within one bag timestamp, CameraInfo messages are published before images, so that a subscriber has the
calibration when the pair arrives. Run ``python -m lsm_ros.ros.bag_player --help``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import cv2
import numpy as np
import rclpy
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CameraInfo, Image

from lsm_ros.ros import conversions
from lsm_ros.ros.isolation import apply_localhost_only_environment

_log = logging.getLogger(__name__)

IMAGE_TYPE = 'sensor_msgs/msg/Image'
CAMERA_INFO_TYPE = 'sensor_msgs/msg/CameraInfo'
PLAYER_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.VOLATILE)
LATCHED_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)


@dataclass(frozen=True)
class BagRecord:
    """One message of a bag: topic, ROS type name (``pkg/msg/Name``), log time (ns) and CDR bytes."""

    topic: str
    msgtype: str
    log_time_ns: int
    rawdata: bytes
    latched: bool = False   # offered with transient-local durability (e.g. /tf_static)


@dataclass(frozen=True)
class StereoTopics:
    """Topics of a stereo camera in a bag; ``rectified``: images are already ``image_rect``."""

    left_image: str
    right_image: str
    left_info: str
    right_info: str
    rectified: bool

    @property
    def image_to_info(self) -> dict[str, str]:
        return {self.left_image: self.left_info, self.right_image: self.right_info}


def message_class(msgtype: str) -> type:
    """'sensor_msgs/msg/Image' -> the rclpy message class."""
    package, kind, name = msgtype.split('/')
    return getattr(importlib.import_module(f'{package}.{kind}'), name)


@dataclass(frozen=True)
class BagTopic:
    """A topic of a bag: ROS type name, message count, and whether it was offered transient-local."""

    msgtype: str
    count: int
    latched: bool


def _is_latched(connection: Any) -> bool:
    qos = getattr(connection.ext, 'offered_qos_profiles', None) or []
    return any(getattr(q.durability, 'name', '') == 'TRANSIENT_LOCAL' for q in qos)


def bag_topics(bag_path: str | Path) -> dict[str, BagTopic]:
    """The topics of a bag."""
    from rosbags.highlevel import AnyReader
    with AnyReader([Path(bag_path)]) as reader:
        topics: dict[str, BagTopic] = {}
        for connection in reader.connections:
            known = topics.get(connection.topic)
            topics[connection.topic] = BagTopic(connection.msgtype, connection.msgcount + (known.count if known else 0),
                                                _is_latched(connection) or bool(known and known.latched))
        return topics


def detect_stereo_topics(bag_path: str | Path) -> StereoTopics:
    """Find the stereo layout (``.../left/image_{raw,rect}``, ``.../left/camera_info`` and the same for right)."""
    topics = bag_topics(bag_path)
    found: dict[str, str] = {}
    for side in ('left', 'right'):
        images = sorted(t for t, info in topics.items() if info.msgtype == IMAGE_TYPE and f'/{side}/' in f'{t}/')
        infos = sorted(t for t, info in topics.items() if info.msgtype == CAMERA_INFO_TYPE and f'/{side}/' in f'{t}/')
        preferred = [t for t in images if t.endswith('image_rect')] or [t for t in images if t.endswith('image_raw')]
        if not preferred or not infos:
            raise ValueError(f'{bag_path}: no {side} Image and CameraInfo topics (…/{side}/image_raw or image_rect, '
                             f'…/{side}/camera_info); topics: {sorted(topics)}')
        found[f'{side}_image'], found[f'{side}_info'] = preferred[0], infos[0]
    return StereoTopics(rectified=found['left_image'].endswith('image_rect'), **found)


def read_bag(bag_path: str | Path, topics: Sequence[str] | None = None) -> Iterator[BagRecord]:
    """Messages of ``topics`` (default all) in log-time order; at equal log times CameraInfo comes first."""
    from rosbags.highlevel import AnyReader
    with AnyReader([Path(bag_path)]) as reader:
        connections = [c for c in reader.connections if topics is None or c.topic in topics]
        group: list[BagRecord] = []
        for connection, log_time_ns, rawdata in reader.messages(connections=connections):
            record = BagRecord(connection.topic, connection.msgtype, log_time_ns, bytes(rawdata),
                               _is_latched(connection))
            if group and group[0].log_time_ns != log_time_ns:
                yield from sorted(group, key=lambda r: r.msgtype != CAMERA_INFO_TYPE)
                group = []
            group.append(record)
        yield from sorted(group, key=lambda r: r.msgtype != CAMERA_INFO_TYPE)


class StereoRectifier:
    """Undistorts and rectifies raw images with their CameraInfo (OpenCV ``initUndistortRectifyMap``).

    The output image has the CameraInfo's size and the projection ``P[:3,:3]`` (P's translation column, the
    stereo baseline, does not move pixels). The maps are cached per calibration.
    """

    def __init__(self) -> None:
        self._maps: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def maps(self, info: CameraInfo) -> tuple[np.ndarray, np.ndarray]:
        """(map_x, map_y) float32 (H, W) of a camera (cached)."""
        key = (info.width, info.height, tuple(info.k), tuple(info.d), tuple(info.r), tuple(info.p),
               info.distortion_model)
        if key not in self._maps:
            K, P, width, height = conversions.camera_info_to_matrices(info)
            R = np.asarray(info.r, dtype=np.float64).reshape(3, 3)
            R = R if np.any(R) else np.eye(3)
            if info.distortion_model not in ('plumb_bob', 'rational_polynomial', ''):
                raise ValueError(f'cannot rectify distortion model {info.distortion_model!r}')
            D = np.asarray(info.d, dtype=np.float64)
            P_rect = P[:3, :3] if np.any(P[:3, :3]) else K
            self._maps[key] = cv2.initUndistortRectifyMap(K, D, R, P_rect, (width, height), cv2.CV_32FC1)
        return self._maps[key]

    def rectify(self, image: Image, info: CameraInfo) -> Image:
        """A rectified copy of ``image`` (same encoding, header and size as the CameraInfo)."""
        if image.encoding not in conversions.COLOR_ENCODINGS:
            raise ValueError(f'cannot rectify encoding {image.encoding!r}')
        if (image.width, image.height) != (info.width, info.height):
            raise ValueError(f'image {image.width}x{image.height} does not match its CameraInfo '
                             f'{info.width}x{info.height}')
        channels = conversions.COLOR_ENCODINGS[image.encoding][0]
        data = np.frombuffer(image.data, dtype=np.uint8).reshape(image.height, image.step)
        pixels = data[:, :image.width * channels].reshape(image.height, image.width, channels)
        map_x, map_y = self.maps(info)
        rectified = cv2.remap(np.ascontiguousarray(pixels), map_x, map_y, cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT).reshape(image.height, image.width, channels)
        out = Image(header=image.header, height=image.height, width=image.width, encoding=image.encoding,
                    is_bigendian=image.is_bigendian, step=image.width * channels)
        out.data = conversions.byte_array(rectified)
        return out


@dataclass
class StereoFrame:
    """One stereo frame of a bag (deserialised): images and CameraInfo of both sides, by the left stamp."""

    stamp_ns: int
    left_image: Image
    right_image: Image
    left_info: CameraInfo
    right_info: CameraInfo


def read_stereo_frames(bag_path: str | Path, topics: StereoTopics | None = None, *, max_frames: int | None = None,
                       rectify: bool = True) -> list[StereoFrame]:
    """The complete stereo frames of a bag (messages grouped by header stamp), oldest first.

    Raw images are rectified with their CameraInfo when ``rectify`` (as :class:`BagPlayer` does).
    """
    topics = topics or detect_stereo_topics(bag_path)
    roles = {topics.left_image: 'left_image', topics.right_image: 'right_image', topics.left_info: 'left_info',
             topics.right_info: 'right_info'}
    types = {'left_image': Image, 'right_image': Image, 'left_info': CameraInfo, 'right_info': CameraInfo}
    partial: dict[int, dict[str, Any]] = {}
    frames: list[StereoFrame] = []
    rectifier = StereoRectifier()
    for record in read_bag(bag_path, list(roles)):
        role = roles[record.topic]
        message = deserialize_message(record.rawdata, types[role])
        stamp_ns = conversions.stamp_to_nanoseconds(message.header.stamp)
        parts = partial.setdefault(stamp_ns, {})
        parts[role] = message
        if len(parts) == len(types):
            del partial[stamp_ns]
            if rectify and not topics.rectified:
                for side in ('left', 'right'):
                    parts[f'{side}_image'] = rectifier.rectify(parts[f'{side}_image'], parts[f'{side}_info'])
            frames.append(StereoFrame(stamp_ns=stamp_ns, **parts))
            if max_frames is not None and len(frames) >= max_frames:
                break
    return sorted(frames, key=lambda frame: frame.stamp_ns)


@dataclass
class PlaybackSummary:
    """What a :meth:`BagPlayer.play` call published."""

    pairs: int = 0
    messages: int = 0
    passes: int = 0                      # passes over the bag started (loop)
    wall_time_s: float = 0.0
    pair_stamps_ns: list[int] = field(default_factory=list)
    per_topic: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)


def _loop_shift_ns(pair_log_times: Sequence[int]) -> int:
    """Stamp shift between two passes: the pass's duration plus its mean pair period (1 s for a single pair)."""
    if len(pair_log_times) < 2:
        return 1_000_000_000
    duration = pair_log_times[-1] - pair_log_times[0]
    return duration + round(duration / (len(pair_log_times) - 1))


def _shift_header_stamp(message: Any, offset_ns: int) -> None:
    header = getattr(message, 'header', None)
    if header is not None and offset_ns:
        header.stamp = conversions.nanoseconds_to_stamp(conversions.stamp_to_nanoseconds(header.stamp) + offset_ns)


class BagPlayer(Node):
    """A node that publishes a bag's messages (see the module docstring).

    ``remap``: bag topic -> published topic; only these topics are played (default: every topic, same name).
    ``rectify``: bag image topic -> bag CameraInfo topic of the images to rectify. ``pair_topic``: the bag
    topic whose messages count as stereo pairs (default: the first left Image topic). ``rate``: speed factor
    of the original timing, 0 = no waiting.
    """

    def __init__(self, bag_path: str | Path, *, remap: Mapping[str, str] | None = None,
                 rectify: Mapping[str, str] | None = None, pair_topic: str | None = None, rate: float = 1.0,
                 loop: bool = False, max_pairs: int | None = None, node_name: str = 'lsm_bag_player',
                 **node_kwargs: Any) -> None:
        super().__init__(node_name, **node_kwargs)
        self.bag_path = Path(bag_path)
        topics = bag_topics(self.bag_path)
        self.remap = dict(remap) if remap is not None else {t: t for t in topics}
        missing = sorted(set(self.remap) - set(topics))
        if missing:
            raise ValueError(f'{self.bag_path}: topics {missing} are not in the bag (it has {sorted(topics)})')
        self.rectify_topics = dict(rectify or {})
        for image_topic, info_topic in self.rectify_topics.items():
            if image_topic not in self.remap or info_topic not in topics:
                raise ValueError(f'cannot rectify {image_topic} with {info_topic}: both must be in the bag and '
                                 'the image topic must be played')
        images = [t for t in self.remap if topics[t].msgtype == IMAGE_TYPE]
        self.pair_topic = pair_topic or next((t for t in images if '/left/' in t), images[0] if images else None)
        if self.pair_topic is None or self.pair_topic not in self.remap:
            raise ValueError(f'no pair topic among the played topics {sorted(self.remap)}')
        if rate < 0:
            raise ValueError(f'rate must be >= 0, got {rate}')
        self.rate, self.loop, self.max_pairs = rate, loop, max_pairs
        self._topics = {t: topics[t] for t in self.remap}
        self._bag_publishers = {
            topic: self.create_publisher(message_class(info.msgtype), self.remap[topic],
                                         LATCHED_QOS if info.latched else PLAYER_QOS)
            for topic, info in self._topics.items()}
        self._rectifier = StereoRectifier()
        self._stop = threading.Event()

    def wait_for_subscribers(self, topics: Sequence[str] | None = None, timeout_s: float = 10.0) -> bool:
        """Wait until every published topic in ``topics`` (bag names; default: the images) has a subscriber."""
        topics = list(topics) if topics is not None else \
            [t for t, info in self._topics.items() if info.msgtype == IMAGE_TYPE]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self._bag_publishers[t].get_subscription_count() > 0 for t in topics):
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Make a running :meth:`play` return after its current message."""
        self._stop.set()

    def play(self, *, before_pair: Callable[[int], None] | None = None,
             on_pair: Callable[[int, int], None] | None = None) -> PlaybackSummary:
        """Publish the bag (once, or until :meth:`stop` when ``loop``); returns what was published.

        ``before_pair(index)``: called before each pair after the first (may block: paces the playback);
        the original timing restarts after it. ``on_pair(index, stamp_ns)``: called just before a pair's left
        image is published. Stops after ``max_pairs`` pairs (all messages up to the next pair's image).
        """
        summary = PlaybackSummary()
        start = time.monotonic()
        stamp_offset_ns = 0
        self._stop.clear()
        while not self._stop.is_set():
            pair_log_times = self._play_pass(summary, stamp_offset_ns, before_pair, on_pair)
            summary.passes += 1
            if not self.loop or summary.pairs == 0:
                break
            stamp_offset_ns += _loop_shift_ns(pair_log_times)
        summary.wall_time_s = time.monotonic() - start
        return summary

    def _play_pass(self, summary: PlaybackSummary, stamp_offset_ns: int,
                   before_pair: Callable[[int], None] | None,
                   on_pair: Callable[[int, int], None] | None) -> list[int]:
        """One pass over the bag; returns the log times of the pairs it published."""
        latest_info: dict[str, CameraInfo] = {}
        pair_log_times: list[int] = []
        anchor_wall, anchor_log = None, 0
        for record in read_bag(self.bag_path, list(set(self.remap) | set(self.rectify_topics.values()))):
            if self._stop.is_set():
                return pair_log_times
            if record.topic == self.pair_topic:
                if self.max_pairs is not None and summary.pairs >= self.max_pairs:
                    self._stop.set()
                    return pair_log_times
                if summary.pairs > 0 and before_pair is not None:
                    before_pair(summary.pairs)
                    anchor_wall = None
            if self.rate > 0:
                if anchor_wall is None:
                    anchor_wall, anchor_log = time.monotonic(), record.log_time_ns
                delay = anchor_wall + (record.log_time_ns - anchor_log) * 1e-9 / self.rate - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return pair_log_times
            message = self._outgoing(record, latest_info, stamp_offset_ns, summary)
            if message is None:
                continue
            if record.topic == self.pair_topic:
                header_source = deserialize_message(message, Image) if isinstance(message, bytes) else message
                stamp_ns = conversions.stamp_to_nanoseconds(header_source.header.stamp)
                if on_pair is not None:
                    on_pair(summary.pairs, stamp_ns)
                summary.pair_stamps_ns.append(stamp_ns)
                summary.pairs += 1
                pair_log_times.append(record.log_time_ns)
            try:
                self._bag_publishers[record.topic].publish(message)
            except Exception as exc:  # noqa: BLE001 - keep playing (e.g. RCLError under a flood)
                summary.skipped['publish_failed'] += 1
                _log.warning('publishing %s failed: %s', self.remap[record.topic], exc)
                continue
            summary.messages += 1
            summary.per_topic[self.remap[record.topic]] += 1
        return pair_log_times

    def _outgoing(self, record: BagRecord, latest_info: dict[str, CameraInfo], stamp_offset_ns: int,
                  summary: PlaybackSummary) -> Any:
        """The bytes or message to publish for ``record`` (None: nothing to publish)."""
        if record.msgtype == CAMERA_INFO_TYPE and record.topic in self.rectify_topics.values():
            latest_info[record.topic] = deserialize_message(record.rawdata, CameraInfo)
            if record.topic not in self.remap:
                return None
        if record.topic in self.rectify_topics:
            info = latest_info.get(self.rectify_topics[record.topic])
            if info is None:
                summary.skipped['no_camera_info_to_rectify'] += 1
                _log.warning('no CameraInfo on %s yet: %s image not rectified, skipped',
                             self.rectify_topics[record.topic], record.topic)
                return None
            message = self._rectifier.rectify(deserialize_message(record.rawdata, Image), info)
            _shift_header_stamp(message, stamp_offset_ns)
            return message
        if stamp_offset_ns and not record.latched:
            message = deserialize_message(record.rawdata, message_class(record.msgtype))
            _shift_header_stamp(message, stamp_offset_ns)
            return message
        return record.rawdata


def stereo_playback_tables(topics: StereoTopics, output_prefix: str = '/stereo') -> tuple[dict[str, str],
                                                                                          dict[str, str]]:
    """(remap, rectify) tables that play a stereo bag as ``<prefix>/{left,right}/{image_rect,camera_info}``;
    raw images are rectified with their CameraInfo."""
    remap = {topics.left_image: f'{output_prefix}/left/image_rect',
             topics.right_image: f'{output_prefix}/right/image_rect',
             topics.left_info: f'{output_prefix}/left/camera_info',
             topics.right_info: f'{output_prefix}/right/camera_info'}
    rectify = {} if topics.rectified else topics.image_to_info
    return remap, rectify


def _parse_remaps(values: Sequence[str]) -> dict[str, str]:
    remap = {}
    for value in values:
        source, separator, target = value.partition(':=')
        remap[source] = target if separator else source
    return remap


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lsm_ros.ros.bag_player BAG [--stereo | --topic SRC[:=DST] ...]`` (localhost-only network)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('bag', help='rosbag2 directory (sqlite3 or mcap)')
    parser.add_argument('--stereo', action='store_true',
                        help='play the stereo topics as /stereo/{left,right}/{image_rect,camera_info}, rectifying '
                             'raw images (default when no --topic is given)')
    parser.add_argument('--topic', action='append', default=[], metavar='SRC[:=DST]', help='play SRC (as DST)')
    parser.add_argument('--rectify', action='append', default=[], metavar='IMAGE:=CAMERA_INFO',
                        help='rectify the images of bag topic IMAGE with bag topic CAMERA_INFO')
    parser.add_argument('--rate', type=float, default=1.0, help='speed factor (0: as fast as possible)')
    parser.add_argument('--loop', action='store_true', help='play again and again (stamps keep increasing)')
    parser.add_argument('--max-pairs', type=int, default=None, help='stop after this many stereo pairs')
    parser.add_argument('--domain-id', type=int, default=None, help='ROS_DOMAIN_ID (default: kept, else per PID)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='[%(levelname)s] %(message)s')
    environment = apply_localhost_only_environment(args.domain_id)
    if args.stereo or not args.topic:
        remap, rectify = stereo_playback_tables(detect_stereo_topics(args.bag))
    else:
        remap, rectify = _parse_remaps(args.topic), _parse_remaps(args.rectify)
    rclpy.init(args=[])
    player = BagPlayer(args.bag, remap=remap, rectify=rectify, rate=args.rate, loop=args.loop,
                       max_pairs=args.max_pairs)
    _log.info('playing %s on ROS_DOMAIN_ID=%s (localhost): %s', args.bag, environment['ROS_DOMAIN_ID'],
              ', '.join(f'{s} -> {d}' for s, d in remap.items()))
    try:
        summary = player.play()
        _log.info('published %d pairs, %d messages in %.1f s', summary.pairs, summary.messages, summary.wall_time_s)
    except KeyboardInterrupt:
        pass
    finally:
        player.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
