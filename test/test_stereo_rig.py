"""Calibrated rectified stereo rig: relative pose from the calibration, metric scale from a dense robust fit of the
point map against the baseline (lsm_ros.cameras.stereo_rig_scale), on synthetic cameras with a known scale and on
the KITTI pair (point maps from an SGBM disparity of the real images, OpenCV used as a test tool only)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from lsm_ros.cameras import (estimate_stereo_rig_scale, intrinsics_matrix, is_rectified_stereo_rig, pixel_grid,
                             stereo_rig_scale)
from lsm_ros.pipeline import CameraCalibration

SHARED = Path(os.environ.get('LSM_ROS_SHARED', Path(__file__).resolve().parents[1].parent / 'shared'))
KITTI = SHARED / 'data' / 'kitti_stereo_slambook2'
KITTI_FX, KITTI_CX, KITTI_CY, KITTI_BASELINE = 718.856, 607.1928, 185.2157, 0.573   # SOURCE.txt

HEIGHT, WIDTH = 96, 128
K_RIG = intrinsics_matrix(110.0, 110.0, 63.2, 47.6)
BASELINE = 0.12


def _rig_point_map(scale_m_per_unit: float, rng: np.random.Generator | None = None, smooth_noise: float = 0.0,
                   pixel_noise: float = 0.0, low_conf_outliers: float = 0.0, confident_outliers: float = 0.0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """View 2 (right camera at (B,0,0) m) of a smooth scene: its pixels' points in the LEFT frame, in model units
    (metres / scale), and the confidence. Optional errors as DUSt3R makes them, along camera 1's rays (in frame 1;
    an error along camera 2's own rays would not change the fit): relative smooth + per-pixel depth noise, and
    outliers (depth x U(0.4, 1.6)) with low ([1, 1.3)) or normal confidence (inliers: [2, 8))."""
    ys, xs = np.mgrid[:HEIGHT, :WIDTH].astype(np.float64)
    depth = 2.0 + 0.5 * np.sin(xs / 11) * np.cos(ys / 13) + 0.01 * xs
    pixels = pixel_grid(HEIGHT, WIDTH)
    right = np.stack([(pixels[..., 0] - K_RIG[0, 2]) / K_RIG[0, 0] * depth,
                      (pixels[..., 1] - K_RIG[1, 2]) / K_RIG[1, 1] * depth, depth], -1)
    left = right + np.array([BASELINE, 0.0, 0.0])
    confidence = np.full((HEIGHT, WIDTH), 3.0)
    if rng is not None:
        factor = 1.0 + smooth_noise * np.sin(xs / 23 + 1.0) * np.cos(ys / 19) \
            + rng.normal(0.0, pixel_noise, depth.shape)
        confidence = rng.uniform(2.0, 8.0, depth.shape)
        draw = rng.random(depth.shape)
        low = draw < low_conf_outliers
        confident = (draw >= low_conf_outliers) & (draw < low_conf_outliers + confident_outliers)
        factor[low | confident] = rng.uniform(0.4, 1.6, (low | confident).sum())
        confidence[low] = rng.uniform(1.0, 1.3, low.sum())
        left = left * factor[..., None]
    return left / scale_m_per_unit, confidence


def test_noise_free_scale_and_pose_are_exact() -> None:
    points, confidence = _rig_point_map(2.7)
    result = estimate_stereo_rig_scale(points, confidence, K_RIG, BASELINE)
    assert result.success, result.message
    assert result.scale == pytest.approx(2.7, rel=1e-9)
    np.testing.assert_allclose(result.T_1_2, np.array([[1, 0, 0, BASELINE / 2.7], [0, 1, 0, 0], [0, 0, 1, 0],
                                                       [0, 0, 0, 1.0]]), atol=1e-12)
    assert result.num_pixels == result.num_candidates > 0.6 * HEIGHT * WIDTH
    assert result.disparity_rmse_px < 1e-9 and result.vertical_rmse_px < 1e-9 and result.spread < 1e-9
    assert 'stereo rig' in result.message


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_scale_is_robust_to_noise_and_outliers(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.2, 5.0)
    points, confidence = _rig_point_map(scale, rng, smooth_noise=0.01, pixel_noise=0.005, low_conf_outliers=0.15,
                                        confident_outliers=0.05)
    points[rng.random((HEIGHT, WIDTH)) < 0.05] = np.nan
    result = estimate_stereo_rig_scale(torch.from_numpy(points)[None], torch.from_numpy(confidence), K_RIG,
                                       BASELINE)
    assert result.success, result.message
    assert result.scale == pytest.approx(scale, rel=0.01)
    assert np.linalg.norm(result.T_1_2[:3, 3]) * result.scale == pytest.approx(BASELINE, rel=1e-12)
    assert result.num_pixels > 0.5 * result.num_candidates
    assert 0 < result.spread < 0.1


def test_tensor_core_stays_on_device_without_host_sync() -> None:
    import pose_oracle

    points, confidence = _rig_point_map(1.5)
    tensors = torch.from_numpy(points).float(), torch.from_numpy(confidence).float()
    with pose_oracle.host_sync_counter() as counter:
        result = stereo_rig_scale(*tensors, torch.from_numpy(K_RIG), BASELINE)
    assert counter.total == 0, counter.syncs
    assert result.scale.device == tensors[0].device and result.T_1_2.dtype == torch.float64
    assert float(result.scale) == pytest.approx(1.5, rel=1e-9)


def test_failures_are_reported_not_raised() -> None:
    points, confidence = _rig_point_map(1.0)
    mirrored = points * np.array([-1.0, 1.0, 1.0])      # view 2 to the LEFT of view 1: no positive scale fits
    for bad_points, expected in ((np.full_like(points, np.nan), 'confident pixels'), (mirrored, 'no consistent')):
        result = estimate_stereo_rig_scale(bad_points, confidence, K_RIG, BASELINE)
        assert not result.success and expected in result.message
        assert np.isnan(result.scale)
        np.testing.assert_array_equal(result.T_1_2, np.eye(4))
    with pytest.raises(ValueError, match='baseline'):
        estimate_stereo_rig_scale(points, confidence, K_RIG, 0.0)
    with pytest.raises(ValueError, match='conf_2'):
        estimate_stereo_rig_scale(points, confidence[:, 1:], K_RIG, BASELINE)
    with pytest.raises(ValueError, match='K_2'):
        estimate_stereo_rig_scale(points, confidence, np.eye(4), BASELINE)


def test_is_rectified_stereo_rig() -> None:
    K = intrinsics_matrix(KITTI_FX, KITTI_FX, KITTI_CX, KITTI_CY)
    P_right = np.hstack([K, [[-KITTI_FX * KITTI_BASELINE], [0.0], [0.0]]])
    assert is_rectified_stereo_rig(K, K, P_right)
    assert is_rectified_stereo_rig(K, K, P_right.ravel().tolist())
    assert not is_rectified_stereo_rig(K, K, np.hstack([K, np.zeros((3, 1))]))          # a left / mono camera
    assert not is_rectified_stereo_rig(K, K, P_right * np.array([1, 1, 1, -1.0]))        # negative baseline
    vertical = P_right.copy()
    vertical[1, 3] = -5.0
    assert not is_rectified_stereo_rig(K, K, vertical)                                  # not a horizontal rig
    assert not is_rectified_stereo_rig(K, K * np.array([[1.1], [1.0], [1.0]]), P_right)  # different intrinsics
    assert not is_rectified_stereo_rig(K, K, [1.0, 2.0])


def test_calibration_flag_needs_the_rig() -> None:
    K = intrinsics_matrix(100.0, 100.0, 64.0, 48.0)
    assert CameraCalibration(K, K, baseline_m=0.1, rectified_stereo=True).rectified_stereo
    assert not CameraCalibration(K, K, baseline_m=0.1).rectified_stereo
    with pytest.raises(ValueError, match='rectified_stereo'):
        CameraCalibration(K, None, baseline_m=0.1, rectified_stereo=True)
    with pytest.raises(ValueError, match='rectified_stereo'):
        CameraCalibration(K, K, rectified_stereo=True)


def _kitti_right_view_points() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The KITTI right image's point map in the LEFT frame (metres) from an SGBM disparity of the real pair: each
    left pixel with disparity d is the point at depth fx B / d, seen by the right camera at column u - d (forward
    warp to the nearest right pixel, nearest point kept). Returns (points (H,W,3), confidence (H,W), K)."""
    cv2 = pytest.importorskip('cv2')
    left = np.asarray(PIL.Image.open(KITTI / 'left.png'))
    right = np.asarray(PIL.Image.open(KITTI / 'right.png'))
    sgbm = cv2.StereoSGBM_create(minDisparity=0, numDisparities=96, blockSize=9, P1=8 * 81, P2=32 * 81,
                                 uniquenessRatio=10, speckleWindowSize=100, speckleRange=2, disp12MaxDiff=1)
    disparity = sgbm.compute(left, right).astype(np.float64) / 16.0
    height, width = disparity.shape
    K = intrinsics_matrix(KITTI_FX, KITTI_FX, KITTI_CX, KITTI_CY)
    rows, cols = np.nonzero(disparity > 1.0)
    d = disparity[rows, cols]
    depth = KITTI_FX * KITTI_BASELINE / d
    left_points = np.stack([(cols - KITTI_CX) / KITTI_FX * depth, (rows - KITTI_CY) / KITTI_FX * depth, depth], -1)
    right_cols = np.round(cols - d).astype(int)
    inside = right_cols >= 0
    points = np.full((height, width, 3), np.nan)
    zbuffer = np.full((height, width), np.inf)
    order = np.argsort(-depth[inside])           # far first, so the nearest point is written last
    r, c, p = rows[inside][order], right_cols[inside][order], left_points[inside][order]
    points[r, c] = p
    zbuffer[r, c] = p[:, 2]
    confidence = np.where(np.isfinite(zbuffer), 3.0, 1.0)
    return points, confidence, K


