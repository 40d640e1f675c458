"""lsm_node's /diagnostics over loopback: the real node (tiny untrained reconstructors), a stereo stream from the
bag's frames, and a subscriber on /diagnostics.

While a stream flows every status is OK with the published rates, the latency and the processed pairs; when it
stops the inputs warn, then go STALE; bad input shows up as rejection reasons; the report never waits for the
inference thread and survives its own failures; its period is a runtime parameter; a managed node reports its model
state before configure, while loading, after configure/activate, and a configure that failed.
"""
from __future__ import annotations

import copy
import dataclasses
import threading
import time
from typing import Any, Callable, Iterator

import pytest
from conftest import STEREO_REMAPS, NodeHarness, StereoPublisher, make_lsm_node, wait_until
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.clock import ClockType
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy

from lsm_ros.ros import diagnostics as diag
from lsm_ros.ros import node as lsm

pytestmark = pytest.mark.timeout(60)

PERIOD_S = 0.5                     # diagnostics_period_s of the nodes under test
STALE_AFTER_S = 1.0                # DiagnosticThresholds.stale_after_s of the nodes under test
STREAM_HZ = 5.0
REPORT_TIMEOUT_S = 20.0            # generous: the 2-core machine may be shared
LEFT, RIGHT = STEREO_REMAPS['left/image_rect'], STEREO_REMAPS['right/image_rect']
LEFT_INFO, RIGHT_INFO = STEREO_REMAPS['left/camera_info'], STEREO_REMAPS['right/camera_info']
Report = dict[str, DiagnosticStatus]       # one node's statuses of one DiagnosticArray, by part


def _node(reconstructor: Any, context: Any, namespace: str, **parameters: Any) -> lsm.LsmNode:
    """An LsmNode with the /stereo remaps, a short stale threshold and report period, and ``parameters``."""
    thresholds = diag.DiagnosticThresholds(stale_after_s=STALE_AFTER_S)
    return make_lsm_node(reconstructor, context, namespace, node_options=dict(diagnostic_thresholds=thresholds),
                         **{'diagnostics_period_s': PERIOD_S, **parameters})


def values(status: DiagnosticStatus) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


class DiagnosticsListener:
    """A node keeping every /diagnostics message with its arrival time."""

    def __init__(self, context: Any) -> None:
        self.node = Node('test_diagnostics_listener', context=context)
        self._messages: list[tuple[float, DiagnosticArray]] = []
        self._lock = threading.Lock()
        self.subscription = self.node.create_subscription(DiagnosticArray, diag.DIAGNOSTICS_TOPIC, self._keep,
                                                          QoSProfile(depth=100,
                                                                     reliability=ReliabilityPolicy.RELIABLE))

    def _keep(self, msg: DiagnosticArray) -> None:
        with self._lock:
            self._messages.append((time.monotonic(), msg))

    def reports(self, node: lsm.LsmNode, since_s: float = 0.0) -> list[tuple[float, Report]]:
        """(arrival, statuses by part) of every report of ``node`` that arrived after ``since_s``."""
        prefix = f'{node.diagnostics_name}: '
        with self._lock:
            messages = [(t, m) for t, m in self._messages if t > since_s]
        found = []
        for arrival, msg in messages:
            parts = {s.name[len(prefix):]: s for s in msg.status if s.name.startswith(prefix)}
            if parts:
                found.append((arrival, parts))
        return found

    def wait_for(self, node: lsm.LsmNode, predicate: Callable[[Report], bool], timeout_s: float = REPORT_TIMEOUT_S,
                 since_s: float | None = None) -> Report:
        """The first report of ``node`` after ``since_s`` (default now) that satisfies ``predicate``."""
        start = time.monotonic() if since_s is None else since_s
        found: list[Report] = []

        def seen() -> bool:
            found[:] = [r for _, r in self.reports(node, start) if predicate(r)][:1]
            return bool(found)
        last = self.reports(node, start)
        assert wait_until(seen, timeout_s, 0.05), (last[-1][1] if last else 'no report', node.statistics())
        return found[0]


