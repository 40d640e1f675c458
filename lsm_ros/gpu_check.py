"""The GPU check of issue 11 (``scripts/gpu_check.sh --reference DIR --out DIR``): one command for a CUDA machine.

Steps, each a subprocess with its own timeout inside one overall budget (default 450 s, so that the whole check
ends within 8 minutes on an H100 including gsplat's first build), in this order:

1. ``environment``: device, torch / CUDA / cuDNN / driver versions (in this process; no CUDA: exit 3 at once);
2. ``gsplat_build``: one gsplat render, which compiles gsplat on first use (``TORCH_CUDA_ARCH_LIST`` defaults to
   the device's capability, ``MAX_JOBS`` to the cores less two, at most 14);
3. ``cuda_tests``: ``pytest -m cuda`` (the tests that need a GPU; modules that need ROS are skipped without rclpy);
4. ``parity``: ``pytest test/test_parity_cuda.py`` (the stage parity on CUDA against the reference, ≤ 1e-4);
5. ``bench_fp32`` / ``bench_bf16``: ``python -m lsm_ros.cli bench --device cuda`` at 256 and 512x384 on the
   reference pair;
6. ``accuracy``: fp32 vs bf16 through ``Reconstructor`` on the reference pair (depth within 1 %, label
   agreement), a query of 8 phrases and a 256x256 render with features, timed.

The bench and the accuracy step run the fast path (``cuda_graphs`` and ``cuda_streams`` where this version has
them); the bench's own pipeline figures (``Reconstructor.reconstruct`` / ``query`` / ``render``) are the bounds'
figures, the composed stage sums are reported beside them.

After every step ``gpu_check.json`` and ``gpu_check.md`` in ``--out`` are rewritten with everything so far, and
each step's output is appended to ``gpu_check.log`` there (three files in all). Every bound of :data:`BOUNDS` is
reported as pass, fail or unmeasured. Exit status: 0 every bound passed and every step ran, 1 otherwise, 2 bad
arguments, 3 no CUDA device.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

_log = logging.getLogger('lsm_ros.gpu_check')

SCHEMA = 'lsm_ros.gpu_check/1'
REPORT_JSON = 'gpu_check.json'
REPORT_MD = 'gpu_check.md'
REPORT_LOG = 'gpu_check.log'
REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_TESTS = Path('test') / 'test_parity_cuda.py'
BENCH_SIZES = ('256', '512x384')
BOUND_SIZE = '256'                       # the bounds are per 256x256 pair
PRECISIONS = ('fp32', 'bf16')
# 8 phrases whose arg-max labels vary over the reference pair (with the reference weights LSM's own eight labels give
# every pixel the same one, test/test_parity_cuda.py): the query timed and the labels compared
QUERY_PHRASES = ('door', 'lamp', 'shelf', 'curtain', 'plant', 'mirror', 'stove', 'clock')
RENDER_SIZE = (256, 256)
DEPTH_TOLERANCE = 0.01                   # bf16 depth within 1 % of fp32 ...
NO_CUDA_EXIT = 3
DEFAULT_BUDGET_S = 450.0                 # under 8 minutes with the start-up and the report
MIN_STEP_S = 15.0                        # a step with less time left is not started
GB = 1e9


# ---------------------------------------------------------------------------------------------- bounds
@dataclass(frozen=True)
class Bound:
    """A target of issue 11: ``figure`` (a key of the report's figures) compared with ``limit``."""

    figure: str
    description: str
    op: str            # '<=' or '>='
    limit: float
    unit: str

    def check(self, value: float | None) -> str:
        """'pass', 'fail' or 'unmeasured' (no value, not a number, or NaN); an infinite value is compared as any
        (parity's +inf after a failed parity test fails its bound)."""
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return 'unmeasured'
        return 'pass' if (value <= self.limit if self.op == '<=' else value >= self.limit) else 'fail'


BOUNDS: tuple[Bound, ...] = (
    Bound('fp32_pair_256_ms', '256x256 pair → Gaussians + cameras, fp32 (exact): bench median of '
          'Reconstructor.reconstruct (else of the composed stages)', '<=', 40.0, 'ms'),
    Bound('bf16_pair_256_ms', '256x256 pair → Gaussians + cameras, bf16: as fp32', '<=', 15.0, 'ms'),
    Bound('bf16_peak_memory_256_gb', 'peak GPU memory, bf16, 256x256 (torch.cuda.max_memory_allocated)', '<=', 4.0,
          'GB'),
    Bound('query_8_phrases_ms', 'query of 8 phrases (Reconstructor.query, text cached; bench fp32 256x256, '
          'median)', '<=', 5.0, 'ms'),
    Bound('render_256_features_ms', '256x256 render with rgb, depth and features to the host (Reconstructor.render; '
          'bench fp32, median)', '<=', 5.0, 'ms'),
    Bound('parity_max_relative', 'stage parity on CUDA vs the reference: every stage ≤ 1e-4 relative '
          '(test/test_parity_cuda.py passed = 0 failures)', '<=', 1e-4, ''),
    Bound('bf16_depth_within_1pct_fraction', 'bf16 depth within 1 % of fp32: fraction of pixels (worse view)', '>=',
          0.99, ''),
    Bound('bf16_label_agreement', 'bf16 labels (argmax over 8 phrases) equal to fp32: fraction of pixels', '>=',
          0.98, ''),
)


def evaluate_bounds(figures: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every bound with its value (None when unmeasured) and status."""
    rows = []
    for bound in BOUNDS:
        value = figures.get(bound.figure)
        rows.append(dict(asdict(bound), value=value, status=bound.check(value)))
    return rows


def verdict(bounds: Sequence[Mapping[str, Any]], steps: Sequence[Mapping[str, Any]], complete: bool) -> str:
    """'fail' when a bound failed or a step failed; 'pass' when every bound passed and every step succeeded;
    else 'incomplete' (still running, or something unmeasured)."""
    if any(b['status'] == 'fail' for b in bounds) or any(s['status'] in ('failed', 'timeout') for s in steps):
        return 'fail'
    if complete and all(b['status'] == 'pass' for b in bounds) and all(s['status'] == 'ok' for s in steps):
        return 'pass'
    return 'incomplete'


# ---------------------------------------------------------------------------------------------- figures
def _size_entry(bench: Mapping[str, Any] | None, label: str) -> Mapping[str, Any] | None:
    if not bench:
        return None
    return next((s for s in bench.get('sizes', ()) if str(s.get('label')) == label or str(s.get('size')) == label),
                None)


def _get(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, Mapping) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


def _bench_run(bench: Mapping[str, Any] | None, precision: str) -> Mapping[str, Any] | None:
    """The run of ``precision`` in a bench report (``runs`` when it measured several precisions, else the top
    level)."""
    if not bench:
        return None
    for run in bench.get('runs') or ():
        if run.get('precision') == precision:
            return run
    return bench


def bench_figures(precision: str, bench: Mapping[str, Any] | None) -> dict[str, Any]:
    """Figures of one ``lsm-ros bench --json`` report (stage mode), per size: the pair → Gaussians + cameras
    (``pair``: Reconstructor.reconstruct as the bench times it after the composed pass, else the sum of the composed
    stages; ``composed``: that sum), its p95, the query and render of the pipeline, the composed render stage, the
    per-stage medians, pairs/s and the peak GPU memory (GB)."""
    figures: dict[str, Any] = {}
    run = _bench_run(bench, precision)
    for label in BENCH_SIZES:
        entry = _size_entry(run, label)
        if entry is None:
            continue
        pipeline = entry.get('pipeline_ms') or {}
        composed = _get(entry, 'reconstruction_ms', 'median')
        figures[f'{precision}_pair_{label}_ms'] = _get(pipeline, 'reconstruct', 'median') or composed
        figures[f'{precision}_pair_{label}_p95_ms'] = _get(pipeline, 'reconstruct', 'p95') \
            or _get(entry, 'reconstruction_ms', 'p95')
        figures[f'{precision}_composed_{label}_ms'] = composed
        figures[f'{precision}_query_{label}_ms'] = _get(pipeline, 'query', 'median')
        figures[f'{precision}_render_view_{label}_ms'] = _get(pipeline, 'render_view', 'median')
        figures[f'{precision}_render_{label}_ms'] = _get(entry, 'stages_ms', 'render', 'median')
        figures[f'{precision}_pairs_per_s_{label}'] = entry.get('pairs_per_s')
        memory_mib = entry.get('peak_memory_mib')
        figures[f'{precision}_peak_memory_{label}_gb'] = None if memory_mib is None else memory_mib * (1 << 20) / GB
        stages = entry.get('stages_ms') or {}
        figures[f'{precision}_stages_{label}_ms'] = {stage: _get(values, 'median') for stage, values in stages.items()}
    return figures


def parity_figures(tests: Mapping[str, Any] | None) -> dict[str, Any]:
    """``parity_max_relative``: the largest relative error the parity tests recorded (``record_property`` names
    ending in ``_max_relative``) when every stage-parity test passed (the bf16 accuracy tests of the same file do
    not count here: their bounds are the accuracy step's); +inf when one failed; None when none ran. Every recorded
    property is kept in ``parity_properties``."""
    figures: dict[str, Any] = {'parity_max_relative': None, 'parity_properties': {}}
    if not tests or not tests.get('tests'):
        return figures
    properties = dict(tests.get('properties') or {})
    figures['parity_properties'] = properties
    failed = [entry for entry in tests.get('failed', []) if 'bf16' not in entry.split(' (')[0]]
    if failed:
        return dict(figures, parity_max_relative=float('inf'), parity_failed=failed)
    if tests.get('passed', 0) == 0:
        return figures
    values = [float(v) for name, v in properties.items() if name.endswith('_max_relative') and _is_number(v)]
    # passed tests that recorded no error: their own bound (1e-4) held; report that bound as the figure
    return dict(figures, parity_max_relative=max(values) if values else 1e-4, parity_recorded=bool(values))


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def collect_figures(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The flat figures of the report from the steps' results ({step name: result})."""
    figures: dict[str, Any] = {}
    for precision in PRECISIONS:
        figures.update(bench_figures(precision, _get(results, f'bench_{precision}', 'bench')))
    figures.update(parity_figures(_get(results, 'parity', 'tests')))
    accuracy = _get(results, 'accuracy', 'accuracy') or {}
    for key in ('bf16_depth_within_1pct_fraction', 'bf16_label_agreement', 'query_8_phrases_first_ms',
                'bf16_depth_median_relative', 'fp32_distinct_labels'):
        figures[key] = accuracy.get(key)
    figures['accuracy_query_8_phrases_ms'] = accuracy.get('query_8_phrases_ms')
    figures['accuracy_render_256_ms'] = accuracy.get('reconstructor_render_256_ms')
    # the bounds: the bench's pipeline figures (fp32, 256x256), else the accuracy step's own timings
    figures['query_8_phrases_ms'] = _first_number(figures.get(f'fp32_query_{BOUND_SIZE}_ms'),
                                                  figures['accuracy_query_8_phrases_ms'])
    figures['render_256_features_ms'] = _first_number(figures.get(f'fp32_render_view_{BOUND_SIZE}_ms'),
                                                      figures['accuracy_render_256_ms'],
                                                      figures.get(f'fp32_render_{BOUND_SIZE}_ms'))
    return figures


def _as_number(value: Any) -> Any:
    return float(value) if _is_number(value) else value


def _first_number(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


# ---------------------------------------------------------------------------------------------- pytest results
def read_junit(path: Path) -> dict[str, Any] | None:
    """Counts, failed test ids (with the first line of their message) and recorded properties of a JUnit XML."""
    if not path.is_file():
        return None
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError:
        return None
    suites = [root] if root.tag == 'testsuite' else list(root.iter('testsuite'))
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    failed, skipped, properties = [], [], {}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter('testcase'):
            name = f'{case.get("classname", "")}::{case.get("name", "")}'
            for kind in ('failure', 'error'):
                element = case.find(kind)
                if element is not None:
                    message = (element.get('message') or element.text or '').strip().splitlines()
                    failed.append(f'{name} ({kind}): {message[0][:300] if message else ""}')
            element = case.find('skipped')
            if element is not None:
                skipped.append(f'{name}: {(element.get("message") or "").strip()[:200]}')
            for prop in case.iter('property'):
                properties[f'{case.get("name", "")}.{prop.get("name")}'] = prop.get('value')
    counts['passed'] = counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']
    return dict(counts, failed=failed, skipped_tests=skipped, properties=properties)


# ---------------------------------------------------------------------------------------------- steps
@dataclass
class Step:
    """One subprocess step: ``command`` (argv) with at most ``timeout_s`` seconds; ``collect`` reads its result
    files afterwards."""

    name: str
    title: str
    command: list[str]
    timeout_s: float
    collect: Callable[[], dict[str, Any]] = field(default=lambda: {})
    ok_returncodes: tuple[int, ...] = (0,)
    required_file: Path | None = None     # the step is 'missing' when this file does not exist


def run_step(step: Step, log_path: Path, env: Mapping[str, str], timeout_s: float) -> dict[str, Any]:
    """Run ``step`` in its own process group, its output appended to ``log_path``; kill the group at
    ``timeout_s``. Returns {name, title, command, status (ok/failed/timeout/missing), returncode, seconds, ...}."""
    result: dict[str, Any] = dict(name=step.name, title=step.title, command=shlex.join(step.command),
                                  timeout_s=round(timeout_s, 1))
    if step.required_file is not None and not (REPO_ROOT / step.required_file).is_file() \
            and not step.required_file.is_file():
        return dict(result, status='missing', returncode=None, seconds=0.0,
                    note=f'{step.required_file} does not exist')
    start = time.monotonic()
    with open(log_path, 'a', encoding='utf-8') as log:
        log.write(f'\n===== {step.name}: {result["command"]} (timeout {timeout_s:.0f} s) =====\n')
        log.flush()
        process = subprocess.Popen(step.command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                   env=dict(env), start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
            status = 'ok' if returncode in step.ok_returncodes else 'failed'
        except subprocess.TimeoutExpired:
            with _suppress_process_lookup():
                os.killpg(process.pid, signal.SIGKILL)
            returncode = process.wait()
            status = 'timeout'
        seconds = time.monotonic() - start
        log.write(f'===== {step.name}: {status} (exit {returncode}) after {seconds:.1f} s =====\n')
    result.update(status=status, returncode=returncode, seconds=round(seconds, 1))
    try:
        result.update(step.collect())
    except (OSError, ValueError, KeyError) as exc:
        result['collect_error'] = f'{type(exc).__name__}: {exc}'
    return result


class _suppress_process_lookup:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> bool:
        return kind is ProcessLookupError


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding='utf-8')) if path.is_file() else None


FAST_PATH_OPTIONS = ('cuda_graphs', 'cuda_streams')   # PipelineConfig switches of the fast path (CUDA only)


def fast_path_flags() -> list[str]:
    """The bench's flags for FAST_PATH_OPTIONS that this version of ``lsm-ros bench`` accepts (parsed by its own
    parser; nothing runs)."""
    import contextlib
    import io

    from lsm_ros.cli import build_parser
    flags = []
    for option in FAST_PATH_OPTIONS:
        flag = '--' + option.replace('_', '-')
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                parsed = build_parser().parse_args(['bench', flag])
        except SystemExit:
            continue
        if getattr(parsed, option, False) is True:
            flags.append(flag)
    return flags


def fast_path_overrides() -> dict[str, bool]:
    """PipelineConfig overrides that switch the fast path on (those of FAST_PATH_OPTIONS that exist)."""
    from lsm_ros.config import PipelineConfig
    names = {f.name for f in dataclasses.fields(PipelineConfig)}
    return {option: True for option in FAST_PATH_OPTIONS if option in names}


def build_steps(work: Path, python: str, pairs: int, warmup: int) -> list[Step]:
    """The subprocess steps, in order, each with its own time limit; their result files go to ``work``. The bench
    and the accuracy step run the fast path (CUDA graphs and streams, where this version has them)."""
    module = [python, '-m']
    fast = fast_path_flags()
    pytest_args = ['-q', '-p', 'no:randomly', '-rs', '-o', 'addopts=-p no:cacheprovider']
    cuda_xml, parity_xml = work / 'cuda_tests.xml', work / 'parity.xml'
    ignore_parity = ['--ignore', str(PARITY_TESTS)] if (REPO_ROOT / PARITY_TESTS).is_file() else []
    steps = [
        Step('gsplat_build', 'gsplat: first use (compiles its CUDA kernels)',
             module + ['lsm_ros.gpu_check', '--gsplat-warmup'], 240.0),
        Step('cuda_tests', 'pytest -m cuda (the tests that need a GPU; ROS modules skipped without rclpy)',
             module + ['pytest', '-m', 'cuda', *pytest_args, f'--junitxml={cuda_xml}', *ignore_parity], 120.0,
             collect=partial(_junit_result, cuda_xml), ok_returncodes=(0, 5)),
        Step('parity', 'stage parity on CUDA (test/test_parity_cuda.py, ≤ 1e-4 relative)',
             module + ['pytest', str(PARITY_TESTS), *pytest_args, f'--junitxml={parity_xml}'], 150.0,
             collect=partial(_junit_result, parity_xml), required_file=PARITY_TESTS),
    ]
    for precision in PRECISIONS:
        bench_json = work / f'bench_{precision}.json'
        steps.append(Step(f'bench_{precision}', f'lsm-ros bench --device cuda --precision {precision}',
                          module + ['lsm_ros.cli', 'bench', '--device', 'cuda', '--precision', precision,
                                    '--resolutions', *BENCH_SIZES, '--images', 'reference', '--pairs', str(pairs),
                                    '--warmup', str(warmup), *fast, '--json', str(bench_json)], 100.0,
                          collect=partial(_bench_result, bench_json)))
    accuracy_json = work / 'accuracy.json'
    steps.append(Step('accuracy', 'fp32 vs bf16 on the reference pair; query of 8 phrases; 256x256 render',
                      module + ['lsm_ros.gpu_check', '--accuracy-step', str(accuracy_json)], 120.0,
                      collect=partial(_accuracy_result, accuracy_json)))
    return steps


def _junit_result(path: Path) -> dict[str, Any]:
    return {'tests': read_junit(path)}


def _accuracy_result(path: Path) -> dict[str, Any]:
    return {'accuracy': _read_json(path)}


def _bench_result(path: Path) -> dict[str, Any]:
    return {'bench': _read_json(path)}


# ---------------------------------------------------------------------------------------------- in-process parts
def environment_description() -> dict[str, Any]:
    """Device and software versions (this process); raises RuntimeError without a CUDA device."""
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError('no CUDA device: torch.cuda.is_available() is False '
                           f'(torch {torch.__version__}, built for CUDA {torch.version.cuda})')
    properties = torch.cuda.get_device_properties(0)
    description: dict[str, Any] = dict(
        device=torch.cuda.get_device_name(0), capability='.'.join(map(str, torch.cuda.get_device_capability(0))),
        memory_gb=round(properties.total_memory / GB, 1), multiprocessors=properties.multi_processor_count,
        torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
        python=platform.python_version(), cpu_cores=os.cpu_count(), host=platform.node())
    try:
        description['driver'] = subprocess.run(
            ['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'], capture_output=True, text=True,
            timeout=20, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        description['driver'] = None
    from importlib import metadata
    for name, distributions in (('gsplat', ('gsplat',)), ('open_clip', ('open_clip_torch',)), ('timm', ('timm',)),
                                ('numpy', ('numpy',)), ('scipy', ('scipy',)),
                                ('cv2', ('opencv-python-headless', 'opencv-python', 'opencv-contrib-python'))):
        # installed versions, read without importing (importing gsplat may start its build outside a step)
        versions = []
        for distribution in distributions:
            try:
                versions.append(metadata.version(distribution))
            except metadata.PackageNotFoundError:
                continue
        description[name] = versions[0] if versions else 'not installed'
    return description


def gsplat_warmup(device: str = 'cuda', backend: str = 'gsplat') -> int:
    """One small render of 512 random Gaussians (compiles gsplat on first use); raises when nothing was drawn."""
    import torch

    from lsm_ros.rendering import render_gaussians
    generator = torch.Generator().manual_seed(0)
    count = 512
    means = (torch.rand(count, 3, generator=generator) - 0.5) * 2 + torch.tensor([0.0, 0.0, 4.0])
    rotations = torch.nn.functional.normalize(torch.randn(count, 4, generator=generator), dim=1)
    scales = torch.rand(count, 3, generator=generator) * 0.05 + 0.02
    opacities = torch.rand(count, 1, generator=generator)
    sh = torch.randn(count, 16, 3, generator=generator) * 0.1
    features = torch.randn(count, 64, generator=generator)
    K = torch.tensor([[128.0, 0, 64], [0, 128.0, 64], [0, 0, 1]])
    tensors = [t.to(device) for t in (means, rotations, scales, opacities, sh, features, torch.eye(4), K)]
    start = time.perf_counter()
    out = render_gaussians(*tensors, 128, 128, backend=backend)   # type: ignore[arg-type]
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    drawn = float((out.alpha > 0.01).float().mean())
    _log.info('%s rendered 512 Gaussians at 128x128 in %.1f s (the first use includes its build): %.0f %% of the '
              'pixels drawn', backend, time.perf_counter() - start, 100 * drawn)
    if not drawn > 0:
        raise RuntimeError(f'{backend} rendered nothing')
    return 0


def accuracy_figures(exact_reconstructor: Any, make_reduced: Callable[[], Any], left: Any, right: Any, *,
                     repeats: int = 20, render_size: tuple[int, int] = RENDER_SIZE) -> dict[str, Any]:
    """fp32 vs reduced precision on one pair, and the service timings of the fp32 reconstructor.

    ``exact_reconstructor``: a Reconstructor with precision fp32; ``make_reduced()`` builds the bf16 one (after
    the fp32 one's timings, so both need not be timed side by side). Depth: the ray range of the point maps (as
    test/test_precision.py; z means little with untrained weights), per view the fraction of pixels within
    DEPTH_TOLERANCE of fp32 (the figure is the worse view). Labels: argmax over QUERY_PHRASES of the views' label
    logits. Query of the 8 phrases: the first call (text encoded) and the median of ``repeats`` more (text cached);
    a ``render_size`` render with rgb, depth, alpha and features: median of ``repeats`` after one. The results are
    numpy arrays, so every timed call includes its device synchronisation.
    """
    import numpy as np

    def timed(function: Callable[[], Any]) -> tuple[float, float]:
        start = time.perf_counter()
        function()
        first = (time.perf_counter() - start) * 1e3
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            samples.append((time.perf_counter() - start) * 1e3)
        return first, float(np.median(samples))

    exact = exact_reconstructor.reconstruct(left, right)
    query_first, query_median = timed(lambda: exact_reconstructor.query(exact, QUERY_PHRASES))
    _, render_median = timed(lambda: exact_reconstructor.render(exact, None, None, render_size,
                                                                ('rgb', 'depth', 'alpha', 'features')))
    labels_exact = exact_reconstructor.query(exact, QUERY_PHRASES).logits.argmax(axis=1)
    reduced_reconstructor = make_reduced()
    reduced = reduced_reconstructor.reconstruct(left, right)
    labels_reduced = reduced_reconstructor.query(reduced, QUERY_PHRASES).logits.argmax(axis=1)
    fractions, medians = [], []
    for view in (1, 2):
        ours = np.linalg.norm(reduced.network_outputs[f'pts3d_{view}'].astype(np.float64), axis=-1)
        ref = np.linalg.norm(exact.network_outputs[f'pts3d_{view}'].astype(np.float64), axis=-1)
        valid = np.isfinite(ref) & (ref > 0)
        relative = np.abs(ours[valid] - ref[valid]) / ref[valid]
        relative = np.where(np.isfinite(relative), relative, np.inf)
        fractions.append(float(np.mean(relative <= DEPTH_TOLERANCE)) if relative.size else 0.0)
        medians.append(float(np.median(relative)) if relative.size else float('inf'))
    return dict(query_8_phrases_first_ms=query_first, query_8_phrases_ms=query_median,
                reconstructor_render_256_ms=render_median,
                bf16_depth_within_1pct_fraction=min(fractions), bf16_depth_within_1pct_per_view=fractions,
                bf16_depth_median_relative=max(medians),
                bf16_label_agreement=float(np.mean(labels_reduced == labels_exact)),
                fp32_distinct_labels=int(len(np.unique(labels_exact))),
                reduced_network_precisions=dict(reduced_reconstructor.precisions),
                model_size=list(exact.size))


def accuracy_step(output: Path) -> int:
    """:func:`accuracy_figures` on CUDA with the reference weights and the reference pair at 256x256 (the bf16
    reconstructor gets a copy of the same network, made before the fp32 one first ran); JSON to ``output``."""
    from lsm_ros.benchmark import reference_pairs
    from lsm_ros.pipeline import Reconstructor
    from lsm_ros.reference_weights import find_reference_dir

    reference_dir = find_reference_dir()
    if reference_dir is None:
        raise FileNotFoundError('no reference folder ($LSM_ROS_REFERENCE)')
    pair = reference_pairs()[0]
    exact = Reconstructor.from_reference(reference_dir, device='cuda', precision='fp32', resolution=256,
                                         **fast_path_overrides())
    network = copy.deepcopy(exact.network).cpu()
    config = dataclasses.replace(exact.config, precision='bf16')

    def make_reduced() -> Any:
        exact.offload()                # one network on the GPU at a time
        return Reconstructor(network, config, device='cuda', weights=exact.weights, trained_weights=False)

    figures = accuracy_figures(exact, make_reduced, pair.left, pair.right)
    figures['pair'] = pair.name
    output.write_text(json.dumps(figures, indent=2), encoding='utf-8')
    _log.info('accuracy: %s', figures)
    return 0


# ---------------------------------------------------------------------------------------------- the report
def build_report(environment: Mapping[str, Any], steps: Sequence[Mapping[str, Any]], *, started: str,
                 complete: bool, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON report: environment, steps (with their raw results), the flat figures, every bound's status and
    the verdict."""
    results = {step['name']: step for step in steps}
    figures = collect_figures(results)
    bounds = evaluate_bounds(figures)
    return dict(schema=SCHEMA, started_utc=started, updated_utc=_utc_now(), complete=complete,
                settings=dict(settings), environment=dict(environment), steps=list(steps), figures=figures,
                bounds=bounds, verdict=verdict(bounds, steps, complete))


def _format_value(value: Any, unit: str = '') -> str:
    if value is None:
        return 'UNMEASURED'
    if isinstance(value, float):
        if value != value or value in (float('inf'), float('-inf')):
            return str(value)
        text = f'{value:.3g}' if abs(value) < 1e-2 and value != 0 else f'{value:.4g}' if abs(value) < 10 \
            else f'{value:.1f}'
    else:
        text = str(value)
    return f'{text} {unit}'.strip()


def format_markdown(report: Mapping[str, Any]) -> str:
    """gpu_check.md: the verdict, the environment, the bounds, the bench per stage, the steps and the tests."""
    env = report['environment']
    lines = [f'# GPU check ({report["verdict"].upper()}{"" if report["complete"] else ", in progress"})', '',
             f'Started {report["started_utc"]}, updated {report["updated_utc"]}. '
             f'Device: {env.get("device", "?")} (capability {env.get("capability", "?")}, '
             f'{env.get("memory_gb", "?")} GB), driver {env.get("driver", "?")}; torch {env.get("torch", "?")}, '
             f'CUDA {env.get("cuda", "?")}, cuDNN {env.get("cudnn", "?")}, Python {env.get("python", "?")}, '
             f'gsplat {env.get("gsplat", "?")}.', '',
             '## Bounds (issue 11)', '', '| bound | value | limit | status |', '|---|---:|---:|---|']
    for bound in report['bounds']:
        lines.append(f'| {bound["description"]} | {_format_value(bound["value"], bound["unit"])} | '
                     f'{bound["op"]} {_format_value(bound["limit"], bound["unit"])} | {bound["status"].upper()} |')
    figures = report['figures']
    lines += ['', '## Bench (median ms per pair; `lsm-ros bench --device cuda`, reference pair)', '']
    columns = [(p, s) for p in PRECISIONS for s in BENCH_SIZES]
    lines.append('| stage | ' + ' | '.join(f'{p} {s}' for p, s in columns) + ' |')
    lines.append('|---|' + '---:|' * len(columns))
    stage_names: list[str] = []
    for precision, size in columns:
        for stage in figures.get(f'{precision}_stages_{size}_ms') or {}:
            if stage not in stage_names:
                stage_names.append(stage)
    for stage in stage_names:
        lines.append(f'| {stage} | ' + ' | '.join(
            _format_value((figures.get(f'{p}_stages_{s}_ms') or {}).get(stage)) for p, s in columns) + ' |')
    for title, key in (('composed stages: pair → Gaussians + cameras', 'composed_{size}_ms'),
                       ('**Reconstructor.reconstruct: pair → Gaussians + cameras**', 'pair_{size}_ms'),
                       ('p95', 'pair_{size}_p95_ms'), ('Reconstructor.query (8 phrases)', 'query_{size}_ms'),
                       ('Reconstructor.render (256x256, features)', 'render_view_{size}_ms'),
                       ('pairs/s (composed)', 'pairs_per_s_{size}'), ('peak GPU memory, GB', 'peak_memory_{size}_gb')):
        lines.append(f'| {title} | ' + ' | '.join(
            _format_value(figures.get(f'{p}_' + key.format(size=s))) for p, s in columns) + ' |')
    lines += ['', '## Other figures', '', '| figure | value |', '|---|---:|']
    for key in ('query_8_phrases_first_ms', 'accuracy_query_8_phrases_ms', 'accuracy_render_256_ms',
                'bf16_depth_median_relative', 'bf16_depth_within_1pct_fraction', 'bf16_label_agreement',
                'fp32_distinct_labels'):
        lines.append(f'| {key} | {_format_value(figures.get(key))} |')
    recorded = figures.get('parity_properties') or {}
    if recorded:
        lines += ['', '## Recorded by the parity tests (record_property)', '', '| property | value |', '|---|---:|']
        lines += [f'| {name} | {_format_value(_as_number(value))} |' for name, value in sorted(recorded.items())]
    lines += ['', '## Steps', '', '| step | status | seconds | command |', '|---|---|---:|---|']
    for step in report['steps']:
        status = step['status'] if step.get('returncode') in (None, 0) \
            else f'{step["status"]} (exit {step["returncode"]})'
        lines.append(f'| {step["name"]} | {status} | {step.get("seconds", 0):.0f} | `{step["command"]}` |')
    for step in report['steps']:
        tests = step.get('tests')
        if tests:
            lines += ['', f'### {step["name"]}: {tests["passed"]} passed, {tests["failures"]} failed, '
                          f'{tests["errors"]} errors, {tests["skipped"]} skipped']
            lines += [f'- FAILED {entry}' for entry in tests['failed']]
            lines += [f'- skipped {entry}' for entry in tests['skipped_tests'][:40]]
        if step.get('note'):
            lines += ['', f'{step["name"]}: {step["note"]}']
    lines += ['', f'Full output: {REPORT_LOG}; every figure: {REPORT_JSON}.', '']
    return '\n'.join(lines)


def write_report(out: Path, report: Mapping[str, Any]) -> None:
    """Rewrite gpu_check.json and gpu_check.md in ``out`` (each through a temporary file, so that a reader never
    sees half a file)."""
    for name, text in ((REPORT_JSON, json.dumps(report, indent=2, default=str)), (REPORT_MD,
                                                                                   format_markdown(report))):
        temporary = out / f'.{name}.tmp'
        temporary.write_text(text, encoding='utf-8')
        temporary.replace(out / name)


def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


# ---------------------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='scripts/gpu_check.sh', description=__doc__.split('\n\n')[0],
        epilog='Writes gpu_check.md, gpu_check.json and gpu_check.log into --out, rewritten after every step. Exit '
               'status: 0 all bounds passed, 1 a bound failed or a step failed/timed out/was not run, 2 bad '
               'arguments, 3 no CUDA device.')
    parser.add_argument('--reference', type=Path, help='the parity reference folder (lsm_vitl_256: manifest.tsv, '
                        'config.json, *.npz); required')
    parser.add_argument('--out', type=Path, help='folder for the report (created); required')
    parser.add_argument('--budget', type=float, default=DEFAULT_BUDGET_S,
                        help=f'seconds for all steps together (default {DEFAULT_BUDGET_S:.0f})')
    parser.add_argument('--pairs', type=int, default=10, help='bench: timed pairs per size (default 10)')
    parser.add_argument('--warmup', type=int, default=3, help='bench: warm-up pairs per size (default 3)')
    parser.add_argument('--python', default=sys.executable, help='the interpreter of the steps (default: this one)')
    parser.add_argument('--gsplat-warmup', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--accuracy-step', type=Path, help=argparse.SUPPRESS)
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error (exit 2) for a missing or unusable --reference / --out and out-of-range numbers."""
    if args.reference is None or args.out is None:
        parser.error('--reference DIR and --out DIR are required')
    reference = args.reference
    missing = [name for name in ('manifest.tsv', 'config.json', 'inputs.npz') if not (reference / name).is_file()]
    if not reference.is_dir() or missing:
        parser.error(f'--reference {reference}: not a parity reference folder (missing '
                     f'{", ".join(missing) or "the folder"})')
    if args.out.exists() and not args.out.is_dir():
        parser.error(f'--out {args.out}: exists and is not a folder')
    if not args.budget > 0 or args.pairs < 1 or args.warmup < 0:
        parser.error('--budget must be > 0, --pairs >= 1, --warmup >= 0')


def step_environment(reference: Path) -> dict[str, str]:
    """The steps' environment: the reference ($LSM_ROS_REFERENCE; $LSM_ROS_SHARED when the folder sits in a
    shared layout <shared>/reference/lsm_vitl_256), the repository on PYTHONPATH, unbuffered output, and
    gsplat's build settings (TORCH_CUDA_ARCH_LIST = the device's capability, MAX_JOBS = cores - 2, at most 14)
    unless already set."""
    env = dict(os.environ)
    env['LSM_ROS_REFERENCE'] = str(reference)
    if reference.parent.name == 'reference' and 'LSM_ROS_SHARED' not in env:
        env['LSM_ROS_SHARED'] = str(reference.parent.parent)
    env['PYTHONPATH'] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep)
                                                            if p])
    env['PYTHONUNBUFFERED'] = '1'
    if 'TORCH_CUDA_ARCH_LIST' not in env:
        import torch
        env['TORCH_CUDA_ARCH_LIST'] = '.'.join(map(str, torch.cuda.get_device_capability(0)))
    env.setdefault('MAX_JOBS', str(max(1, min(14, (os.cpu_count() or 4) - 2))))
    return env


def run_check(args: argparse.Namespace, *, describe: Callable[[], dict[str, Any]] = environment_description,
              make_env: Callable[[Path], dict[str, str]] = step_environment,
              make_steps: Callable[[Path, str, int, int], list[Step]] = build_steps) -> int:
    """Every step within the budget; the report rewritten after each. Returns the exit status (0: verdict pass).
    ``describe``, ``make_env``, ``make_steps``: the environment, the steps' environment and the steps (tests)."""
    started, deadline = _utc_now(), time.monotonic() + args.budget
    reference = args.reference.resolve()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_LOG).write_text(f'gpu_check started {started}\n', encoding='utf-8')
    settings = dict(reference=str(reference), budget_s=args.budget, pairs=args.pairs, warmup=args.warmup,
                    bench_sizes=list(BENCH_SIZES), python=args.python)
    environment = describe()
    env = make_env(reference)
    settings.update(TORCH_CUDA_ARCH_LIST=env.get('TORCH_CUDA_ARCH_LIST'), MAX_JOBS=env.get('MAX_JOBS'))
    steps: list[dict[str, Any]] = []
    write_report(out, build_report(environment, steps, started=started, complete=False, settings=settings))
    _log.info('%s, torch %s, CUDA %s: report in %s', environment.get('device'), environment.get('torch'),
              environment.get('cuda'), out)
    with tempfile.TemporaryDirectory(prefix='lsm_gpu_check_') as work:
        for step in make_steps(Path(work), args.python, args.pairs, args.warmup):
            left_s = deadline - time.monotonic()
            if left_s < MIN_STEP_S:
                result = dict(name=step.name, title=step.title, command=shlex.join(step.command), status='not run',
                              returncode=None, seconds=0.0, note=f'out of time ({left_s:.0f} s of the budget left)')
            else:
                _log.info('step %s (at most %.0f s) ...', step.name, min(step.timeout_s, left_s))
                result = run_step(step, out / REPORT_LOG, env, min(step.timeout_s, left_s))
            _log.info('step %s: %s after %.0f s', step.name, result['status'], result.get('seconds', 0.0))
            steps.append(result)
            write_report(out, build_report(environment, steps, started=started, complete=False,
                                           settings=settings))
    report = build_report(environment, steps, started=started, complete=True, settings=settings)
    write_report(out, report)
    print(format_markdown(report))
    return 0 if report['verdict'] == 'pass' else 1


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format='[gpu_check] %(message)s')
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.gsplat_warmup:
        return gsplat_warmup()
    if args.accuracy_step is not None:
        return accuracy_step(args.accuracy_step)
    check_arguments(parser, args)
    try:
        import torch
    except ImportError as exc:
        _log.error('torch is not importable (%s): the GPU check needs torch with CUDA', exc)
        return NO_CUDA_EXIT
    if not torch.cuda.is_available():
        _log.error('no CUDA device: torch.cuda.is_available() is False (torch %s, built for CUDA %s). The GPU check '
                   'runs only on a machine with an NVIDIA GPU; nothing was run.', torch.__version__,
                   torch.version.cuda)
        return NO_CUDA_EXIT
    return run_check(args)


if __name__ == '__main__':
    sys.exit(main())
