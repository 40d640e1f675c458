"""The load scenario: ``lsm_node`` under a stereo stream for minutes, its inference slower than the input, while a
client asks ``~/query`` and ``~/render`` about once per second.

One process holds the node, an observer (``~/info`` and ``~/points`` subscriber, TextQuery and RenderView client)
and a :class:`~lsm_ros.ros.graph.RosGraph`; the calibrated stereo pairs of the synthetic rig
(:mod:`lsm_ros.ros.synthetic`, 320x240 rgb8 with CameraInfo) come from a process of its own
(:class:`StereoPublisherProcess`, as a camera driver would), over loopback only (:mod:`lsm_ros.ros.isolation`).
A fixed delay added to every reconstruction (:func:`added_inference_delay`) keeps the node slower than the input,
so its "latest pair wins" path drops pairs throughout.

Measured (:class:`LoadTestResult`): the RSS of the process every few seconds after a warm-up (growth and slope),
publish → ``~/info`` latency of every processed pair (its stamp's age on arrival; the stream stamps each pair with
the wall clock when publishing it), the node's counters (pairs formed, processed, dropped; the most pairs ever
outstanding in its worker), every request and its answer, and how long the process's Python threads waited for
the GIL (:class:`GilProbe`). :meth:`LoadTestResult.failures` checks them against :class:`LoadTestConfig`'s bounds.

Used by ``test/test_load.py`` (``pytest -m load``) and ``scripts/load_test.py``; the bench's ROS mode
(:mod:`lsm_ros.benchmark`) shares the stereo publisher.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lsm_ros.ros.diagnostics import process_rss_bytes
from lsm_ros.ros.graph import RosGraph, remap_arguments, wait_until

_log = logging.getLogger(__name__)

DURATION_VARIABLE = 'LSM_ROS_LOAD_TEST_S'
STREAM_FRAMES = 4                      # synthetic frames, cycled
MB = 1e6
INPUT_TOPICS = ('left/image_rect', 'right/image_rect', 'left/camera_info', 'right/camera_info')


def current_rss_bytes() -> int:
    """Resident memory of this process (:func:`~lsm_ros.ros.diagnostics.process_rss_bytes`); RuntimeError where it
    cannot be read (no /proc/self/statm)."""
    rss = process_rss_bytes()
    if rss is None:
        raise RuntimeError('cannot read the resident memory of this process (/proc/self/statm)')
    return rss


def stereo_input_topics(prefix: str) -> dict[str, str]:
    """The node's inputs (relative names) remapped under ``prefix``: {'left/image_rect': '<prefix>/left/...'}."""
    return {topic: f'{prefix}/{topic}' for topic in INPUT_TOPICS}


def add_remapped_lsm_node(graph: RosGraph, reconstructor: Any, namespace: str, topics: Mapping[str, str]) -> Any:
    """An ``LsmNode`` in ``namespace`` with its inputs remapped to ``topics`` (:func:`stereo_input_topics`),
    spun by ``graph``; it keeps the caller's torch thread count (``torch_threads`` = torch.get_num_threads())."""
    import torch
    from rclpy.parameter import Parameter

    from lsm_ros.ros.node import LsmNode
    return graph.add(LsmNode(reconstructor, context=graph.context, namespace=namespace,
                             cli_args=remap_arguments(topics), use_global_arguments=False,
                             parameter_overrides=[Parameter('torch_threads', value=torch.get_num_threads())]))


