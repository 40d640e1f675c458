"""The framework-free pipeline and the ``lsm-ros reconstruct`` command, with small random networks.

The full-size network with reference weights is covered by test_parity_dust3r.py; here the same code paths
(official file layout, pre-processing, cameras, writers) run on a network small enough for a unit test.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_DUST3R_STRING, official_dust3r_checkpoint

from lsm_ros import io
from lsm_ros.cli import RECONSTRUCTION_NPZ, main
from lsm_ros.model import CheckpointError, Dust3rConfig, Dust3rNet
from lsm_ros.pipeline import (CameraCalibration, Reconstructor,
                              resolve_device)
from lsm_ros.preprocess import preprocess_pair

SHARED = Path(__file__).resolve().parents[1].parent / 'shared'


def _image_pair() -> tuple[np.ndarray, np.ndarray]:
    """A real indoor pair when ../shared is present, else a deterministic textured pair."""
    scene = SHARED / 'data' / 'lsm_demo_pairs' / 'scene2'
    if scene.is_dir():
        from PIL import Image
        return tuple(np.asarray(Image.open(scene / f'processed_00{i}.png').convert('RGB')) for i in (0, 1))
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, size=(384, 520, 3), dtype=np.uint8)
    return base[:, :512].copy(), base[:, 8:].copy()


@pytest.fixture(scope='module')
def reconstructor_224():
    return Reconstructor.from_config(Dust3rConfig.tiny(), seed=1, device='cpu', resolution=224)


@pytest.fixture(scope='module')
def small_checkpoint(tmp_path_factory):
    """A small random DUSt3R in the official file layout ({'args': Namespace(model=...), 'model': ...})."""
    torch.manual_seed(0)
    from lsm_ros.model.checkpoint import parse_constructor_string
    _, kwargs = parse_constructor_string(SMALL_DUST3R_STRING)
    net = Dust3rNet(Dust3rConfig.from_constructor_kwargs(kwargs))
    path = tmp_path_factory.mktemp('weights') / 'dust3r_small.pth'
    torch.save(official_dust3r_checkpoint(net, SMALL_DUST3R_STRING), path)
    return path, net


def test_reconstruction_shapes_frames_and_estimated_cameras(reconstructor_224):
    left, right = _image_pair()
    rec = reconstructor_224.reconstruct(left, right)
    H, W = rec.depth_1.shape
    assert (W, H) == (224, 224) and rec.size == (224, 224)
    for name in ('pts3d_1', 'pts3d_2'):
        assert getattr(rec, name).shape == (H, W, 3)
        assert rec.network_outputs[name].shape == (1, H, W, 3)
    assert rec.image_1.shape == (H, W, 3) and rec.image_1.dtype == np.uint8
    assert rec.intrinsics_source == 'estimated' and not rec.metric_scale and rec.scale_factor == 1.0
    assert rec.K_1[0, 0] > 0 and rec.K_1[0, 2] == W / 2 and rec.K_1[1, 2] == H / 2
    np.testing.assert_allclose(rec.T_1_2[3], [0, 0, 0, 1])
    np.testing.assert_allclose(rec.T_1_2[:3, :3] @ rec.T_1_2[:3, :3].T, np.eye(3), atol=1e-9)
    # depth of view 1 is z of its points in its own frame (view 1 = reference frame)
    valid = np.isfinite(rec.depth_1)
    np.testing.assert_allclose(rec.depth_1[valid], rec.pts3d_1[..., 2][valid], rtol=1e-6)
    assert not rec.trained_weights and 'random' in rec.weights
    cloud = rec.points()
    assert cloud['xyz'].shape[1] == 3 and len(cloud['xyz']) == len(cloud['rgb']) == len(cloud['confidence'])
    assert len(cloud['xyz']) <= 2 * H * W and set(np.unique(cloud['view'])) <= {0, 1}
    strict = rec.points(min_confidence=float(np.median(rec.conf_1)))
    assert len(strict['xyz']) < len(cloud['xyz']) and (strict['confidence'] >= np.median(rec.conf_1)).all()


def test_network_outputs_equal_a_direct_forward(reconstructor_224):
    left, right = _image_pair()
    rec = reconstructor_224.reconstruct(left, right)
    v1, v2 = preprocess_pair(left, right, 224)
    with torch.no_grad():
        direct = reconstructor_224.network(v1.tensor, v2.tensor)
    for key in ('pts3d_1', 'conf_1', 'pts3d_2', 'conf_2'):
        np.testing.assert_array_equal(rec.network_outputs[key], direct[key].numpy())


def test_given_intrinsics_are_mapped_to_model_resolution_and_baseline_makes_metres(reconstructor_224):
    left, right = _image_pair()
    K = np.array([[400.0, 0, 256.0], [0, 400.0, 192.0], [0, 0, 1]])
    rec = reconstructor_224.reconstruct(left, right, CameraCalibration(K, K, baseline_m=0.12, source='camera_info'))
    assert rec.intrinsics_source == 'camera_info'
    np.testing.assert_allclose(rec.K_1, rec.crop_1.intrinsics_to_model(K))
    np.testing.assert_allclose(rec.crop_1.intrinsics_to_input(rec.K_1), K, atol=1e-9)
    if rec.pose.success:
        assert rec.metric_scale and rec.scale_source == 'stereo_baseline'
        assert rec.baseline == pytest.approx(0.12, rel=1e-9)
        unscaled = rec.network_outputs['pts3d_1'][0]
        np.testing.assert_allclose(rec.pts3d_1, unscaled * rec.scale_factor, rtol=1e-5)
    else:
        assert not rec.metric_scale


@pytest.mark.parametrize('K,baseline,match', [
    (np.eye(2), None, '3x3'),
    (np.diag([0.0, 1.0, 1.0]), None, 'fx, fy > 0'),
    (None, -0.1, 'positive'),
    (None, float('nan'), 'positive'),
])
def test_bad_calibration_is_refused(K, baseline, match):
    with pytest.raises(ValueError, match=match):
        CameraCalibration(K_left=K, baseline_m=baseline)


def test_mismatched_pair_sizes_are_refused():
    # at 224/256 both views are centre-cropped squares; at 512 the aspect ratio is kept, so they differ
    reconstructor = Reconstructor.from_config(Dust3rConfig.tiny(), device='cpu', resolution=512)
    with pytest.raises(ValueError, match='different sizes'):
        reconstructor.reconstruct(np.zeros((300, 400, 3), np.uint8), np.zeros((400, 300, 3), np.uint8))


def test_unavailable_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert resolve_device('auto').type == 'cpu'
    with pytest.raises(ValueError, match='CUDA is not available'):
        resolve_device('cuda')
    with pytest.raises(ValueError, match='unknown device'):
        resolve_device('gpu0')


def test_cli_reconstruct_writes_every_product(tmp_path, small_checkpoint):
    ckpt, net = small_checkpoint
    left, right = _image_pair()
    io.write_rgb_png(tmp_path / 'left.png', left)
    io.write_rgb_png(tmp_path / 'right.png', right)
    out = tmp_path / 'out'
    rc = main(['reconstruct', str(tmp_path / 'left.png'), str(tmp_path / 'right.png'), '--out', str(out),
               '--dust3r-checkpoint', str(ckpt), '--device', 'cpu', '--resolution', '224',
               '--intrinsics', '400,400,256,192', '--baseline', '0.11'])
    assert rc == 0
    for name in ('points.ply', 'depth_left.npy', 'depth_right.npy', 'depth_left.png', 'depth_right.png',
                 'cameras.json', RECONSTRUCTION_NPZ):
        assert (out / name).is_file(), name
    with np.load(out / RECONSTRUCTION_NPZ) as npz:
        assert {'pts3d_1', 'conf_1', 'pts3d_2', 'conf_2'} <= set(npz.files)
        assert npz['pts3d_1'].shape == (1, 224, 224, 3) and npz['conf_2'].shape == (1, 224, 224)
        v1, v2 = preprocess_pair(left, right, 224)
        with torch.no_grad():
            direct = net(v1.tensor, v2.tensor)
        np.testing.assert_allclose(npz['pts3d_2'], direct['pts3d_2'].numpy(), rtol=1e-5, atol=1e-6)
        depth = np.load(out / 'depth_left.npy')
        np.testing.assert_array_equal(depth, npz['depth_1'])
    cameras = json.loads((out / 'cameras.json').read_text())
    assert cameras['intrinsics_source'] == 'given' and cameras['trained_weights'] is True
    assert np.asarray(cameras['K_left_input']) == pytest.approx(np.array([[400, 0, 256], [0, 400, 192], [0, 0, 1]]))
    assert len(cameras['right_in_left']['quaternion_xyzw']) == 4
    cloud = io.read_ply(out / 'points.ply')
    assert {'x', 'y', 'z', 'red', 'green', 'blue', 'confidence', 'view'} <= set(cloud)


def test_cli_without_weights_or_with_bad_inputs_says_why(tmp_path, small_checkpoint, capsys):
    left, right = _image_pair()
    io.write_rgb_png(tmp_path / 'l.png', left)
    io.write_rgb_png(tmp_path / 'r.png', right)
    with pytest.raises(SystemExit, match='no weights given'):
        main(['reconstruct', str(tmp_path / 'l.png'), str(tmp_path / 'r.png'), '--out', str(tmp_path / 'o')])
    with pytest.raises(SystemExit, match='cannot read image'):
        main(['reconstruct', str(tmp_path / 'missing.png'), str(tmp_path / 'r.png'), '--out', str(tmp_path / 'o'),
              '--dust3r-checkpoint', str(small_checkpoint[0])])
    with pytest.raises(SystemExit, match='fx,fy,cx,cy'):
        main(['reconstruct', str(tmp_path / 'l.png'), str(tmp_path / 'r.png'), '--out', str(tmp_path / 'o'),
              '--dust3r-checkpoint', str(small_checkpoint[0]), '--intrinsics', '1,2,3'])
    with pytest.raises(CheckpointError):
        main(['reconstruct', str(tmp_path / 'l.png'), str(tmp_path / 'r.png'), '--out', str(tmp_path / 'o'),
              '--dust3r-checkpoint', str(tmp_path / 'nope.pth')])


def test_lsm_checkpoint_whose_companion_files_are_missing(tmp_path, small_checkpoint):
    """With the LSM file, the DUSt3R and LSeg files come from its config (as given, else next to it)."""
    ckpt, _ = small_checkpoint
    config = {'dust3r_config': {'pretrained_model_name_or_path': str(ckpt)},
              'lseg_config': {'pretrained_model_name_or_path': 'demo_e200.ckpt', 'half_res': True}}
    lsm = tmp_path / 'checkpoint-final.pth'
    torch.save({'args': argparse.Namespace(model=f'LSM_Dust3R(config={config!r})'), 'model': {}}, lsm)
    with pytest.raises(CheckpointError, match='LSeg file named by the LSM checkpoint was not found'):
        Reconstructor.from_checkpoints(lsm=str(lsm))
    with pytest.raises(CheckpointError, match='no checkpoint given'):
        Reconstructor.from_checkpoints()


def test_cli_demo_runs_the_node_on_a_bag_and_says_untrained(tmp_path, monkeypatch, reconstructor_224, caplog):
    import lsm_ros.cli as cli
    monkeypatch.setattr(cli, 'build_reconstructor', lambda args, allow_untrained: reconstructor_224)
    out = tmp_path / 'demo'
    with caplog.at_level('WARNING', logger='lsm_ros.cli'):
        assert main(['demo', '--out', str(out), '--max-pairs', '1']) == 0
    assert 'UNTRAINED WEIGHTS' in caplog.text
    summary = json.loads((out / 'summary.json').read_text())
    assert (out / 'points_0000.ply').is_file() and (out / 'README.txt').is_file()
    assert 'UNTRAINED' in (out / 'README.txt').read_text()
    assert summary['files'], summary
