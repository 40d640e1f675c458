"""The workstation build: real colcon (colcon-core, colcon-cmake, colcon-ros from PyPI) builds this repository
against the ROS 2 Kilted wheels of this virtual environment, in a temporary workspace, as a roboticist's
``colcon build`` does:

    colcon --log-base WS/log build --base-paths WS/src --build-base WS/build --install-base WS/install \
        --cmake-args -DPython3_EXECUTABLE=<this python> -DBUILD_TESTING=OFF

with ``WS/src/lsm_ros`` a symbolic link to the repository (nothing is written into it) and AMENT_PREFIX_PATH /
CMAKE_PREFIX_PATH the virtual environment (where scripts/setup_env.sh installed the generated tf2_msgs and
vision_msgs). From the install space, entered with its ``local_setup.bash``: ``lsm_ros.msg``, ``lsm_ros.srv`` and
``lsm_ros.pipeline`` import from the install space, the launch file and the configuration are in
``share/lsm_ros``, and the installed ``lsm_node`` starts and publishes /diagnostics over loopback.

The child processes inherit this session's network isolation (conftest: LOCALHOST discovery, own domain id, the
localhost-only Fast DDS profile), set again explicitly with :mod:`lsm_ros.ros.isolation`.
"""
from __future__ import annotations

import filecmp
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import REPO_ROOT, wait_until, write_small_dust3r_file

pytestmark = pytest.mark.timeout(1500)

BUILD_TIMEOUT_S = 1200.0     # the colcon build: ~70 s alone on 2 cores, minutes on a loaded machine
START_TIMEOUT_S = 180.0      # the installed lsm_node: start, model load, warm-up forward, first /diagnostics
NAMESPACE = '/colcon_build_test'
PYTHON_SITE = f'lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages'
INSTALLED_CONFIG = ('lsm.yaml', 'lsm.rviz', 'fastdds_localhost.xml')


@dataclass
class Workspace:
    root: Path                 # WS
    install: Path              # WS/install (colcon's merged-less install base: one prefix per package)
    prefix: Path               # WS/install/lsm_ros
    build_seconds: float


def _isolated_environment() -> dict[str, str]:
    """This process's environment with the ROS isolation of the session made explicit."""
    from lsm_ros.ros.isolation import DOMAIN_ID_VARIABLE, localhost_only_environment
    return dict(os.environ, **localhost_only_environment(int(os.environ[DOMAIN_ID_VARIABLE])))


def _in_install_space(ws: Workspace, command: list[str]) -> list[str]:
    """``command`` run by bash after ``source WS/install/local_setup.bash`` (what a user types), exec'd so that the
    process id stays the command's."""
    script = f'source {shlex.quote(str(ws.install / "local_setup.bash"))} && exec "$@"'
    return ['bash', '-c', script, 'in_install_space', *command]


@pytest.fixture(scope='module')
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """This repository built and installed by colcon into a temporary workspace (once per module)."""
    try:
        import colcon_core  # noqa: F401
    except ImportError:
        pytest.fail('colcon is not installed in this environment: run `make setup` (requirements.txt pins it)')
    root = tmp_path_factory.mktemp('colcon_ws')
    (root / 'src').mkdir()
    (root / 'src' / 'lsm_ros').symlink_to(REPO_ROOT, target_is_directory=True)
    venv_bin = str(Path(sys.executable).parent)
    environment = dict(os.environ, AMENT_PREFIX_PATH=sys.prefix, CMAKE_PREFIX_PATH=sys.prefix,
                       PATH=f'{venv_bin}{os.pathsep}{os.environ.get("PATH", "")}')
    command = [str(Path(venv_bin) / 'colcon'), '--log-base', str(root / 'log'), 'build',
               '--base-paths', str(root / 'src'), '--build-base', str(root / 'build'),
               '--install-base', str(root / 'install'),
               '--cmake-args', f'-DPython3_EXECUTABLE={sys.executable}', '-DBUILD_TESTING=OFF']
    started = time.monotonic()
    result = subprocess.run(command, cwd=root, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=BUILD_TIMEOUT_S, check=False)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        logs = sorted((root / 'log').glob('latest_build/lsm_ros/stdout_stderr.log'))
        detail = logs[0].read_text(errors='replace')[-6000:] if logs else ''
        pytest.fail(f'colcon build failed ({result.returncode}) in {seconds:.0f} s:\n{result.stdout[-4000:]}\n'
                    f'{detail}')
    assert 'Finished <<< lsm_ros' in result.stdout, result.stdout
    logging.getLogger(__name__).info('colcon build of lsm_ros: %.0f s', seconds)
    return Workspace(root, root / 'install', root / 'install' / 'lsm_ros', seconds)


