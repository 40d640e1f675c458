"""scripts/gpu_check.sh and lsm_ros/gpu_check.py without a GPU (issue 11, item 6): the no-CUDA exit, argument
errors, the steps' runner (timeouts, partial reports, the budget) and the report writer on fake bench, accuracy and
pytest results (pass / fail / unmeasured per bound)."""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lsm_ros import gpu_check
from lsm_ros.benchmark import STAGE_KEYS, ModelSize, SizeResult

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / 'scripts' / 'gpu_check.sh'
MIB = 1 << 20


def _gpu_visible_to_the_script() -> bool:
    return any(Path('/dev').glob('nvidia[0-9]*')) or shutil.which('nvidia-smi') is not None


@pytest.fixture()
def reference(tmp_path: Path) -> Path:
    """A folder with the files the check's argument test looks for (their contents are not read before CUDA)."""
    folder = tmp_path / 'reference' / 'lsm_vitl_256'
    folder.mkdir(parents=True)
    for name in ('manifest.tsv', 'config.json', 'inputs.npz'):
        (folder / name).write_text('')
    return folder


def _script(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(['bash', str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT)


# ---------------------------------------------------------------------------------------------- no CUDA, arguments
@pytest.mark.skipif(_gpu_visible_to_the_script(), reason='this machine has an NVIDIA device')
def test_script_without_cuda_stops_at_once(reference: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    done = _script('--reference', str(reference), '--out', str(tmp_path / 'out'))
    assert done.returncode == gpu_check.NO_CUDA_EXIT, done
    assert time.monotonic() - start < 5.0
    assert 'no CUDA device' in done.stderr and 'nothing was run' in done.stderr
    assert not (tmp_path / 'out').exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')
def test_module_without_cuda_exits_with_a_message(reference: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, '-m', 'lsm_ros.gpu_check', '--reference', str(reference), '--out',
                           str(tmp_path / 'out')], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == gpu_check.NO_CUDA_EXIT, done
    assert 'no CUDA device: torch.cuda.is_available() is False' in done.stderr
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('arguments,message', [
    ((), '--reference DIR is required'),
    (('--reference', '{reference}'), '--out DIR is required'),
    (('--reference', '{reference}', '--out', '{out}', '--bogus'), "unknown argument '--bogus'"),
    (('--reference',), '--reference needs a value'),
    (('--reference', '{tmp}', '--out', '{out}'), 'not the parity reference folder (no manifest.tsv)'),
    (('--reference', '{reference}', '--out', '{file}'), 'exists and is not a folder'),
    (('--reference', '{reference}', '--out', '{out}', '--wheels', '{tmp}/none'), 'not a folder'),
    (('--reference', '{reference}', '--out', '{out}', '--wheels={tmp}'), 'no .whl files'),
])
def test_script_argument_errors(arguments: tuple[str, ...], message: str, reference: Path, tmp_path: Path) -> None:
    (tmp_path / 'file').write_text('x')
    values = dict(reference=reference, out=tmp_path / 'out', tmp=tmp_path, file=tmp_path / 'file')
    done = _script(*(a.format(**values) for a in arguments))
    assert done.returncode == 2, done
    assert message in done.stderr and 'usage: scripts/gpu_check.sh' in done.stderr, done.stderr


def test_script_help_documents_the_exit_statuses() -> None:
    done = _script('--help')
    assert done.returncode == 0 and '--reference DIR --out DIR' in done.stdout and '3 no CUDA device' in done.stdout


@pytest.mark.parametrize('arguments,message', [
    ([], 'are required'),
    (['--reference', '{tmp}', '--out', '{out}'], 'not a parity reference folder'),
    (['--reference', '{reference}', '--out', '{out}', '--pairs', '0'], '--pairs >= 1'),
    (['--reference', '{reference}', '--out', '{out}', '--budget', '-1'], '--budget must be > 0'),
])
def test_module_argument_errors(arguments: list[str], message: str, reference: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    values = dict(reference=reference, out=tmp_path / 'out', tmp=tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main([a.format(**values) for a in arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- bounds and figures
def _bench_report(precision: str, pair_ms: dict[str, float], render_ms: float, peak_mib: float,
                  pipeline: dict[str, float] | None = None) -> dict[str, Any]:
    """A bench --json report shaped by the bench's own SizeResult.to_dict: ``pair_ms`` per size label is split
    evenly over the reconstruction stages of every pair; ``pipeline``: the pipeline's figures per pair (ms)."""
    from lsm_ros.benchmark import RECONSTRUCTION_STAGES
    sizes = []
    for label, total in pair_ms.items():
        size = ModelSize(256, 256) if label == '256' else ModelSize(512, 384)
        result = SizeResult(size, {key: [] for key in STAGE_KEYS})
        for jitter in (0.9, 1.0, 1.1):
            for key in STAGE_KEYS:
                seconds = total / len(RECONSTRUCTION_STAGES) * jitter if key != 'render' else render_ms
                result.samples_s[key].append(seconds / 1e3)
            result.pair_wall_s.append(total * jitter / 1e3)
            if pipeline is not None:
                for key, value in pipeline.items():
                    result.pipeline_s[key].append(value / 1e3)
            result.pair_other_cores.append(0.0)
            result.pose_found.append(True)
            result.render_coverage.append(1.0)
        result.peak_memory_bytes = int(peak_mib * MIB)
        sizes.append(result.to_dict())
    return dict(mode='stages', precision=precision, memory_kind='torch.cuda.max_memory_allocated', sizes=sizes)


def _steps(fp32_ms: float = 35.0, bf16_ms: float = 14.0, peak_mib: float = 3000.0, render_ms: float = 4.0,
           parity: dict[str, Any] | None = None, accuracy: dict[str, Any] | None = None,
           pipeline: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """The results of every step of a check on fake figures (no pipeline figures in the bench: the accuracy
    step's query and render timings count)."""
    parity = parity if parity is not None else dict(tests=4, failures=0, errors=0, skipped=0, passed=4, failed=[],
                                                    skipped_tests=[], properties={})
    accuracy = accuracy if accuracy is not None else dict(
        bf16_depth_within_1pct_fraction=0.995, bf16_label_agreement=0.99, query_8_phrases_ms=2.0,
        query_8_phrases_first_ms=30.0, reconstructor_render_256_ms=4.5, bf16_depth_median_relative=0.001)
    ok = dict(status='ok', returncode=0, seconds=1.0, command='x', title='x')
    return [dict(ok, name='gsplat_build'),
            dict(ok, name='cuda_tests', tests=dict(tests=10, failures=0, errors=0, skipped=1, passed=9, failed=[],
                                                   skipped_tests=['t::x: needs ROS 2'], properties={})),
            dict(ok, name='parity', tests=parity),
            dict(ok, name='bench_fp32', bench=_bench_report('fp32', {'256': fp32_ms, '512x384': 3 * fp32_ms},
                                                            render_ms, 5000.0, pipeline)),
            dict(ok, name='bench_bf16', bench=_bench_report('bf16', {'256': bf16_ms, '512x384': 3 * bf16_ms},
                                                            render_ms, peak_mib)),
            dict(ok, name='accuracy', accuracy=accuracy)]


def _statuses(report: dict[str, Any]) -> dict[str, str]:
    return {bound['figure']: bound['status'] for bound in report['bounds']}


def _report(steps: list[dict[str, Any]], complete: bool = True) -> dict[str, Any]:
    return gpu_check.build_report({'device': 'FAKE GPU', 'torch': '0', 'cuda': '0'}, steps,
                                  started='2026-01-01T00:00:00Z', complete=complete, settings={})


def test_every_bound_passes_on_good_figures() -> None:
    report = _report(_steps())
    assert set(_statuses(report).values()) == {'pass'}, _statuses(report)
    assert report['verdict'] == 'pass'
    figures = report['figures']
    assert figures['fp32_pair_256_ms'] == pytest.approx(35.0) and figures['bf16_pair_256_ms'] == pytest.approx(14.0)
    assert figures['fp32_pair_512x384_ms'] == pytest.approx(105.0)
    assert figures['bf16_peak_memory_256_gb'] == pytest.approx(3000 * MIB / 1e9)
    assert figures['render_256_features_ms'] == pytest.approx(4.5)        # the accuracy step's Reconstructor.render
    assert figures['query_8_phrases_ms'] == pytest.approx(2.0)
    assert figures['fp32_stages_256_ms']['render'] == pytest.approx(4.0)
    assert figures['parity_max_relative'] == 1e-4 and not figures['parity_recorded']


@pytest.mark.parametrize('change,failing', [
    (dict(fp32_ms=40.5), 'fp32_pair_256_ms'),
    (dict(bf16_ms=15.01), 'bf16_pair_256_ms'),
    (dict(peak_mib=4e9 / MIB + 1), 'bf16_peak_memory_256_gb'),
    (dict(accuracy=dict(bf16_depth_within_1pct_fraction=0.99, bf16_label_agreement=0.99, query_8_phrases_ms=2.0,
                        reconstructor_render_256_ms=5.2)), 'render_256_features_ms'),
    (dict(accuracy=dict(bf16_depth_within_1pct_fraction=0.989, bf16_label_agreement=0.99, query_8_phrases_ms=2.0,
                        reconstructor_render_256_ms=5.0)), 'bf16_depth_within_1pct_fraction'),
    (dict(accuracy=dict(bf16_depth_within_1pct_fraction=0.99, bf16_label_agreement=0.979, query_8_phrases_ms=2.0,
                        reconstructor_render_256_ms=5.0)), 'bf16_label_agreement'),
    (dict(accuracy=dict(bf16_depth_within_1pct_fraction=0.99, bf16_label_agreement=0.98, query_8_phrases_ms=5.01,
                        reconstructor_render_256_ms=5.0)), 'query_8_phrases_ms'),
    (dict(pipeline=dict(reconstruct=41.0, query=1.0, render_view=1.0)), 'fp32_pair_256_ms'),
    (dict(pipeline=dict(reconstruct=20.0, query=1.0, render_view=5.5)), 'render_256_features_ms'),
    (dict(parity=dict(tests=4, failures=1, errors=0, skipped=0, passed=3, failed=['t::dust3r (failure): 2e-3'],
                      skipped_tests=[], properties={})), 'parity_max_relative'),
])
def test_each_bound_fails_alone(change: dict[str, Any], failing: str) -> None:
    report = _report(_steps(**change))
    statuses = _statuses(report)
    assert statuses.pop(failing) == 'fail'
    assert set(statuses.values()) == {'pass'}, statuses
    assert report['verdict'] == 'fail'


def test_the_pipelines_own_figures_count_where_the_bench_has_them() -> None:
    """Reconstructor.reconstruct / query / render as the bench times them, not the composed stages' sum and not
    the accuracy step's timings; the composed sum is kept beside them."""
    figures = _report(_steps(fp32_ms=60.0, pipeline=dict(reconstruct=30.0, query=3.0, render_view=4.9)))['figures']
    assert figures['fp32_pair_256_ms'] == pytest.approx(30.0) and figures['fp32_composed_256_ms'] == pytest.approx(60)
    assert figures['query_8_phrases_ms'] == pytest.approx(3.0) and figures['accuracy_query_8_phrases_ms'] == 2.0
    assert figures['render_256_features_ms'] == pytest.approx(4.9)
    several = dict(runs=[dict(_bench_report('bf16', {'256': 9.0}, 1.0, 100.0), precision='bf16'),
                         dict(_bench_report('fp32', {'256': 33.0}, 1.0, 100.0), precision='fp32')])
    assert gpu_check.bench_figures('fp32', several)['fp32_pair_256_ms'] == pytest.approx(33.0)   # from its run
    assert gpu_check.bench_figures('bf16', several)['bf16_pair_256_ms'] == pytest.approx(9.0)


def test_limits_are_inclusive_and_missing_figures_are_unmeasured() -> None:
    bound = gpu_check.Bound('x', 'x', '<=', 40.0, 'ms')
    assert bound.check(40.0) == 'pass' and bound.check(40.0001) == 'fail'
    assert bound.check(None) == bound.check(math.nan) == bound.check('40') == 'unmeasured'
    assert bound.check(math.inf) == 'fail'
    assert gpu_check.Bound('y', 'y', '>=', 0.99, '').check(0.99) == 'pass'
    steps = [step for step in _steps() if step['name'] != 'bench_bf16']
    steps[2] = dict(steps[2], status='missing', tests=None)          # no parity file
    report = _report(steps)
    statuses = _statuses(report)
    assert {k for k, v in statuses.items() if v == 'unmeasured'} == {
        'bf16_pair_256_ms', 'bf16_peak_memory_256_gb', 'parity_max_relative'}
    assert report['verdict'] == 'incomplete'
    markdown = gpu_check.format_markdown(report)
    assert markdown.count('UNMEASURED') >= 3 and '# GPU check (INCOMPLETE)' in markdown


def test_recorded_parity_errors_are_the_figure() -> None:
    parity = dict(tests=3, failures=1, errors=0, skipped=0, passed=2, skipped_tests=[],
                  failed=['test.test_parity_cuda::test_bf16_accuracy_per_network (failure): assert 0.97 >= 0.99'],
                  properties={'test_dust3r_end_to_end.dust3r.pts3d_1_max_relative': '3e-06',
                              'test_lseg_end_to_end.lseg.lseg_features_max_relative': '7e-05',
                              'test_bf16_accuracy_per_network.bf16_lseg_label_agreement': '0.97'})
    report = _report(_steps(parity=parity))
    figures = report['figures']
    assert figures['parity_max_relative'] == pytest.approx(7e-5) and figures['parity_recorded']   # bf16 apart
    assert _statuses(report)['parity_max_relative'] == 'pass'
    assert '| test_bf16_accuracy_per_network.bf16_lseg_label_agreement | 0.97 |' in gpu_check.format_markdown(report)
    skipped = dict(parity, passed=0, skipped=3, failures=0, failed=[], properties={})
    assert _report(_steps(parity=skipped))['figures']['parity_max_relative'] is None


def test_a_failed_step_fails_the_verdict() -> None:
    steps = _steps()
    steps[1] = dict(steps[1], status='timeout', returncode=-9)
    assert _report(steps)['verdict'] == 'fail'
    assert _report(_steps(), complete=False)['verdict'] == 'incomplete'


def test_markdown_and_json_hold_every_figure(tmp_path: Path) -> None:
    report = _report(_steps(accuracy=dict(bf16_depth_within_1pct_fraction=0.97, bf16_label_agreement=0.99,
                                          query_8_phrases_ms=2.0)))
    gpu_check.write_report(tmp_path, report)
    assert json.loads((tmp_path / gpu_check.REPORT_JSON).read_text()) == json.loads(json.dumps(report))
    markdown = (tmp_path / gpu_check.REPORT_MD).read_text()
    assert '# GPU check (FAIL)' in markdown and 'FAKE GPU' in markdown
    assert '| 0.97 | >= 0.99 | FAIL |' in markdown
    assert '| **Reconstructor.reconstruct: pair → Gaussians + cameras** | 35.0 | 105.0 | 14.0 | 42.0 |' in markdown
    assert '- skipped t::x: needs ROS 2' in markdown
    assert sorted(p.name for p in tmp_path.iterdir()) == [gpu_check.REPORT_JSON, gpu_check.REPORT_MD]


# ---------------------------------------------------------------------------------------------- running steps
def test_read_junit_of_a_real_pytest_run(tmp_path: Path) -> None:
    (tmp_path / 'test_sample.py').write_text(
        'import pytest\n'
        'def test_ok(record_property):\n    record_property("max_relative_error", 2e-5)\n'
        'def test_bad():\n    assert 1 == 2, "parity 3e-3"\n'
        '@pytest.mark.skip(reason="needs CUDA")\ndef test_skipped():\n    pass\n')
    xml = tmp_path / 'out.xml'
    subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-p', 'no:randomly',
                    f'--junitxml={xml}', str(tmp_path / 'test_sample.py')], capture_output=True, timeout=120,
                   cwd=tmp_path)
    tests = gpu_check.read_junit(xml)
    assert {k: tests[k] for k in ('tests', 'passed', 'failures', 'errors', 'skipped')} == dict(
        tests=3, passed=1, failures=1, errors=0, skipped=1)
    assert len(tests['failed']) == 1 and 'test_bad (failure)' in tests['failed'][0] and '3e-3' in tests['failed'][0]
    assert tests['properties'] == {'test_ok.max_relative_error': '2e-05'}
    assert tests['skipped_tests'][0].endswith('needs CUDA')
    assert gpu_check.read_junit(tmp_path / 'missing.xml') is None


def test_run_step_kills_a_step_at_its_timeout(tmp_path: Path) -> None:
    log = tmp_path / 'log'
    step = gpu_check.Step('sleepy', 'sleeps', ['bash', '-c', 'echo started; sleep 60 & sleep 60'], 60.0)
    start = time.monotonic()
    result = gpu_check.run_step(step, log, dict(os.environ), timeout_s=1.0)
    assert time.monotonic() - start < 10.0
    assert result['status'] == 'timeout' and result['name'] == 'sleepy'
    text = log.read_text()
    assert 'started' in text and 'sleepy: timeout' in text
    missing = gpu_check.Step('absent', 'absent', ['true'], 5.0, required_file=tmp_path / 'nope.py')
    assert gpu_check.run_step(missing, log, dict(os.environ), 5.0)['status'] == 'missing'


def test_run_check_writes_partial_reports_and_keeps_the_budget(tmp_path: Path, reference: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake steps: a bench that writes its JSON, a step that checks that the report already holds the steps
    before it, a failing one, and one that the budget no longer allows."""
    out = tmp_path / 'out'
    bench_json = tmp_path / 'bench.json'
    bench_json_text = json.dumps(_bench_report('fp32', {'256': 30.0, '512x384': 90.0}, 3.0, 5000.0))
    python = sys.executable

    def make_steps(work: Path, interpreter: str, pairs: int, warmup: int) -> list[gpu_check.Step]:
        assert (interpreter, pairs, warmup) == (python, 3, 1)
        return [
            gpu_check.Step('bench_fp32', 'fake bench', [python, '-c', f'open({str(bench_json)!r}, "w").write('
                                                                       f'{bench_json_text!r})'], 30.0,
                           collect=lambda: {'bench': json.loads(bench_json.read_text())}),
            gpu_check.Step('sees_the_first', 'reads the partial report', [python, '-c', (
                'import json, sys; report = json.load(open(sys.argv[1])); '
                'sys.exit(0 if [s["name"] for s in report["steps"]] == ["bench_fp32"] '
                'and abs(report["figures"]["fp32_pair_256_ms"] - 30.0) < 1e-9 and not report["complete"] else 1)'),
                str(out / gpu_check.REPORT_JSON)], 30.0),
            gpu_check.Step('fails', 'exits 1', [python, '-c', 'import sys; print("boom"); sys.exit(1)'], 30.0),
            gpu_check.Step('sleeps', 'uses up the budget', [python, '-c', 'import time; time.sleep(60)'], 60.0),
            gpu_check.Step('too_late', 'never runs', [python, '-c', 'pass'], 30.0),
        ]

    monkeypatch.setattr(gpu_check, 'MIN_STEP_S', 2.0)     # a step needs 2 s of the 8 s budget to start
    args = argparse.Namespace(reference=reference, out=out, budget=8.0, pairs=3, warmup=1, python=python)
    start = time.monotonic()
    status = gpu_check.run_check(args, describe=lambda: {'device': 'FAKE GPU'}, make_env=lambda ref: dict(
        os.environ, LSM_ROS_REFERENCE=str(ref)), make_steps=make_steps)
    assert time.monotonic() - start < 20.0
    assert status == 1
    report = json.loads((out / gpu_check.REPORT_JSON).read_text())
    assert [(s['name'], s['status']) for s in report['steps']] == [
        ('bench_fp32', 'ok'), ('sees_the_first', 'ok'), ('fails', 'failed'), ('sleeps', 'timeout'),
        ('too_late', 'not run')]
    assert report['complete'] and report['verdict'] == 'fail'
    assert report['figures']['fp32_pair_256_ms'] == pytest.approx(30.0)
    assert _statuses(report)['fp32_pair_256_ms'] == 'pass' and _statuses(report)['bf16_pair_256_ms'] == 'unmeasured'
    assert 'boom' in (out / gpu_check.REPORT_LOG).read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted([gpu_check.REPORT_JSON, gpu_check.REPORT_MD,
                                                            gpu_check.REPORT_LOG])


def test_step_environment_points_the_steps_at_the_reference(reference: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    monkeypatch.setenv('TORCH_CUDA_ARCH_LIST', '9.0')
    monkeypatch.delenv('LSM_ROS_SHARED', raising=False)
    monkeypatch.delenv('MAX_JOBS', raising=False)
    env = gpu_check.step_environment(reference)
    assert env['LSM_ROS_REFERENCE'] == str(reference)
    assert env['LSM_ROS_SHARED'] == str(reference.parent.parent)          # <shared>/reference/lsm_vitl_256
    assert env['PYTHONPATH'].split(os.pathsep)[0] == str(REPO_ROOT)
    assert env['TORCH_CUDA_ARCH_LIST'] == '9.0' and 1 <= int(env['MAX_JOBS']) <= 14
    from lsm_ros.reference_weights import find_reference_dir
    monkeypatch.setenv('LSM_ROS_REFERENCE', env['LSM_ROS_REFERENCE'])
    assert find_reference_dir() == reference          # what the parity test and the bench read


def test_the_steps_are_the_issues() -> None:
    steps = gpu_check.build_steps(Path('/tmp/work'), 'python3', 10, 3)
    names = [step.name for step in steps]
    assert names == ['gsplat_build', 'cuda_tests', 'parity', 'bench_fp32', 'bench_bf16', 'accuracy']
    commands = {step.name: step.command for step in steps}
    assert commands['cuda_tests'][:5] == ['python3', '-m', 'pytest', '-m', 'cuda']
    for precision in ('fp32', 'bf16'):
        bench = commands[f'bench_{precision}']
        assert bench[:4] == ['python3', '-m', 'lsm_ros.cli', 'bench']
        assert bench[bench.index('--precision') + 1] == precision and bench[bench.index('--device') + 1] == 'cuda'
        assert bench[bench.index('--resolutions') + 1:bench.index('--resolutions') + 3] == ['256', '512x384']
    # the bench accepts exactly these arguments (parsed by its own parser, nothing run)
    from lsm_ros.cli import build_parser
    parsed = build_parser().parse_args(commands['bench_bf16'][3:])
    assert parsed.precision in ('bf16', ['bf16']) and parsed.pairs == 10 and parsed.warmup == 3
    assert parsed.images == 'reference' and parsed.json.endswith('bench_bf16.json')
    assert all(bench[bench.index('--json') - 2:bench.index('--json')] == ['--cuda-graphs', '--cuda-streams']
               for bench in (commands['bench_fp32'], commands['bench_bf16'])) or not gpu_check.fast_path_flags()
    assert sum(step.timeout_s for step in steps if step.name != 'gsplat_build') > gpu_check.DEFAULT_BUDGET_S / 2
    assert gpu_check.DEFAULT_BUDGET_S <= 8 * 60 - 30


def test_gsplat_warmup_renders_with_the_cpu_backend() -> None:
    assert gpu_check.gsplat_warmup(device='cpu', backend='torch') == 0


NO_ROS_PYTEST = '''
import importlib.abc, sys
ROS = ('rclpy', 'rosidl_runtime_py', 'rosbag2_py', 'sensor_msgs', 'geometry_msgs', 'std_msgs', 'tf2_msgs',
       'builtin_interfaces', 'rcl_interfaces', 'diagnostic_msgs', 'vision_msgs', 'message_filters')
class NoRos(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ROS or name in ('lsm_ros.msg', 'lsm_ros.srv'):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoRos())
import pytest
sys.exit(pytest.main(sys.argv[1:]))
'''


def test_cuda_session_needs_no_rclpy(tmp_path: Path) -> None:
    """`pytest -m cuda` where ROS is not installed (the GPU machine): conftest imports no rclpy, a test module that
    needs ROS is reported as skipped instead of failing the collection, and the CUDA tests are collected."""
    runner = tmp_path / 'no_ros_pytest.py'
    runner.write_text(NO_ROS_PYTEST)
    done = subprocess.run([sys.executable, str(runner), '--collect-only', '-m', 'cuda', '-q', '-p', 'no:randomly',
                           '-p', 'no:cacheprovider', '-rs', 'test/test_node_e2e.py', 'test/test_gpu_guards.py'],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert 'test/test_gpu_guards.py::test_reconstruct_guards_cuda' in done.stdout
    assert 'test_node_e2e.py:0: needs ROS 2 (' in done.stdout and 'is not importable in this session' in done.stdout
    assert 'error' not in done.stdout.lower().split('short test summary info')[-1]


def test_accuracy_figures_of_the_tiny_lsm_on_the_cpu() -> None:
    """The accuracy step's figures (run on CUDA with the reference weights) computed here with the tiny LSM in
    fp32 and bf16: with DUSt3R kept in fp32 the depth is untouched, and the labels mostly agree."""
    import numpy as np

    from lsm_ros.model.lsm import LsmConfig
    from lsm_ros.pipeline import Reconstructor
    settings = dict(device='cpu', resolution=224, pose_max_points=512, pose_ransac_iterations=20,
                    pose_reprojection_error_px=100.0)
    rng = np.random.default_rng(5)
    left, right = (rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(2))
    exact = Reconstructor.from_config(LsmConfig.tiny(), precision='fp32', **settings)
    figures = gpu_check.accuracy_figures(
        exact, lambda: Reconstructor.from_config(LsmConfig.tiny(), precision='bf16', **settings), left, right,
        repeats=1, render_size=(16, 16))
    assert figures['reduced_network_precisions']['lseg'] == 'bf16'
    if figures['reduced_network_precisions']['dust3r'] == 'fp32':
        assert figures['bf16_depth_within_1pct_fraction'] == 1.0 and figures['bf16_depth_median_relative'] == 0.0
    assert 0.9 < figures['bf16_label_agreement'] <= 1.0 and figures['fp32_distinct_labels'] >= 1
    assert figures['query_8_phrases_first_ms'] > 0 and figures['query_8_phrases_ms'] > 0
    assert figures['reconstructor_render_256_ms'] > 0 and figures['model_size'] == [224, 224]


def test_environment_description(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CUDA it refuses; with a (faked) device it names the device and the versions, importing nothing."""
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match='no CUDA device'):
            gpu_check.environment_description()
    properties = argparse.Namespace(total_memory=80e9, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_properties', lambda index: properties)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda index=0: 'FAKE H100')
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda index=0: (9, 0))
    monkeypatch.setenv('PATH', '/nonexistent')                          # no nvidia-smi: no driver version
    modules_before = set(sys.modules)
    description = gpu_check.environment_description()
    assert description['device'] == 'FAKE H100' and description['capability'] == '9.0'
    assert description['memory_gb'] == 80.0 and description['driver'] is None
    assert description['torch'] == torch.__version__ and description['numpy'] != 'not installed'
    assert 'gsplat' in description and not {'gsplat', 'open_clip'} & (set(sys.modules) - modules_before)
