"""The 3D Gaussian Splatting PLY, the semantic products of ``lsm-ros reconstruct`` and its ``--query`` option.

The semantic runs use ``tiny_lsm_reconstructor`` (the real pipeline with a tiny untrained LSM) in place of the
checkpoint options (the CLI has no tiny-model flag); the geometry-only runs use ``tiny_reconstructor``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from lsm_ros import cli, io, semantics
from lsm_ros.cli import GAUSSIANS_PLY, QUERY_JSON, RECONSTRUCTION_NPZ, main, save_query, save_reconstruction
from lsm_ros.pipeline import GaussianCloud

pytestmark = pytest.mark.timeout(600)
GAUSSIAN_KEYS = ('means', 'scales', 'rotations', 'opacities', 'sh', 'features')
# The vertex properties of the INRIA 3DGS writer (GaussianModel.construct_list_of_attributes, SH degree 3),
# then lsm_ros's 64 semantic channels.
INRIA_PROPERTIES = (['x', 'y', 'z', 'nx', 'ny', 'nz', 'f_dc_0', 'f_dc_1', 'f_dc_2']
                    + [f'f_rest_{i}' for i in range(45)]
                    + ['opacity', 'scale_0', 'scale_1', 'scale_2', 'rot_0', 'rot_1', 'rot_2', 'rot_3'])
LSM_PROPERTIES = INRIA_PROPERTIES + [f'feat_{i}' for i in range(64)]


def _random_cloud(n: int, seed: int = 0) -> GaussianCloud:
    rng = np.random.default_rng(seed)
    quaternions = rng.normal(size=(n, 4))
    quaternions /= np.linalg.norm(quaternions, axis=1, keepdims=True)
    return GaussianCloud(means=rng.normal(size=(n, 3)).astype(np.float32),
                         scales=rng.uniform(1e-4, 0.5, size=(n, 3)).astype(np.float32),
                         rotations=quaternions.astype(np.float32),
                         opacities=rng.uniform(0.001, 0.999, size=(n, 1)).astype(np.float32),
                         sh=rng.normal(size=(n, 16, 3)).astype(np.float32),
                         features=rng.normal(size=(n, 64)).astype(np.float32))


def _header(path: Path) -> list[str]:
    return path.read_bytes().split(b'end_header\n')[0].decode('ascii').splitlines()


def _image_pair(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(4)
    base = rng.integers(0, 256, size=(240, 330, 3), dtype=np.uint8)
    left, right = io.write_rgb_png(tmp_path / 'left.png', base[:, :320]), io.write_rgb_png(tmp_path / 'right.png',
                                                                                            base[:, 10:])
    return left, right


# ------------------------------------------------------------------------------------------------ Gaussian PLY
def test_gaussian_ply_has_the_3dgs_layout_and_round_trips(tmp_path: Path) -> None:
    cloud = _random_cloud(50)
    path = io.write_gaussian_ply(tmp_path / 'gaussians.ply', cloud)
    header = _header(path)
    assert header[:2] == ['ply', 'format binary_little_endian 1.0'] and 'element vertex 50' in header
    properties = [line.split() for line in header if line.startswith('property')]
    assert [name for _, _, name in properties] == LSM_PROPERTIES
    assert {kind for _, kind, _ in properties} == {'float'}
    assert len(path.read_bytes()) == len('\n'.join(header)) + 1 + len('end_header\n') + 50 * 4 * len(LSM_PROPERTIES)

    stored = io.read_ply(path)          # the stored (pre-activation) values, as 3DGS viewers read them
    for c in range(3):
        np.testing.assert_array_equal(stored[f'f_dc_{c}'], cloud.sh[:, 0, c])
        for k in range(1, 16):          # channel-major, as INRIA's features_rest.transpose(1, 2).flatten()
            np.testing.assert_array_equal(stored[f'f_rest_{c * 15 + k - 1}'], cloud.sh[:, k, c])
    for i, component in enumerate((3, 0, 1, 2)):   # rot_0..3 = w, x, y, z
        np.testing.assert_array_equal(stored[f'rot_{i}'], cloud.rotations[:, component])
    opacity = cloud.opacities[:, 0].astype(np.float64)
    np.testing.assert_allclose(stored['opacity'], np.log(opacity / (1 - opacity)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stored['scale_1'], np.log(cloud.scales[:, 1].astype(np.float64)), rtol=1e-6)
    np.testing.assert_array_equal(stored['feat_63'], cloud.features[:, 63])
    assert (stored['nx'] == 0).all()

    back = io.read_gaussian_ply(path)
    assert list(back) == list(GAUSSIAN_KEYS)
    for key in GAUSSIAN_KEYS:
        original = getattr(cloud, key)
        assert back[key].shape == original.shape and back[key].dtype == np.float32, key
        np.testing.assert_allclose(back[key], original, rtol=2e-6, atol=1e-7, err_msg=key)
    GaussianCloud(**back)               # the fields are GaussianCloud's


def test_gaussian_ply_refuses_what_it_cannot_store_or_read(tmp_path: Path) -> None:
    cloud = _random_cloud(4)
    cloud.scales[0, 0] = 0.0
    with pytest.raises(ValueError, match='scales must be positive'):
        io.write_gaussian_ply(tmp_path / 'bad.ply', cloud)
    with pytest.raises(ValueError, match=r'sh must be'):
        io.write_gaussian_ply(tmp_path / 'bad.ply', dataclasses.replace(_random_cloud(4), sh=np.zeros((4, 16))))
    points = io.write_ply(tmp_path / 'points.ply', np.zeros((3, 3)), np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match='not a 3D Gaussian Splatting PLY'):
        io.read_gaussian_ply(points)
    edge = _random_cloud(2)
    edge.opacities[:] = [[0.0], [1.0]]  # stored as finite logits (clipped to 1e-7 from 0 and 1)
    stored = io.read_ply(io.write_gaussian_ply(tmp_path / 'edge.ply', edge))
    assert np.isfinite(stored['opacity']).all()


# ------------------------------------------------------------------------------------------------ writers
@pytest.fixture(scope='module')
def semantic_result(tiny_lsm_reconstructor: Any) -> Any:
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, size=(240, 330, 3), dtype=np.uint8)
    return tiny_lsm_reconstructor.reconstruct(base[:, :320], base[:, 10:])


def test_save_reconstruction_adds_the_gaussians(tmp_path: Path, semantic_result: Any) -> None:
    rec = semantic_result
    height, width = rec.conf_1.shape
    n = 2 * height * width
    paths = save_reconstruction(rec, tmp_path)
    assert paths['gaussians'] == tmp_path / GAUSSIANS_PLY
    expected_shapes = {'means': (n, 3), 'scales': (n, 3), 'rotations': (n, 4), 'opacities': (n, 1),
                       'sh': (n, 16, 3), 'features': (n, 64)}
    with np.load(tmp_path / RECONSTRUCTION_NPZ) as npz:
        assert {'pts3d_1', 'conf_1', 'pts3d_2', 'conf_2'} <= set(npz.files)
        for key, shape in expected_shapes.items():
            assert npz[key].shape == shape and npz[key].dtype == np.float32, key
            np.testing.assert_array_equal(npz[key], getattr(rec.gaussians, key))
    assert [line.split()[2] for line in _header(tmp_path / GAUSSIANS_PLY) if line.startswith('property')] == \
        LSM_PROPERTIES
    back = io.read_gaussian_ply(tmp_path / GAUSSIANS_PLY)
    np.testing.assert_allclose(back['means'], rec.gaussians.means, rtol=1e-6)
    np.testing.assert_allclose(back['sh'], rec.gaussians.sh, rtol=1e-6)


def test_save_query_writes_masks_label_images_and_a_legend(tmp_path: Path, semantic_result: Any,
                                                           tiny_lsm_reconstructor: Any) -> None:
    phrases = ['chair', 'chair!', 'dining table']           # distinct phrases whose slugs collide
    answer = tiny_lsm_reconstructor.query(semantic_result, phrases)
    threshold = 0.4
    paths = save_query(answer, tmp_path, threshold)
    masks, label_images = answer.masks(threshold), answer.label_images(threshold)
    palette = semantics.label_palette(len(phrases))
    for position, view in enumerate(('left', 'right')):
        for index, name in enumerate(('chair', 'chair_2', 'dining_table')):
            path = tmp_path / 'masks' / f'{view}_{name}.png'
            assert paths[f'mask_{view}_{name}'] == path
            mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            assert mask.ndim == 2 and mask.dtype == np.uint8
            np.testing.assert_array_equal(mask, masks[position, index].astype(np.uint8) * 255)
        colours = cv2.imread(str(tmp_path / f'labels_{view}.png'), cv2.IMREAD_COLOR)[..., ::-1]
        np.testing.assert_array_equal(colours, semantics.colorize_labels(label_images[position], palette))

    query = json.loads((tmp_path / QUERY_JSON).read_text())
    assert query['phrases'] == phrases and query['threshold'] == threshold and query['views'] == ['left', 'right']
    assert query['label_images'] == {'left': 'labels_left.png', 'right': 'labels_right.png'}
    for index, entry in enumerate(query['legend']):
        assert entry['label'] == index and entry['phrase'] == phrases[index]
        assert entry['colour_rgb'] == palette[index].tolist()
        assert entry['score'] == pytest.approx(float(answer.scores(threshold)[index]))
        assert 0.0 <= entry['max_probability'] <= 1.0
        assert (tmp_path / entry['masks']['right']).is_file()


# ------------------------------------------------------------------------------------------------ command
def _use(monkeypatch: pytest.MonkeyPatch, reconstructor: Any) -> None:
    monkeypatch.setattr(cli, 'build_reconstructor', lambda args, allow_untrained: reconstructor)


def test_cli_query_writes_gaussians_masks_and_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     tiny_lsm_reconstructor: Any) -> None:
    _use(monkeypatch, tiny_lsm_reconstructor)
    left, right = _image_pair(tmp_path)
    out = tmp_path / 'out'
    assert main(['reconstruct', str(left), str(right), '--out', str(out), '--query', 'chair', '--query',
                 ' Table ', '--threshold', '0.2']) == 0
    for name in ('points.ply', 'cameras.json', RECONSTRUCTION_NPZ, GAUSSIANS_PLY, QUERY_JSON, 'labels_left.png',
                 'labels_right.png', 'masks/left_chair.png', 'masks/right_table.png'):
        assert (out / name).is_file(), name
    query = json.loads((out / QUERY_JSON).read_text())
    assert query['phrases'] == ['chair', 'Table'] and query['threshold'] == 0.2
    with np.load(out / RECONSTRUCTION_NPZ) as npz:
        assert set(GAUSSIAN_KEYS) <= set(npz.files)

    plain = tmp_path / 'plain'                              # semantic model without --query: Gaussians only
    assert main(['reconstruct', str(left), str(right), '--out', str(plain)]) == 0
    assert (plain / GAUSSIANS_PLY).is_file() and not (plain / QUERY_JSON).exists()
    assert not (plain / 'masks').exists()


def test_cli_without_semantics_is_unchanged_and_query_options_are_checked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_reconstructor: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    left, right = _image_pair(tmp_path)
    args = ['reconstruct', str(left), str(right), '--out', str(tmp_path / 'out')]

    def no_model(args: Any, allow_untrained: bool) -> Any:
        raise AssertionError('invalid --query options must be refused before the model is built')

    monkeypatch.setattr(cli, 'build_reconstructor', no_model)
    with pytest.raises(SystemExit, match='--query: phrase 0 is empty'):
        main(args + ['--query', '  '])
    with pytest.raises(SystemExit, match="repeats phrase 0"):
        main(args + ['--query', 'chair', '--query', 'Chair'])
    for threshold in ('1.5', 'high'):
        with pytest.raises(SystemExit) as exit_info:
            main(args + ['--query', 'chair', '--threshold', threshold])
        assert exit_info.value.code == 2
        assert '--threshold' in capsys.readouterr().err

    _use(monkeypatch, tiny_reconstructor)
    with pytest.raises(SystemExit, match='--query needs the semantic model'):
        main(args + ['--query', 'chair'])
    assert main(args) == 0
    out = tmp_path / 'out'
    assert (out / 'points.ply').is_file() and not (out / GAUSSIANS_PLY).exists() and not (out / QUERY_JSON).exists()
    with np.load(out / RECONSTRUCTION_NPZ) as npz:
        assert not set(GAUSSIAN_KEYS) & set(npz.files)
