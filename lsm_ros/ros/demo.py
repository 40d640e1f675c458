"""The ROS demo: a stereo bag played into ``lsm_node`` over loopback, every product recorded to files.

One process, one :class:`~lsm_ros.ros.graph.RosGraph` (an rclpy context and a multi-threaded executor), the
localhost-only network forced (:mod:`lsm_ros.ros.isolation`):

    BagPlayer --/stereo/{left,right}/{image_rect,camera_info}--> LsmNode (/lsm/lsm_node) --products--> recorder

The bag (default: the EuRoC V1_01 stereo bag of ``../shared/data`` when present, else a synthetic bag written
into the output folder) has raw images; the player rectifies them with their CameraInfo, as a
stereo_image_proc pipeline would, and publishes the CameraInfo whose P is the rectified projection.

Pacing: ``realtime=False`` (default) publishes a pair only after the products of the previous one arrived
(or it was rejected), so every pair is reconstructed even by a network that takes seconds per pair;
``realtime=True`` plays at the bag's timing (times ``rate``) and lets the node drop what it cannot keep up
with (latest pair wins).

Files written to ``out_dir``: ``points_XXXX.ply`` (x y z, red green blue, confidence), ``left_depth_XXXX.png``
(false colour) and ``.npy`` (float32, NaN invalid), ``relative_pose.csv``, ``info.jsonl``, ``summary.json``
and ``README.txt`` (XXXX = index of the played pair). With the semantic model also ``labels_XXXX.png`` (the
left label image in the colours of ``labels.json``, the legend of the active label set), ``overlay_XXXX.png``
(``~/semantic/overlay``), a ``label`` property in the ply files and, after the last pair, one ``~/query``
answer: ``query_masks/{left,right}_<phrase>.png`` and ``query.json``.
"""
from __future__ import annotations

import csv
import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from geometry_msgs.msg import PoseStamped
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from tf2_msgs.msg import TFMessage
from vision_msgs.msg import LabelInfo

from lsm_ros import semantics
from lsm_ros.io import depth_to_color, write_json, write_mono_png, write_ply, write_rgb_png
from lsm_ros.msg import ReconstructionInfo
from lsm_ros.pipeline import Reconstructor
from lsm_ros.ros import conversions
from lsm_ros.ros.bag_player import BagPlayer, detect_stereo_topics, stereo_playback_tables
from lsm_ros.ros.graph import RosGraph, remap_arguments
from lsm_ros.ros.isolation import apply_localhost_only_environment
from lsm_ros.ros.node import (INFO_TOPIC, LEFT_DEPTH_TOPIC, LEFT_IMAGE_TOPIC, LEFT_INFO_TOPIC, LEFT_MODEL_INFO_TOPIC,
                              POINTS_TOPIC, RELATIVE_POSE_TOPIC, RIGHT_DEPTH_TOPIC, RIGHT_IMAGE_TOPIC, RIGHT_INFO_TOPIC,
                              RIGHT_MODEL_INFO_TOPIC, SEMANTIC_LABEL_INFO_TOPIC, SEMANTIC_LABELS_TOPIC,
                              SEMANTIC_OVERLAY_TOPIC, TF_TOPIC, LsmNode)
from lsm_ros.ros.synthetic import write_synthetic_stereo_bag
from lsm_ros.shared_data import shared_directory
from lsm_ros.srv import TextQuery

_log = logging.getLogger(__name__)

DEMO_NAMESPACE = 'lsm'
STEREO_PREFIX = '/stereo'
EUROC_BAG_RELATIVE = Path('data') / 'euroc_v101_stereo_rosbag2' / 'euroc_v101_stereo_db3'
SYNTHETIC_BAG_NAME = 'synthetic_stereo_bag'
RECORDER_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
_PRODUCT_TYPES = {POINTS_TOPIC: PointCloud2, LEFT_DEPTH_TOPIC: Image, RIGHT_DEPTH_TOPIC: Image,
                  LEFT_MODEL_INFO_TOPIC: CameraInfo, RIGHT_MODEL_INFO_TOPIC: CameraInfo,
                  RELATIVE_POSE_TOPIC: PoseStamped, INFO_TOPIC: ReconstructionInfo,
                  SEMANTIC_LABELS_TOPIC: Image, SEMANTIC_OVERLAY_TOPIC: Image, SEMANTIC_LABEL_INFO_TOPIC: LabelInfo}
