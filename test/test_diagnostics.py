"""lsm_ros.ros.diagnostics: topic and latency monitors (fake clock), and the DiagnosticArray of a NodeHealth."""
from __future__ import annotations

import dataclasses
import sys
import types
from typing import Any

import pytest
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.serialization import deserialize_message, serialize_message

from lsm_ros.ros import diagnostics as diag

pytestmark = pytest.mark.timeout(60)

LEFT, RIGHT = '/stereo/left/image_rect', '/stereo/right/image_rect'
LEFT_INFO, RIGHT_INFO = '/stereo/left/camera_info', '/stereo/right/camera_info'
S = 1_000_000_000


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _stream(monitor: diag.TopicRateMonitor, clock: FakeClock, topics: dict[str, float], seconds: float,
            rate_hz: float = 10.0, stamp_of: Any = None) -> None:
    """Advance the clock by ``seconds``, every topic getting ``rate_hz`` messages stamped arrival + its offset."""
    start = clock.now
    for k in range(1, round(seconds * rate_hz) + 1):
        clock.now = start + k / rate_hz
        for topic, offset_s in topics.items():
            stamp_s = clock.now + offset_s if stamp_of is None else stamp_of(topic, clock.now)
            monitor.record(topic, round(stamp_s * S))


# ------------------------------------------------------------------------------------------------ monitors
def test_rate_since_last_and_stamp_rate_of_a_live_topic_then_silence() -> None:
    clock = FakeClock()
    monitor = diag.TopicRateMonitor(window_s=5.0, clock=clock)
    _stream(monitor, clock, {LEFT: 0.0}, 3.0)
    stats = monitor.topic_stats(LEFT)
    assert stats.messages == 30 and stats.window_messages == 30 and stats.required
    assert stats.rate_hz == pytest.approx(10.0) and stats.stamp_rate == pytest.approx(1.0)
    assert stats.since_last_s == 0.0 and stats.stamps_backwards == stats.stamps_repeated == 0
    clock.now += 4.0                      # the window [now - 5 s, now] still holds the last 1.0 s: 11 messages
    stats = monitor.topic_stats(LEFT)
    assert stats.since_last_s == pytest.approx(4.0) and stats.window_messages == 11
    clock.now += 10.0                     # nothing in the window any more
    stats = monitor.topic_stats(LEFT)
    assert (stats.rate_hz, stats.stamp_rate, stats.window_messages, stats.messages) == (0.0, None, 0, 30)
    assert stats.since_last_s == pytest.approx(14.0)


def test_a_watched_silent_topic_counts_from_the_watch_and_unknown_topics_raise() -> None:
    clock = FakeClock()
    monitor = diag.TopicRateMonitor(clock=clock)
    monitor.watch(LEFT_INFO, required=False)
    clock.now += 2.5
    stats = monitor.snapshot()[LEFT_INFO]
    assert (stats.messages, stats.required, stats.since_last_s) == (0, False, pytest.approx(2.5))
    with pytest.raises(KeyError):
        monitor.topic_stats('/other')
    monitor.forget()
    assert monitor.snapshot() == {}


def test_frozen_and_backwards_stamps() -> None:
    clock = FakeClock()
    monitor = diag.TopicRateMonitor(clock=clock)
    _stream(monitor, clock, {LEFT: 0.0}, 1.0, stamp_of=lambda topic, now: 42.0)
    stats = monitor.topic_stats(LEFT)
    assert stats.stamps_frozen and stats.stamp_rate == 0.0 and stats.stamps_repeated == 9
    clock.now += 10.0
    for stamp_s in (10.0, 10.1, 10.2, 5.0, 5.1, 1.0):      # a driver restarted twice
        clock.now += 0.1
        monitor.record(RIGHT, round(stamp_s * S))
    stats = monitor.topic_stats(RIGHT)
    assert stats.stamps_backwards == 2 and not stats.stamps_frozen and stats.stamp_rate < 0


