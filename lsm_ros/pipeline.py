"""Framework-free pipeline: two RGB images in, a typed reconstruction out (no ROS).

One feed-forward pass of the Large Spatial Model gives both point maps in view 1's frame, the semantic
Gaussians (one per pixel of both views) and, on request, language-queried labels; the cameras come from the
same pass (focal by Weiszfeld, relative pose by a RANSAC of batched PnP hypotheses, all in torch on the
device), or from given intrinsics; a calibrated stereo baseline makes the result metric (a rectified rig: pose
from the calibration, scale from a dense robust fit of the point maps against the baseline). All 3-D quantities
are in the left (view 1) camera's optical frame (REP 103: x right, y down, z forward).

    from lsm_ros.pipeline import Reconstructor
    rec = Reconstructor.from_checkpoints(lsm='checkpoint-final.pth', dust3r='DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth',
                                         lseg='demo_e200.ckpt', device='cuda')
    result = rec.reconstruct(left_rgb, right_rgb)                 # numpy HxWx3 uint8, any size
    result.depth_1, result.K_1, result.T_1_2, result.points()     # numpy
    result.gaussians.means, result.gaussians.features             # (2HW, 3), (2HW, 64)
    labels = rec.query(result, ['chair', 'table']).labels         # (2, H, W) phrase index per pixel

On CUDA a pair stays on the device from the networks to its products, which are copied to the host once at the
end; the Gaussians' device tensors are kept for query/render (the last DEVICE_CACHE_ENTRIES reconstructions,
dropped by ``offload``). ``precision`` picks each network's arithmetic per device (:func:`network_precisions`;
reduced networks keep their weights reduced on CUDA); ``cuda_graphs`` and ``cuda_streams`` (PipelineConfig, CUDA
only, no-ops on the CPU) replay DUSt3R/LSeg from CUDA graphs and overlap LSeg with DUSt3R and PTv3 with the cameras.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from lsm_ros import cameras
from lsm_ros.config import PipelineConfig
from lsm_ros.model import Dust3rConfig, Dust3rNet, load_dust3r_checkpoint
from lsm_ros.model.capture import GraphCache
from lsm_ros.model.checkpoint import CheckpointError
from lsm_ros.model.layers import check_precision
from lsm_ros.model.lseg import LSEG_LOGIT_SCALE
from lsm_ros.model.lsm import LargeSpatialModel, LsmConfig
from lsm_ros.preprocess import ImageCrop, preprocess_pair
from lsm_ros.rendering import Backend, render_gaussians
from lsm_ros.semantics import NO_LABEL, QueryResult, validate_phrases

_log = logging.getLogger(__name__)

NETWORK_OUTPUT_KEYS = ('pts3d_1', 'conf_1', 'pts3d_2', 'conf_2')
# Estimated focals are clipped to this range, in units of the focal of a 60-degree field of view.
FOCAL_BOUNDS = (0.1, 10.0)
# The precision each dense network runs in, per PipelineConfig.precision, on the CPU. MEASURED ON THE CPU, on the
# reference pair against fp32: DUSt3R in bf16 moves the ray depth of 18 % (view 1) and 34 % (view 2) of the pixels
# by more than 1 %, so it stays fp32 there; LSeg in bf16 (feature cosine >= 0.9999, labels agree on >= 99 %) and
# both networks in fp16 (emulated on the CPU: depth within 1 % on all but a few pixels, at most 1.2 %) run reduced.
NETWORK_PRECISIONS = {'fp32': {'dust3r': 'fp32', 'lseg': 'fp32'},
                      'bf16': {'dust3r': 'fp32', 'lseg': 'bf16'},
                      'fp16': {'dust3r': 'fp16', 'lseg': 'fp16'}}
# The same choice on CUDA. NOT MEASURED ON A GPU YET: it repeats the CPU measurement until the GPU check
# (scripts/gpu_check.sh; bounds: depth within 1 % of fp32 on >= 99 % of the pixels, labels >= 98 % in agreement)
# decides per network; edit this table with its figures.
CUDA_NETWORK_PRECISIONS = {precision: dict(parts) for precision, parts in NETWORK_PRECISIONS.items()}
# Where a network runs reduced on CUDA, its matrix-product and convolution weights are stored in this dtype.
STORED_WEIGHT_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}
# Modules whose weights autocast casts anyway (so storing them reduced changes no result); norms stay float32.
_CAST_MODULES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
                 torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
DEVICE_CACHE_ENTRIES = 2   # Gaussian clouds whose device tensors are kept (the latest and the one being served)


def store_weights(module: torch.nn.Module, dtype: torch.dtype | None, masters: dict[str, torch.Tensor],
                  prefix: str = '') -> None:
    """Store the weights and biases of ``module``'s linear and convolution layers in ``dtype`` (their float32
    values saved in ``masters``, on the host, under ``prefix.<module>.<name>``), or with ``dtype`` None give back
    the float32 values saved there (exactly). Norms, embeddings and other parameters keep their dtype. Under an
    autocast of the same dtype the layers compute what they computed from float32 weights."""
    for module_name, submodule in module.named_modules():
        if not isinstance(submodule, _CAST_MODULES):
            continue
        for param_name, param in submodule.named_parameters(recurse=False):
            key = f'{prefix}.{module_name}.{param_name}'
            if dtype is not None and param.dtype != dtype:
                master = masters.setdefault(key, param.detach().to('cpu', copy=True))
                param.data = master.to(device=param.device, dtype=dtype)   # from float32, also bf16 <-> fp16
            elif dtype is None and key in masters:
                param.data = masters.pop(key).to(param.device)


def network_precisions(precision: str, device: torch.device | str) -> dict[str, str]:
    """{'dust3r': ..., 'lseg': ...}: the precision each dense network runs in for ``precision`` on ``device``
    (:data:`NETWORK_PRECISIONS` on the CPU, :data:`CUDA_NETWORK_PRECISIONS` on CUDA)."""
    table = CUDA_NETWORK_PRECISIONS if torch.device(device).type == 'cuda' else NETWORK_PRECISIONS
    if precision not in table:
        raise ValueError(f'unknown precision {precision!r}: choose among {list(table)}')
    return dict(table[precision])


def resolve_device(device: str) -> torch.device:
    """'auto' → CUDA when available, else CPU; anything else is checked (clear error for a missing GPU)."""
    if device in ('', 'auto'):
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {device!r} requested but CUDA is not available (use device=cpu or auto)')
    return dev


@dataclass(frozen=True)
class CameraCalibration:
    """Intrinsics of the input images (input pixel units, before pre-processing) and an optional baseline.

    ``K_left``/``K_right``: 3x3 pinhole matrices of the *input* images (e.g. CameraInfo.k, or .p[:3,:3] of a
    rectified stereo pair). ``baseline_m``: metres between the two optical centres of a calibrated stereo rig
    (CameraInfo right ``P[0,3] = -fx*B``); when given, the reconstruction is scaled to metres.
    ``rectified_stereo``: the pair is a calibrated, rectified stereo rig (the right camera at ``(baseline_m, 0, 0)``
    in the left frame, R = I; see :func:`lsm_ros.cameras.is_rectified_stereo_rig`): the relative pose then comes
    from the calibration and the metric scale from a dense fit of the point map against the baseline
    (:func:`lsm_ros.cameras.stereo_rig_scale`), not from PnP. Needs ``K_right`` and ``baseline_m``.
    """

    K_left: np.ndarray | None = None
    K_right: np.ndarray | None = None
    baseline_m: float | None = None
    source: str = 'given'
    rectified_stereo: bool = False

    def __post_init__(self) -> None:
        for name in ('K_left', 'K_right'):
            K = getattr(self, name)
            if K is None:
                continue
            object.__setattr__(self, name, checked_pinhole_matrix(K, name))
        if self.baseline_m is not None and not (np.isfinite(self.baseline_m) and self.baseline_m > 0):
            raise ValueError(f'baseline_m must be a positive finite number of metres, got {self.baseline_m!r}')
        if self.rectified_stereo and (self.baseline_m is None or self.K_right is None):
            raise ValueError('rectified_stereo needs baseline_m and K_right (the rig\'s calibration)')


def checked_pinhole_matrix(K: Any, name: str) -> np.ndarray:
    """``K`` as a float64 (3, 3) array; ValueError unless it is finite with fx, fy > 0."""
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3) or not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f'{name} must be a finite 3x3 pinhole matrix with fx, fy > 0, got {K!r}')
    return K


@dataclass
class GaussianCloud:
    """LSM's pixel-aligned semantic Gaussians: N = 2·H·W rows, view 1's pixels row-major then view 2's (row k is
    the pixel ``Reconstruction.points()['index'] == k``). View 1's optical frame, scaled like the point maps."""

    means: np.ndarray        # (N,3) float32 centres
    scales: np.ndarray       # (N,3) float32 standard deviations along the Gaussian's axes
    rotations: np.ndarray    # (N,4) float32 unit quaternions, real part last (x, y, z, w)
    opacities: np.ndarray    # (N,1) float32 in (0,1)
    sh: np.ndarray           # (N,16,3) float32 degree-3 SH colour coefficients (DC first), RGB last
    features: np.ndarray     # (N,64) float32 semantic feature (decoded against text with Reconstructor.query)

    def __len__(self) -> int:
        return len(self.means)


