"""Deployment files: launch/lsm.launch.py (with test-only stand-ins of launch/launch_ros), config/lsm.yaml,
config/lsm.rviz, config/fastdds_localhost.xml and the network isolation policies."""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import pytest
import yaml

from lsm_ros.config import CONFIG_SECTIONS, PARAMETER_ALIASES, all_parameter_specs

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
STUBS = Path(__file__).resolve().parent / 'launch_stub'
STUBBED_PACKAGES = ('launch', 'launch_ros', 'ament_index_python')
EXPECTED_ARGUMENTS = {
    'namespace': 'lsm', 'params_file': str(REPO / 'config' / 'lsm.yaml'), 'device': '', 'dust3r_checkpoint': '',
    'lseg_checkpoint': '', 'lsm_checkpoint': '', 'publish_tf': '', 'use_rviz': 'false', 'fixed_frame': 'cam0',
    'left_image': '/stereo/left/image_rect', 'right_image': '/stereo/right/image_rect',
    'left_info': '/stereo/left/camera_info', 'right_info': '/stereo/right/camera_info', 'managed': 'false',
    'autostart': 'true'}


def _is_stubbed(module_name: str) -> bool:
    return any(module_name == p or module_name.startswith(p + '.') for p in STUBBED_PACKAGES)


@pytest.fixture
def launch_file(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """launch/lsm.launch.py imported against the stand-ins; the real modules are restored afterwards."""
    saved = {name: module for name, module in sys.modules.items() if _is_stubbed(name)}
    for name in saved:
        del sys.modules[name]
    monkeypatch.syspath_prepend(str(STUBS))
    try:
        spec = importlib.util.spec_from_file_location('lsm_launch_under_test', REPO / 'launch' / 'lsm.launch.py')
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert Path(sys.modules['launch'].__file__).is_relative_to(STUBS)
        yield module
    finally:
        for name in [n for n in sys.modules if _is_stubbed(n)]:
            del sys.modules[name]
        sys.modules.update(saved)


def _describe(launch_file: ModuleType) -> tuple[dict[str, Any], list[Any]]:
    from launch.actions import DeclareLaunchArgument, OpaqueFunction
    description = launch_file.generate_launch_description()
    arguments = {e.name: e for e in description.entities if isinstance(e, DeclareLaunchArgument)}
    functions = [e for e in description.entities if isinstance(e, OpaqueFunction)]
    return arguments, functions


def _actions(launch_file: ModuleType, **values: str) -> list[Any]:
    """The launched actions (nodes, event handlers, events) for the argument defaults overridden by ``values``."""
    from launch import LaunchContext
    arguments, functions = _describe(launch_file)
    unknown = set(values) - set(arguments)
    assert not unknown, f'not launch arguments: {unknown}'
    context = LaunchContext({name: values.get(name, arg.default_value) for name, arg in arguments.items()})
    return [action for function in functions for action in function.execute(context)]


def _nodes(launch_file: ModuleType, **values: str) -> list[Any]:
    """The launched nodes (plain and lifecycle) for the argument defaults overridden by ``values``."""
    from launch_ros.actions import Node
    return [action for action in _actions(launch_file, **values) if isinstance(action, Node)]


def test_declared_arguments(launch_file: ModuleType) -> None:
    arguments, functions = _describe(launch_file)
    assert {name: arg.default_value for name, arg in arguments.items()} == EXPECTED_ARGUMENTS
    assert all(arg.description for arg in arguments.values())
    assert len(functions) == 1


def test_lsm_node_defaults(launch_file: ModuleType) -> None:
    from lsm_ros.ros.node import INPUT_TOPICS, NODE_NAME
    nodes = _nodes(launch_file)
    assert len(nodes) == 1                                     # no RViz by default
    node = nodes[0]
    assert (node.package, node.executable, node.name, node.namespace) == ('lsm_ros', 'lsm_node', NODE_NAME, 'lsm')
    assert not getattr(node, 'is_lifecycle_node', False)      # a plain node: it configures and activates itself
    assert node.parameters == [str(REPO / 'config' / 'lsm.yaml'), {'managed': False}]   # only the life cycle is set
    assert Path(node.parameters[0]).is_file()
    assert len(_actions(launch_file)) == 1                     # no lifecycle events in plain mode
    remaps = dict(node.remappings)
    assert set(remaps) == set(INPUT_TOPICS)                    # every remap is a topic the node subscribes to
    assert remaps == {'left/image_rect': '/stereo/left/image_rect', 'right/image_rect': '/stereo/right/image_rect',
                      'left/camera_info': '/stereo/left/camera_info',
                      'right/camera_info': '/stereo/right/camera_info'}


def test_launch_arguments_override_parameters_and_topics(launch_file: ModuleType) -> None:
    node = _nodes(launch_file, namespace='robot', device='cpu', dust3r_checkpoint='/w/dust3r.pth',
                  publish_tf='true', left_image='/cam/left/rect', right_info='/cam/right/info')[0]
    assert node.namespace == 'robot'
    assert node.parameters[1] == {'device': 'cpu', 'dust3r_checkpoint': '/w/dust3r.pth', 'publish_tf': True,
                                  'managed': False}
    remaps = dict(node.remappings)
    assert remaps['left/image_rect'] == '/cam/left/rect' and remaps['right/camera_info'] == '/cam/right/info'
    specs = {spec.name: spec for spec in all_parameter_specs()}
    for name, value in node.parameters[1].items():
        assert specs[name].validate(value) == value            # overrides are real, valid node parameters
    assert _nodes(launch_file, publish_tf='false')[0].parameters[1] == {'publish_tf': False, 'managed': False}
    for name in ('publish_tf', 'managed', 'autostart'):
        with pytest.raises(ValueError, match='not a boolean'):
            _nodes(launch_file, **{name: 'maybe'})


def _transition_event(action: Any, start_state: str, goal_state: str, transition: str) -> Any:
    """A StateTransition event of ``action`` as launch_ros emits it from the node's transition_event topic."""
    from launch_ros.events.lifecycle import StateTransition
    from lifecycle_msgs.msg import State, Transition, TransitionEvent
    return StateTransition(action=action, msg=TransitionEvent(
        transition=Transition(label=transition), start_state=State(label=start_state),
        goal_state=State(label=goal_state)))


def test_managed_mode_launches_a_lifecycle_node_and_autostarts_it(launch_file: ModuleType) -> None:
    from launch.actions import EmitEvent, RegisterEventHandler
    from launch_ros.actions import LifecycleNode
    from launch_ros.event_handlers import OnStateTransition
    from launch_ros.events.lifecycle import ChangeState
    from lifecycle_msgs.msg import Transition

    from lsm_ros.ros.node import NODE_NAME
    actions = _actions(launch_file, managed='true', namespace='robot', device='cpu')
    nodes = [a for a in actions if isinstance(a, LifecycleNode)]
    assert len(nodes) == 1
    node = nodes[0]
    assert (node.package, node.executable, node.name, node.namespace) == ('lsm_ros', 'lsm_node', NODE_NAME, 'robot')
    assert node.parameters[1] == {'device': 'cpu', 'managed': True}   # the node waits for its transitions
    specs = {spec.name: spec for spec in all_parameter_specs()}
    assert specs['managed'].validate(node.parameters[1]['managed']) is True and specs['managed'].read_only
    other = LifecycleNode(name='other', namespace='robot', executable='x')

    events = [a.event for a in actions if isinstance(a, EmitEvent)]
    assert len(events) == 1 and isinstance(events[0], ChangeState)           # configure at start
    assert events[0].transition_id == Transition.TRANSITION_CONFIGURE
    assert events[0].lifecycle_node_matcher(node) and not events[0].lifecycle_node_matcher(other)

    handlers = [a.event_handler for a in actions if isinstance(a, RegisterEventHandler)]
    assert len(handlers) == 1 and isinstance(handlers[0], OnStateTransition)
    assert actions.index(next(a for a in actions if isinstance(a, RegisterEventHandler))) < actions.index(node)
    handler = handlers[0]
    # configure brought the node to 'inactive': activate it
    [activate] = handler.handle(_transition_event(node, 'configuring', 'inactive', 'transition_success'))
    assert isinstance(activate, EmitEvent) and activate.event.transition_id == Transition.TRANSITION_ACTIVATE
    assert activate.event.lifecycle_node_matcher(node) and not activate.event.lifecycle_node_matcher(other)
    # a later deactivate also ends in 'inactive': no re-activation; nor for another node or another state
    assert handler.handle(_transition_event(node, 'deactivating', 'inactive', 'transition_success')) == []
    assert handler.handle(_transition_event(other, 'configuring', 'inactive', 'transition_success')) == []
    assert handler.handle(_transition_event(node, 'unconfigured', 'configuring', 'configure')) == []


def test_managed_mode_without_autostart_leaves_the_transitions_to_the_user(launch_file: ModuleType) -> None:
    from launch_ros.actions import LifecycleNode
    actions = _actions(launch_file, managed='true', autostart='false')
    assert len(actions) == 1 and isinstance(actions[0], LifecycleNode)
    assert actions[0].parameters[1] == {'managed': True}
    assert len(_actions(launch_file, managed='false', autostart='false')) == 1   # autostart only matters if managed
    rviz = _nodes(launch_file, managed='true', use_rviz='true')
    assert [n.package for n in rviz] == ['lsm_ros', 'rviz2']


def test_rviz_node(launch_file: ModuleType) -> None:
    nodes = _nodes(launch_file, use_rviz='true')
    rviz = [n for n in nodes if n.package == 'rviz2']
    assert len(rviz) == 1 and rviz[0].executable == 'rviz2'
    assert rviz[0].arguments[0] == '-d' and Path(rviz[0].arguments[1]) == REPO / 'config' / 'lsm.rviz'
    assert Path(rviz[0].arguments[1]).is_file()
    assert rviz[0].arguments[2:] == ['--fixed-frame', 'cam0']     # the rviz config's own fixed frame by default


def test_rviz_fixed_frame_comes_from_the_launch_argument(launch_file: ModuleType) -> None:
    [rviz] = [n for n in _nodes(launch_file, use_rviz='true', fixed_frame='base_link') if n.package == 'rviz2']
    assert rviz.arguments == ['-d', str(REPO / 'config' / 'lsm.rviz'), '--fixed-frame', 'base_link']
    config = yaml.safe_load((REPO / 'config' / 'lsm.rviz').read_text())
    assert config['Visualization Manager']['Global Options']['Fixed Frame'] == launch_file.DEFAULT_FIXED_FRAME


def test_params_yaml_equals_the_dataclasses() -> None:
    document = yaml.safe_load((REPO / 'config' / 'lsm.yaml').read_text())
    assert list(document) == ['/**/lsm_node']
    parameters = document['/**/lsm_node']['ros__parameters']
    defaults = {f.name: f.default for cls in CONFIG_SECTIONS for f in dataclasses.fields(cls)}
    assert list(parameters) == list(defaults)                   # same keys, same order (aliases not repeated)
    assert set(PARAMETER_ALIASES.values()) <= set(defaults) and not set(PARAMETER_ALIASES) & set(defaults)
    for name, value in parameters.items():
        if isinstance(defaults[name], tuple) and isinstance(value, list):   # a string array is a YAML list
            value = tuple(value)
        assert type(value) is type(defaults[name]) and value == defaults[name], name
    lines = [line for line in (REPO / 'config' / 'lsm.yaml').read_text().splitlines()
             if line.strip() and not line.lstrip().startswith('#') and line.startswith('    ')]
    assert all('#' in line for line in lines), 'every parameter line has a comment'


def test_rviz_config_matches_the_default_namespace_and_demo_frame() -> None:
    from lsm_ros.ros.demo import DEMO_NAMESPACE
    from lsm_ros.ros.synthetic import LEFT_FRAME
    config = yaml.safe_load((REPO / 'config' / 'lsm.rviz').read_text())
    manager = config['Visualization Manager']
    assert manager['Global Options']['Fixed Frame'] == LEFT_FRAME == 'cam0'
    displays = {d['Class']: d for d in manager['Displays']}
    prefix = f'/{EXPECTED_ARGUMENTS["namespace"]}/lsm_node'
    assert DEMO_NAMESPACE == EXPECTED_ARGUMENTS['namespace']
    assert displays['rviz_default_plugins/PointCloud2']['Topic']['Value'] == f'{prefix}/points'
    assert displays['rviz_default_plugins/PointCloud2']['Color Transformer'] == 'RGB8'
    assert displays['rviz_default_plugins/Pose']['Topic']['Value'] == f'{prefix}/relative_pose'
    images = [d['Topic']['Value'] for d in manager['Displays'] if d['Class'] == 'rviz_default_plugins/Image']
    assert f'{prefix}/left/depth' in images
    assert 'rviz_default_plugins/TF' in displays


def test_project_fastdds_profile_is_localhost_only_with_a_big_shared_memory_segment() -> None:
    import xml.etree.ElementTree as ElementTree

    from lsm_ros.ros.isolation import fastdds_profile_path
    path = fastdds_profile_path()
    assert path == REPO / 'config' / 'fastdds_localhost.xml'
    ns = {'dds': 'http://www.eprosima.com'}
    root = ElementTree.parse(path).getroot()
    transports = {t.findtext('dds:transport_id', namespaces=ns): t
                  for t in root.iterfind('.//dds:transport_descriptor', ns)}
    kinds = {t.findtext('dds:type', namespaces=ns): t for t in transports.values()}
    assert set(kinds) == {'SHM', 'UDPv4'}
    assert kinds['SHM'].findtext('dds:segment_size', namespaces=ns) == str(32 * 1024 * 1024)
    assert [a.text for a in kinds['UDPv4'].iterfind('.//dds:interfaceWhiteList/dds:address', ns)] == ['127.0.0.1']
    participant = root.find('.//dds:participant', ns)
    assert participant.get('is_default_profile') == 'true'
    assert participant.findtext('.//dds:useBuiltinTransports', namespaces=ns) == 'false'
    assert {t.text for t in participant.iterfind('.//dds:userTransports/dds:transport_id', ns)} == set(transports)


def test_isolation_environments() -> None:
    import os

    from lsm_ros.ros import isolation
    # this test session itself (test/conftest.py)
    assert os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] == 'LOCALHOST'
    assert 1 <= int(os.environ['ROS_DOMAIN_ID']) <= 101
    assert os.environ['FASTDDS_DEFAULT_PROFILES_FILE'] == str(REPO / 'config' / 'fastdds_localhost.xml')
    # tests and demos: always localhost; an explicit domain id is kept, else one per process
    environ = {'ROS_AUTOMATIC_DISCOVERY_RANGE': 'SUBNET', 'ROS_DOMAIN_ID': '42'}
    values = isolation.apply_localhost_only_environment(environ=environ)
    assert environ == values == {'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST', 'ROS_DOMAIN_ID': '42',
                                 'FASTDDS_DEFAULT_PROFILES_FILE': str(REPO / 'config' / 'fastdds_localhost.xml')}
    assert isolation.localhost_only_environment(environ={})['ROS_DOMAIN_ID'] == str(isolation.domain_id_for_process())
    assert isolation.localhost_only_environment(7, environ={'ROS_DOMAIN_ID': '42'})['ROS_DOMAIN_ID'] == '7'
    assert all(1 <= isolation.domain_id_for_process(pid) <= 101 for pid in range(0, 1000, 7))
    with pytest.raises(ValueError):
        isolation.localhost_only_environment(environ={'ROS_DOMAIN_ID': 'abc'})
    # lsm_node's own main: a deployment's settings are respected; unset discovery range -> localhost
    deployment = {'ROS_AUTOMATIC_DISCOVERY_RANGE': 'SUBNET', 'ROS_DOMAIN_ID': '3'}
    isolation.apply_node_environment_defaults(deployment)
    assert deployment == {'ROS_AUTOMATIC_DISCOVERY_RANGE': 'SUBNET', 'ROS_DOMAIN_ID': '3'}
    development: dict[str, str] = {}
    isolation.apply_node_environment_defaults(development)
    assert development == {'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST',
                           'FASTDDS_DEFAULT_PROFILES_FILE': str(REPO / 'config' / 'fastdds_localhost.xml')}


def test_reserved_domain_ids_differ_between_processes(tmp_path: Path) -> None:
    import subprocess

    from lsm_ros.ros.isolation import reserve_domain_id
    mine = reserve_domain_id(tmp_path)
    assert reserve_domain_id(tmp_path) == mine                          # stable within a process
    code = ('import sys; from lsm_ros.ros.isolation import reserve_domain_id; '
            f'print(reserve_domain_id({str(tmp_path)!r}))')
    other = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, cwd=REPO,
                           env={'PATH': '/usr/bin:/bin', 'PYTHONPATH': str(REPO)})
    assert int(other.stdout.strip()) != mine