class Stream:
    """Publishes stereo frames (cycled, stamps advancing by the period) at ``rate_hz`` on a thread until stopped."""

    def __init__(self, publisher: StereoPublisher, frames: list[Any], start_ns: int, rate_hz: float = STREAM_HZ,
                 with_camera_info: bool = True) -> None:
        self.publisher, self.frames, self.period_s = publisher, frames, 1.0 / rate_hz
        self.next_stamp_ns, self.with_camera_info = start_ns, with_camera_info
        self.published = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name='test_stream')
        self._thread.start()

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            frame = self.frames[self.published % len(self.frames)]
            self.publisher.publish(frame, self.next_stamp_ns, with_camera_info=self.with_camera_info,
                                   info_settle_s=0.01)
            self.published += 1
            self.next_stamp_ns += round(self.period_s * 1e9)
            due += self.period_s
            self._stop.wait(max(0.0, due - time.monotonic()))

    def stop(self) -> int:
        """Stop; returns the next stamp (to continue from)."""
        self._stop.set()
        self._thread.join(5.0)
        return self.next_stamp_ns


class DiagnosticsHarness(NodeHarness):
    """A node under test (:func:`_node`), a stereo publisher and the /diagnostics listener (``listener``)."""

    def make_node(self, reconstructor: Any, context: Any, namespace: str, **parameters: Any) -> lsm.LsmNode:
        return _node(reconstructor, context, namespace, **parameters)

    def add_entities(self, context: Any) -> None:
        self.listener = DiagnosticsListener(context)
        self.executor.add(self.listener.node)

    def discovered(self) -> bool:
        """A managed node subscribes its inputs when configured: nothing to wait for before."""
        return bool(self.node.get_parameter('managed').value) or super().discovered()


class StreamHarness(DiagnosticsHarness):
    """The plain node under test (tiny DUSt3R) in namespace ``diag_stream`` on four executor threads; streams of
    ``frames`` (:meth:`stream`, :meth:`stop`) go on from ``next_stamp_ns``."""

    executor_threads = 4

    def __init__(self, context: Any, reconstructor: Any, frames: list[Any]) -> None:
        super().__init__(context, reconstructor, namespace='diag_stream')
        self.frames, self.next_stamp_ns = frames, frames[0].stamp_ns

    def stream(self, **kwargs: Any) -> Stream:
        return Stream(self.publisher, self.frames, self.next_stamp_ns, **kwargs)

    def stop(self, stream: Stream) -> None:
        self.next_stamp_ns = stream.stop() + 1_000_000_000


def pnp_frames(frames: list[Any]) -> list[Any]:
    """``frames`` whose right CameraInfo is no rectified rig (a vertical offset P[1,3] of 1 mm): lsm_node then takes
    the relative pose from PnP and the metric scale from the baseline, which the tiny untrained model reaches (the
    dense fit of a rectified rig needs a trained one). So a flowing stream reports OK, metric (stereo_baseline)."""
    changed = []
    for frame in frames:
        right_info = copy.deepcopy(frame.right_info)
        p = list(right_info.p)
        p[7] = -p[5] * 0.001
        right_info.p = p
        changed.append(dataclasses.replace(frame, right_info=right_info))
    return changed


@pytest.fixture(scope='module')
def graph(ros_context: Any, tiny_reconstructor: Any, stereo_frames: list[Any]) -> Iterator[StreamHarness]:
    with StreamHarness(ros_context, tiny_reconstructor, pnp_frames(stereo_frames)) as graph:
        yield graph


def _all_ok(report: Report) -> bool:
    return all(report[part].level == diag.OK for part in diag.STATUS_PARTS)


