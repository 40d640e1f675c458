"""GPU guards that run in CI, where there is no GPU (issue 11, item 7).

One full :meth:`Reconstructor.reconstruct` of the tiny random LSM (after a warm-up pair) runs under a torch dispatch
mode and a profiler hook that

- FAIL on any integer matrix product (CUDA has no integer ``mm``/``addmm``/``addmv``/...: the full LSM crashed in
  PTv3's sparse convolution on an H100);
- FAIL on any call into scipy or OpenCV on the path of a pair (the hot path is torch on every device; scipy and
  OpenCV stay only as the tests' oracles);
- REPORT the host synchronisations per pair, per stage (DUSt3R, LSeg, PTv3 + Gaussian head, cameras, rest of the
  pipeline), and fail when a stage exceeds its budget below.

On the CPU nothing actually waits for a device, so "host synchronisation" means: an aten operator that makes the
host wait for the device on CUDA (``_local_scalar_dense`` = item/bool/int/float, ``nonzero``, the ``unique``
family, ``masked_select``, ``repeat_interleave`` without ``output_size``, boolean-mask ``index``/``index_put_``,
``bincount``, ``equal``, ``is_nonzero``) plus the Python calls that read a tensor on the host (``Tensor.numpy``,
``Tensor.tolist``: on the CPU a copy to the host dispatches nothing). On CUDA (the same test, marked ``cuda``) a
blocking copy to the host and an explicit ``torch.cuda`` synchronize count instead of those calls.

Stage attribution: the stage methods (``LargeSpatialModel.geometry/semantics/gaussians``, ``Dust3rNet`` encode /
decode / predict / forward, ``LSegFeatureExtractor.forward``, ``PointTransformerV3LSM.forward``,
``GaussianHead.forward``, :func:`merge_points`, :func:`knn_mean_squared_distance`) and every function of
:mod:`lsm_ros.cameras` and method of its classes are wrapped, within the test, with a stage label; the outermost
labelled call wins; everything else is 'pipeline' (pre-processing, copies, the Reconstruction). The report names the lsm_ros line of every synchronisation.

Run ``python test/test_gpu_guards.py`` for the per-stage report alone (no pass/fail).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import logging
import sys
import threading
import types
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

_log = logging.getLogger(__name__)

STAGES = ('dust3r', 'lseg', 'ptv3_gaussians', 'cameras', 'pipeline')
STAGE_TITLES = {'dust3r': 'DUSt3R', 'lseg': 'LSeg', 'ptv3_gaussians': 'PTv3 + Gaussian head',
                'cameras': 'cameras (focal, relative pose)', 'pipeline': 'rest of reconstruct (pre-processing, '
                'copies, Reconstruction)'}
# Host synchronisations allowed per pair and stage (issue 11: none in DUSt3R and LSeg, a handful in PTv3; the
# camera recovery stays on the device until the Reconstruction needs its results: a copy of the intrinsics and one
# of the pose, and the decision between two paths; the rest of reconstruct reads each product once: at most one host
# read per array of the Reconstruction that the pipeline computed (every array field but the two input images, the
# raw network outputs, the Gaussians' arrays), see :func:`product_arrays`).
PER_PRODUCT_ARRAY = -1
SYNC_BUDGET = {'dust3r': 0, 'lseg': 0, 'ptv3_gaussians': 5, 'cameras': 3, 'pipeline': PER_PRODUCT_ARRAY}
# The network stages must be seen by the dispatch mode (a stage that ran in another thread, or not at all, would
# otherwise pass every check without being checked).
TRACED_STAGES = ('dust3r', 'lseg', 'ptv3_gaussians')

MATMUL_OPS = frozenset({'mm', 'addmm', 'addmv', 'mv', 'bmm', 'baddbmm', 'addbmm', 'matmul', 'dot', 'vdot',
                        'addr', 'ger', 'outer', 'linear', 'einsum', 'tensordot', 'chain_matmul', 'linalg_multi_dot',
                        '_addmm_activation'})
# aten operators (overload packet names) that make the host wait for the device on CUDA
SYNC_OPS = frozenset({'_local_scalar_dense', 'item', 'is_nonzero', 'nonzero', 'argwhere', '_unique', '_unique2',
                      'unique_dim', 'unique_consecutive', 'unique_dim_consecutive', 'masked_select', 'bincount',
                      'equal', 'allclose'})
HOST_READ_METHODS = frozenset({'numpy', 'tolist'})
FORBIDDEN_LIBRARIES = ('scipy', 'cv2')
TINY_RESOLUTION = 224


# ---------------------------------------------------------------------------------------------- stage labels
class StageLabels:
    """The current stage: the label of the outermost wrapped call in progress (``'pipeline'`` outside any)."""

    def __init__(self, default: str = 'pipeline') -> None:
        self.default = default
        self._stack: list[str] = []
        self._lock = threading.Lock()

    @property
    def current(self) -> str:
        with self._lock:
            return self._stack[0] if self._stack else self.default

    @contextlib.contextmanager
    def entered(self, label: str) -> Iterator[None]:
        with self._lock:
            self._stack.append(label)
        try:
            yield
        finally:
            with self._lock:
                self._stack.pop()

    def wrap(self, function: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(function)
        def labelled(*args: Any, **kwargs: Any) -> Any:
            with self.entered(label):
                return function(*args, **kwargs)
        labelled.__wrapped_stage__ = label  # type: ignore[attr-defined]
        return labelled


def _stage_methods() -> list[tuple[Any, str, str]]:
    """(owner class or module, attribute, stage) of every stage entry point."""
    from lsm_ros.model import lsm as lsm_module
    from lsm_ros.model.dust3r import Dust3rNet
    from lsm_ros.model.gaussian_head import GaussianHead
    from lsm_ros.model.lseg import LSegFeatureExtractor
    from lsm_ros.model.lsm import LargeSpatialModel
    from lsm_ros.model.ptv3 import PointTransformerV3LSM
    from lsm_ros.model import gaussian_head as head_module
    entries: list[tuple[Any, str, str]] = [
        (LargeSpatialModel, 'geometry', 'dust3r'), (LargeSpatialModel, 'semantics', 'lseg'),
        (LargeSpatialModel, 'gaussians', 'ptv3_gaussians'),
        (LSegFeatureExtractor, 'forward', 'lseg'),
        (PointTransformerV3LSM, 'forward', 'ptv3_gaussians'), (GaussianHead, 'forward', 'ptv3_gaussians'),
        (lsm_module, 'merge_points', 'ptv3_gaussians'),
        (lsm_module, 'knn_mean_squared_distance', 'ptv3_gaussians'),
        (head_module, 'knn_mean_squared_distance', 'ptv3_gaussians')]
    entries += [(Dust3rNet, name, 'dust3r') for name in ('forward', 'encode', 'decode', 'predict')
                if callable(getattr(Dust3rNet, name, None))]
    return entries


def _camera_functions() -> list[tuple[Any, str, str]]:
    """(module, name, 'cameras') for every function defined in lsm_ros.cameras (whatever its name), wherever
    lsm_ros modules bound them."""
    from lsm_ros import cameras
    targets = {id(value): value for name, value in vars(cameras).items()
               if inspect.isfunction(value) and value.__module__ == cameras.__name__}
    entries = []
    for value in list(vars(cameras).values()):       # methods of its classes (e.g. a device result's to_numpy)
        if isinstance(value, type) and value.__module__ == cameras.__name__:
            entries += [(value, name, 'cameras') for name, member in vars(value).items()
                        if inspect.isfunction(member) and not (name.startswith('__') and name.endswith('__'))]
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == 'lsm_ros' or module_name.startswith('lsm_ros.')):
            continue
        for name, value in list(vars(module).items()):
            if id(value) in targets and value is targets[id(value)]:
                entries.append((module, name, 'cameras'))
    return entries


# ---------------------------------------------------------------------------------------------- scipy / OpenCV
def _library_of(name: str | None) -> str | None:
    if not name:
        return None
    root = name.split('.', 1)[0]
    return root if root in FORBIDDEN_LIBRARIES else None


def _compiled_library_entries() -> list[tuple[Any, str, Any, str]]:
    """(namespace, attribute, compiled callable, library) for scipy's compiled classes and Cython functions
    (invisible to sys.setprofile: Cython makes no frames and is no builtin) as bound in loaded scipy and lsm_ros
    modules."""
    targets: dict[int, tuple[Any, str]] = {}
    for module_name, module in list(sys.modules.items()):
        library = _library_of(module_name)
        if module is None or library != 'scipy':
            continue
        for value in list(vars(module).values()):
            owner = getattr(value, '__module__', None)
            if _library_of(owner) != 'scipy':
                continue
            compiled_class = type(value) is type and not hasattr(sys.modules.get(owner), '__path__') \
                and str(getattr(sys.modules.get(owner), '__file__', '')).endswith(('.so', '.pyd')) \
                and bool(value.__flags__ & (1 << 10)) \
                and not issubclass(value, BaseException)          # Py_TPFLAGS_BASETYPE: can be subclassed
            cython_function = 'cython_function' in type(value).__name__
            if compiled_class or cython_function:
                targets[id(value)] = (value, library)
    entries = []
    for module_name, module in list(sys.modules.items()):
        if module is None or not (_library_of(module_name) == 'scipy' or module_name == 'lsm_ros'
                                  or module_name.startswith('lsm_ros.')):
            continue
        for name, value in list(vars(module).items()):
            if id(value) in targets and targets[id(value)][0] is value and not name.startswith('__'):
                entries.append((module, name, value, targets[id(value)][1]))
    return entries


def _recording_replacement(value: Any, record: Callable[[str], None], library: str) -> Any:
    """A stand-in for a compiled scipy class (a subclass that records its construction) or function."""
    qualified = f'{value.__module__}.{getattr(value, "__qualname__", getattr(value, "__name__", value))}'
    if isinstance(value, type):
        def __new__(cls: type, *args: Any, **kwargs: Any) -> Any:
            record(qualified)
            return value.__new__(cls, *args, **kwargs)
        return type(value.__name__, (value,), {'__new__': __new__, '__module__': value.__module__})

    @functools.wraps(value)
    def recording(*args: Any, **kwargs: Any) -> Any:
        record(qualified)
        return value(*args, **kwargs)
    return recording


# ---------------------------------------------------------------------------------------------- the trace
@dataclass
class GuardTrace:
    """What one traced pass did, per stage."""

    ops: dict[str, collections.Counter] = field(default_factory=lambda: {s: collections.Counter() for s in STAGES})
    syncs: dict[str, collections.Counter] = field(default_factory=lambda: {s: collections.Counter()
                                                                           for s in STAGES})
    integer_matmuls: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)
    library_calls: dict[str, collections.Counter] = field(default_factory=lambda: {s: collections.Counter()
                                                                                   for s in STAGES})
    sync_sites: dict[str, collections.Counter] = field(default_factory=lambda: {s: collections.Counter()
                                                                                for s in STAGES})

    def add_sync(self, stage: str, kind: str) -> None:
        """Count a host synchronisation of ``kind`` in ``stage`` at the innermost lsm_ros line that caused it."""
        self.syncs[stage][kind] += 1
        self.sync_sites[stage][f'{kind} at {_lsm_ros_caller()}'] += 1

    products: int = 0     # arrays of the Reconstruction computed by the pipeline (product_arrays), once known

    def sync_counts(self) -> dict[str, int]:
        return {stage: sum(self.syncs[stage].values()) for stage in STAGES}

    def budget(self, stage: str) -> int:
        return self.products if SYNC_BUDGET[stage] == PER_PRODUCT_ARRAY else SYNC_BUDGET[stage]

    def over_budget(self) -> dict[str, tuple[int, int]]:
        return {stage: (count, self.budget(stage)) for stage, count in self.sync_counts().items()
                if count > self.budget(stage)}

    def report(self) -> str:
        """A markdown table: per stage the aten operators, host synchronisations (budget) and their kinds."""
        rows = ['| stage | aten ops | host syncs (budget) | syncs by kind | scipy/OpenCV calls |',
                '|---|---:|---:|---|---|']
        for stage in STAGES:
            kinds = ', '.join(f'{name} x{count}' for name, count in sorted(self.syncs[stage].items())) or '-'
            calls = ', '.join(f'{name} x{count}' for name, count in sorted(self.library_calls[stage].items())) or '-'
            rows.append(f'| {STAGE_TITLES[stage]} | {sum(self.ops[stage].values())} | '
                        f'{sum(self.syncs[stage].values())} ({self.budget(stage)}) | {kinds} | {calls} |')
        sites = [f'- {STAGE_TITLES[stage]}: {site} x{count}' for stage in STAGES
                 for site, count in sorted(self.sync_sites[stage].items())]
        if sites:
            rows += ['', 'where:'] + sites
        if self.integer_matmuls:
            rows.append('')
            rows.append('integer matrix products: ' + '; '.join(f'{stage}: {op} {dtypes}'
                                                                for stage, op, dtypes in self.integer_matmuls))
        return '\n'.join(rows)


def _lsm_ros_caller() -> str:
    """'module.py:line (function)' of the innermost frame of lsm_ros (not this test) on the current stack."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get('__name__', '')
        if name == 'lsm_ros' or name.startswith('lsm_ros.'):
            return f'{name}:{frame.f_lineno} ({frame.f_code.co_name})'
        frame = frame.f_back
    return 'outside lsm_ros'