@dataclass
class Reconstruction:
    """One reconstruction of an image pair, at the model resolution (H, W).

    Frames: every 3-D quantity is in view 1's (left) camera optical frame. Units: metres when
    ``metric_scale`` (``scale_factor`` metres per model unit already applied), else the model's units.
    """

    pts3d_1: np.ndarray            # (H, W, 3) view 1's pixels, view 1's frame, scaled
    pts3d_2: np.ndarray            # (H, W, 3) view 2's pixels, view 1's frame, scaled
    conf_1: np.ndarray             # (H, W) DUSt3R confidence >= 1
    conf_2: np.ndarray             # (H, W)
    depth_1: np.ndarray            # (H, W) z in view 1's frame, NaN where invalid or below min_confidence
    depth_2: np.ndarray            # (H, W) z in view 2's own frame, NaN where invalid
    K_1: np.ndarray                # (3, 3) intrinsics of view 1 at model resolution
    K_2: np.ndarray                # (3, 3) intrinsics of view 2 at model resolution
    T_1_2: np.ndarray              # (4, 4) pose of camera 2 in camera 1's frame (X_1 = T_1_2 X_2), scaled
    image_1: np.ndarray            # (H, W, 3) uint8 model image of view 1
    image_2: np.ndarray            # (H, W, 3) uint8
    crop_1: ImageCrop
    crop_2: ImageCrop
    metric_scale: bool
    scale_factor: float
    scale_source: str              # 'stereo_rig' (dense fit, rectified rig), 'stereo_baseline' (PnP |t|) or 'none'
    intrinsics_source: str         # 'camera_info', 'given' or 'estimated'
    pose: cameras.RelativePose
    network_outputs: dict[str, np.ndarray]   # raw, unscaled: pts3d_1, conf_1, pts3d_2, conf_2 (batch axis 1)
    weights: str                   # description of the weights used
    trained_weights: bool
    timings_s: dict[str, float] = field(default_factory=dict)
    min_confidence: float = 1.0
    gaussians: GaussianCloud | None = None   # the semantic Gaussians (full LSM only), same frame and scale
    pose_source: str = 'pnp'       # 'stereo_calibration' (rectified rig) or 'pnp' (estimated from the point map)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the model images."""
        return self.depth_1.shape[1], self.depth_1.shape[0]

    @property
    def baseline(self) -> float:
        """Distance between the two camera centres (metres when metric_scale)."""
        return float(np.linalg.norm(self.T_1_2[:3, 3]))

    def points(self, min_confidence: float | None = None, stride: int = 1) -> dict[str, np.ndarray]:
        """Both views' points merged (view 1 then view 2, row-major), in view 1's frame.

        Returns ``xyz`` (N,3) float32, ``rgb`` (N,3) uint8, ``confidence`` (N,) float32, ``view`` (N,) uint8 and
        ``index`` (N,) int64, the flat pixel index ``v*H*W + r*W + c`` (the row of the pixel's Gaussian);
        non-finite points and those below ``min_confidence`` (default: the pipeline's) are dropped.
        """
        thr = self.min_confidence if min_confidence is None else min_confidence
        height, width = self.conf_1.shape
        flat_index = np.arange(2 * height * width, dtype=np.int64).reshape(2, height, width)
        parts = []
        for view, (pts, conf, img) in enumerate(((self.pts3d_1, self.conf_1, self.image_1),
                                                 (self.pts3d_2, self.conf_2, self.image_2))):
            pts, conf, img = pts[::stride, ::stride], conf[::stride, ::stride], img[::stride, ::stride]
            index = flat_index[view, ::stride, ::stride]
            keep = np.isfinite(pts).all(axis=-1) & (conf >= thr)
            parts.append((pts[keep], img[keep], conf[keep], np.full(int(keep.sum()), view, np.uint8), index[keep]))
        return dict(xyz=np.concatenate([p[0] for p in parts]).astype(np.float32),
                    rgb=np.concatenate([p[1] for p in parts]).astype(np.uint8),
                    confidence=np.concatenate([p[2] for p in parts]).astype(np.float32),
                    view=np.concatenate([p[3] for p in parts]),
                    index=np.concatenate([p[4] for p in parts]))


