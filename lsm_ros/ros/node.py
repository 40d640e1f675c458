"""``lsm_node``: a stereo / camera pair in, DUSt3R geometry out (point cloud, depth, relative pose).

Subscribes (SensorDataQoS, relative names as stereo_image_proc's, so they remap):

- ``left/image_rect``, ``right/image_rect`` (sensor_msgs/Image: rgb8, bgr8, mono8, rgba8, bgra8);
- ``left/camera_info``, ``right/camera_info`` (sensor_msgs/CameraInfo), used when ``use_camera_info``:
  the intrinsics of the *rectified* images are ``P[:3,:3]`` (``K`` when P is all zeros) and the right
  camera's ``P[0,3] = -fx * B`` gives the baseline that makes the products metric.

Publishes (reliable, keep-last 2; stamp = the pair's left stamp; frame = the left camera's optical frame,
``left_frame_id`` or the left image's frame_id, except the right depth and camera info, in the right
camera's frame):

- ``~/points`` sensor_msgs/PointCloud2: both views merged, fields x y z rgb confidence;
- ``~/left/depth``, ``~/right/depth`` sensor_msgs/Image 32FC1 (NaN invalid), model resolution;
- ``~/left/camera_info``, ``~/right/camera_info``: intrinsics of the depth images (model resolution);
- ``~/relative_pose`` geometry_msgs/PoseStamped: the right camera in the left frame (only when PnP succeeded);
- ``~/info`` lsm_ros/ReconstructionInfo: scale, intrinsics source, sizes, timings, active labels (every pair);
- ``/tf`` left -> right TransformStamped, only when ``publish_tf`` (and the pose succeeded).

With the semantic model (``reconstructor.semantic``: LSM + LSeg), every reconstruction is also labelled with the
active label set (parameter ``labels``; value i = labels[i]):

- ``~/semantic/labels`` sensor_msgs/Image mono8: arg-max label of each pixel of the left view (model resolution,
  the geometry of ``~/left/depth``);
- ``~/semantic/overlay`` sensor_msgs/Image rgb8: the label colours over the left model image (RViz);
- ``~/points`` gains a UINT8 field ``label``: the label of each point's Gaussian;

and the service ``~/query`` (lsm_ros/TextQuery) answers text phrases with masks, label images and scores on the
latest reconstruction, in its own callback group: queries run while the worker computes the next pair.

Rendering (semantic model): the service ``~/render`` (lsm_ros/RenderView) renders the latest reconstruction's
Gaussians from any pinhole camera posed in the left optical frame (RGB, depth, alpha, PCA colours of the features,
labels of phrases), in its own callback group too. The parameter ``render_views`` ('left', 'right', 'midway')
publishes those virtual views after every reconstruction, on the worker thread:

- ``~/render/<view>/image`` sensor_msgs/Image rgb8 and ``~/render/<view>/camera_info`` (model size): 'left' in the
  left frame, 'right' (at the estimated relative pose) in the right frame, 'midway' (half the relative pose, mean
  intrinsics) in ``<left frame>_midway``, broadcast on /tf with ``publish_tf``.

Images are paired by :class:`~lsm_ros.ros.sync.StereoSynchronizer`, checked in the subscription callback and
reconstructed on one :class:`~lsm_ros.ros.sync.LatestPairWorker` thread: while a pair is being processed only
the newest waiting pair is kept. A bad pair (sizes, encoding, data, CameraInfo, stale stamp) is logged
(rate-limited), counted and produces no output; the node keeps running.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import rclpy
from geometry_msgs.msg import PoseStamped
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage

from lsm_ros import semantics
from lsm_ros.config import NodeConfig, PipelineConfig
from lsm_ros.msg import ReconstructionInfo
from lsm_ros.pipeline import (DEPTH_MIN_ALPHA, RENDER_CHANNELS, CameraCalibration, GaussianCloud, Reconstruction,
                              Reconstructor, RenderedView)
from lsm_ros.ros import conversions
from lsm_ros.ros.isolation import apply_node_environment_defaults
from lsm_ros.ros.params import LsmParameters
from lsm_ros.ros.sync import (DROP_DUPLICATE, DROP_LATE, CameraInfoCache, LatestPairWorker, RateLimitedLog,
                              Side, StereoPair, StereoSynchronizer)
from lsm_ros.semantics import QueryResult
from lsm_ros.srv import RenderView, TextQuery
from lsm_ros.visualization import FeaturePca

NODE_NAME = 'lsm_node'
# Input topics (relative: remap them, e.g. left/image_rect:=/stereo/left/image_rect).
LEFT_IMAGE_TOPIC = 'left/image_rect'
RIGHT_IMAGE_TOPIC = 'right/image_rect'
LEFT_INFO_TOPIC = 'left/camera_info'
RIGHT_INFO_TOPIC = 'right/camera_info'
INPUT_TOPICS = (LEFT_IMAGE_TOPIC, RIGHT_IMAGE_TOPIC, LEFT_INFO_TOPIC, RIGHT_INFO_TOPIC)
# Output topics (private: /<namespace>/lsm_node/...).
POINTS_TOPIC = '~/points'
LEFT_DEPTH_TOPIC = '~/left/depth'
RIGHT_DEPTH_TOPIC = '~/right/depth'
LEFT_MODEL_INFO_TOPIC = '~/left/camera_info'
RIGHT_MODEL_INFO_TOPIC = '~/right/camera_info'
RELATIVE_POSE_TOPIC = '~/relative_pose'
INFO_TOPIC = '~/info'
TF_TOPIC = '/tf'
OUTPUT_TOPICS = (POINTS_TOPIC, LEFT_DEPTH_TOPIC, RIGHT_DEPTH_TOPIC, LEFT_MODEL_INFO_TOPIC, RIGHT_MODEL_INFO_TOPIC,
                 RELATIVE_POSE_TOPIC, INFO_TOPIC)
# Timed stages of the network forward (reported as ReconstructionInfo.inference_time_s).
NETWORK_STAGES = ('network', 'semantics', 'gaussians')
# Outputs of the semantic model only.
SEMANTIC_LABELS_TOPIC = '~/semantic/labels'
SEMANTIC_OVERLAY_TOPIC = '~/semantic/overlay'
SEMANTIC_TOPICS = (SEMANTIC_LABELS_TOPIC, SEMANTIC_OVERLAY_TOPIC)
QUERY_SERVICE = '~/query'
RENDER_SERVICE = '~/render'
RENDER_REQUEST_CHANNELS = ('rgb', 'depth', 'alpha', 'features', 'labels')   # channels of a ~/render request
DEFAULT_RENDER_CHANNELS = ('rgb', 'depth')
MAX_RENDER_SIDE = 2048           # pixels per side of a ~/render image
MAX_FEATURE_RENDER_PIXELS = 1024 * 1024  # pixels of a ~/render with features or labels (~3 GB of CPU memory)
MIDWAY_FRAME_SUFFIX = '_midway'  # frame of the 'midway' render view: <left frame>_midway
# Frames used when neither the parameter nor the image header names one.
DEFAULT_LEFT_FRAME = 'lsm_left_camera_optical_frame'
DEFAULT_RIGHT_FRAME = 'lsm_right_camera_optical_frame'

PRODUCT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=2, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
TF_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE,
                    durability=DurabilityPolicy.VOLATILE)  # as tf2_ros.TransformBroadcaster

# Reasons for which a pair gives no output (counted in LsmNode.statistics()['rejected']).
REJECT_ENCODING = 'unsupported_encoding'
REJECT_IMAGE_DATA = 'bad_image_data'
REJECT_SIZE_MISMATCH = 'size_mismatch'
REJECT_NO_CAMERA_INFO = 'missing_camera_info'
REJECT_BAD_CAMERA_INFO = 'bad_camera_info'
REJECT_STALE = 'stale_stamp'
REJECT_TOO_OLD = 'too_old'
REJECT_RECONSTRUCTION = 'reconstruction_failed'

CHECKPOINT_HELP = (
    'lsm_node needs the official DUSt3R weights: pass the file with -p dust3r_checkpoint:=/path/to/'
    'DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth (or lsm_checkpoint:=/path/to/checkpoint-final.pth, whose config '
    'names the DUSt3R file), e.g. `ros2 run lsm_ros lsm_node --ros-args -p dust3r_checkpoint:=...`, '
    '`ros2 launch lsm_ros lsm.launch.py dust3r_checkpoint:=...` or in config/lsm.yaml.')


class QueryRefused(ValueError):
    """A ~/query request that cannot be answered; the message says why."""


class RenderRefused(ValueError):
    """A ~/render request that cannot be answered; the message says why."""


def render_view_topics(view: str) -> tuple[str, str]:
    """(image, camera_info) topics of a ``render_views`` view."""
    return f'~/render/{view}/image', f'~/render/{view}/camera_info'


def midway_pose(T_left_right: np.ndarray) -> np.ndarray:
    """(4,4) pose halfway between the left camera (identity) and ``T_left_right``: half the translation and half
    the rotation angle about the same axis, in the left frame."""
    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec(0.5 * Rotation.from_matrix(T_left_right[:3, :3]).as_rotvec()).as_matrix()
    T[:3, 3] = 0.5 * T_left_right[:3, 3]
    return T


def is_pinhole_matrix(K: np.ndarray) -> bool:
    """True for a finite [fx, 0, cx; 0, fy, cy; 0, 0, 1] with fx, fy > 0."""
    return bool(np.isfinite(K).all() and K[0, 0] > 0 and K[1, 1] > 0 and K[0, 1] == 0 and K[1, 0] == 0
                and np.array_equal(K[2], (0.0, 0.0, 1.0)))


class InputRejected(ValueError):
    """A pair that cannot be reconstructed; ``reason`` is one of the REJECT_* keys."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class ReceivedImage:
    """An image message and when it arrived (monotonic seconds)."""

    msg: Image
    received_s: float


