"""Load test (``pytest -m load``): lsm_node with the tiny LSM under a 30 Hz stereo stream for minutes
($LSM_ROS_LOAD_TEST_S, default 180 s), inference slowed by 0.3 s per pair so that the latest-pair-wins path drops
pairs, and a client asking ~/query and ~/render once per second. Memory, latency, drops and answers stay bounded
(the scenario and its bounds: lsm_ros/ros/load_test.py; the same as scripts/load_test.py).

The quick tests below check the parts: the graph helper and its executor (no task queued twice: the fix of the
stall that the load test would otherwise show), the hook that slows or gates ``reconstruct``, and that the checks
of a run catch a leak, a backlog, lost answers and a worker queue.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node

from lsm_ros.ros.graph import RosGraph, SteadyMultiThreadedExecutor, wait_until
from lsm_ros.ros.load_test import (LoadTestConfig, LoadTestResult, RequestLog, added_inference_delay,
                                   format_figures, reconstruct_hook, run_load_test)

_log = logging.getLogger(__name__)
LOAD_CONFIG = LoadTestConfig.from_environment()


# ---------------------------------------------------------------------------------------------- the parts
def test_wait_until_polls_until_true_or_the_timeout() -> None:
    values = iter([False, False, True])
    assert wait_until(lambda: next(values), 5.0, poll_s=0.001)
    started = time.monotonic()
    assert not wait_until(lambda: False, 0.1, poll_s=0.01)
    assert 0.1 <= time.monotonic() - started < 2.0


class _RecordingNode(Node):
    def __init__(self, name: str, context: Any, destroyed: list[str]) -> None:
        super().__init__(name, context=context)
        self._destroyed = destroyed

    def destroy_node(self) -> None:
        self._destroyed.append(self.get_name())
        super().destroy_node()


def test_ros_graph_spins_and_tears_down_in_order(ros_context: Any) -> None:
    destroyed: list[str] = []
    ticks = threading.Event()
    with RosGraph(ros_context, name='test_graph') as graph:
        assert isinstance(graph.executor, SteadyMultiThreadedExecutor) and not graph.spinning
        first = graph.add(_RecordingNode('graph_first', ros_context, destroyed))
        graph.add(_RecordingNode('graph_second', ros_context, destroyed))
        first.create_timer(0.01, ticks.set)
        assert graph.spinning and ticks.wait(10.0)
    assert destroyed == ['graph_second', 'graph_first'] and not graph.spinning and not graph.nodes
    assert ros_context.ok()                                 # borrowed: left running
    graph.close()                                           # idempotent
    with pytest.raises(RuntimeError, match='closed'):
        graph.add(Node('graph_late', context=ros_context))

    owned = RosGraph(name='test_owned')
    context = owned.context
    owned.add(Node('graph_owned', context=context))
    assert context.ok() and owned.owns_context
    owned.close()
    assert not context.ok() and not owned.spinning


def test_steady_executor_queues_a_task_once_and_runs_every_callback(ros_context: Any) -> None:
    """A slow callback holds one of two pool threads while a fast timer keeps firing: rclpy 9.1 yields tasks that
    wait in the pool's queue again (the stock executor queues them again: hundreds of times here); none may be
    handed to the pool twice, every callback still runs, and the teardown waits for the running callbacks."""
    graph = RosGraph(ros_context, num_threads=2, name='test_steady')
    pool = graph.executor._executor
    submitted: list[Any] = []         # the tasks themselves: alive, so that their ids are not reused
    submit = pool.submit

    def counting_submit(fn: Any, task: Any) -> Any:
        submitted.append(task)
        return submit(fn, task)

    pool.submit = counting_submit
    fast_ticks: list[float] = []
    slow_runs: list[float] = []
    group = ReentrantCallbackGroup()

    def slow() -> None:
        time.sleep(0.2)
        slow_runs.append(time.monotonic())

    try:
        node = graph.add(Node('steady_executor_test', context=ros_context))
        node.create_timer(0.002, lambda: fast_ticks.append(time.monotonic()), callback_group=group)
        node.create_timer(0.1, slow, callback_group=group)
        assert wait_until(lambda: len(fast_ticks) > 100 and len(slow_runs) >= 3, 60.0), (len(fast_ticks), slow_runs)
    finally:
        graph.close()
    queued_again = len(submitted) - len({id(task) for task in submitted})
    assert queued_again == 0, f'{queued_again} tasks handed to the pool twice'
    assert graph.executor.requeues_avoided > 0, 'rclpy no longer yields queued tasks again: the workaround can go'
    assert graph.executor.wait_for_pool(0.0)


def test_reconstruct_hook_wraps_and_restores() -> None:
    class Reconstructor:
        def reconstruct(self, value: int) -> int:
            return value + 1

    reconstructor = Reconstructor()
    calls: list[str] = []
    with reconstruct_hook(reconstructor, lambda: calls.append('hook')):
        assert reconstructor.reconstruct(1) == 2 and calls == ['hook']
    assert 'reconstruct' not in vars(reconstructor) and reconstructor.reconstruct(1) == 2 and calls == ['hook']

    reconstructor.reconstruct = lambda value: value * 10          # an instance attribute is put back
    own = reconstructor.reconstruct
    with added_inference_delay(reconstructor, 0.05):
        started = time.monotonic()
        assert reconstructor.reconstruct(3) == 30 and time.monotonic() - started >= 0.05
    assert reconstructor.reconstruct is own


def _result(**changes: Any) -> LoadTestResult:
    """A clean 120 s run (RSS flat after the warm-up), with ``changes`` applied."""
    config = LoadTestConfig(duration_s=120.0, warmup_s=30.0)
    values: dict[str, Any] = dict(
        config=config, published=3600, stream_wall_s=120.0, latencies_s=[1.0 + 0.01 * (i % 7) for i in range(100)],
        points_received=100,
        rss_samples=[(t, 1400.0 + (20.0 if t < 30 else 0.0) * t / 30 + (t % 10) * 0.1) for t in range(0, 121, 5)],
        node=dict(counts=dict(pairs=3580, left_images=3590, processed=100), worker=dict(dropped=3470, failed=0),
                  rejected={}, sync_drops={}),
        max_outstanding=2, stamps_increasing=True,
        queries=RequestLog(sent=120, succeeded=120, answer_s=[0.1] * 120),
        renders=RequestLog(sent=120, succeeded=120, answer_s=[0.2] * 120),
        gil=dict(median_ms=0.1, p99_ms=5.0, max_ms=50.0, over_100ms=0, over_1s=0), requeues_avoided=10)
    values.update(changes)
    return LoadTestResult(**values)


def test_load_checks_catch_a_leak_a_backlog_lost_answers_and_a_queue() -> None:
    clean = _result()
    assert clean.failures() == [], clean.failures()
    figures = clean.figures()
    assert abs(figures['rss_growth_mb']) < 1 and abs(figures['rss_slope_mb_per_min']) < 1
    assert figures['latency_p95_s'] < 1.1 and figures['received_fraction'] > 0.99
    assert 'RSS after warm-up' in format_figures(figures)

    leak = _result(rss_samples=[(t, 1400.0 + 3.0 * t) for t in range(0, 121, 5)])     # 3 MB/s = 180 MB/min
    [problem] = leak.failures()
    assert 'RSS grew by 225 MB' in problem and 'slope 180.0 MB/min' in problem, problem

    backlog = _result(latencies_s=[0.5 * i for i in range(100)])
    assert any('latency max 49.50 s' in p for p in backlog.failures())
    lost = _result(queries=RequestLog(sent=120, succeeded=118, answer_s=[0.1] * 119, failures=['boom'], lost=1))
    assert sum('~/query' in p for p in lost.failures()) == 2
    assert any('3 pairs outstanding' in p for p in _result(max_outstanding=3).failures())
    assert any('but 90 ~/points received' in p for p in _result(points_received=90).failures())
    no_drops = _result(node=dict(counts=dict(pairs=100, processed=100), worker=dict(dropped=0)))
    assert any('latest-pair-wins path was not exercised' in p for p in no_drops.failures())
    starved = _result(node=dict(counts=dict(pairs=1000, processed=100), worker=dict(dropped=900)))
    assert any('formed 1000 pairs of 3600' in p for p in starved.failures())


def test_load_duration_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('LSM_ROS_LOAD_TEST_S', '42')
    assert LoadTestConfig.from_environment().duration_s == 42.0
    assert LoadTestConfig.from_environment(duration_s=7).duration_s == 7
    monkeypatch.delenv('LSM_ROS_LOAD_TEST_S')
    assert LoadTestConfig.from_environment().duration_s == 180.0 and LoadTestConfig().rss_warmup_s == 30.0
    for bad in ('soon', '-1', '0'):
        monkeypatch.setenv('LSM_ROS_LOAD_TEST_S', bad)
        with pytest.raises(ValueError, match='LSM_ROS_LOAD_TEST_S'):
            LoadTestConfig.from_environment()


# ---------------------------------------------------------------------------------------------- the load test
@pytest.mark.load
@pytest.mark.timeout(int(LOAD_CONFIG.duration_s) + 900)
def test_lsm_node_under_load_keeps_memory_latency_and_answers_bounded(
        tiny_lsm_reconstructor: Any, tmp_path: Path, record_property: Any) -> None:
    result = run_load_test(tiny_lsm_reconstructor, LOAD_CONFIG)
    figures = result.figures()
    failures = result.failures()
    path = tmp_path / 'load_test.json'
    path.write_text(json.dumps(dict(result.to_dict(), failures=failures), indent=1, default=str))
    for key, value in figures.items():
        record_property(key, json.dumps(value) if isinstance(value, dict) else value)
    text = format_figures(figures)
    _log.info('load test figures (%s):\n%s', path, text)
    print(f'\nload test ({path}):\n{text}')            # shown with -s
    assert not failures, '\n'.join(failures) + '\n' + text
    assert figures['published'] >= 0.95 * LOAD_CONFIG.rate_hz * LOAD_CONFIG.duration_s
    assert figures['queries']['succeeded'] == figures['queries']['sent'] >= LOAD_CONFIG.duration_s / 2
    assert figures['renders']['succeeded'] == figures['renders']['sent'] >= LOAD_CONFIG.duration_s / 2
    assert np.isfinite(figures['rss_slope_mb_per_min'])