# ---------------------------------------------------------------------------------------------- stereo publisher
class StereoStream:
    """Publishes the synthetic rig's stereo frames (images and CameraInfo with the baseline, SensorDataQoS) on
    ``topics`` (:func:`stereo_input_topics`), each pair stamped with the wall clock when it is published."""

    def __init__(self, context: Any, topics: Mapping[str, str], node_name: str = 'lsm_stereo_stream') -> None:
        from rclpy.node import Node
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CameraInfo, Image

        from lsm_ros.ros import conversions
        from lsm_ros.ros.synthetic import LEFT_FRAME, RIGHT_FRAME, StereoRig, render_stereo_frame

        self.node = Node(node_name, context=context)
        types = {'camera_info': CameraInfo, 'image_rect': Image}
        self._publishers = {f'{side}_{kind}': self.node.create_publisher(types[kind], topics[f'{side}/{kind}'],
                                                                         qos_profile_sensor_data)
                            for side in ('left', 'right') for kind in types}
        rig = StereoRig()
        stamp = conversions.nanoseconds_to_stamp(0)
        frames = (('left', LEFT_FRAME), ('right', RIGHT_FRAME))
        self._infos = {side: conversions.model_camera_info(rig.K, rig.width, rig.height,
                                                           conversions.make_header(stamp, frame),
                                                           P=rig.projection(side)) for side, frame in frames}
        self._frames = []
        for index in range(STREAM_FRAMES):
            views = render_stereo_frame(rig, index)
            self._frames.append({side: conversions.rgb_to_image_msg(views[f'{side}_rgb'],
                                                                    conversions.make_header(stamp, frame))
                                 for side, frame in frames})
        self._count = 0
        self._last_stamp_ns = 0

    def connected(self) -> bool:
        """Every input has a subscriber."""
        return all(p.get_subscription_count() > 0 for p in self._publishers.values())

    @staticmethod
    def _stamped(message: Any, stamp_ns: int) -> Any:
        from lsm_ros.ros.conversions import nanoseconds_to_stamp
        message = copy.copy(message)
        message.header = copy.copy(message.header)
        message.header.stamp = nanoseconds_to_stamp(stamp_ns)
        return message

    def publish_infos(self, stamp_ns: int) -> None:
        """Both CameraInfos with ``stamp_ns``."""
        for side in ('left', 'right'):
            self._publishers[f'{side}_camera_info'].publish(self._stamped(self._infos[side], stamp_ns))

    def publish_pair(self) -> tuple[int, float]:
        """CameraInfo, then both images of the next frame, stamped now (strictly increasing); returns
        (stamp_ns, monotonic time just before the images were published)."""
        stamp_ns = max(time.time_ns(), self._last_stamp_ns + 1000)
        self._last_stamp_ns = stamp_ns
        frame = self._frames[self._count % len(self._frames)]
        self._count += 1
        self.publish_infos(stamp_ns)
        sent = time.monotonic()
        for side in ('left', 'right'):
            self._publishers[f'{side}_image_rect'].publish(self._stamped(frame[side], stamp_ns))
        return stamp_ns, sent

    def stream(self, rate_hz: float, duration_s: float) -> dict[int, float]:
        """Publish pairs on a fixed schedule of ``rate_hz`` for ``duration_s``; {stamp_ns: sent time}."""
        sent: dict[int, float] = {}
        period = 1.0 / rate_hz
        start = time.monotonic()
        for tick in range(max(1, round(duration_s * rate_hz))):
            delay = start + tick * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            stamp_ns, sent_s = self.publish_pair()
            sent[stamp_ns] = sent_s
        return sent


def _serve_stereo_stream(connection: Any, topics: Mapping[str, str], node_name: str) -> None:
    """Body of :class:`StereoPublisherProcess`: a :class:`StereoStream` in a graph of its own, answering
    ``(method, args)`` requests with the method's result (or the text of its exception) until ``None``."""
    with RosGraph(name=node_name, num_threads=2) as graph:
        stream = StereoStream(graph.context, topics, node_name)
        graph.add(stream.node)
        for method, args in iter(connection.recv, None):
            try:
                connection.send(getattr(stream, method)(*args))
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
                connection.send(RuntimeError(f'publisher {method}: {type(exc).__name__}: {exc}'))


