"""Speed and memory of lsm_ros: the pipeline stage by stage, and the ROS path through ``lsm_node``.

Stage mode (:func:`run_stage_bench`) reconstructs image pairs with the stages composed from the public APIs —
``dust3r.encode`` / ``decode`` / ``predict``, ``LargeSpatialModel.semantics`` (LSeg), :func:`merge_points`,
``point_transformer``, ``gaussian_head`` with :func:`knn_mean_squared_distance`, the camera recovery of
:meth:`Reconstructor.reconstruct` (Weiszfeld focal, relative pose; torch, on the device) and
:func:`render_gaussians` (one 256x256 novel view with features) — timing each (``torch.cuda.synchronize`` around
every stage on CUDA). Once per run the composed result is checked against :meth:`Reconstructor.reconstruct` and
:meth:`Reconstructor.render` on the same pair, so the bench times the code the node runs. After each composed
pass the real pipeline is timed end to end on the same pair (:func:`time_pipeline`: ``reconstruct`` with its CUDA
streams and graphs when configured, a query of eight phrases, a render), and ``--precision`` may name several
precisions, measured in turn on one model (:meth:`Reconstructor.set_precision`).

ROS mode (:func:`run_ros_bench`) runs ``lsm_node`` in-process on loopback (the localhost-only environment of
:mod:`lsm_ros.ros.isolation`), publishes calibrated stereo pairs with CameraInfo from a process of its own at a
fixed rate while inference is slower, and measures publish → every product received, the pairs the node drops
("latest pair wins") and that no backlog builds up.

On a shared machine, :class:`CpuSnapshot` says how many cores other processes kept busy during a measurement,
and ``max_other_cores`` repeats the pairs measured under load.
"""
from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from lsm_ros import cameras
from lsm_ros.camera_path import camera_path
from lsm_ros.config import PipelineConfig
from lsm_ros.model.dust3r import Encoded
from lsm_ros.model.gaussian_head import knn_mean_squared_distance
from lsm_ros.model.layers import autocast, check_precision, fp32_matmul
from lsm_ros.model.lsm import merge_points
from lsm_ros.pipeline import DEPTH_MIN_ALPHA, FOCAL_BOUNDS, NETWORK_OUTPUT_KEYS, Reconstructor
from lsm_ros.preprocess import ImageCrop, preprocess_pair
from lsm_ros.reference_weights import find_reference_dir
from lsm_ros.rendering import render_gaussians
from lsm_ros.semantics import DEFAULT_LABELS
from lsm_ros.shared_data import shared_directory

_log = logging.getLogger(__name__)

STAGES: tuple[tuple[str, str], ...] = (
    ('preprocess', 'pre-processing (resize, crop, normalise, to device)'),
    ('dust3r_encoder', 'DUSt3R encoder (ViT-L, both views)'),
    ('dust3r_decoder', 'DUSt3R decoder (2 x ViT-B cross-attention)'),
    ('dust3r_heads', 'DUSt3R heads (2 x DPT + post-processing)'),
    ('lseg', 'LSeg (ViT-L/16 + refine head, tokens, reduction)'),
    ('merge', 'merge (merge_points)'),
    ('ptv3', 'PTv3 (serialization, sparse conv, attention)'),
    ('gaussian_head', 'Gaussian head (incl. kNN)'),
    ('cameras', 'camera recovery (focal + relative pose, results to the host)'),
    ('render', 'render (256x256 novel view, rgb+depth+features)'),
)
STAGE_KEYS = tuple(key for key, _ in STAGES)
RECONSTRUCTION_STAGES = tuple(key for key in STAGE_KEYS if key != 'render')  # pair -> Gaussians + cameras
RENDER_SIZE = (256, 256)
QUERY_PHRASES = DEFAULT_LABELS     # the query timed: LSM's eight labels (text features cached after the first pair)
# Figures of the real pipeline per pair, timed after the composed pass (device synchronised around each):
PIPELINE_FIGURES: tuple[tuple[str, str], ...] = (
    ('reconstruct', 'Reconstructor.reconstruct (pair → Gaussians + cameras, products on the host)'),
    ('query', f'Reconstructor.query ({len(QUERY_PHRASES)} phrases, both views + every Gaussian)'),
    ('render_view', 'Reconstructor.render (256x256 novel view, rgb+depth+features, to the host)'),
)
PIPELINE_KEYS = tuple(key for key, _ in PIPELINE_FIGURES)
DEFAULT_SIZES = ('224', '256', '512x384')
IMAGE_SOURCES = ('auto', 'reference', 'demo', 'synthetic')
CROP_MULTIPLE_512 = 32             # the LSM demo crops 512-resolution images to multiples of 32
CHECK_RELATIVE_TOLERANCE = 1e-4    # composed vs Reconstructor outputs, max |diff| / max |ref| per array
DEMO_PAIRS_RELATIVE = Path('data') / 'lsm_demo_pairs'
SYNTHETIC_FRAMES = 4
MIB = 1 << 20
CPU_FLAGS_OF_INTEREST = frozenset({'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile', 'avx512_fp16'})


# ---------------------------------------------------------------------------------------------- sizes and images
@dataclass(frozen=True)
class ModelSize:
    """A model input size (width x height) and the pipeline ``resolution`` that produces it."""

    width: int
    height: int

    @property
    def resolution(self) -> int:
        """PipelineConfig.resolution: 224 or 256 (squares) or 512 (long side)."""
        return self.width if self.width == self.height else 512

    @property
    def label(self) -> str:
        return str(self.width) if self.width == self.height else f'{self.width}x{self.height}'

    def __str__(self) -> str:
        return f'{self.width}x{self.height}'


def parse_model_size(text: str) -> ModelSize:
    """'224' or '256' (squares), or 'WxH' with a long side of 512 and the other side a multiple of 32 below 512
    (the 512 pre-processing crops to multiples of 32 and squares to 4:3). Raises ValueError."""
    parts = text.lower().split('x')
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f'{text!r}: expected 224, 256 or WxH such as 512x384') from None
    if len(numbers) == 1 and numbers[0] in (224, 256):
        return ModelSize(numbers[0], numbers[0])
    if len(numbers) == 2 and numbers[0] == numbers[1] and numbers[0] in (224, 256):
        return ModelSize(*numbers)
    if len(numbers) == 2 and max(numbers) == 512 and min(numbers) < 512 and min(numbers) >= CROP_MULTIPLE_512 \
            and min(numbers) % CROP_MULTIPLE_512 == 0:
        return ModelSize(*numbers)
    raise ValueError(f'{text!r}: sizes are 224, 256 or WxH with a long side of 512 and the other side a multiple '
                     f'of {CROP_MULTIPLE_512} below 512 (e.g. 512x384, 384x512)')


