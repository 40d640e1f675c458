"""Framework-free pipeline: two RGB images in, a typed reconstruction out (no ROS).

One DUSt3R forward pass gives both point maps in view 1's frame; the cameras come from the same pass
(focal by Weiszfeld, relative pose by PnP-RANSAC), or from given intrinsics; a calibrated stereo baseline
makes the result metric. All 3-D quantities are in the left (view 1) camera's optical frame (REP 103:
x right, y down, z forward).

    from lsm_ros.pipeline import Reconstructor
    rec = Reconstructor.from_checkpoints(dust3r='DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth', device='cuda')
    result = rec.reconstruct(left_rgb, right_rgb)                 # numpy HxWx3 uint8, any size
    result.depth_1, result.K_1, result.T_1_2, result.points()     # numpy
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np
import torch

from lsm_ros import cameras
from lsm_ros.config import PipelineConfig
from lsm_ros.model import Dust3rConfig, Dust3rNet, load_dust3r_checkpoint
from lsm_ros.model.checkpoint import CheckpointError, load_checkpoint_file, parse_constructor_string
from lsm_ros.preprocess import ImageCrop, preprocess_pair

_log = logging.getLogger(__name__)

NETWORK_OUTPUT_KEYS = ('pts3d_1', 'conf_1', 'pts3d_2', 'conf_2')
# Estimated focals are clipped to this range, in units of the focal of a 60-degree field of view.
FOCAL_BOUNDS = (0.1, 10.0)


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
            K = np.asarray(K, dtype=np.float64)
            if K.shape != (3, 3) or not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
                raise ValueError(f'{name} must be a finite 3x3 pinhole matrix with fx, fy > 0, got {K!r}')
            object.__setattr__(self, name, K)
        if self.baseline_m is not None and not (np.isfinite(self.baseline_m) and self.baseline_m > 0):
            raise ValueError(f'baseline_m must be a positive finite number of metres, got {self.baseline_m!r}')


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

        Returns ``xyz`` (N,3) float32, ``rgb`` (N,3) uint8, ``confidence`` (N,) float32, ``view`` (N,) uint8;
        non-finite points and those below ``min_confidence`` (default: the pipeline's) are dropped.
        """
        thr = self.min_confidence if min_confidence is None else min_confidence
        parts = []
        for view, (pts, conf, img) in enumerate(((self.pts3d_1, self.conf_1, self.image_1),
                                                 (self.pts3d_2, self.conf_2, self.image_2))):
            pts, conf, img = pts[::stride, ::stride], conf[::stride, ::stride], img[::stride, ::stride]
            keep = np.isfinite(pts).all(axis=-1) & (conf >= thr)
            parts.append((pts[keep], img[keep], conf[keep], np.full(int(keep.sum()), view, np.uint8)))
        return dict(xyz=np.concatenate([p[0] for p in parts]).astype(np.float32),
                    rgb=np.concatenate([p[1] for p in parts]).astype(np.uint8),
                    confidence=np.concatenate([p[2] for p in parts]).astype(np.float32),
                    view=np.concatenate([p[3] for p in parts]))