class StereoPublisherProcess:
    """A :class:`StereoStream` in a child process (spawned; it inherits the loopback-only environment): it shares
    the CPU with the node, not its interpreter. :meth:`call` runs one of its methods there."""

    def __init__(self, topics: Mapping[str, str], node_name: str = 'lsm_stereo_stream') -> None:
        import multiprocessing
        spawn = multiprocessing.get_context('spawn')
        self._connection, child_end = spawn.Pipe()
        self._process = spawn.Process(target=_serve_stereo_stream, args=(child_end, dict(topics), node_name),
                                      name=node_name, daemon=True)
        self._process.start()
        child_end.close()

    @property
    def pid(self) -> int:
        return int(self._process.pid)

    def call(self, method: str, *args: Any, timeout_s: float = 60.0) -> Any:
        """Run ``StereoStream.<method>(*args)`` in the child; its result."""
        self._connection.send((method, args))
        if not self._connection.poll(timeout_s):
            raise RuntimeError(f'the publisher process did not answer {method} within {timeout_s:.0f} s')
        reply = self._connection.recv()
        if isinstance(reply, Exception):
            raise reply
        return reply

    def wait_connected(self, observer_connected: Callable[[], bool], observer: str, timeout_s: float) -> None:
        """Wait until lsm_node subscribes this publisher's topics and ``observer_connected()`` (the ``observer``
        sees lsm_node); RuntimeError after ``timeout_s``."""
        if not wait_until(lambda: self.call('connected') and observer_connected(), timeout_s, poll_s=0.1):
            raise RuntimeError(f'lsm_node, the stereo publisher and {observer} did not discover each other within '
                               f'{timeout_s:.0f} s')

    def publish_warmup_pair(self, lsm_node: Any, arrived: Callable[[int], bool], products: str, timeout_s: float,
                            poll_s: float) -> tuple[int, float]:
        """CameraInfo, then one pair 0.2 s later; wait until ``arrived(stamp)`` (its ``products`` arrived; polled
        every ``poll_s``); RuntimeError with lsm_node's statistics after ``timeout_s``. Returns the pair's
        (stamp, monotonic time sent)."""
        self.call('publish_infos', time.time_ns())
        time.sleep(0.2)                                    # CameraInfo precedes the first images
        stamp_ns, sent = self.call('publish_pair')
        if not wait_until(lambda: arrived(stamp_ns), timeout_s, poll_s=poll_s):
            raise RuntimeError(f'no {products} for the warm-up pair within {timeout_s:.0f} s: '
                               f'{lsm_node.statistics()}')
        return stamp_ns, sent

    def close(self) -> None:
        """Stop the child (asked, then terminated after 10 s)."""
        try:
            self._connection.send(None)
        except OSError:
            pass
        self._process.join(10.0)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5.0)
        self._connection.close()


# ---------------------------------------------------------------------------------------------- measurement
class GilProbe:
    """A thread that sleeps ``period_s`` again and again and records how late it wakes: how long a Python thread
    of this process waits for the GIL (plus scheduling). A busy executor loop shows as lateness of seconds."""

    def __init__(self, period_s: float = 0.01) -> None:
        self.period_s = period_s
        self.lateness_s: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name='lsm_gil_probe', daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            time.sleep(self.period_s)
            self.lateness_s.append(time.monotonic() - start - self.period_s)

    def __enter__(self) -> 'GilProbe':
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def figures(self) -> dict[str, float]:
        """Lateness in ms: median, p99, max, and the count of waits over 100 ms and over 1 s."""
        late = np.asarray(self.lateness_s or [0.0]) * 1e3
        return dict(median_ms=float(np.median(late)), p99_ms=float(np.percentile(late, 99)),
                    max_ms=float(late.max()), over_100ms=int((late > 100).sum()), over_1s=int((late > 1000).sum()))


@contextlib.contextmanager
def reconstruct_hook(reconstructor: Any, before: Callable[[], None]) -> Iterator[None]:
    """Make ``reconstructor.reconstruct`` call ``before()`` first, inside the block: an instance attribute wrapping
    the current ``reconstruct``, removed (or the earlier instance attribute put back) on leaving."""
    reconstruct = reconstructor.reconstruct
    had_own = 'reconstruct' in vars(reconstructor)

    def hooked(*args: Any, **kwargs: Any) -> Any:
        before()
        return reconstruct(*args, **kwargs)

    reconstructor.reconstruct = hooked
    try:
        yield
    finally:
        if had_own:
            reconstructor.reconstruct = reconstruct
        else:
            del reconstructor.reconstruct


@contextlib.contextmanager
def added_inference_delay(reconstructor: Any, delay_s: float) -> Iterator[None]:
    """Make every reconstruction sleep ``delay_s`` first (:func:`reconstruct_hook`): a slower network with the same
    outputs. The sleep releases the GIL, as a GPU or a larger network would."""
    if delay_s <= 0:
        yield
        return
    with reconstruct_hook(reconstructor, lambda: time.sleep(delay_s)):
        yield


def least_squares_slope(times_s: np.ndarray, values: np.ndarray) -> float:
    """Slope of the least-squares line through (t, value), per second (0 for fewer than two points)."""
    if len(times_s) < 2 or np.ptp(times_s) == 0:
        return 0.0
    return float(np.polyfit(times_s, values, 1)[0])