RENDER_CHANNELS: tuple[str, ...] = ('rgb', 'depth', 'alpha', 'features')
DEPTH_MIN_ALPHA = 0.5  # rendered depth is NaN where the accumulated opacity is below this
MAX_RENDER_SIZE = 4096


@dataclass
class RenderedView:
    """One view rendered from a reconstruction's Gaussians. Camera: ``T_left_camera`` (4,4), the pose of the
    virtual camera in the left optical frame (X_left = T X_cam; REP 103 optical axes), pinhole ``K`` (3,3) with
    pixel centres at integer coordinates (OpenCV). Lengths in the reconstruction's units."""

    width: int
    height: int
    K: np.ndarray
    T_left_camera: np.ndarray
    alpha: np.ndarray                       # (H,W) float32 accumulated opacity in [0,1]
    rgb: np.ndarray | None = None           # (H,W,3) float32 in [0,1]
    depth: np.ndarray | None = None         # (H,W) float32 expected camera z, NaN where alpha < DEPTH_MIN_ALPHA
    features: np.ndarray | None = None      # (H,W,64) float32 rendered semantic features
    phrases: tuple[str, ...] = ()
    label_logits: np.ndarray | None = None  # (P,H,W) float32 LSM's decoding of ``features`` against ``phrases``

    @property
    def labels(self) -> np.ndarray | None:
        """(H,W) uint8 index of the best phrase; NO_LABEL where nothing was rendered (alpha < DEPTH_MIN_ALPHA)."""
        if self.label_logits is None:
            return None
        labels = self.label_logits.argmax(axis=0).astype(np.uint8)
        labels[self.alpha < DEPTH_MIN_ALPHA] = NO_LABEL
        return labels


