"""``lsm_node``: a stereo / camera pair in, DUSt3R geometry out (point cloud, depth, relative pose).

Subscribes (SensorDataQoS, relative names as stereo_image_proc's, so they remap):

- ``left/image_rect``, ``right/image_rect`` (sensor_msgs/Image: rgb8, bgr8, mono8, rgba8, bgra8), or with
  ``image_transport:=compressed`` sensor_msgs/CompressedImage (JPEG, PNG) on ``<base topic>/compressed``, the base
  topic resolved with its remapping as image_transport does (``left/image_rect:=/cam/left/image_rect`` ->
  ``/cam/left/image_rect/compressed``);
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
- ``/tf`` left -> right TransformStamped, only when ``publish_tf`` (and the pose succeeded);
- ``/diagnostics`` diagnostic_msgs/DiagnosticArray every ``diagnostics_period_s``, in every lifecycle state (a plain
  publisher created before configure): the statuses ``<node>: inputs`` (rate, silence and stamps of each input
  topic, stereo offset, sync drops), ``<node>: processing`` (processed pairs, latency median/p95, rejections per
  reason, failures, scale of the last reconstruction) and ``<node>: model`` (lifecycle state, model state
  unconfigured/loading/ready/failed with the error, weights, device, memory), built by
  :mod:`lsm_ros.ros.diagnostics`; ``<node>`` is the node's fully qualified name without the leading slash.

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
the newest waiting pair is kept. A bad pair (sizes, encoding, data, an image too small for the model's resize
and crop, CameraInfo, stale stamp) is logged (rate-limited), counted once and produces no output; the node keeps
running. A pair whose inference raises (an exception, or running out of memory: then cached accelerator memory is
released) is dropped and counted (``reconstruction_failed``, ``out_of_memory``); a burst of such failures is
logged once (its first failure, at error level) and its end once ('recovered after N failed pairs'); ~/query and
~/render keep answering from the last good reconstruction.

Life cycle (a managed node, ``rclpy.lifecycle``): with ``managed:=false`` (default) the node configures and
activates itself in its constructor; with ``managed:=true`` it starts unconfigured and follows the transitions
(``ros2 lifecycle set /lsm/lsm_node configure`` ...):

- configure: torch threads (``torch_threads``), the model (built from the checkpoint parameters, or the one passed
  to the constructor), publishers, ~/query, ~/render, the worker thread and the subscriptions; a failure (e.g. no
  checkpoint) is logged with the reason, reported on /diagnostics (model state failed, with the error) and leaves
  the node unconfigured;
- activate: the model back on its device if deactivate moved it, one timed warm-up forward on a synthetic pair at
  the model size, then processing starts;
- deactivate: processing stops (the pair being reconstructed finishes and is published; later images are counted
  in ``statistics()['inactive_drops']``, not processed); on CUDA the model moves to the CPU and the cached CUDA
  memory is released. The last good reconstruction is kept: while inactive, ~/query and ~/render answer from it
  when the model stayed usable (CPU), and are refused with the reason (activate first) when it was moved off CUDA;
- cleanup and shutdown: the subscriptions, services and publishers are destroyed, the worker thread is stopped, the
  last reconstruction and the model are dropped (a model passed to the constructor is only moved off the
  accelerator and kept for the next configure), the torch thread count is restored;
- on_error (a transition that raised): everything is released as by cleanup, back to unconfigured.

Runtime parameter changes are all or nothing (one SetParameters request with several parameters: all applied or
none, the reason names the refused ones) and every pair is processed with one snapshot of the parameters, taken
when the pair is formed: its checks, its reconstruction and its publishing never mix old and new values.

Where the code is: this module has the node (life cycle, parameters, pairing and checking input, publishing, the
service wrapper), its topic and service names and its ``REJECT_*`` reasons. :mod:`lsm_ros.ros.services` checks
~/query and ~/render requests and fills their responses, :mod:`lsm_ros.ros.input_checks` checks image sizes and
CameraInfo, :mod:`lsm_ros.ros.runtime` has the torch thread count, out-of-memory handling and the warm-up pair.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
from lifecycle_msgs.msg import State
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException
from rclpy.signals import SignalHandlerOptions
from rclpy.lifecycle import LifecycleNode, LifecyclePublisher, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.service import Service
from rclpy.subscription import Subscription
from rcl_interfaces.msg import SetParametersResult
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage

from lsm_ros import semantics
from lsm_ros.config import NodeConfig, PipelineConfig
from lsm_ros.msg import ReconstructionInfo
from lsm_ros.pipeline import CameraCalibration, GaussianCloud, Reconstruction, Reconstructor
from lsm_ros.ros import conversions, diagnostics
from lsm_ros.ros.diagnostics import DIAGNOSTICS_TOPIC, DiagnosticThresholds, LatencyMonitor, NodeHealth, \
    TopicRateMonitor
from lsm_ros.ros.graph import SteadyMultiThreadedExecutor
from lsm_ros.ros.input_checks import calibration_from_camera_infos, model_input_problem, no_baseline_reason
from lsm_ros.ros.isolation import apply_node_environment_defaults
from lsm_ros.ros.params import (AllOrNothingParameterService, LsmParameters, ParameterSnapshot,
                                set_parameters_all_or_nothing)
from lsm_ros.ros.runtime import OUT_OF_MEMORY_ERRORS, TorchThreads, release_cached_memory, warmup_pair
from lsm_ros.ros.services import (MIDWAY_FRAME_SUFFIX, LatestReconstruction, ModelAccess, QueryRefused,
                                  RenderRefused, ServiceKind, ServiceRefused, fill_query_response,
                                  fill_render_response, midway_pose, parse_query_request, parse_render_request,
                                  query_answer, render_request, render_view_camera)
from lsm_ros.ros.sync import (DROP_DUPLICATE, DROP_LATE, SYNC_DROP_REASONS, CameraInfoCache, LatestPairWorker,
                              RateLimitedLog, Side, StereoPair, StereoSynchronizer)
from lsm_ros.semantics import QueryResult
from lsm_ros.srv import RenderView, TextQuery
from lsm_ros.visualization import FeaturePca
from lsm_ros.weights import default_weights_dir, installed_checkpoints

NODE_NAME = 'lsm_node'
# Input topics (relative: remap them, e.g. left/image_rect:=/stereo/left/image_rect).
LEFT_IMAGE_TOPIC = 'left/image_rect'
RIGHT_IMAGE_TOPIC = 'right/image_rect'
LEFT_INFO_TOPIC = 'left/camera_info'
RIGHT_INFO_TOPIC = 'right/camera_info'
INPUT_TOPICS = (LEFT_IMAGE_TOPIC, RIGHT_IMAGE_TOPIC, LEFT_INFO_TOPIC, RIGHT_INFO_TOPIC)
COMPRESSED_SUFFIX = '/compressed'    # image_transport 'compressed': <resolved base topic>/compressed
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
# Frames used when neither the parameter nor the image header names one.
DEFAULT_LEFT_FRAME = 'lsm_left_camera_optical_frame'
DEFAULT_RIGHT_FRAME = 'lsm_right_camera_optical_frame'

PRODUCT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=2, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
TF_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE,
                    durability=DurabilityPolicy.VOLATILE)  # as tf2_ros.TransformBroadcaster
DIAGNOSTICS_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE)  # as diagnostic_updater
DIAGNOSTICS_WINDOW_S = 5.0       # input rates and stamps of /diagnostics are taken over this sliding window
LATENCY_WINDOW = 100             # /diagnostics latency median and p95 are taken over this many recent pairs
STALE_PARTNER_MEMORY = 16        # late images per side remembered to count a late pair once

# Reasons for which a pair gives no output (counted in LsmNode.statistics()['rejected']).
REJECT_ENCODING = 'unsupported_encoding'
REJECT_IMAGE_DATA = 'bad_image_data'
REJECT_SIZE_MISMATCH = 'size_mismatch'
REJECT_NO_CAMERA_INFO = 'missing_camera_info'
REJECT_BAD_CAMERA_INFO = 'bad_camera_info'
REJECT_STALE = 'stale_stamp'
REJECT_TOO_OLD = 'too_old'
# inference raised / ran out of (accelerator or host) memory: diagnostics reports these as failures, not bad input
REJECT_RECONSTRUCTION, REJECT_OUT_OF_MEMORY = diagnostics.INFERENCE_FAILURE_REASONS

# Lifecycle: primary states (labels as lifecycle_msgs/State and `ros2 lifecycle get` spell them).
STATE_UNCONFIGURED = 'unconfigured'
STATE_INACTIVE = 'inactive'
STATE_ACTIVE = 'active'
STATE_FINALIZED = 'finalized'
DEACTIVATE_TIMEOUT_S = 120.0     # deactivate waits this long for the pair being reconstructed
STOP_TIMEOUT_S = 30.0            # cleanup/shutdown wait this long for the worker thread to stop
SERVICE_DRAIN_TIMEOUT_S = 60.0   # freeing the model waits this long for ~/query and ~/render calls using it

CHECKPOINT_HELP = (
    'lsm_node needs the official DUSt3R weights: pass the file with -p dust3r_checkpoint:=/path/to/'
    'DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth (or lsm_checkpoint:=/path/to/checkpoint-final.pth, whose config '
    'names the DUSt3R file), e.g. `ros2 run lsm_ros lsm_node --ros-args -p dust3r_checkpoint:=...`, '
    '`ros2 launch lsm_ros lsm.launch.py dust3r_checkpoint:=...` or in config/lsm.yaml; or install the three '
    'official files with `lsm-ros weights fetch` (used when no checkpoint parameter is set).')


class TransitionFailed(RuntimeError):
    """A lifecycle transition that cannot complete; the node stays in its previous primary state."""


QUERY = ServiceKind(QUERY_SERVICE, 'queries', 'query')
RENDER = ServiceKind(RENDER_SERVICE, 'renders', 'render')


def render_view_topics(view: str) -> tuple[str, str]:
    """(image, camera_info) topics of a ``render_views`` view."""
    return f'~/render/{view}/image', f'~/render/{view}/camera_info'


class InputRejected(ValueError):
    """A pair that cannot be reconstructed; ``reason`` is one of the REJECT_* keys."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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
    received_s: float             # monotonic time the later image of the pair arrived
    settings: ParameterSnapshot


