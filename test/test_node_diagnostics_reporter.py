"""lsm_node's /diagnostics publisher alone (lsm_ros.ros.diagnostics_reporter.DiagnosticsReporter) with a fake node:
a plain publisher and a steady timer in their own callback group, reports against the previous one, the period
changed at runtime, and a failing report counted and warned without stopping the timer."""
from __future__ import annotations

import logging
from typing import Any, Callable

import pytest
from builtin_interfaces.msg import Time
from rclpy.clock import ClockType

from lsm_ros.ros import diagnostics
from lsm_ros.ros.counters import NodeCounters
from lsm_ros.ros.diagnostics import DIAGNOSTICS_TOPIC, DiagnosticThresholds
from lsm_ros.ros.diagnostics_reporter import DiagnosticsReporter
from lsm_ros.ros.names import DIAGNOSTICS_QOS

pytestmark = pytest.mark.timeout(60)


class FakeTimer:
    def __init__(self, period_s: float, callback: Callable[[], None], kwargs: dict[str, Any]) -> None:
        self.timer_period_ns, self.callback, self.kwargs, self.resets = round(period_s * 1e9), callback, kwargs, 0

    def reset(self) -> None:
        self.resets += 1


class FakeNode:
    def __init__(self) -> None:
        self.published: list[Any] = []
        self.publisher_args: tuple[Any, ...] = ()
        self.timer: FakeTimer | None = None

    def create_publisher(self, msg_type: Any, topic: str, qos: Any) -> Any:
        self.publisher_args = (msg_type, topic, qos)
        return self

    def publish(self, msg: Any) -> None:
        self.published.append(msg)

    def create_timer(self, period_s: float, callback: Callable[[], None], **kwargs: Any) -> FakeTimer:
        self.timer = FakeTimer(period_s, callback, kwargs)
        return self.timer


def health(processed: int) -> diagnostics.NodeHealth:
    statistics = dict(counts={'processed': processed}, rejected={}, sync_drops={}, worker={}, worker_running=True,
                      median_latency_s=None, lifecycle_state='active', out_of_memory=0, inactive_drops=0,
                      failed_pairs_in_a_row=0, model_on_device=True)
    return diagnostics.health_from_statistics(statistics, time_s=10.0, node_name='ns/lsm_node')


def test_reports_go_out_on_the_steady_timer_and_the_period_follows_the_parameter() -> None:
    node, before = FakeNode(), []
    counts = iter(range(100))
    counters = NodeCounters(lambda: logging.getLogger('test_node_diagnostics_reporter'), 0.0)
    reporter = DiagnosticsReporter(node, counters, health=lambda: health(next(counts)),
                                   stamp=lambda: Time(sec=7), thresholds=DiagnosticThresholds(), period_s=1.0,
                                   before_report=lambda: before.append(True))
    assert node.publisher_args[1:] == (DIAGNOSTICS_TOPIC, DIAGNOSTICS_QOS)
    assert node.timer.kwargs['clock'].clock_type == ClockType.STEADY_TIME
    assert node.timer.kwargs['callback_group'] is not None
    node.timer.callback()
    node.timer.callback()
    assert before == [True, True] and len(node.published) == 2
    assert node.published[0].header.stamp.sec == 7
    names = {status.name for status in node.published[1].status}
    assert names == {diagnostics.status_name('ns/lsm_node', part) for part in diagnostics.STATUS_PARTS}
    reporter.set_period(1.0)
    assert node.timer.resets == 0
    reporter.set_period(0.25)
    assert (node.timer.timer_period_ns, node.timer.resets) == (250_000_000, 1)


def test_a_failing_report_is_counted_and_warned_and_the_next_one_goes_out() -> None:
    node = FakeNode()
    warned: list[str] = []
    counters = NodeCounters(lambda: logging.getLogger('test_node_diagnostics_reporter'), 0.0)
    counters.warnings.warning = lambda key, message: warned.append(message) or True   # type: ignore[method-assign]
    calls = iter([RuntimeError('no health'), None])

    def flaky() -> diagnostics.NodeHealth:
        error = next(calls)
        if error is not None:
            raise error
        return health(1)

    DiagnosticsReporter(node, counters, health=flaky, stamp=lambda: Time(), thresholds=DiagnosticThresholds(),
                        period_s=1.0)
    node.timer.callback()
    assert counters.snapshot()[0] == {'diagnostics_failures': 1} and node.published == []
    assert warned == ['/diagnostics report failed: RuntimeError: no health']
    node.timer.callback()
    assert len(node.published) == 1
