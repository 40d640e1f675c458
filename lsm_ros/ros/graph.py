"""An in-process ROS graph: an rclpy Context, a multi-threaded executor spinning in a thread, and its nodes.

Used by the demo, the bench's ROS mode, the load scenario and the tests::

    with RosGraph(name='lsm_demo') as graph:          # owns a fresh, initialised Context
        node = graph.add(LsmNode(reconstructor, context=graph.context))
        wait_until(lambda: ..., timeout_s=30.0)
    # executor stopped, spin thread joined, nodes destroyed (newest first), Context shut down

``RosGraph(context)`` borrows a Context (a test module's): closing the graph then leaves that Context running.
Set the localhost-only environment (:mod:`lsm_ros.ros.isolation`) before the first graph of a process.

The executor is :class:`SteadyMultiThreadedExecutor`: rclpy's MultiThreadedExecutor (9.1, Kilted) without its busy
loop, which under a 30 Hz image stream could hold the GIL for seconds and stall ``lsm_node``'s inference thread
(see the class).
"""
from __future__ import annotations

import logging
import threading
import time
from types import TracebackType
from typing import Any, Callable, Mapping

import rclpy
from rclpy.executors import (ConditionReachedException, ExternalShutdownException, MultiThreadedExecutor,
                             ShutdownException, TimeoutException)

_log = logging.getLogger(__name__)

DEFAULT_EXECUTOR_THREADS = 3   # image callbacks, a ~/query and a ~/render at once
DEFAULT_POLL_S = 0.02
QUEUED_TASK_WAIT_S = 0.05      # longest pause of the spin thread while a yielded task waits for a pool thread


def wait_until(predicate: Callable[[], bool], timeout_s: float, poll_s: float = DEFAULT_POLL_S) -> bool:
    """Poll ``predicate`` every ``poll_s`` until it is true (True) or ``timeout_s`` passed (False, after one last
    look)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return bool(predicate())


def remap_arguments(topics: Mapping[str, str]) -> list[str]:
    """``--ros-args -r a:=b ...`` for a node's ``cli_args``: remap each topic to its target."""
    return ['--ros-args'] + [arg for source, target in topics.items() for arg in ('-r', f'{source}:={target}')]


class SteadyMultiThreadedExecutor(MultiThreadedExecutor):
    """rclpy's MultiThreadedExecutor, except that a task is handed to the thread pool once.

    rclpy 9.1's ``wait_for_ready_callbacks`` yields every task that is neither executing nor done, including tasks
    that were already handed to the thread pool and wait in its queue for a free thread; the stock
    ``_spin_once_impl`` queues them again and polls again at once (ros2/rclpy#1452). That loop runs Python without
    pause and holds the GIL that the pool threads need to start the queued tasks, so the tasks stay queued and the
    loop goes on: a self-sustaining state in which the spin thread takes a whole core (measured: up to 9,700
    spins/s, 99.5 % of them re-queued tasks) and every other Python thread of the process gets the GIL only now
    and then (lsm_node's inference thread: 0.06 instead of 0.6 core, a pair 10 s instead of 1 s; images lost).
    Here a yielded task that is still queued is not queued again: the spin thread waits until a pool thread starts
    a task (at most QUEUED_TASK_WAIT_S) and then goes on. ``requeues_avoided`` counts those waits.
    :meth:`wait_for_pool` waits until the pool has no task left (before a shutdown: rclpy's shutdown destroys the
    guard condition that tasks still running then trigger).
    """

    def __init__(self, num_threads: int | None = None, *, context: Any = None) -> None:
        super().__init__(num_threads, context=context)
        self._pool_started = threading.Condition()
        self._queued: set[Any] = set()       # tasks handed to the pool that no pool thread has started yet
        self._in_pool = 0                    # tasks handed to the pool and not finished
        self.requeues_avoided = 0

    def _spin_once_impl(self, timeout_sec: Any = None, wait_condition: Callable[[], bool] = lambda: False) -> None:
        try:
            handler, _, _ = self.wait_for_ready_callbacks(timeout_sec, None, wait_condition)
        except (ExternalShutdownException, ShutdownException, TimeoutException, ConditionReachedException):
            return
        with self._pool_started:
            if handler in self._queued:
                self.requeues_avoided += 1
                self._pool_started.wait(QUEUED_TASK_WAIT_S)
                return
            self._queued.add(handler)
            self._in_pool += 1
        try:
            self._executor.submit(self._start, handler)
        except RuntimeError:                   # the pool was shut down meanwhile (executor shutdown)
            self._finished(handler)
            if self._is_shutdown:
                return
            raise
        self._futures.append(handler)
        for future in self._futures[:]:
            if future.done():
                self._futures.remove(future)
                future.result()                # raise a callback's exception, as rclpy does

    def _start(self, task: Any) -> None:
        """Pool thread: the task leaves the queue (the spin thread may go on), then runs."""
        with self._pool_started:
            self._queued.discard(task)
            self._pool_started.notify_all()
        try:
            task()
        finally:
            self._finished(task)

    def _finished(self, task: Any) -> None:
        with self._pool_started:
            self._queued.discard(task)
            self._in_pool -= 1
            self._pool_started.notify_all()

    def wait_for_pool(self, timeout_s: float | None = None) -> bool:
        """Block until no task is queued in or run by the pool (True), or ``timeout_s`` passed (False)."""
        with self._pool_started:
            return self._pool_started.wait_for(lambda: self._in_pool == 0, timeout_s)


