"""Framework-free pipeline: two RGB images in, a typed reconstruction out (no ROS).

One feed-forward pass of the Large Spatial Model gives both point maps in view 1's frame, the semantic
Gaussians (one per pixel of both views) and, on request, language-queried labels; the cameras come from the
same pass (focal by Weiszfeld, relative pose by PnP-RANSAC), or from given intrinsics; a calibrated stereo
baseline makes the result metric. All 3-D quantities are in the left (view 1) camera's optical frame (REP 103:
x right, y down, z forward).

    from lsm_ros.pipeline import Reconstructor
    rec = Reconstructor.from_checkpoints(lsm='checkpoint-final.pth', dust3r='DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth',
                                         lseg='demo_e200.ckpt', device='cuda')
    result = rec.reconstruct(left_rgb, right_rgb)                 # numpy HxWx3 uint8, any size
    result.depth_1, result.K_1, result.T_1_2, result.points()     # numpy
    result.gaussians.means, result.gaussians.features             # (2HW, 3), (2HW, 64)
    labels = rec.query(result, ['chair', 'table']).labels         # (2, H, W) phrase index per pixel
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from lsm_ros import cameras
from lsm_ros.config import PipelineConfig
from lsm_ros.model import Dust3rConfig, Dust3rNet, load_dust3r_checkpoint
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
# The precision each dense network runs in, per PipelineConfig.precision. Measured on the reference pair against
# fp32: DUSt3R in bf16 moves the ray depth of 18 % (view 1) and 34 % (view 2) of the pixels by more than 1 %, so it
# stays fp32 there; LSeg in bf16 (feature cosine >= 0.9999, labels agree on >= 99 %) and both networks in fp16
# (emulated on the CPU: depth within 1 % on all but a few pixels, at most 1.2 %) run reduced.
NETWORK_PRECISIONS = {'fp32': {'dust3r': 'fp32', 'lseg': 'fp32'},
                      'bf16': {'dust3r': 'fp32', 'lseg': 'bf16'},
                      'fp16': {'dust3r': 'fp16', 'lseg': 'fp16'}}


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
    """

    K_left: np.ndarray | None = None
    K_right: np.ndarray | None = None
    baseline_m: float | None = None
    source: str = 'given'

    def __post_init__(self) -> None:
        for name in ('K_left', 'K_right'):
            K = getattr(self, name)
            if K is None:
                continue
            object.__setattr__(self, name, checked_pinhole_matrix(K, name))
        if self.baseline_m is not None and not (np.isfinite(self.baseline_m) and self.baseline_m > 0):
            raise ValueError(f'baseline_m must be a positive finite number of metres, got {self.baseline_m!r}')


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

    @classmethod
    def from_model_output(cls, gaussians: Mapping[str, torch.Tensor], scale: float = 1.0) -> 'GaussianCloud':
        """From :meth:`LargeSpatialModel.gaussians` (batch 1), lengths multiplied by ``scale``."""
        def array(key: str) -> np.ndarray:
            return gaussians[key].detach().float().cpu().numpy()
        return cls(means=array('means') * np.float32(scale), scales=array('scales') * np.float32(scale),
                   rotations=array('rotations'), opacities=array('opacities'), sh=array('sh'),
                   features=array('features'))

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
    scale_source: str              # 'stereo_baseline' or 'none'
    intrinsics_source: str         # 'camera_info', 'given' or 'estimated'
    pose: cameras.RelativePose
    network_outputs: dict[str, np.ndarray]   # raw, unscaled: pts3d_1, conf_1, pts3d_2, conf_2 (batch axis 1)
    weights: str                   # description of the weights used
    trained_weights: bool
    timings_s: dict[str, float] = field(default_factory=dict)
    min_confidence: float = 1.0
    gaussians: GaussianCloud | None = None   # the semantic Gaussians (full LSM only), same frame and scale

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
        self.precisions = NETWORK_PRECISIONS[config.precision]
        self.network = network.to(self.device).eval()
        self.weights = weights
        self.trained_weights = trained_weights
        self._render_lock = threading.Lock()
        self._render_cache: tuple[GaussianCloud, dict[str, torch.Tensor]] | None = None
        self._offloaded = False
        if not trained_weights:
            _log.warning('UNTRAINED WEIGHTS (%s): outputs are not a real reconstruction. Pass the official '
                         'checkpoints for real results.', weights)
        if config.precision != 'fp32':
            _log.info('precision %s: DUSt3R in %s, LSeg in %s (approximate; precision=fp32 is exact)',
                      config.precision, self.precisions['dust3r'], self.precisions['lseg'])

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
        """Free accelerator memory: on CUDA, move the network to the CPU, drop the cached render tensors and return
        torch's cached CUDA blocks to the driver (True; call :meth:`reload` before the next reconstruct, query or
        render). On the CPU there is nothing to free and the model stays usable (False)."""
        if self.device.type != 'cuda':
            return False
        with self._render_lock:
            self._render_cache = None
        self.network.to('cpu')
        self._offloaded = True
        torch.cuda.empty_cache()
        _log.info('network moved off %s (accelerator memory released)', self.device)
        return True

    def reload(self) -> None:
        """Move an offloaded network back to its device (nothing to do otherwise)."""
        if self._offloaded:
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
        precision of :data:`NETWORK_PRECISIONS`."""
        img1, img2 = img1.to(self.device), img2.to(self.device)
        if self.semantic:
            return self.network.geometry(img1, img2, precision=self.precisions['dust3r'])
        return self.network(img1, img2, precision=self.precisions['dust3r'])

    def reconstruct(self, left: np.ndarray, right: np.ndarray,
                    calibration: CameraCalibration | None = None) -> Reconstruction:
        """Reconstruct an image pair (numpy HxWx3 uint8 RGB, HxW mono8 or HxWx4; any size, same for both).

        ``calibration``: known intrinsics of the input images and/or a stereo baseline. Without intrinsics,
        view 1's focal comes from its point map (Weiszfeld) and view 2's from PnP (focal search + Weiszfeld).
        With the full LSM, the result also carries the semantic Gaussians (one per pixel of both views).
        """
        self._require_loaded()
        cfg = self.config
        calibration = calibration or CameraCalibration()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        view1, view2 = preprocess_pair(left, right, cfg.resolution)
        t1 = time.perf_counter()
        img1, img2 = view1.tensor.to(self.device), view2.tensor.to(self.device)
        out = self.infer(img1, img2)
        raw = {k: out[k].detach().float().cpu().numpy() for k in NETWORK_OUTPUT_KEYS}
        t2 = time.perf_counter()
        timings['preprocess'] = t1 - t0
        timings['network'] = t2 - t1
        gaussian_tensors = None
        if self.semantic:
            with torch.no_grad():
                semantics = self.network.semantics(img1, img2, precision=self.precisions['lseg'])
                t3 = time.perf_counter()
                gaussian_tensors = self.network.gaussians(img1, img2, out, semantics)
            timings['semantics'] = t3 - t2
            timings['gaussians'] = time.perf_counter() - t3
            t2 = time.perf_counter()

        pts1, pts2 = raw['pts3d_1'][0].astype(np.float64), raw['pts3d_2'][0].astype(np.float64)
        conf1, conf2 = raw['conf_1'][0], raw['conf_2'][0]
        height, width = conf1.shape

        if calibration.K_left is not None:
            K_1 = view1.crop.intrinsics_to_model(calibration.K_left)
            intrinsics_source = calibration.source
        else:
            K_1 = estimate_intrinsics(pts1)
            intrinsics_source = 'estimated'
        K_2_known = view2.crop.intrinsics_to_model(calibration.K_right) if calibration.K_right is not None else None
        pose = cameras.estimate_relative_pose(
            pts2, conf2, K_2_known, reprojection_error_px=cfg.pose_reprojection_error_px,
            iterations=cfg.pose_ransac_iterations, max_points=cfg.pose_max_points)
        K_2 = K_2_known if K_2_known is not None else pose.K_2
        timings['cameras'] = time.perf_counter() - t2

        scale, scale_source = 1.0, 'none'
        if calibration.baseline_m is not None:
            if pose.success:
                scale = cameras.metric_scale_from_baseline(pose.T_1_2, calibration.baseline_m)
                scale_source = 'stereo_baseline'
            else:
                _log.warning('stereo baseline given but the relative pose failed (%s): scale left in model units',
                             pose.message)
        T_1_2 = pose.T_1_2.copy()
        T_1_2[:3, 3] *= scale
        depth_1 = pts1[..., 2] * scale
        depth_2 = cameras.depth_in_own_frame(pts2, pose.T_1_2) * scale if pose.success \
            else np.full_like(depth_1, np.nan)
        for depth, conf in ((depth_1, conf1), (depth_2, conf2)):
            depth[~np.isfinite(depth) | (depth <= 0) | (conf < cfg.min_confidence)] = np.nan
        timings['total'] = time.perf_counter() - t0
        return Reconstruction(
            pts3d_1=(pts1 * scale).astype(np.float32), pts3d_2=(pts2 * scale).astype(np.float32),
            conf_1=conf1.astype(np.float32), conf_2=conf2.astype(np.float32),
            depth_1=depth_1.astype(np.float32), depth_2=depth_2.astype(np.float32),
            K_1=K_1, K_2=K_2, T_1_2=T_1_2, image_1=view1.rgb, image_2=view2.rgb,
            crop_1=view1.crop, crop_2=view2.crop, metric_scale=scale_source != 'none', scale_factor=scale,
            scale_source=scale_source, intrinsics_source=intrinsics_source, pose=pose, network_outputs=raw,
            weights=self.weights, trained_weights=self.trained_weights, timings_s=timings,
            min_confidence=cfg.min_confidence,
            gaussians=None if gaussian_tensors is None else GaussianCloud.from_model_output(gaussian_tensors, scale))

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
            features = torch.from_numpy(result.gaussians.features).to(self.device)
            view_features = features.view(2, height, width, -1)[list(views)].permute(0, 3, 1, 2)
            logits = self.network.view_label_logits(view_features, text)
            point_logits = self.network.point_label_logits(features, text)
        return QueryResult(phrases=phrases, views=views, logits=logits.cpu().numpy(),
                           point_logits=point_logits.cpu().numpy(), logit_scale=LSEG_LOGIT_SCALE)

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
        alpha = out.alpha.float().cpu().numpy()
        depth = None
        if 'depth' in channels:
            depth = out.depth.float().cpu().numpy()
            depth[alpha < DEPTH_MIN_ALPHA] = np.nan
        return RenderedView(
            width=width, height=height, K=K, T_left_camera=T, alpha=alpha,
            rgb=None if out.rgb is None or 'rgb' not in channels else np.clip(out.rgb.float().cpu().numpy(), 0, 1),
            depth=depth,
            features=out.features.float().cpu().numpy() if 'features' in channels else None,
            phrases=phrases, label_logits=None if label_logits is None else label_logits.cpu().numpy())

    def _gaussian_tensors(self, cloud: GaussianCloud) -> dict[str, torch.Tensor]:
        """The cloud's arrays as tensors on the device, kept for the last cloud rendered (videos, services)."""
        with self._render_lock:
            if self._render_cache is None or self._render_cache[0] is not cloud:
                tensors = {f.name: torch.from_numpy(np.ascontiguousarray(getattr(cloud, f.name))).to(self.device)
                           for f in fields(cloud)}
                self._render_cache = (cloud, tensors)
            return self._render_cache[1]


def estimate_intrinsics(pts3d: np.ndarray) -> np.ndarray:
    """Pinhole intrinsics of a view from its point map (H,W,3) in its own frame: Weiszfeld focal, principal point
    at the image centre. The focal is kept within FOCAL_BOUNDS x the 60-degree-FOV focal; a point map with no
    usable point (untrained weights) gets that reference focal, with a warning."""
    height, width = pts3d.shape[:2]
    try:
        focal = cameras.estimate_focal_weiszfeld(pts3d, min_focal=FOCAL_BOUNDS[0], max_focal=FOCAL_BOUNDS[1])
    except ValueError as exc:
        focal = cameras.reference_focal(height, width)
        _log.warning('focal estimation failed (%s): using the 60-degree-FOV focal %.1f px', exc, focal)
    return cameras.intrinsics_matrix(focal, focal, width / 2.0, height / 2.0)