# ---------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class LoadTestConfig:
    """The scenario and its bounds (times in seconds, memory in MB = 10^6 bytes)."""

    duration_s: float = 180.0              # stream length ($LSM_ROS_LOAD_TEST_S in the test)
    rate_hz: float = 30.0                  # stereo pairs per second
    inference_delay_s: float = 0.3         # added to every reconstruction: the node is slower than the input
    request_period_s: float = 1.0          # one ~/query and one ~/render per period
    request_timeout_s: float = 30.0        # an answer later than this is counted lost
    rss_period_s: float = 5.0              # RSS sampling period
    warmup_s: float = 30.0                 # streaming before the RSS baseline (at most a third of the stream)
    max_rss_growth_mb: float = 150.0       # RSS growth after warm-up (a leak of one product per pair exceeds it)
    max_latency_s: float = 10.0            # publish -> ~/info of every processed pair (a backlog exceeds it)
    min_received_fraction: float = 0.8    # pairs the node formed / pairs published
    torch_threads: int | None = 1          # torch threads during the run (None: unchanged); one core left to ROS
    steady_executor: bool = True           # RosGraph's executor (False: rclpy's stock MultiThreadedExecutor)
    namespace: str = 'lsm_load'
    query_phrases: tuple[str, ...] = ('chair', 'floor')
    render_size: tuple[int, int] = (64, 48)
    render_channels: tuple[str, ...] = ('rgb', 'depth')
    setup_timeout_s: float = 300.0         # discovery, warm-up pair, final drain

    @property
    def rss_warmup_s(self) -> float:
        return min(self.warmup_s, self.duration_s / 3.0)

    @classmethod
    def from_environment(cls, **overrides: Any) -> 'LoadTestConfig':
        """The defaults, the stream length from $LSM_ROS_LOAD_TEST_S when set, then ``overrides``."""
        text = os.environ.get(DURATION_VARIABLE, '').strip()
        if text:
            try:
                duration = float(text)
            except ValueError:
                raise ValueError(f'{DURATION_VARIABLE}={text!r}: expected seconds, e.g. 180') from None
            if not duration > 0:
                raise ValueError(f'{DURATION_VARIABLE}={text!r}: must be positive')
            overrides = {'duration_s': duration, **overrides}
        return cls(**overrides)


# ---------------------------------------------------------------------------------------------- results
@dataclass
class RequestLog:
    """The requests of one service: answer times (s) of those answered, failure messages, and the lost ones."""

    sent: int = 0
    succeeded: int = 0
    answer_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lost: int = 0

    def figures(self) -> dict[str, Any]:
        answers = np.asarray(self.answer_s or [np.nan]) * 1e3
        return dict(sent=self.sent, answered=len(self.answer_s), succeeded=self.succeeded, lost=self.lost,
                    failed=len(self.failures), first_failures=self.failures[:5],
                    answer_median_ms=float(np.median(answers)), answer_max_ms=float(np.max(answers)))


