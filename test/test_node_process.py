"""The real ``lsm_node`` entry point (lsm_ros.ros.node:main) as its own process: it loads an official-layout
DUSt3R file, reconstructs a pair received over loopback, and stops cleanly on SIGINT (exit 0, no traceback);
without weights it stops at once with exit 1 and says what to set.

The child inherits this session's network isolation (conftest: LOCALHOST discovery, own domain id, localhost-only
Fast DDS profile).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from conftest import REPO_ROOT, wait_until, write_small_dust3r_file

pytestmark = pytest.mark.timeout(240)

NAMESPACE = '/node_process_test'
# A small DUSt3R in the official constructor-string format (random weights: untrained outputs).
SMALL_DUST3R = ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', "
                "img_size=(224, 224), head_type='dpt', output_mode='pts3d', depth_mode=('exp', -inf, inf), "
                "conf_mode=('exp', 1, inf), enc_embed_dim=32, enc_depth=1, enc_num_heads=2, "
                "dec_embed_dim=32, dec_depth=1, dec_num_heads=2)")
START_TIMEOUT_S = 150.0   # process start, model load and the warm-up forward on a loaded 2-core machine


@pytest.fixture(scope='module')
def dust3r_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An official-layout DUSt3R checkpoint ({'args': Namespace(model=...), 'model': official state dict})."""
    return write_small_dust3r_file(tmp_path_factory.mktemp('weights') / 'small_dust3r.pth', SMALL_DUST3R)


def _start_node(*parameters: str, weights_dir: Path | None = None) -> subprocess.Popen[str]:
    """``python -m lsm_ros.ros.node`` with these ``-p`` parameters; ``weights_dir``: its $LSM_ROS_WEIGHTS (else the
    session's empty one)."""
    arguments = [sys.executable, '-m', 'lsm_ros.ros.node', '--ros-args', '-r', f'__ns:={NAMESPACE}']
    for parameter in parameters:
        arguments += ['-p', parameter]
    environment = dict(os.environ, PYTHONUNBUFFERED='1')
    if weights_dir is not None:
        environment['LSM_ROS_WEIGHTS'] = str(weights_dir)
    return subprocess.Popen(arguments, cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


class _OutputReader:
    """Collects a child's merged output on a thread (so its pipe never fills)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line)

    def text(self) -> str:
        self._thread.join(5.0)
        return ''.join(self.lines)


@pytest.fixture
def client(ros_context: Any) -> Iterator[Any]:
    """A node publishing a random rgb8 pair on the node's relative inputs and collecting its ~/info."""
    from rclpy.node import Node
    from sensor_msgs.msg import Image

    from lsm_ros.msg import ReconstructionInfo
    from lsm_ros.ros import conversions
    from lsm_ros.ros.graph import RosGraph

    node = Node('node_process_client', context=ros_context)
    node.infos = []
    node.create_subscription(ReconstructionInfo, f'{NAMESPACE}/lsm_node/info', node.infos.append, 10)
    publishers = {side: node.create_publisher(Image, f'{NAMESPACE}/{side}/image_rect', 10)
                  for side in ('left', 'right')}
    rgb = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)

    def publish_pair(stamp_ns: int) -> None:
        header = conversions.make_header(conversions.nanoseconds_to_stamp(stamp_ns), 'camera_optical_frame')
        for side, publisher in publishers.items():
            publisher.publish(conversions.rgb_to_image_msg(rgb if side == 'left' else rgb[:, ::-1], header))

    node.publish_pair = publish_pair
    graph = RosGraph(ros_context)
    graph.add(node)
    try:
        yield node
    finally:
        graph.close()


@pytest.mark.parametrize('weights', ['parameter', 'installed'])
def test_node_process_reconstructs_and_stops_on_sigint(weights: str, dust3r_file: Path, client: Any,
                                                       tmp_path: Path) -> None:
    """The DUSt3R file given as a parameter, or installed where `lsm-ros weights fetch` puts it (no parameter)."""
    settings = ('device:=cpu', 'resolution:=224', 'use_camera_info:=false', 'pose_ransac_iterations:=20',
                'pose_reprojection_error_px:=100.0')
    if weights == 'parameter':
        process = _start_node(f'dust3r_checkpoint:={dust3r_file}', *settings)
    else:
        (tmp_path / 'DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth').symlink_to(dust3r_file)
        process = _start_node(*settings, weights_dir=tmp_path)
    output = _OutputReader(process)
    try:
        stamp_ns = 1_000_000_000
        deadline = time.monotonic() + START_TIMEOUT_S
        while not client.infos and time.monotonic() < deadline and process.poll() is None:
            client.publish_pair(stamp_ns)
            stamp_ns += 100_000_000
            wait_until(lambda: bool(client.infos), 1.0)
        assert client.infos, f'no ~/info from lsm_node (exit code {process.poll()}):\n{output.text()}'
        info = client.infos[0]
        assert (info.width, info.height) == (224, 224) and info.num_points > 0
        assert info.intrinsics_source and not info.metric_scale
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, output.text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = output.text()
    assert 'Traceback' not in text, text
    assert 'lsm_node active' in text, text
    assert ('using the official weights installed in' in text) == (weights == 'installed'), text
    # the pair in flight at SIGINT finishes with a valid Context: no failed publish, no error at shutdown
    assert '[WARN]' not in text and '[ERROR]' not in text and 'context is invalid' not in text, text


def test_node_process_without_weights_exits_1_with_the_fix() -> None:
    process = _start_node('device:=cpu')
    output = _OutputReader(process)
    try:
        assert process.wait(timeout=120) == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = output.text()
    assert 'no checkpoint configured and none installed' in text and 'dust3r_checkpoint' in text, text
    assert 'lsm-ros weights fetch' in text, text
    assert 'Traceback' not in text, text
