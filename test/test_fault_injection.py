"""Faults inside lsm_node's inference over loopback: a wrapper around the real reconstructor (tiny untrained LSM)
raises on chosen pairs, an exception or running out of memory (torch.OutOfMemoryError, torch.cuda.OutOfMemoryError,
MemoryError). Each failed pair is dropped and counted by reason, a burst is logged once (its first failure) and its
end once ('recovered after N failed pairs'), running out of memory releases cached memory, ~/query and ~/render keep
answering from the last good reconstruction, and the next good pair is processed normally.
"""
from __future__ import annotations

import threading
from typing import Any, Iterator

import pytest
import torch
from conftest import SpinningExecutor, StereoPublisher, make_lsm_node, wait_until
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from test_lifecycle import NodeLogs

from lsm_ros.msg import ReconstructionInfo
from lsm_ros.ros import conversions
from lsm_ros.ros import node as lsm
from lsm_ros.srv import RenderView, TextQuery

pytestmark = pytest.mark.timeout(120)
TIMEOUT_S = 60.0                    # generous: the 2-core machine may be shared
STAMP_STEP_NS = 1_000_000_000
FAILURE_LOG = 'reconstruction of the pair at'


class FaultyReconstruct:
    """Stands in for ``reconstructor.reconstruct`` (an instance attribute): call i raises ``plan[i]`` when planned,
    else reconstructs."""

    def __init__(self, reconstructor: Any, plan: dict[int, BaseException]) -> None:
        self._reconstruct = reconstructor.reconstruct
        self.plan = plan
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            call, self.calls = self.calls, self.calls + 1
        error = self.plan.get(call)
        if error is not None:
            raise error
        return self._reconstruct(*args, **kwargs)


class FaultGraph:
    """lsm_node (tiny LSM) in namespace ``faults``, a stereo publisher, and a client node with ~/query and ~/render
    clients and a ~/info subscription."""

    def __init__(self, context: Any, reconstructor: Any) -> None:
        self.executor = SpinningExecutor(context)
        self.node = self.executor.add(make_lsm_node(reconstructor, context, namespace='faults'))
        self.client = self.executor.add(Node('test_fault_client', context=context))
        self.query_client = self.client.create_client(TextQuery, self.node.query_service_name())
        self.render_client = self.client.create_client(RenderView, self.node.render_service_name())
        self.infos: list[Any] = []
        self._lock = threading.Lock()
        self.client.create_subscription(ReconstructionInfo, self.node.output_topic_names()[lsm.INFO_TOPIC],
                                        self._keep_info, QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE))
        self.publisher = StereoPublisher(context)
        self.executor.add(self.publisher.node)
        self.last_stamp_ns = 0
        assert wait_until(lambda: self.publisher.connected() and self.query_client.service_is_ready()
                          and self.render_client.service_is_ready(), 30.0), 'discovery failed'

    def _keep_info(self, msg: Any) -> None:
        with self._lock:
            self.infos.append(msg)

    def info_stamps(self) -> set[int]:
        with self._lock:
            return {conversions.stamp_to_nanoseconds(m.header.stamp) for m in self.infos}

    def publish(self, frame: Any) -> int:
        stamp_ns = max(frame.stamp_ns, self.last_stamp_ns + STAMP_STEP_NS)
        self.last_stamp_ns = stamp_ns
        return self.publisher.publish(frame, stamp_ns)

    def play(self, frame: Any) -> int:
        """Publish a frame that reconstructs: wait for its ~/info."""
        stamp_ns = self.publish(frame)
        assert wait_until(lambda: stamp_ns in self.info_stamps(), TIMEOUT_S), self.node.statistics()
        return stamp_ns

    def fail(self, frame: Any, reason: str) -> int:
        """Publish a frame whose inference fails: wait until it is counted under ``reason``."""
        before = self.node.statistics()['rejected'].get(reason, 0)
        stamp_ns = self.publish(frame)
        assert wait_until(lambda: self.node.statistics()['rejected'].get(reason, 0) == before + 1, TIMEOUT_S), \
            (reason, self.node.statistics())
        return stamp_ns

    def call(self, client: Any, request: Any) -> Any:
        future = client.call_async(request)
        assert wait_until(future.done, TIMEOUT_S), f'no answer to {request}'
        return future.result()

    def answered_stamps(self) -> tuple[int, int]:
        """The stamps of the reconstruction a ~/query and a ~/render answer from (both must succeed)."""
        query = self.call(self.query_client, TextQuery.Request(phrases=['chair', 'table']))
        render = self.call(self.render_client, RenderView.Request(width=32, height=24, channels=['alpha']))
        assert query.success, query.message
        assert render.success, render.message
        return conversions.stamp_to_nanoseconds(query.stamp), conversions.stamp_to_nanoseconds(render.stamp)


@pytest.fixture(scope='module')
def graph(ros_context: Any, tiny_lsm_reconstructor: Any) -> Iterator[FaultGraph]:
    graph = FaultGraph(ros_context, tiny_lsm_reconstructor)
    try:
        yield graph
    finally:
        graph.executor.close()