DEFAULT_QUERY_PHRASES = ('floor', 'wall', 'chair')
QUERY_MASKS_DIR = 'query_masks'
# Colour i of label_palette does not depend on the palette's length: these are the colours of the node's overlay
# and of labels.json for every label set (at most MAX_PHRASES labels).
LABEL_PALETTE = semantics.label_palette(semantics.MAX_PHRASES)


def default_bag(out_dir: Path) -> tuple[Path, str]:
    """(bag, kind): the EuRoC bag when present ('euroc'), else a synthetic one in ``out_dir`` ('synthetic')."""
    euroc = shared_directory() / EUROC_BAG_RELATIVE
    if (euroc / 'metadata.yaml').is_file():
        return euroc, 'euroc'
    synthetic = out_dir / SYNTHETIC_BAG_NAME
    if not (synthetic / 'metadata.yaml').is_file():
        _log.info('EuRoC bag not found at %s: writing a synthetic stereo bag to %s', euroc, synthetic)
        write_synthetic_stereo_bag(synthetic)
    return synthetic, 'synthetic'


class ProductRecorder(Node):
    """Subscribes to the products of ``lsm_node`` named in ``topics`` and writes the demo's files (see the module
    docstring); asks ``~/query`` once on request."""

    def __init__(self, out_dir: Path, topics: Mapping[str, str], *, record_tf: bool, **node_kwargs: Any) -> None:
        super().__init__('lsm_demo_recorder', **node_kwargs)
        self.out_dir = out_dir
        self.topics = dict(topics)          # product key ('~/points', ...) -> resolved topic name
        self.counts: Counter[str] = Counter()
        self.infos: dict[int, ReconstructionInfo] = {}
        self.poses: dict[int, PoseStamped] = {}
        self.files: list[str] = []
        self.errors: list[str] = []
        self._pair_index: dict[int, int] = {}
        self._condition = threading.Condition()
        self._info_log = open(out_dir / 'info.jsonl', 'w', encoding='utf-8')
        self.files.append('info.jsonl')
        handlers: dict[str, Callable[[Any], None]] = {
            POINTS_TOPIC: self._on_points, LEFT_DEPTH_TOPIC: self._on_left_depth,
            RELATIVE_POSE_TOPIC: self._on_pose, INFO_TOPIC: self._on_info,
            SEMANTIC_LABELS_TOPIC: self._on_labels, SEMANTIC_OVERLAY_TOPIC: self._on_overlay}
        for key, topic in topics.items():
            self.create_subscription(_PRODUCT_TYPES[key], topic, self._counting(key, handlers.get(key)), RECORDER_QOS)
        if record_tf:
            self.topics[TF_TOPIC] = TF_TOPIC
            self.create_subscription(TFMessage, TF_TOPIC, self._counting(TF_TOPIC, None), 100)

    def expect_pair(self, index: int, stamp_ns: int) -> None:
        """Register the stamp of played pair ``index`` (names its files)."""
        with self._condition:
            self._pair_index[stamp_ns] = index

    def _index(self, stamp_ns: int) -> int:
        with self._condition:
            if stamp_ns not in self._pair_index:
                self._pair_index[stamp_ns] = len(self._pair_index)
            return self._pair_index[stamp_ns]

    def _counting(self, key: str, handler: Callable[[Any], None] | None) -> Callable[[Any], None]:
        def callback(msg: Any) -> None:
            with self._condition:
                self.counts[key] += 1
            try:
                if handler is not None:
                    handler(msg)
            except Exception as exc:  # noqa: BLE001 - a file that cannot be written must not stop the demo
                self.errors.append(f'{key}: {type(exc).__name__}: {exc}')
                _log.error('recording %s failed: %s', key, exc)
            with self._condition:
                self._condition.notify_all()
        return callback

    def _on_points(self, msg: PointCloud2) -> None:
        cloud = conversions.pointcloud2_to_numpy(msg)
        name = f'points_{self._index(conversions.stamp_to_nanoseconds(msg.header.stamp)):04d}.ply'
        scalars = {key: cloud[key] for key in ('confidence', conversions.LABEL_FIELD_NAME) if key in cloud}
        if conversions.LABEL_FIELD_NAME in scalars:   # uint32 on ~/points (PCL's); at most 64 labels: a PLY uchar
            scalars[conversions.LABEL_FIELD_NAME] = scalars[conversions.LABEL_FIELD_NAME].astype(np.uint8)
        write_ply(self.out_dir / name, cloud['xyz'], cloud['rgb_u8'], scalars)
        self.files.append(name)

    def _on_left_depth(self, msg: Image) -> None:
        depth = conversions.depth_image_to_numpy(msg)
        stem = f'left_depth_{self._index(conversions.stamp_to_nanoseconds(msg.header.stamp)):04d}'
        np.save(self.out_dir / f'{stem}.npy', depth)
        write_rgb_png(self.out_dir / f'{stem}.png', depth_to_color(depth))
        self.files += [f'{stem}.npy', f'{stem}.png']

    def _on_labels(self, msg: Image) -> None:
        name = f'labels_{self._index(conversions.stamp_to_nanoseconds(msg.header.stamp)):04d}.png'
        write_rgb_png(self.out_dir / name, semantics.colorize_labels(_mono8(msg), LABEL_PALETTE))
        self.files.append(name)

    def _on_overlay(self, msg: Image) -> None:
        name = f'overlay_{self._index(conversions.stamp_to_nanoseconds(msg.header.stamp)):04d}.png'
        write_rgb_png(self.out_dir / name, conversions.image_to_numpy(msg))
        self.files.append(name)

    def _on_pose(self, msg: PoseStamped) -> None:
        with self._condition:
            self.poses[conversions.stamp_to_nanoseconds(msg.header.stamp)] = msg

    def _on_info(self, msg: ReconstructionInfo) -> None:
        stamp_ns = conversions.stamp_to_nanoseconds(msg.header.stamp)
        record = info_to_dict(msg)
        record['pair_index'] = self._index(stamp_ns)
        self._info_log.write(json.dumps(record) + '\n')
        self._info_log.flush()
        with self._condition:
            self.infos[stamp_ns] = msg
        _log.info('pair %d (stamp %.3f s): %d points, %s, pose inliers %d, network %.2f s, latency %.2f s',
                  record['pair_index'], stamp_ns * 1e-9, msg.num_points,
                  f'metric (x{msg.scale_factor:.3g})' if msg.metric_scale else 'model units', msg.pose_inliers,
                  msg.inference_time_s, msg.total_time_s)

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Block until ``predicate()`` (checked whenever a product arrives, and every 0.1 s) or the timeout."""
        deadline = time.monotonic() + timeout_s
        with self._condition:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._condition.wait(min(remaining, 0.1))
            return True

    def has_info(self, stamp_ns: int) -> bool:
        return stamp_ns in self.infos

    def publishers_matched(self) -> bool:
        """True when every product topic has a publisher (the node was discovered)."""
        return all(self.count_publishers(topic) > 0 for key, topic in self.topics.items() if key != TF_TOPIC)

    def write_relative_poses(self) -> Path:
        """relative_pose.csv: one row per received pose, with the metric flag of its ~/info."""
        path = self.out_dir / 'relative_pose.csv'
        with open(path, 'w', newline='', encoding='utf-8') as f:
            writer = csv.writer(f)
            writer.writerow(['pair_index', 'stamp_s', 'x', 'y', 'z', 'qx', 'qy', 'qz', 'qw', 'metric_scale',
                             'frame_id'])
            for stamp_ns in sorted(self.poses):
                pose = self.poses[stamp_ns].pose
                info = self.infos.get(stamp_ns)
                writer.writerow([self._index(stamp_ns), f'{stamp_ns * 1e-9:.9f}', pose.position.x, pose.position.y,
                                 pose.position.z, pose.orientation.x, pose.orientation.y, pose.orientation.z,
                                 pose.orientation.w, int(info.metric_scale) if info else '',
                                 self.poses[stamp_ns].header.frame_id])
        self.files.append(path.name)
        return path

    def write_label_legend(self) -> list[str] | None:
        """labels.json: index, phrase and colour of each label of the last pair's active label set; returns the
        labels (None, and no file, when no pair was labelled)."""
        with self._condition:
            labels = list(self.infos[max(self.infos)].labels) if self.infos else []
        if not labels:
            return None
        write_json(self.out_dir / 'labels.json', {'labels': [
            {'index': index, 'phrase': phrase, 'rgb': LABEL_PALETTE[index]} for index, phrase in enumerate(labels)]})
        self.files.append('labels.json')
        return labels

    def record_query(self, service: str, phrases: Sequence[str], timeout_s: float) -> dict[str, Any]:
        """Ask ``service`` (``~/query``) ``phrases`` on both views of the latest reconstruction; write the masks
        to query_masks/ and the answer to query.json. A failure (no service, no answer in ``timeout_s``,
        refusal) is logged and recorded with success false and its message; returns query.json's content."""
        record: dict[str, Any] = dict(phrases=list(phrases), success=False, message='')
        client = self.create_client(TextQuery, service)
        try:
            if not client.wait_for_service(timeout_sec=min(timeout_s, 30.0)):
                raise TimeoutError(f'service {service} not available')
            response = client.call(TextQuery.Request(phrases=list(phrases)), timeout_sec=timeout_s)
            if response.success:
                record.update(self._write_query_masks(response))
            record.update(success=bool(response.success), message=response.message)
        except TimeoutError as exc:
            record['message'] = str(exc) or f'no answer from {service} within {timeout_s:.0f} s'
        except Exception as exc:  # noqa: BLE001 - a failed query is recorded, the demo goes on
            record['message'] = f'{type(exc).__name__}: {exc}'
        finally:
            self.destroy_client(client)
        write_json(self.out_dir / 'query.json', record)
        self.files.append('query.json')
        if record['success']:
            _log.info('query on pair %d: %s', record['pair_index'], ', '.join(
                f'{phrase!r} {100.0 * score:.1f} %' for phrase, score in zip(record['phrases'], record['scores'])))
        else:
            _log.warning('query %s failed: %s', list(phrases), record['message'])
        return record

    def _write_query_masks(self, response: TextQuery.Response) -> dict[str, Any]:
        """Write each (view, phrase) mask of a successful answer; its query.json fields."""
        phrases = list(response.phrases)
        slugs = semantics.unique_slugs(phrases)
        masks: dict[str, dict[str, str]] = {phrase: {} for phrase in phrases}
        for position, view in enumerate(response.views):
            for index, (phrase, slug) in enumerate(zip(phrases, slugs)):
                name = f'{QUERY_MASKS_DIR}/{view}_{slug}.png'
                write_mono_png(self.out_dir / name, _mono8(response.masks[position * len(phrases) + index]))
                masks[phrase][view] = name
                self.files.append(name)
        stamp_ns = conversions.stamp_to_nanoseconds(response.stamp)
        return dict(phrases=phrases, views=list(response.views), pair_index=self._index(stamp_ns),
                    stamp_s=stamp_ns * 1e-9, scores=list(response.scores),
                    max_probabilities=list(response.max_probabilities),
                    max_similarities=list(response.max_similarities), masks=masks)

    def destroy_node(self) -> None:
        self._info_log.close()
        super().destroy_node()