def _tensor_args(args: Any, kwargs: Any) -> list[torch.Tensor]:
    flat = []

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            flat.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
    visit(args)
    visit(kwargs)
    return flat


def classify_op(func: Any, args: Any, kwargs: Any, device: torch.device) -> tuple[str | None, bool]:
    """(name of the host synchronisation this aten call causes on CUDA or None, whether it is an integer matrix
    product) for ``func`` (an OpOverload) called with ``args``/``kwargs``."""
    name = func.overloadpacket.__name__.rstrip('_')
    tensors = _tensor_args(args, kwargs)
    integer_matmul = name in MATMUL_OPS and any(not (t.is_floating_point() or t.is_complex()) for t in tensors)
    sync = None
    if name in SYNC_OPS:
        sync = name
    elif name == 'repeat_interleave' and kwargs.get('output_size') is None \
            and not (len(args) > 2 and args[2] is not None) and isinstance(args[0], torch.Tensor) \
            and (len(args) < 2 or isinstance(args[1], torch.Tensor) or args[0].dim() > 0):
        sync = 'repeat_interleave (no output_size)'
    elif name in ('index', 'index_put') and len(args) > 1 and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ())):
        sync = f'{name} with a boolean mask'
    elif name in ('_to_copy', 'copy') and device.type != 'cpu':
        target = kwargs.get('device') if name == '_to_copy' else (args[0].device if args else None)
        source = args[0].device if name == '_to_copy' else (args[1].device if len(args) > 1 else None)
        if target is not None and torch.device(target).type == 'cpu' and source is not None \
                and source.type != 'cpu' and not kwargs.get('non_blocking', len(args) > 2 and args[2] is True):
            sync = 'copy to host'
    return sync, integer_matmul