class RosGraph:
    """Nodes spun by a :class:`SteadyMultiThreadedExecutor` in a background thread, on an owned or a borrowed
    rclpy Context.

    :meth:`add` adds a node (the executor starts spinning with the first one); :meth:`close` (also on leaving a
    ``with`` block) takes the nodes out of the executor, waits for the callbacks still running, stops the executor
    and its threads, joins the spin thread, destroys the nodes newest first (an :class:`~lsm_ros.ros.node.LsmNode`
    stops its inference thread there) and shuts an owned Context down. ``close`` is idempotent and goes on past a
    node that fails to be destroyed. ``steady=False`` spins with rclpy's stock MultiThreadedExecutor instead (to
    compare).
    """

    def __init__(self, context: Any | None = None, *, num_threads: int = DEFAULT_EXECUTOR_THREADS,
                 name: str = 'lsm_ros_graph', shutdown_timeout_s: float = 5.0, steady: bool = True) -> None:
        self.owns_context = context is None
        if context is None:
            context = rclpy.Context()
            rclpy.init(context=context, args=[])
        self.context = context
        self.shutdown_timeout_s = shutdown_timeout_s
        self.nodes: list[Any] = []
        try:
            executor_class = SteadyMultiThreadedExecutor if steady else MultiThreadedExecutor
            self.executor = executor_class(num_threads, context=context)
        except BaseException:
            if self.owns_context:
                context.try_shutdown()
            raise
        self._thread = threading.Thread(target=self._spin, name=f'{name}_executor', daemon=True)
        self._closed = False
        self._lock = threading.Lock()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass

    def add(self, node: Any) -> Any:
        """Spin ``node`` (created on :attr:`context`) from now on; returns it. Destroyed by :meth:`close`."""
        with self._lock:
            if self._closed:
                raise RuntimeError('RosGraph is closed')
            self.nodes.append(node)
            self.executor.add_node(node)
            if not self._thread.is_alive():
                self._thread.start()
        return node

    @property
    def spinning(self) -> bool:
        """True while the spin thread runs."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Tear down in order: nodes out of the executor, its running callbacks finished, executor, spin thread,
        nodes destroyed (newest first), owned Context."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        timeout_s = self.shutdown_timeout_s
        for node in self.nodes:
            self.executor.remove_node(node)
        if isinstance(self.executor, SteadyMultiThreadedExecutor) and not self.executor.wait_for_pool(timeout_s):
            _log.warning('executor callbacks still running after %.1f s', timeout_s)
        if not self.executor.shutdown(timeout_sec=timeout_s):
            _log.warning('executor callbacks still running after %.1f s', timeout_s)
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                _log.warning('the executor thread did not end within %.1f s', timeout_s)
        for node in reversed(self.nodes):
            try:
                node.destroy_node()
            except Exception as exc:  # noqa: BLE001 - the other nodes and the Context must still go
                _log.warning('destroying node %s failed: %s: %s', _node_name(node), type(exc).__name__, exc)
        self.nodes.clear()
        if self.owns_context:
            self.context.try_shutdown()

    def __enter__(self) -> 'RosGraph':
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def _node_name(node: Any) -> str:
    try:
        return str(node.get_fully_qualified_name())
    except Exception:  # noqa: BLE001 - only for a log line
        return repr(node)