def info_to_dict(msg: ReconstructionInfo) -> dict[str, Any]:
    """Every field of a ReconstructionInfo as JSON-ready values (stamp in seconds)."""
    return dict(stamp_s=conversions.stamp_to_seconds(msg.header.stamp), frame_id=msg.header.frame_id,
                metric_scale=bool(msg.metric_scale), scale_source=msg.scale_source, scale_factor=msg.scale_factor,
                baseline_m=msg.baseline_m, intrinsics_source=msg.intrinsics_source, width=msg.width,
                height=msg.height, k_left=[float(v) for v in msg.k_left], k_right=[float(v) for v in msg.k_right],
                num_points=msg.num_points, pose_valid=bool(msg.pose_valid), pose_inliers=msg.pose_inliers,
                inference_time_s=float(msg.inference_time_s), total_time_s=float(msg.total_time_s),
                labels=list(msg.labels))


def _mono8(msg: Image) -> np.ndarray:
    """A mono8 Image as (H, W) uint8."""
    if msg.encoding != 'mono8':
        raise ValueError(f'expected a mono8 image, got {msg.encoding!r}')
    return conversions.image_to_numpy(msg)[..., 0]   # mono8 comes back replicated into three channels


def run_demo(out_dir: str | Path, *, bag: str | Path | None = None, max_pairs: int | None = 5,
             reconstructor: Reconstructor | None = None, realtime: bool = False, rate: float = 1.0,
             publish_tf: bool = True, node_parameters: Mapping[str, Any] | None = None,
             pair_timeout_s: float = 300.0, domain_id: int | None = None,
             query_phrases: Sequence[str] | None = DEFAULT_QUERY_PHRASES) -> dict[str, Any]:
    """Play a stereo bag into ``lsm_node`` and record its products in ``out_dir``; returns the summary.

    ``bag``: rosbag2 folder (or a file in it) with ``.../{left,right}/{image_raw|image_rect, camera_info}``
    topics; default EuRoC if present, else synthetic. ``reconstructor``: the model to run (None: the node
    builds one from ``node_parameters``' checkpoint paths). ``max_pairs``: None plays the whole bag.
    ``realtime``/``rate``: pacing (see the module docstring). ``pair_timeout_s``: longest wait for one pair's
    products. The network stays on localhost (``domain_id``: default kept if set, else per process).
    ``query_phrases``: asked once to ``~/query`` after the last pair when the model is semantic (None or empty:
    no query); checked before anything runs (ValueError).
    """
    phrases = semantics.validate_phrases(query_phrases) if query_phrases else ()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    environment = apply_localhost_only_environment(domain_id)
    if bag is None:
        bag_path, bag_kind = default_bag(out_dir)
    else:
        bag_path, bag_kind = Path(bag), 'given'
        bag_path = bag_path.parent if bag_path.is_file() else bag_path
    stereo_topics = detect_stereo_topics(bag_path)
    remap, rectify = stereo_playback_tables(stereo_topics, STEREO_PREFIX)
    _log.info('demo: %s bag %s, %s, ROS_DOMAIN_ID=%s (localhost only)', bag_kind, bag_path,
              'real time' if realtime else 'one pair at a time', environment['ROS_DOMAIN_ID'])

    started = time.monotonic()
    with RosGraph(name='lsm_demo') as graph:
        context = graph.context
        overrides = [Parameter('publish_tf', value=publish_tf)]
        overrides += [Parameter(name, value=value) for name, value in (node_parameters or {}).items()]
        input_remaps = {LEFT_IMAGE_TOPIC: remap[stereo_topics.left_image],
                        RIGHT_IMAGE_TOPIC: remap[stereo_topics.right_image],
                        LEFT_INFO_TOPIC: remap[stereo_topics.left_info],
                        RIGHT_INFO_TOPIC: remap[stereo_topics.right_info]}
        cli_args = remap_arguments(input_remaps)
        lsm_node = graph.add(LsmNode(reconstructor, context=context, namespace=DEMO_NAMESPACE, cli_args=cli_args,
                                     parameter_overrides=overrides, use_global_arguments=False))
        recorder = graph.add(ProductRecorder(out_dir, lsm_node.output_topic_names(), record_tf=publish_tf,
                                             context=context))
        player = graph.add(BagPlayer(bag_path, remap=remap, rectify=rectify, rate=rate if realtime else 0.0,
                                     max_pairs=max_pairs, context=context))
        if not player.wait_for_subscribers(timeout_s=30.0) or not recorder.wait_for(recorder.publishers_matched, 30.0):
            raise RuntimeError('lsm_node, the player and the recorder did not discover each other within 30 s')

        last_pair: dict[str, int] = {}   # stamp_ns and the node's rejection count when it was published

        def on_pair(index: int, stamp_ns: int) -> None:
            recorder.expect_pair(index, stamp_ns)
            last_pair.update(stamp_ns=stamp_ns, rejections=_rejections(lsm_node))

        def last_pair_done() -> bool:
            """Products of the last published pair arrived, or the node rejected something since."""
            return recorder.has_info(last_pair['stamp_ns']) or _rejections(lsm_node) > last_pair['rejections']

        def wait_previous_pair(index: int) -> None:
            if not recorder.wait_for(last_pair_done, pair_timeout_s):
                _log.warning('no products for pair %d within %.0f s: going on', index - 1, pair_timeout_s)

        summary_playback = player.play(before_pair=None if realtime else wait_previous_pair, on_pair=on_pair)
        if last_pair:
            recorder.wait_for(last_pair_done, pair_timeout_s)
        lsm_node.wait_idle(pair_timeout_s)
        # the last products travel on several topics: give the slower ones a moment (pose and /tf only exist
        # for pairs whose pose succeeded, hence the short second wait)
        expected = len(recorder.infos)
        recorder.wait_for(lambda: all(recorder.counts[key] >= expected for key in recorder.topics
                                      if key not in (RELATIVE_POSE_TOPIC, TF_TOPIC)), 5.0)
        recorder.wait_for(lambda: all(recorder.counts[key] >= expected
                                      for key in (RELATIVE_POSE_TOPIC, TF_TOPIC) if key in recorder.topics), 0.5)
        recorder.write_relative_poses()
        labels = recorder.write_label_legend()
        query = None
        if lsm_node.reconstructor.semantic and phrases:
            query = recorder.record_query(lsm_node.query_service_name(), phrases, pair_timeout_s)
        statistics = lsm_node.statistics()
        summary = _summary(bag_path, bag_kind, environment, realtime, rate, summary_playback, recorder,
                           lsm_node, statistics, time.monotonic() - started)
        summary.update(labels=labels, query=None if query is None else
                       {key: query[key] for key in ('phrases', 'success', 'message')})
        write_json(out_dir / 'summary.json', summary)
        (out_dir / 'README.txt').write_text(_readme(summary), encoding='utf-8')
        _log.info('demo finished: %d of %d pairs reconstructed, files in %s', summary['pairs_reconstructed'],
                  summary['pairs_played'], out_dir)
        return summary


