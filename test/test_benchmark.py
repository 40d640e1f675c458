"""``lsm-ros bench`` with the tiny model: the stage table and its JSON, the check that the composed stages are the
Reconstructor's, the ROS mode at 30 Hz (drops counted, no backlog), the plain-script entry point with its own
loopback isolation, and the argument errors.

The bench runs with one torch thread here (restored afterwards): the 2-core test machine may be shared, and
two spinning threads on one free core make small networks several times slower.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from lsm_ros import benchmark
from lsm_ros.cli import main
from lsm_ros.ros.isolation import ISOLATION_VARIABLES

pytestmark = pytest.mark.timeout(300)
REPO_ROOT = Path(__file__).resolve().parents[1]
QUICK = ['--quick', '--device', 'cpu', '--threads', '1']
QUICK_STAGES = ['bench', *QUICK, '--resolutions', '224', '--pairs', '2', '--warmup', '0']


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_stage_bench_prints_every_stage_and_writes_the_json(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / 'out' / 'bench.json'
    assert main(QUICK_STAGES + ['--max-other-cores', '64', '--json', str(path)]) == 0
    table = capsys.readouterr().out
    report = json.loads(path.read_text())
    for _, title in benchmark.STAGES:
        assert f'| {title} |' in table
    assert 'composed stages == Reconstructor.reconstruct/render at 224x224: bit-identical' in table
    assert report['mode'] == 'stages' and report['trained_weights'] is False and report['threads'] == 1
    machine = report['machine']
    assert machine['cpu_cores'] == os.cpu_count() and machine['torch'] == torch.__version__
    assert machine['device'] == 'cpu' and machine['accelerator'] is None
    assert report['precision'] == 'fp32' and report['network_precisions'] == {'dust3r': 'fp32', 'lseg': 'fp32'}
    assert report['images'] in benchmark.IMAGE_SOURCES[1:]
    check = report['composition_check']
    assert check['identical'] and set(check['max_relative_difference']) >= {
        'pts3d_1', 'conf_2', 'gaussians.means', 'gaussians.features', 'K_2', 'T_1_2', 'render.rgb', 'render.features'}
    [size] = report['sizes']
    assert (size['size'], size['pairs']) == ('224x224', 2)
    assert set(size['stages_ms']) == set(benchmark.STAGE_KEYS)
    for figures in [*size['stages_ms'].values(), size['reconstruction_ms'], size['total_ms']]:
        assert 0 < figures['median'] <= figures['p95']
    for samples in size['samples_ms'].values():
        assert len(samples) == 2 and min(samples) > 0
    reconstruction = np.sum([size['samples_ms'][key] for key in benchmark.RECONSTRUCTION_STAGES], axis=0)
    assert size['pairs_per_s'] == pytest.approx(2 / (reconstruction.sum() / 1e3))
    assert size['peak_memory_mib'] > 50 and 'other_processes_cores' in size
    assert size['other_processes_cores'] <= (os.cpu_count() or 1)   # other processes' mean busy cores
    assert report['max_other_cores'] == 64 and size['discarded_pairs'] == 0   # a 64-core load cannot happen
    assert f'{size["pairs_per_s"]:.3f}' in table and 'peak RSS (VmHWM), MiB' in table


def test_reduced_precision_is_composed_as_the_pipeline_runs_it(tmp_path: Path) -> None:
    path = tmp_path / 'bf16.json'
    assert main(['bench', *QUICK, '--precision', 'bf16', '--resolutions', '224', '--pairs', '1', '--warmup', '0',
                 '--json', str(path)]) == 0
    report = json.loads(path.read_text())
    assert report['precision'] == 'bf16' and report['network_precisions'] == {'dust3r': 'fp32', 'lseg': 'bf16'}
    assert report['composition_check']['identical']


def test_the_composition_check_catches_a_stage_that_differs(tiny_lsm_reconstructor: Any) -> None:
    torch.set_num_threads(1)
    size = benchmark.parse_model_size('224')
    _, pairs = benchmark.load_image_pairs('synthetic')
    left, right = benchmark.fit_pair(pairs[0], size)
    composed = benchmark.compose_reconstruction(tiny_lsm_reconstructor, left, right, size)
    assert set(composed.seconds) == set(benchmark.STAGE_KEYS) and composed.img1.shape == (1, 3, 224, 224)
    composed.gaussians['opacities'] = composed.gaussians['opacities'] * 1.01
    with pytest.raises(RuntimeError, match='gaussians.opacities'):
        benchmark.check_composition(tiny_lsm_reconstructor, left, right, composed)


def _check_ros_report(ros: dict[str, Any]) -> None:
    """Slow inference under a fast stream: most pairs dropped and counted, the processed ones not delayed."""
    figures = {key: value for key, value in ros.items() if key != 'node_statistics'}
    assert ros['published'] > ros['processed'] >= 2, figures
    assert ros['dropped'] == ros['published'] - ros['processed'] and ros['node_worker_dropped'] > 0, figures
    service_ms = ros['service_time_ms']
    assert service_ms > 10 * 1e3 / ros['rate_hz'], figures           # inference far slower than the input rate
    # a queue would make the last pair wait for every earlier one (~published x service time); latest-pair-wins
    # keeps every latency within the pair in flight plus its own, about two times per pair. (This bound was two of
    # the longest gaps while rclpy's MultiThreadedExecutor could stall the node for 10 s; RosGraph's executor
    # does not: lsm_ros/ros/graph.py.)
    assert ros['max_latency_ms'] <= 3 * service_ms + 1000, figures
    assert ros['last_latency_ms'] <= 3 * service_ms + 1000, figures
    assert ros['node_pairs_formed'] >= 0.8 * ros['published'], figures   # the executor kept up with the images
    assert len(ros['latencies_ms']) == ros['processed'] and min(ros['latencies_ms']) > 0, figures
    assert any(topic.endswith('/semantic/labels') for topic in ros['products'])
    assert not any(topic.endswith('/relative_pose') for topic in ros['products'])
    assert ros['rss_after_stream_mib'] > 0


def test_ros_mode_drops_instead_of_queueing(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / 'ros.json'
    assert main(['bench', '--ros', *QUICK, '--rate', '30', '--duration', '3',
                 '--json', str(path)]) == 0
    report = json.loads(path.read_text())
    assert report['mode'] == 'ros' and report['size'] == '224x224'
    ros = report['ros']
    assert ros['rate_hz'] == 30 and ros['published'] == 90
    assert ros['ros_environment']['ROS_DOMAIN_ID'] == os.environ['ROS_DOMAIN_ID']   # the test session's own
    _check_ros_report(ros)
    table = capsys.readouterr().out
    assert f'| {ros["published"]} / {ros["processed"]} / {ros["dropped"]} |' in table
    assert f'| {ros["node_worker_dropped"]} / ' in table


def test_plain_script_keeps_ros_on_loopback_by_itself(tmp_path: Path) -> None:
    path = tmp_path / 'script.json'
    environment = {k: v for k, v in os.environ.items() if k not in ISOLATION_VARIABLES}
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / 'scripts' / 'bench.py'), '--ros', *QUICK,
         '--duration', '2', '--json', str(path)], env=environment, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    ros = json.loads(path.read_text())['ros']
    isolation = ros['ros_environment']
    assert isolation['ROS_AUTOMATIC_DISCOVERY_RANGE'] == 'LOCALHOST'
    assert 1 <= int(isolation['ROS_DOMAIN_ID']) <= 101
    assert isolation['FASTDDS_DEFAULT_PROFILES_FILE'] == str(REPO_ROOT / 'config' / 'fastdds_localhost.xml')
    assert ros['published'] == 60 and ros['processed'] >= 1 and ros['dropped'] > 0
    assert '| ROS path (lsm_node on loopback) | value |' in completed.stdout


def test_cpu_contention_is_measured() -> None:
    snapshot = benchmark.CpuSnapshot.now()
    sum(i * i for i in range(200_000))                         # this process's own work is not contention
    assert snapshot.other_processes_cores() <= (os.cpu_count() or 1)
    assert 0.1 <= benchmark.wait_for_quiet(float(os.cpu_count() or 1), window_s=0.1) < 5


def test_model_sizes() -> None:
    assert [str(benchmark.parse_model_size(t)) for t in ('224', '256', '512x384', '384x512', '256x256')] == [
        '224x224', '256x256', '512x384', '384x512', '256x256']
    assert benchmark.parse_model_size('512x384').resolution == 512
    assert benchmark.parse_model_size('224').label == '224'
    for bad in ('512', '300', '512x512', '512x390', '640x480', 'big', '224x256'):
        with pytest.raises(ValueError):
            benchmark.parse_model_size(bad)


@pytest.mark.parametrize('arguments, message', [
    (['--ros', '--resolutions', '224', '256'], 'one size'),
    (['--ros', '--resolutions', '384x512'], 'one size'),
    (['--images', 'elsewhere'], '--images elsewhere'),
    (['--precision', 'fp16', '--device', 'cpu'], '--precision: .*fp16.* needs a CUDA device'),
    (['--device', 'tpu'], '--device'),
    (['--lsm-checkpoint', 'checkpoint-final.pth'], '--quick runs the tiny random model'),
])
def test_bad_options_are_refused_before_anything_runs(arguments: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(['bench', '--quick'] + arguments)


@pytest.mark.parametrize('arguments', [['--pairs', '0'], ['--warmup', '-1'], ['--threads', 'two'],
                                       ['--rate', '0'], ['--duration', 'inf'], ['--resolutions', '300'],
                                       ['--precision', 'fp8']])
def test_bad_values_are_usage_errors(arguments: list[str], capsys: Any) -> None:
    with pytest.raises(SystemExit) as exited:
        main(['bench', '--quick'] + arguments)
    assert exited.value.code == 2
    assert 'lsm-ros bench: error: argument' in capsys.readouterr().err
