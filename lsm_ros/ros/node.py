"""``lsm_node``: a stereo / camera pair in, DUSt3R geometry out (point cloud, depth, relative pose; with the
semantic model labels, ~/query and ~/render). A managed node (``rclpy.lifecycle``) that wires parts, each owning one
job and each tested alone:

- :mod:`~lsm_ros.ros.inputs`: subscriptions, stereo sync, checks (:mod:`~lsm_ros.ros.input_checks`,
  :mod:`~lsm_ros.ros.calibration`) and the CameraInfo wait, producing checked pairs;
- :mod:`~lsm_ros.ros.worker`: the latest-pair-wins inference thread, failure and recovery counting;
- :mod:`~lsm_ros.ros.publishers`: the products (points, depth, camera infos, pose, TF, info, semantic, render views);
- :mod:`~lsm_ros.ros.service_host`: ``~/query`` and ``~/render`` (answered by :mod:`~lsm_ros.ros.services`);
- :mod:`~lsm_ros.ros.model_manager`: the model through the life cycle (load, warm-up, offload, release);
- :mod:`~lsm_ros.ros.diagnostics_reporter`: /diagnostics in every lifecycle state (:mod:`~lsm_ros.ros.diagnostics`);
- :mod:`~lsm_ros.ros.params` (parameters, all or nothing), :mod:`~lsm_ros.ros.counters` (shared counters),
  :mod:`~lsm_ros.ros.names` (topics, services, reasons), :mod:`~lsm_ros.ros.node_main` (the process).

This class keeps the life cycle. With ``managed:=false`` (default) the node configures and activates itself in its
constructor; with ``managed:=true`` it starts unconfigured (``ros2 lifecycle set /lsm/lsm_node configure``):

- configure: model, publishers, services, worker thread, subscriptions; a failure (e.g. no checkpoint) is logged,
  reported on /diagnostics (model state failed) and leaves the node unconfigured;
- activate: the model back on its device, one warm-up forward, then processing starts;
- deactivate: processing stops (the pair in flight is finished and published; later images are counted in
  ``statistics()['inactive_drops']``); on CUDA the model moves to the CPU. ~/query and ~/render answer from the last
  reconstruction while the model stays usable (CPU), else they are refused with the reason (activate first);
- cleanup, shutdown and on_error (a transition that raised): everything released, back to unconfigured.

Runtime parameter changes are all or nothing, and every pair is processed with one snapshot of the parameters.
"""
from __future__ import annotations

import functools
import sys
import threading
import time
from typing import Any, Callable

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from std_msgs.msg import Header

from lsm_ros.config import NodeConfig, PipelineConfig
from lsm_ros.pipeline import Reconstruction, Reconstructor
from lsm_ros.ros import diagnostics
from lsm_ros.ros.counters import NodeCounters
from lsm_ros.ros.diagnostics import DiagnosticThresholds, LatencyMonitor, NodeHealth, TopicRateMonitor
from lsm_ros.ros.diagnostics_reporter import DiagnosticsReporter
from lsm_ros.ros.inputs import PreparedPair, StereoInputs
from lsm_ros.ros.model_manager import ModelManager, announce_configuration
from lsm_ros.ros.names import (NODE_NAME, OUTPUT_TOPICS, QUERY_SERVICE, RENDER_SERVICE,
                               SEMANTIC_LABELS_TOPIC, SEMANTIC_TOPICS, render_view_topics)
from lsm_ros.ros.params import AllOrNothingParameters, AllOrNothingParameterService, LsmParameters
from lsm_ros.ros.publishers import ProductPublishers
from lsm_ros.ros.runtime import release_cached_memory
from lsm_ros.ros.service_host import ServiceHost
from lsm_ros.ros.services import LatestReconstruction
from lsm_ros.ros.worker import InferenceWorker

# The node's contract (lsm_ros.ros.names: topics, services, REJECT_* reasons in the docs' order, states) and helpers
# of its parts that callers (tests, the demo, the docs generator) reach through this module.
from lsm_ros.ros.names import *  # noqa: F401,F403,E402
from lsm_ros.ros.calibration import no_baseline_reason  # noqa: F401,E402
from lsm_ros.ros.diagnostics import DIAGNOSTICS_TOPIC  # noqa: F401,E402
from lsm_ros.ros.input_checks import model_input_problem  # noqa: F401,E402
from lsm_ros.ros.model_manager import CHECKPOINT_HELP  # noqa: F401,E402
from lsm_ros.ros.runtime import OUT_OF_MEMORY_ERRORS, warmup_pair  # noqa: F401,E402
from lsm_ros.ros.services import MIDWAY_FRAME_SUFFIX, midway_pose  # noqa: F401,E402