class GuardMode(TorchDispatchMode):
    """Records every aten call under the current stage label (see :func:`classify_op`)."""

    def __init__(self, trace: GuardTrace, labels: StageLabels, device: torch.device) -> None:
        super().__init__()
        self.trace, self.labels, self.device = trace, labels, device

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        stage = self.labels.current
        sync, integer_matmul = classify_op(func, args, kwargs, self.device)
        self.trace.ops[stage][func.overloadpacket.__name__] += 1
        if sync:
            self.trace.add_sync(stage, sync)
        if integer_matmul:
            self.trace.integer_matmuls.append((stage, str(func), tuple(str(t.dtype) for t in
                                                                       _tensor_args(args, kwargs))))
        return func(*args, **kwargs)


@contextlib.contextmanager
def library_call_hook(trace: GuardTrace, labels: StageLabels, count_host_reads: bool = True) -> Iterator[None]:
    """sys.setprofile (this thread and new threads): Python frames of scipy/cv2 modules, builtins of cv2 (or any
    builtin whose module is scipy/cv2), explicit ``torch.cuda`` synchronisations and, with ``count_host_reads``
    (a CPU run, where a copy to the host dispatches nothing), the Tensor methods that read a tensor on the host."""
    code_libraries: dict[Any, str | None] = {}
    # OpenCV's functions are builtins with neither __module__ nor __self__: know them by identity
    builtins_of = {id(value): (value, library) for module_name, module in list(sys.modules.items())
                   if module is not None and (library := _library_of(module_name)) is not None
                   for value in list(vars(module).values()) if isinstance(value, types.BuiltinFunctionType)
                   and _library_of(getattr(value, '__module__', None) or library) == library}   # not numpy's

    def profile(frame: types.FrameType, event: str, arg: Any) -> None:
        if event == 'call':
            code = frame.f_code
            if code.co_name == 'synchronize' and str(frame.f_globals.get('__name__', '')).startswith('torch.cuda') \
                    and _library_of(frame.f_back.f_globals.get('__name__') if frame.f_back else None) is None \
                    and not str(frame.f_back.f_globals.get('__name__', '')).startswith('torch.cuda'):
                trace.add_sync(labels.current, 'torch.cuda synchronize')
            library = code_libraries.get(code, 0)
            if library == 0:
                library = code_libraries[code] = _library_of(frame.f_globals.get('__name__'))
            if library is not None and _library_of(frame.f_back.f_globals.get('__name__')
                                                   if frame.f_back is not None else None) is None:
                trace.library_calls[labels.current][f'{frame.f_globals.get("__name__")}.{code.co_name}'] += 1
        elif event == 'c_call':
            owner = getattr(arg, '__self__', None)
            if isinstance(owner, types.ModuleType):
                module = owner.__name__
            elif owner is None:
                module = getattr(arg, '__module__', None)
            else:
                module = type(owner).__module__
            library = _library_of(module if isinstance(module, str) else None)
            known = builtins_of.get(id(arg))
            if library is None and known is not None and known[0] is arg:
                library, module = known[1], known[1]
            if library is not None:
                trace.library_calls[labels.current][f'{module}.{getattr(arg, "__name__", arg)}'] += 1
            elif isinstance(owner, torch.Tensor) and getattr(arg, '__name__', None) in HOST_READ_METHODS \
                    and count_host_reads:
                trace.add_sync(labels.current, f'Tensor.{arg.__name__}')

    previous, previous_threads = sys.getprofile(), threading.getprofile()
    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(previous)
        threading.setprofile(previous_threads)   # type: ignore[arg-type]


