"""``lsm_node``'s /diagnostics publisher: :class:`DiagnosticsReporter` publishes a diagnostic_msgs/DiagnosticArray
every ``diagnostics_period_s`` in every lifecycle state, a failed configure included: a plain publisher (not a
lifecycle one) and a timer in a callback group of their own, so a report never waits for image callbacks, services
or transitions. The timer runs on the steady clock: with use_sim_time it goes on when the bag stops.

What a report says is :mod:`lsm_ros.ros.diagnostics`' (``<node>: inputs``, ``<node>: processing``, ``<node>:
model``, from the node's :class:`~lsm_ros.ros.diagnostics.NodeHealth`). The node is anything with
``create_publisher`` and ``create_timer``.
"""
from __future__ import annotations

from typing import Any, Callable

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType

from lsm_ros.ros import diagnostics
from lsm_ros.ros.counters import NodeCounters
from lsm_ros.ros.diagnostics import DIAGNOSTICS_TOPIC, DiagnosticThresholds, NodeHealth
from lsm_ros.ros.names import DIAGNOSTICS_QOS


class DiagnosticsReporter:
    """Publishes the health of a node every ``period_s``.

    ``health()``: the node's health now; ``stamp()``: the report's stamp (the node clock); ``before_report()``: work
    the timer does first (the node expires a pair held for its CameraInfo). A failing report is counted
    (``diagnostics_failures``) and warned, rate-limited; the timer goes on."""

    def __init__(self, node: Any, counters: NodeCounters, *, health: Callable[[], NodeHealth],
                 stamp: Callable[[], Time], thresholds: DiagnosticThresholds, period_s: float,
                 before_report: Callable[[], None] = lambda: None) -> None:
        self._counters, self._health, self._stamp, self._before = counters, health, stamp, before_report
        self.thresholds = thresholds
        self._previous: NodeHealth | None = None
        self.publisher = node.create_publisher(DiagnosticArray, DIAGNOSTICS_TOPIC, DIAGNOSTICS_QOS)
        self.timer = node.create_timer(period_s, self._on_timer, callback_group=MutuallyExclusiveCallbackGroup(),
                                       clock=Clock(clock_type=ClockType.STEADY_TIME))

    def publish(self) -> DiagnosticArray:
        """Build and publish one report (the statuses of ``health()``, against the last report); returns it. Raises
        what building or publishing raises."""
        health = self._health()
        array = diagnostics.build_diagnostic_array(health, previous=self._previous, thresholds=self.thresholds,
                                                   stamp=self._stamp())
        self.publisher.publish(array)
        self._previous = health
        return array

    def set_period(self, period_s: float) -> None:
        """A new period; the next report one new period from now (not one old period)."""
        period_ns = round(period_s * 1e9)
        if self.timer.timer_period_ns != period_ns:
            self.timer.timer_period_ns = period_ns
            self.timer.reset()

    def _on_timer(self) -> None:
        """Timer callback: ``before_report()``, then a report; never raises (a failure is counted and logged)."""
        try:
            self._before()
            self.publish()
        except Exception as exc:  # noqa: BLE001 - the health report must not take the executor down
            try:
                self._counters.count('diagnostics_failures')
                self._counters.warnings.warning('diagnostics_failed', f'/diagnostics report failed: '
                                                f'{type(exc).__name__}: {exc}')
            except Exception:  # noqa: BLE001 - e.g. the logger is gone during shutdown: nothing more to do
                return
