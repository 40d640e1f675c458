"""The ``lsm-ros`` command.

    lsm-ros reconstruct LEFT RIGHT --out DIR [--dust3r-checkpoint F] [--lsm-checkpoint F] [--lseg-checkpoint F]
                                             [--device auto|cpu|cuda] [--resolution 224|256|512]
                                             [--intrinsics fx,fy,cx,cy | FILE] [--baseline METRES]
                                             [--query PHRASE ...] [--threshold P]   # semantic model only
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
GAUSSIANS_PLY = 'gaussians.ply'
QUERY_JSON = 'query.json'
MASKS_DIR = 'masks'


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

    Official files when given (the LSM file: full model; the DUSt3R file alone: geometry only); else, if
    ``args.reference_weights`` or ``allow_untrained``, the full LSM with the reference weights (or, without the
    reference folder, seeded random weights at the official size), with a loud warning."""
    from lsm_ros.config import PipelineConfig
    from lsm_ros.pipeline import Reconstructor
    from lsm_ros.reference_weights import find_reference_dir

    config = PipelineConfig(dust3r_checkpoint=args.dust3r_checkpoint, lseg_checkpoint=args.lseg_checkpoint,
                            lsm_checkpoint=args.lsm_checkpoint, device=args.device, resolution=args.resolution,
                            min_confidence=args.min_confidence)
    if args.dust3r_checkpoint or args.lsm_checkpoint:
        return Reconstructor.from_checkpoints(config=config)
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
    if rec.gaussians is not None:
        arrays.update({name: np.asarray(getattr(rec.gaussians, name)) for name in io.GAUSSIAN_FIELDS})
        paths['gaussians'] = io.write_gaussian_ply(out_dir / GAUSSIANS_PLY, rec.gaussians)
    np.savez_compressed(out_dir / RECONSTRUCTION_NPZ, **arrays)
    paths['npz'] = out_dir / RECONSTRUCTION_NPZ
    return paths


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
def cmd_reconstruct(args: argparse.Namespace) -> int:
    from lsm_ros.semantics import validate_phrases
    try:
        phrases = validate_phrases(args.query) if args.query else ()
    except ValueError as exc:
        raise SystemExit(f'lsm-ros: --query: {exc}') from exc
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


def cmd_demo(args: argparse.Namespace) -> int:
    from lsm_ros.ros.demo import run_demo
    reconstructor = build_reconstructor(args, allow_untrained=True)
    warn_untrained(reconstructor)
    summary = run_demo(Path(args.out), bag=Path(args.bag) if args.bag else None, max_pairs=args.max_pairs,
                       reconstructor=reconstructor, realtime=args.realtime, rate=args.rate)
    warn_untrained(reconstructor)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f'{text} is not a probability in [0, 1]')
    return value


def build_parser() -> argparse.ArgumentParser:
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