@contextlib.contextmanager
def guarded(device: torch.device) -> Iterator[GuardTrace]:
    """Trace everything inside the block (stage labels, dispatch mode, library hooks); the wrappers are undone on
    leaving it."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield from _guarded(device, monkeypatch)


def _guarded(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> Iterator[GuardTrace]:
    trace, labels = GuardTrace(), StageLabels()
    for owner, name, stage in _stage_methods() + _camera_functions():
        original = inspect.getattr_static(owner, name) if isinstance(owner, type) else getattr(owner, name)
        if isinstance(original, (staticmethod, classmethod)):
            continue
        monkeypatch.setattr(owner, name, labels.wrap(getattr(owner, name) if not isinstance(owner, type)
                                                     else original, stage))

    def record(qualified: str) -> None:
        trace.library_calls[labels.current][qualified] += 1

    replacements: dict[int, Any] = {}
    for namespace, name, value, library in _compiled_library_entries():
        if id(value) not in replacements:
            replacements[id(value)] = _recording_replacement(value, record, library)
        monkeypatch.setattr(namespace, name, replacements[id(value)])
    with library_call_hook(trace, labels, count_host_reads=device.type == 'cpu'), GuardMode(trace, labels, device):
        yield trace


def traced_pair(reconstructor: Any, left: np.ndarray, right: np.ndarray) -> tuple[GuardTrace, Any]:
    """One warm-up reconstruct (one-time caches), then one traced reconstruct of the same pair."""
    reconstructor.reconstruct(left, right)
    with guarded(reconstructor.device) as trace:
        result = reconstructor.reconstruct(left, right)
    trace.products = product_arrays(result)
    return trace, result


def product_arrays(result: Any) -> int:
    """How many arrays of a Reconstruction the pipeline computed: its array fields but the input images
    (``image_1``, ``image_2``: pre-processing output, on the host already), its raw network outputs and its
    Gaussians' arrays."""
    count = sum(isinstance(getattr(result, f.name), np.ndarray) for f in fields(result)
                if f.name not in ('image_1', 'image_2'))
    count += sum(isinstance(v, np.ndarray) for v in (result.network_outputs or {}).values())
    if result.gaussians is not None and is_dataclass(result.gaussians):
        count += sum(isinstance(getattr(result.gaussians, f.name), np.ndarray) for f in fields(result.gaussians))
    return count