@dataclass
class PairAwaitingCameraInfo:
    """A checked pair (decoded, without its calibration) held until its CameraInfo arrives (or ``deadline_s``,
    monotonic, passes)."""

    pair: PreparedPair
    deadline_s: float
    message: str                  # the rejection to report if it expires


class LsmNode(LifecycleNode):
    """The ROS 2 managed node around :class:`~lsm_ros.pipeline.Reconstructor` (see the module docstring).

    ``reconstructor``: an already built one (its config gives the defaults of the pipeline parameters;
    read-only ones cannot change it; it belongs to the caller: cleanup only moves it off the accelerator, and the
    next configure takes it again); None: built from the checkpoint parameters at configure. ``node_kwargs`` go to
    ``rclpy.node.Node`` (context, namespace, parameter_overrides, cli_args, ...). With ``managed`` false (default)
    the constructor configures and activates the node and raises the reason when either fails.
    ``diagnostic_thresholds``: when a /diagnostics finding becomes a warning or an error (default
    :class:`~lsm_ros.ros.diagnostics.DiagnosticThresholds`).
    """

    def __init__(self, reconstructor: Reconstructor | None = None, *,
                 diagnostic_thresholds: DiagnosticThresholds | None = None, **node_kwargs: Any) -> None:
        start_parameter_services = node_kwargs.pop('start_parameter_services', True)
        super().__init__(NODE_NAME, start_parameter_services=False, **node_kwargs)
        if start_parameter_services:   # SetParameters requests all or nothing (rclpy sets one parameter at a time)
            self._parameter_service = AllOrNothingParameterService(self)
        try:
            self._set_up(reconstructor, diagnostic_thresholds or DiagnosticThresholds())
        except BaseException:
            self.destroy_node()
            raise

    def _set_up(self, reconstructor: Reconstructor | None, thresholds: DiagnosticThresholds) -> None:
        self._lock = threading.Lock()
        self._config_lock = threading.Lock()        # reconstructor.config vs. runtime parameter changes
        self._rejected: collections.Counter[str] = collections.Counter()
        self._counts: collections.Counter[str] = collections.Counter()
        self._latency_monitor = LatencyMonitor(window=LATENCY_WINDOW)
        self._topic_monitor = TopicRateMonitor(window_s=DIAGNOSTICS_WINDOW_S)
        self.diagnostic_thresholds = thresholds
        self._model_state = diagnostics.MODEL_UNCONFIGURED   # model load state reported on /diagnostics
        self._model_error = ''                      # why the last configure failed (model state 'failed')
        self._loading_weights = ''                  # what is being loaded (model state 'loading')
        self._last_scale: tuple[str, str, float | None] = (diagnostics.SCALE_UNKNOWN, '', None)  # of the last
        #                                             published reconstruction: scale, scale source, baseline (m)
        self._previous_health: NodeHealth | None = None
        # late images counted as a stale pair whose partner (the other side's late image) has not come yet
        self._stale_unpaired: dict[Side, collections.deque[int]] = {
            side: collections.deque(maxlen=STALE_PARTNER_MEMORY) for side in ('left', 'right')}
        self._last_accepted_stamp_ns: int | None = None
        self._awaiting_camera_info: PairAwaitingCameraInfo | None = None   # see camera_info_wait_s
        self._once: set[str] = set()
        self._injected = reconstructor
        self._reconstructor: Reconstructor | None = None
        self._offloaded = False                     # deactivate moved the model off its accelerator
        self._inferring = False                     # the reconstructor runs with a pair's pipeline config
        self._processing = False                    # active: pairs are reconstructed
        self._inactive_drops = 0                    # images received while not active
        self._failure_burst = 0                     # pairs failed in a row (inference)
        self._torch_threads = TorchThreads()        # torch intra-op threads of this configuration
        self._transition_error: BaseException | None = None
        self._model_access = ModelAccess('lsm_node is not configured yet: configure and activate it '
                                         '(ros2 lifecycle set <node> configure)')
        self._synchronizer: StereoSynchronizer[ReceivedImage] | None = None
        self._synchronizer_settings: dict[str, Any] = {}
        self._camera_infos: CameraInfoCache[CameraInfo] | None = None
        self._worker: LatestPairWorker[PreparedPair] | None = None
        self._publishers_by_topic: dict[str, LifecyclePublisher] = {}
        self._tf_publisher: LifecyclePublisher | None = None  # created when publish_tf is first true
        self._subscriptions_created: list[Subscription] = []
        self._services_created: list[Service] = []
        self._input_topics: dict[str, str] = {}
        self._latest: LatestReconstruction | None = None
        self._feature_pca_cache: tuple[GaussianCloud, FeaturePca] | None = None
        self._lsm_params = LsmParameters(self, pipeline_defaults=reconstructor.config if reconstructor else None,
                                         on_change=self._on_config_change)
        self._warnings = RateLimitedLog(self.get_logger(), self._lsm_params.node_config.log_throttle_s)
        # /diagnostics: a plain publisher and a timer in a callback group of their own, so the health is reported in
        # every lifecycle state (a failed configure included) and never waits for image callbacks, services or
        # transitions; the timer runs on the steady clock: with use_sim_time it goes on when the bag stops
        self._diagnostics_publisher = self.create_publisher(DiagnosticArray, DIAGNOSTICS_TOPIC, DIAGNOSTICS_QOS)
        self._diagnostics_timer = self.create_timer(self._lsm_params.node_config.diagnostics_period_s,
                                                    self._on_diagnostics_timer,
                                                    callback_group=MutuallyExclusiveCallbackGroup(),
                                                    clock=Clock(clock_type=ClockType.STEADY_TIME))
        if self._lsm_params.node_config.managed:
            self.get_logger().info(f'lsm_node is managed: unconfigured, waiting for `ros2 lifecycle set '
                                   f'{self.get_fully_qualified_name()} configure` (then activate)')
            return
        for transition in (self.trigger_configure, self.trigger_activate):
            if transition() != TransitionCallbackReturn.SUCCESS:
                raise self._transition_error or RuntimeError(f'lsm_node: {transition.__name__} failed')

    # ------------------------------------------------------------------------------------------ life cycle
    @property
    def lifecycle_state(self) -> str:
        """The lifecycle state's label: 'unconfigured', 'inactive', 'active', 'finalized' (or a transition's,
        e.g. 'configuring', while one runs)."""
        try:
            return str(self._state_machine.current_state[1])
        except Exception:  # noqa: BLE001 - the state machine is gone once the node is destroyed
            return 'unknown'

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition('configure', self._configure, TransitionCallbackReturn.FAILURE)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition('activate', functools.partial(self._activate, state), TransitionCallbackReturn.FAILURE)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition('deactivate', functools.partial(self._deactivate, state),
                                TransitionCallbackReturn.ERROR)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition('cleanup', self._release_all, TransitionCallbackReturn.ERROR)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._transition('shutdown', functools.partial(self._release_all, drop_injected=True),
                                TransitionCallbackReturn.ERROR)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """A transition raised: release everything, back to unconfigured (finalized when even that fails)."""
        try:
            self._release_all()
        except Exception as exc:  # noqa: BLE001 - reported, then the node is finalized
            self.get_logger().error(f'recovering from the failed transition failed too ({type(exc).__name__}: '
                                    f'{exc}): lsm_node is finalized')
            return TransitionCallbackReturn.FAILURE
        self.get_logger().warning('lsm_node recovered from the failed transition: everything released, '
                                  'unconfigured (configure it again)')
        return TransitionCallbackReturn.SUCCESS

    def _transition(self, name: str, action: Callable[[], None],
                    on_exception: TransitionCallbackReturn) -> TransitionCallbackReturn:
        """Run a transition's work: SUCCESS, FAILURE for :class:`TransitionFailed`, ``on_exception`` for others
        (configure and activate: FAILURE, the node stays where it was; the others: ERROR, then :meth:`on_error`).
        The reason is logged and kept for the constructor of an unmanaged node."""
        self._transition_error = None
        try:
            action()
        except TransitionFailed as exc:
            self._transition_error = exc
            self.get_logger().error(f'{name} failed: {exc}')
            return TransitionCallbackReturn.FAILURE
        except Exception as exc:  # noqa: BLE001 - rclpy would turn it into ERROR without a word
            self._transition_error = exc
            self.get_logger().error(f'{name} failed: {type(exc).__name__}: {exc}')
            return on_exception
        return TransitionCallbackReturn.SUCCESS

    def _configure(self) -> None:
        """Threads, model, publishers, services, worker and subscriptions (all released again on failure)."""
        settings = self._lsm_params.snapshot
        cfg = settings.node
        self._set_model_state(diagnostics.MODEL_LOADING, weights=self._weights_to_load(settings.pipeline))
        self.get_logger().info(self._torch_threads.apply(cfg.torch_threads))
        try:
            if self._injected is not None:
                reconstructor = self._injected
                self._warn_ignored_read_only(reconstructor, settings.pipeline)
                reconstructor.reload()   # moved off the accelerator by an earlier cleanup
            else:
                started = time.perf_counter()
                reconstructor = self._build_reconstructor(settings.pipeline)
                self.get_logger().info(f'model {reconstructor.weights} loaded on {reconstructor.device} in '
                                       f'{time.perf_counter() - started:.1f} s')
            with self._config_lock:
                reconstructor.config = self._pipeline_config_for(reconstructor, self._lsm_params.pipeline)
                self._reconstructor = reconstructor
            self._offloaded = False
            self._synchronizer = self._make_synchronizer(cfg)
            self._camera_infos = CameraInfoCache()
            with self._lock:
                self._awaiting_camera_info = None
                self._last_accepted_stamp_ns = None
                self._once.discard('inactive_images')
            self._create_publishers(reconstructor.semantic, cfg)
            # Own groups: a query or a render never waits for image callbacks (nor they for it); inference runs on
            # the worker.
            self._services_created = [
                self.create_service(TextQuery, QUERY_SERVICE, self._on_query,
                                    callback_group=MutuallyExclusiveCallbackGroup()),
                self.create_service(RenderView, RENDER_SERVICE, self._on_render,
                                    callback_group=MutuallyExclusiveCallbackGroup())]
            self._worker = LatestPairWorker(self._process_pair, logger=self.get_logger(), name='lsm_inference',
                                            log_interval_s=cfg.log_throttle_s).start()
            self._create_subscriptions(cfg.image_transport)
            self._model_access.open()
        except BaseException as exc:
            self._release_all()
            self._set_model_state(diagnostics.MODEL_FAILED, error=f'{type(exc).__name__}: {exc}')
            raise
        self._set_model_state(diagnostics.MODEL_READY)
        self._announce()

    def _weights_to_load(self, pipeline: PipelineConfig) -> str:
        """What configure is about to load: the injected model's weights, else the checkpoint parameters."""
        if self._injected is not None:
            return self._injected.weights
        files = [f'{name}={getattr(pipeline, name)}' for name in ('lsm_checkpoint', 'dust3r_checkpoint',
                                                                    'lseg_checkpoint') if getattr(pipeline, name)]
        return ', '.join(files) or 'no checkpoint configured'

    def _set_model_state(self, state: str, *, weights: str = '', error: str = '') -> None:
        """The model load state reported on /diagnostics (``error``: why loading failed)."""
        with self._lock:
            self._model_state, self._model_error, self._loading_weights = state, error, weights

    def _activate(self, state: LifecycleState) -> None:
        """Model back on its device, one timed warm-up forward, publishers enabled, processing on."""
        reconstructor = self._configured_reconstructor()
        if self._offloaded:
            started = time.perf_counter()
            reconstructor.reload()
            self._offloaded = False
            self.get_logger().info(f'model back on {reconstructor.device} in {time.perf_counter() - started:.2f} s')
        failure = None
        try:
            self._warm_up(reconstructor)
        except OUT_OF_MEMORY_ERRORS as exc:
            failure = f'the warm-up forward ran out of memory ({type(exc).__name__}: {exc}); still inactive'
        except Exception as exc:  # noqa: BLE001 - reported as a failed activation
            failure = f'the warm-up forward failed ({type(exc).__name__}: {exc}); still inactive'
        if failure is not None:
            release_cached_memory(reconstructor.device)
            raise TransitionFailed(failure)
        self._model_access.open()
        super().on_activate(state)   # enables the lifecycle publishers
        with self._lock:
            self._processing = True
        self.get_logger().info(f'lsm_node active: reconstructing pairs from {self._input_topics["left"]} and '
                               f'{self._input_topics["right"]}')

    def _warm_up(self, reconstructor: Reconstructor) -> None:
        """One forward on a synthetic pair at the model size (not published), timed and logged."""
        self._torch_threads.use()
        size = reconstructor.config.resolution
        left, right = warmup_pair(size)
        started = time.perf_counter()
        with self._pipeline_config(reconstructor, self._lsm_params.pipeline):
            reconstructor.reconstruct(left, right)
        self.get_logger().info(f'warm-up: one forward on a synthetic {size}x{size} pair on {reconstructor.device} '
                               f'took {time.perf_counter() - started:.2f} s')

    def _deactivate(self, state: LifecycleState) -> None:
        """Processing off (the pair in flight finishes and is published), publishers disabled, accelerator freed."""
        with self._lock:
            self._processing = False
            self._once.discard('inactive_images')
        worker = self._worker
        if worker is not None and not worker.wait_idle(DEACTIVATE_TIMEOUT_S):
            with self._lock:
                self._processing = True
            raise TransitionFailed(f'the pair being reconstructed did not finish within {DEACTIVATE_TIMEOUT_S:g} s; '
                                   'still active')
        super().on_deactivate(state)   # disables the lifecycle publishers
        if self._synchronizer is not None:
            self._synchronizer.reset()  # images queued for pairing are forgotten
        reconstructor = self._configured_reconstructor()
        reason = (f'lsm_node is inactive and its model was moved off {reconstructor.device} to free accelerator '
                  f'memory: activate it (ros2 lifecycle set {self.get_fully_qualified_name()} activate) to use '
                  f'{self.resolve_service_name(QUERY_SERVICE)} and {self.resolve_service_name(RENDER_SERVICE)} again '
                  '(the last reconstruction is kept)')
        if not self._model_access.close(reason, SERVICE_DRAIN_TIMEOUT_S):
            self.get_logger().warning(f'~/query or ~/render calls still use the model after '
                                      f'{SERVICE_DRAIN_TIMEOUT_S:g} s: freeing it anyway')
        if reconstructor.offload():
            self._offloaded = True
            release_cached_memory(reconstructor.device)
            self.get_logger().info(f'lsm_node inactive: model moved off {reconstructor.device}, accelerator memory '
                                   'released; ~/query and ~/render refused until activation')
        else:
            self._model_access.open()   # on the CPU nothing is freed: the model keeps answering
            self.get_logger().info('lsm_node inactive: images are counted, not processed; ~/query and ~/render '
                                   'answer from the last reconstruction')

    def _release_all(self, drop_injected: bool = False) -> None:
        """Cleanup, shutdown, error recovery and destruction: subscriptions, worker thread, services, publishers,
        the last reconstruction and the model; the torch thread count is restored. Idempotent."""
        with self._lock:
            self._processing = False
        for subscription in self._subscriptions_created:
            self.destroy_subscription(subscription)
        self._subscriptions_created, self._input_topics = [], {}
        worker = self._worker
        if worker is not None and worker.running and not worker.stop(timeout_s=STOP_TIMEOUT_S):
            self.get_logger().warning(f'the inference thread did not stop within {STOP_TIMEOUT_S:g} s')
        if not self._model_access.close('lsm_node is not configured: configure and activate it (ros2 lifecycle set '
                                        f'{self.get_fully_qualified_name()} configure)', SERVICE_DRAIN_TIMEOUT_S):
            self.get_logger().warning(f'~/query or ~/render calls still running after {SERVICE_DRAIN_TIMEOUT_S:g} s')
        for service in self._services_created:
            self.destroy_service(service)
        self._services_created = []
        publishers = list(self._publishers_by_topic.values()) + ([self._tf_publisher] if self._tf_publisher else [])
        self._publishers_by_topic, self._tf_publisher = {}, None
        for publisher in publishers:
            self.destroy_lifecycle_publisher(publisher)
        with self._lock:
            self._latest, self._feature_pca_cache = None, None
        with self._config_lock:
            reconstructor, self._reconstructor = self._reconstructor, None
        if drop_injected:
            self._injected = None
        if reconstructor is not None:
            device = reconstructor.device
            try:
                reconstructor.offload()   # a caller's reconstructor is kept, off the accelerator
            except Exception as exc:  # noqa: BLE001 - the rest is released anyway
                self.get_logger().error(f'moving the model off {device} failed: {type(exc).__name__}: {exc}')
            del reconstructor
            release_cached_memory(device)
        self._offloaded = False
        if self._synchronizer is not None:
            self._synchronizer.reset()
        self._camera_infos = None
        with self._lock:
            self._awaiting_camera_info = None
        self._topic_monitor.forget()      # the subscriptions are gone; configure watches the topics again
        with self._lock:
            self._last_scale = (diagnostics.SCALE_UNKNOWN, '', None)
            for unpaired in self._stale_unpaired.values():
                unpaired.clear()
        self._set_model_state(diagnostics.MODEL_UNCONFIGURED)
        self._torch_threads.restore()

    def _configured_reconstructor(self) -> Reconstructor:
        reconstructor = self._reconstructor
        if reconstructor is None:
            raise TransitionFailed('lsm_node is not configured')
        return reconstructor

    # ------------------------------------------------------------------------------------------ parameters
    def set_parameters(self, parameter_list: list[Parameter]) -> list[SetParametersResult]:
        """Set several parameters all or nothing (rclpy would set them one by one): one result per parameter,
        all successful, or all refused with the reason."""
        return set_parameters_all_or_nothing(self, list(parameter_list))

    def set_parameters_atomically(self, parameter_list: list[Parameter]) -> SetParametersResult:
        """rclpy's atomic set, with lsm_node's parameters checked first, so that a refusal names each bad parameter
        and says why (rclpy's own type check only says 'Wrong parameter type')."""
        parameters = getattr(self, '_lsm_params', None)   # None while the parameters are being declared
        if parameters is not None:
            checked = parameters.check(list(parameter_list))
            if not checked.successful:
                return checked
        return super().set_parameters_atomically(parameter_list)

    @contextlib.contextmanager
    def _pipeline_config(self, reconstructor: Reconstructor, pipeline: PipelineConfig) -> Iterator[None]:
        """Run inference with ``pipeline`` as the reconstructor's config: runtime changes made meanwhile reach the
        reconstructor only afterwards, so one forward never mixes two configs."""
        with self._config_lock:
            self._inferring = True
            reconstructor.config = self._pipeline_config_for(reconstructor, pipeline)
        try:
            yield
        finally:
            with self._config_lock:
                self._inferring = False
                reconstructor.config = self._pipeline_config_for(reconstructor, self._lsm_params.pipeline)

    def _on_config_change(self, pipeline: PipelineConfig, node_config: NodeConfig) -> None:
        with self._config_lock:
            reconstructor = self._reconstructor
            if reconstructor is not None and not self._inferring:
                reconstructor.config = self._pipeline_config_for(reconstructor, pipeline)
        if reconstructor is not None and reconstructor.semantic:
            self._create_render_view_publishers(node_config.render_views)
        self._warnings.interval_s = node_config.log_throttle_s
        if self._synchronizer is not None and self._sync_settings(node_config) != self._synchronizer_settings:
            self._synchronizer = self._make_synchronizer(node_config)  # queued images are forgotten
        period_ns = round(node_config.diagnostics_period_s * 1e9)
        if self._diagnostics_timer.timer_period_ns != period_ns:
            self._diagnostics_timer.timer_period_ns = period_ns
            self._diagnostics_timer.reset()   # the next report one new period from now (not one old period)
        self._watch_camera_infos(node_config.use_camera_info)

    # ------------------------------------------------------------------------------------------ set-up
    def _build_reconstructor(self, pipeline: PipelineConfig) -> Reconstructor:
        """The model of the checkpoint parameters; when none is set, of the official files installed by
        ``lsm-ros weights fetch`` (``$LSM_ROS_WEIGHTS`` or ``~/.cache/lsm_ros/weights``)."""
        if not (pipeline.dust3r_checkpoint or pipeline.lsm_checkpoint):
            installed = installed_checkpoints()
            if not installed:
                raise ValueError(f'no checkpoint configured and none installed in {default_weights_dir()}. '
                                 + CHECKPOINT_HELP)
            self.get_logger().info(f'no checkpoint parameter set: using the official weights installed in '
                                   f'{default_weights_dir()}: {", ".join(installed.values())}')
            pipeline = dataclasses.replace(pipeline, **installed)
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

    def _create_product_publisher(self, msg_type: Any, topic: str, qos: QoSProfile) -> LifecyclePublisher:
        """A lifecycle publisher (silent while the node is not active), enabled at once when created while active."""
        publisher = self.create_lifecycle_publisher(msg_type, topic, qos)
        if self.lifecycle_state == STATE_ACTIVE:
            publisher.on_activate(LifecycleState(label=STATE_ACTIVE, state_id=State.PRIMARY_STATE_ACTIVE))
        return publisher

    def _create_publishers(self, semantic: bool, cfg: NodeConfig) -> None:
        for topic, msg_type in ((POINTS_TOPIC, PointCloud2), (LEFT_DEPTH_TOPIC, Image), (RIGHT_DEPTH_TOPIC, Image),
                                (LEFT_MODEL_INFO_TOPIC, CameraInfo), (RIGHT_MODEL_INFO_TOPIC, CameraInfo),
                                (RELATIVE_POSE_TOPIC, PoseStamped), (INFO_TOPIC, ReconstructionInfo)):
            self._publishers_by_topic[topic] = self._create_product_publisher(msg_type, topic, PRODUCT_QOS)
        if semantic:
            for topic in SEMANTIC_TOPICS:
                self._publishers_by_topic[topic] = self._create_product_publisher(Image, topic, PRODUCT_QOS)
            self._create_render_view_publishers(cfg.render_views)

    def _create_subscriptions(self, transport: str) -> None:
        """Image subscriptions (raw, or CompressedImage on <resolved base topic>/compressed) and CameraInfo."""
        image_type = CompressedImage if transport == 'compressed' else Image
        suffix = COMPRESSED_SUFFIX if transport == 'compressed' else ''
        self._input_topics = {}
        # CameraInfo first: when an image and its CameraInfo are ready in the same wait, the executor takes them in
        # creation order.
        for side, topic in (('left', LEFT_INFO_TOPIC), ('right', RIGHT_INFO_TOPIC)):
            subscription = self.create_subscription(CameraInfo, topic, self._camera_info_callback(side),
                                                    qos_profile_sensor_data)
            self._subscriptions_created.append(subscription)
            self._input_topics[f'{side}_info'] = subscription.topic_name
        for side, base in (('left', LEFT_IMAGE_TOPIC), ('right', RIGHT_IMAGE_TOPIC)):
            # image_transport resolves (remaps) the base topic, then appends the transport's suffix
            topic = self.resolve_topic_name(base) + suffix if suffix else base
            subscription = self.create_subscription(image_type, topic, self._image_callback(side),
                                                    qos_profile_sensor_data)
            self._subscriptions_created.append(subscription)
            self._input_topics[side] = subscription.topic_name
        for side in ('left', 'right'):
            self._topic_monitor.watch(self._input_topics[side], required=True)
        self._watch_camera_infos(self._lsm_params.node_config.use_camera_info)

    def _watch_camera_infos(self, required: bool) -> None:
        """Follow the CameraInfo topics on /diagnostics: required with ``use_camera_info`` (else a silent one is no
        problem)."""
        for key in ('left_info', 'right_info'):
            topic = self._input_topics.get(key)
            if topic is not None:
                self._topic_monitor.watch(topic, required=required)

    def _announce(self) -> None:
        rec, cfg, logger = self._configured_reconstructor(), self._lsm_params.node_config, self.get_logger()
        logger.info(f'lsm_node configured: weights {rec.weights}, device {rec.device}, resolution '
                    f'{rec.config.resolution}, {"approximate" if cfg.approximate_sync else "exact"} stereo sync, '
                    f'camera info {"used" if cfg.use_camera_info else "ignored (intrinsics estimated)"}; '
                    f'{cfg.image_transport} images from {self._input_topics["left"]} and '
                    f'{self._input_topics["right"]}')
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

    def output_topic_names(self) -> dict[str, str]:
        """Fully resolved names of the products: {'~/points': '/<ns>/lsm_node/points', ...}; the semantic ones
        only with the semantic model (known once configured, or from the reconstructor given to the constructor)."""
        reconstructor = self.reconstructor
        topics = OUTPUT_TOPICS + (SEMANTIC_TOPICS if reconstructor is not None and reconstructor.semantic else ())
        return {topic: self.resolve_topic_name(topic) for topic in topics}

    def input_image_topic_names(self) -> dict[str, str]:
        """Fully resolved image topics subscribed to, {'left': ..., 'right': ...} (empty while unconfigured)."""
        return {side: topic for side, topic in self._input_topics.items() if side in ('left', 'right')}

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
                self._publishers_by_topic[info_topic] = self._create_product_publisher(CameraInfo, info_topic,
                                                                                       PRODUCT_QOS)
                self._publishers_by_topic[image_topic] = self._create_product_publisher(Image, image_topic,
                                                                                        PRODUCT_QOS)

    @property
    def reconstructor(self) -> Reconstructor | None:
        """The model in use once configured, else the one given to the constructor (None: not built yet)."""
        return self._reconstructor if self._reconstructor is not None else self._injected

    @property
    def node_config(self) -> NodeConfig:
        return self._lsm_params.node_config

    # ------------------------------------------------------------------------------------------ input
    def _image_callback(self, side: Side) -> Callable[[Image | CompressedImage], None]:
        def on_image(msg: Image | CompressedImage) -> None:
            self._count(f'{side}_images')
            stamp_ns = conversions.stamp_to_nanoseconds(msg.header.stamp)
            topic = self._input_topics.get(side)
            if topic is not None:
                self._topic_monitor.record(topic, stamp_ns)
            synchronizer = self._synchronizer
            if not self._processing or synchronizer is None:
                with self._lock:
                    self._inactive_drops += 1
                self._info_once('inactive_images', f'images arrive while lsm_node is {self.lifecycle_state}: they '
                                'are counted (statistics inactive_drops), not processed')
                return
            result = synchronizer.add(side, stamp_ns, ReceivedImage(msg, time.monotonic()))
            if result.rejected == DROP_LATE and self._new_stale_pair(side, stamp_ns, synchronizer.tolerance_ns):
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
            stamp_ns = conversions.stamp_to_nanoseconds(msg.header.stamp)
            topic = self._input_topics.get(f'{side}_info')
            if topic is not None:
                self._topic_monitor.record(topic, stamp_ns)
            cache = self._camera_infos
            if cache is not None:
                cache.update(side, stamp_ns, msg)
                self._retry_pair_awaiting_camera_info()
        return on_camera_info

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

    def _on_pair(self, pair: StereoPair[ReceivedImage]) -> None:
        self._count('pairs')
        settings = self._lsm_params.snapshot   # the one set of parameters this pair is processed with
        try:
            checked = self._prepare_pair(pair, settings)
        except InputRejected as exc:
            self._reject(exc.reason, str(exc))
            return
        try:
            prepared = self._calibrated(checked)
        except InputRejected as exc:
            wait_s = settings.node.camera_info_wait_s
            if exc.reason == REJECT_NO_CAMERA_INFO and wait_s > 0:
                self._await_camera_info(PairAwaitingCameraInfo(checked, time.monotonic() + wait_s, str(exc)))
            else:
                self._reject(exc.reason, str(exc))
            return
        self._submit(prepared)

    def _await_camera_info(self, waiting: PairAwaitingCameraInfo) -> None:
        """Hold a pair whose CameraInfo is missing; the pair it replaces is rejected (missing_camera_info)."""
        with self._lock:
            replaced, self._awaiting_camera_info = self._awaiting_camera_info, waiting
        if replaced is not None:
            self._reject(REJECT_NO_CAMERA_INFO, replaced.message)

    def _retry_pair_awaiting_camera_info(self) -> None:
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
            if exc.reason == REJECT_NO_CAMERA_INFO and time.monotonic() < waiting.deadline_s:
                with self._lock:
                    if self._awaiting_camera_info is None:   # else a newer pair took the slot: this one goes
                        self._awaiting_camera_info = waiting
                        return
            self._reject(exc.reason, str(exc))
            return
        self._submit(prepared)

    def _submit(self, prepared: PreparedPair) -> None:
        """Hand a checked pair to the worker (it replaces a still pending one), or count it when not active."""
        worker = self._worker
        if worker is None or not self._processing:
            self._count('pairs_discarded_inactive')
            return
        with self._lock:
            self._last_accepted_stamp_ns = prepared.stamp_ns
            held = self._awaiting_camera_info
            if held is not None and held.pair.stamp_ns < prepared.stamp_ns:
                self._awaiting_camera_info = None   # overtaken by a newer pair: it would be stale now
            else:
                held = None
        if held is not None:
            self._reject(REJECT_NO_CAMERA_INFO, held.message)
        try:
            worker.submit(prepared)  # replaces a still pending pair (counted in statistics()['worker'])
        except RuntimeError:     # stopped by a concurrent cleanup
            self._count('pairs_discarded_inactive')

    def _check_stamp(self, stamp_ns: int, cfg: NodeConfig) -> None:
        """Raise :class:`InputRejected` for a pair not newer than the last accepted one, or older than
        ``max_input_age_s``."""
        stamp_text = _stamp_text(stamp_ns)
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

    def _prepare_pair(self, pair: StereoPair[ReceivedImage], settings: ParameterSnapshot) -> PreparedPair:
        """Check a synchronised pair (stamp, encodings, data, sizes) and convert it for the network, without its
        calibration (:meth:`_calibrated`); raises :class:`InputRejected`."""
        cfg = settings.node
        stamp_ns = pair.stamp_ns
        stamp_text = _stamp_text(stamp_ns)
        self._check_stamp(stamp_ns, cfg)
        left_msg, right_msg = pair.left.msg, pair.right.msg
        arrays = {side: self._decode(side, msg, stamp_text) for side, msg in (('left', left_msg),
                                                                                ('right', right_msg))}
        reconstructor = self._reconstructor
        resolution = reconstructor.config.resolution if reconstructor is not None else settings.pipeline.resolution
        for side, array in arrays.items():
            problem = model_input_problem(array.shape[1], array.shape[0], resolution)
            if problem is not None:
                raise InputRejected(REJECT_IMAGE_DATA, f'{side} image at {stamp_text}: {problem}: dropped')
        (left_h, left_w), (right_h, right_w) = arrays['left'].shape[:2], arrays['right'].shape[:2]
        if arrays['left'].shape != arrays['right'].shape:
            raise InputRejected(REJECT_SIZE_MISMATCH, f'pair at {stamp_text}: left image is {left_w}x{left_h}, right '
                                f'image {right_w}x{right_h}; both must have the same size: dropped')
        left_frame = cfg.left_frame_id or left_msg.header.frame_id or self._default_frame('left', DEFAULT_LEFT_FRAME)
        right_frame = cfg.right_frame_id or right_msg.header.frame_id or \
            self._default_frame('right', DEFAULT_RIGHT_FRAME)
        return PreparedPair(stamp_ns=stamp_ns, left_rgb=arrays['left'], right_rgb=arrays['right'],
                            calibration=None, left_frame=left_frame, right_frame=right_frame,
                            received_s=max(pair.left.received_s, pair.right.received_s), settings=settings)

    def _calibrated(self, checked: PreparedPair) -> PreparedPair:
        """``checked`` with the calibration of its CameraInfo when ``use_camera_info`` (else as it is); raises
        :class:`InputRejected` (missing or unusable CameraInfo)."""
        cfg = checked.settings.node
        if not cfg.use_camera_info:
            return checked
        height, width = checked.left_rgb.shape[:2]
        return dataclasses.replace(checked, calibration=self._calibration(checked.stamp_ns, (width, height), cfg))

    @staticmethod
    def _decode(side: str, msg: Image | CompressedImage, stamp_text: str) -> np.ndarray:
        """(H, W, 3) uint8 RGB of a raw or compressed image; raises :class:`InputRejected`."""
        if isinstance(msg, CompressedImage):
            try:
                return conversions.compressed_image_to_numpy(msg)
            except conversions.ImageConversionError as exc:
                raise InputRejected(REJECT_IMAGE_DATA, f'{side} compressed image ({msg.format!r}) at {stamp_text}: '
                                    f'{exc}: dropped') from exc
        if msg.encoding not in conversions.SUPPORTED_IMAGE_ENCODINGS:
            raise InputRejected(REJECT_ENCODING, f'{side} image at {stamp_text} has encoding {msg.encoding!r}; '
                                f'lsm_node takes {", ".join(conversions.SUPPORTED_IMAGE_ENCODINGS)}: dropped')
        try:
            return conversions.image_to_numpy(msg)
        except conversions.ImageConversionError as exc:
            raise InputRejected(REJECT_IMAGE_DATA, f'{side} image at {stamp_text}: {exc}: dropped') from exc

    def _calibration(self, stamp_ns: int, size: tuple[int, int], cfg: NodeConfig) -> CameraCalibration:
        """The pair's calibration from the CameraInfo of its stamp; ``size``: the images' (width, height)."""
        stamp_text = _stamp_text(stamp_ns)
        tolerance_ns = round(cfg.camera_info_tolerance_s * 1e9)
        cache = self._camera_infos
        infos = {}
        for side, topic in (('left', LEFT_INFO_TOPIC), ('right', RIGHT_INFO_TOPIC)):
            info = cache.lookup(side, stamp_ns, tolerance_ns) if cache is not None else None
            if info is None:
                raise InputRejected(REJECT_NO_CAMERA_INFO, (
                    f'no CameraInfo on {self.resolve_topic_name(topic)} within camera_info_tolerance_s = '
                    f'{cfg.camera_info_tolerance_s} s of the pair at {stamp_text}: dropped. Publish it, or set '
                    'use_camera_info:=false to estimate the intrinsics from the images (no metric scale).'))
            infos[side] = info
        try:
            calibration = calibration_from_camera_infos(infos['left'], infos['right'], size)
        except ValueError as exc:  # CameraInfoError, or CameraCalibration's own checks
            raise InputRejected(REJECT_BAD_CAMERA_INFO, f'pair at {stamp_text}: unusable CameraInfo: {exc}. Fix the '
                                'calibration or set use_camera_info:=false: dropped') from exc
        if calibration.baseline_m is None:
            kind, seen = no_baseline_reason(infos['right'])
            self._info_once(f'no_baseline_{kind}', f'{seen}: products are in model units, not metres')
        return calibration

    def _default_frame(self, side: str, frame: str) -> str:
        self._info_once(f'frame_{side}', f'{side} image has no frame_id and {side}_frame_id is empty: using {frame!r}')
        return frame

    # ------------------------------------------------------------------------------------------ output
    def _process_pair(self, pair: PreparedPair) -> None:
        """Worker thread: reconstruct one pair with its parameter snapshot and publish its products. A failed
        inference drops the pair (counted by reason; a burst of failures is logged once)."""
        with self._lock:
            processing = self._processing
            if not processing:
                self._counts['pairs_discarded_inactive'] += 1
        reconstructor = self._reconstructor
        if not processing or reconstructor is None:
            return
        self._torch_threads.use()
        out_of_memory = False
        try:
            with self._pipeline_config(reconstructor, pair.settings.pipeline):
                result = reconstructor.reconstruct(pair.left_rgb, pair.right_rgb, pair.calibration)
        except OUT_OF_MEMORY_ERRORS as exc:
            self._inference_failed(pair, REJECT_OUT_OF_MEMORY, exc)
            out_of_memory = True
        except Exception as exc:  # noqa: BLE001 - one failed pair must not stop the node
            self._inference_failed(pair, REJECT_RECONSTRUCTION, exc)
            return
        if out_of_memory:   # outside the except block: its traceback no longer holds the failed forward's tensors
            release_cached_memory(reconstructor.device)
            return
        self._inference_succeeded()
        self._publish_reconstruction(pair, result, reconstructor)

    def _inference_failed(self, pair: PreparedPair, reason: str, exc: BaseException) -> None:
        """Count a failed pair; log only the first failure of a burst (error level)."""
        with self._lock:
            self._rejected[reason] += 1
            self._failure_burst += 1
            first = self._failure_burst == 1
        if first:
            kind = 'ran out of memory' if reason == REJECT_OUT_OF_MEMORY else 'failed'
            self.get_logger().error(
                f'reconstruction of the pair at {pair.stamp_ns * 1e-9:.6f} s {kind}: {type(exc).__name__}: {exc}. '
                f'The pair is dropped ({reason}); further failures are counted, not logged, until a pair succeeds; '
                '~/query and ~/render answer from the last good reconstruction')

    def _inference_succeeded(self) -> None:
        """End a burst of failures (one info line saying how many pairs it dropped)."""
        with self._lock:
            failed, self._failure_burst = self._failure_burst, 0
        if failed:
            self.get_logger().info(f'recovered after {failed} failed pair{"s" if failed != 1 else ""}')

    def _publish_reconstruction(self, pair: PreparedPair, result: Reconstruction,
                                reconstructor: Reconstructor) -> None:
        """Publish every product of ``result`` stamped with the pair's stamp, with the pair's parameters."""
        cfg = pair.settings.node
        stamp = conversions.nanoseconds_to_stamp(pair.stamp_ns)

        def left_header() -> Header:
            return conversions.make_header(stamp, pair.left_frame)

        def right_header() -> Header:
            return conversions.make_header(stamp, pair.right_frame)

        labelled = self._label(pair, result, cfg.labels, reconstructor) if reconstructor.semantic else None
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
                if 'midway' in cfg.render_views and reconstructor.semantic:
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
        self._latency_monitor.record(max(latency_s, 0.0))
        scale = diagnostics.SCALE_METRIC if result.metric_scale else diagnostics.SCALE_MODEL_UNITS
        with self._lock:
            self._counts['processed'] += 1
            self._last_scale = (scale, result.scale_source, baseline or None)
        if cfg.render_views and result.gaussians is not None:
            self._publish_render_views(pair, result, cfg.render_views, reconstructor)

    def _publish_render_views(self, pair: PreparedPair, result: Reconstruction, views: tuple[str, ...],
                              reconstructor: Reconstructor) -> None:
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
            camera, frame = render_view_camera(view, result, pair.left_frame, pair.right_frame)
            try:
                rendered = reconstructor.render(result, camera.T_left_camera, camera.K,
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

    def _label(self, pair: PreparedPair, result: Reconstruction, labels: tuple[str, ...],
               reconstructor: Reconstructor) -> QueryResult | None:
        """The active label set's answer on both views; None (warned) when the query fails."""
        try:
            return reconstructor.query(result, labels, views=(0, 1))
        except Exception as exc:  # noqa: BLE001 - the geometry products are still published
            self._count('labelling_failures')
            self._warnings.warning('labelling_failed', f'labelling the pair at {pair.stamp_ns * 1e-9:.6f} s with '
                                   f'{list(labels)} failed ({type(exc).__name__}: {exc}): semantic products and '
                                   'the label field not published')
            return None

    def _publish_tf(self, transforms: list[tuple[np.ndarray, str]], header: Header) -> None:
        """Broadcast ``(T_left_child, child frame)`` transforms from the left frame (the right camera first)."""
        right_frame = transforms[0][1]
        if right_frame == header.frame_id:
            self._warnings.warning('tf_same_frame', f'left and right frames are both {right_frame!r}: set '
                                   'left_frame_id/right_frame_id to publish /tf')
            return
        if self._tf_publisher is None:
            self._tf_publisher = self._create_product_publisher(TFMessage, TF_TOPIC, TF_QOS)
        message = TFMessage(transforms=[conversions.transform_stamped_from_matrix(T, header, child)
                                        for T, child in transforms])
        try:
            self._tf_publisher.publish(message)
        except Exception as exc:  # noqa: BLE001 - rclpy raises RCLError (and others on shutdown)
            self._publish_failed(TF_TOPIC, exc)

    def _publish(self, topic: str, build: Callable[[], Any]) -> None:
        if not self.context.ok():   # shutting down (e.g. a signal): the products of a pair in flight are dropped
            self._count('unpublished_at_shutdown')
            return
        try:
            self._publishers_by_topic[topic].publish(build())
        except Exception as exc:  # noqa: BLE001 - a failed publish must not stop the others
            self._publish_failed(topic, exc)

    def _publish_failed(self, topic: str, exc: Exception) -> None:
        self._count('publish_failures')
        self._warnings.warning(f'publish_{topic}', f'publishing {topic} failed: {type(exc).__name__}: {exc}')

    # ------------------------------------------------------------------------------------------ services
    def _answer_service(self, kind: ServiceKind, response: Any,
                        answer: Callable[[Reconstructor], str]) -> Any:
        """The one wrapper of ~/query and ~/render: count the call, hold the model while ``answer(reconstructor)``
        fills ``response`` (it returns a summary for the message), and turn a refusal (:class:`ServiceRefused`:
        bad request, no reconstruction yet, model unavailable) or a failure into ``success: false`` with the reason,
        counted (``<counter>_refused``, ``<counter>_failed``) and logged; the node goes on."""
        self._count(kind.counter)
        started = time.perf_counter()
        self._torch_threads.use()
        try:
            with self._model_access.use(ServiceRefused):
                reconstructor = self._reconstructor
                if reconstructor is None:
                    raise ServiceRefused('lsm_node is not configured')
                summary = answer(reconstructor)
        except ServiceRefused as exc:
            self._count(f'{kind.counter}_refused')
            self._warnings.warning(f'{kind.noun}_refused', f'{kind.service} refused: {exc}')
            return type(response)(success=False, message=str(exc))
        except Exception as exc:  # noqa: BLE001 - a failed call must not stop the executor
            self._count(f'{kind.counter}_failed')
            self.get_logger().error(f'{kind.service} failed: {type(exc).__name__}: {exc}')
            return type(response)(success=False, message=f'{kind.noun} failed: {type(exc).__name__}: {exc}')
        response.message = f'{summary} in {time.perf_counter() - started:.2f} s'
        return response

    def _latest_reconstruction(self, refused: type[ServiceRefused]) -> LatestReconstruction:
        with self._lock:
            latest = self._latest
        if latest is None:
            raise refused('no reconstruction yet: the first stereo pair is still awaited or being processed')
        return latest

    def _on_query(self, request: TextQuery.Request, response: TextQuery.Response) -> TextQuery.Response:
        """~/query: answer phrases on the latest reconstruction; refusals set success=false and say why."""
        def answer(reconstructor: Reconstructor) -> str:
            phrases, views, threshold = parse_query_request(request, reconstructor,
                                                            self._lsm_params.node_config.labels)
            latest = self._latest_reconstruction(QueryRefused)
            result = query_answer(reconstructor, latest, phrases, views)
            fill_query_response(response, latest, result, threshold, request.label_images)
            return (f'{len(result.phrases)} phrase(s) on the {" and ".join(response.views)} view(s) of the '
                    f'reconstruction at {latest.stamp_ns * 1e-9:.6f} s, threshold {threshold:g},')
        return self._answer_service(QUERY, response, answer)

    def _on_render(self, request: RenderView.Request, response: RenderView.Response) -> RenderView.Response:
        """~/render: render the latest reconstruction from the requested camera; refusals set success=false."""
        def answer(reconstructor: Reconstructor) -> str:
            checked = parse_render_request(request, reconstructor, self._lsm_params.node_config.labels)
            latest = self._latest_reconstruction(RenderRefused)
            camera, rendered = render_request(reconstructor, latest, checked)
            fill_render_response(response, latest, rendered, checked.channels, self._feature_pca)
            return (f'{", ".join(checked.channels)} at {camera.width}x{camera.height} of the reconstruction at '
                    f'{latest.stamp_ns * 1e-9:.6f} s')
        return self._answer_service(RENDER, response, answer)

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
        """Counters: images, pairs, processed, rejected per reason (inference failures included), drops (sync and
        busy worker, of the current configuration), latency; the lifecycle state, out-of-memory failures, images
        received while not active (``inactive_drops``), pairs failed in a row and whether the model is on its
        device (False while unconfigured or offloaded). Never waits for the inference thread.

        ``rejected`` counts pairs, each once, under the first reason found. ``stale_stamp`` in particular: a pair
        formed but not newer than the last processed one counts 1; images the synchronizer drops as late (stamp
        not newer than the last pair's; each also in ``sync_drops['late']``) count 1 per late pair, the first
        image of it (its partner, the other side's late image within the sync tolerance, is not counted again),
        and 1 for a lone late image. ``counts['diagnostics_failures']``: /diagnostics reports that failed."""
        with self._lock:
            counts, rejected = dict(self._counts), dict(self._rejected)
            inactive_drops, failure_burst = self._inactive_drops, self._failure_burst
        latency = self._latency_monitor.stats()
        synchronizer, worker = self._synchronizer, self._worker
        return dict(counts=counts, rejected=rejected,
                    sync_drops=synchronizer.drop_counts if synchronizer is not None else dict.fromkeys(
                        SYNC_DROP_REASONS, 0),
                    worker=worker.stats() if worker is not None else dict(
                        submitted=0, processed=0, dropped=0, failed=0, discarded_on_stop=0),
                    worker_running=worker is not None and worker.running,
                    median_latency_s=latency.median_s,
                    lifecycle_state=self.lifecycle_state,
                    out_of_memory=rejected.get(REJECT_OUT_OF_MEMORY, 0),
                    inactive_drops=inactive_drops,
                    failed_pairs_in_a_row=failure_burst,
                    model_on_device=self._reconstructor is not None and not self._offloaded)

    # ------------------------------------------------------------------------------------------ diagnostics
    @property
    def diagnostics_name(self) -> str:
        """Prefix of the /diagnostics status names: the fully qualified node name without the leading slash
        ('lsm/lsm_node'; 'lsm_node' in the root namespace), so that several lsm_nodes stay apart."""
        return self.get_fully_qualified_name().lstrip('/')

    def health(self, now_s: float | None = None) -> NodeHealth:
        """The node's health now (what /diagnostics reports), from :meth:`statistics`, the input and latency
        monitors and the model; ``now_s``: monotonic time (default now). Takes the node's lock briefly and never
        waits for the inference thread."""
        now = time.monotonic() if now_s is None else now_s
        statistics = self.statistics()
        cfg = self._lsm_params.node_config
        with self._lock:
            model_state, model_error, loading = self._model_state, self._model_error, self._loading_weights
            scale, scale_source, baseline_m = self._last_scale
        reconstructor = self._reconstructor
        if reconstructor is not None:
            weights, trained, device = reconstructor.weights, reconstructor.trained_weights, str(reconstructor.device)
        else:
            weights, trained, device = loading, None, ''
        images = self.input_image_topic_names()
        return diagnostics.health_from_statistics(
            statistics, time_s=now, monitor=self._topic_monitor, latency=self._latency_monitor,
            image_topics=(images['left'], images['right']) if len(images) == 2 else None,
            node_name=self.diagnostics_name, model_state=model_state, model_error=model_error, weights=weights,
            trained_weights=trained, device=device, memory=diagnostics.memory_stats(device),
            sync_tolerance_s=cfg.sync_tolerance_s if cfg.approximate_sync else 0.0,
            scale=scale, scale_source=scale_source, baseline_m=baseline_m)

    def publish_diagnostics(self) -> DiagnosticArray:
        """Build and publish one /diagnostics report (the statuses of :meth:`health`, against the last report);
        returns it. Raises what building or publishing raises (the timer counts and logs it)."""
        health = self.health()
        array = diagnostics.build_diagnostic_array(health, previous=self._previous_health,
                                                   thresholds=self.diagnostic_thresholds,
                                                   stamp=self.get_clock().now().to_msg())
        self._diagnostics_publisher.publish(array)
        self._previous_health = health
        return array

    def _on_diagnostics_timer(self) -> None:
        """Timer callback: expire a pair held for its CameraInfo, publish a report; never raises (a failure is
        counted and logged, rate-limited)."""
        try:
            self._retry_pair_awaiting_camera_info()
            self.publish_diagnostics()
        except Exception as exc:  # noqa: BLE001 - the health report must not take the executor down
            try:
                self._count('diagnostics_failures')
                self._warnings.warning('diagnostics_failed', f'/diagnostics report failed: {type(exc).__name__}: '
                                       f'{exc}')
            except Exception:  # noqa: BLE001 - e.g. the logger is gone during shutdown: nothing more to do
                return

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until the worker has nothing pending or running (for tests and the demo)."""
        worker = self._worker
        return True if worker is None else worker.wait_idle(timeout_s)

    def destroy_node(self) -> None:
        """Release everything (the worker stops after its current pair, at most 30 s) and destroy the node."""
        if hasattr(self, '_model_access'):   # absent when the set-up failed early
            try:
                self._release_all(drop_injected=True)
            except Exception as exc:  # noqa: BLE001 - the node is destroyed anyway
                self.get_logger().error(f'releasing lsm_node failed: {type(exc).__name__}: {exc}')
        super().destroy_node()


def _stamp_text(stamp_ns: int) -> str:
    """A stamp in log messages: seconds with 6 decimals."""
    return f'{stamp_ns * 1e-9:.6f} s'


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f'signal {signum}')


def main(args: list[str] | None = None) -> int:
    """Entry point of ``lsm_node`` (``ros2 run lsm_ros lsm_node --ros-args --params-file config/lsm.yaml``).

    Network: the environment is respected; only when ROS_AUTOMATIC_DISCOVERY_RANGE is unset does the node stay
    on localhost (see :func:`lsm_ros.ros.isolation.apply_node_environment_defaults`). With ``managed:=true`` the
    node waits for lifecycle transitions.
    """
    logging.basicConfig(level=logging.INFO, format='[%(levelname)s] [%(name)s]: %(message)s')
    apply_node_environment_defaults()
    # Our own signal handling: SIGINT/SIGTERM end spin() with KeyboardInterrupt while the Context is still valid,
    # so the inference thread finishes (and publishes) its pair before the node and the Context go. rclpy's
    # handlers would shut the Context down first and the pair in flight would fail to publish.
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    node = None
    # Image callbacks, a query, a render and /diagnostics at once. rclpy 9.1's stock MultiThreadedExecutor can
    # fall into a busy loop that starves the inference thread for 10-16 s under a 30 Hz stream (ros2/rclpy#1452);
    # the steady one hands each task to its pool once.
    executor = SteadyMultiThreadedExecutor(num_threads=4)
    try:
        node = LsmNode()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception as exc:  # noqa: BLE001 - a clear message instead of a traceback for set-up errors
        logging.getLogger(NODE_NAME).error('lsm_node stopped: %s: %s', type(exc).__name__, exc)
        return 1
    finally:
        if node is not None:
            executor.remove_node(node)
            executor.wait_for_pool(5.0)   # callbacks still running end before their node goes
        executor.shutdown(timeout_sec=5.0)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