def _rejections(node: LsmNode) -> int:
    statistics = node.statistics()
    return sum(statistics['rejected'].values()) + statistics['worker']['failed']


def _summary(bag_path: Path, bag_kind: str, environment: Mapping[str, str], realtime: bool, rate: float,
             playback: Any, recorder: ProductRecorder, node: LsmNode, statistics: Mapping[str, Any],
             wall_time_s: float) -> dict[str, Any]:
    infos = [recorder.infos[s] for s in sorted(recorder.infos)]
    latencies = [float(i.total_time_s) for i in infos]
    network = [float(i.inference_time_s) for i in infos]
    reconstructor = node.reconstructor
    return dict(
        bag=str(bag_path), bag_kind=bag_kind, mode='realtime' if realtime else 'one_by_one',
        rate=rate if realtime else None, ros_domain_id=environment['ROS_DOMAIN_ID'],
        pairs_played=playback.pairs, pairs_reconstructed=len(infos),
        messages_played=dict(playback.per_topic), products_received=dict(recorder.counts),
        topics=recorder.topics,
        metric_scale_pairs=sum(bool(i.metric_scale) for i in infos),
        pose_pairs=len(recorder.poses),
        median_latency_s=float(np.median(latencies)) if latencies else None,
        max_latency_s=max(latencies) if latencies else None,
        median_network_time_s=float(np.median(network)) if network else None,
        model_resolution=[int(infos[0].width), int(infos[0].height)] if infos else None,
        weights=reconstructor.weights, trained_weights=bool(reconstructor.trained_weights),
        resolution=reconstructor.config.resolution, device=str(reconstructor.device),
        node_statistics=dict(statistics), recording_errors=recorder.errors,
        files=sorted(set(recorder.files) | {'summary.json', 'README.txt'}), wall_time_s=wall_time_s)


