"""The ``lsm-ros`` command.

    lsm-ros reconstruct LEFT RIGHT --out DIR [--dust3r-checkpoint F] [--lsm-checkpoint F] [--lseg-checkpoint F]
                                             [--device auto|cpu|cuda] [--resolution 224|256|512]
                                             [--intrinsics fx,fy,cx,cy | FILE] [--baseline METRES]
    lsm-ros demo [--out DIR] [--bag PATH] [--max-pairs N]    # the node on a stereo bag, products to DIR
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

_log = logging.getLogger('lsm_ros.cli')

RECONSTRUCTION_NPZ = 'reconstruction.npz'


# ---------------------------------------------------------------------------------------------- weights
def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    """Checkpoint, device and resolution options shared by the sub-commands."""
    from lsm_ros.config import RESOLUTIONS
    group = parser.add_argument_group('model')
    group.add_argument('--dust3r-checkpoint', metavar='FILE', default='',
                       help='official DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth')
    group.add_argument('--lseg-checkpoint', metavar='FILE', default='', help='official LSeg demo_e200.ckpt')
    group.add_argument('--lsm-checkpoint', metavar='FILE', default='', help='official LSM checkpoint-final.pth')
    group.add_argument('--reference-weights', action='store_true',
                       help='without official files: the deterministic reference weights of the parity tests '
                            '(real network size, UNTRAINED outputs)')
    group.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda' or 'cuda:N' (default auto)")
    group.add_argument('--resolution', type=int, default=256, choices=RESOLUTIONS, help='model resolution')
    group.add_argument('--min-confidence', type=float, default=1.0,
                       help='drop points/depth with DUSt3R confidence below this (>= 1; default keeps all)')


def build_reconstructor(args: argparse.Namespace, *, allow_untrained: bool):
    """A :class:`~lsm_ros.pipeline.Reconstructor` from the parsed options.

    Official files when given; else, if ``args.reference_weights`` or ``allow_untrained``, the reference weights
    (or, without the reference folder, seeded random weights at the official size), with a loud warning."""
    from lsm_ros.config import PipelineConfig
    from lsm_ros.pipeline import Reconstructor
    from lsm_ros.reference_weights import find_reference_dir, reference_dust3r_checkpoint

    config = PipelineConfig(dust3r_checkpoint=args.dust3r_checkpoint, lseg_checkpoint=args.lseg_checkpoint,
                            lsm_checkpoint=args.lsm_checkpoint, device=args.device, resolution=args.resolution,
                            min_confidence=args.min_confidence)
    if args.dust3r_checkpoint or args.lsm_checkpoint:
        return Reconstructor.from_checkpoints(config=config)
    if not (args.reference_weights or allow_untrained):
        raise SystemExit('lsm-ros: no weights given. Pass the official files (--dust3r-checkpoint '
                         'DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth, or --lsm-checkpoint checkpoint-final.pth), or '
                         '--reference-weights to run the real network with untrained reference weights.')
    reference_dir = find_reference_dir()
    if reference_dir is not None:
        checkpoint = reference_dust3r_checkpoint(reference_dir)
        return Reconstructor.from_state_dict(checkpoint, weights=f'reference weights lsmref-v1 ({reference_dir})',
                                             trained_weights=False, config=config)
    _log.warning('reference folder not found: using seeded random weights at the official size')
    return Reconstructor.from_config(config=config)


def warn_untrained(reconstructor) -> None:
    if not reconstructor.trained_weights:
        banner = '!' * 100
        _log.warning('\n%s\n  UNTRAINED WEIGHTS: %s\n  The network, pre-processing and camera recovery are the real '
                     'ones, but these outputs are NOT a real\n  reconstruction. Pass the official checkpoints '
                     '(--dust3r-checkpoint ...) for real results.\n%s', banner, reconstructor.weights, banner)


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
    camera products (``K_1``, ``K_2``, ``T_1_2``, ``depth_1``, ``depth_2``, ``scale_factor``, images)."""
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
        'scale_source': rec.scale_source, 'intrinsics_source': rec.intrinsics_source,
        'width': rec.size[0], 'height': rec.size[1],
        'K_left': rec.K_1, 'K_right': rec.K_2,
        'K_left_input': rec.crop_1.intrinsics_to_input(rec.K_1), 'K_right_input': rec.crop_2.intrinsics_to_input(rec.K_2),
        'T_left_right': rec.T_1_2,
        'right_in_left': {'translation': rec.T_1_2[:3, 3], 'quaternion_xyzw': rotation_to_quaternion_xyzw(rec.T_1_2[:3, :3])},
        'pose': {'success': rec.pose.success, 'inliers': rec.pose.num_inliers,
                 'reprojection_rmse_px': rec.pose.reprojection_rmse_px, 'message': rec.pose.message},
        'weights': rec.weights, 'trained_weights': rec.trained_weights, 'timings_s': rec.timings_s,
    }
    paths['cameras'] = io.write_json(out_dir / 'cameras.json', cameras)
    arrays = dict(rec.network_outputs)
    arrays.update(K_1=rec.K_1, K_2=rec.K_2, T_1_2=rec.T_1_2, depth_1=rec.depth_1, depth_2=rec.depth_2,
                  scale_factor=np.float64(rec.scale_factor), metric_scale=np.bool_(rec.metric_scale),
                  image_1=rec.image_1, image_2=rec.image_2)
    np.savez_compressed(out_dir / RECONSTRUCTION_NPZ, **arrays)
    paths['npz'] = out_dir / RECONSTRUCTION_NPZ
    return paths


