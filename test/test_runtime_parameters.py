"""Runtime parameter changes of lsm_node over loopback: a SetParameters request with several parameters is all or
nothing (one bad value: none applied, the reason says which and why), through rclpy's parameter client and through
``node.set_parameters``; and a pair is processed with one snapshot of the parameters even while they change: its
reconstruction (pipeline parameters) and its publishing (node parameters) never mix old and new values.

Consistency is read from the products: the pair's Reconstruction carries the ``min_confidence`` it was made with,
and its ~/info ``num_points`` is the number of its points at the ``point_stride`` it was published with. The two
parameters only ever change together between the COMBINATIONS below, so every pair's (min_confidence,
point_stride) must be one of them.
"""
from __future__ import annotations

import threading
from typing import Any, Iterator

import pytest
from conftest import NODE_TIMEOUT_S, NodeHarness, harness_fixture, wait_until
from rclpy.parameter import Parameter

pytestmark = pytest.mark.timeout(120)
COMBINATIONS = {1.0: 1, 1.5: 2}     # min_confidence -> point_stride: they only change together


class ParameterHarness(NodeHarness):
    """lsm_node (tiny DUSt3R) in namespace ``params``, a stereo publisher, and a client node with rclpy's parameter
    client of lsm_node (``parameters``, ``set_parameters``) and a ~/info subscription."""

    def __init__(self, context: Any, reconstructor: Any) -> None:
        super().__init__(context, reconstructor, namespace='params')

    def discovered(self) -> bool:
        return super().discovered() and self.parameters.services_are_ready()

    def set_combination(self, min_confidence: float) -> None:
        results = self.set_parameters(min_confidence=min_confidence, point_stride=COMBINATIONS[min_confidence])
        assert all(r.successful for r in results), [r.reason for r in results]

    def values(self, *names: str) -> tuple[Any, ...]:
        return tuple(self.node.get_parameter(name).value for name in names)


graph = harness_fixture(ParameterHarness)


@pytest.fixture
def recorded_results(graph: ParameterHarness) -> Iterator[list[Any]]:
    """Every Reconstruction the node makes while the test runs, in order (the reconstructor is wrapped)."""
    reconstructor = graph.node.reconstructor
    reconstruct = reconstructor.reconstruct
    results: list[Any] = []

    def recording_reconstruct(*args: Any, **kwargs: Any) -> Any:
        result = reconstruct(*args, **kwargs)
        results.append(result)
        return result

    reconstructor.reconstruct = recording_reconstruct     # instance attribute, removed below
    try:
        yield results
    finally:
        del reconstructor.reconstruct
        graph.set_combination(1.0)


def _published_with_one_snapshot(info: Any, result: Any) -> int:
    """The point_stride the pair was published with, checked to be the one of its min_confidence."""
    counts = {stride: len(result.points(stride=stride)['xyz']) for stride in set(COMBINATIONS.values())}
    assert len(set(counts.values())) == len(counts), counts         # the strides are told apart by the count
    strides = [stride for stride, count in counts.items() if count == info.num_points]
    assert strides == [COMBINATIONS[result.min_confidence]], (result.min_confidence, info.num_points, counts)
    return strides[0]


def test_a_set_parameters_request_is_all_or_nothing(graph: ParameterHarness) -> None:
    before = graph.values('point_stride', 'min_confidence', 'publish_tf')
    generation = graph.node._lsm_params.snapshot.generation
    for bad, fragment in ((dict(min_confidence=0.5), 'min_confidence'), (dict(resolution=512), 'read-only'),
                          (dict(sync_tolerance_s='fast'), 'sync_tolerance_s'),
                          (dict(labels=['chair', 'Chair']), 'labels')):
        results = graph.set_parameters(point_stride=2, publish_tf=True, **bad)
        assert len(results) == 3 and not any(r.successful for r in results), bad
        assert all(fragment in r.reason and 'none of the 3 parameters' in r.reason for r in results), \
            [r.reason for r in results]
        assert graph.values('point_stride', 'min_confidence', 'publish_tf') == before        # none applied
        assert graph.node.node_config.point_stride == 1 and not graph.node.node_config.publish_tf
    assert graph.node._lsm_params.snapshot.generation == generation

    results = graph.set_parameters(point_stride=2, min_confidence=1.5, publish_tf=True)
    try:
        assert [r.successful for r in results] == [True, True, True]
        assert graph.values('point_stride', 'min_confidence', 'publish_tf') == (2, 1.5, True)
        assert graph.node._lsm_params.snapshot.generation == generation + 1    # one new snapshot for the request
        assert graph.node.node_config.point_stride == 2 and graph.node.reconstructor.config.min_confidence == 1.5
    finally:
        assert all(r.successful for r in graph.set_parameters(point_stride=1, min_confidence=1.0, publish_tf=False))

    future = graph.parameters.set_parameters_atomically([Parameter('point_stride', value=3),
                                                         Parameter('max_input_age_s', value=-1.0)])
    assert wait_until(future.done, NODE_TIMEOUT_S)
    assert not future.result().result.successful and 'max_input_age_s' in future.result().result.reason
    assert graph.values('point_stride', 'max_input_age_s') == (1, 0.0)