def test_colcon_installs_the_python_package_scripts_launch_and_config(workspace: Workspace) -> None:
    prefix = workspace.prefix
    package = prefix / PYTHON_SITE / 'lsm_ros'
    # our sources and the generated interfaces in ONE package (our __init__.py, not rosidl's empty one)
    assert (package / '__init__.py').read_text() == (REPO_ROOT / 'lsm_ros' / '__init__.py').read_text()
    for source in ('pipeline.py', 'ros/node.py', 'ros/isolation.py', 'model/__init__.py', 'py.typed'):
        assert filecmp.cmp(package / source, REPO_ROOT / 'lsm_ros' / source, shallow=False), source
    for generated in ('msg/__init__.py', 'msg/_reconstruction_info.py', 'srv/_text_query.py'):
        assert (package / generated).is_file(), generated
    assert list(package.glob('lsm_ros_s__rosidl_typesupport_c*.so'))
    # ros2 run lsm_ros lsm_node / lsm-ros: executables with this build's interpreter
    for script in ('lsm_node', 'lsm-ros'):
        path = prefix / 'lib' / 'lsm_ros' / script
        assert os.access(path, os.X_OK), path
        assert path.read_text().splitlines()[0] == f'#!{sys.executable}', path
    # ros2 launch lsm_ros lsm.launch.py, and the files it reads
    share = prefix / 'share' / 'lsm_ros'
    assert filecmp.cmp(share / 'launch' / 'lsm.launch.py', REPO_ROOT / 'launch' / 'lsm.launch.py', shallow=False)
    for name in INSTALLED_CONFIG:
        assert filecmp.cmp(share / 'config' / name, REPO_ROOT / 'config' / name, shallow=False), name
    assert (share / 'package.xml').is_file() and (share / 'msg' / 'ReconstructionInfo.msg').is_file()
    # registered in the ament index (get_package_share_directory('lsm_ros'))
    assert (prefix / 'share' / 'ament_index' / 'resource_index' / 'packages' / 'lsm_ros').is_file()


PROBE = r'''
import json, sys
import lsm_ros, lsm_ros.msg, lsm_ros.srv, lsm_ros.pipeline
from lsm_ros.msg import ReconstructionInfo
from lsm_ros.srv import TextQuery
from ament_index_python.packages import get_package_share_directory
from rclpy.type_support import check_for_type_support
check_for_type_support(ReconstructionInfo)
check_for_type_support(TextQuery)
response = TextQuery.Response()
print(json.dumps({
    'modules': {m.__name__: m.__file__ for m in (lsm_ros, lsm_ros.msg, lsm_ros.srv, lsm_ros.pipeline)},
    'share': get_package_share_directory('lsm_ros'),
    'fields': [hasattr(response, f) for f in ('clouds', 'detections', 'camera_masks', 'camera_regions')]
              + [hasattr(ReconstructionInfo(), 'pose_source')],
    'libraries': sorted({line.split()[-1] for line in open('/proc/self/maps') if 'lsm_ros' in line.split()[-1]}),
}))
'''