# ---------------------------------------------------------------------------------------------- commands
def cmd_reconstruct(args: argparse.Namespace) -> int:
    left, right = read_image(args.left), read_image(args.right)
    calibration = parse_intrinsics(args.intrinsics, args.baseline)
    reconstructor = build_reconstructor(args, allow_untrained=False)
    warn_untrained(reconstructor)
    try:
        rec = reconstructor.reconstruct(left, right, calibration)
    except ValueError as exc:
        raise SystemExit(f'lsm-ros: {exc}') from exc
    paths = save_reconstruction(rec, Path(args.out))
    _log.info('%dx%d, pose %s (%d inliers), |t| = %.4f %s, intrinsics %s; network %.2f s',
              rec.size[0], rec.size[1], 'ok' if rec.pose.success else 'FAILED', rec.pose.num_inliers, rec.baseline,
              'm' if rec.metric_scale else 'model units', rec.intrinsics_source, rec.timings_s['network'])
    for name, path in paths.items():
        _log.info('wrote %-16s %s', name, path)
    warn_untrained(reconstructor)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='lsm-ros', description='Large Spatial Model for ROS 2')
    parser.add_argument('-v', '--verbose', action='store_true', help='debug logging')
    sub = parser.add_subparsers(dest='command', required=True)

    rec = sub.add_parser('reconstruct', help='reconstruct one image pair into a folder',
                         description='Reconstruct LEFT and RIGHT (any size, same for both) and write points.ply, '
                                     'depth_{left,right}.npy/.png, cameras.json and reconstruction.npz to --out.')
    rec.add_argument('left', help='left / first image file')
    rec.add_argument('right', help='right / second image file')
    rec.add_argument('--out', required=True, help='output folder (created)')
    rec.add_argument('--intrinsics', default='',
                     help="known intrinsics of the input images: 'fx,fy,cx,cy' or a JSON/YAML file with K_left, "
                          'K_right and optional baseline_m')
    rec.add_argument('--baseline', type=float, default=None,
                     help='calibrated stereo baseline in metres: scales the reconstruction to metres')
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s', datefmt='%H:%M:%S')
    import lsm_ros.compat  # noqa: F401  (torchvision on CPU torch, before anything imports timm)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