@pytest.fixture
def released(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The devices :func:`lsm_ros.ros.node.release_cached_memory` was called for (it still runs)."""
    calls: list[str] = []
    release = lsm.release_cached_memory

    def spy(device: torch.device) -> None:
        calls.append(device.type)
        release(device)

    monkeypatch.setattr(lsm, 'release_cached_memory', spy)
    return calls


def test_failed_pairs_are_dropped_counted_logged_once_and_the_node_recovers(
        graph: FaultGraph, stereo_frames: list[Any], monkeypatch: pytest.MonkeyPatch, released: list[str]) -> None:
    node = graph.node
    reconstructor = node.reconstructor
    frames = [stereo_frames[i % len(stereo_frames)] for i in range(8)]
    faulty = FaultyReconstruct(reconstructor, {
        1: RuntimeError('injected failure'), 2: torch.OutOfMemoryError('CUDA out of memory (injected)'),
        3: MemoryError('injected host OOM'), 4: RuntimeError('injected failure again'),
        6: torch.cuda.OutOfMemoryError('CUDA out of memory (injected, second burst)')})
    logs = NodeLogs(node, monkeypatch)
    reconstructor.reconstruct = faulty               # instance attribute, removed below
    try:
        good = graph.play(frames[0])
        assert graph.answered_stamps() == (good, good)

        failed = []
        for frame, reason in zip(frames[1:5], (lsm.REJECT_RECONSTRUCTION, lsm.REJECT_OUT_OF_MEMORY,
                                               lsm.REJECT_OUT_OF_MEMORY, lsm.REJECT_RECONSTRUCTION)):
            failed.append(graph.fail(frame, reason))
            assert graph.answered_stamps() == (good, good)     # served from the last good reconstruction
        statistics = node.statistics()
        assert statistics['rejected'][lsm.REJECT_RECONSTRUCTION] == 2
        assert statistics['rejected'][lsm.REJECT_OUT_OF_MEMORY] == 2 == statistics['out_of_memory']
        assert statistics['failed_pairs_in_a_row'] == 4 and statistics['worker']['failed'] == 0
        assert released == ['cpu', 'cpu']                       # cached memory released after each OOM only
        [first] = logs.messages('error', FAILURE_LOG)          # the burst is logged once: its first failure
        assert 'failed: RuntimeError: injected failure.' in first and lsm.REJECT_RECONSTRUCTION in first
        assert logs.messages('info', 'recovered') == []

        recovered = graph.play(frames[5])
        assert logs.messages('info', 'recovered after') == ['recovered after 4 failed pairs']
        assert node.statistics()['failed_pairs_in_a_row'] == 0
        assert graph.answered_stamps() == (recovered, recovered)

        second = graph.fail(frames[6], lsm.REJECT_OUT_OF_MEMORY)   # a new burst is logged again
        errors = logs.messages('error', FAILURE_LOG)
        assert len(errors) == 2 and 'ran out of memory: OutOfMemoryError' in errors[1]
        assert released == ['cpu'] * 3
        last = graph.play(frames[7])
        assert logs.messages('info', 'recovered after') == ['recovered after 4 failed pairs',
                                                            'recovered after 1 failed pair']
        assert graph.answered_stamps() == (last, last)
    finally:
        del reconstructor.reconstruct
    assert faulty.calls == 8
    assert not (set(failed + [second]) & graph.info_stamps())   # nothing published for a failed pair
    statistics = node.statistics()
    assert statistics['counts']['processed'] == 3 and statistics['out_of_memory'] == 3   # pairs 0, 5 and 7
    assert statistics['lifecycle_state'] == 'active'


def test_release_cached_memory_collects_garbage_and_empties_the_cuda_cache_on_cuda(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(lsm.gc, 'collect', lambda *args: calls.append('gc') or 0)
    monkeypatch.setattr(torch.cuda, 'empty_cache', lambda: calls.append('empty_cache'))
    lsm.release_cached_memory(torch.device('cpu'))
    assert calls == ['gc']
    lsm.release_cached_memory(torch.device('cuda', 0))
    assert calls == ['gc', 'gc', 'empty_cache']


def test_out_of_memory_errors_cover_torch_and_python() -> None:
    for error in (torch.OutOfMemoryError('x'), torch.cuda.OutOfMemoryError('x'), MemoryError('x')):
        assert isinstance(error, lsm.OUT_OF_MEMORY_ERRORS)
    assert not isinstance(RuntimeError('x'), lsm.OUT_OF_MEMORY_ERRORS)


def test_a_warm_up_out_of_memory_fails_the_activation_and_the_next_one_works(
        ros_context: Any, tiny_reconstructor: Any, monkeypatch: pytest.MonkeyPatch, released: list[str]) -> None:
    node = make_lsm_node(tiny_reconstructor, ros_context, namespace='faults_warmup')
    try:
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        logs = NodeLogs(node, monkeypatch)
        tiny_reconstructor.reconstruct = FaultyReconstruct(tiny_reconstructor, {0: torch.OutOfMemoryError('injected')})
        try:
            assert node.trigger_activate() == TransitionCallbackReturn.FAILURE
            assert node.lifecycle_state == 'inactive' and released == ['cpu']
            [message] = logs.messages('error', 'activate failed')
            assert 'warm-up forward ran out of memory' in message
            assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS   # call 1 of the plan: no fault
            assert node.lifecycle_state == 'active'
        finally:
            del tiny_reconstructor.reconstruct
    finally:
        node.destroy_node()