def test_install_space_imports_the_installed_package(workspace: Workspace) -> None:
    """The generated interfaces and the sources come from the install space, not from the repository nor the
    virtual environment's own copy (scripts/setup_env.sh) that are on sys.path too."""
    result = subprocess.run(_in_install_space(workspace, [sys.executable, '-c', PROBE]), cwd=workspace.root,
                            env=_isolated_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    site = workspace.prefix / PYTHON_SITE / 'lsm_ros'
    assert report['modules'] == {'lsm_ros': str(site / '__init__.py'), 'lsm_ros.msg': str(site / 'msg/__init__.py'),
                                 'lsm_ros.srv': str(site / 'srv/__init__.py'),
                                 'lsm_ros.pipeline': str(site / 'pipeline.py')}
    assert report['share'] == str(workspace.prefix / 'share' / 'lsm_ros')
    assert all(report['fields']), report['fields']
    # the type support: the installed extension module and libraries (LD_LIBRARY_PATH of local_setup first)
    assert report['libraries'], report
    assert all(path.startswith(str(workspace.prefix)) for path in report['libraries']), report['libraries']


def test_installed_cli_runs(workspace: Workspace) -> None:
    result = subprocess.run(_in_install_space(workspace, [str(workspace.prefix / 'lib' / 'lsm_ros' / 'lsm-ros'),
                                                          '--help']),
                            cwd=workspace.root, env=_isolated_environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout
    assert 'usage' in result.stdout.lower(), result.stdout


@pytest.fixture(scope='module')
def dust3r_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random DUSt3R in the official file layout (the installed node loads it)."""
    return write_small_dust3r_file(tmp_path_factory.mktemp('weights') / 'small_dust3r.pth')


@pytest.fixture
def diagnostics(ros_context: Any) -> Iterator[list[Any]]:
    """Every /diagnostics message this process receives (best effort: matches any publisher)."""
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.node import Node
    from rclpy.qos import qos_profile_sensor_data

    from lsm_ros.ros.graph import RosGraph
    received: list[Any] = []
    node = Node('colcon_build_test_probe', context=ros_context)
    node.create_subscription(DiagnosticArray, '/diagnostics', received.append, qos_profile_sensor_data)
    graph = RosGraph(ros_context)
    graph.add(node)
    try:
        yield received
    finally:
        graph.close()


def test_installed_lsm_node_publishes_diagnostics(workspace: Workspace, dust3r_file: Path,
                                                  diagnostics: list[Any]) -> None:
    node = [str(workspace.prefix / 'lib' / 'lsm_ros' / 'lsm_node'), '--ros-args', '-r', f'__ns:={NAMESPACE}',
            '-p', f'dust3r_checkpoint:={dust3r_file}', '-p', 'device:=cpu', '-p', 'resolution:=224',
            '-p', 'use_camera_info:=false']
    environment = dict(_isolated_environment(), PYTHONUNBUFFERED='1')
    process = subprocess.Popen(_in_install_space(workspace, node), cwd=workspace.root, env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()

    def ours() -> list[Any]:
        # status names: '<fully qualified node name without the leading slash>: <part>'
        return [status for array in list(diagnostics) for status in array.status
                if status.name.startswith(f'{NAMESPACE.lstrip("/")}/lsm_node: ')]

    try:
        assert wait_until(lambda: bool(ours()) or process.poll() is not None, START_TIMEOUT_S)
        assert ours(), f'no /diagnostics from the installed lsm_node (exit code {process.poll()}):\n{"".join(lines)}'
        names = {status.name.rsplit(': ', 1)[-1] for status in ours()}
        assert {'inputs', 'processing', 'model'} <= names, names
        # the running node is the installed one: its type support is the install space's
        maps = Path(f'/proc/{process.pid}/maps').read_text()
        assert str(workspace.prefix / PYTHON_SITE / 'lsm_ros' / 'lsm_ros_s__rosidl_typesupport_c') in maps
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, ''.join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(5.0)
    text = ''.join(lines)
    assert 'Traceback' not in text, text
    assert 'lsm_node active' in text, text
