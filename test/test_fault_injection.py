"""Faults inside lsm_node's inference over loopback: a wrapper around the real reconstructor (tiny untrained LSM)
raises on chosen pairs, an exception or running out of memory (torch.OutOfMemoryError, torch.cuda.OutOfMemoryError,
MemoryError). Each failed pair is dropped and counted by reason, a burst is logged once (its first failure) and its
end once ('recovered after N failed pairs'), running out of memory releases cached memory, ~/query and ~/render keep
answering from the last good reconstruction, and the next good pair is processed normally.
"""
from __future__ import annotations

import functools
import gc
import threading
from typing import Any

import pytest
import torch
from conftest import NodeHarness, NodeLogs, harness_fixture, make_lsm_node
from rclpy.lifecycle import TransitionCallbackReturn

from lsm_ros.ros import conversions
from lsm_ros.ros import node as lsm

pytestmark = pytest.mark.timeout(120)
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


def answered_stamps(graph: NodeHarness) -> tuple[int, int]:
    """The stamps of the reconstruction a ~/query and a ~/render answer from (both must succeed)."""
    query, render = graph.query(), graph.render()
    assert query.success, query.message
    assert render.success, render.message
    return conversions.stamp_to_nanoseconds(query.stamp), conversions.stamp_to_nanoseconds(render.stamp)


# lsm_node (tiny LSM) in namespace ``faults``, a stereo publisher, and a client node with ~/query and ~/render
# clients and a ~/info subscription
graph = harness_fixture(functools.partial(NodeHarness, namespace='faults'), 'tiny_lsm_reconstructor')


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
        graph: NodeHarness, stereo_frames: list[Any], monkeypatch: pytest.MonkeyPatch, released: list[str]) -> None:
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
        assert answered_stamps(graph) == (good, good)

        failed = []
        for frame, reason in zip(frames[1:5], (lsm.REJECT_RECONSTRUCTION, lsm.REJECT_OUT_OF_MEMORY,
                                               lsm.REJECT_OUT_OF_MEMORY, lsm.REJECT_RECONSTRUCTION)):
            failed.append(graph.reject(frame, reason))
            assert answered_stamps(graph) == (good, good)     # served from the last good reconstruction
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
        assert answered_stamps(graph) == (recovered, recovered)

        second = graph.reject(frames[6], lsm.REJECT_OUT_OF_MEMORY)   # a new burst is logged again
        errors = logs.messages('error', FAILURE_LOG)
        assert len(errors) == 2 and 'ran out of memory: OutOfMemoryError' in errors[1]
        assert released == ['cpu'] * 3
        last = graph.play(frames[7])
        assert logs.messages('info', 'recovered after') == ['recovered after 4 failed pairs',
                                                            'recovered after 1 failed pair']
        assert answered_stamps(graph) == (last, last)
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
    monkeypatch.setattr(gc, 'collect', lambda *args: calls.append('gc') or 0)
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