def test_node_set_parameters_with_several_parameters_is_all_or_nothing(graph: ParameterHarness) -> None:
    node = graph.node
    results = node.set_parameters([Parameter('point_stride', value=4), Parameter('overlay_alpha', value=2.0)])
    assert len(results) == 2 and not any(r.successful for r in results)
    assert 'overlay_alpha' in results[0].reason and 'none of the 2 parameters' in results[0].reason
    assert graph.values('point_stride', 'overlay_alpha') == (1, 0.5)
    results = node.set_parameters([Parameter('point_stride', value=4), Parameter('overlay_alpha', value=0.25)])
    try:
        assert all(r.successful for r in results) and graph.values('point_stride', 'overlay_alpha') == (4, 0.25)
    finally:
        assert all(r.successful for r in node.set_parameters([Parameter('point_stride', value=1),
                                                              Parameter('overlay_alpha', value=0.5)]))
    [single] = node.set_parameters([Parameter('point_stride', value=0)])     # one parameter: rclpy's own result
    assert not single.successful and 'point_stride' in single.reason


def test_a_pair_keeps_its_parameters_when_they_change_during_its_processing(
        graph: ParameterHarness, stereo_frames: list[Any], recorded_results: list[Any]) -> None:
    """Deterministic: the parameters change while each pair is inside the reconstructor, once before its forward
    reads the pipeline config and once after it, from the executor (the SetParameters service) while the worker
    waits."""
    node = graph.node
    reconstructor = node.reconstructor
    reconstruct = reconstructor.reconstruct          # the recording one
    flips: list[float] = []

    def flip() -> None:
        target = 1.5 if graph.values('min_confidence')[0] == 1.0 else 1.0
        graph.set_combination(target)                # a service call, answered on an executor thread
        flips.append(target)

    def changing_reconstruct(*args: Any, **kwargs: Any) -> Any:
        flip()                                       # before the forward reads its config
        result = reconstruct(*args, **kwargs)
        flip()                                       # after the forward, before the products are published
        return result

    reconstructor.reconstruct = changing_reconstruct
    try:
        for index, formed_with in enumerate((1.0, 1.5)):
            graph.set_combination(formed_with)
            stamp_ns = graph.publish(stereo_frames[index % len(stereo_frames)])
            info = graph.info(stamp_ns)
            result = recorded_results[-1]
            assert result.min_confidence == formed_with            # the forward used the pair's snapshot
            assert _published_with_one_snapshot(info, result) == COMBINATIONS[formed_with]
            # the changes made meanwhile are in force for the next pair
            assert reconstructor.config.min_confidence == graph.values('min_confidence')[0] == formed_with
    finally:
        reconstructor.reconstruct = reconstruct
    assert len(flips) == 4


def test_pairs_stay_consistent_under_a_storm_of_parameter_changes(
        graph: ParameterHarness, stereo_frames: list[Any], recorded_results: list[Any]) -> None:
    node = graph.node
    stop = threading.Event()
    changes, refused = [0], []

    def storm() -> None:
        target = 1.5
        while not stop.is_set():
            results = node.set_parameters([Parameter('min_confidence', value=target),
                                           Parameter('point_stride', value=COMBINATIONS[target])])
            refused.extend(r.reason for r in results if not r.successful)
            changes[0] += 1
            target = 2.5 - target
            stop.wait(0.02)

    thread = threading.Thread(target=storm, name='test_parameter_storm', daemon=True)
    thread.start()
    try:
        for index in range(3):
            stamp_ns = graph.publish(stereo_frames[index % len(stereo_frames)])
            info = graph.info(stamp_ns)
            _published_with_one_snapshot(info, recorded_results[-1])
    finally:
        stop.set()
        thread.join(10.0)
    assert changes[0] > 10 and refused == [] and len(recorded_results) == 3
    assert node.statistics()['worker']['failed'] == 0
