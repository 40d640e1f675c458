"""The camera path between the two views and ``lsm-ros render`` (novel-view videos of a saved reconstruction).

The CLI runs on a reconstruction of ``tiny_lsm_reconstructor`` (the real pipeline with a tiny untrained LSM)
whose Gaussians are replaced by exact ones (:func:`_exact_gaussians`); the same reconstructor stands in for the
checkpoint options where labels need the network.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from scipy.spatial.transform import Rotation, Slerp

from lsm_ros import camera_path as cp
from lsm_ros import cli
from lsm_ros.cli import (CAMERAS_JSON, LABELS_JSON, RECONSTRUCTION_NPZ, RENDER_JSON, UNKNOWN_WEIGHTS,
                         load_reconstruction, main, save_reconstruction)
from lsm_ros.io import GAUSSIAN_FIELDS, depth_to_color
from lsm_ros.pipeline import DEPTH_MIN_ALPHA
from lsm_ros.preprocess import ImageCrop
from lsm_ros.semantics import colorize_labels, label_palette
from lsm_ros.visualization import FeaturePca

pytestmark = pytest.mark.timeout(600)
SIZE = (64, 48)


def _pose(rotvec: tuple[float, float, float], translation: tuple[float, float, float]) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix()
    T[:3, 3] = translation
    return T


# ------------------------------------------------------------------------------------------------ camera path
def test_quaternions_round_trip_in_every_branch() -> None:
    rotations = Rotation.random(200, random_state=1).as_matrix()
    # near 180 degrees about each axis: the branches where w is small
    rotations = np.concatenate([rotations, [Rotation.from_rotvec(np.pi * 0.999 * axis).as_matrix()
                                            for axis in np.eye(3)]])
    for R in rotations:
        q = cp.rotation_to_quaternion(R)
        expected = Rotation.from_matrix(R).as_quat()
        expected = -expected if expected[3] < 0 else expected
        np.testing.assert_allclose(q, expected, atol=1e-12)
        np.testing.assert_allclose(cp.quaternion_to_rotation(q), R, atol=1e-12)


def test_slerp_mid_point_and_constant_angular_speed() -> None:
    axis = np.array([1.0, 2.0, -0.5]) / np.linalg.norm([1.0, 2.0, -0.5])
    angle = 1.3
    q_a = np.array([0.0, 0.0, 0.0, 1.0])
    q_b = np.append(np.sin(angle / 2) * axis, np.cos(angle / 2))
    fractions = np.linspace(0, 1, 7)
    q = cp.slerp(q_a, q_b, fractions)
    # rotation about the same axis by fraction * angle: q(t) = (sin(t*angle/2) axis, cos(t*angle/2))
    expected = np.concatenate([np.sin(fractions * angle / 2)[:, None] * axis,
                               np.cos(fractions * angle / 2)[:, None]], axis=1)
    np.testing.assert_allclose(q, expected, atol=1e-12)
    np.testing.assert_allclose(cp.slerp(q_a, -q_b, fractions), expected, atol=1e-12)   # shortest arc
    np.testing.assert_allclose(cp.slerp(q_a, q_a, fractions), np.tile(q_a, (7, 1)), atol=1e-15)


def test_interpolate_poses_matches_scipy_slerp_and_stays_rigid() -> None:
    T_a, T_b = _pose((0.3, -0.2, 0.1), (0.1, 0.0, -0.2)), _pose((-0.5, 1.1, 0.4), (0.5, -0.3, 0.8))
    poses = cp.interpolate_poses(T_a, T_b, 9)
    assert poses.shape == (9, 4, 4)
    np.testing.assert_array_equal(poses[0], T_a)
    np.testing.assert_array_equal(poses[-1], T_b)
    fractions = np.linspace(0, 1, 9)
    reference = Slerp([0, 1], Rotation.from_matrix([T_a[:3, :3], T_b[:3, :3]]))(fractions).as_matrix()
    np.testing.assert_allclose(poses[:, :3, :3], reference, atol=1e-12)
    np.testing.assert_allclose(poses[:, :3, 3], (1 - fractions)[:, None] * T_a[:3, 3] + fractions[:, None] * T_b[:3, 3],
                               atol=1e-15)
    for T in poses:
        np.testing.assert_allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3), atol=1e-12)
        assert np.linalg.det(T[:3, :3]) == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_array_equal(T[3], [0, 0, 0, 1])
        cp.check_rigid(T)


def test_interpolate_intrinsics_is_linear_with_exact_endpoints() -> None:
    K_a = np.array([[200.0, 0, 100], [0, 210, 80], [0, 0, 1]])
    K_b = np.array([[260.0, 0, 110], [0, 250, 70], [0, 0, 1]])
    K = cp.interpolate_intrinsics(K_a, K_b, 5)
    assert K.shape == (5, 3, 3)
    np.testing.assert_array_equal(K[0], K_a)
    np.testing.assert_array_equal(K[-1], K_b)
    np.testing.assert_allclose(K[2], (K_a + K_b) / 2, atol=1e-12)


def test_camera_path_goes_from_view_1_to_view_2_and_back() -> None:
    T_1_2 = _pose((0.02, -0.15, 0.01), (0.3, 0.0, 0.05))
    K_1 = np.array([[200.0, 0, 127.5], [0, 200, 127.5], [0, 0, 1]])
    K_2 = np.array([[220.0, 0, 127.5], [0, 220, 127.5], [0, 0, 1]])
    path = cp.camera_path(T_1_2, K_1, K_2, 8, 'there_and_back')
    assert len(path) == 8 and path.poses.shape == (8, 4, 4) and path.intrinsics.shape == (8, 3, 3)
    np.testing.assert_allclose(path.fractions, [0, 0.25, 0.5, 0.75, 1, 0.75, 0.5, 0.25])
    np.testing.assert_array_equal(path.poses[0], np.eye(4))
    np.testing.assert_array_equal(path.poses[4], T_1_2)
    np.testing.assert_array_equal(path.intrinsics[0], K_1)
    np.testing.assert_array_equal(path.intrinsics[4], K_2)
    np.testing.assert_allclose(path.poses[3], path.poses[5], atol=0)   # the way back retraces the way there
    one_way = cp.camera_path(T_1_2, K_1, K_2, 5, 'one_way')
    np.testing.assert_allclose(one_way.fractions, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_array_equal(one_way.poses[-1], T_1_2)
    for frames in (2, 3, 4, 5, 61):
        fractions = cp.path_fractions(frames, 'there_and_back')
        assert len(fractions) == frames and fractions[0] == 0 and fractions.max() == 1
        assert (fractions[1:] != 0).all()         # loops: frame 0 is not repeated at the end
    np.testing.assert_allclose(cp.path_fractions(3, 'there_and_back'), [0, 1, 0.5])


def test_visible_depth_range_pools_the_points_each_camera_sees() -> None:
    K = np.array([[100.0, 0, 31.5], [0, 100.0, 23.5], [0, 0, 1]])
    points = np.array([[0, 0, 1.0], [0, 0, 3.0],                    # on the optical axis
                       [0, 0, -1.0],                                # behind the camera (at z = 0 for `back`)
                       [100.0, 0, 1.0], [np.nan, 0, 2.0]])          # off the image; not finite
    back = _pose((0, 0, 0), (0, 0, -1.0))                           # one unit further back: depths 2 and 4
    assert cp.visible_depth_range(points, [np.eye(4)], [K], (64, 48), (0, 100)) == (1.0, 3.0)
    assert cp.visible_depth_range(points, [back], [K], (64, 48), (0, 50)) == (2.0, 3.0)
    assert cp.visible_depth_range(points, [np.eye(4), back], [K, K], (64, 48), (0, 100)) == (1.0, 4.0)
    assert cp.visible_depth_range(points[2:3], [np.eye(4)], [K], (64, 48)) is None


def test_camera_path_refuses_bad_input() -> None:
    K = np.diag([200.0, 200.0, 1.0])
    scaled = np.diag([2.0, 2.0, 2.0, 1.0])
    reflected = np.diag([1.0, 1.0, -1.0, 1.0])
    projective = np.eye(4)
    projective[3, 0] = 0.1
    nan = np.eye(4)
    nan[0, 3] = np.nan
    for T, message in ((scaled, 'not rigid'), (reflected, 'not rigid'), (projective, 'last row'),
                       (nan, 'non-finite'), (np.eye(3), '4x4')):
        with pytest.raises(ValueError, match=message):
            cp.camera_path(T, K, K, 4)
        with pytest.raises(ValueError, match=message):
            cp.interpolate_poses(np.eye(4), T, 4)
    for count in (1, 0, -3, 2.5):
        with pytest.raises(ValueError, match='>= 2'):
            cp.interpolate_poses(np.eye(4), np.eye(4), count)
        with pytest.raises(ValueError, match='>= 2'):
            cp.interpolate_intrinsics(K, K, count)
    with pytest.raises(ValueError, match='>= 2'):
        cp.camera_path(np.eye(4), K, K, 1)
    with pytest.raises(ValueError, match='unknown path mode'):
        cp.camera_path(np.eye(4), K, K, 4, 'circle')
    with pytest.raises(ValueError, match='pinhole'):
        cp.camera_path(np.eye(4), K, np.diag([-1.0, 200.0, 1.0]), 4)


# ------------------------------------------------------------------------------------------------ loading
SH_C0 = 0.28209479177387814     # degree-0 SH basis: colour = SH_C0 * DC + 0.5
PLANE_DEPTH = 2.0


def _smooth_image(height: int, width: int, phase: float) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width], dtype=np.float64)[:, None, None]
    rgb = np.stack([0.5 + 0.4 * np.sin(6 * x + phase), 0.5 + 0.4 * np.cos(5 * y), 0.3 + 0.3 * x * y], axis=-1)
    return np.round(rgb * 255).astype(np.uint8)


def _exact_gaussians(rec: Any) -> Any:
    """``rec`` with well-posed cameras and the Gaussians an exact model would give: each pixel's Gaussian on the
    plane PLANE_DEPTH in front of its own camera, on the pixel's ray, 0.3 pixel wide, opaque, of the pixel's
    colour. (The untrained tiny LSM puts every Gaussian behind the camera: nothing to see, and huge footprints
    from other cameras.) Features and rotations stay the network's."""
    width, height = rec.size
    K = np.array([[200.0, 0, (width - 1) / 2], [0, 200.0, (height - 1) / 2], [0, 0, 1]])
    T_1_2 = _pose((0.0, -0.08, 0.0), (0.2, 0.0, 0.0))
    rows, columns = np.mgrid[0:height, 0:width]
    rays = np.stack([(columns - K[0, 2]) / K[0, 0], (rows - K[1, 2]) / K[1, 1], np.ones((height, width))], axis=-1)
    on_plane = PLANE_DEPTH * rays.reshape(-1, 3)
    means = np.concatenate([on_plane, on_plane @ T_1_2[:3, :3].T + T_1_2[:3, 3]]).astype(np.float32)
    n = len(means)
    sh = np.zeros((n, 16, 3), np.float32)
    colours = np.concatenate([rec.image_1, rec.image_2]).reshape(-1, 3) / 255.0
    sh[:, 0] = (colours - 0.5) / SH_C0
    gaussians = dataclasses.replace(rec.gaussians, means=means, sh=sh,
                                    scales=np.full((n, 3), 0.3 * PLANE_DEPTH / K[0, 0], np.float32),
                                    opacities=np.full((n, 1), 0.99, np.float32))
    return dataclasses.replace(rec, K_1=K, K_2=K, T_1_2=T_1_2, gaussians=gaussians)


