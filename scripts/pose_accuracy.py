#!/usr/bin/env python3
"""Relative-pose accuracy and speed: the torch path of ``lsm_ros.cameras`` against the former OpenCV path (the
oracle in ``test/pose_oracle.py``), side by side, on ICL-NUIM ground truth and on synthetic cameras.

Point maps: the real network needs weights we do not have, so the point maps are built EXACTLY from ground truth
and then corrupted the way DUSt3R's are (documented in :func:`corrupt`):

- ICL-NUIM (``../shared/data/icl_nuim_slambook2``, SOURCE.txt): each frame's GT depth, resampled to the model
  resolution through the pre-processing crop (as DUSt3R sees it), back-projected with the model-resolution K, and
  view 2's points moved into frame 1 with the GT pose (fy made positive as SOURCE.txt says); pairs (1,2), (4,5),
  (1,3) at 512x384 and 256x256 (crops of 640x480).
- synthetic: two smooth non-planar depth maps seen by cameras of focal 100 / 115 px at 128x96 (as
  test/test_cameras.py), and random cameras (random rotation up to 30 deg, translation, focal 0.7-2 x the long
  side) over a random smooth surface at 256x192.

Noise levels (on view 2's points in frame 1, along camera 1's rays): ``clean``; ``realistic``: a smooth
multiplicative depth error (random low-frequency field, 1 % RMS),
0.5 % per-pixel depth noise, 10 % low-confidence outliers (depth x U(0.5, 1.5), confidence U(1, 1.3)) and 2 %
confident outliers (depth x U(0.8, 1.2)), inlier confidence U(2, 8); ``hard``: 2 % smooth + 1 % per-pixel noise,
20 % low-confidence and 10 % confident outliers.

For each case both paths run with and without K_2 (known / estimated focal); errors: rotation (deg), translation
direction (deg), focal (%, estimated-focal runs). Timings: the best of ``--repeats`` calls, torch and OpenCV each
on ``--threads`` threads. Also counts the host synchronisations per call of the torch cores (TorchDispatchMode).

    .venv/bin/python scripts/pose_accuracy.py [--seeds 3] [--repeats 3] [--threads 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'test'))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lsm_ros import cameras  # noqa: E402

_log = logging.getLogger('pose_accuracy')


def smooth_field(height: int, width: int, rng: np.random.Generator, waves: int = 6) -> np.ndarray:
    """(H,W) random low-frequency field of unit RMS (sum of random plane waves of 0.5-3 cycles per image)."""
    ys, xs = np.mgrid[:height, :width] / max(height, width)
    field = np.zeros((height, width))
    for _ in range(waves):
        frequency = rng.uniform(0.5, 3.0) * 2 * np.pi
        angle, phase = rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)
        field += np.sin(frequency * (np.cos(angle) * xs + np.sin(angle) * ys) + phase)
    return field / np.sqrt(np.mean(field ** 2))


NOISE_LEVELS = {
    'clean': None,
    'realistic': dict(smooth=0.01, pixel=0.005, low_conf_outliers=0.10, confident_outliers=0.02),
    'hard': dict(smooth=0.02, pixel=0.01, low_conf_outliers=0.20, confident_outliers=0.10),
}


def corrupt(points: np.ndarray, level: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """View 2's points (H,W,3) IN FRAME 1 (as DUSt3R predicts them) -> (noisy points, confidence (H,W)). The error
    is along camera 1's ray through each point (DUSt3R predicts view 2's points as seen from camera 1, so its depth
    errors are in that frame and show up as reprojection errors in camera 2): smooth multiplicative error +
    per-pixel noise; outliers scale the point randomly; low-confidence outliers get confidence in [1, 1.3), the
    rest [2, 8)."""
    height, width = points.shape[:2]
    params = NOISE_LEVELS[level]
    if params is None:
        return points.copy(), np.ones((height, width))
    factor = 1.0 + params['smooth'] * smooth_field(height, width, rng) + rng.normal(0, params['pixel'], (height, width))
    confidence = rng.uniform(2.0, 8.0, (height, width))
    draw = rng.random((height, width))
    low = draw < params['low_conf_outliers']
    low_bound = params['low_conf_outliers']
    confident = (draw >= low_bound) & (draw < low_bound + params['confident_outliers'])
    factor[low] = rng.uniform(0.5, 1.5, low.sum())
    confidence[low] = rng.uniform(1.0, 1.3, low.sum())
    factor[confident] = rng.uniform(0.8, 1.2, confident.sum())
    return points * factor[..., None], confidence


def icl_cases(resolutions: list[int]) -> list[dict]:
    import pose_oracle as oracle
    cases = []
    for frame_1, frame_2 in ((1, 2), (4, 5), (1, 3)):
        T_true = oracle.icl_relative_pose(frame_1, frame_2)
        for resolution in resolutions:
            points_2, K = oracle.icl_model_points(frame_2, resolution)
            cases.append(dict(name=f'ICL {frame_1}-{frame_2} @{points_2.shape[1]}x{points_2.shape[0]}',
                              points_own=points_2, K=K, T=T_true))
    return cases


def synthetic_cases(rng: np.random.Generator, count: int) -> list[dict]:
    import test_cameras as tc
    _, _, depth_2 = tc._synthetic_pair()
    cases = [dict(name='synthetic test_cameras 128x96', points_own=tc._back_project(depth_2, tc.K_2), K=tc.K_2,
                  T=tc.T_1_2)]
    height, width = 192, 256
    for index in range(count):
        focal = rng.uniform(0.7, 2.0) * width
        K = cameras.intrinsics_matrix(focal, focal, width / 2, height / 2)
        depth = 3.0 + 0.6 * smooth_field(height, width, rng, waves=4)
        axis = rng.normal(size=3)
        rotvec = axis / np.linalg.norm(axis) * np.deg2rad(rng.uniform(5, 30))
        translation = rng.normal(size=3) * 0.5
        from scipy.spatial.transform import Rotation
        T = np.eye(4)
        T[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
        T[:3, 3] = translation
        cases.append(dict(name=f'synthetic random #{index} 256x192 f={focal:.0f}',
                          points_own=tc._back_project(depth, K), K=K, T=T))
    return cases


def evaluate(result: cameras.RelativePose, T_true: np.ndarray, K_true: np.ndarray, focal_known: bool) -> dict:
    import pose_oracle as oracle
    if not result.success:
        return dict(success=False, rot_deg=np.nan, dir_deg=np.nan, focal_pct=np.nan)
    return dict(success=True, rot_deg=oracle.rotation_error_deg(result.T_1_2, T_true),
                dir_deg=oracle.translation_direction_error_deg(result.T_1_2, T_true),
                focal_pct=np.nan if focal_known else 100 * abs(result.focal_2 / K_true[0, 0] - 1))


def timed(function, repeats: int) -> tuple[object, float]:
    best, result = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return result, best


def count_syncs(points: np.ndarray, confidence: np.ndarray, K: np.ndarray) -> dict[str, int]:
    import pose_oracle as oracle
    tensors = torch.from_numpy(points), torch.from_numpy(confidence)
    counts = {}
    for label, call in (('relative_pose (K known)', lambda: cameras.relative_pose(*tensors, K)),
                        ('relative_pose (focal estimated)', lambda: cameras.relative_pose(*tensors)),
                        ('focal_weiszfeld', lambda: cameras.focal_weiszfeld(tensors[0])),
                        ('stereo_rig_scale', lambda: cameras.stereo_rig_scale(*tensors, K, 0.1)),
                        ('estimate_relative_pose (numpy wrapper)',
                         lambda: cameras.estimate_relative_pose(*tensors))):
        with oracle.host_sync_counter() as counter:
            call()
        counts[label] = counter.total
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=int, default=3, help='noise draws per case and noise level')
    parser.add_argument('--synthetic', type=int, default=4, help='random synthetic cameras')
    parser.add_argument('--resolutions', type=int, nargs='+', default=[512, 256])
    parser.add_argument('--levels', nargs='+', default=list(NOISE_LEVELS), choices=list(NOISE_LEVELS))
    parser.add_argument('--repeats', type=int, default=2, help='timing repeats (best kept)')
    parser.add_argument('--threads', type=int, default=1, help='torch and OpenCV threads')
    parser.add_argument('--max-points', type=int, default=8192, help="pipeline's pose_max_points")
    parser.add_argument('--json', type=Path, help='write every row here')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')

    import cv2
    import pose_oracle as oracle
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    rng = np.random.default_rng(0)
    cases = (icl_cases(args.resolutions) if oracle.ICL.exists() else []) + synthetic_cases(rng, args.synthetic)
    if not oracle.ICL.exists():
        _log.warning('ICL-NUIM data absent (%s): synthetic cases only', oracle.ICL)

    rows = []
    for case in cases:
        for level in args.levels:
            for seed in range(1 if level == 'clean' else args.seeds):
                noise_rng = np.random.default_rng(1000 + seed)
                points_in_1, confidence = corrupt(cameras.points_in_frame(case['points_own'], case['T']), level,
                                                  noise_rng)
                for focal_known in (True, False):
                    K_given = case['K'] if focal_known else None
                    kwargs = dict(max_points=args.max_points)
                    row = dict(case=case['name'], level=level, seed=seed, K='known' if focal_known else 'estimated')
                    for path, function in (('opencv', oracle.estimate_relative_pose_opencv),
                                           ('torch', cameras.estimate_relative_pose)):
                        result, seconds = timed(lambda: function(points_in_1, confidence, K_given, **kwargs),
                                                args.repeats)
                        metrics = evaluate(result, case['T'], case['K'], focal_known)
                        row.update({f'{path}_{key}': value for key, value in metrics.items()})
                        row[f'{path}_ms'] = 1000 * seconds
                    rows.append(row)
                    _log.info('%-34s %-9s s%d K %-9s | rot %.4f / %.4f deg | dir %.4f / %.4f deg | focal %.3f / '
                              '%.3f %% | %.0f / %.0f ms (opencv / torch)', row['case'], level, seed, row['K'],
                              row['opencv_rot_deg'], row['torch_rot_deg'], row['opencv_dir_deg'],
                              row['torch_dir_deg'], row['opencv_focal_pct'], row['torch_focal_pct'],
                              row['opencv_ms'], row['torch_ms'])

    print('\n## Relative pose: OpenCV oracle vs torch (medians over seeds; max in brackets)\n')
    print('| case | noise | K | rot err deg (cv / torch) | t-dir err deg (cv / torch) | focal err % (cv / torch) '
          '| fails (cv / torch) | ms (cv / torch) |')
    print('|---|---|---|---|---|---|---|---|')
    case_order, level_order = [case['name'] for case in cases], list(NOISE_LEVELS)
    keys = sorted({(r['case'], r['level'], r['K']) for r in rows},
                  key=lambda k: (case_order.index(k[0]), level_order.index(k[1]), k[2] != 'known'))
    for case, level, K in keys:
        group = [r for r in rows if (r['case'], r['level'], r['K']) == (case, level, K)]

        def stat(key: str) -> str:
            values = [np.array([r[f'{p}_{key}'] for r in group], dtype=float) for p in ('opencv', 'torch')]
            if all(np.isnan(v).all() for v in values):
                return '-'
            return ' / '.join(f'{np.nanmedian(v):.3g} [{np.nanmax(v):.2g}]' if not np.isnan(v).all() else 'n/a'
                              for v in values)
        fails = ' / '.join(str(sum(not r[f'{p}_success'] for r in group)) for p in ('opencv', 'torch'))
        ms = ' / '.join(f"{np.median([r[f'{p}_ms'] for r in group]):.0f}" for p in ('opencv', 'torch'))
        print(f'| {case} | {level} | {K} | {stat("rot_deg")} | {stat("dir_deg")} | {stat("focal_pct")} | {fails} '
              f'| {ms} |')

    print('\n## Totals per noise level (median / max over all cases and seeds)\n')
    print('| noise | K | rot deg cv | rot deg torch | dir deg cv | dir deg torch | focal % cv | focal % torch | '
          'fails cv | fails torch | ms cv | ms torch |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|')
    for level in args.levels:
        for K in ('known', 'estimated'):
            group = [r for r in rows if r['level'] == level and r['K'] == K]
            cells = []
            for key in ('rot_deg', 'dir_deg', 'focal_pct'):
                for path in ('opencv', 'torch'):
                    values = np.array([r[f'{path}_{key}'] for r in group], dtype=float)
                    cells.append('-' if np.isnan(values).all() else
                                 f'{np.nanmedian(values):.3g} / {np.nanmax(values):.3g}')
            cells += [str(sum(not r[f'{p}_success'] for r in group)) for p in ('opencv', 'torch')]
            cells += [f"{np.median([r[f'{p}_ms'] for r in group]):.0f}" for p in ('opencv', 'torch')]
            print(f'| {level} | {K} | ' + ' | '.join(cells) + ' |')

    first = cases[0]
    points_in_1, confidence = corrupt(cameras.points_in_frame(first['points_own'], first['T']), 'realistic',
                                      np.random.default_rng(0))
    syncs = count_syncs(points_in_1, confidence, first['K'])
    print(f'\n## Host synchronisations per call (aten _local_scalar_dense/nonzero/unique/... + device-to-host copies; '
          f'{first["name"]}, CPU tensors)\n')
    for label, count in syncs.items():
        print(f'- {label}: {count}')
    print(f'\n(torch {torch.__version__}, {args.threads} thread(s) for torch and OpenCV {cv2.__version__}; '
          f'max_points {args.max_points})')
    if args.json:
        args.json.write_text(json.dumps(dict(rows=rows, syncs=syncs), indent=1, default=float))
    return 0


if __name__ == '__main__':
    sys.exit(main())
