"""The counters and the rate-limited warnings that ``lsm_node``'s parts share (no rclpy): what
:meth:`LsmNode.statistics() <lsm_ros.ros.node.LsmNode.statistics>` reports as ``counts``, ``rejected`` and
``inactive_drops``, and the once-only info lines.

Every part (:mod:`~lsm_ros.ros.inputs`, :mod:`~lsm_ros.ros.worker`, :mod:`~lsm_ros.ros.publishers`,
:mod:`~lsm_ros.ros.service_host`) counts and warns through one :class:`NodeCounters`, so one lock guards them all and
a test can intercept every warning at :attr:`NodeCounters.warnings`.
"""
from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Protocol

from lsm_ros.ros.sync import RateLimitedLog


class Logger(Protocol):
    """What the parts need of a logger (an rclpy logger or ``logging.Logger``)."""

    def info(self, message: str) -> Any: ...

    def warning(self, message: str) -> Any: ...

    def error(self, message: str) -> Any: ...


LoggerSource = Callable[[], Logger]   # looked up at every call: the node's get_logger (which a test may replace)


class NodeCounters:
    """Thread-safe counters of one node: ``counts`` (events by key), ``rejected`` (pairs by reason), images received
    while not active, and the keys of the info lines logged once. ``get_logger()`` gives the logger at every call;
    :attr:`warnings` logs repeated warnings of one key at most once per ``log_throttle_s``."""

    def __init__(self, get_logger: LoggerSource, log_throttle_s: float) -> None:
        self.lock = threading.Lock()
        self.get_logger = get_logger
        self.warnings = RateLimitedLog(get_logger(), log_throttle_s)
        self._counts: collections.Counter[str] = collections.Counter()
        self._rejected: collections.Counter[str] = collections.Counter()
        self._inactive_drops = 0
        self._once: set[str] = set()

    def count(self, key: str) -> None:
        """One more ``key`` event (``statistics()['counts'][key]``)."""
        with self.lock:
            self._counts[key] += 1

    def count_rejected(self, reason: str) -> None:
        """One more pair rejected for ``reason``, without a warning (the caller logs)."""
        with self.lock:
            self._rejected[reason] += 1

    def reject(self, reason: str, message: str) -> None:
        """One more pair rejected for ``reason``; ``message`` is warned (rate-limited per reason)."""
        self.count_rejected(reason)
        self.warnings.warning(reason, message)

    def inactive_drop(self) -> None:
        """One more image received while the node does not process."""
        with self.lock:
            self._inactive_drops += 1

    def info_once(self, key: str, message: str) -> None:
        """Log ``message`` at info level the first time ``key`` is seen (again after :meth:`forget_once`)."""
        with self.lock:
            if key in self._once:
                return
            self._once.add(key)
        self.get_logger().info(message)

    def forget_once(self, key: str) -> None:
        """Let :meth:`info_once` log ``key`` again."""
        with self.lock:
            self._once.discard(key)

    def snapshot(self) -> tuple[dict[str, int], dict[str, int], int]:
        """(counts, rejected, inactive drops), copies taken together."""
        with self.lock:
            return dict(self._counts), dict(self._rejected), self._inactive_drops