@dataclass
class LoadTestResult:
    """What a run measured (see the module docstring); :meth:`figures` are the headline numbers."""

    config: LoadTestConfig
    published: int
    stream_wall_s: float
    latencies_s: list[float]                      # per ~/info of a streamed pair, in arrival order
    points_received: int                          # ~/points clouds of streamed pairs
    rss_samples: list[tuple[float, float]]        # (seconds since the stream started, RSS MB)
    node: dict[str, Any]                          # the node's counters accumulated during the stream
    max_outstanding: int                          # worker: submitted - processed - dropped (running + pending)
    stamps_increasing: bool
    queries: RequestLog
    renders: RequestLog
    gil: dict[str, float]
    requeues_avoided: int | None

    def rss_after_warmup(self) -> tuple[np.ndarray, np.ndarray]:
        """(times s, RSS MB) of the samples taken after the warm-up."""
        samples = np.asarray([s for s in self.rss_samples if s[0] >= self.config.rss_warmup_s] or [(0.0, 0.0)])
        return samples[:, 0], samples[:, 1]

    def rss_growth_mb(self) -> float:
        """Median of the last quarter of the post-warm-up samples minus the median of the first quarter (at least
        three samples each): robust to the allocator's swings of tens of MB between two samples."""
        _, rss = self.rss_after_warmup()
        count = max(3, len(rss) // 4)
        return float(np.median(rss[-count:]) - np.median(rss[:count]))

    def rss_slope_mb_per_min(self) -> float:
        times, rss = self.rss_after_warmup()
        return 60.0 * least_squares_slope(times, rss)

    def figures(self) -> dict[str, Any]:
        counts = self.node.get('counts', {})
        worker = self.node.get('worker', {})
        latency = np.asarray(self.latencies_s or [np.nan])
        times, rss = self.rss_after_warmup()
        return dict(
            duration_s=self.config.duration_s, rate_hz=self.config.rate_hz,
            inference_delay_s=self.config.inference_delay_s, published=self.published,
            stream_rate_hz=self.published / max(self.stream_wall_s, 1e-9),
            pairs_formed=counts.get('pairs', 0), left_images_received=counts.get('left_images', 0),
            received_fraction=counts.get('pairs', 0) / max(self.published, 1),
            processed=counts.get('processed', 0), infos_received=len(self.latencies_s),
            points_received=self.points_received, worker_dropped=worker.get('dropped', 0),
            worker_failed=worker.get('failed', 0), rejected=dict(self.node.get('rejected', {})),
            sync_drops=dict(self.node.get('sync_drops', {})), max_outstanding=self.max_outstanding,
            latency_median_s=float(np.median(latency)), latency_p95_s=float(np.percentile(latency, 95)),
            latency_max_s=float(np.max(latency)), stamps_increasing=self.stamps_increasing,
            rss_first_mb=float(rss[0]), rss_last_mb=float(rss[-1]), rss_peak_mb=float(rss.max()),
            rss_samples_after_warmup=len(times), rss_growth_mb=self.rss_growth_mb(),
            rss_slope_mb_per_min=self.rss_slope_mb_per_min(), queries=self.queries.figures(),
            renders=self.renders.figures(), gil=self.gil, requeues_avoided=self.requeues_avoided,
            steady_executor=self.config.steady_executor)

    def to_dict(self) -> dict[str, Any]:
        """Figures, configuration and the raw series (latencies, RSS samples)."""
        return dict(figures=self.figures(), config=asdict(self.config), latencies_s=self.latencies_s,
                    rss_samples=self.rss_samples, node_statistics=self.node)

    def failures(self) -> list[str]:
        """Every bound of the configuration that the run broke, in words (empty: passed)."""
        cfg, fig = self.config, self.figures()
        problems = []
        if fig['rss_samples_after_warmup'] < 2:
            problems.append(f'only {fig["rss_samples_after_warmup"]} RSS sample(s) after the warm-up')
        if fig['rss_growth_mb'] > cfg.max_rss_growth_mb:
            problems.append(f'RSS grew by {fig["rss_growth_mb"]:.0f} MB after the warm-up (bound '
                            f'{cfg.max_rss_growth_mb:.0f} MB; slope {fig["rss_slope_mb_per_min"]:.1f} MB/min)')
        if fig['processed'] < 2:
            problems.append(f'only {fig["processed"]} pair(s) processed')
        if not self.latencies_s or fig['latency_max_s'] > cfg.max_latency_s:
            problems.append(f'publish -> ~/info latency max {fig["latency_max_s"]:.2f} s over the bound '
                            f'{cfg.max_latency_s:.1f} s (median {fig["latency_median_s"]:.2f} s): a backlog or a stall')
        for topic, received in (('~/info', len(self.latencies_s)), ('~/points', self.points_received)):
            if not fig['processed'] - 1 <= received <= fig['processed']:
                problems.append(f'{fig["processed"]} pairs processed but {received} {topic} received')
        if not self.stamps_increasing:
            problems.append('the processed stamps are not strictly increasing')
        if self.max_outstanding > 2:
            problems.append(f'{self.max_outstanding} pairs outstanding in the worker (at most one running and one '
                            'pending)')
        if fig['worker_dropped'] == 0:
            problems.append('no pair was dropped: the latest-pair-wins path was not exercised')
        if fig['received_fraction'] < cfg.min_received_fraction:
            problems.append(f'the node formed {fig["pairs_formed"]} pairs of {self.published} published '
                            f'({100 * fig["received_fraction"]:.0f} %, bound {100 * cfg.min_received_fraction:.0f} %)')
        for name, log in (('~/query', self.queries), ('~/render', self.renders)):
            if log.sent == 0:
                problems.append(f'no {name} request was sent')
            if log.lost:
                problems.append(f'{log.lost} of {log.sent} {name} requests got no answer within '
                                f'{cfg.request_timeout_s:.0f} s')
            if log.failures:
                problems.append(f'{len(log.failures)} of {log.sent} {name} requests failed: {log.failures[:3]}')
        return problems


def format_figures(figures: Mapping[str, Any]) -> str:
    """The headline figures in a few lines of text."""
    query, render, gil = figures['queries'], figures['renders'], figures['gil']
    return '\n'.join([
        f'stream: {figures["published"]} pairs at {figures["stream_rate_hz"]:.1f} Hz for {figures["duration_s"]:g} s'
        f', inference + {figures["inference_delay_s"]:g} s; node formed {figures["pairs_formed"]} pairs '
        f'({100 * figures["received_fraction"]:.1f} %), processed {figures["processed"]}, dropped '
        f'{figures["worker_dropped"]} (latest pair wins), rejected {sum(figures["rejected"].values())}, '
        f'most outstanding {figures["max_outstanding"]}; received {figures["infos_received"]} ~/info, '
        f'{figures["points_received"]} ~/points',
        f'latency publish -> ~/info: median {figures["latency_median_s"]:.2f} s, p95 {figures["latency_p95_s"]:.2f} s'
        f', max {figures["latency_max_s"]:.2f} s',
        f'RSS after warm-up: {figures["rss_first_mb"]:.0f} -> {figures["rss_last_mb"]:.0f} MB (peak '
        f'{figures["rss_peak_mb"]:.0f}), growth {figures["rss_growth_mb"]:+.1f} MB, slope '
        f'{figures["rss_slope_mb_per_min"]:+.2f} MB/min over {figures["rss_samples_after_warmup"]} samples',
        f'~/query: {query["sent"]} sent, {query["succeeded"]} succeeded, {query["failed"]} failed, {query["lost"]} '
        f'lost, answer median {query["answer_median_ms"]:.0f} ms / max {query["answer_max_ms"]:.0f} ms; ~/render: '
        f'{render["sent"]} sent, {render["succeeded"]} succeeded, {render["failed"]} failed, {render["lost"]} lost, '
        f'answer median {render["answer_median_ms"]:.0f} ms / max {render["answer_max_ms"]:.0f} ms',
        f'GIL wait (10 ms sleeper): median {gil["median_ms"]:.1f} ms, p99 {gil["p99_ms"]:.1f} ms, max '
        f'{gil["max_ms"]:.0f} ms, {gil["over_1s"]} over 1 s; executor '
        f'{"steady" if figures["steady_executor"] else "rclpy stock"}'
        + ('' if figures['requeues_avoided'] is None else f' ({figures["requeues_avoided"]} re-queues avoided)')])


# ---------------------------------------------------------------------------------------------- the scenario
class _Observer:
    """Subscribes to ``~/info`` and ``~/points``; the age of each ~/info stamp on arrival; the service clients."""

    def __init__(self, context: Any, lsm_node: Any) -> None:
        from rclpy.node import Node
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import PointCloud2

        from lsm_ros.msg import ReconstructionInfo
        from lsm_ros.ros import node as lsm
        from lsm_ros.srv import RenderView, TextQuery

        self.node = Node('lsm_load_observer', context=context)
        self.topics = {key: lsm_node.output_topic_names()[key] for key in (lsm.INFO_TOPIC, lsm.POINTS_TOPIC)}
        self._lock = threading.Lock()
        self.info_ages: list[tuple[int, float]] = []       # (stamp_ns, seconds between stamp and arrival)
        self.points_stamps: list[int] = []
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(ReconstructionInfo, self.topics[lsm.INFO_TOPIC], self._on_info, qos)
        self.node.create_subscription(PointCloud2, self.topics[lsm.POINTS_TOPIC], self._on_points, qos)
        self.query_client = self.node.create_client(TextQuery, lsm_node.query_service_name())
        self.render_client = self.node.create_client(RenderView, lsm_node.render_service_name())

    def _on_info(self, msg: Any) -> None:
        from lsm_ros.ros.conversions import stamp_to_nanoseconds
        stamp_ns = stamp_to_nanoseconds(msg.header.stamp)
        age_s = (time.time_ns() - stamp_ns) * 1e-9
        with self._lock:
            self.info_ages.append((stamp_ns, age_s))

    def _on_points(self, msg: Any) -> None:
        from lsm_ros.ros.conversions import stamp_to_nanoseconds
        stamp_ns = stamp_to_nanoseconds(msg.header.stamp)
        with self._lock:
            self.points_stamps.append(stamp_ns)

    def has_info(self, stamp_ns: int) -> bool:
        with self._lock:
            return any(stamp == stamp_ns for stamp, _ in self.info_ages)

    def ages_since(self, first_stamp_ns: int) -> list[tuple[int, float]]:
        with self._lock:
            return [(stamp, age) for stamp, age in self.info_ages if stamp >= first_stamp_ns]

    def points_since(self, first_stamp_ns: int) -> int:
        with self._lock:
            return sum(stamp >= first_stamp_ns for stamp in self.points_stamps)

    def connected(self) -> bool:
        return (all(self.node.count_publishers(topic) > 0 for topic in self.topics.values())
                and self.query_client.service_is_ready() and self.render_client.service_is_ready())


def _ask(client: Any, request: Any, log: RequestLog, timeout_s: float) -> None:
    """Send ``request``, wait for the answer and record it in ``log``."""
    done = threading.Event()
    log.sent += 1
    started = time.monotonic()
    future = client.call_async(request)
    future.add_done_callback(lambda _: done.set())
    if not done.wait(timeout_s):
        client.remove_pending_request(future)
        log.lost += 1
        return
    log.answer_s.append(time.monotonic() - started)
    response = future.result()
    if response is not None and response.success:
        log.succeeded += 1
    else:
        log.failures.append(getattr(response, 'message', 'no response'))


def _outstanding(statistics: Mapping[str, Any]) -> int:
    worker = statistics['worker']
    return int(worker['submitted'] - worker['processed'] - worker['dropped'] - worker.get('discarded_on_stop', 0))


def statistics_difference(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """The node's counters accumulated between two :meth:`LsmNode.statistics` snapshots (nested dicts)."""
    def difference(old: Any, new: Any) -> Any:
        if isinstance(new, Mapping):
            old = old if isinstance(old, Mapping) else {}
            return {key: difference(old.get(key), value) for key, value in new.items()}
        if isinstance(new, (int, float)) and not isinstance(new, bool) and isinstance(old, (int, float)):
            return new - old
        return new
    statistics = difference(before, after)
    statistics['median_latency_s'] = after.get('median_latency_s')   # a median, not a counter
    return statistics


@dataclass
class _StreamRecord:
    """What :func:`_stream` measured."""

    first_stamp_ns: int
    published: int
    wall_s: float
    rss_samples: list[tuple[float, float]]
    max_outstanding: int
    queries: RequestLog
    renders: RequestLog
    gil: dict[str, float]


def run_load_test(reconstructor: Any, config: LoadTestConfig = LoadTestConfig()) -> LoadTestResult:
    """Run the scenario (module docstring) with ``reconstructor`` (the semantic model: ~/query and ~/render need
    its Gaussians) and return what it measured. Keeps DDS on loopback (an explicitly set ROS_DOMAIN_ID is kept).
    Raises RuntimeError when the graph cannot be set up (discovery, no products for the warm-up pair)."""
    if not reconstructor.semantic:
        raise ValueError('the load test needs the semantic model (~/query and ~/render)')
    if config.duration_s <= 0 or config.rate_hz <= 0 or config.request_period_s <= 0:
        raise ValueError(f'duration, rate and request period must be positive: {config}')
    from lsm_ros.ros.isolation import apply_reserved_localhost_environment
    environment = apply_reserved_localhost_environment()
    import torch
    threads = torch.get_num_threads()
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    try:
        with added_inference_delay(reconstructor, config.inference_delay_s):
            return _run(reconstructor, config, environment)
    finally:
        torch.set_num_threads(threads)


def _run(reconstructor: Any, config: LoadTestConfig, environment: Mapping[str, str]) -> LoadTestResult:
    topics = stereo_input_topics(f'/{config.namespace}/stereo')
    publisher: StereoPublisherProcess | None = None
    with RosGraph(name='lsm_load', steady=config.steady_executor) as graph:
        try:
            lsm_node = add_remapped_lsm_node(graph, reconstructor, config.namespace, topics)
            observer = _Observer(graph.context, lsm_node)
            graph.add(observer.node)
            publisher = StereoPublisherProcess(topics, 'lsm_load_stereo_stream')
            publisher.wait_connected(observer.connected, 'the observer', 60.0)
            _log.info('load test: ROS_DOMAIN_ID=%s (localhost only), warm-up pair', environment['ROS_DOMAIN_ID'])
            publisher.publish_warmup_pair(lsm_node, observer.has_info, '~/info', config.setup_timeout_s, poll_s=0.05)
            lsm_node.wait_idle(config.setup_timeout_s)
            before = lsm_node.statistics()
            record = _stream(config, lsm_node, observer, publisher)
            lsm_node.wait_idle(config.setup_timeout_s)
            time.sleep(0.5)                                    # the last ~/info arrives
            after = lsm_node.statistics()
        finally:
            if publisher is not None:
                publisher.close()
        requeues = getattr(graph.executor, 'requeues_avoided', None)
    ages = observer.ages_since(record.first_stamp_ns)
    stamps = [stamp for stamp, _ in ages]
    return LoadTestResult(
        config=config, published=record.published, stream_wall_s=record.wall_s, latencies_s=[age for _, age in ages],
        points_received=observer.points_since(record.first_stamp_ns),
        rss_samples=record.rss_samples, node=statistics_difference(before, after),
        max_outstanding=record.max_outstanding, stamps_increasing=all(b > a for a, b in zip(stamps, stamps[1:])),
        queries=record.queries, renders=record.renders, gil=record.gil, requeues_avoided=requeues)


def _stream(config: LoadTestConfig, lsm_node: Any, observer: _Observer,
            publisher: StereoPublisherProcess) -> _StreamRecord:
    """Stream for ``config.duration_s`` from a thread while this one asks ~/query and ~/render once per period and
    samples the RSS and the worker's outstanding pairs."""
    from geometry_msgs.msg import Pose

    from lsm_ros.srv import RenderView, TextQuery
    queries, renders = RequestLog(), RequestLog()
    query = TextQuery.Request(phrases=list(config.query_phrases))
    render = RenderView.Request(pose=Pose(), width=config.render_size[0], height=config.render_size[1],
                                channels=list(config.render_channels))
    outcome: dict[str, Any] = {}

    def stream() -> None:
        try:
            outcome['sent'] = publisher.call('stream', config.rate_hz, config.duration_s,
                                             timeout_s=config.duration_s + 120.0)
        except Exception as exc:  # noqa: BLE001 - re-raised below
            outcome['error'] = exc

    _log.info('load test: streaming at %.1f Hz for %.0f s, inference + %.2f s, ~/query and ~/render every %.1f s',
              config.rate_hz, config.duration_s, config.inference_delay_s, config.request_period_s)
    publisher.call('publish_infos', time.time_ns())
    time.sleep(0.1)                                            # fresh CameraInfo before the stream's first images
    first_stamp_ns = time.time_ns()                            # every streamed pair is stamped later
    streamer = threading.Thread(target=stream, name='lsm_load_stream', daemon=True)
    rss_samples: list[tuple[float, float]] = []
    max_outstanding = 0
    with GilProbe() as probe:
        start = time.monotonic()
        streamer.start()
        next_request, next_sample, next_log = start, start, start + 30.0
        while streamer.is_alive():
            now = time.monotonic()
            if now >= next_sample:
                rss_samples.append((now - start, current_rss_bytes() / MB))
                next_sample += config.rss_period_s
            max_outstanding = max(max_outstanding, _outstanding(lsm_node.statistics()))
            if now >= next_request:
                _ask(observer.query_client, query, queries, config.request_timeout_s)
                _ask(observer.render_client, render, renders, config.request_timeout_s)
                next_request += config.request_period_s
            if now >= next_log:
                _log.info('load test: %.0f s, %d pairs processed, RSS %.0f MB, %d/%d queries/renders answered',
                          now - start, lsm_node.statistics()['counts'].get('processed', 0), rss_samples[-1][1],
                          len(queries.answer_s), len(renders.answer_s))
                next_log += 30.0
            time.sleep(min(0.05, max(0.0, min(next_request, next_sample) - time.monotonic())))
        wall_s = time.monotonic() - start
        rss_samples.append((wall_s, current_rss_bytes() / MB))
    streamer.join()
    if 'error' in outcome:
        raise outcome['error']
    return _StreamRecord(first_stamp_ns=first_stamp_ns, published=len(outcome['sent']), wall_s=wall_s,
                         rss_samples=rss_samples, max_outstanding=max_outstanding, queries=queries,
                         renders=renders, gil=probe.figures())