@pytest.mark.skipif(not KITTI.exists(), reason=f'KITTI pair absent ({KITTI})')
def test_kitti_pair_scale_from_the_baseline() -> None:
    points_m, confidence, K = _kitti_right_view_points()
    model_units_per_metre = 0.37                  # any: the network's units are arbitrary
    result = estimate_stereo_rig_scale(points_m * model_units_per_metre, confidence, K, KITTI_BASELINE)
    assert result.success, result.message
    assert result.scale == pytest.approx(1.0 / model_units_per_metre, rel=0.01)
    translation_m = result.T_1_2[:3, 3] * result.scale
    np.testing.assert_allclose(translation_m, [KITTI_BASELINE, 0.0, 0.0], atol=1e-9)
    assert result.num_pixels > 0.8 * result.num_candidates > 50_000
    assert result.vertical_rmse_px < 1.0          # the pair is rectified


@pytest.mark.skipif(not KITTI.exists(), reason=f'KITTI pair absent ({KITTI})')
def test_kitti_pair_through_the_pipeline_gives_the_calibrated_baseline(tiny_lsm_reconstructor) -> None:
    """Untrained tiny LSM on the real KITTI pair with its rig calibration: the relative pose is the calibration's,
    |t| = 0.573 m, without PnP; the untrained point map fits no scale, which the result says (not metric)."""
    left = np.asarray(PIL.Image.open(KITTI / 'left.png'))
    right = np.asarray(PIL.Image.open(KITTI / 'right.png'))
    K = intrinsics_matrix(KITTI_FX, KITTI_FX, KITTI_CX, KITTI_CY)
    calibration = CameraCalibration(K, K, baseline_m=KITTI_BASELINE, source='camera_info', rectified_stereo=True)
    result = tiny_lsm_reconstructor.reconstruct(left, right, calibration)
    assert result.pose_source == 'stereo_calibration' and result.pose.success
    np.testing.assert_allclose(result.T_1_2, [[1, 0, 0, KITTI_BASELINE], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
                               atol=1e-9)
    assert result.baseline == pytest.approx(KITTI_BASELINE)
    assert 'rig calibration' in result.pose.message
    if result.metric_scale:
        assert result.scale_source == 'stereo_rig'
    else:
        assert result.scale_source == 'none' and result.scale_factor == 1.0 and 'not metric' in result.pose.message


def test_pipeline_rig_scale_from_a_known_point_map(tiny_reconstructor, monkeypatch) -> None:
    """The pipeline's camera block on a rig with an exact point map (the network's output replaced): pose from the
    calibration, scale from the dense fit, every product in metres."""
    from lsm_ros.preprocess import preprocess_pair
    true_scale = 3.2                               # metres per model unit
    K_input = intrinsics_matrix(300.0, 300.0, 159.5, 119.5)
    left = right = np.zeros((240, 320, 3), np.uint8)
    view1, _ = preprocess_pair(left, right, tiny_reconstructor.config.resolution)
    K_model = view1.crop.intrinsics_to_model(K_input)
    width, height = view1.crop.model_size
    ys, xs = np.mgrid[:height, :width].astype(np.float64)
    depth = 2.0 + 0.3 * np.sin(xs / 7) + 0.2 * np.cos(ys / 5)
    pixels = pixel_grid(height, width)
    rays = np.stack([(pixels[..., 0] - K_model[0, 2]) / K_model[0, 0],
                     (pixels[..., 1] - K_model[1, 2]) / K_model[1, 1], np.ones((height, width))], -1)
    points_1 = rays * depth[..., None] / true_scale
    points_2 = (rays * depth[..., None] + np.array([0.12, 0.0, 0.0])) / true_scale
    outputs = {'pts3d_1': points_1, 'pts3d_2': points_2, 'conf_1': np.full((height, width), 3.0),
               'conf_2': np.full((height, width), 3.0)}
    monkeypatch.setattr(type(tiny_reconstructor), 'infer', lambda self, img1, img2: {
        key: torch.from_numpy(value).float()[None] for key, value in outputs.items()})
    calibration = CameraCalibration(K_input, K_input, baseline_m=0.12, source='camera_info', rectified_stereo=True)
    result = tiny_reconstructor.reconstruct(left, right, calibration)
    assert result.pose_source == 'stereo_calibration' and result.scale_source == 'stereo_rig'
    assert result.metric_scale and result.scale_factor == pytest.approx(true_scale, rel=1e-5)
    np.testing.assert_allclose(result.T_1_2[:3, 3], [0.12, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(result.depth_1, depth, rtol=1e-5)
    np.testing.assert_allclose(result.depth_2, depth, rtol=1e-5)
    # The same pair without the rig flag goes through PnP and the baseline.
    plain = tiny_reconstructor.reconstruct(left, right, CameraCalibration(K_input, K_input, baseline_m=0.12))
    assert plain.pose_source == 'pnp' and plain.scale_source == 'stereo_baseline'
    assert plain.scale_factor == pytest.approx(true_scale, rel=1e-4)