def test_samples_are_bounded_and_explicit_times_need_no_clock() -> None:
    monitor = diag.TopicRateMonitor(window_s=100.0, max_samples=5, clock=lambda: pytest.fail('clock read'))
    for i in range(20):
        monitor.record(LEFT, i * S // 10, arrival_s=i / 10)
    stats = monitor.topic_stats(LEFT, now_s=2.0)
    assert stats.messages == 20 and stats.window_messages == 5
    assert stats.rate_hz == pytest.approx(10.0)
    with pytest.raises(ValueError):
        diag.TopicRateMonitor(window_s=0.0)


def test_stereo_offset_matches_each_right_image_with_the_nearest_left_one() -> None:
    clock = FakeClock()
    monitor = diag.TopicRateMonitor(window_s=5.0, clock=clock)
    assert monitor.stereo_offset(LEFT, RIGHT) is None
    _stream(monitor, clock, {LEFT: 0.0, RIGHT: 0.035}, 2.0)      # right stamps 35 ms later, frames 100 ms apart
    offset = monitor.stereo_offset(LEFT, RIGHT)
    assert offset.samples == 20
    assert offset.median_s == pytest.approx(-0.035, abs=1e-6) and offset.max_abs_s == pytest.approx(0.035, abs=1e-6)
    _stream(monitor, clock, {LEFT: 0.0, RIGHT: -0.07}, 10.0)     # 70 ms early: nearest is the next left image
    assert monitor.stereo_offset(LEFT, RIGHT).median_s == pytest.approx(-0.03, abs=1e-6)


def test_latency_median_and_p95_over_a_bounded_window() -> None:
    monitor = diag.LatencyMonitor(window=100)
    assert monitor.stats() == diag.LatencyStats(0, None, None, None)
    for value in range(1, 101):
        monitor.record(float(value))
    assert monitor.stats() == diag.LatencyStats(100, 50.5, 95.0, 100.0)
    monitor.record(1000.0)                                       # 1.0 leaves the window
    stats = monitor.stats()
    assert (stats.samples, stats.median_s, stats.p95_s, stats.last_s) == (100, 51.5, 96.0, 1000.0)
    for bad in (-1.0, float('nan'), float('inf')):
        with pytest.raises(ValueError):
            monitor.record(bad)
    single = diag.LatencyMonitor(window=3)
    single.record(0.25)
    assert single.stats() == diag.LatencyStats(1, 0.25, 0.25, 0.25)


def test_memory_of_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    rss = diag.process_rss_bytes()
    assert rss is not None and rss > 10 * 1024 * 1024
    memory = diag.memory_stats('cpu')
    assert memory.rss_bytes and memory.cuda_allocated_bytes is None and memory.cuda_reserved_bytes is None
    # on CUDA: torch's allocated and reserved bytes of that device (a stand-in torch: no GPU here)
    calls = []
    cuda = types.SimpleNamespace(is_available=lambda: True,
                                 memory_allocated=lambda device: calls.append(device) or 5 * 1024 ** 2,
                                 memory_reserved=lambda device: 8 * 1024 ** 2)
    monkeypatch.setitem(sys.modules, 'torch', types.SimpleNamespace(cuda=cuda))
    memory = diag.memory_stats('cuda:1')
    assert (memory.cuda_allocated_bytes, memory.cuda_reserved_bytes, calls) == (5 * 1024 ** 2, 8 * 1024 ** 2,
                                                                                ['cuda:1'])
    assert diag.memory_stats('cpu').cuda_allocated_bytes is None


# ------------------------------------------------------------------------------------------------ snapshots
def _healthy(clock: FakeClock | None = None, **changes: Any) -> diag.NodeHealth:
    """A node that has been running 5 s on two live 10 Hz cameras with CameraInfo."""
    clock = clock or FakeClock()
    monitor = diag.TopicRateMonitor(window_s=5.0, clock=clock)
    _stream(monitor, clock, {LEFT: 0.0, RIGHT: 0.004, LEFT_INFO: 0.0, RIGHT_INFO: 0.004}, 5.0)
    latency = diag.LatencyMonitor()
    for value in (7.4, 7.5, 7.6, 7.5):
        latency.record(value)
    statistics = {'counts': {'pairs': 50, 'processed': 4}, 'rejected': {'bad_image_data': 2},
                  'sync_drops': {'queue_full': 0, 'superseded': 1, 'late': 0, 'duplicate_stamp': 0},
                  'worker': {'submitted': 48, 'processed': 4, 'dropped': 44, 'failed': 0, 'discarded_on_stop': 0},
                  'worker_running': True, 'lifecycle_state': 'active', 'inactive_drops': 0,
                  'failed_pairs_in_a_row': 0, 'model_on_device': True}
    fields = dict(model_state=diag.MODEL_READY, weights='official checkpoints', trained_weights=True, device='cpu',
                  memory=diag.MemoryStats(rss_bytes=6 * 1024 ** 3), sync_tolerance_s=0.02, scale=diag.SCALE_METRIC,
                  scale_source='stereo_baseline', baseline_m=0.11)
    fields.update(changes)
    return diag.health_from_statistics(statistics, time_s=clock.now, monitor=monitor, image_topics=(LEFT, RIGHT),
                                       latency=latency, **fields)


def _status(array_or_list: Any, part: str) -> DiagnosticStatus:
    statuses = array_or_list.status if isinstance(array_or_list, DiagnosticArray) else array_or_list
    return next(s for s in statuses if s.name == diag.status_name(diag.NODE_NAME, part))


def _values(status: DiagnosticStatus) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


def test_health_from_statistics_maps_the_node_counters() -> None:
    health = _healthy()
    assert (health.pairs, health.processed, health.dropped_busy, health.worker_exceptions) == (50, 4, 44, 0)
    assert health.rejected == {'bad_image_data': 2} and health.sync_drops['superseded'] == 1
    assert health.lifecycle_state == 'active' and health.worker_running and health.model_on_device
    assert set(health.inputs) == {LEFT, RIGHT, LEFT_INFO, RIGHT_INFO} and health.image_topics == (LEFT, RIGHT)
    assert health.stereo_offset.median_s == pytest.approx(-0.004, abs=1e-6)
    assert health.latency.median_s == pytest.approx(7.5) and health.latency.p95_s == 7.6
    assert health.device == 'cpu' and health.scale == diag.SCALE_METRIC
    bare = diag.health_from_statistics({}, time_s=1.0)
    assert (bare.pairs, bare.rejected, bare.lifecycle_state, bare.inputs) == (0, {}, 'active', {})


def test_a_healthy_node_reports_three_ok_statuses_with_documented_keys() -> None:
    health = _healthy()
    array = diag.build_diagnostic_array(health, previous=health, stamp=Time(sec=5, nanosec=7))
    assert array.header.stamp == Time(sec=5, nanosec=7)
    assert [s.name for s in array.status] == ['lsm_node: inputs', 'lsm_node: processing', 'lsm_node: model']
    for status in array.status:
        assert status.level == diag.OK, (status.name, status.message)
        assert status.hardware_id == 'cpu'
        for kv in status.values:
            assert diag.documented_key(status.name.split(': ')[1], kv.key) is not None, (status.name, kv.key)
    inputs = _values(_status(array, 'inputs'))
    assert inputs[f'{LEFT}: rate (Hz)'] == '10.000' and inputs[f'{LEFT}: stamp rate'] == '1.000'
    assert inputs['stereo offset median (ms)'] == '-4.000' and inputs['sync tolerance (ms)'] == '20.000'
    assert inputs['pairs formed'] == '50' and inputs['sync drops: superseded'] == '1'
    processing = _values(_status(array, 'processing'))
    assert processing['latency median (s)'] == '7.500' and processing['latency p95 (s)'] == '7.600'
    assert processing['rejected: bad_image_data'] == '2' and processing['dropped pairs (busy)'] == '44'
    assert processing['scale'] == 'metric (stereo_baseline)' and processing['baseline (m)'] == '0.110'
    assert 'latency median 7.50 s' in _status(array, 'processing').message
    model = _values(_status(array, 'model'))
    assert model['process RSS (MiB)'] == '6144.000' and model['trained weights'] == 'yes'
    assert model['lifecycle state'] == 'active' and model['model state'] == 'ready'
    assert 'CUDA allocated (MiB)' not in model
    # a valid message, and the same snapshot always gives the same message
    assert deserialize_message(serialize_message(array), DiagnosticArray) == array
    assert diag.build_diagnostic_array(_healthy()) == diag.build_diagnostic_array(_healthy())
    # without a previous report, the rejections since start are news
    first = _status(diag.build_diagnostic_array(health), 'processing')
    assert first.level == diag.WARN and first.message == '2 pair(s) rejected: bad_image_data 2'


def test_every_documented_key_is_reported_somewhere() -> None:
    """KEY_DOCS (which docs/operations.md shows) lists exactly the keys the builder emits."""
    snapshots = [_healthy(), _healthy(device='cuda:0', memory=diag.MemoryStats(1, 2 * 1024 ** 2, 3 * 1024 ** 2)),
                 _healthy(model_state=diag.MODEL_FAILED, model_error='no checkpoint')]
    emitted = [(s.name.split(': ')[1], kv.key) for h in snapshots for s in diag.build_statuses(h) for kv in s.values]
    for doc in diag.KEY_DOCS:
        assert any(part == doc.status and doc.matches(key) for part, key in emitted), doc
    cuda = _values(_status(diag.build_statuses(snapshots[1]), 'model'))
    assert (cuda['CUDA allocated (MiB)'], cuda['CUDA reserved (MiB)']) == ('2.000', '3.000')
    assert all(s.hardware_id == 'cuda:0' for s in diag.build_statuses(snapshots[1]))


def test_silent_topics_warn_and_no_input_at_all_is_stale() -> None:
    clock = FakeClock()
    health = _healthy(clock)
    clock.now += 3.0
    monitor_snapshot = {t: dataclasses.replace(s, since_last_s=3.0 if t == LEFT else 0.0)
                        for t, s in health.inputs.items()}
    status = _status(diag.build_statuses(dataclasses.replace(health, inputs=monitor_snapshot)), 'inputs')
    assert status.level == diag.WARN and status.message == f'no messages on {LEFT} for 3.0 s'
    all_silent = {t: dataclasses.replace(s, since_last_s=9.0) for t, s in health.inputs.items()}
    status = _status(diag.build_statuses(dataclasses.replace(health, inputs=all_silent)), 'inputs')
    assert status.level == diag.STALE and status.message.startswith('no input at all')
    # optional topics (CameraInfo with use_camera_info false) may be silent
    optional = {t: dataclasses.replace(s, since_last_s=9.0, required=False) if 'info' in t else s
                for t, s in health.inputs.items()}
    assert _status(diag.build_statuses(dataclasses.replace(health, inputs=optional)), 'inputs').level == diag.OK
    # a node that is not active does not complain about its inputs
    inactive = dataclasses.replace(health, inputs=all_silent, lifecycle_state='inactive')
    status = _status(diag.build_statuses(inactive), 'inputs')
    assert status.level == diag.OK and status.message.startswith('not active (inactive)')
    limits = diag.DiagnosticThresholds(stale_after_s=10.0)
    assert _status(diag.build_statuses(dataclasses.replace(health, inputs=all_silent), thresholds=limits),
                   'inputs').level == diag.OK


def test_stamp_problems_and_unsynchronised_cameras_warn() -> None:
    clock = FakeClock()
    monitor = diag.TopicRateMonitor(clock=clock)
    _stream(monitor, clock, {LEFT: 0.0, RIGHT: 0.045}, 3.0)
    _stream(monitor, clock, {LEFT_INFO: 0.0}, 1.0, stamp_of=lambda topic, now: 7.0)
    health = diag.health_from_statistics({}, time_s=clock.now, monitor=monitor, image_topics=(LEFT, RIGHT),
                                         sync_tolerance_s=0.02)
    status = _status(diag.build_statuses(health), 'inputs')
    assert status.level == diag.WARN
    assert 'left and right stamps differ by -45.0 ms, more than the sync tolerance 20.0 ms' in status.message
    assert f'stamps on {LEFT_INFO} stopped advancing' in status.message
    slow = diag.DiagnosticThresholds(min_rate_hz=15.0)
    assert f'{LEFT} at 10.00 Hz, below 15 Hz' in _status(diag.build_statuses(health, thresholds=slow),
                                                         'inputs').message


def test_images_without_pairs_since_the_last_report_warn() -> None:
    clock = FakeClock()
    previous = _healthy(clock)
    now = _healthy(FakeClock(clock.now))            # same counters, but 5 s more images on both topics
    now = dataclasses.replace(now, inputs={t: dataclasses.replace(s, messages=s.messages + 50)
                                           for t, s in previous.inputs.items()},
                              sync_drops={**previous.sync_drops, 'queue_full': 40}, time_s=previous.time_s + 5.0)
    status = _status(diag.build_statuses(now, previous), 'inputs')
    assert status.level == diag.WARN and 'no pair formed in the last 5.0 s' in status.message
    assert "'queue_full': 40" in status.message
    paired = dataclasses.replace(now, pairs=previous.pairs + 10)
    assert _status(diag.build_statuses(paired, previous), 'inputs').level == diag.OK


def test_new_rejections_failures_and_latency() -> None:
    previous = _healthy()
    assert _status(diag.build_statuses(previous, previous), 'processing').level == diag.OK   # nothing new
    rejected = dataclasses.replace(previous, rejected={'bad_image_data': 5, 'missing_camera_info': 1},
                                   time_s=previous.time_s + 1.0)
    status = _status(diag.build_statuses(rejected, previous), 'processing')
    assert status.level == diag.WARN
    assert status.message == '4 pair(s) rejected in the last 1.0 s: bad_image_data 3, missing_camera_info 1'
    one_failure = dataclasses.replace(previous, failed_pairs_in_a_row=1, rejected={'reconstruction_failed': 1})
    status = _status(diag.build_statuses(one_failure, previous), 'processing')
    assert status.level == diag.WARN and status.message == '1 pair(s) in a row failed in the network'
    burst = dataclasses.replace(previous, failed_pairs_in_a_row=3)
    assert _status(diag.build_statuses(burst, previous), 'processing').level == diag.ERROR
    exception = dataclasses.replace(previous, worker_exceptions=1)
    assert 'escaped the inference thread' in _status(diag.build_statuses(exception, previous), 'processing').message
    dead = dataclasses.replace(previous, worker_running=False)
    status = _status(diag.build_statuses(dead, previous), 'processing')
    assert status.level == diag.ERROR and 'inference thread is not running' in status.message
    slow = dataclasses.replace(previous, latency=diag.LatencyStats(10, 12.0, 20.0, 12.0))
    status = _status(diag.build_statuses(slow, previous), 'processing')
    assert status.level == diag.WARN and status.message == 'p95 latency 20.0 s above 15 s'
    strict = diag.DiagnosticThresholds(latency_warn_s=5.0, latency_error_s=19.0)
    status = _status(diag.build_statuses(slow, previous, strict), 'processing')
    assert status.level == diag.ERROR and status.message == 'p95 latency 20.0 s above 19 s'


def test_scale_status() -> None:
    health = _healthy(scale=diag.SCALE_MODEL_UNITS, scale_source='none', baseline_m=None)
    status = _status(diag.build_statuses(health, health), 'processing')
    assert status.level == diag.OK and _values(status)['scale'] == 'model units'
    assert _values(status)['baseline (m)'] == '-'
    lost = _healthy(scale=diag.SCALE_MODEL_UNITS, baseline_m=0.11)
    status = _status(diag.build_statuses(lost, lost), 'processing')
    assert status.level == diag.WARN and 'relative pose failed' in status.message
    first = _healthy(scale=diag.SCALE_UNKNOWN)
    assert _values(_status(diag.build_statuses(first), 'processing'))['scale'] == 'unknown (no reconstruction yet)'


def test_model_states() -> None:
    failed = _status(diag.build_statuses(_healthy(model_state=diag.MODEL_FAILED, model_error='file not found')),
                     'model')
    assert failed.level == diag.ERROR and failed.message == 'the model failed to load: file not found'
    assert _values(failed)['error'] == 'file not found'
    untrained = _status(diag.build_statuses(_healthy(trained_weights=False, weights='lsmref-v1')), 'model')
    assert untrained.level == diag.WARN and 'UNTRAINED WEIGHTS (lsmref-v1)' in untrained.message
    loading = _status(diag.build_statuses(_healthy(model_state=diag.MODEL_LOADING)), 'model')
    assert loading.level == diag.OK and loading.message == 'loading official checkpoints'
    unconfigured = diag.NodeHealth(time_s=0.0, lifecycle_state='unconfigured', node_name='robot/lsm_node')
    statuses = diag.build_statuses(unconfigured)
    assert [s.name for s in statuses] == ['robot/lsm_node: inputs', 'robot/lsm_node: processing',
                                          'robot/lsm_node: model']
    assert all(s.level == diag.OK and s.hardware_id == 'none' for s in statuses)
    assert statuses[2].message == 'no model loaded (unconfigured)'
    assert _values(statuses[2])['device'] == '-' and _values(statuses[2])['trained weights'] == 'unknown'


def test_thresholds_are_checked() -> None:
    assert diag.DiagnosticThresholds().stale_after_s == 2.0
    for bad in (dict(stale_after_s=-1.0), dict(latency_warn_s=float('nan')), dict(latency_warn_s=10.0,
                                                                                  latency_error_s=5.0),
                dict(no_pair_min_images=0), dict(failures_in_a_row_error=0)):
        with pytest.raises(ValueError):
            diag.DiagnosticThresholds(**bad)


def test_level_names() -> None:
    assert [diag.level_name(level) for level in (diag.OK, diag.WARN, diag.ERROR, diag.STALE)] == \
        ['OK', 'WARN', 'ERROR', 'STALE']