class Reconstructor:
    """Runs the geometry network and the camera recovery on image pairs.

    Build it with :meth:`from_checkpoints` (official files) or :meth:`from_config` (random weights, for tests
    and demos), then call :meth:`reconstruct`. Thread-safe for sequential use from one worker thread.
    """

    def __init__(self, network: Dust3rNet, config: PipelineConfig, *, device: torch.device | str = 'cpu',
                 weights: str = 'unknown', trained_weights: bool = True) -> None:
        self.config = config
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.weights = weights
        self.trained_weights = trained_weights
        if not trained_weights:
            _log.warning('UNTRAINED WEIGHTS (%s): outputs are not a real reconstruction. Pass the official '
                         'checkpoints for real results.', weights)

    # ------------------------------------------------------------------------------------------ builders
    @classmethod
    def from_checkpoints(cls, dust3r: str | None = None, lseg: str | None = None, lsm: str | None = None, *,
                         config: PipelineConfig | None = None, **overrides: Any) -> 'Reconstructor':
        """Load the official checkpoint files.

        ``dust3r``: DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth. When only ``lsm`` (checkpoint-final.pth) is
        given, the DUSt3R file it names in its ``args.model`` config is used, as the official
        ``LSM_Dust3R.from_pretrained`` does. ``config``/``overrides``: :class:`PipelineConfig` fields.
        ``lseg`` is accepted for the semantic stages and checked to exist.
        """
        config = replace(config or PipelineConfig(), **overrides)
        dust3r = dust3r or config.dust3r_checkpoint or None
        lseg = lseg or config.lseg_checkpoint or None
        lsm = lsm or config.lsm_checkpoint or None
        if dust3r is None and lsm is not None:
            dust3r = dust3r_path_from_lsm_checkpoint(lsm)
        if dust3r is None:
            raise CheckpointError('no DUSt3R checkpoint given: pass dust3r=... (DUSt3R_ViTLarge_BaseDecoder_512_dpt'
                                  '.pth) or an LSM checkpoint whose config names an existing DUSt3R file')
        if lseg is not None:
            if not os.path.isfile(lseg):
                raise CheckpointError(f'LSeg checkpoint not found: {lseg}')
        device = resolve_device(config.device)
        t0 = time.perf_counter()
        network = load_dust3r_checkpoint(dust3r, device='cpu')
        _log.info('loaded DUSt3R from %s in %.1f s', dust3r, time.perf_counter() - t0)
        config = replace(config, dust3r_checkpoint=str(dust3r), lseg_checkpoint=lseg or '', lsm_checkpoint=lsm or '')
        return cls(network, config, device=device, weights=str(dust3r), trained_weights=True)

    @classmethod
    def from_config(cls, network_config: Dust3rConfig | None = None, *, seed: int = 0,
                    config: PipelineConfig | None = None, **overrides: Any) -> 'Reconstructor':
        """Random weights (seeded) at any network size: for tests and demos. Outputs are untrained."""
        config = replace(config or PipelineConfig(), **overrides)
        network_config = network_config or Dust3rConfig()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = Dust3rNet(network_config)
        return cls(network, config, device=resolve_device(config.device),
                   weights=f'random (seed {seed})', trained_weights=False)

    @classmethod
    def from_state_dict(cls, official_checkpoint: Mapping[str, Any], *, weights: str, trained_weights: bool,
                        config: PipelineConfig | None = None, **overrides: Any) -> 'Reconstructor':
        """From an in-memory checkpoint in the official DUSt3R file layout ({'args': ..., 'model': ...})."""
        config = replace(config or PipelineConfig(), **overrides)
        network = load_dust3r_checkpoint(official_checkpoint, device='cpu')
        return cls(network, config, device=resolve_device(config.device), weights=weights,
                   trained_weights=trained_weights)

    # ------------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def infer(self, img1: torch.Tensor, img2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Network forward on pre-processed (B,3,H,W) float32 tensors in [-1, 1] (official names)."""
        return self.network(img1.to(self.device), img2.to(self.device))

    def reconstruct(self, left: np.ndarray, right: np.ndarray,
                    calibration: CameraCalibration | None = None) -> Reconstruction:
        """Reconstruct an image pair (numpy HxWx3 uint8 RGB, HxW mono8 or HxWx4; any size, same for both).

        ``calibration``: known intrinsics of the input images and/or a stereo baseline. Without intrinsics,
        view 1's focal comes from its point map (Weiszfeld) and view 2's from PnP (focal search + Weiszfeld).
        """
        cfg = self.config
        calibration = calibration or CameraCalibration()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        view1, view2 = preprocess_pair(left, right, cfg.resolution)
        t1 = time.perf_counter()
        out = self.infer(view1.tensor, view2.tensor)
        raw = {k: out[k].detach().float().cpu().numpy() for k in NETWORK_OUTPUT_KEYS}
        t2 = time.perf_counter()
        timings['preprocess'] = t1 - t0
        timings['network'] = t2 - t1

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
            min_confidence=cfg.min_confidence)


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


def dust3r_path_from_lsm_checkpoint(lsm_path: str) -> str:
    """The DUSt3R file named by an LSM checkpoint's ``args.model`` config (``dust3r_config``)."""
    ckpt = load_checkpoint_file(lsm_path)
    args = ckpt.get('args')
    model_string = getattr(args, 'model', None)
    if not isinstance(model_string, str):
        raise CheckpointError(f'{lsm_path}: no args.model string; is this an LSM checkpoint-final.pth?')
    class_name, kwargs = parse_constructor_string(model_string)
    try:
        path = kwargs['config']['dust3r_config']['pretrained_model_name_or_path']
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f'{lsm_path}: {class_name} config names no dust3r_config.pretrained_model_name_or_path'
                              ) from exc
    if not os.path.isabs(path):
        path = os.path.join(os.path.dirname(os.path.abspath(lsm_path)), os.path.basename(path))
    if not os.path.isfile(path):
        raise CheckpointError(f'{lsm_path} names the DUSt3R file {path}, which does not exist: pass --dust3r-checkpoint')
    return path