@dataclass(frozen=True)
class ImagePair:
    """Two RGB uint8 images (H,W,3) of a pair, any size."""

    left: np.ndarray
    right: np.ndarray
    name: str


def reference_pairs() -> list[ImagePair]:
    """The parity reference's pair (``inputs.npz``, 256x256) as uint8 RGB; empty without the reference folder."""
    reference_dir = find_reference_dir()
    if reference_dir is None or not (reference_dir / 'inputs.npz').is_file():
        return []
    with np.load(reference_dir / 'inputs.npz') as inputs:
        images = inputs['images']
    rgb = np.clip(np.round((images * 0.5 + 0.5) * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return [ImagePair(np.ascontiguousarray(rgb[0]), np.ascontiguousarray(rgb[1]), 'reference inputs.npz')]


def demo_pairs() -> list[ImagePair]:
    """The official LSM demo pairs of ``shared/data/lsm_demo_pairs`` (each scene's two images, sorted)."""
    root = shared_directory() / DEMO_PAIRS_RELATIVE
    pairs = []
    for scene in sorted(p for p in root.glob('*') if p.is_dir()):
        files = sorted(p for p in scene.iterdir() if p.suffix.lower() in ('.jpg', '.jpeg', '.png'))
        if len(files) >= 2:
            left, right = (np.asarray(PIL.Image.open(f).convert('RGB')) for f in files[:2])
            pairs.append(ImagePair(left, right, f'lsm_demo_pairs/{scene.name}'))
    return pairs


def synthetic_pairs(frames: int = SYNTHETIC_FRAMES) -> list[ImagePair]:
    """Ray-cast stereo pairs of the synthetic room (:mod:`lsm_ros.ros.synthetic`, 320x240)."""
    from lsm_ros.ros.synthetic import StereoRig, render_stereo_frame
    rig = StereoRig()
    return [ImagePair(views['left_rgb'], views['right_rgb'], f'synthetic frame {index}')
            for index, views in ((i, render_stereo_frame(rig, i)) for i in range(frames))]


def load_image_pairs(source: str) -> tuple[str, list[ImagePair]]:
    """(source used, pairs) for ``source`` in IMAGE_SOURCES; 'auto' takes the first available of the reference
    pair, the demo pairs and the synthetic ones. Raises FileNotFoundError for a named source that is absent."""
    if source not in IMAGE_SOURCES:
        raise ValueError(f'unknown image source {source!r}; choose from {IMAGE_SOURCES}')
    loaders: dict[str, Callable[[], list[ImagePair]]] = {
        'reference': reference_pairs, 'demo': demo_pairs, 'synthetic': synthetic_pairs}
    for name in (('reference', 'demo', 'synthetic') if source == 'auto' else (source,)):
        pairs = loaders[name]()
        if pairs:
            return name, pairs
    raise FileNotFoundError(f'no {source} image pairs found (reference folder: {find_reference_dir()}, demo '
                            f'pairs: {shared_directory() / DEMO_PAIRS_RELATIVE})')


def fit_pair(pair: ImagePair, size: ModelSize) -> tuple[np.ndarray, np.ndarray]:
    """Both images centre-cropped to the aspect of ``size`` and resized to it (PIL, Lanczos), so that the
    pipeline's own pre-processing at ``size.resolution`` keeps them as they are."""
    def fit(image: np.ndarray) -> np.ndarray:
        fitted = PIL.ImageOps.fit(PIL.Image.fromarray(image), (size.width, size.height),
                                  PIL.Image.Resampling.LANCZOS)
        return np.asarray(fitted, dtype=np.uint8).copy()
    return fit(pair.left), fit(pair.right)


# ---------------------------------------------------------------------------------------------- measurement
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class StageTimer:
    """Wall times of named stages, the device synchronised before and after each."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds[name] = time.perf_counter() - start


def _proc_status_kib(field_name: str) -> int:
    with open('/proc/self/status', encoding='ascii') as status:
        for line in status:
            if line.startswith(field_name + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field_name} not in /proc/self/status')


def reset_peak_memory(device: torch.device) -> bool:
    """Restart the peak-memory counter: CUDA's peak stats, or the process's RSS high-water mark (VmHWM, reset
    through /proc/self/clear_refs). False when the RSS mark cannot be reset (the peak is then since start)."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open('/proc/self/clear_refs', 'w', encoding='ascii') as clear_refs:
            clear_refs.write('5')
        return True
    except OSError as exc:
        _log.warning('cannot reset the RSS high-water mark (%s): peak RSS is since process start', exc)
        return False


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: torch.cuda.max_memory_allocated; CPU: the RSS high-water mark (VmHWM)."""
    if device.type == 'cuda':
        return int(torch.cuda.max_memory_allocated(device))
    return _proc_status_kib('VmHWM') * 1024


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (/proc/<pid>/stat), 0 once it is gone."""
    try:
        with open(f'/proc/{pid}/stat', encoding='ascii') as stat:
            fields = stat.read().rsplit(')', 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')   # utime, stime


@dataclass(frozen=True)
class CpuSnapshot:
    """Wall clock, busy CPU time of the whole machine (/proc/stat) and CPU time of this process and of the
    bench's own helper processes (``pids``), in seconds."""

    wall_s: float
    machine_busy_s: float
    bench_s: float
    pids: tuple[int, ...] = ()

    @classmethod
    def now(cls, *pids: int) -> 'CpuSnapshot':
        with open('/proc/stat', encoding='ascii') as stat:
            jiffies = [int(v) for v in stat.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        busy = sum(jiffies) - jiffies[3] - jiffies[4]
        bench = time.process_time() + sum(_process_cpu_seconds(pid) for pid in pids)
        return cls(time.monotonic(), busy / os.sysconf('SC_CLK_TCK'), bench, pids)

    def other_processes_cores(self) -> float:
        """Mean number of cores that other processes (not this one, not ``pids``) kept busy since this snapshot
        (about 0 on a quiet machine): the contention under which the figures were taken."""
        now = CpuSnapshot.now(*self.pids)
        others = (now.machine_busy_s - self.machine_busy_s) - (now.bench_s - self.bench_s)
        return max(0.0, others) / max(now.wall_s - self.wall_s, 1e-9)


def wait_for_quiet(max_other_cores: float, window_s: float = 5.0, timeout_s: float = 3600.0) -> float:
    """Block until other processes keep at most ``max_other_cores`` cores busy over a ``window_s`` window; returns
    the seconds waited. Raises TimeoutError after ``timeout_s``."""
    start = time.monotonic()
    while True:
        snapshot = CpuSnapshot.now()
        time.sleep(window_s)
        if snapshot.other_processes_cores() <= max_other_cores:
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f'other processes kept more than {max_other_cores} cores busy for {timeout_s:.0f} s')


def summarise_ms(seconds: Sequence[float]) -> dict[str, float]:
    """Median and 95th percentile (linear interpolation) of durations, in milliseconds."""
    values = np.asarray(seconds, dtype=np.float64) * 1e3
    return dict(median=float(np.median(values)), p95=float(np.percentile(values, 95)))


def _cpuinfo_field(name: str) -> str | None:
    """The first value of ``name`` in /proc/cpuinfo (None when absent or unreadable)."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as cpuinfo:
            return next((line.split(':', 1)[1].strip() for line in cpuinfo if line.split(':')[0].strip() == name),
                        None)
    except OSError:
        return None


def machine_description(device: torch.device) -> dict[str, Any]:
    """CPU model and the vector extensions that matter for the dense networks (AVX-512, bfloat16, AMX), cores,
    torch version and threads, accelerator, load average."""
    flags = set((_cpuinfo_field('flags') or '').split())
    return dict(cpu=_cpuinfo_field('model name') or platform.processor() or 'unknown',
                cpu_flags=sorted(flags & CPU_FLAGS_OF_INTEREST), cpu_cores=os.cpu_count(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(),
                python=platform.python_version(), device=str(device),
                accelerator=torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
                load_average=[round(v, 2) for v in os.getloadavg()])


# ---------------------------------------------------------------------------------------------- the composed pass
@dataclass
class ComposedPair:
    """Everything one composed pass produced (batch 1)."""

    img1: torch.Tensor
    img2: torch.Tensor
    geometry: dict[str, torch.Tensor]
    gaussians: dict[str, torch.Tensor]
    K_1: np.ndarray
    pose: cameras.RelativePose
    render_pose: np.ndarray            # (4,4) T_left_camera of the rendered view
    render_K: np.ndarray               # (3,3) at RENDER_SIZE
    rendered: Any                      # lsm_ros.rendering.RenderOutput
    seconds: dict[str, float]


def novel_view(K_1: np.ndarray, K_2: np.ndarray, T_1_2: np.ndarray, size: ModelSize
               ) -> tuple[np.ndarray, np.ndarray]:
    """(T_left_camera, K at RENDER_SIZE) of the view halfway between the two cameras (slerp, mean intrinsics);
    view 1's pose when the relative pose failed (``T_1_2`` is then the identity; a non-finite ``K_2`` is then
    replaced by ``K_1``)."""
    K_2 = np.asarray(K_2, dtype=np.float64)
    if not np.isfinite(K_2).all():
        K_2 = K_1
    path = camera_path(T_1_2, K_1, K_2, 3, 'one_way')
    resize = ImageCrop(input_size=(size.width, size.height), resized_size=RENDER_SIZE, crop_box=(0, 0, *RENDER_SIZE))
    return path.poses[1], resize.intrinsics_to_model(path.intrinsics[1])


def compose_reconstruction(reconstructor: Reconstructor, left: np.ndarray, right: np.ndarray,
                           size: ModelSize) -> ComposedPair:
    """One pair through every stage, each timed (see the module docstring). The stages are those of
    :meth:`Reconstructor.reconstruct` (network, semantics, Gaussians, cameras without calibration) plus a render;
    DUSt3R and LSeg run in the precisions the reconstructor gives them (``Reconstructor.precisions``)."""
    model, cfg, device = reconstructor.network, reconstructor.config, reconstructor.device
    precisions = reconstructor.precisions
    timer = StageTimer(device)
    with torch.no_grad():
        with timer.stage('preprocess'):
            view1, view2 = preprocess_pair(left, right, cfg.resolution)
            img1, img2 = view1.tensor.to(device), view2.tensor.to(device)
        with timer.stage('dust3r_encoder'), autocast(precisions['dust3r'], device):
            encoded = model.dust3r.encode(torch.cat((img1, img2), dim=0))
            tokens1, tokens2 = encoded.tokens.chunk(2, dim=0)
            positions1, positions2 = encoded.positions.chunk(2, dim=0)
        with timer.stage('dust3r_decoder'), autocast(precisions['dust3r'], device):
            decoded1, decoded2 = model.dust3r.decode(Encoded(tokens1, positions1), Encoded(tokens2, positions2))
        with timer.stage('dust3r_heads'), autocast(precisions['dust3r'], device):
            geometry = model.dust3r.predict(decoded1, decoded2, image_size=(img1.shape[-2], img1.shape[-1]))
        geometry['enc_feat'] = torch.cat((tokens1, tokens2), dim=1).float()
        with timer.stage('lseg'):
            semantics = model.semantics(img1, img2, precision=precisions['lseg'])
        with timer.stage('merge'):
            coord, color, center, scale = merge_points(geometry['pts3d_1'][0], geometry['pts3d_2'][0], img1[0],
                                                       img2[0])
        with timer.stage('ptv3'), fp32_matmul(cfg.precision, device):   # as LargeSpatialModel.gaussians
            tokens = semantics['lseg_token_feature']
            point_features = model.point_transformer(coord, torch.cat([coord, color], dim=1), geometry['enc_feat'],
                                                     tokens, tokens)
        with timer.stage('gaussian_head'), fp32_matmul(cfg.precision, device):
            means = coord * scale[0] + center[0]
            residual = semantics['lseg_res_feature']          # (2, C, H, W): view 1, view 2 of the one sample
            residual = residual.permute(0, 2, 3, 1).reshape(-1, residual.shape[1])
            gaussians = model.gaussian_head(point_features, means, color, residual, knn_mean_squared_distance(means))
        with timer.stage('cameras'):      # as Reconstructor.reconstruct without calibration: on the device
            K_1_tensor, _ = cameras.intrinsics_from_points(geometry['pts3d_1'][0], *FOCAL_BOUNDS)
            pose = cameras.relative_pose(
                geometry['pts3d_2'][0], geometry['conf_2'][0], None,
                reprojection_error_px=cfg.pose_reprojection_error_px, iterations=cfg.pose_ransac_iterations,
                max_points=cfg.pose_max_points).to_numpy()
            K_1 = K_1_tensor.cpu().numpy()
        render_pose, render_K = novel_view(K_1, pose.K_2, pose.T_1_2, size)
        with timer.stage('render'):
            rendered = render_gaussians(
                gaussians['means'], gaussians['rotations'], gaussians['scales'], gaussians['opacities'],
                gaussians['sh'], gaussians['features'],
                torch.as_tensor(np.linalg.inv(render_pose), dtype=torch.float32, device=device),
                torch.as_tensor(render_K, dtype=torch.float32, device=device), *RENDER_SIZE)
    return ComposedPair(img1=img1, img2=img2, geometry=geometry, gaussians=gaussians, K_1=K_1, pose=pose,
                        render_pose=render_pose, render_K=render_K, rendered=rendered, seconds=timer.seconds)


def _relative_difference(value: Any, reference: Any) -> float:
    """max |value - reference| / max |reference| over finite entries (0 for two equal arrays; inf on a shape
    mismatch or differing non-finite entries)."""
    value = np.asarray(value.detach().float().cpu() if isinstance(value, torch.Tensor) else value, np.float64)
    reference = np.asarray(reference.detach().float().cpu() if isinstance(reference, torch.Tensor) else reference,
                           np.float64)
    if value.shape != reference.shape:
        return float('inf')
    finite = np.isfinite(reference)
    if not np.array_equal(finite, np.isfinite(value)) \
            or not np.array_equal(value[~finite], reference[~finite], equal_nan=True):
        return float('inf')
    if not finite.any():
        return 0.0
    scale = np.abs(reference[finite]).max()
    difference = np.abs(value[finite] - reference[finite]).max()
    return float(difference / scale) if scale > 0 else float(difference)


def check_composition(reconstructor: Reconstructor, left: np.ndarray, right: np.ndarray,
                      composed: ComposedPair) -> dict[str, Any]:
    """Compare a composed pass with :meth:`Reconstructor.reconstruct` and :meth:`Reconstructor.render` of the same
    pair: point maps, confidences, Gaussians, intrinsics, relative pose and the rendered view.

    Returns {'max_relative_difference': {name: value}, 'identical': bool}; raises RuntimeError when an array
    differs by more than CHECK_RELATIVE_TOLERANCE (the bench would not time the real thing).
    """
    result = reconstructor.reconstruct(left, right)
    view = reconstructor.render(result, composed.render_pose, composed.render_K, RENDER_SIZE,
                                ('rgb', 'depth', 'alpha', 'features'))
    rendered = composed.rendered
    depth = rendered.depth.float().cpu().numpy()
    depth[rendered.alpha.float().cpu().numpy() < DEPTH_MIN_ALPHA] = np.nan   # Reconstructor.render's depth rule
    pairs: dict[str, tuple[Any, Any]] = {
        key: (composed.geometry[key], result.network_outputs[key]) for key in NETWORK_OUTPUT_KEYS}
    pairs.update({f'gaussians.{key}': (composed.gaussians[key], getattr(result.gaussians, key))
                  for key in ('means', 'scales', 'rotations', 'opacities', 'sh', 'features')})
    pairs.update(K_1=(composed.K_1, result.K_1), K_2=(composed.pose.K_2, result.K_2),
                 T_1_2=(composed.pose.T_1_2, result.T_1_2),
                 **{'render.rgb': (rendered.rgb.clamp(0, 1), view.rgb), 'render.depth': (depth, view.depth),
                    'render.alpha': (rendered.alpha, view.alpha),
                    'render.features': (rendered.features, view.features)})
    differences = {name: _relative_difference(value, reference) for name, (value, reference) in pairs.items()}
    failed = {name: value for name, value in differences.items() if not value <= CHECK_RELATIVE_TOLERANCE}
    if failed:
        raise RuntimeError(f'the composed stages differ from Reconstructor.reconstruct/render (max |diff| / max |ref| '
                           f'> {CHECK_RELATIVE_TOLERANCE}): {failed}')
    identical = all(v == 0.0 for v in differences.values())
    _log.info('composed stages match Reconstructor.reconstruct/render (%s)', 'bit-identical' if identical else
              f'max relative difference {max(differences.values()):.2g}')
    return dict(max_relative_difference=differences, identical=identical)


def time_pipeline(reconstructor: Reconstructor, left: np.ndarray, right: np.ndarray, composed: ComposedPair
                  ) -> dict[str, float]:
    """Seconds of the real pipeline on one pair (PIPELINE_FIGURES): :meth:`Reconstructor.reconstruct` (with its
    streams and graphs when configured), :meth:`Reconstructor.query` of QUERY_PHRASES on its result and
    :meth:`Reconstructor.render` of the composed pass's novel view at RENDER_SIZE (rgb, depth, features), each from
    a synchronised device to its products on the host."""
    seconds: dict[str, float] = {}
    timer = StageTimer(reconstructor.device)
    with timer.stage('reconstruct'):
        result = reconstructor.reconstruct(left, right)
    with timer.stage('query'):
        reconstructor.query(result, QUERY_PHRASES)
    with timer.stage('render_view'):
        reconstructor.render(result, composed.render_pose, composed.render_K, RENDER_SIZE,
                             ('rgb', 'depth', 'alpha', 'features'))
    seconds.update(timer.seconds)
    return seconds


# ---------------------------------------------------------------------------------------------- stage mode
@dataclass
class SizeResult:
    """The figures of one model size."""

    size: ModelSize
    samples_s: dict[str, list[float]] = field(default_factory=dict)   # stage -> per-pair seconds
    pair_wall_s: list[float] = field(default_factory=list)           # whole pass incl. render, per pair
    pipeline_s: dict[str, list[float]] = field(default_factory=lambda: {key: [] for key in PIPELINE_KEYS})
    pose_found: list[bool] = field(default_factory=list)             # PnP succeeded (else the render is view 1)
    render_coverage: list[float] = field(default_factory=list)       # rendered pixels: alpha >= DEPTH_MIN_ALPHA
    peak_memory_bytes: int = 0
    peak_since_start: bool = False
    other_processes_cores: float = 0.0                               # over the whole size, warm-up included
    pair_other_cores: list[float] = field(default_factory=list)      # during each kept timed pair
    discarded_pairs: int = 0                                         # timed pairs repeated: machine busy

    def add(self, composed: ComposedPair, wall_s: float, other_cores: float,
            pipeline_s: Mapping[str, float] | None = None) -> None:
        """Record one timed pass (its model input must have this size) and the pipeline's figures of the pair
        (:func:`time_pipeline`)."""
        width, height = composed.img1.shape[-1], composed.img1.shape[-2]
        if (width, height) != (self.size.width, self.size.height):
            raise RuntimeError(f'the pair gave a {width}x{height} model input, not {self.size}')
        for key in STAGE_KEYS:
            self.samples_s[key].append(composed.seconds[key])
        self.pair_wall_s.append(wall_s)
        for key, value in (pipeline_s or {}).items():
            self.pipeline_s[key].append(value)
        self.pair_other_cores.append(other_cores)
        self.pose_found.append(bool(composed.pose.success))
        self.render_coverage.append(float((composed.rendered.alpha >= DEPTH_MIN_ALPHA).float().mean()))

    def reconstruction_s(self) -> list[float]:
        """Per pair: the sum of the stages from images to Gaussians + cameras (every stage but the render)."""
        return [sum(self.samples_s[key][i] for key in RECONSTRUCTION_STAGES) for i in range(len(self.pair_wall_s))]

    def to_dict(self) -> dict[str, Any]:
        reconstruction = self.reconstruction_s()
        return dict(size=str(self.size), label=self.size.label, resolution=self.size.resolution,
                    pairs=len(self.pair_wall_s),
                    stages_ms={key: summarise_ms(self.samples_s[key]) for key in STAGE_KEYS},
                    reconstruction_ms=summarise_ms(reconstruction), total_ms=summarise_ms(self.pair_wall_s),
                    pipeline_ms={key: summarise_ms(values) for key, values in self.pipeline_s.items() if values},
                    pipeline_samples_ms={key: [1e3 * s for s in values] for key, values in self.pipeline_s.items()},
                    pairs_per_s=len(reconstruction) / sum(reconstruction),
                    pose_found_fraction=float(np.mean(self.pose_found)),
                    render_coverage_median=float(np.median(self.render_coverage)),
                    peak_memory_mib=self.peak_memory_bytes / MIB, peak_memory_since_start=self.peak_since_start,
                    other_processes_cores=self.other_processes_cores,
                    pair_other_processes_cores_max=max(self.pair_other_cores), discarded_pairs=self.discarded_pairs,
                    samples_ms={key: [1e3 * s for s in values] for key, values in self.samples_s.items()})


def run_stage_bench(reconstructor: Reconstructor, sizes: Sequence[ModelSize], *, pairs: int, warmup: int,
                    images: Sequence[ImagePair], max_other_cores: float | None = None,
                    timed_pipeline: bool = True) -> dict[str, Any]:
    """Time ``warmup`` + ``pairs`` composed passes at every size (image pairs cycled); the first size's first
    warm-up pair (or its first timed pair without warm-up) is also checked against the Reconstructor.
    ``timed_pipeline``: after each composed pass also time the real pipeline on the pair (:func:`time_pipeline`:
    reconstruct, a query of QUERY_PHRASES, a render), warm-up pairs included (they capture the CUDA graphs).

    ``max_other_cores`` (a shared machine): a timed pair during which other processes kept more cores busy on
    average is discarded (counted) and, after a quiet moment (:func:`wait_for_quiet`), measured again.
    Returns {'composition_check': ..., 'memory_kind': ..., 'sizes': [SizeResult.to_dict(), ...]}.
    """
    if not reconstructor.semantic:
        raise ValueError('the stage bench needs the full LSM (geometry, semantics and Gaussians), not the '
                         'geometry-only network')
    if pairs < 1 or warmup < 0:
        raise ValueError(f'need pairs >= 1 and warmup >= 0, got pairs={pairs}, warmup={warmup}')
    device = reconstructor.device
    base_config = reconstructor.config
    check: dict[str, Any] | None = None
    results = []
    memory_kind = 'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'peak RSS (VmHWM)'
    try:
        for size in sizes:
            reconstructor.config = replace(base_config, resolution=size.resolution)
            result = SizeResult(size, {key: [] for key in STAGE_KEYS})
            result.peak_since_start = not reset_peak_memory(device)
            size_cpu = CpuSnapshot.now()
            progress = tqdm(total=warmup + pairs, desc=f'lsm-ros bench {size.label}', unit='pair')
            with logging_redirect_tqdm(), progress:
                step = 0
                while step < warmup + pairs:
                    pair = images[step % len(images)]
                    left, right = fit_pair(pair, size)
                    pair_cpu = CpuSnapshot.now()
                    start = time.perf_counter()
                    composed = compose_reconstruction(reconstructor, left, right, size)
                    wall_s = time.perf_counter() - start
                    if check is None:
                        check = dict(size=str(size), pair=pair.name,
                                     **check_composition(reconstructor, left, right, composed))
                    pipeline_s = time_pipeline(reconstructor, left, right, composed) if timed_pipeline else None
                    other_cores = pair_cpu.other_processes_cores()
                    if step >= warmup and max_other_cores is not None and other_cores > max_other_cores:
                        result.discarded_pairs += 1
                        _log.warning('other processes kept %.2f cores busy during that pair: measuring it again '
                                     'once the machine is quiet (%d discarded)', other_cores, result.discarded_pairs)
                        wait_for_quiet(max_other_cores)
                        continue
                    if step >= warmup:
                        result.add(composed, wall_s, other_cores, pipeline_s)
                    step += 1
                    progress.update()
            result.peak_memory_bytes = peak_memory_bytes(device)
            result.other_processes_cores = size_cpu.other_processes_cores()
            results.append(result)
    finally:
        reconstructor.config = base_config
    return dict(composition_check=check, memory_kind=memory_kind, max_other_cores=max_other_cores,
                sizes=[r.to_dict() for r in results])


def format_stage_table(report: Mapping[str, Any]) -> str:
    """Markdown table: one row per stage, median and p95 (ms) per size, then the totals, pairs/s and memory."""
    sizes = report['sizes']
    header = '| stage | ' + ' | '.join(f'{s["label"]} median ms | {s["label"]} p95 ms' for s in sizes) + ' |'
    rule = '|---|' + '---:|---:|' * len(sizes)
    rows = [header, rule]

    def timing_row(title: str, values: list[Mapping[str, float]]) -> str:
        return f'| {title} | ' + ' | '.join(f'{v["median"]:.1f} | {v["p95"]:.1f}' for v in values) + ' |'

    for key, title in STAGES:
        rows.append(timing_row(title, [s['stages_ms'][key] for s in sizes]))
    rows.append(timing_row('**pair → Gaussians + cameras** (all but render)',
                           [s['reconstruction_ms'] for s in sizes]))
    rows.append(timing_row('**total** (all stages, wall)', [s['total_ms'] for s in sizes]))
    for key, title in PIPELINE_FIGURES:
        if all(key in s.get('pipeline_ms', {}) for s in sizes):
            rows.append(timing_row(f'**{title}**' if key == 'reconstruct' else title,
                                   [s['pipeline_ms'][key] for s in sizes]))
    rows.append('| pairs/s (pair → Gaussians + cameras) | ' + ' | '.join(f'{s["pairs_per_s"]:.3f} | ' for s in sizes)
                + ' |')
    memory = report['memory_kind']
    rows.append(f'| {memory}, MiB | ' + ' | '.join(
        f'{s["peak_memory_mib"]:.0f}{" (since start)" if s["peak_memory_since_start"] else ""} | ' for s in sizes)
        + ' |')
    rows.append('| cores kept busy by other processes: whole run / max during a timed pair | ' + ' | '.join(
        f'{s["other_processes_cores"]:.2f} / {s["pair_other_processes_cores_max"]:.2f} | ' for s in sizes) + ' |')
    rows.append('| timed pairs discarded (machine busy) and measured again | ' + ' | '.join(
        f'{s["discarded_pairs"]} | ' for s in sizes) + ' |')
    return '\n'.join(rows)


# ---------------------------------------------------------------------------------------------- ROS mode
@dataclass
class RosBenchResult:
    """Figures of the ROS mode (times in seconds)."""

    rate_hz: float
    duration_s: float
    published: int
    processed: int
    latencies_s: list[float]             # per processed streamed pair: publish -> every product received
    completion_times_s: list[float]      # monotonic times at which each processed pair's products were complete
    node_statistics: dict[str, Any]
    products: list[str]
    rss_after_warmup_bytes: int
    rss_after_stream_bytes: int
    warmup_latency_s: float
    other_processes_cores: float

    @property
    def service_time_s(self) -> float | None:
        """Median time between consecutive completions: the time the node needs per pair when always busy."""
        if len(self.completion_times_s) < 2:
            return None
        return float(np.median(np.diff(self.completion_times_s)))

    def to_dict(self) -> dict[str, Any]:
        service = self.service_time_s
        latency = summarise_ms(self.latencies_s) if self.latencies_s else None
        last = self.latencies_s[-1] if self.latencies_s else None
        worker = self.node_statistics['worker']
        return dict(
            rate_hz=self.rate_hz, duration_s=self.duration_s, published=self.published, processed=self.processed,
            dropped=self.published - self.processed, node_worker_dropped=worker['dropped'],
            node_pairs_formed=self.node_statistics['counts'].get('pairs', 0),
            node_sync_drops=self.node_statistics['sync_drops'], node_rejected=self.node_statistics['rejected'],
            latency_ms=latency, max_latency_ms=1e3 * max(self.latencies_s) if self.latencies_s else None,
            last_latency_ms=None if last is None else 1e3 * last,
            service_time_ms=None if service is None else 1e3 * service,
            last_latency_over_service=None if last is None or not service else last / service,
            max_latency_over_service=None if not self.latencies_s or not service else max(self.latencies_s) / service,
            latencies_ms=[1e3 * v for v in self.latencies_s], warmup_latency_ms=1e3 * self.warmup_latency_s,
            completion_gaps_ms=[1e3 * v for v in np.diff(self.completion_times_s)],
            rss_after_warmup_mib=self.rss_after_warmup_bytes / MIB,
            rss_after_stream_mib=self.rss_after_stream_bytes / MIB,
            rss_growth_mib=(self.rss_after_stream_bytes - self.rss_after_warmup_bytes) / MIB,
            other_processes_cores=self.other_processes_cores,
            products=self.products, node_statistics=self.node_statistics)


def run_ros_bench(reconstructor: Reconstructor, *, rate_hz: float, duration_s: float,
                  max_other_cores: float | None = None, warmup_timeout_s: float = 600.0,
                  drain_timeout_s: float = 600.0) -> dict[str, Any]:
    """Stream calibrated stereo pairs (the synthetic rig of :mod:`lsm_ros.ros.synthetic`, CameraInfo with the
    baseline) into an in-process ``lsm_node`` at ``rate_hz`` for ``duration_s``, after one warm-up pair.

    The publisher is a process of its own, as a camera driver would be
    (:class:`~lsm_ros.ros.load_test.StereoPublisherProcess`): it shares the CPU with the node, not its interpreter.
    The node and the product collector spin in a :class:`~lsm_ros.ros.graph.RosGraph`. Each pair's latency runs
    from just before its images are published (``time.monotonic``, one clock for both processes) to the arrival of
    its last product (``~/points``, both depths and model camera infos, ``~/info``, and with the semantic model the
    label image and overlay; ``~/relative_pose`` is left out: it exists only when PnP succeeds). Returns
    :meth:`RosBenchResult.to_dict` plus the isolation environment used. ``max_other_cores``: wait until other
    processes keep at most that many cores busy (:func:`wait_for_quiet`) before streaming.
    """
    if rate_hz <= 0 or duration_s <= 0:
        raise ValueError(f'rate and duration must be positive, got {rate_hz} Hz for {duration_s} s')
    from lsm_ros.ros.isolation import apply_reserved_localhost_environment
    environment = apply_reserved_localhost_environment()
    from lsm_ros.ros.graph import RosGraph, wait_until
    from lsm_ros.ros.load_test import (StereoPublisherProcess, add_remapped_lsm_node, current_rss_bytes,
                                       statistics_difference, stereo_input_topics)
    from lsm_ros.ros.node import RELATIVE_POSE_TOPIC

    topics = stereo_input_topics(BENCH_STEREO_PREFIX)
    publisher: StereoPublisherProcess | None = None
    with RosGraph(name='lsm_bench') as graph:
        try:
            lsm_node = add_remapped_lsm_node(graph, reconstructor, 'lsm_bench', topics)
            product_topics = {key: topic for key, topic in lsm_node.output_topic_names().items()
                              if key != RELATIVE_POSE_TOPIC}
            collector = _ProductTimes(graph.context, product_topics)
            graph.add(collector.node)
            publisher = StereoPublisherProcess(topics, 'lsm_bench_stereo_publisher')
            publisher.wait_connected(collector.connected, 'the product collector', 30.0)
            _log.info('ROS bench: ROS_DOMAIN_ID=%s (localhost only), warm-up pair', environment['ROS_DOMAIN_ID'])
            warmup_stamp, warmup_sent = publisher.publish_warmup_pair(
                lsm_node, lambda stamp: collector.complete_time(stamp) is not None, 'products', warmup_timeout_s,
                poll_s=0.01)
            warmup_latency_s = collector.complete_time(warmup_stamp) - warmup_sent
            lsm_node.wait_idle(warmup_timeout_s)
            rss_after_warmup = current_rss_bytes()
            before = lsm_node.statistics()

            if max_other_cores is not None:
                wait_for_quiet(max_other_cores)
            _log.info('ROS bench: streaming at %.1f Hz for %.1f s', rate_hz, duration_s)
            publisher.call('publish_infos', time.time_ns())
            time.sleep(0.1)                                   # fresh CameraInfo before the stream's first images
            cpu = CpuSnapshot.now(publisher.pid)
            sent = publisher.call('stream', rate_hz, duration_s, timeout_s=duration_s + 60.0)
            lsm_node.wait_idle(drain_timeout_s)
            last_stamp = max(sent)
            wait_until(lambda: any(collector.complete_time(s) is not None for s in sent if s >= last_stamp), 5.0,
                       poll_s=0.01)
            time.sleep(0.5)                                   # the last products of every topic settle
            rss_after_stream = current_rss_bytes()
            other_cores = cpu.other_processes_cores()
            after = lsm_node.statistics()
        finally:
            if publisher is not None:
                publisher.close()
    done = sorted((stamp, collector.complete_time(stamp)) for stamp in sent)
    done = [(stamp, complete) for stamp, complete in done if complete is not None]
    result = RosBenchResult(
        rate_hz=rate_hz, duration_s=duration_s, published=len(sent), processed=len(done),
        latencies_s=[complete - sent[stamp] for stamp, complete in done],
        completion_times_s=[complete for _, complete in done],
        node_statistics=statistics_difference(before, after), products=sorted(product_topics.values()),
        rss_after_warmup_bytes=rss_after_warmup, rss_after_stream_bytes=rss_after_stream,
        warmup_latency_s=warmup_latency_s, other_processes_cores=other_cores)
    return dict(result.to_dict(), ros_environment=environment)


BENCH_STEREO_PREFIX = '/lsm_bench/stereo'


class _ProductTimes:
    """Subscribes to the node's products and keeps, per stamp, when each product arrived (monotonic)."""

    def __init__(self, context: Any, topics: Mapping[str, str]) -> None:
        from geometry_msgs.msg import PoseStamped
        from rclpy.node import Node
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image, PointCloud2

        from lsm_ros.msg import ReconstructionInfo
        from lsm_ros.ros import node as lsm

        types = {lsm.POINTS_TOPIC: PointCloud2, lsm.LEFT_DEPTH_TOPIC: Image, lsm.RIGHT_DEPTH_TOPIC: Image,
                 lsm.LEFT_MODEL_INFO_TOPIC: CameraInfo, lsm.RIGHT_MODEL_INFO_TOPIC: CameraInfo,
                 lsm.RELATIVE_POSE_TOPIC: PoseStamped, lsm.INFO_TOPIC: ReconstructionInfo,
                 lsm.SEMANTIC_LABELS_TOPIC: Image, lsm.SEMANTIC_OVERLAY_TOPIC: Image}
        self.node = Node('lsm_bench_product_collector', context=context)
        # per-pair products only (the latched ~/semantic/label_info is published once, not per pair)
        self.topics = {key: topic for key, topic in topics.items() if key in types}
        self._arrivals: dict[int, dict[str, float]] = {}
        self._lock = threading.Lock()
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        for key, topic in self.topics.items():
            self.node.create_subscription(types[key], topic, self._arrived(key), qos)

    def _arrived(self, key: str) -> Callable[[Any], None]:
        from lsm_ros.ros.conversions import stamp_to_nanoseconds

        def callback(msg: Any) -> None:
            now = time.monotonic()
            with self._lock:
                self._arrivals.setdefault(stamp_to_nanoseconds(msg.header.stamp), {}).setdefault(key, now)
        return callback

    def connected(self) -> bool:
        return all(self.node.count_publishers(topic) > 0 for topic in self.topics.values())

    def complete_time(self, stamp_ns: int) -> float | None:
        """When the last product of ``stamp_ns`` arrived; None while one is missing."""
        with self._lock:
            arrivals = self._arrivals.get(stamp_ns, {})
            return max(arrivals.values()) if len(arrivals) == len(self.topics) else None


def format_ros_table(report: Mapping[str, Any]) -> str:
    """Markdown table of the ROS mode's figures."""
    def ms(value: float | None) -> str:
        return 'n/a' if value is None else f'{value:.0f} ms'

    latency = report['latency_ms'] or {'median': None, 'p95': None}
    ratio = report['last_latency_over_service']
    rows = [
        '| ROS path (lsm_node on loopback) | value |', '|---|---:|',
        f'| input | stereo pairs + CameraInfo at {report["rate_hz"]:g} Hz for {report["duration_s"]:g} s |',
        f'| pairs published / processed / dropped | {report["published"]} / {report["processed"]} / '
        f'{report["dropped"]} |',
        f'| dropped: replaced while waiting (latest pair wins) / rejected by the node / never paired (transport, '
        f'sync) | {report["node_worker_dropped"]} / {sum(report["node_rejected"].values())} / '
        f'{report["published"] - report["node_pairs_formed"]} |',
        f'| latency publish → all products, median / p95 | {ms(latency["median"])} / {ms(latency["p95"])} |',
        f'| latency max / last processed pair | {ms(report["max_latency_ms"])} / {ms(report["last_latency_ms"])} |',
        f'| node time per pair when busy (median gap between completions) | {ms(report["service_time_ms"])} |',
        f'| last pair latency / time per pair | {"n/a" if ratio is None else f"{ratio:.2f}"} |',
        f'| warm-up pair latency | {ms(report["warmup_latency_ms"])} |',
        f'| RSS after warm-up → after stream (growth) | {report["rss_after_warmup_mib"]:.0f} → '
        f'{report["rss_after_stream_mib"]:.0f} MiB ({report["rss_growth_mib"]:+.0f} MiB) |',
        f'| cores kept busy by other processes meanwhile | {report["other_processes_cores"]:.2f} |',
    ]
    return '\n'.join(rows)


# ---------------------------------------------------------------------------------------------- building
def build_bench_reconstructor(*, quick: bool, device: str, precision: str,
                              checkpoints: Mapping[str, str] | None = None, cuda_graphs: bool = False,
                              cuda_streams: bool = False) -> Reconstructor:
    """The reconstructor of a bench run: the tiny random LSM (``quick``), the official files when given, else
    the full-size LSM with the reference weights, or seeded random weights when the reference folder is absent.
    ``cuda_graphs`` / ``cuda_streams``: the PipelineConfig options (CUDA only)."""
    from lsm_ros.model.lsm import LsmConfig
    overrides: dict[str, Any] = dict(device=device, precision=precision, cuda_graphs=cuda_graphs,
                                     cuda_streams=cuda_streams)
    if quick:
        return Reconstructor.from_config(LsmConfig.tiny(), **overrides)
    if checkpoints and any(checkpoints.values()):
        return Reconstructor.from_checkpoints(**checkpoints, **overrides)   # it reads '' as None
    reference_dir = find_reference_dir()
    if reference_dir is not None:
        return Reconstructor.from_reference(reference_dir, **overrides)
    _log.warning('reference folder not found: the bench runs the full-size LSM with seeded random weights')
    return Reconstructor.from_config(LsmConfig(), **overrides)


# ---------------------------------------------------------------------------------------------- command
ROS_SIZES = ('224', '256', '512x384')   # what the node makes of the synthetic rig's 4:3 images


def _bench_error(message: str) -> SystemExit:
    return SystemExit(f'lsm-ros bench: {message}')


def run_bench_command(args: Any) -> int:
    """``lsm-ros bench``: check the options, build the model, run the chosen mode, print its markdown table and
    write the JSON report (``--json``)."""
    from lsm_ros.pipeline import resolve_device

    if args.ros:
        sizes = args.resolutions or [parse_model_size('224' if args.quick else '256')]
        if len(sizes) != 1 or str(sizes[0]) not in {str(parse_model_size(s)) for s in ROS_SIZES}:
            raise _bench_error(f'--ros runs one size of {", ".join(ROS_SIZES)}, got '
                               f'{" ".join(s.label for s in sizes)}')
    else:
        sizes = args.resolutions or [parse_model_size(s) for s in DEFAULT_SIZES]
        if args.images not in IMAGE_SOURCES:
            raise _bench_error(f'--images {args.images}: choose from {", ".join(IMAGE_SOURCES)}')
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise _bench_error(f'--device: {exc}') from None
    precisions = list(dict.fromkeys(_as_list(args.precision) or [PipelineConfig().precision]))
    for precision in precisions:
        try:
            check_precision(precision, device)
        except ValueError as exc:
            raise _bench_error(f'--precision: {exc}') from None
    if args.ros and len(precisions) != 1:
        raise _bench_error(f'--ros runs one precision, got {" ".join(precisions)}')
    if args.quick and (args.lsm_checkpoint or args.dust3r_checkpoint or args.lseg_checkpoint):
        raise _bench_error('--quick runs the tiny random model: leave out the checkpoint files')
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    image_source, images = None, []
    if not args.ros:
        try:
            image_source, images = load_image_pairs(args.images)
        except FileNotFoundError as exc:
            raise _bench_error(str(exc)) from None

    reconstructor = build_bench_reconstructor(
        quick=args.quick, device=str(device), precision=precisions[0],
        checkpoints=dict(lsm=args.lsm_checkpoint, dust3r=args.dust3r_checkpoint, lseg=args.lseg_checkpoint),
        cuda_graphs=bool(getattr(args, 'cuda_graphs', False)), cuda_streams=bool(getattr(args, 'cuda_streams', False)))
    if not reconstructor.semantic:
        raise _bench_error(f'{reconstructor.weights} is the geometry-only network: the bench needs the full LSM '
                           '(pass --lsm-checkpoint checkpoint-final.pth)')
    report: dict[str, Any] = dict(
        mode='ros' if args.ros else 'stages', model='tiny (LsmConfig.tiny(), random weights)' if args.quick else
        'full size', weights=reconstructor.weights, trained_weights=reconstructor.trained_weights,
        precision=precisions[0], network_precisions=dict(reconstructor.precisions), threads=torch.get_num_threads(),
        cuda_graphs=reconstructor.config.cuda_graphs, cuda_streams=reconstructor.config.cuda_streams,
        machine=machine_description(device))
    if args.ros:
        reconstructor.config = replace(reconstructor.config, resolution=sizes[0].resolution)
        report.update(size=str(sizes[0]), ros=run_ros_bench(reconstructor, rate_hz=args.rate,
                                                             duration_s=args.duration,
                                                             max_other_cores=args.max_other_cores))
        table = format_ros_table(report['ros'])
    else:
        report.update(images=image_source, image_pairs=[pair.name for pair in images], warmup=args.warmup,
                      pairs=args.pairs)
        runs = []
        for precision in precisions:          # one model, its precision switched (set_precision) between runs
            reconstructor.set_precision(precision)
            run = dict(precision=precision, network_precisions=dict(reconstructor.precisions))
            run.update(run_stage_bench(reconstructor, sizes, pairs=args.pairs, warmup=args.warmup, images=images,
                                       max_other_cores=args.max_other_cores))
            runs.append(run)
        report.update(runs[0])                # the first precision's figures at the top level, every one in runs
        report['runs'] = runs
        table = '\n\n'.join(f'{format_run_heading(run)}\n\n{format_stage_table(run)}' for run in runs)
    report['machine']['load_average_after'] = [round(v, 2) for v in os.getloadavg()]
    print(format_heading(report))
    print()
    print(table)
    if args.json:
        from lsm_ros.io import write_json
        _log.info('wrote %s', write_json(args.json, report))
    return 0


def _as_list(value: Any) -> list[Any]:
    """An option that may be given once or several times as a list (None: empty)."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def format_run_heading(run: Mapping[str, Any]) -> str:
    """The lines above one precision's stage table: its precisions and the composition check."""
    check = run['composition_check']
    return (f'**precision {run["precision"]}** ('
            + ', '.join(f'{network} {value}' for network, value in run['network_precisions'].items()) + ')  \n'
            f'composed stages == Reconstructor.reconstruct/render at {check["size"]}: '
            + ('bit-identical' if check['identical'] else 'max relative difference '
               f'{max(check["max_relative_difference"].values()):.2g}'))


def format_heading(report: Mapping[str, Any]) -> str:
    """Markdown lines saying what was measured, on what."""
    machine = report['machine']
    runs = report.get('runs') or [report]
    lines = [f'**lsm-ros bench ({report["mode"]})**: {report["model"]} LSM, weights {report["weights"]}'
             f'{"" if report["trained_weights"] else " (UNTRAINED)"}; precision '
             + '; '.join(f'{run["precision"]} (' + ', '.join(f'{network} {value}' for network, value
                                                          in run['network_precisions'].items()) + ')'
                         for run in runs),
             f'machine: {machine["cpu"]} ({" ".join(machine["cpu_flags"]) or "no AVX2, AVX-512 or AMX"}), '
             f'{machine["cpu_cores"]} cores, torch {machine["torch"]}, {report["threads"]} threads, device '
             f'{machine["device"]}'
             f'{" (" + machine["accelerator"] + ")" if machine["accelerator"] else ""}, load average '
             f'{machine["load_average"][0]} before / {machine["load_average_after"][0]} after']
    if report['mode'] == 'stages':
        lines.append(f'images: {report["images"]} ({len(report["image_pairs"])} pair(s), cycled); '
                     f'{report["warmup"]} warm-up + {report["pairs"]} timed pairs per size; CUDA graphs '
                     f'{"on" if report.get("cuda_graphs") else "off"}, CUDA streams '
                     f'{"on" if report.get("cuda_streams") else "off"} (CUDA only)')
    else:
        lines.append(f'model size {report["size"]}; ROS isolation: '
                     + ', '.join(f'{k}={v}' for k, v in report['ros']['ros_environment'].items()))
    return '  \n'.join(lines)