class Reconstructor:
    """Runs the networks and the camera recovery on image pairs.

    The network is either the full :class:`LargeSpatialModel` (geometry, semantics, Gaussians, text queries) or,
    when only a DUSt3R file is given, the geometry network alone. Build it with :meth:`from_checkpoints`
    (official files), :meth:`from_reference` (the parity reference's untrained weights) or :meth:`from_config`
    (random weights, for tests), then call :meth:`reconstruct` and :meth:`query`. :meth:`reconstruct` is for one
    worker thread at a time; :meth:`query` may run concurrently with it (e.g. from a ROS service callback).
    """

    def __init__(self, network: Dust3rNet | LargeSpatialModel, config: PipelineConfig, *,
                 device: torch.device | str = 'cpu', weights: str = 'unknown', trained_weights: bool = True) -> None:
        self.config = config
        self.device = torch.device(device)
        check_precision(config.precision, self.device)
        self.network = network.to(self.device).eval().requires_grad_(False)   # inference only
        self.weights = weights
        self.trained_weights = trained_weights
        self._render_lock = threading.Lock()
        # id(cloud) -> (weak reference to the cloud, its tensors on the device), least recently used first
        self._device_cache: OrderedDict[int, tuple[weakref.ref, dict[str, torch.Tensor]]] = OrderedDict()
        self._offloaded = False
        self._fp32_weights: dict[str, torch.Tensor] = {}   # host masters of weights stored reduced (set_precision)
        cuda = self.device.type == 'cuda'
        self._graphs = GraphCache(bool(config.cuda_graphs) and cuda)
        self._semantic_stream = torch.cuda.Stream(self.device) if config.cuda_streams and cuda else None
        if (config.cuda_graphs or config.cuda_streams) and not cuda:
            _log.info('cuda_graphs/cuda_streams apply on CUDA only: running eagerly on one stream on %s', self.device)
        if not trained_weights:
            _log.warning('UNTRAINED WEIGHTS (%s): outputs are not a real reconstruction. Pass the official '
                         'checkpoints for real results.', weights)
        self.precisions: dict[str, str] = {}
        self.set_precision(config.precision)

    # ------------------------------------------------------------------------------------------ precision
    def set_precision(self, precision: str) -> None:
        """Run the dense networks in ``precision`` from now on (PipelineConfig.precision; the node reads it once,
        the bench switches between its runs). On CUDA a network that runs reduced (:data:`CUDA_NETWORK_PRECISIONS`)
        has its matrix-product and convolution weights stored in that dtype (autocast would cast them on every
        pass; the result is the same), their float32 values kept on the host so that a switch back restores them
        exactly. On the CPU the weights stay float32 (autocast casts them, as before)."""
        check_precision(precision, self.device)
        self._require_loaded()
        precisions = network_precisions(precision, self.device)
        self._graphs.clear()                                 # graphs hold the weights' addresses and dtypes
        for name, module in self._precision_modules().items():
            dtype = STORED_WEIGHT_DTYPES.get(precisions[name]) if self.device.type == 'cuda' else None
            store_weights(module, dtype, self._fp32_weights, prefix=name)
        self.config = replace(self.config, precision=precision)
        self.precisions = precisions
        if precision != 'fp32':
            _log.info('precision %s: DUSt3R in %s, LSeg in %s (approximate; precision=fp32 is exact)%s',
                      precision, precisions['dust3r'], precisions['lseg'],
                      '; reduced weights stored reduced' if self._fp32_weights else '')

    def _precision_modules(self) -> dict[str, torch.nn.Module]:
        """The dense networks, by their key in :data:`NETWORK_PRECISIONS`."""
        if self.semantic:
            return {'dust3r': self.network.dust3r, 'lseg': self.network.lseg}
        return {'dust3r': self.network}

    @property
    def semantic(self) -> bool:
        """True when the full LSM is loaded (Gaussians, labels and text queries available)."""
        return isinstance(self.network, LargeSpatialModel)

    # ------------------------------------------------------------------------------------------ accelerator memory
    @property
    def offloaded(self) -> bool:
        """True between :meth:`offload` (on CUDA) and :meth:`reload`: the network is on the CPU, not usable."""
        return self._offloaded

    def offload(self) -> bool:
        """Free accelerator memory: on CUDA, move the network to the CPU, drop the Gaussians' device tensors and the
        captured CUDA graphs and return torch's cached CUDA blocks to the driver (True; call :meth:`reload` before
        the next reconstruct, query or render). On the CPU there is nothing to free and the model stays usable
        (False)."""
        if self.device.type != 'cuda':
            return False
        with self._render_lock:
            self._device_cache.clear()
        self._graphs.clear()
        self.network.to('cpu')
        self._offloaded = True
        torch.cuda.empty_cache()
        _log.info('network moved off %s (accelerator memory released)', self.device)
        return True

    def reload(self) -> None:
        """Move an offloaded network back to its device (nothing to do otherwise)."""
        if self._offloaded:
            self._graphs.clear()
            self.network.to(self.device)
            self._offloaded = False

    def _require_loaded(self) -> None:
        if self._offloaded:
            raise RuntimeError(f'the network is offloaded from {self.device} to free its memory: reload() first')

    # ------------------------------------------------------------------------------------------ builders
    @classmethod
    def from_checkpoints(cls, dust3r: str | None = None, lseg: str | None = None, lsm: str | None = None, *,
                         config: PipelineConfig | None = None, **overrides: Any) -> 'Reconstructor':
        """Load the official checkpoint files.

        With ``lsm`` (checkpoint-final.pth): the full LSM; DUSt3R and LSeg come from ``dust3r``
        (DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth) and ``lseg`` (demo_e200.ckpt), or from the files the LSM
        file's config names (as given, else next to it), as the official ``LSM_Dust3R.from_pretrained`` does.
        With ``dust3r`` alone: geometry only (no Gaussians, labels or queries). ``config``/``overrides``:
        :class:`PipelineConfig` fields.
        """
        config = replace(config or PipelineConfig(), **overrides)
        dust3r = dust3r or config.dust3r_checkpoint or None
        lseg = lseg or config.lseg_checkpoint or None
        lsm = lsm or config.lsm_checkpoint or None
        device = resolve_device(config.device)
        t0 = time.perf_counter()
        if lsm is not None:
            network = LargeSpatialModel.from_official_checkpoints(dust3r=dust3r, lseg=lseg, lsm=lsm, device='cpu')
            weights = str(lsm)
        elif dust3r is not None:
            if lseg is not None:
                _log.warning('an LSeg file without the LSM checkpoint: running geometry only (pass lsm=... for '
                             'Gaussians, labels and queries)')
            network = load_dust3r_checkpoint(dust3r, device='cpu')
            weights = str(dust3r)
        else:
            raise CheckpointError('no checkpoint given: pass lsm=checkpoint-final.pth (full LSM; with dust3r= and '
                                  'lseg= unless its config names existing files) or dust3r=... (geometry only)')
        _log.info('loaded %s in %.1f s', weights, time.perf_counter() - t0)
        config = replace(config, dust3r_checkpoint=str(dust3r or ''), lseg_checkpoint=str(lseg or ''),
                         lsm_checkpoint=str(lsm or ''))
        return cls(network, config, device=device, weights=weights, trained_weights=True)

    @classmethod
    def from_config(cls, network_config: Dust3rConfig | LsmConfig | None = None, *, seed: int = 0,
                    config: PipelineConfig | None = None, **overrides: Any) -> 'Reconstructor':
        """Random weights (seeded) at any size: a :class:`LsmConfig` builds the full LSM, a
        :class:`Dust3rConfig` geometry only (default: the full-size LSM). For tests and demos: untrained."""
        config = replace(config or PipelineConfig(), **overrides)
        network_config = network_config or LsmConfig()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = LargeSpatialModel(network_config) if isinstance(network_config, LsmConfig) \
                else Dust3rNet(network_config)
        return cls(network, config, device=resolve_device(config.device),
                   weights=f'random (seed {seed})', trained_weights=False)

    @classmethod
    def from_reference(cls, reference_dir: Path | None = None, *, config: PipelineConfig | None = None,
                       **overrides: Any) -> 'Reconstructor':
        """The full LSM with the parity reference's deterministic weights (rule lsmref-v1), loaded through the
        official-file code paths. Real network, UNTRAINED outputs."""
        from lsm_ros.reference_weights import find_reference_dir, reference_checkpoints

        reference_dir = reference_dir or find_reference_dir()
        if reference_dir is None:
            raise FileNotFoundError('reference folder not found (../shared/reference/lsm_vitl_256 or '
                                    '$LSM_ROS_REFERENCE)')
        config = replace(config or PipelineConfig(), **overrides)
        files = reference_checkpoints(reference_dir)
        network = LargeSpatialModel.from_official_checkpoints(**files, device='cpu')
        return cls(network, config, device=resolve_device(config.device), trained_weights=False,
                   weights=f'reference weights lsmref-v1 ({reference_dir})')

    # ------------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def infer(self, img1: torch.Tensor, img2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Geometry forward on pre-processed (B,3,H,W) float32 tensors in [-1, 1] (official names), in DUSt3R's
        precision of :func:`network_precisions`; replayed from a CUDA graph with ``cuda_graphs`` on CUDA. The
        outputs stay on the device."""
        img1, img2 = img1.to(self.device), img2.to(self.device)
        precision = self.precisions['dust3r']
        forward = self.network.geometry if self.semantic else self.network
        return self._graphs.run('dust3r', lambda a, b: forward(a, b, precision=precision), (img1, img2), precision)

    @torch.no_grad()
    def _semantics(self, img1: torch.Tensor, img2: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`LargeSpatialModel.semantics` in LSeg's precision (from a CUDA graph with ``cuda_graphs``)."""
        precision = self.precisions['lseg']
        return self._graphs.run('lseg', lambda a, b: self.network.semantics(a, b, precision=precision),
                                (img1, img2), precision)

    @contextmanager
    def _on_semantic_stream(self, *inputs: torch.Tensor) -> Iterator[None]:
        """Run the block on the semantic CUDA stream (``cuda_streams``) after the work queued so far on the current
        stream; ``inputs``, made on the current stream, are recorded as used by the semantic stream (so that the
        allocator does not hand out their memory while it still reads them). Without that stream: nothing."""
        stream = self._semantic_stream
        if stream is None:
            yield
            return
        stream.wait_stream(torch.cuda.current_stream(self.device))
        for tensor in inputs:
            tensor.record_stream(stream)
        with torch.cuda.stream(stream):
            yield

    def _join_semantic_stream(self, tensors: Sequence[torch.Tensor]) -> None:
        """The current stream waits for the semantic stream's work; ``tensors`` made there are recorded as used
        by the current stream."""
        stream = self._semantic_stream
        if stream is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(stream)
        for tensor in tensors:
            tensor.record_stream(current)

    def reconstruct(self, left: np.ndarray, right: np.ndarray,
                    calibration: CameraCalibration | None = None) -> Reconstruction:
        """Reconstruct an image pair (numpy HxWx3 uint8 RGB, HxW mono8 or HxWx4; any size, same for both).

        ``calibration``: known intrinsics of the input images and/or a stereo baseline. Without intrinsics,
        view 1's focal comes from its point map (Weiszfeld) and view 2's from the PnP RANSAC (its hypotheses give the
        focal). A rectified calibrated rig (``calibration.rectified_stereo``) takes its pose from the calibration and
        only its scale from the point maps (no PnP).
        With the full LSM, the result also carries the semantic Gaussians (one per pixel of both views).

        The pair stays on the device from the networks to the products; each product is copied to the host once,
        at the end (the Gaussians' device tensors are kept for :meth:`query` and :meth:`render`). With
        ``cuda_streams`` LSeg runs beside DUSt3R and PTv3 + the Gaussian head beside the camera recovery; with
        ``cuda_graphs`` DUSt3R and LSeg replay CUDA graphs. On CUDA the stage timings are host times (queued, not
        synchronised); ``total`` includes the final copy, so it is the pair's wall time.
        """
        self._require_loaded()
        cfg = self.config
        calibration = calibration or CameraCalibration()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        view1, view2 = preprocess_pair(left, right, cfg.resolution)
        t1 = time.perf_counter()
        timings['preprocess'] = t1 - t0
        img1, img2 = view1.tensor.to(self.device), view2.tensor.to(self.device)
        semantics: dict[str, torch.Tensor] | None = None
        gaussian_tensors: dict[str, torch.Tensor] | None = None
        with torch.no_grad():
            if self.semantic:
                with self._on_semantic_stream(img1, img2):                 # LSeg beside DUSt3R
                    semantics = self._semantics(img1, img2)
                timings['semantics'] = time.perf_counter() - t1
            t2 = time.perf_counter()
            out = self.infer(img1, img2)
            t3 = time.perf_counter()
            timings['network'] = t3 - t2
            if self.semantic:
                with self._on_semantic_stream(*out.values()):              # PTv3 + head beside the cameras
                    gaussian_tensors = self.network.gaussians(img1, img2, out, semantics,
                                                              precision=self.config.precision)
                timings['gaussians'] = time.perf_counter() - t3

        # Camera recovery: pts1, pts2 (H,W,3) and conf1, conf2 (H,W), batch item 0, device tensors. Everything below
        # runs on the device (lsm_ros.cameras' torch cores); the small camera results come to the host once.
        pts1, conf1, pts2, conf2 = (out[key][0] for key in NETWORK_OUTPUT_KEYS)
        height, width = conf1.shape
        t2 = time.perf_counter()

        focal_estimated = None
        if calibration.K_left is not None:
            K_1 = view1.crop.intrinsics_to_model(calibration.K_left)
            intrinsics_source = calibration.source
        else:
            K_1, focal_estimated = cameras.intrinsics_from_points(pts1, *FOCAL_BOUNDS)
            intrinsics_source = 'estimated'
        K_2_known = view2.crop.intrinsics_to_model(calibration.K_right) if calibration.K_right is not None else None
        scale, scale_source, pose_source = 1.0, 'none', 'pnp'
        if calibration.rectified_stereo:   # CameraCalibration ensures baseline_m and K_right
            # Calibrated rectified rig: the pose is the calibration's (right camera at (B, 0, 0) m, R = I); only the
            # scale is fitted. If the point map fits no scale (e.g. untrained weights), the pose stays the
            # calibration's with model units taken as metres, and the result is not metric.
            rig = cameras.stereo_rig_scale(pts2, conf2, K_2_known, calibration.baseline_m).to_numpy()
            T_rig = rig.T_1_2.copy()
            if rig.success:
                scale, scale_source = rig.scale, 'stereo_rig'
                message = f'pose from the rig calibration; {rig.message}'
            else:
                T_rig[0, 3] = calibration.baseline_m
                message = f'pose from the rig calibration, model units taken as metres (not metric): {rig.message}'
                _log.warning('%s', message)
            pose = cameras.RelativePose(
                T_1_2=T_rig, focal_2=float(K_2_known[0, 0]), K_2=K_2_known, num_inliers=rig.num_pixels,
                num_candidates=rig.num_candidates, reprojection_rmse_px=rig.disparity_rmse_px, success=True,
                message=message)
            pose_source = 'stereo_calibration'
        else:
            pose = cameras.relative_pose(
                pts2, conf2, K_2_known, reprojection_error_px=cfg.pose_reprojection_error_px,
                iterations=cfg.pose_ransac_iterations, max_points=cfg.pose_max_points).to_numpy()
        if focal_estimated is not None and not bool(focal_estimated):  # the host already waited for the pose
            _log.warning('focal estimation failed (no usable point): using the 60-degree-FOV focal %.1f px',
                         cameras.reference_focal(height, width))
        K_2 = K_2_known if K_2_known is not None else pose.K_2
        timings['cameras'] = time.perf_counter() - t2

        if calibration.baseline_m is not None and pose_source == 'pnp':
            if pose.success:
                scale = cameras.metric_scale_from_baseline(pose.T_1_2, calibration.baseline_m)
                scale_source = 'stereo_baseline'
            else:
                _log.warning('stereo baseline given but the relative pose failed (%s): scale left in model units',
                             pose.message)
        T_1_2 = pose.T_1_2.copy()
        T_1_2[:3, 3] *= scale
        depth_1 = pts1[..., 2] * scale
        depth_2 = cameras.depth_in_own_frame(pts2, pose.T_1_2) * scale if pose.success else depth_1 * float('nan')
        depth_1 = _masked_depth(depth_1, conf1, cfg.min_confidence)
        depth_2 = _masked_depth(depth_2, conf2, cfg.min_confidence)
        cloud_tensors: dict[str, torch.Tensor] | None = None
        if gaussian_tensors is not None:
            length_scale = float(scale)
            cloud_tensors = {f.name: gaussian_tensors[f.name].detach().float() for f in fields(GaussianCloud)}
            self._join_semantic_stream(list(cloud_tensors.values()))       # made on the semantic stream
            if length_scale != 1.0:
                cloud_tensors['means'] = cloud_tensors['means'] * length_scale
                cloud_tensors['scales'] = cloud_tensors['scales'] * length_scale
        # Every product to the host, once (one synchronisation on CUDA).
        products: dict[str, Any] = dict(
            pts3d_1=pts1 * scale, pts3d_2=pts2 * scale, conf_1=conf1, conf_2=conf2, depth_1=depth_1, depth_2=depth_2,
            K_1=K_1, K_2=K_2, T_1_2=T_1_2, **{f'raw.{key}': out[key] for key in NETWORK_OUTPUT_KEYS},
            **{f'gaussians.{key}': value for key, value in (cloud_tensors or {}).items()})
        host = self._to_host(products, float64=('K_1', 'K_2', 'T_1_2'),
                             shared=tuple(f'gaussians.{key}' for key in cloud_tensors or ()))
        gaussians = None
        if cloud_tensors is not None:
            gaussians = GaussianCloud(**{f.name: host[f'gaussians.{f.name}'] for f in fields(GaussianCloud)})
            self._remember_device_tensors(gaussians, cloud_tensors)
        timings['total'] = time.perf_counter() - t0
        return Reconstruction(
            pts3d_1=host['pts3d_1'], pts3d_2=host['pts3d_2'], conf_1=host['conf_1'], conf_2=host['conf_2'],
            depth_1=host['depth_1'], depth_2=host['depth_2'],
            K_1=host['K_1'], K_2=host['K_2'], T_1_2=host['T_1_2'],
            image_1=view1.rgb, image_2=view2.rgb,
            crop_1=view1.crop, crop_2=view2.crop, metric_scale=scale_source != 'none', scale_factor=float(scale),
            scale_source=scale_source, intrinsics_source=intrinsics_source, pose=pose, pose_source=pose_source,
            network_outputs={key: host[f'raw.{key}'] for key in NETWORK_OUTPUT_KEYS},
            weights=self.weights, trained_weights=self.trained_weights, timings_s=timings,
            min_confidence=cfg.min_confidence, gaussians=gaussians)

    def _to_host(self, values: Mapping[str, Any], float64: Sequence[str] = (), shared: Sequence[str] = ()
                 ) -> dict[str, np.ndarray]:
        """Each value (a tensor on any device, or an array) as a new float32 numpy array (float64 for the keys in
        ``float64``). CUDA tensors are queued into pinned host memory on the current stream and waited for once,
        together. CPU tensors of the keys in ``shared`` are not copied: the array shares their memory (the
        Gaussians, whose tensors the CPU keeps for query/render as they are)."""
        copies: dict[str, Any] = {}
        for key, value in values.items():
            wide = key in float64
            if isinstance(value, torch.Tensor):
                value = value.detach().to(torch.float64 if wide else torch.float32)
                if value.is_cuda:
                    copies[key] = value.to('cpu', non_blocking=True)
                else:
                    copies[key] = value if key in shared else value.clone()
            else:
                copies[key] = np.array(value, dtype=np.float64 if wide else np.float32)
        if any(isinstance(v, torch.Tensor) for v in values.values()) and self.device.type == 'cuda':
            torch.cuda.current_stream(self.device).synchronize()
        return {key: value.numpy() if isinstance(value, torch.Tensor) else value for key, value in copies.items()}

    def _remember_device_tensors(self, cloud: GaussianCloud, tensors: dict[str, torch.Tensor]) -> None:
        """Keep ``cloud``'s tensors on the device for :meth:`query` and :meth:`render` (the last
        DEVICE_CACHE_ENTRIES clouds; :meth:`offload` drops them)."""
        with self._render_lock:
            self._device_cache[id(cloud)] = (weakref.ref(cloud), tensors)
            self._device_cache.move_to_end(id(cloud))
            while len(self._device_cache) > DEVICE_CACHE_ENTRIES:
                self._device_cache.popitem(last=False)

    def query(self, result: Reconstruction, phrases: Sequence[str], views: Sequence[int] = (0, 1)) -> QueryResult:
        """Label a reconstruction with free-text phrases: LSM's decoding of the Gaussian features of the
        requested source views (0 = left/view 1, 1 = right/view 2) and of every Gaussian.

        Raises ValueError for invalid phrases or views, RuntimeError for a geometry-only reconstructor or a
        reconstruction without Gaussians. Safe to call while another thread runs :meth:`reconstruct`.
        """
        if not self.semantic:
            raise RuntimeError('text queries need the full LSM (pass the LSM checkpoint); this reconstructor runs '
                               'geometry only')
        if result.gaussians is None:
            raise RuntimeError('this reconstruction has no Gaussians (made by a geometry-only reconstructor)')
        self._require_loaded()
        phrases = validate_phrases(phrases)
        views = tuple(int(v) for v in views)
        if not views or any(v not in (0, 1) for v in views) or len(set(views)) != len(views):
            raise ValueError(f'views must be distinct values of 0 (left) and 1 (right), got {views}')
        height, width = result.conf_1.shape
        with torch.no_grad():
            text = self.network.text_features(phrases)
            features = self._gaussian_tensors(result.gaussians)['features']    # kept on the device
            view_features = features.view(2, height, width, -1)[list(views)].permute(0, 3, 1, 2)
            logits = self.network.view_label_logits(view_features, text)
            point_logits = self.network.point_label_logits(features, text)
        host = self._to_host(dict(logits=logits, point_logits=point_logits))
        return QueryResult(phrases=phrases, views=views, logits=host['logits'], point_logits=host['point_logits'],
                           logit_scale=LSEG_LOGIT_SCALE)

    def render(self, result: Reconstruction, T_left_camera: np.ndarray | None = None, K: np.ndarray | None = None,
               size: tuple[int, int] | None = None, channels: Sequence[str] = RENDER_CHANNELS,
               phrases: Sequence[str] | None = None, backend: Backend = 'auto') -> RenderedView:
        """Render the reconstruction's Gaussians from any camera: RGB, expected depth, alpha, the 64-d features and,
        with ``phrases``, LSM's label logits of the rendered features (as LSM labels its rendered views).

        Defaults: the left camera (identity pose, ``result.K_1``, the model size (width, height)). ``channels``:
        any of RENDER_CHANNELS (alpha always comes). gsplat on CUDA, the exact PyTorch compositor on CPU.
        Raises ValueError for bad arguments, RuntimeError for a reconstruction without Gaussians.
        """
        if result.gaussians is None:
            raise RuntimeError('this reconstruction has no Gaussians (made by a geometry-only reconstructor)')
        self._require_loaded()
        channels = tuple(channels)
        unknown = sorted(set(channels) - set(RENDER_CHANNELS))
        if unknown:
            raise ValueError(f'unknown render channels {unknown}; choose from {RENDER_CHANNELS}')
        phrases = validate_phrases(phrases) if phrases else ()
        T = np.eye(4) if T_left_camera is None else np.asarray(T_left_camera, dtype=np.float64)
        if T.shape != (4, 4) or not np.isfinite(T).all() or not np.allclose(T[3], (0, 0, 0, 1)) \
                or not np.allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3), atol=1e-5) or np.linalg.det(T[:3, :3]) < 0:
            raise ValueError('T_left_camera must be a finite 4x4 rigid transform (rotation + translation)')
        K = result.K_1 if K is None else checked_pinhole_matrix(K, 'K')
        width, height = result.size if size is None else (int(size[0]), int(size[1]))
        if not (1 <= width <= MAX_RENDER_SIZE and 1 <= height <= MAX_RENDER_SIZE):
            raise ValueError(f'render size {width}x{height} outside 1..{MAX_RENDER_SIZE} pixels per side')
        want_features = 'features' in channels or bool(phrases)
        g = self._gaussian_tensors(result.gaussians)
        with torch.no_grad():
            out = render_gaussians(
                g['means'], g['rotations'], g['scales'], g['opacities'], g['sh'] if 'rgb' in channels else None,
                g['features'] if want_features else None,
                torch.as_tensor(np.linalg.inv(T), dtype=torch.float32, device=self.device),
                torch.as_tensor(K, dtype=torch.float32, device=self.device), width, height, backend=backend)
            label_logits = None
            if phrases:
                features = out.features.permute(2, 0, 1)[None]
                label_logits = self.network.view_label_logits(features, self.network.text_features(phrases))[0]
        wanted = dict(alpha=out.alpha, depth=out.depth if 'depth' in channels else None,
                      rgb=out.rgb if 'rgb' in channels else None,
                      features=out.features if 'features' in channels else None, label_logits=label_logits)
        host = self._to_host({key: value for key, value in wanted.items() if value is not None})   # one copy
        alpha, depth = host['alpha'], host.get('depth')
        if depth is not None:
            depth[alpha < DEPTH_MIN_ALPHA] = np.nan
        return RenderedView(
            width=width, height=height, K=K, T_left_camera=T, alpha=alpha,
            rgb=None if 'rgb' not in host else np.clip(host['rgb'], 0, 1), depth=depth,
            features=host.get('features'), phrases=phrases, label_logits=host.get('label_logits'))

    def _gaussian_tensors(self, cloud: GaussianCloud) -> dict[str, torch.Tensor]:
        """The cloud's arrays as float32 tensors on the device: those kept by :meth:`reconstruct`, else uploaded
        once and kept (the last DEVICE_CACHE_ENTRIES clouds: videos, services)."""
        with self._render_lock:
            entry = self._device_cache.get(id(cloud))
            if entry is not None and entry[0]() is cloud:
                self._device_cache.move_to_end(id(cloud))
                return entry[1]
        tensors = {f.name: torch.from_numpy(np.array(getattr(cloud, f.name), dtype=np.float32)).to(self.device)
                   for f in fields(cloud)}
        self._remember_device_tensors(cloud, tensors)
        return tensors


def _masked_depth(depth: torch.Tensor, conf: torch.Tensor, min_confidence: float) -> torch.Tensor:
    """``depth`` (H,W) with NaN where it is not finite, not positive or ``conf`` < min_confidence (a new tensor,
    on depth's device)."""
    invalid = ~torch.isfinite(depth) | (depth <= 0) | (conf < min_confidence)
    return depth.masked_fill(invalid, float('nan'))