def test_a_flowing_stream_is_reported_ok_with_rates_latency_and_processed_pairs(
        graph: StreamHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    node = graph.node
    monkeypatch.setattr(node.reconstructor, 'trained_weights', True)   # untrained weights warn (next test)
    stream = graph.stream()
    try:
        report = graph.listener.wait_for(node, lambda r: _all_ok(r) and int(values(r['inputs'])[
            f'{LEFT}: messages']) >= 12 and values(r['processing'])['latency samples'] != '0')
    finally:
        graph.stop(stream)
    assert [s for s in report] == list(diag.STATUS_PARTS)
    inputs, processing, model = (values(report[part]) for part in diag.STATUS_PARTS)
    for topic in (LEFT, RIGHT, LEFT_INFO, RIGHT_INFO):      # every input at the published rate, stamps live
        assert float(inputs[f'{topic}: rate (Hz)']) == pytest.approx(STREAM_HZ, rel=0.35), (topic, inputs)
        assert float(inputs[f'{topic}: stamp rate']) == pytest.approx(1.0, abs=0.35), (topic, inputs)
        assert float(inputs[f'{topic}: since last (s)']) < STALE_AFTER_S
        assert inputs[f'{topic}: stamps backwards'] == '0'
    assert inputs['stereo offset median (ms)'] == '0.000' and inputs['sync tolerance (ms)'] == '20.000'
    assert int(inputs['pairs formed']) >= 10 and inputs['images while inactive'] == '0'
    assert 'required input topic(s) live' in report['inputs'].message
    assert int(processing['pairs processed']) >= 1 and int(processing['latency samples']) >= 1
    median, p95 = float(processing['latency median (s)']), float(processing['latency p95 (s)'])
    assert 0.0 < median <= p95 < 30.0
    assert processing['scale'] == 'metric (stereo_baseline)' and float(processing['baseline (m)']) > 0.05
    assert processing['worker exceptions'] == '0' and processing['failed pairs in a row'] == '0'
    assert f'latency median {median:.2f} s' in report['processing'].message
    assert model['lifecycle state'] == 'active' and model['model state'] == 'ready'
    assert model['device'] == 'cpu' and model['trained weights'] == 'yes' and model['model on device'] == 'yes'
    assert model['weights'] == node.reconstructor.weights and float(model['process RSS (MiB)']) > 10
    assert all(report[part].hardware_id == 'cpu' for part in diag.STATUS_PARTS)
    for part, status in report.items():                    # every key is documented (docs/operations.md)
        for key in values(status):
            assert diag.documented_key(part, key) is not None, (part, key)
    statistics = node.statistics()
    assert int(processing['pairs processed']) <= statistics['counts']['processed']


def test_untrained_weights_warn_in_the_model_status(graph: StreamHarness) -> None:
    report = graph.listener.wait_for(graph.node, lambda r: True)
    assert report['model'].level == diag.WARN and 'UNTRAINED WEIGHTS' in report['model'].message
    assert values(report['model'])['trained weights'] == 'no'


def test_silent_camera_infos_warn_and_a_stopped_stream_goes_stale(graph: StreamHarness) -> None:
    node, listener = graph.node, graph.listener
    stream = graph.stream(with_camera_info=False)          # images only: the CameraInfo topics fall silent
    try:
        report = listener.wait_for(node, lambda r: r['inputs'].level == diag.WARN and LEFT_INFO in r['inputs'].message)
    finally:
        graph.stop(stream)
    inputs = report['inputs']
    assert f'no messages on {LEFT_INFO}' in inputs.message and f'no messages on {RIGHT_INFO}' in inputs.message
    assert f'no messages on {LEFT}' not in inputs.message          # the images still flow
    # the pairs without CameraInfo are rejected, by reason
    listener.wait_for(node, lambda r: r['processing'].level == diag.WARN
                      and 'missing_camera_info' in r['processing'].message, since_s=0.0)

    report = listener.wait_for(node, lambda r: r['inputs'].level == diag.STALE)   # nothing at all now: STALE
    inputs = report['inputs']
    assert 'no input at all' in inputs.message
    for topic in (LEFT, RIGHT, LEFT_INFO, RIGHT_INFO):
        assert f'no messages on {topic}' in inputs.message
        assert float(values(inputs)[f'{topic}: since last (s)']) > STALE_AFTER_S
    assert report['model'].level != diag.ERROR                # the model is fine


def test_camera_infos_are_optional_without_use_camera_info(graph: StreamHarness) -> None:
    node = graph.node
    node.set_parameters([Parameter('use_camera_info', value=False)])
    try:
        stream = graph.stream(with_camera_info=False)
        try:
            report = graph.listener.wait_for(node, lambda r: r['inputs'].level == diag.OK
                                             and int(values(r['inputs'])[f'{LEFT}: messages']) > 0
                                             and float(values(r['inputs'])[f'{LEFT_INFO}: since last (s)'])
                                             > STALE_AFTER_S)
        finally:
            graph.stop(stream)
    finally:
        node.set_parameters([Parameter('use_camera_info', value=True)])
    assert LEFT_INFO not in report['inputs'].message


def test_rejected_pairs_appear_by_reason_then_the_warning_clears(graph: StreamHarness,
                                                                 stereo_frames: list[Any]) -> None:
    node, listener, publisher = graph.node, graph.listener, graph.publisher
    frame = stereo_frames[0]
    before = dict(node.statistics()['rejected'])
    sent = time.monotonic()
    bad = frame.left_image.__class__(header=frame.left_image.header, height=frame.left_image.height,
                                     width=frame.left_image.width, encoding='yuv422',
                                     step=2 * frame.left_image.width)
    bad.data = bytes(2 * bad.width * bad.height)
    publisher.publish(frame, graph.next_stamp_ns, left_image=bad)
    graph.next_stamp_ns += 1_000_000_000
    stale_stamp = frame.stamp_ns                           # older than every pair so far: one stale pair
    publisher.publish(frame, stale_stamp)
    assert wait_until(lambda: node.statistics()['rejected'].get(lsm.REJECT_STALE, 0) > before.get(
        lsm.REJECT_STALE, 0) and node.statistics()['rejected'].get(lsm.REJECT_ENCODING, 0) > 0, 10.0), \
        node.statistics()
    rejected = node.statistics()['rejected']
    assert rejected[lsm.REJECT_STALE] == before.get(lsm.REJECT_STALE, 0) + 1     # once per pair, not per image
    assert rejected[lsm.REJECT_ENCODING] == before.get(lsm.REJECT_ENCODING, 0) + 1
    report = listener.wait_for(node, lambda r: all(
        values(r['processing']).get(f'rejected: {reason}') == str(rejected[reason])
        for reason in (lsm.REJECT_STALE, lsm.REJECT_ENCODING)), since_s=sent)
    shown = values(report['processing'])
    assert int(shown['rejected total']) == sum(int(v) for k, v in shown.items() if k.startswith('rejected: '))
    # each new rejection made a report WARN, naming its reason (both in one report, or in two)
    warnings = [r['processing'] for _, r in listener.reports(node, sent) if r['processing'].level == diag.WARN]
    for reason in (lsm.REJECT_STALE, lsm.REJECT_ENCODING):
        assert any(f'{reason} 1' in w.message and 'pair(s) rejected' in w.message for w in warnings), \
            [w.message for w in warnings]
    # nothing new since the last report: the counts stay, the warning goes
    report = listener.wait_for(node, lambda r: r['processing'].level == diag.OK)
    assert values(report['processing'])['rejected: unsupported_encoding'] == str(rejected[lsm.REJECT_ENCODING])


def test_the_report_never_waits_for_the_inference_thread(graph: StreamHarness, stereo_frames: list[Any]) -> None:
    node, listener = graph.node, graph.listener
    reconstructor = node.reconstructor
    reconstruct = reconstructor.reconstruct
    entered, release = threading.Event(), threading.Event()

    def gated(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(30.0)
        return reconstruct(*args, **kwargs)

    reconstructor.reconstruct = gated                       # instance attribute: the worker waits inside
    try:
        graph.publisher.publish(stereo_frames[1], graph.next_stamp_ns)
        graph.next_stamp_ns += 1_000_000_000
        assert wait_until(entered.is_set, 20.0), node.statistics()
        processed = node.statistics()['counts'].get('processed', 0)
        blocked = time.monotonic()
        time.sleep(4 * PERIOD_S)
        reports = listener.reports(node, blocked)
        assert len(reports) >= 2, reports                   # reports go on while the worker is stuck
        assert all(values(r['processing'])['pairs processed'] == str(processed) for _, r in reports)
    finally:
        release.set()
        del reconstructor.reconstruct
    assert node.wait_idle(30.0)


def test_a_failing_report_is_counted_logged_and_the_next_one_goes_out(graph: StreamHarness,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    node, listener = graph.node, graph.listener
    health = node.health
    failures: list[int] = []
    warned: list[tuple[str, str]] = []

    def failing_once(*args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(1)
            raise RuntimeError('injected health failure')
        return health(*args, **kwargs)

    warning = node._warnings.warning
    monkeypatch.setattr(node._warnings, 'warning', lambda key, message: warned.append((key, message))
                        or warning(key, message))
    monkeypatch.setattr(node, 'health', failing_once)
    assert wait_until(lambda: node.statistics()['counts'].get('diagnostics_failures', 0) == 1, 10.0)
    assert ('diagnostics_failed', '/diagnostics report failed: RuntimeError: injected health failure') in warned
    listener.wait_for(node, lambda r: True)                 # the timer goes on
    assert node.statistics()['counts']['diagnostics_failures'] == 1


def test_the_period_is_a_runtime_parameter(graph: StreamHarness) -> None:
    node, listener = graph.node, graph.listener
    assert node._diagnostics_timer.timer_period_ns == round(PERIOD_S * 1e9)
    assert node._diagnostics_timer.clock.clock_type == ClockType.STEADY_TIME   # goes on when sim time stops
    [refused] = node.set_parameters([Parameter('diagnostics_period_s', value=0.05)])
    assert not refused.successful and 'diagnostics_period_s' in refused.reason and 'minimum' in refused.reason
    try:
        assert node.set_parameters([Parameter('diagnostics_period_s', value=0.1)])[0].successful
        assert node._diagnostics_timer.timer_period_ns == 100_000_000
        start = time.monotonic()
        time.sleep(1.5)
        assert len(listener.reports(node, start)) >= 8, len(listener.reports(node, start))   # ~15 at 10 Hz
    finally:
        node.set_parameters([Parameter('diagnostics_period_s', value=PERIOD_S)])
    assert node._diagnostics_timer.timer_period_ns == round(PERIOD_S * 1e9)


# ------------------------------------------------------------------------------------------- managed nodes
def _model(report: Report) -> dict[str, str]:
    return values(report['model'])


def test_a_managed_node_reports_its_model_state_through_the_transitions(ros_context: Any,
                                                                          tiny_lsm_reconstructor: Any) -> None:
    reconstructor = tiny_lsm_reconstructor
    entered, release = threading.Event(), threading.Event()
    reload = reconstructor.reload

    def gated_reload() -> None:
        entered.set()
        release.wait(30.0)
        reload()

    graph = DiagnosticsHarness(ros_context, reconstructor, namespace='diag_managed', managed=True)
    node, listener = graph.node, graph.listener
    try:
        report = listener.wait_for(node, lambda r: True)
        model = _model(report)
        assert (model['lifecycle state'], model['model state'], model['device']) == ('unconfigured', 'unconfigured',
                                                                                     '-')
        assert report['model'].level == diag.OK and report['model'].hardware_id == 'none'
        assert report['inputs'].level == diag.OK and 'not active (unconfigured)' in report['inputs'].message

        reconstructor.reload = gated_reload                 # configure waits inside: the model is loading
        results: list[Any] = []
        configure = threading.Thread(target=lambda: results.append(node.trigger_configure()))
        configure.start()
        assert entered.wait(20.0)
        report = listener.wait_for(node, lambda r: _model(r)['model state'] == 'loading')
        assert _model(report)['lifecycle state'] == 'configuring' and _model(report)['weights'] == \
            reconstructor.weights
        release.set()
        configure.join(30.0)
        assert results == [TransitionCallbackReturn.SUCCESS]

        report = listener.wait_for(node, lambda r: _model(r)['lifecycle state'] == 'inactive')
        model = _model(report)
        assert model['model state'] == 'ready' and model['device'] == 'cpu' and model['model on device'] == 'yes'
        assert report['model'].hardware_id == 'cpu' and 'UNTRAINED WEIGHTS' in report['model'].message
        assert {LEFT, RIGHT, LEFT_INFO, RIGHT_INFO} <= {k.split(': ')[0] for k in values(report['inputs'])}
        assert 'not active (inactive)' in report['inputs'].message

        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        report = listener.wait_for(node, lambda r: _model(r)['lifecycle state'] == 'active')
        assert _model(report)['model state'] == 'ready'
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
        report = listener.wait_for(node, lambda r: _model(r)['lifecycle state'] == 'unconfigured')
        assert _model(report)['model state'] == 'unconfigured' and values(report['processing'])['scale'] == \
            'unknown (no reconstruction yet)'
        assert report['inputs'].message == 'not active (unconfigured): images are not processed'
        assert not any(': rate (Hz)' in key for key in values(report['inputs']))   # no input watched any more
    finally:
        release.set()
        if 'reload' in vars(reconstructor):
            del reconstructor.reload
        graph.close()


def test_a_failed_configure_is_reported_with_the_error(ros_context: Any) -> None:
    # no checkpoint configured
    with DiagnosticsHarness(ros_context, None, namespace='diag_no_weights', managed=True) as graph:
        node, listener = graph.node, graph.listener
        listener.wait_for(node, lambda r: _model(r)['model state'] == 'unconfigured')
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert node.lifecycle_state == lsm.STATE_UNCONFIGURED
        report = listener.wait_for(node, lambda r: _model(r)['model state'] == 'failed')
        status, model = report['model'], _model(report)
        assert status.level == diag.ERROR and model['lifecycle state'] == 'unconfigured'
        assert model['error'].startswith('ValueError: no checkpoint configured') and 'dust3r_checkpoint:=' in \
            model['error']
        assert status.message.startswith('the model failed to load: ValueError: no checkpoint configured')
        assert node.statistics()['lifecycle_state'] == 'unconfigured'