@dataclass
class PreparedPair:
    """A checked pair, ready for the network: RGB arrays, calibration and the frames of its products."""

    stamp_ns: int
    left_rgb: np.ndarray          # (H, W, 3) uint8
    right_rgb: np.ndarray         # (H, W, 3) uint8
    calibration: CameraCalibration | None
    left_frame: str
    right_frame: str
    received_s: float             # monotonic time the later image of the pair arrived


@dataclass(frozen=True)
class LatestReconstruction:
    """The newest published reconstruction, kept for ~/query: the result, its stamp and frames, and the answer
    of the active label set (both views; None for the geometry-only model or when labelling failed)."""

    result: Reconstruction
    stamp_ns: int
    left_frame: str
    right_frame: str
    labelled: QueryResult | None

    def frame_of(self, view: int) -> str:
        """Optical frame of view ``view`` (0 left, 1 right)."""
        return self.left_frame if view == 0 else self.right_frame


@dataclass(frozen=True)
class VirtualCamera:
    """A camera to render: its pose in the left optical frame (camera-to-left), intrinsics and size in pixels."""

    T_left_camera: np.ndarray
    K: np.ndarray
    width: int
    height: int


class LsmNode(Node):
    """The ROS 2 node around :class:`~lsm_ros.pipeline.Reconstructor` (see the module docstring).

    ``reconstructor``: an already built one (its config gives the defaults of the pipeline parameters;
    read-only ones cannot change it); None: built from the checkpoint parameters. ``node_kwargs`` go to
    ``rclpy.node.Node`` (context, namespace, parameter_overrides, cli_args, ...).
    """

    def __init__(self, reconstructor: Reconstructor | None = None, **node_kwargs: Any) -> None:
        super().__init__(NODE_NAME, **node_kwargs)
        try:
            self._set_up(reconstructor)
        except BaseException:
            self.destroy_node()
            raise

    def _set_up(self, reconstructor: Reconstructor | None) -> None:
        self._lock = threading.Lock()
        self._rejected: collections.Counter[str] = collections.Counter()
        self._counts: collections.Counter[str] = collections.Counter()
        self._latencies_s: collections.deque[float] = collections.deque(maxlen=100)
        self._last_accepted_stamp_ns: int | None = None
        self._once: set[str] = set()
        self._lsm_params = LsmParameters(self, pipeline_defaults=reconstructor.config if reconstructor else None,
                                         on_change=self._on_config_change)
        if reconstructor is None:
            reconstructor = self._build_reconstructor(self._lsm_params.pipeline)
        else:
            self._warn_ignored_read_only(reconstructor, self._lsm_params.pipeline)
        self._reconstructor = reconstructor
        self._reconstructor.config = self._pipeline_config_for(self._reconstructor, self._lsm_params.pipeline)
        node_config = self._lsm_params.node_config
        self._warnings = RateLimitedLog(self.get_logger(), node_config.log_throttle_s)
        self._synchronizer = self._make_synchronizer(node_config)
        self._camera_infos: CameraInfoCache[CameraInfo] = CameraInfoCache()

        self._publishers_by_topic = {
            POINTS_TOPIC: self.create_publisher(PointCloud2, POINTS_TOPIC, PRODUCT_QOS),
            LEFT_DEPTH_TOPIC: self.create_publisher(Image, LEFT_DEPTH_TOPIC, PRODUCT_QOS),
            RIGHT_DEPTH_TOPIC: self.create_publisher(Image, RIGHT_DEPTH_TOPIC, PRODUCT_QOS),
            LEFT_MODEL_INFO_TOPIC: self.create_publisher(CameraInfo, LEFT_MODEL_INFO_TOPIC, PRODUCT_QOS),
            RIGHT_MODEL_INFO_TOPIC: self.create_publisher(CameraInfo, RIGHT_MODEL_INFO_TOPIC, PRODUCT_QOS),
            RELATIVE_POSE_TOPIC: self.create_publisher(PoseStamped, RELATIVE_POSE_TOPIC, PRODUCT_QOS),
            INFO_TOPIC: self.create_publisher(ReconstructionInfo, INFO_TOPIC, PRODUCT_QOS),
        }
        self._tf_publisher = None  # created when publish_tf is first true
        self._latest: LatestReconstruction | None = None
        self._feature_pca_cache: tuple[GaussianCloud, FeaturePca] | None = None
        if self._reconstructor.semantic:
            self._publishers_by_topic[SEMANTIC_LABELS_TOPIC] = self.create_publisher(Image, SEMANTIC_LABELS_TOPIC,
                                                                                     PRODUCT_QOS)
            self._publishers_by_topic[SEMANTIC_OVERLAY_TOPIC] = self.create_publisher(Image, SEMANTIC_OVERLAY_TOPIC,
                                                                                      PRODUCT_QOS)
            self._create_render_view_publishers(node_config.render_views)
        # Own groups: a query or a render never waits for image callbacks (nor they for it); inference runs on the
        # worker.
        self.create_service(TextQuery, QUERY_SERVICE, self._on_query, callback_group=MutuallyExclusiveCallbackGroup())
        self.create_service(RenderView, RENDER_SERVICE, self._on_render,
                            callback_group=MutuallyExclusiveCallbackGroup())
        self._worker: LatestPairWorker[PreparedPair] = LatestPairWorker(
            self._process_pair, logger=self.get_logger(), name='lsm_inference',
            log_interval_s=node_config.log_throttle_s).start()

        self.create_subscription(Image, LEFT_IMAGE_TOPIC, self._image_callback('left'), qos_profile_sensor_data)
        self.create_subscription(Image, RIGHT_IMAGE_TOPIC, self._image_callback('right'), qos_profile_sensor_data)
        self.create_subscription(CameraInfo, LEFT_INFO_TOPIC, self._camera_info_callback('left'),
                                 qos_profile_sensor_data)
        self.create_subscription(CameraInfo, RIGHT_INFO_TOPIC, self._camera_info_callback('right'),
                                 qos_profile_sensor_data)
        self._announce()

    # ------------------------------------------------------------------------------------------ set-up
    def _build_reconstructor(self, pipeline: PipelineConfig) -> Reconstructor:
        if not (pipeline.dust3r_checkpoint or pipeline.lsm_checkpoint):
            raise ValueError('no checkpoint configured. ' + CHECKPOINT_HELP)
        return Reconstructor.from_checkpoints(config=pipeline)

    def _pipeline_config_for(self, reconstructor: Reconstructor, parameters: PipelineConfig) -> PipelineConfig:
        """The reconstructor's config with the runtime-settable pipeline parameters applied."""
        settable = {spec.name: getattr(parameters, spec.name) for spec in self._lsm_params.specs.values()
                    if not spec.read_only and hasattr(parameters, spec.name)}
        return dataclasses.replace(reconstructor.config, **settable)

    def _warn_ignored_read_only(self, reconstructor: Reconstructor, parameters: PipelineConfig) -> None:
        """An injected reconstructor fixes the read-only pipeline parameters: say which overrides are ignored."""
        for spec in self._lsm_params.specs.values():
            if spec.read_only and hasattr(parameters, spec.name):
                wanted, used = getattr(parameters, spec.name), getattr(reconstructor.config, spec.name)
                if wanted != used:
                    self.get_logger().warning(f'parameter {spec.name}={wanted!r} ignored: the injected '
                                              f'reconstructor was built with {used!r}')

    @staticmethod
    def _sync_settings(config: NodeConfig) -> dict[str, Any]:
        return dict(approximate=config.approximate_sync, tolerance_ns=round(config.sync_tolerance_s * 1e9),
                    queue_size=config.sync_queue_size)

    def _make_synchronizer(self, config: NodeConfig) -> StereoSynchronizer[ReceivedImage]:
        self._synchronizer_settings = self._sync_settings(config)
        return StereoSynchronizer(**self._synchronizer_settings)

    def _announce(self) -> None:
        rec, cfg, logger = self._reconstructor, self._lsm_params.node_config, self.get_logger()
        logger.info(f'lsm_node ready: weights {rec.weights}, device {rec.device}, resolution '
                    f'{rec.config.resolution}, {"approximate" if cfg.approximate_sync else "exact"} stereo sync, '
                    f'camera info {"used" if cfg.use_camera_info else "ignored (intrinsics estimated)"}; '
                    f'waiting for {self.resolve_topic_name(LEFT_IMAGE_TOPIC)} and '
                    f'{self.resolve_topic_name(RIGHT_IMAGE_TOPIC)}')
        if rec.semantic:
            logger.info(f'semantic model: labels {list(cfg.labels)} on {self.resolve_topic_name(SEMANTIC_LABELS_TOPIC)}'
                        f'; text queries on {self.resolve_service_name(QUERY_SERVICE)}; rendering on '
                        f'{self.resolve_service_name(RENDER_SERVICE)}'
                        + (f'; render views {list(cfg.render_views)}' if cfg.render_views else ''))
        elif cfg.render_views:
            logger.warning(f'render_views {list(cfg.render_views)} ignored: the geometry-only model has no Gaussians')
        if not rec.trained_weights:
            banner = '!' * 100
            logger.error(f'\n{banner}\n  UNTRAINED WEIGHTS ({rec.weights}): every product of this node is '
                         f'meaningless.\n  {CHECKPOINT_HELP}\n{banner}')

    def _on_config_change(self, pipeline: PipelineConfig, node_config: NodeConfig) -> None:
        self._reconstructor.config = self._pipeline_config_for(self._reconstructor, pipeline)
        if self._reconstructor.semantic:
            self._create_render_view_publishers(node_config.render_views)
        self._warnings.interval_s = node_config.log_throttle_s
        if self._sync_settings(node_config) != self._synchronizer_settings:
            self._synchronizer = self._make_synchronizer(node_config)  # queued images are forgotten

    def output_topic_names(self) -> dict[str, str]:
        """Fully resolved names of the products: {'~/points': '/<ns>/lsm_node/points', ...}; the semantic ones
        only with the semantic model."""
        topics = OUTPUT_TOPICS + (SEMANTIC_TOPICS if self._reconstructor.semantic else ())
        return {topic: self.resolve_topic_name(topic) for topic in topics}

    def query_service_name(self) -> str:
        """Fully resolved name of the ~/query service."""
        return self.resolve_service_name(QUERY_SERVICE)

    def render_service_name(self) -> str:
        """Fully resolved name of the ~/render service."""
        return self.resolve_service_name(RENDER_SERVICE)

    def render_view_topic_names(self, view: str) -> tuple[str, str]:
        """Fully resolved (image, camera_info) topics of a ``render_views`` view."""
        image_topic, info_topic = render_view_topics(view)
        return self.resolve_topic_name(image_topic), self.resolve_topic_name(info_topic)

    def _create_render_view_publishers(self, views: tuple[str, ...]) -> None:
        """Publishers of the render views not published yet (they stay when a view is removed)."""
        for view in views:
            image_topic, info_topic = render_view_topics(view)
            if image_topic not in self._publishers_by_topic:
                self._publishers_by_topic[info_topic] = self.create_publisher(CameraInfo, info_topic, PRODUCT_QOS)
                self._publishers_by_topic[image_topic] = self.create_publisher(Image, image_topic, PRODUCT_QOS)

    @property
    def reconstructor(self) -> Reconstructor:
        return self._reconstructor

    @property
    def node_config(self) -> NodeConfig:
        return self._lsm_params.node_config

    # ------------------------------------------------------------------------------------------ input
    def _image_callback(self, side: Side) -> Callable[[Image], None]:
        def on_image(msg: Image) -> None:
            self._count(f'{side}_images')
            stamp_ns = conversions.stamp_to_nanoseconds(msg.header.stamp)
            synchronizer = self._synchronizer
            result = synchronizer.add(side, stamp_ns, ReceivedImage(msg, time.monotonic()))
            if result.rejected == DROP_LATE:
                self._reject(REJECT_STALE, f'{side} image stamp {stamp_ns * 1e-9:.6f} s is not newer than the last '
                             'paired stamp: dropped (a restarted source or bag needs a restart of lsm_node)')
            elif result.rejected == DROP_DUPLICATE:
                self._warnings.warning(f'duplicate_{side}', f'{side} image with an already queued stamp '
                                       f'{stamp_ns * 1e-9:.6f} s: dropped')
            if result.pair is not None:
                self._on_pair(result.pair)
        return on_image

    def _camera_info_callback(self, side: Side) -> Callable[[CameraInfo], None]:
        def on_camera_info(msg: CameraInfo) -> None:
            self._count(f'{side}_camera_infos')
            self._camera_infos.update(side, conversions.stamp_to_nanoseconds(msg.header.stamp), msg)
        return on_camera_info

    def _on_pair(self, pair: StereoPair[ReceivedImage]) -> None:
        self._count('pairs')
        try:
            prepared = self._prepare_pair(pair)
        except InputRejected as exc:
            self._reject(exc.reason, str(exc))
            return
        with self._lock:
            self._last_accepted_stamp_ns = prepared.stamp_ns
        self._worker.submit(prepared)  # replaces a still pending pair (counted in statistics()['worker'])

    def _prepare_pair(self, pair: StereoPair[ReceivedImage]) -> PreparedPair:
        """Check a synchronised pair and convert it for the network; raises :class:`InputRejected`."""
        cfg = self._lsm_params.node_config
        stamp_ns = pair.stamp_ns
        stamp_text = f'{stamp_ns * 1e-9:.6f} s'
        with self._lock:
            last = self._last_accepted_stamp_ns
        if last is not None and stamp_ns <= last:
            raise InputRejected(REJECT_STALE, f'pair at {stamp_text} is not newer than the last processed pair '
                                f'({last * 1e-9:.6f} s): dropped')
        if cfg.max_input_age_s > 0:
            age_s = (self.get_clock().now().nanoseconds - stamp_ns) * 1e-9
            if age_s > cfg.max_input_age_s:
                raise InputRejected(REJECT_TOO_OLD, f'pair at {stamp_text} is {age_s:.3f} s old, more than '
                                    f'max_input_age_s = {cfg.max_input_age_s} s: dropped')
        left_msg, right_msg = pair.left.msg, pair.right.msg
        arrays = {}
        for side, msg in (('left', left_msg), ('right', right_msg)):
            if msg.encoding not in conversions.SUPPORTED_IMAGE_ENCODINGS:
                raise InputRejected(REJECT_ENCODING, f'{side} image at {stamp_text} has encoding {msg.encoding!r}; '
                                    f'lsm_node takes {", ".join(conversions.SUPPORTED_IMAGE_ENCODINGS)}: dropped')
            try:
                arrays[side] = conversions.image_to_numpy(msg)
            except conversions.ImageConversionError as exc:
                raise InputRejected(REJECT_IMAGE_DATA, f'{side} image at {stamp_text}: {exc}: dropped') from exc
        if arrays['left'].shape != arrays['right'].shape:
            raise InputRejected(REJECT_SIZE_MISMATCH, f'pair at {stamp_text}: left image is '
                                f'{left_msg.width}x{left_msg.height}, right image {right_msg.width}x'
                                f'{right_msg.height}; both must have the same size: dropped')
        calibration = self._calibration(stamp_ns, stamp_text, left_msg) if cfg.use_camera_info else None
        left_frame = cfg.left_frame_id or left_msg.header.frame_id or self._default_frame('left', DEFAULT_LEFT_FRAME)
        right_frame = cfg.right_frame_id or right_msg.header.frame_id or \
            self._default_frame('right', DEFAULT_RIGHT_FRAME)
        return PreparedPair(stamp_ns=stamp_ns, left_rgb=arrays['left'], right_rgb=arrays['right'],
                            calibration=calibration, left_frame=left_frame, right_frame=right_frame,
                            received_s=max(pair.left.received_s, pair.right.received_s))

    def _calibration(self, stamp_ns: int, stamp_text: str, left_msg: Image) -> CameraCalibration:
        cfg = self._lsm_params.node_config
        tolerance_ns = round(cfg.camera_info_tolerance_s * 1e9)
        infos = {}
        for side, topic in (('left', LEFT_INFO_TOPIC), ('right', RIGHT_INFO_TOPIC)):
            info = self._camera_infos.lookup(side, stamp_ns, tolerance_ns)
            if info is None:
                raise InputRejected(REJECT_NO_CAMERA_INFO, (
                    f'no CameraInfo on {self.resolve_topic_name(topic)} within camera_info_tolerance_s = '
                    f'{cfg.camera_info_tolerance_s} s of the pair at {stamp_text}: dropped. Publish it, or set '
                    'use_camera_info:=false to estimate the intrinsics from the images (no metric scale).'))
            infos[side] = info
        try:
            for side, info in infos.items():
                _, _, width, height = conversions.camera_info_to_matrices(info)
                if (width, height) != (left_msg.width, left_msg.height):
                    raise conversions.CameraInfoError(
                        f'{side} CameraInfo is for {width}x{height} images, the images are '
                        f'{left_msg.width}x{left_msg.height}')
            K_left = conversions.rectified_intrinsics(infos['left'])
            K_right = conversions.rectified_intrinsics(infos['right'])
            calibration = CameraCalibration(K_left=K_left, K_right=K_right,
                                            baseline_m=conversions.stereo_baseline_from_camera_info(infos['right']),
                                            source='camera_info')
        except ValueError as exc:  # CameraInfoError, or CameraCalibration's own checks
            raise InputRejected(REJECT_BAD_CAMERA_INFO, f'pair at {stamp_text}: unusable CameraInfo: {exc}. Fix the '
                                'calibration or set use_camera_info:=false: dropped') from exc
        if calibration.baseline_m is None:
            self._info_once('no_baseline', 'the right CameraInfo has no stereo baseline (P[0,3] = -fx*B is 0): '
                            'products are in model units, not metres')
        return calibration

    def _default_frame(self, side: str, frame: str) -> str:
        self._info_once(f'frame_{side}', f'{side} image has no frame_id and {side}_frame_id is empty: using {frame!r}')
        return frame

    # ------------------------------------------------------------------------------------------ output
    def _process_pair(self, pair: PreparedPair) -> None:
        """Worker thread: reconstruct one pair and publish its products."""
        try:
            result = self._reconstructor.reconstruct(pair.left_rgb, pair.right_rgb, pair.calibration)
        except Exception as exc:  # noqa: BLE001 - one failed pair must not stop the node
            self._reject(REJECT_RECONSTRUCTION, f'reconstruction of the pair at {pair.stamp_ns * 1e-9:.6f} s '
                         f'failed: {type(exc).__name__}: {exc}')
            return
        self._publish_reconstruction(pair, result)

    def _publish_reconstruction(self, pair: PreparedPair, result: Reconstruction) -> None:
        """Publish every product of ``result`` stamped with the pair's stamp."""
        cfg = self._lsm_params.node_config
        stamp = conversions.nanoseconds_to_stamp(pair.stamp_ns)

        def left_header() -> Header:
            return conversions.make_header(stamp, pair.left_frame)

        def right_header() -> Header:
            return conversions.make_header(stamp, pair.right_frame)

        labelled = self._label(pair, result, cfg.labels) if self._reconstructor.semantic else None
        with self._lock:
            self._latest = LatestReconstruction(result=result, stamp_ns=pair.stamp_ns, left_frame=pair.left_frame,
                                                right_frame=pair.right_frame, labelled=labelled)
        width, height = result.size
        points = result.points(stride=cfg.point_stride)
        point_labels = None
        if labelled is not None and labelled.point_labels is not None:
            point_labels = labelled.point_labels[points['index']]
        self._publish(POINTS_TOPIC, lambda: conversions.pointcloud2_from_points(
            points['xyz'], points['rgb'], points['confidence'], left_header(), labels=point_labels))
        if labelled is not None:
            left_labels = labelled.label_images()[labelled.view_position(0)]
            palette = semantics.label_palette(len(labelled.phrases))
            self._publish(SEMANTIC_LABELS_TOPIC, lambda: conversions.mono_to_image_msg(left_labels, left_header()))
            self._publish(SEMANTIC_OVERLAY_TOPIC, lambda: conversions.rgb_to_image_msg(
                semantics.overlay(result.image_1, left_labels, cfg.overlay_alpha, palette), left_header()))
        self._publish(LEFT_DEPTH_TOPIC, lambda: conversions.depth_to_image_msg(result.depth_1, left_header()))
        self._publish(RIGHT_DEPTH_TOPIC, lambda: conversions.depth_to_image_msg(result.depth_2, right_header()))
        self._publish(LEFT_MODEL_INFO_TOPIC, lambda: conversions.model_camera_info(result.K_1, width, height,
                                                                                    left_header()))
        self._publish(RIGHT_MODEL_INFO_TOPIC, lambda: conversions.model_camera_info(result.K_2, width, height,
                                                                                     right_header()))
        if result.pose.success:
            self._publish(RELATIVE_POSE_TOPIC, lambda: conversions.pose_stamped_from_matrix(result.T_1_2,
                                                                                           left_header()))
            if cfg.publish_tf:
                transforms = [(result.T_1_2, pair.right_frame)]
                if 'midway' in cfg.render_views and self._reconstructor.semantic:
                    transforms.append((midway_pose(result.T_1_2), pair.left_frame + MIDWAY_FRAME_SUFFIX))
                self._publish_tf(transforms, left_header())
        else:
            self._count('pose_failures')
            self._warnings.warning('pose_failed', f'relative pose of the pair at {pair.stamp_ns * 1e-9:.6f} s '
                                   f'failed ({result.pose.message}): ~/relative_pose and /tf not published')
        baseline = pair.calibration.baseline_m if pair.calibration and pair.calibration.baseline_m else 0.0
        info = ReconstructionInfo(
            header=left_header(), metric_scale=bool(result.metric_scale), scale_source=result.scale_source,
            scale_factor=float(result.scale_factor), baseline_m=float(baseline),
            intrinsics_source=result.intrinsics_source, width=int(width), height=int(height),
            k_left=np.asarray(result.K_1, dtype=np.float64).ravel().tolist(),
            k_right=np.asarray(result.K_2, dtype=np.float64).ravel().tolist(),
            num_points=int(points['xyz'].shape[0]), pose_valid=bool(result.pose.success),
            pose_inliers=int(result.pose.num_inliers),
            inference_time_s=float(sum(result.timings_s.get(stage, 0.0) for stage in NETWORK_STAGES)),
            labels=list(labelled.phrases) if labelled is not None else [])
        latency_s = time.monotonic() - pair.received_s
        info.total_time_s = float(latency_s)
        self._publish(INFO_TOPIC, lambda: info)
        with self._lock:
            self._counts['processed'] += 1
            self._latencies_s.append(latency_s)
        if cfg.render_views and result.gaussians is not None:
            self._publish_render_views(pair, result, cfg.render_views)

    def _publish_render_views(self, pair: PreparedPair, result: Reconstruction, views: tuple[str, ...]) -> None:
        """Render and publish the ``render_views`` of a reconstruction (rgb8 image and camera info per view)."""
        stamp = conversions.nanoseconds_to_stamp(pair.stamp_ns)
        for view in views:
            image_topic, info_topic = render_view_topics(view)
            if image_topic not in self._publishers_by_topic:
                continue  # named by a parameter change whose publishers are being created
            if view != 'left' and not result.pose.success:
                self._warnings.warning(f'render_{view}_no_pose', f'no relative pose for the pair at '
                                       f'{pair.stamp_ns * 1e-9:.6f} s: render view {view!r} not published')
                continue
            camera, frame = self._render_view_camera(view, pair, result)
            try:
                rendered = self._reconstructor.render(result, camera.T_left_camera, camera.K,
                                                      (camera.width, camera.height), channels=('rgb',))
            except Exception as exc:  # noqa: BLE001 - a failed render must not stop the node
                self._count('render_view_failures')
                self._warnings.warning(f'render_{view}_failed', f'rendering view {view!r} of the pair at '
                                       f'{pair.stamp_ns * 1e-9:.6f} s failed: {type(exc).__name__}: {exc}')
                continue
            header = conversions.make_header(stamp, frame)
            self._publish(image_topic, functools.partial(conversions.unit_rgb_to_image_msg, rendered.rgb, header))
            self._publish(info_topic, functools.partial(conversions.model_camera_info, rendered.K, rendered.width,
                                                        rendered.height, header))

    @staticmethod
    def _render_view_camera(view: str, pair: PreparedPair, result: Reconstruction) -> tuple[VirtualCamera, str]:
        """The camera of a ``render_views`` view at the model size, and the frame of its images."""
        width, height = result.size
        if view == 'left':
            return VirtualCamera(np.eye(4), result.K_1, width, height), pair.left_frame
        if view == 'right':
            return VirtualCamera(result.T_1_2, result.K_2, width, height), pair.right_frame
        return (VirtualCamera(midway_pose(result.T_1_2), 0.5 * (result.K_1 + result.K_2), width, height),
                pair.left_frame + MIDWAY_FRAME_SUFFIX)

    def _label(self, pair: PreparedPair, result: Reconstruction, labels: tuple[str, ...]) -> QueryResult | None:
        """The active label set's answer on both views; None (warned) when the query fails."""
        try:
            return self._reconstructor.query(result, labels, views=(0, 1))
        except Exception as exc:  # noqa: BLE001 - the geometry products are still published
            self._count('labelling_failures')
            self._warnings.warning('labelling_failed', f'labelling the pair at {pair.stamp_ns * 1e-9:.6f} s with '
                                   f'{list(labels)} failed ({type(exc).__name__}: {exc}): semantic products and '
                                   'the label field not published')
            return None

    # ------------------------------------------------------------------------------------------ queries
    def _on_query(self, request: TextQuery.Request, response: TextQuery.Response) -> TextQuery.Response:
        """~/query: answer phrases on the latest reconstruction; refusals set success=false and say why."""
        self._count('queries')
        started = time.perf_counter()
        try:
            latest, answer, threshold = self._answer_query(request)
            self._fill_query_response(response, latest, answer, threshold, request.label_images)
        except QueryRefused as exc:
            self._count('queries_refused')
            self._warnings.warning('query_refused', f'~/query refused: {exc}')
            return TextQuery.Response(success=False, message=str(exc))
        except Exception as exc:  # noqa: BLE001 - a failed query must not stop the executor
            self._count('queries_failed')
            self.get_logger().error(f'~/query failed: {type(exc).__name__}: {exc}')
            return TextQuery.Response(success=False, message=f'query failed: {type(exc).__name__}: {exc}')
        response.message = (f'{len(answer.phrases)} phrase(s) on the {" and ".join(response.views)} view(s) of the '
                            f'reconstruction at {latest.stamp_ns * 1e-9:.6f} s, threshold {threshold:g}, in '
                            f'{time.perf_counter() - started:.2f} s')
        return response

    @staticmethod
    def _fill_query_response(response: TextQuery.Response, latest: LatestReconstruction, answer: QueryResult,
                             threshold: float, with_label_images: bool) -> None:
        """Masks (view-major), optional label images, per-phrase scores, stamp and frames of an answer."""
        stamp = conversions.nanoseconds_to_stamp(latest.stamp_ns)

        def header(view: int) -> Header:
            return conversions.make_header(stamp, latest.frame_of(view))

        masks = answer.masks(threshold)
        response.phrases = list(answer.phrases)
        response.views = [semantics.VIEW_NAMES[v] for v in answer.views]
        response.masks = [conversions.mask_to_image_msg(masks[position, p], header(view))
                          for position, view in enumerate(answer.views) for p in range(len(answer.phrases))]
        if with_label_images:
            label_images = answer.label_images(threshold)
            response.label_images = [conversions.mono_to_image_msg(label_images[position], header(view))
                                     for position, view in enumerate(answer.views)]
        response.scores = answer.scores(threshold).tolist()
        response.max_probabilities = answer.max_probabilities().tolist()
        response.max_similarities = answer.max_similarities().tolist()
        response.stamp = stamp
        response.left_frame_id, response.right_frame_id = latest.left_frame, latest.right_frame
        response.success = True

    def _answer_query(self, request: TextQuery.Request) -> tuple[LatestReconstruction, QueryResult, float]:
        """Check a request and compute its answer; raises :class:`QueryRefused` with the reason."""
        if not self._reconstructor.semantic:
            raise QueryRefused(f'lsm_node runs a geometry-only model ({self._reconstructor.weights}): text queries '
                               'need the full LSM (set lsm_checkpoint, with dust3r_checkpoint and lseg_checkpoint '
                               'unless the LSM file names them)')
        threshold = float(request.threshold)
        if not 0.0 <= threshold <= 1.0:   # false for NaN too
            raise QueryRefused(f'threshold must be a probability in [0, 1] (0: plain arg-max), got {threshold!r}')
        try:
            views = semantics.parse_views(request.views)
            phrases = semantics.validate_phrases(list(request.phrases)) if request.phrases \
                else self._lsm_params.node_config.labels
        except ValueError as exc:
            raise QueryRefused(str(exc)) from exc
        with self._lock:
            latest = self._latest
        if latest is None:
            raise QueryRefused('no reconstruction yet: the first stereo pair is still awaited or being processed')
        if latest.labelled is not None and latest.labelled.phrases == phrases:
            return latest, latest.labelled.select_views(views), threshold
        try:
            return latest, self._reconstructor.query(latest.result, phrases, views=views), threshold
        except (ValueError, RuntimeError) as exc:
            raise QueryRefused(f'{type(exc).__name__}: {exc}') from exc

    def _publish_tf(self, transforms: list[tuple[np.ndarray, str]], header: Header) -> None:
        """Broadcast ``(T_left_child, child frame)`` transforms from the left frame (the right camera first)."""
        right_frame = transforms[0][1]
        if right_frame == header.frame_id:
            self._warnings.warning('tf_same_frame', f'left and right frames are both {right_frame!r}: set '
                                   'left_frame_id/right_frame_id to publish /tf')
            return
        if self._tf_publisher is None:
            self._tf_publisher = self.create_publisher(TFMessage, TF_TOPIC, TF_QOS)
        message = TFMessage(transforms=[conversions.transform_stamped_from_matrix(T, header, child)
                                        for T, child in transforms])
        try:
            self._tf_publisher.publish(message)
        except Exception as exc:  # noqa: BLE001 - rclpy raises RCLError (and others on shutdown)
            self._publish_failed(TF_TOPIC, exc)

    # ------------------------------------------------------------------------------------------ rendering
    def _on_render(self, request: RenderView.Request, response: RenderView.Response) -> RenderView.Response:
        """~/render: render the latest reconstruction from the requested camera; refusals set success=false."""
        self._count('renders')
        started = time.perf_counter()
        try:
            latest, camera, channels, phrases = self._parse_render_request(request)
            try:
                rendered = self._reconstructor.render(
                    latest.result, camera.T_left_camera, camera.K, (camera.width, camera.height),
                    channels=[c for c in channels if c in RENDER_CHANNELS], phrases=phrases or None)
            except (ValueError, RuntimeError) as exc:
                raise RenderRefused(f'{type(exc).__name__}: {exc}') from exc
            self._fill_render_response(response, latest, rendered, channels)
        except RenderRefused as exc:
            self._count('renders_refused')
            self._warnings.warning('render_refused', f'~/render refused: {exc}')
            return RenderView.Response(success=False, message=str(exc))
        except Exception as exc:  # noqa: BLE001 - a failed render must not stop the executor
            self._count('renders_failed')
            self.get_logger().error(f'~/render failed: {type(exc).__name__}: {exc}')
            return RenderView.Response(success=False, message=f'render failed: {type(exc).__name__}: {exc}')
        response.message = (f'{", ".join(channels)} at {camera.width}x{camera.height} of the reconstruction at '
                            f'{latest.stamp_ns * 1e-9:.6f} s in {time.perf_counter() - started:.2f} s')
        return response

    def _parse_render_request(self, request: RenderView.Request) -> tuple[
            LatestReconstruction, VirtualCamera, tuple[str, ...], tuple[str, ...]]:
        """Check a request: (latest reconstruction, camera, channels, phrases); raises :class:`RenderRefused`."""
        if not self._reconstructor.semantic:
            raise RenderRefused(f'lsm_node runs a geometry-only model ({self._reconstructor.weights}): rendering '
                                'needs the semantic Gaussians of the full LSM (set lsm_checkpoint, with '
                                'dust3r_checkpoint and lseg_checkpoint unless the LSM file names them)')
        try:
            T_left_camera = conversions.checked_pose_msg_to_matrix(request.pose)
        except ValueError as exc:
            raise RenderRefused(f'pose: {exc}') from exc
        width, height = int(request.width), int(request.height)
        if (width == 0) != (height == 0):
            raise RenderRefused(f'width and height must both be 0 (the model size) or both be set, got '
                                f'{width}x{height}')
        if max(width, height) > MAX_RENDER_SIDE:
            raise RenderRefused(f'size {width}x{height} exceeds {MAX_RENDER_SIDE} pixels per side')
        K = np.asarray(request.k, dtype=np.float64).reshape(3, 3)
        if np.any(K) and not is_pinhole_matrix(K):
            raise RenderRefused(f'k must be [fx, 0, cx, 0, fy, cy, 0, 0, 1] with finite values and fx, fy > 0 (all '
                                f'zeros: the left model camera), got {K.ravel().tolist()}')
        channels = tuple(dict.fromkeys(request.channels)) or DEFAULT_RENDER_CHANNELS
        unknown = [c for c in channels if c not in RENDER_REQUEST_CHANNELS]
        if unknown:
            raise RenderRefused(f'unknown channel(s) {unknown}: choose among {list(RENDER_REQUEST_CHANNELS)}')
        if width * height > MAX_FEATURE_RENDER_PIXELS and {'features', 'labels'} & set(channels):
            raise RenderRefused(f'features and labels are rendered at up to {MAX_FEATURE_RENDER_PIXELS} pixels (e.g. '
                                f'1024x1024), {width}x{height} has {width * height}')
        phrases: tuple[str, ...] = ()
        if 'labels' in channels:
            try:
                phrases = semantics.validate_phrases(list(request.phrases)) if request.phrases \
                    else self._lsm_params.node_config.labels
            except ValueError as exc:
                raise RenderRefused(f'phrases: {exc}') from exc
        elif request.phrases:
            raise RenderRefused("phrases are for the 'labels' channel, which was not requested")
        with self._lock:
            latest = self._latest
        if latest is None:
            raise RenderRefused('no reconstruction yet: the first stereo pair is still awaited or being processed')
        model_size = latest.result.size
        size = (width, height) if width else model_size
        if not np.any(K):
            K = conversions.resized_intrinsics(latest.result.K_1, model_size, size)
        return latest, VirtualCamera(T_left_camera, K, *size), channels, phrases

    def _fill_render_response(self, response: RenderView.Response, latest: LatestReconstruction,
                              rendered: RenderedView, channels: tuple[str, ...]) -> None:
        """The requested images (left frame, the reconstruction's stamp), camera info, phrases and frames."""
        stamp = conversions.nanoseconds_to_stamp(latest.stamp_ns)

        def header() -> Header:
            return conversions.make_header(stamp, latest.left_frame)

        empty = rendered.alpha < DEPTH_MIN_ALPHA
        if 'rgb' in channels:
            response.rgb = conversions.unit_rgb_to_image_msg(rendered.rgb, header())
        if 'depth' in channels:
            response.depth = conversions.depth_to_image_msg(rendered.depth, header())
        if 'alpha' in channels:
            response.alpha = conversions.float_image_to_msg(rendered.alpha, header())
        if 'features' in channels:
            colors = self._feature_pca(latest.result.gaussians).colors(rendered.features)
            colors[empty] = 0
            response.features = conversions.rgb_to_image_msg(colors, header())
        if 'labels' in channels:
            response.labels = conversions.mono_to_image_msg(rendered.labels, header())
            response.phrases = list(rendered.phrases)
        response.camera_info = conversions.model_camera_info(rendered.K, rendered.width, rendered.height, header())
        response.stamp = stamp
        response.left_frame_id, response.right_frame_id = latest.left_frame, latest.right_frame
        response.success = True

    def _feature_pca(self, gaussians: GaussianCloud) -> FeaturePca:
        """The PCA colouring of a reconstruction's features, fitted once on its Gaussians' features."""
        with self._lock:
            cached = self._feature_pca_cache
        if cached is not None and cached[0] is gaussians:
            return cached[1]
        pca = FeaturePca.fit(gaussians.features)
        with self._lock:
            self._feature_pca_cache = (gaussians, pca)
        return pca

    def _publish(self, topic: str, build: Callable[[], Any]) -> None:
        try:
            self._publishers_by_topic[topic].publish(build())
        except Exception as exc:  # noqa: BLE001 - a failed publish must not stop the others
            self._publish_failed(topic, exc)

    def _publish_failed(self, topic: str, exc: Exception) -> None:
        self._count('publish_failures')
        self._warnings.warning(f'publish_{topic}', f'publishing {topic} failed: {type(exc).__name__}: {exc}')

    # ------------------------------------------------------------------------------------------ bookkeeping
    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _reject(self, reason: str, message: str) -> None:
        with self._lock:
            self._rejected[reason] += 1
        self._warnings.warning(reason, message)

    def _info_once(self, key: str, message: str) -> None:
        with self._lock:
            if key in self._once:
                return
            self._once.add(key)
        self.get_logger().info(message)

    def statistics(self) -> dict[str, Any]:
        """Counters: images, pairs, processed, rejected per reason, drops (sync and busy worker), latency."""
        with self._lock:
            counts, rejected, latencies = dict(self._counts), dict(self._rejected), list(self._latencies_s)
        return dict(counts=counts, rejected=rejected, sync_drops=self._synchronizer.drop_counts,
                    worker=self._worker.stats(),
                    median_latency_s=float(np.median(latencies)) if latencies else None)

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until the worker has nothing pending or running (for tests and the demo)."""
        return self._worker.wait_idle(timeout_s)

    def destroy_node(self) -> None:
        """Stop the worker (after its current pair, at most 30 s) and destroy the node."""
        worker = getattr(self, '_worker', None)  # absent when the set-up failed early
        if worker is not None and not worker.stop(timeout_s=30.0):
            self.get_logger().warning('the inference thread did not stop within 30 s')
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """Entry point of ``lsm_node`` (``ros2 run lsm_ros lsm_node --ros-args --params-file config/lsm.yaml``).

    Network: the environment is respected; only when ROS_AUTOMATIC_DISCOVERY_RANGE is unset does the node stay
    on localhost (see :func:`lsm_ros.ros.isolation.apply_node_environment_defaults`).
    """
    logging.basicConfig(level=logging.INFO, format='[%(levelname)s] [%(name)s]: %(message)s')
    apply_node_environment_defaults()
    rclpy.init(args=args)
    node = None
    try:
        node = LsmNode()
        executor = MultiThreadedExecutor(num_threads=3)  # image callbacks, a query and a render at once
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception as exc:  # noqa: BLE001 - a clear message instead of a traceback for set-up errors
        logging.getLogger(NODE_NAME).error('lsm_node stopped: %s: %s', type(exc).__name__, exc)
        return 1
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