@pytest.fixture(scope='module')
def saved_reconstruction(tiny_lsm_reconstructor: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A tiny-LSM reconstruction of a smooth pair with exact Gaussians, and the folder ``lsm-ros reconstruct``
    would write for it."""
    left, right = _smooth_image(240, 330, 0.0), _smooth_image(240, 330, 0.3)
    rec = _exact_gaussians(tiny_lsm_reconstructor.reconstruct(left, right))
    folder = tmp_path_factory.mktemp('reconstruction')
    save_reconstruction(rec, folder)
    return rec, folder


def test_load_reconstruction_restores_what_save_reconstruction_wrote(saved_reconstruction: tuple[Any, Path],
                                                                     tmp_path: Path) -> None:
    rec, folder = saved_reconstruction
    for source in (folder, folder / RECONSTRUCTION_NPZ):
        back = load_reconstruction(source)
        for name in ('pts3d_1', 'pts3d_2', 'conf_1', 'conf_2', 'depth_1', 'depth_2', 'K_1', 'K_2', 'T_1_2',
                     'image_1', 'image_2'):
            np.testing.assert_array_equal(getattr(back, name), getattr(rec, name), err_msg=name)
        for name in GAUSSIAN_FIELDS:
            np.testing.assert_array_equal(getattr(back.gaussians, name), getattr(rec.gaussians, name), err_msg=name)
        assert back.size == rec.size and back.scale_factor == rec.scale_factor
        assert (back.weights, back.trained_weights) == (rec.weights, rec.trained_weights)
        assert (back.pose.success, back.pose.num_inliers) == (rec.pose.success, rec.pose.num_inliers)
        assert back.crop_1.intrinsics_to_model(rec.K_1) == pytest.approx(rec.K_1)   # identity crop
        assert set(back.network_outputs) == set(rec.network_outputs)

    bare = tmp_path / 'bare'                       # the npz alone: provenance unknown
    bare.mkdir()
    (bare / RECONSTRUCTION_NPZ).write_bytes((folder / RECONSTRUCTION_NPZ).read_bytes())
    back = load_reconstruction(bare)
    assert back.weights == UNKNOWN_WEIGHTS and back.trained_weights
    (bare / CAMERAS_JSON).write_text('{"weights": ')
    with pytest.raises(ValueError, match='not valid JSON'):
        load_reconstruction(bare)

    geometry = tmp_path / 'geometry'               # geometry-only model: no Gaussians
    save_reconstruction(dataclasses.replace(rec, gaussians=None), geometry)
    assert load_reconstruction(geometry).gaussians is None

    with pytest.raises(FileNotFoundError, match='no such file'):
        load_reconstruction(tmp_path / 'nowhere')
    (tmp_path / 'junk.npz').write_bytes(b'not a zip')
    with pytest.raises(ValueError, match='not a readable npz'):
        load_reconstruction(tmp_path / 'junk.npz')
    with np.load(folder / RECONSTRUCTION_NPZ) as npz:
        arrays = {key: npz[key] for key in npz.files}
    np.savez(tmp_path / 'partial.npz', **{k: v for k, v in arrays.items() if k not in ('sh', 'T_1_2')})
    with pytest.raises(ValueError, match=r"missing \['T_1_2'\]"):
        load_reconstruction(tmp_path / 'partial.npz')
    np.savez(tmp_path / 'partial.npz', **{k: v for k, v in arrays.items() if k != 'sh'})
    with pytest.raises(ValueError, match='incomplete Gaussians'):
        load_reconstruction(tmp_path / 'partial.npz')


# ------------------------------------------------------------------------------------------------ command
def _frames(folder: Path) -> list[np.ndarray]:
    return [cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1] for path in sorted(folder.glob('*.png'))]


def _video_frame_count(path: Path) -> int:
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


def test_cli_render_writes_frames_videos_legend_and_record(saved_reconstruction: tuple[Any, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           tiny_lsm_reconstructor: Any) -> None:
    rec, folder = saved_reconstruction
    monkeypatch.setattr(cli, 'build_reconstructor', lambda args, allow_untrained: tiny_lsm_reconstructor)
    out = tmp_path / 'render'
    assert main(['render', str(folder), '--out', str(out), '--frames', '4', '--fps', '12', '--size', *map(str, SIZE),
                 '--channels', 'rgb', 'depth', 'features', '--query', 'chair', 'floor', '--reference-weights']) == 0
    channels = ('rgb', 'depth', 'features', 'labels')        # --query adds the labels channel
    record = json.loads((out / RENDER_JSON).read_text())
    assert record['channels'] == list(channels) and record['phrases'] == ['chair', 'floor']
    assert (record['frames'], record['fps'], record['path']) == (4, 12.0, 'there_and_back')
    assert (record['width'], record['height']) == SIZE
    poses, intrinsics = np.array(record['poses']), np.array(record['intrinsics'])
    np.testing.assert_allclose(record['fractions'], [0, 0.5, 1, 0.5])
    np.testing.assert_array_equal(poses[0], np.eye(4))
    np.testing.assert_allclose(poses[2], rec.T_1_2, atol=1e-12)
    resize = ImageCrop(input_size=rec.size, resized_size=SIZE, crop_box=(0, 0, *SIZE))
    K_1 = resize.intrinsics_to_model(rec.K_1)
    np.testing.assert_allclose(intrinsics[0], K_1)
    np.testing.assert_allclose(intrinsics[2], resize.intrinsics_to_model(rec.K_2))
    assert record['untrained'] and record['reconstruction_trained_weights'] is False
    assert record['weights'] == tiny_lsm_reconstructor.weights and record['trained_weights'] is False
    timings = record['timings']
    assert timings['median_render_ms'] > 0 and timings['median_frame_ms'] >= timings['median_render_ms']
    assert timings['backend'] and timings['device'] == 'cpu'
    psnr = record['source_view_psnr_db']         # view 1's Gaussians are exact: its render reproduces image_1
    assert set(psnr) == {'left', 'right'} and psnr['left'] > 30 and psnr['right'] > 0
    expected_range = cp.visible_depth_range(rec.gaussians.means, poses, intrinsics, SIZE)
    assert record['depth_range'] == pytest.approx(list(expected_range))

    for channel in channels:
        frames = _frames(out / channel)
        assert len(frames) == 4 and all(frame.shape == (SIZE[1], SIZE[0], 3) for frame in frames), channel
        assert record['files'][channel]['frames'] == f'{channel}/%04d.png'
        video = record['files'][channel]['video']
        if video is not None:                           # OpenCV with an mp4v encoder
            assert video == f'{channel}.mp4' and _video_frame_count(out / video) == 4
    legend = json.loads((out / LABELS_JSON).read_text())
    palette = label_palette(2)
    assert [entry['phrase'] for entry in legend['legend']] == ['chair', 'floor']
    assert [entry['colour_rgb'] for entry in legend['legend']] == palette.tolist()

    # frame 0 is the left camera, coloured with the path's fixed depth range and the Gaussians' PCA basis
    view = tiny_lsm_reconstructor.render(rec, np.eye(4), K_1, SIZE, ('rgb', 'depth', 'features'), ['chair', 'floor'])
    first = {channel: cv2.imread(str(out / channel / '0000.png'), cv2.IMREAD_COLOR)[..., ::-1] for channel in channels}
    np.testing.assert_array_equal(first['rgb'], np.round(view.rgb * 255).astype(np.uint8))
    np.testing.assert_array_equal(first['depth'], depth_to_color(view.depth, *expected_range))
    features = FeaturePca.fit(rec.gaussians.features).colors(view.features)
    features[view.alpha < DEPTH_MIN_ALPHA] = 0
    np.testing.assert_array_equal(first['features'], features)
    np.testing.assert_array_equal(first['labels'], colorize_labels(view.labels, palette))


def test_cli_render_without_labels_runs_no_network(saved_reconstruction: tuple[Any, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _, folder = saved_reconstruction

    def no_weights(args: Any, allow_untrained: bool) -> Any:
        raise AssertionError('rgb, depth and features must not load a network')

    monkeypatch.setattr(cli, 'build_reconstructor', no_weights)
    bare = tmp_path / 'bare'                            # the npz alone: nothing known about its weights
    bare.mkdir()
    (bare / RECONSTRUCTION_NPZ).write_bytes((folder / RECONSTRUCTION_NPZ).read_bytes())
    out = tmp_path / 'render'
    assert main(['render', str(bare / RECONSTRUCTION_NPZ), '--out', str(out), '--frames', '2', '--path', 'one_way',
                 '--size', *map(str, SIZE), '--device', 'cpu']) == 0
    record = json.loads((out / RENDER_JSON).read_text())
    assert record['channels'] == ['rgb', 'depth', 'features'] and record['phrases'] == []
    np.testing.assert_allclose(record['fractions'], [0, 1])
    assert record['weights'] is None and record['reconstruction_weights'] is None
    assert record['reconstruction_trained_weights'] is None and record['untrained'] is False
    assert not (out / 'labels').exists() and not (out / LABELS_JSON).exists()
    assert len(_frames(out / 'depth')) == 2


def test_cli_render_refuses_bad_input(saved_reconstruction: tuple[Any, Path], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rec, folder = saved_reconstruction
    geometry = tmp_path / 'geometry'
    save_reconstruction(dataclasses.replace(rec, gaussians=None), geometry)
    out = ['--out', str(tmp_path / 'render')]
    with pytest.raises(SystemExit, match='no such file'):
        main(['render', str(tmp_path / 'nowhere'), *out])
    with pytest.raises(SystemExit, match='holds no Gaussians'):
        main(['render', str(geometry), *out])
    for size in (('0', '48'), ('64', '5000')):
        with pytest.raises(SystemExit, match='--size'):
            main(['render', str(folder), *out, '--size', *size])
    with pytest.raises(SystemExit, match='--frames 1'):
        main(['render', str(folder), *out, '--frames', '1'])
    with pytest.raises(SystemExit, match='--fps'):
        main(['render', str(folder), *out, '--fps', '0'])
    with pytest.raises(SystemExit, match='--query: phrase 1 is empty'):
        main(['render', str(folder), *out, '--query', 'chair', ' '])
    with pytest.raises(SystemExit) as exit_info:
        main(['render', str(folder), *out, '--channels', 'rgb', 'normals'])
    assert exit_info.value.code == 2 and "'normals'" in capsys.readouterr().err

    def no_weights(args: Any, allow_untrained: bool) -> Any:
        raise AssertionError('labels without weights must be refused before any model is built')

    monkeypatch.setattr(cli, 'build_reconstructor', no_weights)
    for channels in (['--channels', 'labels'], ['--query', 'chair']):
        with pytest.raises(SystemExit, match='labels channel decodes the rendered features'):
            main(['render', str(folder), *out, *channels])
    assert not (tmp_path / 'render').exists()
