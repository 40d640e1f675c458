"""lsm_node speaks the stack's conventions (a real node, tiny DUSt3R): input QoS overridable with rclpy's
``qos_overrides.<topic>.subscription.<policy>`` parameters, and stereo_image_proc's names of the sync parameters
(``approximate_sync_tolerance_seconds``, ``queue_size``) kept equal to lsm_node's own, at start-up and at runtime."""
from __future__ import annotations

import copy
from typing import Any

import pytest
from conftest import make_lsm_node
from rclpy.parameter import Parameter
from rclpy.qos import ReliabilityPolicy, qos_profile_sensor_data

pytestmark = pytest.mark.timeout(120)
LEFT_IMAGE, RIGHT_IMAGE, LEFT_INFO = '/stereo/left/image_rect', '/stereo/right/image_rect', '/stereo/left/camera_info'


def _subscription_qos(node: Any, topic: str) -> Any:
    [info] = [i for i in node.get_subscriptions_info_by_topic(topic) if i.node_name == 'lsm_node']
    return info.qos_profile


def test_input_qos_is_overridden_by_the_standard_parameters(tiny_reconstructor: Any, ros_context: Any) -> None:
    sensor_data = copy.copy(qos_profile_sensor_data)
    node = make_lsm_node(tiny_reconstructor, ros_context, 'qos', **{
        f'qos_overrides.{LEFT_IMAGE}.subscription.reliability': 'reliable',
        f'qos_overrides.{LEFT_INFO}.subscription.depth': 7})
    try:
        assert _subscription_qos(node, LEFT_IMAGE).reliability == ReliabilityPolicy.RELIABLE
        assert _subscription_qos(node, RIGHT_IMAGE).reliability == ReliabilityPolicy.BEST_EFFORT   # the default
        assert node.get_parameter(f'qos_overrides.{LEFT_INFO}.subscription.depth').value == 7
        # rclpy's default policies of every input are (read-only) parameters, whether overridden or not
        for topic in (LEFT_IMAGE, RIGHT_IMAGE, LEFT_INFO, '/stereo/right/camera_info'):
            for policy in ('reliability', 'history', 'depth'):
                assert node.has_parameter(f'qos_overrides.{topic}.subscription.{policy}'), (topic, policy)
        assert node.get_parameter(f'qos_overrides.{RIGHT_IMAGE}.subscription.depth').value == 5
        result = node.set_parameters([Parameter(f'qos_overrides.{RIGHT_IMAGE}.subscription.reliability',
                                                value='reliable')])[0]
        assert not result.successful                                 # read-only: start-up only
        assert (qos_profile_sensor_data.reliability, qos_profile_sensor_data.depth) == (   # the shared profile
            sensor_data.reliability, sensor_data.depth) == (ReliabilityPolicy.BEST_EFFORT, 5)   # was not touched
    finally:
        node.destroy_node()


def test_stereo_image_proc_names_set_the_same_sync_settings(tiny_reconstructor: Any, ros_context: Any) -> None:
    node = make_lsm_node(tiny_reconstructor, ros_context, 'aliases', approximate_sync_tolerance_seconds=0.04)
    try:
        def values() -> tuple[Any, ...]:
            return tuple(node.get_parameter(name).value for name in (
                'sync_tolerance_s', 'approximate_sync_tolerance_seconds', 'sync_queue_size', 'queue_size'))

        assert values() == (0.04, 0.04, 10, 10) and node.node_config.sync_tolerance_s == 0.04   # set at start-up
        assert node._inputs.synchronizer.tolerance_ns == 40_000_000
        assert node.set_parameters([Parameter('queue_size', value=4)])[0].successful
        assert values() == (0.04, 0.04, 4, 4) and node._inputs.synchronizer.queue_size == 4
        assert node.set_parameters([Parameter('sync_tolerance_s', value=0.01)])[0].successful
        assert values() == (0.01, 0.01, 4, 4) and node._inputs.synchronizer.tolerance_ns == 10_000_000
        generation = node._lsm_params.snapshot.generation
        refused = node.set_parameters([Parameter('queue_size', value=3), Parameter('sync_queue_size', value=6)])
        assert not refused[0].successful and 'queue_size (3) and sync_queue_size (6)' in refused[0].reason
        assert values() == (0.01, 0.01, 4, 4) and node._lsm_params.snapshot.generation == generation
        both = node.set_parameters([Parameter('queue_size', value=6), Parameter('sync_queue_size', value=6)])
        assert all(r.successful for r in both) and values() == (0.01, 0.01, 6, 6)
        assert node._lsm_params.snapshot.generation == generation + 1   # one change, one snapshot
        bad = node.set_parameters([Parameter('approximate_sync_tolerance_seconds', value=50.0)])[0]
        assert not bad.successful and 'above the maximum' in bad.reason and values()[0] == 0.01
    finally:
        node.destroy_node()


def test_conflicting_names_at_start_up_stop_the_node_with_the_reason(tiny_reconstructor: Any,
                                                                     ros_context: Any) -> None:
    with pytest.raises(ValueError, match='queue_size .3. and sync_queue_size .7. name the same setting'):
        make_lsm_node(tiny_reconstructor, ros_context, 'conflict', queue_size=3, sync_queue_size=7)
    node = make_lsm_node(tiny_reconstructor, ros_context, 'agree', queue_size=7, sync_queue_size=7)
    try:
        assert node.node_config.sync_queue_size == 7
    finally:
        node.destroy_node()