def random_pair(size: int = TINY_RESOLUTION, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Two random uint8 RGB images (size, size, 3)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _tiny_lsm(device: str) -> Any:
    from lsm_ros.model.lsm import LsmConfig
    from lsm_ros.pipeline import Reconstructor
    return Reconstructor.from_config(LsmConfig.tiny(), device=device, resolution=TINY_RESOLUTION,
                                     pose_max_points=512, pose_ransac_iterations=20,
                                     pose_reprojection_error_px=100.0)


# ---------------------------------------------------------------------------------------------- the detectors
class _IntegerProduct(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ torch.arange(3, dtype=torch.int64)


def test_detectors_catch_what_they_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guards see an integer matmul, a scipy k-d tree, a scipy Rotation, an OpenCV call and the host
    synchronisations, each under the stage of the labelled call it happened in."""
    import cv2
    from scipy.spatial import cKDTree
    from scipy.spatial.transform import Rotation

    from lsm_ros import cameras
    from lsm_ros.model.gaussian_head import GaussianHead

    def fake_head(self: Any, *args: Any, **kwargs: Any) -> Any:
        points = np.random.default_rng(0).random((20, 3))
        from scipy.spatial import cKDTree as tree                   # a local import, as lsm_ros does
        tree(points).query(points, k=2)
        values = torch.arange(6)
        _ = values[values > 2]                                      # boolean mask index
        _ = torch.nonzero(values)
        _ = int(values.sum())                                       # _local_scalar_dense
        _ = values.tolist()                                         # host read
        _ = torch.unique(values)
        return _IntegerProduct()(torch.ones(2, 3, dtype=torch.int64))

    def fake_focal(height: int, width: int) -> float:
        cv2.Rodrigues(np.zeros(3))
        Rotation.from_rotvec(np.zeros(3)).as_quat()
        return float(max(height, width))

    fake_focal.__module__ = cameras.__name__                        # a function of lsm_ros.cameras to the guard
    monkeypatch.setattr(GaussianHead, 'forward', fake_head)
    monkeypatch.setattr(cameras, 'reference_focal', fake_focal)
    head = GaussianHead.__new__(GaussianHead)
    with guarded(torch.device('cpu')) as trace:
        cameras.reference_focal(4, 4)
        head.forward()
        from scipy import spatial
        spatial.cKDTree(np.zeros((3, 3)))                           # outside any stage: 'pipeline'
    assert [(stage, op.split('.')[1]) for stage, op, _ in trace.integer_matmuls] == [('ptv3_gaussians', 'mv')]
    head_syncs = trace.syncs['ptv3_gaussians']
    assert head_syncs['index with a boolean mask'] == 1 and head_syncs['nonzero'] == 1
    assert head_syncs['_local_scalar_dense'] == 1 and head_syncs['Tensor.tolist'] == 1
    assert head_syncs['_unique2'] + head_syncs['_unique'] == 1, head_syncs
    assert any('cKDTree' in name for name in trace.library_calls['ptv3_gaussians']), trace.library_calls
    assert any('cKDTree' in name for name in trace.library_calls['pipeline']), trace.library_calls
    camera_calls = ' '.join(trace.library_calls['cameras'])
    assert 'Rodrigues' in camera_calls and 'scipy.spatial.transform' in camera_calls, camera_calls
    assert not trace.syncs['dust3r'] and not trace.library_calls['dust3r']
    from scipy.spatial import cKDTree as restored
    assert restored is cKDTree and GaussianHead.forward is fake_head   # the guard undid its own wrappers


def test_classify_op_repeat_interleave_and_copies() -> None:
    """repeat_interleave syncs without output_size only; a copy to the host counts on an accelerator only."""
    aten = torch.ops.aten
    repeats = torch.tensor([1, 2])
    assert classify_op(aten.repeat_interleave.Tensor, (repeats,), {}, torch.device('cpu'))[0]
    assert classify_op(aten.repeat_interleave.Tensor, (repeats,), {'output_size': 3}, torch.device('cpu'))[0] \
        is None
    fake_cuda = torch.empty(0, device='meta')
    assert classify_op(aten._to_copy.default, (fake_cuda,), {'device': torch.device('cpu')},
                       torch.device('cuda'))[0] == 'copy to host'
    assert classify_op(aten._to_copy.default, (fake_cuda,), {'device': torch.device('cpu')},
                       torch.device('cpu'))[0] is None
    assert classify_op(aten.mm.default, (torch.ones(2, 2), torch.ones(2, 2)), {}, torch.device('cpu')) \
        == (None, False)
    assert classify_op(aten.mm.default, (torch.ones(2, 2, dtype=torch.int32),) * 2, {}, torch.device('cpu'))[1]


# ---------------------------------------------------------------------------------------------- the guards
def _run_guards(device: str, record_property: Callable[[str, Any], None]) -> GuardTrace:
    reconstructor = _tiny_lsm(device)
    left, right = random_pair()
    trace, result = traced_pair(reconstructor, left, right)
    report = trace.report()
    _log.warning('host synchronisations per pair on %s (tiny LSM, %d px):\n%s', device, TINY_RESOLUTION, report)
    record_property(f'host_syncs_{device}', trace.sync_counts())
    assert result.gaussians is not None and len(result.gaussians) == 2 * TINY_RESOLUTION ** 2
    unseen = [stage for stage in TRACED_STAGES if not trace.ops[stage]]
    assert not unseen, f'the dispatch mode saw no operator of {unseen}: did the stage run in another thread?'
    problems = []
    if trace.integer_matmuls:
        problems.append(f'{len(trace.integer_matmuls)} integer matrix product(s) (CUDA has none): '
                        + '; '.join(f'{stage}: {op}{dtypes}' for stage, op, dtypes in trace.integer_matmuls[:8]))
    library_calls = {stage: dict(calls) for stage, calls in trace.library_calls.items() if calls}
    if library_calls:
        problems.append(f'scipy/OpenCV on the path of a pair: {library_calls}')
    over = trace.over_budget()
    if over:
        problems.append('host synchronisations over budget (count, budget): ' + ', '.join(
            f'{STAGE_TITLES[stage]} {value}' for stage, value in over.items()))
    assert not problems, '\n'.join(problems) + '\n\n' + report
    return trace


def test_reconstruct_guards_cpu(record_property: Callable[[str, Any], None]) -> None:
    """A full reconstruct of the tiny LSM on the CPU: no integer matmul, no scipy/OpenCV, syncs within budget."""
    _run_guards('cpu', record_property)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_reconstruct_guards_cuda(record_property: Callable[[str, Any], None]) -> None:
    """The same on CUDA, where copies to the host count as synchronisations too."""
    _run_guards('cuda', record_property)


if __name__ == '__main__':   # the report alone: python test/test_gpu_guards.py [cpu|cuda]
    logging.basicConfig(level=logging.INFO)
    traced, _ = traced_pair(_tiny_lsm(sys.argv[1] if len(sys.argv) > 1 else 'cpu'), *random_pair())
    print(traced.report())
