"""The ``lsm-ros`` command.

    lsm-ros reconstruct LEFT RIGHT --out DIR [--dust3r-checkpoint F] [--lsm-checkpoint F] [--lseg-checkpoint F]
                                             [--device auto|cpu|cuda] [--resolution 224|256|512] [--precision P]
                                             [--intrinsics fx,fy,cx,cy | FILE] [--baseline METRES]
                                             [--query PHRASE ...] [--threshold P]   # semantic model only
    lsm-ros render RECONSTRUCTION --out DIR [--frames 60] [--fps 30] [--path there_and_back|one_way]
                                            [--channels rgb depth features labels] [--query PHRASE ...]
                                            [--size W H] [--device auto]   # novel views along a camera path
    lsm-ros demo [--out DIR] [--bag PATH] [--max-pairs N]    # the node on a stereo bag, products to DIR
    lsm-ros bench [--quick] [--resolutions 224 256 512x384] [--pairs N] [--warmup N] [--device D] [--threads N]
                  [--precision P ...] [--cuda-graphs] [--cuda-streams] [--json PATH]   # stage times, memory
    lsm-ros bench --ros [--rate 30] [--duration S] ...             # lsm_node on loopback: latency, drops
    lsm-ros weights fetch [--dir DIR] [--only dust3r|lseg|lsm ...] [--timeout S] [--base-url URL] [--force]
    lsm-ros weights check [--dir DIR] [--only ...] [--no-hash]     # present, size, SHA-256, loads (exit 1 on failure)
    lsm-ros weights convert [--dust3r F] [--lseg F] [--lsm F] --out DIR   # safetensors, loadable without pickle
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np

_log = logging.getLogger('lsm_ros.cli')
Number = TypeVar('Number', int, float)

RECONSTRUCTION_NPZ = 'reconstruction.npz'
CAMERAS_JSON = 'cameras.json'
GAUSSIANS_PLY = 'gaussians.ply'
QUERY_JSON = 'query.json'
MASKS_DIR = 'masks'
RENDER_JSON = 'render.json'
LABELS_JSON = 'labels.json'
UNKNOWN_WEIGHTS = 'unknown'   # Reconstruction.weights of a loaded npz without cameras.json beside it
_NPZ_REQUIRED_KEYS = ('pts3d_1', 'conf_1', 'pts3d_2', 'conf_2', 'K_1', 'K_2', 'T_1_2', 'depth_1', 'depth_2',
                      'scale_factor', 'metric_scale', 'image_1', 'image_2')


# ---------------------------------------------------------------------------------------------- weights
def add_weights_arguments(parser: argparse.ArgumentParser, *, inference: bool = True) -> None:
    """Checkpoint and device options shared by the sub-commands; with ``inference`` also the resolution and
    confidence options of a reconstruction (``render`` works on a saved one: it keeps their defaults)."""
    from lsm_ros.config import PRECISIONS, RESOLUTIONS, PipelineConfig
    group = parser.add_argument_group('model')
    group.add_argument('--dust3r-checkpoint', metavar='FILE', default='',
                       help='official DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth (or its .safetensors conversion)')
    group.add_argument('--lseg-checkpoint', metavar='FILE', default='',
                       help='official LSeg demo_e200.ckpt (or its .safetensors conversion)')
    group.add_argument('--lsm-checkpoint', metavar='FILE', default='',
                       help='official LSM checkpoint-final.pth (or its .safetensors conversion)')
    group.add_argument('--reference-weights', action='store_true',
                       help='without official files: the deterministic reference weights of the parity tests '
                            '(real network size, UNTRAINED outputs)')
    group.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda' or 'cuda:N' (default auto)")
    if not inference:
        defaults = PipelineConfig()
        parser.set_defaults(resolution=defaults.resolution, min_confidence=defaults.min_confidence,
                            precision=defaults.precision)
        return
    group.add_argument('--resolution', type=int, default=256, choices=RESOLUTIONS, help='model resolution')
    group.add_argument('--precision', default=PipelineConfig().precision, choices=PRECISIONS,
                       help='arithmetic of the dense networks (PipelineConfig.precision): fp32 exact (default), bf16 '
                            '(LSeg in bfloat16; CUDA or a CPU with bfloat16 support), fp16 (CUDA only)')
    group.add_argument('--min-confidence', type=float, default=1.0,
                       help='drop points/depth with DUSt3R confidence below this (>= 1; default keeps all)')


def build_reconstructor(args: argparse.Namespace, *, allow_untrained: bool):
    """A :class:`~lsm_ros.pipeline.Reconstructor` from the parsed options.

    Official files when given (the LSM file: full model; the DUSt3R file alone: geometry only); else, unless
    ``args.reference_weights``, the official files installed by ``lsm-ros weights fetch`` (``$LSM_ROS_WEIGHTS`` or
    ``~/.cache/lsm_ros/weights``); else, if ``args.reference_weights`` or ``allow_untrained``, the full LSM with the
    reference weights (or, without the reference folder, seeded random weights at the official size), with a loud
    warning."""
    import dataclasses

    from lsm_ros.config import PipelineConfig
    from lsm_ros.pipeline import Reconstructor
    from lsm_ros.reference_weights import find_reference_dir
    from lsm_ros.weights import default_weights_dir, installed_checkpoints

    config = PipelineConfig(dust3r_checkpoint=args.dust3r_checkpoint, lseg_checkpoint=args.lseg_checkpoint,
                            lsm_checkpoint=args.lsm_checkpoint, device=args.device, resolution=args.resolution,
                            min_confidence=args.min_confidence,
                            precision=getattr(args, 'precision', PipelineConfig().precision))
    from lsm_ros.model.layers import check_precision
    from lsm_ros.pipeline import resolve_device
    try:
        device = resolve_device(config.device)
    except ValueError as exc:
        raise SystemExit(f'lsm-ros: --device: {exc}') from None
    try:
        check_precision(config.precision, device)
    except ValueError as exc:
        raise SystemExit(f'lsm-ros: --precision: {exc}') from None
    if args.dust3r_checkpoint or args.lsm_checkpoint:
        return Reconstructor.from_checkpoints(config=config)
    installed = {} if args.reference_weights else installed_checkpoints()
    if installed:
        _log.info('using the official weights installed in %s (lsm-ros weights fetch)%s', default_weights_dir(),
                  '' if 'lsm_checkpoint' in installed else ': DUSt3R only (geometry; LSeg or LSM missing)')
        return Reconstructor.from_checkpoints(config=dataclasses.replace(config, **installed))
    if not (args.reference_weights or allow_untrained):
        raise SystemExit('lsm-ros: no weights given. Pass the official files (--lsm-checkpoint checkpoint-final.pth '
                         'with --dust3r-checkpoint and --lseg-checkpoint, or --dust3r-checkpoint alone for geometry '
                         'only), or --reference-weights to run the real network with untrained reference weights.')
    reference_dir = find_reference_dir()
    if reference_dir is not None:
        return Reconstructor.from_reference(reference_dir, config=config)
    _log.warning('reference folder not found: using seeded random weights at the official size')
    return Reconstructor.from_config(config=config)


def warn_untrained(reconstructor) -> None:
    if not reconstructor.trained_weights:
        banner = '!' * 100
        _log.warning('\n%s\n  UNTRAINED WEIGHTS: %s\n  The network, pre-processing and camera recovery are the real '
                     'ones, but these outputs are NOT a real\n  reconstruction. Pass the official checkpoints '
                     '(--lsm-checkpoint ...) for real results.\n%s', banner, reconstructor.weights, banner)


# ---------------------------------------------------------------------------------------------- inputs
def read_image(path: str) -> np.ndarray:
    """RGB uint8 (H,W,3) of an image file, EXIF orientation applied (as the official loader does)."""
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as img:
            return np.asarray(ImageOps.exif_transpose(img).convert('RGB'))
    except (OSError, ValueError) as exc:
        raise SystemExit(f'lsm-ros: cannot read image {path}: {exc}') from exc


def _matrix_from(value, what: str) -> np.ndarray:
    from lsm_ros.cameras import intrinsics_matrix
    array = np.asarray(value, dtype=np.float64)
    if array.shape == (4,):
        array = intrinsics_matrix(*array)
    elif array.shape == (9,):
        array = array.reshape(3, 3)
    if array.shape != (3, 3):
        raise SystemExit(f'lsm-ros: {what}: expected fx,fy,cx,cy or a 3x3 matrix, got shape {array.shape}')
    return array


def parse_intrinsics(value: str, baseline: float | None):
    """``--intrinsics``: 'fx,fy,cx,cy' (both images), or a JSON/YAML file with ``K_left``, ``K_right``
    (each [fx,fy,cx,cy] or 3x3) and optional ``baseline_m``. Intrinsics are of the input images."""
    from lsm_ros.pipeline import CameraCalibration
    if not value:
        return CameraCalibration(baseline_m=baseline) if baseline else None
    path = Path(value)
    if path.is_file():
        import yaml
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict) or 'K_left' not in data:
            raise SystemExit(f'lsm-ros: {path}: expected a mapping with K_left (and K_right, baseline_m)')
        K_left = _matrix_from(data['K_left'], f'{path}: K_left')
        K_right = _matrix_from(data.get('K_right', data['K_left']), f'{path}: K_right')
        baseline = baseline if baseline is not None else data.get('baseline_m')
    else:
        try:
            numbers = [float(v) for v in value.split(',')]
        except ValueError:
            raise SystemExit(f'lsm-ros: --intrinsics {value!r}: neither a file nor fx,fy,cx,cy') from None
        K_left = K_right = _matrix_from(numbers, '--intrinsics')
    try:
        return CameraCalibration(K_left=K_left, K_right=K_right, baseline_m=baseline, source='given')
    except ValueError as exc:
        raise SystemExit(f'lsm-ros: {exc}') from exc


# ---------------------------------------------------------------------------------------------- outputs
def rotation_to_quaternion_xyzw(R: np.ndarray) -> list[float]:
    from scipy.spatial.transform import Rotation
    return [float(v) for v in Rotation.from_matrix(R).as_quat()]


def save_reconstruction(rec, out_dir: Path) -> dict[str, Path]:
    """Write every product of a :class:`~lsm_ros.pipeline.Reconstruction` into ``out_dir``.

    ``reconstruction.npz`` (public contract): the raw network outputs under the official names ``pts3d_1``
    (1,H,W,3), ``conf_1`` (1,H,W), ``pts3d_2`` (1,H,W,3, view 2's points in view 1's frame), ``conf_2``, plus the
    camera products (``K_1``, ``K_2``, ``T_1_2``, ``depth_1``, ``depth_2``, ``scale_factor``, images). With
    Gaussians (semantic model) also ``means`` (N,3), ``scales`` (N,3), ``rotations`` (N,4, x y z w),
    ``opacities`` (N,1), ``sh`` (N,16,3), ``features`` (N,64), N = 2*H*W (view 1's pixels, then view 2's), and
    ``gaussians.ply`` (3D Gaussian Splatting layout, :func:`lsm_ros.io.write_gaussian_ply`)."""
    from lsm_ros import io
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    cloud = rec.points()
    paths['points'] = io.write_ply(out_dir / 'points.ply', cloud['xyz'], cloud['rgb'],
                                   {'confidence': cloud['confidence'], 'view': cloud['view']})
    for view, depth in (('left', rec.depth_1), ('right', rec.depth_2)):
        np.save(out_dir / f'depth_{view}.npy', depth)
        paths[f'depth_{view}'] = out_dir / f'depth_{view}.npy'
        paths[f'depth_{view}_png'] = io.write_rgb_png(out_dir / f'depth_{view}.png', io.depth_to_color(depth))
    units = 'metres' if rec.metric_scale else 'model units'
    cameras = {
        'frame': 'left camera optical frame (REP 103: x right, y down, z forward)',
        'units': units, 'metric_scale': rec.metric_scale, 'scale_factor': rec.scale_factor,
        'scale_source': rec.scale_source, 'intrinsics_source': rec.intrinsics_source, 'pose_source': rec.pose_source,
        'width': rec.size[0], 'height': rec.size[1],
        'K_left': rec.K_1, 'K_right': rec.K_2,
        'K_left_input': rec.crop_1.intrinsics_to_input(rec.K_1), 'K_right_input': rec.crop_2.intrinsics_to_input(rec.K_2),
        'T_left_right': rec.T_1_2,
        'right_in_left': {'translation': rec.T_1_2[:3, 3], 'quaternion_xyzw': rotation_to_quaternion_xyzw(rec.T_1_2[:3, :3])},
        'pose': {'success': rec.pose.success, 'inliers': rec.pose.num_inliers,
                 'reprojection_rmse_px': rec.pose.reprojection_rmse_px, 'message': rec.pose.message},
        'weights': rec.weights, 'trained_weights': rec.trained_weights, 'timings_s': rec.timings_s,
    }
    paths['cameras'] = io.write_json(out_dir / CAMERAS_JSON, cameras)
    arrays = dict(rec.network_outputs)
    arrays.update(K_1=rec.K_1, K_2=rec.K_2, T_1_2=rec.T_1_2, depth_1=rec.depth_1, depth_2=rec.depth_2,
                  scale_factor=np.float64(rec.scale_factor), metric_scale=np.bool_(rec.metric_scale),
                  image_1=rec.image_1, image_2=rec.image_2)
    if rec.gaussians is not None:
        arrays.update({name: np.asarray(getattr(rec.gaussians, name)) for name in io.GAUSSIAN_FIELDS})
        paths['gaussians'] = io.write_gaussian_ply(out_dir / GAUSSIANS_PLY, rec.gaussians)
    np.savez_compressed(out_dir / RECONSTRUCTION_NPZ, **arrays)
    paths['npz'] = out_dir / RECONSTRUCTION_NPZ
    return paths


def load_reconstruction(path: str | Path):
    """The :class:`~lsm_ros.pipeline.Reconstruction` saved by :func:`save_reconstruction`, from its folder or its
    ``reconstruction.npz``; with the Gaussians when the npz holds them (semantic model), else ``gaussians=None``.

    Arrays come from the npz (point maps rescaled by its ``scale_factor``); provenance (weights, trained flag,
    pose statistics, sources, timings) from ``cameras.json`` beside it. Without that file ``weights`` is
    UNKNOWN_WEIGHTS and ``trained_weights`` True (nothing known). Not stored, hence placeholders: the input images
    (``crop_1``/``crop_2`` are the identity on the model images), the pose's candidate count (0) and
    ``min_confidence`` (1, the default). Raises FileNotFoundError, or ValueError for an unreadable or incomplete
    npz."""
    import zipfile

    from lsm_ros import io
    from lsm_ros.cameras import RelativePose
    from lsm_ros.pipeline import NETWORK_OUTPUT_KEYS, GaussianCloud, Reconstruction
    from lsm_ros.preprocess import ImageCrop

    path = Path(path)
    npz_path = path / RECONSTRUCTION_NPZ if path.is_dir() else path
    if not npz_path.is_file():
        raise FileNotFoundError(f'{npz_path}: no such file (expected a folder written by lsm-ros reconstruct, '
                                f'or its {RECONSTRUCTION_NPZ})')
    try:
        with np.load(npz_path) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f'{npz_path}: not a readable npz: {exc}') from exc
    missing = [key for key in _NPZ_REQUIRED_KEYS if key not in arrays]
    if missing:
        raise ValueError(f'{npz_path}: missing {missing}: not written by lsm-ros reconstruct')
    stored_gaussian_fields = [name for name in io.GAUSSIAN_FIELDS if name in arrays]
    if stored_gaussian_fields and len(stored_gaussian_fields) != len(io.GAUSSIAN_FIELDS):
        raise ValueError(f'{npz_path}: incomplete Gaussians: has {stored_gaussian_fields} of {io.GAUSSIAN_FIELDS}')
    cameras_path = npz_path.parent / CAMERAS_JSON
    try:
        cameras = json.loads(cameras_path.read_text()) if cameras_path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f'{cameras_path}: not valid JSON: {exc}') from exc
    pose_info = cameras.get('pose', {})
    scale = float(arrays['scale_factor'])
    T_1_2, K_2 = arrays['T_1_2'].astype(np.float64), arrays['K_2'].astype(np.float64)
    T_1_2_model_units = T_1_2.copy()
    T_1_2_model_units[:3, 3] /= scale
    height, width = arrays['depth_1'].shape
    identity_crop = ImageCrop(input_size=(width, height), resized_size=(width, height), crop_box=(0, 0, width, height))
    rmse = pose_info.get('reprojection_rmse_px')
    pose = RelativePose(T_1_2=T_1_2_model_units, focal_2=float(K_2[0, 0]), K_2=K_2,
                        num_inliers=int(pose_info.get('inliers', 0)), num_candidates=0,
                        reprojection_rmse_px=float('nan') if rmse is None else float(rmse),
                        success=bool(pose_info.get('success', not np.allclose(T_1_2, np.eye(4)))),
                        message=pose_info.get('message', f'restored from {npz_path.name}'))
    metric_scale = bool(arrays['metric_scale'])
    return Reconstruction(
        pts3d_1=(arrays['pts3d_1'][0] * scale).astype(np.float32),
        pts3d_2=(arrays['pts3d_2'][0] * scale).astype(np.float32),
        conf_1=arrays['conf_1'][0].astype(np.float32), conf_2=arrays['conf_2'][0].astype(np.float32),
        depth_1=arrays['depth_1'].astype(np.float32), depth_2=arrays['depth_2'].astype(np.float32),
        K_1=arrays['K_1'].astype(np.float64), K_2=K_2, T_1_2=T_1_2,
        image_1=arrays['image_1'], image_2=arrays['image_2'],
        crop_1=identity_crop, crop_2=identity_crop, metric_scale=metric_scale, scale_factor=scale,
        scale_source=cameras.get('scale_source', 'stereo_baseline' if metric_scale else 'none'),
        intrinsics_source=cameras.get('intrinsics_source', 'unknown'), pose=pose,
        pose_source=cameras.get('pose_source', 'pnp'),
        network_outputs={key: arrays[key] for key in NETWORK_OUTPUT_KEYS},
        weights=cameras.get('weights', UNKNOWN_WEIGHTS), trained_weights=bool(cameras.get('trained_weights', True)),
        timings_s=cameras.get('timings_s', {}),
        gaussians=GaussianCloud(**{name: arrays[name] for name in io.GAUSSIAN_FIELDS}) if stored_gaussian_fields
        else None)


def save_query(answer, out_dir: Path, threshold: float = 0.0) -> dict[str, Path]:
    """Write a :class:`~lsm_ros.semantics.QueryResult` into ``out_dir``.

    ``masks/{left,right}_{slug}.png``: mono8 masks (255 in the phrase's mask: its label and probability >=
    ``threshold``); ``labels_{left,right}.png``: the label colours (black below the threshold); ``query.json``:
    phrases, threshold, views and a legend with each phrase's label index, colour, mask files, score (fraction
    of the pixels of the queried views in its mask), largest probability and largest cosine similarity."""
    from lsm_ros import io, semantics
    slugs = semantics.unique_slugs(answer.phrases)
    palette = semantics.label_palette(len(answer.phrases))
    masks, label_images = answer.masks(threshold), answer.label_images(threshold)
    paths: dict[str, Path] = {}
    mask_files: dict[str, dict[str, str]] = {name: {} for name in slugs}
    label_files: dict[str, str] = {}
    for position, view in enumerate(answer.views):
        view_name = semantics.VIEW_NAMES[view]
        for index, name in enumerate(slugs):
            relative = f'{MASKS_DIR}/{view_name}_{name}.png'
            paths[f'mask_{view_name}_{name}'] = io.write_mono_png(out_dir / relative,
                                                                  masks[position, index].astype(np.uint8) * 255)
            mask_files[name][view_name] = relative
        relative = f'labels_{view_name}.png'
        paths[f'labels_{view_name}'] = io.write_rgb_png(
            out_dir / relative, semantics.colorize_labels(label_images[position], palette))
        label_files[view_name] = relative
    scores, max_probabilities, max_similarities = (answer.scores(threshold), answer.max_probabilities(),
                                                   answer.max_similarities())
    legend = [{'label': index, 'phrase': phrase, 'slug': name, 'colour_rgb': palette[index], 'masks': mask_files[name],
               'score': scores[index], 'max_probability': max_probabilities[index],
               'max_similarity': max_similarities[index]}
              for index, (phrase, name) in enumerate(zip(answer.phrases, slugs))]
    paths['query'] = io.write_json(out_dir / QUERY_JSON, {
        'phrases': answer.phrases, 'threshold': threshold, 'views': [semantics.VIEW_NAMES[v] for v in answer.views],
        'label_images': label_files, 'unlabelled_colour_rgb': [0, 0, 0], 'logit_scale': answer.logit_scale,
        'definitions': {
            'probability': 'softmax over the phrases of logit_scale * cosine(pixel feature, text feature)',
            'mask': 'pixels whose best phrase is this one with a probability >= threshold',
            'score': 'fraction of the pixels of the queried views in the mask',
            'max_probability': 'largest probability of the phrase over the pixels of the queried views',
            'max_similarity': 'largest cosine similarity of the phrase over those pixels'},
        'legend': legend})
    return paths


# ---------------------------------------------------------------------------------------------- commands
def _query_phrases(args: argparse.Namespace) -> tuple[str, ...]:
    """The validated ``--query`` phrases, () when none; SystemExit saying why when they cannot be a query."""
    from lsm_ros.semantics import validate_phrases
    try:
        return validate_phrases(args.query) if args.query else ()
    except ValueError as exc:
        raise SystemExit(f'lsm-ros: --query: {exc}') from exc


def cmd_reconstruct(args: argparse.Namespace) -> int:
    phrases = _query_phrases(args)
    left, right = read_image(args.left), read_image(args.right)
    calibration = parse_intrinsics(args.intrinsics, args.baseline)
    reconstructor = build_reconstructor(args, allow_untrained=False)
    if phrases and not reconstructor.semantic:
        raise SystemExit(f'lsm-ros: --query needs the semantic model, but {reconstructor.weights} is geometry '
                         'only: pass --lsm-checkpoint checkpoint-final.pth (with --dust3r-checkpoint and '
                         '--lseg-checkpoint unless the LSM file names them)')
    warn_untrained(reconstructor)
    try:
        rec = reconstructor.reconstruct(left, right, calibration)
        answer = reconstructor.query(rec, phrases) if phrases else None
    except ValueError as exc:
        raise SystemExit(f'lsm-ros: {exc}') from exc
    paths = save_reconstruction(rec, Path(args.out))
    if answer is not None:
        paths.update(save_query(answer, Path(args.out), args.threshold))
        for phrase, score in zip(answer.phrases, answer.scores(args.threshold)):
            _log.info('query %-24r %5.1f %% of the pixels', phrase, 100.0 * score)
    _log.info('%dx%d, pose %s (%d inliers), |t| = %.4f %s, intrinsics %s; %s',
              rec.size[0], rec.size[1], 'ok' if rec.pose.success else 'FAILED', rec.pose.num_inliers, rec.baseline,
              'm' if rec.metric_scale else 'model units', rec.intrinsics_source,
              ', '.join(f'{stage} {seconds:.2f} s' for stage, seconds in rec.timings_s.items()))
    for name, path in paths.items():
        _log.info('wrote %-16s %s', name, path)
    warn_untrained(reconstructor)
    return 0


RENDER_OUTPUTS: tuple[str, ...] = ('rgb', 'depth', 'features', 'labels')
DEFAULT_RENDER_OUTPUTS: tuple[str, ...] = ('rgb', 'depth', 'features')
VIDEO_FOURCC = 'mp4v'
SOURCE_VIEW_NOTE = ('RGB renders of the two source views at the model size against the model images: they '
                    'reproduce the input images when the model is exact; untrained weights give low values')


class ChannelOutput:
    """The frames of one rendered channel: PNGs ``DIR/<channel>/NNNN.png`` and, when OpenCV can encode it, the
    video ``DIR/<channel>.mp4`` (mp4v); without a video writer a warning says so and the PNGs remain."""

    def __init__(self, out_dir: Path, channel: str, size: tuple[int, int], fps: float, digits: int) -> None:
        import cv2
        self.frames_dir = out_dir / channel
        self.frame_pattern = f'{channel}/%0{digits}d.png'
        self.video_path: Path | None = out_dir / f'{channel}.mp4'
        self._digits = digits
        out_dir.mkdir(parents=True, exist_ok=True)
        self._video = cv2.VideoWriter(str(self.video_path), cv2.VideoWriter_fourcc(*VIDEO_FOURCC), fps, size)
        if not self._video.isOpened():
            _log.warning('cannot open an %s video writer for %s: writing the PNG frames only', VIDEO_FOURCC,
                         self.video_path)
            self._video, self.video_path = None, None

    def write(self, index: int, rgb: np.ndarray) -> None:
        """Frame ``index``: (H,W,3) uint8 RGB."""
        from lsm_ros import io
        io.write_rgb_png(self.frames_dir / f'{index:0{self._digits}d}.png', rgb)
        if self._video is not None:
            self._video.write(np.ascontiguousarray(rgb[..., ::-1]))

    def close(self) -> None:
        if self._video is not None:
            self._video.release()


def rendering_only_reconstructor(device: str):
    """A :class:`~lsm_ros.pipeline.Reconstructor` that holds no network (an empty module): enough for
    ``Reconstructor.render`` without phrases (RGB, depth, features), which uses only its device; anything that
    needs the network fails loudly. No weights run, so nothing untrained contributes (``trained_weights``)."""
    import torch

    from lsm_ros.config import PipelineConfig
    from lsm_ros.pipeline import Reconstructor, resolve_device
    return Reconstructor(torch.nn.Module(), PipelineConfig(device=device), device=resolve_device(device),
                         weights='none (rendering without labels runs no network)', trained_weights=True)


def source_view_psnr(reconstructor, rec) -> dict[str, float]:
    """PSNR (dB, peak 1) of the RGB renders of view 1 (identity, ``K_1``) and view 2 (``T_1_2``, ``K_2``) at the
    model size against ``image_1`` and ``image_2``: {'left': ..., 'right': ...}; inf for identical images."""
    psnr = {}
    for name, T, K, image in (('left', np.eye(4), rec.K_1, rec.image_1), ('right', rec.T_1_2, rec.K_2, rec.image_2)):
        view = reconstructor.render(rec, T, K, rec.size, ('rgb',))
        mse = float(np.mean((view.rgb.astype(np.float64) - image.astype(np.float64) / 255.0) ** 2))
        psnr[name] = 10.0 * float(np.log10(1.0 / mse)) if mse > 0 else float('inf')
    return psnr


def frame_images(view, outputs: Sequence[str], depth_range: tuple[float, float] | None, pca,
                 palette: np.ndarray) -> dict[str, np.ndarray]:
    """(H,W,3) uint8 RGB images of a :class:`~lsm_ros.pipeline.RenderedView` per output channel: the colours,
    the depth in turbo over the fixed ``depth_range`` (black where nothing was rendered), the features through
    the fixed ``pca`` (:class:`~lsm_ros.visualization.FeaturePca`) and the labels in ``palette``, both black
    where the accumulated opacity is below DEPTH_MIN_ALPHA."""
    from lsm_ros.pipeline import DEPTH_MIN_ALPHA
    from lsm_ros.visualization import colorize_labels, depth_to_color
    images = {}
    if 'rgb' in outputs:
        images['rgb'] = np.round(view.rgb * 255.0).astype(np.uint8)
    if 'depth' in outputs:
        images['depth'] = depth_to_color(view.depth, *(depth_range or (None, None)))
    if 'features' in outputs:
        colours = pca.colors(view.features)
        colours[view.alpha < DEPTH_MIN_ALPHA] = 0
        images['features'] = colours
    if 'labels' in outputs:
        images['labels'] = colorize_labels(view.labels, palette)
    return images


def write_path_frames(reconstructor, rec, path, size: tuple[int, int], outputs: Sequence[str],
                      phrases: Sequence[str], out_dir: Path, fps: float) -> dict:
    """Render ``rec`` from every camera of ``path`` (a :class:`~lsm_ros.camera_path.CameraPath` with intrinsics
    at ``size`` (width, height)) and write each of ``outputs`` (RENDER_OUTPUTS) as PNG frames and an MP4 under
    ``out_dir`` (:class:`ChannelOutput`), with a progress bar. Depth is coloured over one range for the whole path
    (:func:`~lsm_ros.camera_path.visible_depth_range` of the Gaussians' means), features through one PCA basis
    fitted on the Gaussians' features, labels (arg-max over ``phrases``) in the :func:`label_palette` colours.

    Returns ``files`` (per channel: frame pattern and video name or None), ``depth_range`` and the per-frame
    ``render_ms`` (Reconstructor.render) and ``frame_ms`` (render, colouring and writing)."""
    import time

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from lsm_ros.camera_path import visible_depth_range
    from lsm_ros.semantics import label_palette
    from lsm_ros.visualization import FeaturePca

    depth_range = visible_depth_range(rec.gaussians.means, path.poses, path.intrinsics, size) \
        if 'depth' in outputs else None
    pca = FeaturePca.fit(rec.gaussians.features) if 'features' in outputs else None
    palette = label_palette(len(phrases))
    render_channels = tuple(channel for channel in ('rgb', 'depth', 'features') if channel in outputs)
    digits = max(4, len(str(len(path) - 1)))
    if size[0] % 2 or size[1] % 2:
        _log.warning('%dx%d: MPEG-4 frames have even sides, so the videos hold %dx%d (the PNG frames keep every '
                     'pixel)', size[0], size[1], size[0] - size[0] % 2, size[1] - size[1] % 2)
    sinks = {channel: ChannelOutput(out_dir, channel, size, fps, digits) for channel in outputs}
    render_ms, frame_ms = [], []
    try:
        with logging_redirect_tqdm():
            for index in tqdm(range(len(path)), desc='lsm-ros render', unit='frame'):
                t0 = time.perf_counter()
                view = reconstructor.render(rec, path.poses[index], path.intrinsics[index], size, render_channels,
                                            phrases or None)
                t1 = time.perf_counter()
                for channel, image in frame_images(view, outputs, depth_range, pca, palette).items():
                    sinks[channel].write(index, image)
                render_ms.append(1e3 * (t1 - t0))
                frame_ms.append(1e3 * (time.perf_counter() - t0))
    finally:
        for sink in sinks.values():
            sink.close()
    files = {channel: {'frames': sink.frame_pattern, 'video': sink.video_path.name if sink.video_path else None}
             for channel, sink in sinks.items()}
    return dict(files=files, depth_range=depth_range, render_ms=render_ms, frame_ms=frame_ms)


def cmd_render(args: argparse.Namespace) -> int:
    import time

    from lsm_ros import io
    from lsm_ros.camera_path import camera_path
    from lsm_ros.pipeline import DEPTH_MIN_ALPHA, MAX_RENDER_SIZE
    from lsm_ros.preprocess import ImageCrop
    from lsm_ros.semantics import DEFAULT_LABELS, label_palette

    outputs = tuple(dict.fromkeys(args.channels))
    phrases = _query_phrases(args)
    if phrases and 'labels' not in outputs:
        outputs += ('labels',)
    if 'labels' in outputs:
        phrases = phrases or DEFAULT_LABELS
        from lsm_ros.weights import installed_checkpoints
        if not (args.lsm_checkpoint or args.reference_weights or 'lsm_checkpoint' in installed_checkpoints()):
            raise SystemExit('lsm-ros: the labels channel decodes the rendered features with the LSM network: pass '
                             'the official files (--lsm-checkpoint checkpoint-final.pth with --dust3r-checkpoint '
                             'and --lseg-checkpoint) or --reference-weights (untrained), or leave labels out')
    if args.frames < 2:
        raise SystemExit(f'lsm-ros: --frames {args.frames}: need at least 2 (view 1 and view 2)')
    if not args.fps > 0:
        raise SystemExit(f'lsm-ros: --fps {args.fps}: must be positive')
    if args.size is not None and not all(1 <= side <= MAX_RENDER_SIZE for side in args.size):
        raise SystemExit(f'lsm-ros: --size {args.size[0]} {args.size[1]}: each side must be 1..{MAX_RENDER_SIZE} '
                         'pixels')
    try:
        rec = load_reconstruction(args.reconstruction)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f'lsm-ros: {exc}') from exc
    if rec.gaussians is None:
        raise SystemExit(f'lsm-ros: {args.reconstruction} holds no Gaussians: it was made by the geometry-only '
                         'model. Rendering needs a reconstruction of the full LSM (lsm-ros reconstruct '
                         '--lsm-checkpoint ...)')
    size = rec.size if args.size is None else (args.size[0], args.size[1])
    resize = ImageCrop(input_size=rec.size, resized_size=size, crop_box=(0, 0, *size))
    try:
        path = camera_path(rec.T_1_2, resize.intrinsics_to_model(rec.K_1), resize.intrinsics_to_model(rec.K_2),
                           args.frames, args.path)
    except ValueError as exc:
        raise SystemExit(f'lsm-ros: {args.reconstruction}: {exc}') from exc
    if np.allclose(rec.T_1_2, np.eye(4)):
        _log.warning('view 2 coincides with view 1 (did the relative pose fail?): the camera does not move')

    if 'labels' in outputs:
        reconstructor = build_reconstructor(args, allow_untrained=False)
        if not reconstructor.semantic:
            raise SystemExit(f'lsm-ros: the labels channel needs the full LSM, but {reconstructor.weights} is '
                             'geometry only: pass --lsm-checkpoint checkpoint-final.pth')
    else:
        try:
            reconstructor = rendering_only_reconstructor(args.device)
        except ValueError as exc:
            raise SystemExit(f'lsm-ros: --device: {exc}') from exc
    untrained = {source.weights: source for source in (rec, reconstructor) if not source.trained_weights}
    for source in untrained.values():
        warn_untrained(source)

    out_dir = Path(args.out)
    t_start = time.perf_counter()
    written = write_path_frames(reconstructor, rec, path, size, outputs, phrases, out_dir, args.fps)
    total_s = time.perf_counter() - t_start
    psnr = source_view_psnr(reconstructor, rec)
    paths: dict[str, Path] = {}
    if phrases:
        palette = label_palette(len(phrases))
        paths['labels legend'] = io.write_json(out_dir / LABELS_JSON, {
            'phrases': phrases, 'unlabelled_colour_rgb': [0, 0, 0],
            'definition': "label = the phrase of the largest of LSM's logits of the rendered features; black where "
                          f'the accumulated opacity is below {DEPTH_MIN_ALPHA} (nothing rendered)',
            'legend': [{'label': index, 'phrase': phrase, 'colour_rgb': palette[index]}
                       for index, phrase in enumerate(phrases)]})
    known_provenance = rec.weights != UNKNOWN_WEIGHTS
    backend = 'gsplat' if reconstructor.device.type == 'cuda' else 'torch'   # Reconstructor.render's 'auto' choice
    median_render_ms = float(np.median(written['render_ms']))
    paths['record'] = io.write_json(out_dir / RENDER_JSON, {
        'reconstruction': str(args.reconstruction),
        'frame': 'left camera optical frame (REP 103: x right, y down, z forward); poses are T_left_camera, '
                 'X_left = T X_camera',
        'units': 'metres' if rec.metric_scale else 'model units',
        'frames': len(path), 'fps': args.fps, 'path': args.path, 'width': size[0], 'height': size[1],
        'channels': list(outputs), 'phrases': list(phrases), 'files': written['files'],
        'fractions': path.fractions, 'poses': path.poses, 'intrinsics': path.intrinsics,
        'depth_range': written['depth_range'],
        'source_view_psnr_db': psnr, 'source_view_note': SOURCE_VIEW_NOTE,
        'timings': {'median_render_ms': median_render_ms, 'median_frame_ms': float(np.median(written['frame_ms'])),
                    'total_s': total_s, 'backend': backend, 'device': str(reconstructor.device)},
        'weights': reconstructor.weights if phrases else None,
        'trained_weights': reconstructor.trained_weights if phrases else None,
        'reconstruction_weights': rec.weights if known_provenance else None,
        'reconstruction_trained_weights': rec.trained_weights if known_provenance else None,
        'untrained': bool(untrained)})
    _log.info('%d frames at %dx%d (%s): median %.1f ms per render (%s on %s), %.1f s in all', len(path), size[0],
              size[1], ', '.join(outputs), median_render_ms, backend, reconstructor.device, total_s)
    _log.info('source-view PSNR: left %.2f dB, right %.2f dB (%s)', psnr['left'], psnr['right'], SOURCE_VIEW_NOTE)
    for channel, files in written['files'].items():
        _log.info('wrote %-8s %s%s', channel, out_dir / files['frames'],
                  f" and {out_dir / files['video']}" if files['video'] else '')
    for name, file in paths.items():
        _log.info('wrote %-8s %s', name, file)
    for source in untrained.values():
        warn_untrained(source)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lsm_ros.ros.demo import run_demo
    reconstructor = build_reconstructor(args, allow_untrained=True)
    warn_untrained(reconstructor)
    summary = run_demo(Path(args.out), bag=Path(args.bag) if args.bag else None, max_pairs=args.max_pairs,
                       reconstructor=reconstructor, realtime=args.realtime, rate=args.rate)
    warn_untrained(reconstructor)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lsm_ros.benchmark import run_bench_command
    return run_bench_command(args)


def cmd_weights_fetch(args: argparse.Namespace) -> int:
    from lsm_ros.weights import fetch_weights, weights_dir
    directory = weights_dir(args.dir or None)
    outcomes = fetch_weights(directory, only=args.only, base_url=args.base_url, timeout=args.timeout,
                             progress=not args.no_progress, force=args.force)
    for outcome in outcomes:
        if outcome.result is not None:
            print(outcome.result.describe())
        else:
            print(f'lsm-ros: {outcome.error}', file=sys.stderr)
    failed = [outcome.entry.filename for outcome in outcomes if not outcome.ok]
    if failed:
        print(f'lsm-ros: weights fetch: {len(failed)} of {len(outcomes)} file(s) not installed: {", ".join(failed)}',
              file=sys.stderr)
        return 1
    print(f'all {len(outcomes)} file(s) in {directory}')
    return 0


def cmd_weights_check(args: argparse.Namespace) -> int:
    from lsm_ros.weights import check_weights, format_check_table, weights_dir
    directory = weights_dir(args.dir or None)
    rows = check_weights(directory, only=args.only, hashes=not args.no_hash)
    print(f'weights in {directory}:')
    print(format_check_table(rows))
    failed = [row.path.name for row in rows if not row.ok]
    if failed:
        print(f'lsm-ros: weights check failed for {", ".join(failed)}', file=sys.stderr)
        return 1
    return 0


def cmd_weights_convert(args: argparse.Namespace) -> int:
    from lsm_ros.model.checkpoint import CheckpointError
    from lsm_ros.weights import WeightsError, convert_weights
    try:
        results = convert_weights(args.out, dust3r=args.dust3r, lseg=args.lseg, lsm=args.lsm)
    except (WeightsError, CheckpointError, OSError) as exc:
        raise SystemExit(f'lsm-ros: weights convert: {exc}') from exc
    for result in results:
        print(result.describe())
    return 0


def bounded_number(convert: Callable[[str], Number], *, minimum: float, maximum: float = math.inf,
                   exclusive_minimum: bool = False, exclusive_maximum: bool = False, not_a_number: str,
                   out_of_range: str, name: str, doc: str) -> Callable[[str], Number]:
    """An argparse type: ``convert(text)`` (ValueError -> "'<text>' is not <not_a_number>"), then a range check
    (failure -> ``out_of_range`` formatted with ``text`` and ``value``). NaN is out of every range."""
    def parse(text: str) -> Number:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {not_a_number}') from None
        above = value > minimum if exclusive_minimum else value >= minimum
        below = value < maximum if exclusive_maximum else value <= maximum
        if not (above and below):
            raise argparse.ArgumentTypeError(out_of_range.format(text=text, value=value))
        return value

    parse.__name__ = parse.__qualname__ = name
    parse.__doc__ = doc
    return parse


positive_int = bounded_number(int, minimum=1, not_a_number='an integer', out_of_range='{value} is not a positive '
                              'integer', name='positive_int', doc='argparse type: an integer >= 1.')
non_negative_int = bounded_number(int, minimum=0, not_a_number='an integer', out_of_range='{value} is negative',
                                  name='non_negative_int', doc='argparse type: an integer >= 0.')
positive_float = bounded_number(float, minimum=0.0, exclusive_minimum=True, exclusive_maximum=True,
                                not_a_number='a number', out_of_range='{text} is not a positive number',
                                name='positive_float', doc='argparse type: a finite number > 0.')
probability = bounded_number(float, minimum=0.0, maximum=1.0, not_a_number='a number',
                             out_of_range='{text} is not a probability in [0, 1]', name='probability',
                             doc='argparse type: a number in [0, 1].')


def model_size(text: str):
    """argparse type: a bench model size (224, 256, or WxH with a long side of 512)."""
    from lsm_ros.benchmark import parse_model_size
    try:
        return parse_model_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    from lsm_ros.camera_path import PATH_MODES
    from lsm_ros.config import PRECISIONS
    parser = argparse.ArgumentParser(prog='lsm-ros', description='Large Spatial Model for ROS 2')
    parser.add_argument('-v', '--verbose', action='store_true', help='debug logging')
    sub = parser.add_subparsers(dest='command', required=True)

    rec = sub.add_parser('reconstruct', help='reconstruct one image pair into a folder',
                         description='Reconstruct LEFT and RIGHT (any size, same for both) and write points.ply, '
                                     'depth_{left,right}.npy/.png, cameras.json and reconstruction.npz to --out; '
                                     'with the semantic model also gaussians.ply (3D Gaussian Splatting layout) '
                                     'and, for --query, masks and label images.')
    rec.add_argument('left', help='left / first image file')
    rec.add_argument('right', help='right / second image file')
    rec.add_argument('--out', required=True, help='output folder (created)')
    rec.add_argument('--intrinsics', default='',
                     help="known intrinsics of the input images: 'fx,fy,cx,cy' or a JSON/YAML file with K_left, "
                          'K_right and optional baseline_m')
    rec.add_argument('--baseline', type=float, default=None,
                     help='calibrated stereo baseline in metres: scales the reconstruction to metres')
    rec.add_argument('--query', action='append', metavar='PHRASE',
                     help='text query (repeatable, e.g. --query chair --query table; semantic model only): writes '
                          'masks/{left,right}_<phrase>.png, labels_{left,right}.png and query.json')
    rec.add_argument('--threshold', type=probability, default=0.0, metavar='P',
                     help='with --query: minimum probability in [0, 1] of a masked pixel (default 0: arg-max)')
    add_weights_arguments(rec)
    rec.set_defaults(func=cmd_reconstruct)

    demo = sub.add_parser('demo', help='run lsm_node on a stereo bag and write the published products',
                          description='Plays a stereo rosbag2 (default: the EuRoC bag of ../shared/data, else a '
                                      'generated synthetic one) into lsm_node over loopback and writes what it '
                                      'publishes to --out. Without official weights the reference weights run '
                                      '(UNTRAINED outputs).')
    demo.add_argument('--out', default='demo_out', help='output folder (default demo_out)')
    demo.add_argument('--bag', default='', help='rosbag2 folder or file with /stereo/{left,right}/... topics')
    demo.add_argument('--max-pairs', type=int, default=5, help='stereo pairs to play (default 5)')
    demo.add_argument('--realtime', action='store_true',
                      help='play at the bag\'s timing (scaled by --rate) instead of one pair at a time: slow '
                           'inference then drops pairs ("latest pair wins")')
    demo.add_argument('--rate', type=float, default=1.0, help='playback rate factor with --realtime (default 1)')
    add_weights_arguments(demo)
    demo.set_defaults(func=cmd_demo)

    ren = sub.add_parser('render', help='render a saved reconstruction along a camera path (PNG frames and MP4)',
                         description='Render the Gaussians of a reconstruction written by "lsm-ros reconstruct" '
                                     '(full LSM) from virtual cameras moving from view 1 to view 2 (and back), and '
                                     'write per channel PNG frames DIR/<channel>/NNNN.png and a video '
                                     'DIR/<channel>.mp4, plus render.json (path, timings, source-view PSNR). RGB, '
                                     'depth and features need no weights; labels need the LSM network.')
    ren.add_argument('reconstruction', help=f'folder written by lsm-ros reconstruct, or its {RECONSTRUCTION_NPZ}')
    ren.add_argument('--out', required=True, help='output folder (created)')
    ren.add_argument('--frames', type=int, default=60, help='frames of the video (>= 2; default 60)')
    ren.add_argument('--fps', type=float, default=30.0, help='video frame rate (default 30)')
    ren.add_argument('--path', default='there_and_back', choices=PATH_MODES,
                     help='view 1 to view 2 and back, looping (default), or view 1 to view 2')
    ren.add_argument('--channels', nargs='+', default=list(DEFAULT_RENDER_OUTPUTS), choices=RENDER_OUTPUTS,
                     metavar='CHANNEL',
                     help=f'any of {", ".join(RENDER_OUTPUTS)} (default {" ".join(DEFAULT_RENDER_OUTPUTS)}): colours, '
                          'depth colour map over one range for the whole path, PCA of the features with one '
                          'basis, label colours (legend labels.json)')
    ren.add_argument('--query', nargs='+', action='extend', metavar='PHRASE',
                     help='phrases of the labels channel (implies it; default LSM\'s eight labels)')
    ren.add_argument('--size', nargs=2, type=int, metavar=('W', 'H'), help='frame size (default the model size)')
    add_weights_arguments(ren, inference=False)
    ren.set_defaults(func=cmd_render)

    bench = sub.add_parser(
        'bench', help='measure speed and memory: per pipeline stage, or the ROS path (--ros)',
        description='Stage mode: warm-up plus --pairs timed image pairs at each of --resolutions through the '
                    'stages composed from the public APIs (checked once against Reconstructor.reconstruct); prints '
                    'per stage median and p95 (ms), the totals, pairs/s and peak memory as a markdown table. '
                    '--ros: lsm_node in this process on loopback, stereo pairs with CameraInfo published at --rate '
                    'for --duration s: latency publish -> all products, pairs dropped, backlog, RSS growth. The '
                    'model is the full-size LSM with the reference weights (UNTRAINED; seeded random weights when '
                    'the reference folder is absent), the official files when given, or the tiny model (--quick).')
    bench.add_argument('--quick', action='store_true',
                       help='the tiny random LSM (LsmConfig.tiny()) instead of the full-size model (for tests)')
    bench.add_argument('--ros', action='store_true', help='measure the ROS path instead of the stages')
    bench.add_argument('--resolutions', nargs='+', type=model_size, metavar='SIZE',
                       help='model sizes: 224, 256 or WxH with a long side of 512 (default 224 256 512x384; with '
                            '--ros one size of 224, 256, 512x384, default 256, or 224 with --quick)')
    bench.add_argument('--pairs', type=positive_int, default=5, help='timed pairs per size (default 5)')
    bench.add_argument('--warmup', type=non_negative_int, default=1,
                       help='untimed pairs first at each size (default 1)')
    bench.add_argument('--images', default='auto',
                       help='image pairs: auto (default: the first available of the following), reference (the '
                            'parity reference pair), demo (shared/data/lsm_demo_pairs), synthetic (ray-cast room); '
                            'cropped and resized to each size')
    bench.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda' or 'cuda:N' (default auto)")
    bench.add_argument('--precision', nargs='+', default=None, choices=PRECISIONS, metavar='P',
                       help="the pipeline's precision (PipelineConfig.precision): one or more of "
                            f"{', '.join(PRECISIONS)}, each measured in turn on the same model, one table each "
                            '(default fp32, exact)')
    bench.add_argument('--cuda-graphs', action='store_true',
                       help='PipelineConfig.cuda_graphs: replay DUSt3R and LSeg from CUDA graphs (CUDA only)')
    bench.add_argument('--cuda-streams', action='store_true',
                       help='PipelineConfig.cuda_streams: LSeg beside DUSt3R, PTv3 beside the cameras (CUDA only)')
    bench.add_argument('--threads', type=positive_int, default=None,
                       help='torch CPU threads (default: torch\'s own choice)')
    bench.add_argument('--rate', type=positive_float, default=30.0, help='--ros: pairs published per second '
                                                                        '(default 30)')
    bench.add_argument('--duration', type=positive_float, default=60.0,
                       help='--ros: seconds of publishing after the warm-up pair (default 60)')
    bench.add_argument('--max-other-cores', type=positive_float, default=None, metavar='CORES',
                       help='on a shared machine: repeat a timed pair during which other processes kept more than '
                            'CORES cores busy on average, after waiting for a quiet moment (with --ros: wait for '
                            'one before streaming); default: keep every pair')
    bench.add_argument('--json', metavar='PATH', help='also write every figure to this JSON file')
    bench.add_argument('--dust3r-checkpoint', metavar='FILE', default='',
                       help='official DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth (with --lsm-checkpoint)')
    bench.add_argument('--lseg-checkpoint', metavar='FILE', default='', help='official LSeg demo_e200.ckpt')
    bench.add_argument('--lsm-checkpoint', metavar='FILE', default='',
                       help='official LSM checkpoint-final.pth: time the trained model instead of the reference '
                            'weights')
    bench.set_defaults(func=cmd_bench)
    add_weights_commands(sub)
    return parser


def add_weights_commands(sub: argparse._SubParsersAction) -> None:
    """``lsm-ros weights fetch|check|convert``."""
    from lsm_ros.weights import DEFAULT_TIMEOUT_S, WEIGHT_KEYS, WEIGHTS_ENV
    weights = sub.add_parser('weights', help='download, verify and convert the official weight files',
                             description='The three official files: DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth, '
                                         'demo_e200.ckpt (LSeg) and checkpoint-final.pth (LSM).')
    commands = weights.add_subparsers(dest='weights_command', required=True)
    folder_help = f'weights folder (default ${WEIGHTS_ENV}, else ~/.cache/lsm_ros/weights)'
    only_help = 'only this file (repeatable; default all three)'

    fetch = commands.add_parser(
        'fetch', help='download the official files (resumable, verified)',
        description='Download the official files from their published addresses into --dir, with a progress bar. '
                    'An interrupted download is resumed by running the command again (HTTP Range on <name>.part; '
                    'from zero when the server cannot resume). Each file is checked against its published size '
                    'and SHA-256 (or the ones the server announces) and installed under its name only then '
                    '(atomic rename); a file that cannot be verified says so and prints its SHA-256. LSeg\'s '
                    'demo_e200.ckpt is published on Google Drive only: the command says how to get it by hand. '
                    'Exit status 1 when any file was not installed.')
    fetch.add_argument('--dir', default='', metavar='DIR', help=folder_help)
    fetch.add_argument('--only', action='append', choices=WEIGHT_KEYS, help=only_help)
    fetch.add_argument('--timeout', type=positive_float, default=DEFAULT_TIMEOUT_S, metavar='SECONDS',
                       help=f'give up when the server sends nothing for this long (default {DEFAULT_TIMEOUT_S:g})')
    fetch.add_argument('--base-url', default=None, metavar='URL',
                       help='download every file from URL/<file name> (a mirror) instead of its published address')
    fetch.add_argument('--force', action='store_true',
                       help='download again files that are already there (replaced only once verified)')
    fetch.add_argument('--no-progress', action='store_true', help='no progress bar')
    fetch.set_defaults(func=cmd_weights_fetch)

    check = commands.add_parser(
        'check', help='verify the files in a folder (size, SHA-256, loads as the right checkpoint)',
        description='For each official file in --dir (and its .safetensors conversion, if any): present, size and '
                    'SHA-256 against the published ones (when published; else the SHA-256 of the local copy is '
                    'printed to compare), and that it loads safely as the right kind of checkpoint (memory-mapped: '
                    'the weights are not read). Exit status 1 when a file is missing or a check fails.')
    check.add_argument('--dir', default='', metavar='DIR', help=folder_help)
    check.add_argument('--only', action='append', choices=WEIGHT_KEYS, help=only_help)
    check.add_argument('--no-hash', action='store_true',
                       help='skip the SHA-256 (which reads every byte); size and loading are still checked')
    check.set_defaults(func=cmd_weights_check)

    convert = commands.add_parser(
        'convert', help='convert official files to safetensors (loadable without pickle)',
        description='Write <stem>.safetensors into --out for each file given: the state dict\'s tensors unchanged '
                    'and, as JSON metadata, the configuration the loaders need. Every --*-checkpoint option and '
                    'the node parameters accept these files in place of the official ones, with identical outputs. '
                    'An LSM file converted together with DUSt3R/LSeg names their conversions.')
    convert.add_argument('--dust3r', metavar='FILE', help='DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth')
    convert.add_argument('--lseg', metavar='FILE', help='demo_e200.ckpt')
    convert.add_argument('--lsm', metavar='FILE', help='checkpoint-final.pth')
    convert.add_argument('--out', required=True, metavar='DIR', help='output folder (created)')
    convert.set_defaults(func=cmd_weights_convert)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s', datefmt='%H:%M:%S')
    import lsm_ros.compat  # noqa: F401  (torchvision on CPU torch, before anything imports timm)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
