"""lsm_node as a managed (lifecycle) node over loopback: the transitions driven through its lifecycle services as
`ros2 lifecycle set` drives them, what each state does (entities, processing, accelerator memory, ~/query and
~/render), error recovery, the plain (self-activating) default and the torch_threads parameter.

The reconstructor is the real one with a tiny untrained LSM (``tiny_lsm_reconstructor``); this CPU machine has no
accelerator to free, so deactivation on CUDA (model moved off the GPU, services refused until activation) is
simulated by replacing the reconstructor's ``offload``/``reload`` (instance attributes, removed afterwards).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch
from conftest import (NODE_TIMEOUT_S, STEREO_REMAPS, TINY_NETWORK, TINY_PIPELINE, NodeHarness, NodeLogs,
                      gated_reconstruct, harness_fixture, make_lsm_node, wait_until)
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rclpy.lifecycle import TransitionCallbackReturn

from lsm_ros.ros import conversions
from lsm_ros.ros import node as lsm
from lsm_ros.ros import runtime

pytestmark = pytest.mark.timeout(120)
QUIET_S = 1.0                       # how long "nothing was published" is watched


MANAGED_THREADS = 1


class ManagedHarness(NodeHarness):
    """A managed lsm_node (tiny LSM) in namespace ``managed``, a stereo publisher, and a client node with the
    lifecycle, ~/query and ~/render clients and a ~/info subscription."""

    def __init__(self, context: Any, reconstructor: Any) -> None:
        self.threads_before = runtime.process_torch_threads()
        # an explicit count differing from torch's default (all cores), so that applying it is observable
        super().__init__(context, reconstructor, namespace='managed', managed=True, torch_threads=MANAGED_THREADS)

    def add_entities(self, context: Any) -> None:
        name = self.node.get_fully_qualified_name()
        self.change_state = self.client.create_client(ChangeState, f'{name}/change_state')
        self.get_state = self.client.create_client(GetState, f'{name}/get_state')

    def discovered(self) -> bool:
        """The lifecycle services (an unconfigured node subscribes nothing yet)."""
        return bool(self.change_state.service_is_ready() and self.get_state.service_is_ready())

    def close(self) -> None:
        super().close()
        torch.set_num_threads(self.threads_before)   # only if a failed test left it changed

    def request(self, transition_id: int) -> Any:
        """Ask for a transition as `ros2 lifecycle set` does; returns the future of its ChangeState call."""
        return self.change_state.call_async(ChangeState.Request(transition=Transition(id=transition_id)))

    def transition(self, transition_id: int) -> bool:
        future = self.request(transition_id)
        assert wait_until(future.done, NODE_TIMEOUT_S), f'no answer to transition {transition_id}'
        return future.result().success

    def state(self) -> str:
        future = self.get_state.call_async(GetState.Request())
        assert wait_until(future.done, NODE_TIMEOUT_S)
        return future.result().current_state.label

    def subscribed_inputs(self) -> set[str]:
        return {s.topic_name for s in self.node.subscriptions} & set(STEREO_REMAPS.values())

    def offers_services(self) -> bool:
        names = {s.service_name for s in self.node.services}
        return self.node.query_service_name() in names and self.node.render_service_name() in names

    def publishes_products(self) -> bool:
        names = {p.topic_name for p in self.node.publishers}
        return set(self.node.output_topic_names().values()) <= names


graph = harness_fixture(ManagedHarness, 'tiny_lsm_reconstructor')


def _wait_inactive_drops(graph: ManagedHarness, at_least: int) -> None:
    assert wait_until(lambda: graph.node.statistics()['inactive_drops'] >= at_least, NODE_TIMEOUT_S), \
        graph.node.statistics()


def test_a_managed_node_starts_unconfigured(graph: ManagedHarness) -> None:
    node = graph.node
    assert node.get_parameter('managed').value is True
    assert node.lifecycle_state == lsm.STATE_UNCONFIGURED == graph.state()
    statistics = node.statistics()
    assert statistics['lifecycle_state'] == 'unconfigured' and not statistics['model_on_device']
    assert not statistics['worker_running']
    assert graph.subscribed_inputs() == set() and not graph.offers_services() and not graph.publishes_products()
    assert node.input_image_topic_names() == {}
    assert graph.publisher.publishers['left_image'].get_subscription_count() == 0


def test_configure_creates_the_entities_and_an_inactive_node_counts_images(graph: ManagedHarness,
                                                                          stereo_frames: list[Any]) -> None:
    node = graph.node
    assert graph.transition(Transition.TRANSITION_CONFIGURE)
    assert node.lifecycle_state == 'inactive' == graph.state()
    assert graph.subscribed_inputs() == set(STEREO_REMAPS.values())
    assert graph.offers_services() and graph.publishes_products()
    assert node.input_image_topic_names() == {'left': STEREO_REMAPS['left/image_rect'],
                                              'right': STEREO_REMAPS['right/image_rect']}
    assert runtime.process_torch_threads() == MANAGED_THREADS              # applied at configure
    assert node.statistics()['worker_running'] and node.statistics()['model_on_device']
    assert wait_until(graph.publisher.connected, 30.0)

    stamp_ns = graph.publish(stereo_frames[0])                       # inactive: counted, not processed
    _wait_inactive_drops(graph, 2)
    time.sleep(QUIET_S)
    assert stamp_ns not in graph.info_stamps()
    statistics = node.statistics()
    assert statistics['worker']['submitted'] == 0 and statistics['counts'].get('processed', 0) == 0
    response = graph.query()                                         # services are up; nothing to answer from yet
    assert not response.success and 'no reconstruction yet' in response.message, response.message


def test_activate_warms_up_then_processes(graph: ManagedHarness, stereo_frames: list[Any],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    logs = NodeLogs(graph.node, monkeypatch)
    reconstructor = graph.node.reconstructor
    reconstruct = reconstructor.reconstruct
    forwards: list[tuple[tuple[int, ...], int]] = []   # (input shape, torch threads of the calling thread)

    def recording_reconstruct(left: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        forwards.append((left.shape, torch.get_num_threads()))
        return reconstruct(left, *args, **kwargs)

    reconstructor.reconstruct = recording_reconstruct   # instance attribute, removed below
    try:
        assert graph.transition(Transition.TRANSITION_ACTIVATE)
        assert graph.node.lifecycle_state == 'active' == graph.state()
        warm_up = logs.messages('info', 'warm-up: one forward on a synthetic 224x224 pair')
        assert len(warm_up) == 1 and ' s' in warm_up[0], logs.records
        assert forwards == [((224, 224, 3), MANAGED_THREADS)]   # the warm-up: one forward at model size
        assert graph.node.statistics()['worker']['submitted'] == 0       # the warm-up pair is not a processed pair
        stamp_ns = graph.play(stereo_frames[1])
        assert len(forwards) == 2 and forwards[1][1] == MANAGED_THREADS   # the worker thread's count too
    finally:
        del reconstructor.reconstruct
    response = graph.query()
    assert response.success and conversions.stamp_to_nanoseconds(response.stamp) == stamp_ns, response.message


def test_deactivate_lets_the_current_pair_finish_and_keeps_the_last_reconstruction(
        graph: ManagedHarness, stereo_frames: list[Any]) -> None:
    node = graph.node
    reconstructor = node.reconstructor
    with gated_reconstruct(reconstructor, NODE_TIMEOUT_S) as gate:   # the worker now waits inside
        in_flight = graph.publish(stereo_frames[2])
        assert wait_until(gate.entered.is_set, NODE_TIMEOUT_S), node.statistics()
        future = graph.request(Transition.TRANSITION_DEACTIVATE)
        time.sleep(0.5)
        assert not future.done() and node.lifecycle_state == 'deactivating'   # waits for the pair in flight
        gate.release.set()
        assert wait_until(future.done, NODE_TIMEOUT_S) and future.result().success
    assert node.lifecycle_state == 'inactive'
    assert wait_until(lambda: in_flight in graph.info_stamps(), 10.0)       # the current pair finished, published
    drops = node.statistics()['inactive_drops']
    later = graph.publish(stereo_frames[3 % len(stereo_frames)])
    _wait_inactive_drops(graph, drops + 2)
    time.sleep(QUIET_S)
    assert later not in graph.info_stamps()
    statistics = node.statistics()
    assert statistics['lifecycle_state'] == 'inactive' and statistics['model_on_device']   # CPU: nothing to free
    response = graph.query()                       # inactive, model usable: answered from the last reconstruction
    assert response.success and conversions.stamp_to_nanoseconds(response.stamp) == in_flight, response.message
    assert graph.render().success


def test_a_model_moved_off_the_accelerator_refuses_services_until_activation(graph: ManagedHarness) -> None:
    node = graph.node
    reconstructor = node.reconstructor
    last = graph.query()
    assert last.success
    assert graph.transition(Transition.TRANSITION_ACTIVATE)
    calls: list[str] = []
    # as Reconstructor.offload on CUDA: True = the model was moved off its device
    reconstructor.offload = lambda: calls.append('offload') or True
    reconstructor.reload = lambda: calls.append('reload')
    try:
        assert graph.transition(Transition.TRANSITION_DEACTIVATE)
        assert calls == ['offload'] and not node.statistics()['model_on_device']
        for response in (graph.query(), graph.render()):
            assert not response.success
            assert 'inactive' in response.message and 'activate' in response.message, response.message
        counts = node.statistics()['counts']
        assert counts['queries_refused'] >= 1 and counts['renders_refused'] >= 1
        assert graph.transition(Transition.TRANSITION_ACTIVATE)
        assert calls == ['offload', 'reload'] and node.statistics()['model_on_device']
    finally:
        del reconstructor.offload, reconstructor.reload
    again = graph.query()                            # the last reconstruction survived deactivate/activate
    assert again.success and again.stamp == last.stamp, again.message


def test_a_transition_that_raises_recovers_to_unconfigured(graph: ManagedHarness, stereo_frames: list[Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    node = graph.node
    reconstructor = node.reconstructor
    assert node.lifecycle_state == 'active'
    failures = []

    def failing_offload() -> bool:
        failures.append(1)
        del reconstructor.offload                    # only once: on_error's own release then works
        raise RuntimeError('injected offload failure')

    reconstructor.offload = failing_offload
    logs = NodeLogs(node, monkeypatch)
    assert not graph.transition(Transition.TRANSITION_DEACTIVATE)      # ERROR -> on_error -> unconfigured
    assert failures == [1] and node.lifecycle_state == 'unconfigured' == graph.state(), logs.records
    assert logs.messages('error', 'deactivate failed: RuntimeError: injected offload failure')
    assert logs.messages('warning', 'recovered from the failed transition')
    statistics = node.statistics()
    assert not statistics['worker_running'] and not statistics['model_on_device']
    assert graph.subscribed_inputs() == set() and not graph.offers_services() and not graph.publishes_products()
    assert runtime.process_torch_threads() == graph.threads_before          # restored with everything else

    assert graph.transition(Transition.TRANSITION_CONFIGURE) and graph.transition(Transition.TRANSITION_ACTIVATE)
    response = graph.query()                         # everything was released, the last reconstruction too
    assert not response.success and 'no reconstruction yet' in response.message
    assert wait_until(graph.publisher.connected, 30.0)
    graph.play(stereo_frames[0])


def test_cleanup_then_shutdown_release_everything(graph: ManagedHarness) -> None:
    node = graph.node
    assert graph.transition(Transition.TRANSITION_DEACTIVATE)
    assert graph.transition(Transition.TRANSITION_CLEANUP)
    assert node.lifecycle_state == 'unconfigured'
    statistics = node.statistics()
    assert not statistics['worker_running'] and not statistics['model_on_device']
    assert graph.subscribed_inputs() == set() and not graph.offers_services() and not graph.publishes_products()
    assert runtime.process_torch_threads() == graph.threads_before
    assert node.input_image_topic_names() == {}
    assert graph.transition(Transition.TRANSITION_UNCONFIGURED_SHUTDOWN)
    assert node.lifecycle_state == lsm.STATE_FINALIZED
    assert not graph.transition(Transition.TRANSITION_CONFIGURE)       # finalized is final


def test_configure_without_a_checkpoint_fails_with_the_reason(ros_context: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    node = make_lsm_node(None, ros_context, namespace='managed_no_weights', managed=True)
    try:
        assert node.lifecycle_state == 'unconfigured'
        logs = NodeLogs(node, monkeypatch)
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert node.lifecycle_state == 'unconfigured' and not node.statistics()['worker_running']
        [message] = logs.messages('error', 'configure failed')
        assert 'dust3r_checkpoint:=' in message
    finally:
        node.destroy_node()


def test_the_plain_default_is_active_at_once_and_can_still_be_managed(ros_context: Any, tiny_reconstructor: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    threads_before = torch.get_num_threads()
    node = make_lsm_node(tiny_reconstructor, ros_context, namespace='plain', torch_threads=1)
    try:
        assert node.get_parameter('managed').value is False
        assert node.lifecycle_state == 'active' and node.statistics()['worker_running']
        assert torch.get_num_threads() == 1
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        assert node.lifecycle_state == 'inactive'
        logs = NodeLogs(node, monkeypatch)
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert node.lifecycle_state == 'active' and logs.messages('info', 'warm-up')
    finally:
        node.destroy_node()
    assert torch.get_num_threads() == threads_before                  # restored when the node is destroyed


def test_torch_threads_parameter() -> None:
    assert [runtime.torch_thread_count(0, cores) for cores in (1, 2, 16)] == [1, 2, 16]   # 0: every core
    assert runtime.torch_thread_count(3, cores=2) == 3                    # an explicit count is taken as is
    assert runtime.torch_thread_count(0) == runtime.available_cpu_cores()
    from lsm_ros.config import NodeConfig, parameter_specs
    spec = {s.name: s for s in parameter_specs(NodeConfig)}['torch_threads']
    assert spec.default == 0 and spec.read_only and '9.2 s' in spec.description and '14.1 s' in spec.description
    with pytest.raises(ValueError, match='torch_threads'):
        spec.validate(-1)


def test_a_bad_torch_threads_value_stops_the_node_with_the_reason(ros_context: Any, tiny_reconstructor: Any) -> None:
    from rclpy.exceptions import InvalidParameterValueException
    with pytest.raises(InvalidParameterValueException, match='torch_threads out of range'):
        make_lsm_node(tiny_reconstructor, ros_context, namespace='bad_threads', torch_threads=-1)


def test_warmup_pair_is_a_textured_pair_at_the_model_size() -> None:
    left, right = lsm.warmup_pair(224)
    assert left.shape == right.shape == (224, 224, 3) and left.dtype == right.dtype == np.uint8
    shift = runtime.WARMUP_SHIFT_PX
    np.testing.assert_array_equal(left[:, :-shift], right[:, shift:])   # the right view: the left one shifted
    assert left.std() > 20


def test_reconstructor_offload_frees_only_an_accelerator(tiny_reconstructor: Any) -> None:
    assert tiny_reconstructor.device.type == 'cpu'
    assert tiny_reconstructor.offload() is False and not tiny_reconstructor.offloaded   # CPU: nothing to free
    tiny_reconstructor.reload()
    assert not tiny_reconstructor.offloaded


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_reconstructor_offload_moves_the_network_off_cuda_and_back() -> None:
    from lsm_ros.model import Dust3rConfig
    from lsm_ros.pipeline import Reconstructor
    rec = Reconstructor.from_config(Dust3rConfig(**TINY_NETWORK), **{**TINY_PIPELINE, 'device': 'cuda'})
    left, right = lsm.warmup_pair(224)
    rec.reconstruct(left, right)
    allocated = torch.cuda.memory_allocated()
    assert rec.offload() is True and rec.offloaded
    assert all(p.device.type == 'cpu' for p in rec.network.parameters())
    assert torch.cuda.memory_allocated() < allocated
    with pytest.raises(RuntimeError, match='reload'):
        rec.reconstruct(left, right)
    rec.reload()
    assert not rec.offloaded and all(p.device.type == 'cuda' for p in rec.network.parameters())
    assert rec.reconstruct(left, right).depth_1.shape == (224, 224)