DIAGNOSTICS_WINDOW_S = 5.0       # input rates and stamps of /diagnostics are taken over this sliding window
LATENCY_WINDOW = 100             # /diagnostics latency median and p95 are taken over this many recent pairs
DEACTIVATE_TIMEOUT_S = 120.0     # deactivate waits this long for the pair being reconstructed
STOP_TIMEOUT_S = 30.0            # cleanup/shutdown wait this long for the worker thread to stop
SERVICE_DRAIN_TIMEOUT_S = 60.0   # freeing the model waits this long for ~/query and ~/render calls using it


class TransitionFailed(RuntimeError):
    """A lifecycle transition that cannot complete; the node stays in its previous primary state."""


def _release_memory(device: Any) -> None:
    release_cached_memory(device)   # looked up at each call: tests spy on lsm_ros.ros.node.release_cached_memory


class LsmNode(AllOrNothingParameters, LifecycleNode):
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
        self._latency_monitor = LatencyMonitor(window=LATENCY_WINDOW)
        self._topic_monitor = TopicRateMonitor(window_s=DIAGNOSTICS_WINDOW_S)
        self._processing = False                    # active: pairs are reconstructed
        self._processing_lock = threading.Lock()
        self._transition_error: BaseException | None = None
        self._lsm_params = LsmParameters(self, pipeline_defaults=reconstructor.config if reconstructor else None,
                                         on_change=self._on_config_change)
        params = self._lsm_params
        self._counters = NodeCounters(lambda: self.get_logger(), params.node_config.log_throttle_s)
        self._warnings = self._counters.warnings    # every part warns through it
        self._model = ModelManager(reconstructor, get_logger=lambda: self.get_logger(),
                                   current_pipeline=lambda: params.pipeline, release_memory=_release_memory)
        self._inference = InferenceWorker(
            counters=self._counters, reconstructor=lambda: self._model.reconstructor,
            active=lambda: self._processing, publish=self._on_reconstructed, release_memory=_release_memory,
            use_threads=self._model.torch_threads.use, pipeline_config=self._model.pipeline_config)
        self._inputs = StereoInputs(
            counters=self._counters, topic_monitor=self._topic_monitor, settings=lambda: params.snapshot,
            resolution=self._model.resolution, now_ns=lambda: self.get_clock().now().nanoseconds,
            active=lambda: self._processing, state=lambda: self.lifecycle_state,
            accepting=lambda: self._inference.started and self._processing, submit=self._inference.submit,
            resolve_topic=self.resolve_topic_name)
        self._service_host = ServiceHost(self, self._counters, reconstructor=lambda: self._model.reconstructor,
                                         default_labels=lambda: params.node_config.labels,
                                         use_threads=self._model.torch_threads.use,
                                         query_clustering=lambda: (params.node_config.query_cluster_distance,
                                                                   params.node_config.query_min_cluster_points))
        self._products = ProductPublishers(self, self._counters, self._latency_monitor)
        self._reporter = DiagnosticsReporter(
            self, self._counters, health=lambda: self.health(), stamp=lambda: self.get_clock().now().to_msg(),
            thresholds=thresholds, period_s=params.node_config.diagnostics_period_s,
            before_report=self._inputs.retry_pair_awaiting_camera_info)
        self._diagnostics_timer = self._reporter.timer
        if params.node_config.managed:
            self.get_logger().info(f'lsm_node is managed: unconfigured, waiting for `ros2 lifecycle set '
                                   f'{self.get_fully_qualified_name()} configure` (then activate)')
            return
        for transition in (self.trigger_configure, self.trigger_activate):
            if transition() != TransitionCallbackReturn.SUCCESS:
                raise self._transition_error or RuntimeError(f'lsm_node: {transition.__name__} failed')

    def _set_processing(self, processing: bool) -> None:
        with self._processing_lock:
            self._processing = processing

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
        """Model, publishers, services, worker and subscriptions (all released again on failure)."""
        settings = self._lsm_params.snapshot
        cfg = settings.node
        try:
            reconstructor = self._model.load(settings.pipeline, cfg.torch_threads)
            self._inputs.open(cfg)
            self._products.create(reconstructor.semantic, cfg.render_views)
            self._service_host.create()
            self._inference.start(cfg.log_throttle_s)
            self._inputs.subscribe(self, cfg.image_transport, self._lsm_params.node_config.use_camera_info)
            self._service_host.access.open()
        except BaseException as exc:
            self._release_all()
            self._model.set_state(diagnostics.MODEL_FAILED, error=f'{type(exc).__name__}: {exc}')
            raise
        self._model.set_state(diagnostics.MODEL_READY)
        announce_configuration(self.get_logger(), reconstructor, self._lsm_params.node_config, self._inputs.topics,
                               self.resolve_topic_name(SEMANTIC_LABELS_TOPIC), self.query_service_name(),
                               self.render_service_name())

    def _activate(self, state: LifecycleState) -> None:
        """Model back on its device, one timed warm-up forward, publishers enabled, processing on."""
        failure = self._model.activate(self._configured_reconstructor())
        if failure is not None:
            raise TransitionFailed(failure)
        self._service_host.access.open()
        super().on_activate(state)   # enables the lifecycle publishers
        self._set_processing(True)
        self._publish_label_info()
        self.get_logger().info(f'lsm_node active: reconstructing pairs from {self._inputs.topics["left"]} and '
                               f'{self._inputs.topics["right"]}')

    def _deactivate(self, state: LifecycleState) -> None:
        """Processing off (the pair in flight finishes and is published), publishers disabled, accelerator freed."""
        self._set_processing(False)
        self._counters.forget_once('inactive_images')
        if not self._inference.wait_idle(DEACTIVATE_TIMEOUT_S):
            self._set_processing(True)
            raise TransitionFailed(f'the pair being reconstructed did not finish within {DEACTIVATE_TIMEOUT_S:g} s; '
                                   'still active')
        super().on_deactivate(state)   # disables the lifecycle publishers
        self._inputs.pause()
        reconstructor = self._configured_reconstructor()
        reason = (f'lsm_node is inactive and its model was moved off {reconstructor.device} to free accelerator '
                  f'memory: activate it (ros2 lifecycle set {self.get_fully_qualified_name()} activate) to use '
                  f'{self.query_service_name()} and {self.render_service_name()} again (the last reconstruction is '
                  'kept)')
        self._service_host.close(reason, SERVICE_DRAIN_TIMEOUT_S)
        if self._model.offload(reconstructor):
            self.get_logger().info(f'lsm_node inactive: model moved off {reconstructor.device}, accelerator memory '
                                   'released; ~/query and ~/render refused until activation')
        else:
            self._service_host.access.open()   # on the CPU nothing is freed: the model keeps answering
            self.get_logger().info('lsm_node inactive: images are counted, not processed; ~/query and ~/render '
                                   'answer from the last reconstruction')

    def _release_all(self, drop_injected: bool = False) -> None:
        """Cleanup, shutdown, error recovery and destruction: subscriptions, worker thread, services, publishers,
        the last reconstruction and the model; the torch thread count is restored. Idempotent."""
        self._set_processing(False)
        self._inputs.unsubscribe(self)
        if not self._inference.stop(STOP_TIMEOUT_S):
            self.get_logger().warning(f'the inference thread did not stop within {STOP_TIMEOUT_S:g} s')
        self._service_host.close('lsm_node is not configured: configure and activate it (ros2 lifecycle set '
                                 f'{self.get_fully_qualified_name()} configure)', SERVICE_DRAIN_TIMEOUT_S)
        self._service_host.destroy()
        self._products.destroy()
        self._model.release(drop_injected)
        self._inputs.close()
        self._products.forget()

    def _configured_reconstructor(self) -> Reconstructor:
        reconstructor = self._model.reconstructor
        if reconstructor is None:
            raise TransitionFailed('lsm_node is not configured')
        return reconstructor

    def _on_reconstructed(self, pair: PreparedPair, result: Reconstruction, reconstructor: Reconstructor) -> None:
        """Worker thread: label a good reconstruction, keep it for the services, publish its products."""
        labelled = self._products.label(pair, result, reconstructor) if reconstructor.semantic else None
        self._service_host.keep(LatestReconstruction(result=result, stamp_ns=pair.stamp_ns, left_frame=pair.left_frame,
                                                     right_frame=pair.right_frame, labelled=labelled))
        self._products.publish(pair, result, labelled, reconstructor)

    # ------------------------------------------------------------------------------------------ parameters
    def _on_config_change(self, pipeline: PipelineConfig, node_config: NodeConfig) -> None:
        reconstructor = self._model.apply(pipeline)
        if reconstructor is not None and reconstructor.semantic:
            self._products.create_render_views(node_config.render_views)
        self._warnings.interval_s = node_config.log_throttle_s
        self._inputs.reconfigure(node_config)
        self._reporter.set_period(node_config.diagnostics_period_s)
        if self._processing:
            self._publish_label_info()   # when the label set changed

    def _publish_label_info(self) -> None:
        labels = self._lsm_params.node_config.labels
        self._products.publish_label_info(labels, Header(stamp=self.get_clock().now().to_msg()))

    # ------------------------------------------------------------------------------------------ names
    def output_topic_names(self) -> dict[str, str]:
        """Fully resolved names of the products: {'~/points': '/<ns>/lsm_node/points', ...}; the semantic ones
        only with the semantic model (known once configured, or from the reconstructor given to the constructor)."""
        reconstructor = self.reconstructor
        topics = OUTPUT_TOPICS + (SEMANTIC_TOPICS if reconstructor is not None and reconstructor.semantic else ())
        return {topic: self.resolve_topic_name(topic) for topic in topics}

    def input_image_topic_names(self) -> dict[str, str]:
        """Fully resolved image topics subscribed to, {'left': ..., 'right': ...} (empty while unconfigured)."""
        return {side: topic for side, topic in self._inputs.topics.items() if side in ('left', 'right')}

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

    @property
    def reconstructor(self) -> Reconstructor | None:
        """The model in use once configured, else the one given to the constructor (None: not built yet)."""
        return self._model.model

    @property
    def node_config(self) -> NodeConfig:
        return self._lsm_params.node_config

    # ------------------------------------------------------------------------------------------ health
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
        counts, rejected, inactive_drops = self._counters.snapshot()
        return dict(counts=counts, rejected=rejected, sync_drops=self._inputs.sync_drop_counts(),
                    worker=self._inference.stats(), worker_running=self._inference.running,
                    median_latency_s=self._latency_monitor.stats().median_s, lifecycle_state=self.lifecycle_state,
                    out_of_memory=rejected.get(REJECT_OUT_OF_MEMORY, 0), inactive_drops=inactive_drops,
                    failed_pairs_in_a_row=self._inference.failure_burst, model_on_device=self._model.on_device)

    @property
    def diagnostics_name(self) -> str:
        """Prefix of the /diagnostics status names: the fully qualified node name without the leading slash
        ('lsm/lsm_node'; 'lsm_node' in the root namespace), so that several lsm_nodes stay apart."""
        return self.get_fully_qualified_name().lstrip('/')

    def health(self, now_s: float | None = None) -> NodeHealth:
        """The node's health now (what /diagnostics reports), from :meth:`statistics`, the input and latency
        monitors and the model; ``now_s``: monotonic time (default now). Never waits for the inference thread."""
        now = time.monotonic() if now_s is None else now_s
        statistics = self.statistics()
        cfg = self._lsm_params.node_config
        model_state, model_error, loading = self._model.state()
        scale, scale_source, baseline_m = self._products.last_scale
        reconstructor = self._model.reconstructor
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
        return self._reporter.publish()

    @property
    def diagnostic_thresholds(self) -> DiagnosticThresholds:
        """When a /diagnostics finding becomes a warning or an error."""
        return self._reporter.thresholds

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until the worker has nothing pending or running (for tests and the demo)."""
        return self._inference.wait_idle(timeout_s)

    def destroy_node(self) -> None:
        """Release everything (the worker stops after its current pair, at most 30 s) and destroy the node."""
        if hasattr(self, '_products'):   # absent when the set-up failed early
            try:
                self._release_all(drop_injected=True)
            except Exception as exc:  # noqa: BLE001 - the node is destroyed anyway
                self.get_logger().error(f'releasing lsm_node failed: {type(exc).__name__}: {exc}')
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """Entry point of ``lsm_node`` (``ros2 run lsm_ros lsm_node --ros-args --params-file config/lsm.yaml``): runs
    :class:`LsmNode` until SIGINT/SIGTERM (:func:`lsm_ros.ros.node_main.run`)."""
    from lsm_ros.ros.node_main import run
    return run(LsmNode, args)


if __name__ == '__main__':
    sys.exit(main())