def _readme(summary: Mapping[str, Any]) -> str:
    lines = ['lsm_ros ROS demo', '================', '']
    if not summary['trained_weights']:
        lines += ['WARNING: UNTRAINED WEIGHTS (' + summary['weights'] + '). The point clouds, depths and poses',
                  'below show that the ROS plumbing works; they are NOT a real reconstruction.', '']
    lines += [
        f"Bag: {summary['bag']} ({summary['bag_kind']})",
        f"Played {summary['pairs_played']} stereo pairs ({summary['mode']}) through lsm_node on ROS_DOMAIN_ID="
        f"{summary['ros_domain_id']} (localhost only); {summary['pairs_reconstructed']} were reconstructed.",
        f"Weights: {summary['weights']}; device {summary['device']}; model resolution "
        f"{summary['model_resolution']}.",
        f"Latency (pair received -> products published): median {_seconds(summary['median_latency_s'])}, "
        f"max {_seconds(summary['max_latency_s'])}; network median {_seconds(summary['median_network_time_s'])}.",
        f"Metric scale (from the CameraInfo baseline) on {summary['metric_scale_pairs']} pairs; relative pose "
        f"published for {summary['pose_pairs']}.",
        f"Rejected input: {summary['node_statistics']['rejected'] or 'none'}.",
        '', 'Files:',
        '  points_XXXX.ply       coloured point cloud of both views (x y z, red green blue, confidence), left frame',
        '  left_depth_XXXX.png   false-colour left depth (near red, far blue, invalid black)',
        '  left_depth_XXXX.npy   left depth, float32 (H, W), NaN invalid',
        '  relative_pose.csv     pose of the right camera in the left optical frame, per pair',
        '  info.jsonl            every lsm_ros/ReconstructionInfo message',
        '  summary.json          these numbers, machine-readable']
    if summary['labels']:
        lines += [
            f"Semantic products (label set {summary['labels']}; the ply files also carry a label property, the "
            'label index as uchar):',
            '  labels_XXXX.png       left label image in the colours of labels.json',
            '  overlay_XXXX.png      the label colours over the left model image (~/semantic/overlay)',
            '  labels.json           legend: label index -> phrase -> RGB colour']
    if summary['query']:
        lines += ['  query.json            the ~/query answer after the last pair (phrases, scores, max '
                  'probabilities, success, message)',
                  f'  {QUERY_MASKS_DIR}/{{left,right}}_<phrase>.png  its masks (255 = in the phrase\'s mask)']
    if summary['labels'] and not summary['trained_weights']:
        lines.append('UNTRAINED WEIGHTS: the labels, overlays, point labels and query answers are meaningless '
                     '(random); they only show the plumbing.')
    lines += ['', 'Topics recorded:'] + [f'  {topic}' for topic in summary['topics'].values()]
    return '\n'.join(lines) + '\n'


def _seconds(value: float | None) -> str:
    return 'n/a' if value is None else f'{value:.2f} s'
