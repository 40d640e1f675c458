"""The LSM top level with tiny random weights: stage API, Gaussian head, official-file loading and its errors."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_DUST3R_STRING, TINY_MODEL_IMAGE_SIZE, official_dust3r_checkpoint

from lsm_ros.model.checkpoint import CheckpointError
from lsm_ros.model.gaussian_head import (GaussianHead, GaussianHeadConfig, covariance_matrices,
                                         knn_mean_squared_distance, quaternion_xyzw_to_matrix)
from lsm_ros.model.lsm import _PTV3_CONFIG_KEYS as PTV3_OFFICIAL_KEYS
from lsm_ros.model.lsm import LargeSpatialModel, _our_lsm_key_to_official, merge_points
from lsm_ros.reference_weights import find_reference_dir

REFERENCE = find_reference_dir()
SIZE = TINY_MODEL_IMAGE_SIZE  # image side of the tiny_model tests (conftest's tiny_pair)


@pytest.fixture(scope='module')
def stages(tiny_model, tiny_pair) -> dict:
    geometry = tiny_model.geometry(*tiny_pair)
    semantics = tiny_model.semantics(*tiny_pair)
    gaussians = tiny_model.gaussians(*tiny_pair, geometry, semantics)
    return dict(geometry=geometry, semantics=semantics, gaussians=gaussians)


# ---------------------------------------------------------------------------------------------- Gaussian head
def _brute_force_knn(points: np.ndarray, k: int = 3) -> np.ndarray:
    out = np.empty(len(points), np.float32)
    for i, p in enumerate(points):
        delta = (points - p).astype(np.float32)
        squared = delta[:, 0] * delta[:, 0] + delta[:, 1] * delta[:, 1] + delta[:, 2] * delta[:, 2]
        squared = np.delete(squared, i)
        out[i] = np.sort(squared)[:k].sum() / k
    return out


def test_knn_distance_is_exact_with_duplicates() -> None:
    points = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32)
    points[10] = points[11] = points[12]          # a voxel of three equal points: their distance 0 counts
    points[50] = points[51]
    ours = knn_mean_squared_distance(torch.from_numpy(points)).numpy()
    np.testing.assert_allclose(ours, _brute_force_knn(points), rtol=1e-6, atol=0)
    assert ours[10] == pytest.approx(_brute_force_knn(points)[10]) and ours[10] > 0  # 2 zeros + 1 distance
    with pytest.raises(ValueError, match='more than 3 points'):
        knn_mean_squared_distance(torch.zeros(3, 3))


def test_gaussian_head_activations() -> None:
    torch.manual_seed(0)
    head = GaussianHead(GaussianHeadConfig())
    n = 200
    features, means = torch.randn(n, 64), torch.randn(n, 3)
    colors, residual = torch.rand(n, 3) * 2 - 1, torch.randn(n, 64)
    out = head(features, means, colors, residual)
    raw = head.gaussian_proj(features)
    distance = torch.sqrt(torch.clamp_min(torch.from_numpy(_brute_force_knn(means.numpy())), 1e-7))
    median = distance.sort().values[(n - 1) // 2]  # the lower middle value
    expected_scales = (torch.exp(raw[:, :3]) * distance[:, None]).clamp(0.1 * median, 3 * median)
    torch.testing.assert_close(out['scales'], expected_scales)
    torch.testing.assert_close(out['rotations'], raw[:, 3:7] / raw[:, 3:7].norm(dim=1, keepdim=True))
    torch.testing.assert_close(out['opacities'], torch.sigmoid(raw[:, 7:8]))
    sh = raw[:, 8:56].reshape(n, 16, 3).clone()
    sh[:, 0] += (colors * 0.5) / 0.28209479177387814
    multipliers = torch.tensor([1.0] + [0.125] * 3 + [0.03125] * 5 + [0.0078125] * 7)
    torch.testing.assert_close(out['sh'], sh * multipliers[None, :, None])
    torch.testing.assert_close(out['features'], raw[:, 56:] + residual)
    assert set(out) >= {'means', 'scales', 'rotations', 'opacities', 'sh', 'features', 'covariances'}


def test_quaternion_convention_is_real_part_last() -> None:
    angle = 0.3
    about_z = torch.tensor([0.0, 0.0, np.sin(angle / 2), np.cos(angle / 2)], dtype=torch.float32)  # (x, y, z, w)
    expected = torch.tensor([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]],
                            dtype=torch.float32)
    torch.testing.assert_close(quaternion_xyzw_to_matrix(about_z), expected)
    scales = torch.tensor([[1.0, 2.0, 3.0]])
    cov = covariance_matrices(scales, about_z[None])[0]
    torch.testing.assert_close(cov, expected @ torch.diag(scales[0] ** 2) @ expected.T)


# ---------------------------------------------------------------------------------------------- stages
def test_merge_points_normalises_like_the_official_code() -> None:
    generator = torch.Generator().manual_seed(3)
    pts1, pts2 = torch.randn(4, 5, 3, generator=generator), torch.randn(4, 5, 3, generator=generator) + 2
    img1, img2 = torch.rand(3, 4, 5, generator=generator), torch.rand(3, 4, 5, generator=generator)
    coord, color, center, scale = merge_points(pts1, pts2, img1, img2)
    points = np.concatenate([pts1.reshape(-1, 3), pts2.reshape(-1, 3)]).astype(np.float64)
    np.testing.assert_allclose(center.numpy().reshape(3), points.mean(0), rtol=1e-6)
    np.testing.assert_allclose(scale.item(), np.abs(points - points.mean(0)).max(), rtol=1e-6)
    assert np.abs(coord.numpy()).max() == pytest.approx(1.0)
    assert torch.equal(color[:20], img1.permute(1, 2, 0).reshape(-1, 3))  # view 1 row-major first
    assert torch.equal(color[20:], img2.permute(1, 2, 0).reshape(-1, 3))


def test_stage_shapes_and_row_order(tiny_model, tiny_pair, stages) -> None:
    cfg = tiny_model.config
    geometry, semantics, gaussians = stages['geometry'], stages['semantics'], stages['gaussians']
    n = 2 * SIZE * SIZE
    assert geometry['pts3d_1'].shape == (1, SIZE, SIZE, 3)
    assert semantics['lseg_features'].shape == (2, cfg.lseg.out_c, SIZE // 2, SIZE // 2)
    assert semantics['lseg_token_feature'].shape == (1, 2 * (SIZE // 16) ** 2, cfg.lseg.out_c)
    assert semantics['lseg_res_feature'].shape == (2, cfg.head.feature_dim, SIZE, SIZE)
    shapes = {k: tuple(v.shape) for k, v in gaussians.items()}
    assert shapes['means'] == (n, 3) and shapes['scales'] == (n, 3) and shapes['rotations'] == (n, 4)
    assert shapes['opacities'] == (n, 1) and shapes['sh'] == (n, 16, 3) and shapes['features'] == (n, 64)
    # rows: view 1 row-major then view 2; means are the point maps
    expected_means = torch.cat([geometry['pts3d_1'].reshape(-1, 3), geometry['pts3d_2'].reshape(-1, 3)])
    torch.testing.assert_close(gaussians['means'], expected_means, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gaussians['rotations'].norm(dim=1), torch.ones(n))
    assert ((gaussians['opacities'] > 0) & (gaussians['opacities'] < 1)).all()
    # the tokens are the 8x8 pools of view 1 then view 2, row-major
    pooled = torch.nn.functional.avg_pool2d(semantics['lseg_features'], 8)
    torch.testing.assert_close(semantics['lseg_token_feature'][0, :(SIZE // 16) ** 2],
                               pooled[0].flatten(1).T)


def _sample(geometry: dict, semantics: dict, b: int, batch: int) -> tuple[dict, dict]:
    """Sample ``b`` of batched stage outputs as batch-1 outputs (LSeg's (view, batch) rows included)."""
    rows = [b, batch + b]
    return ({key: value[b:b + 1] for key, value in geometry.items()},
            {'lseg_features': semantics['lseg_features'][rows], 'lseg_res_feature': semantics['lseg_res_feature'][rows],
             'lseg_token_feature': semantics['lseg_token_feature'][b:b + 1]})


def test_batch_is_per_sample(tiny_model, tiny_pair) -> None:
    """A batch of two gives each sample the Gaussians of that sample alone (same stage inputs: the point maps of a
    batched DUSt3R differ in the last float32 bit, which moves voxels and so changes PTv3 chaotically)."""
    img1, img2 = (torch.cat([x, x.flip(-1)]) for x in tiny_pair)
    geometry = tiny_model.geometry(img1, img2)
    semantics = tiny_model.semantics(img1, img2)
    batched = tiny_model.gaussians(img1, img2, geometry, semantics)
    n = 2 * SIZE * SIZE
    for b in range(2):
        single = tiny_model.gaussians(img1[b:b + 1], img2[b:b + 1], *_sample(geometry, semantics, b, 2))
        for key, value in single.items():
            rows = slice(b, b + 1) if key in ('center', 'scale') else slice(b * n, (b + 1) * n)
            assert torch.equal(batched[key][rows], value), (b, key)
    assert not torch.equal(batched['features'][:n], batched['features'][n:])
    with pytest.raises(ValueError, match='serialization_order tensors for a batch of 2'):
        tiny_model.gaussians(img1, img2, geometry, semantics, serialization_order=[torch.zeros(4, n).long()])
    with pytest.raises(ValueError, match='grid_coord tensors for a batch of 2'):
        tiny_model.gaussians(img1, img2, geometry, semantics, grid_coord=torch.zeros(1, n, 3, dtype=torch.long))


def test_injected_grid_coord(tiny_model, tiny_pair, stages) -> None:
    """``grid_coord=`` replaces the computed level-0 voxel grid: the computed grid itself reproduces the default
    result, a changed grid changes the Gaussians, and a grid of the wrong shape or dtype is refused."""
    geometry, semantics, expected = stages['geometry'], stages['semantics'], stages['gaussians']
    img1, img2 = tiny_pair
    coord, _, _, _ = merge_points(geometry['pts3d_1'][0], geometry['pts3d_2'][0], img1[0], img2[0])
    grid = tiny_model.point_transformer.level0(coord).grid
    for given in (grid, grid.int(), grid.short()[None]):      # (2HW, 3) of any integer dtype, or a batch of one
        injected = tiny_model.gaussians(img1, img2, geometry, semantics, grid_coord=given)
        assert all(torch.equal(injected[key], expected[key]) for key in expected)
    coarser = tiny_model.gaussians(img1, img2, geometry, semantics, grid_coord=grid // 2)
    assert torch.equal(coarser['means'], expected['means'])
    assert not torch.equal(coarser['point_features'], expected['point_features'])
    for bad, message in ((grid[:-1], 'grid_coord shape'), (grid[:, :2], 'grid_coord shape'),
                         (grid.float(), 'integer tensor'), (grid - 1, '>= 0'),
                         (grid.reshape(-1), '2-D tensor')):
        with pytest.raises(ValueError, match=message):
            tiny_model.gaussians(img1, img2, geometry, semantics, grid_coord=bad)


@pytest.mark.skipif(REFERENCE is None, reason='reference folder shared/reference/lsm_vitl_256 absent')
def test_reference_grid_coord_is_the_computed_grid(tiny_model) -> None:
    """On the reference point maps (2 x 256 x 256 points) the grid computed from ``merge_points`` is the reference's
    ``grid_coord0``, injecting it gives the same level 0 (codes, orders, voxels: the rest of the network only sees
    these), and the reference's level-0 order ``order0`` sorts our codes of it."""
    with np.load(REFERENCE / 'dust3r.npz') as dust3r, np.load(REFERENCE / 'ptv3.npz') as ptv3, \
            np.load(REFERENCE / 'inputs.npz') as inputs:
        pts3d = [torch.from_numpy(dust3r[f'pts3d_{v}'][0]) for v in (1, 2)]
        grid_coord0, order0 = torch.from_numpy(ptv3['grid_coord0']), torch.from_numpy(ptv3['order0'])
        images = torch.from_numpy(inputs['images'])
    coord, _, _, _ = merge_points(*pts3d, images[0], images[1])
    ptv3_model = tiny_model.point_transformer
    computed, injected = ptv3_model.level0(coord), ptv3_model.level0(coord, grid_coord0)
    assert grid_coord0.dtype == torch.int16 and torch.equal(computed.grid, grid_coord0.long())
    assert computed.depth == injected.depth == 8
    for name in ('codes', 'orders', 'inverses'):
        assert torch.equal(getattr(computed, name), getattr(injected, name)), name
    assert computed.voxels.num_voxels == 81007      # README §4.4: the level-0 points occupy 81007 voxels
    assert torch.equal(computed.voxels.point_voxel, injected.voxels.point_voxel)
    official = ptv3_model.level0(coord, grid_coord0, order0)
    assert torch.equal(official.orders, order0.long()) and not torch.equal(official.orders, computed.orders)


def test_label_logits(tiny_model, stages) -> None:
    features = stages['gaussians']['features']
    phrases = ['chair', 'a wooden table', 'wall']
    text = tiny_model.text_features(phrases)
    assert text.shape == (3, tiny_model.config.clip.embed_dim)
    assert torch.equal(tiny_model.text_features(['wall'])[0], text[2])  # cached per phrase
    maps = features.view(2, SIZE, SIZE, -1).permute(0, 3, 1, 2)
    logits = tiny_model.view_label_logits(maps, text)
    assert logits.shape == (2, 3, SIZE, SIZE) and logits.dtype == torch.float32
    points = tiny_model.point_label_logits(features, text)
    assert points.shape == (2 * SIZE * SIZE, 3)
    # per Gaussian: logit_scale * cosine(expanded feature, text)
    from lsm_ros.model.lseg import LSEG_LOGIT_SCALE
    expanded = tiny_model.feature_expansion(features.T.reshape(1, -1, len(features), 1))[0, :, :, 0].T
    cosine = torch.nn.functional.normalize(expanded, dim=1) @ text.float().T
    torch.testing.assert_close(points, LSEG_LOGIT_SCALE * cosine, atol=0.02, rtol=0.01)


# ---------------------------------------------------------------------------------------------- official files
def _official_files(model: LargeSpatialModel, directory: Path) -> dict:
    """The tiny model saved as the three official files (the LSM file also carries DUSt3R/LSeg copies)."""
    cfg = model.config
    checkpoint = official_dust3r_checkpoint(model.dust3r, SMALL_DUST3R_STRING)
    dust3r = checkpoint['model']
    torch.save(checkpoint, directory / 'dust3r.pth')
    lseg = {'net.' + k: v for k, v in model.lseg.state_dict().items()}
    lseg.update({'net.clip_pretrained.' + k: v for k, v in model.text_encoder.state_dict().items()})
    torch.save({'state_dict': lseg, 'epoch': 3}, directory / 'lseg.ckpt')
    own = {_our_lsm_key_to_official(k): v for k, v in model.state_dict().items()
           if not k.startswith(('dust3r.', 'lseg.', 'text_encoder.'))}
    own.update({'dust3r.dust3r.' + k: v for k, v in dust3r.items() if k != 'mask_token'})
    config = {'dust3r_config': {'pretrained_model_name_or_path': 'pretrained/dust3r.pth'},
              'lseg_config': {'pretrained_model_name_or_path': 'pretrained/lseg.ckpt', 'half_res': True},
              'point_transformer_config': {k: list(v) if isinstance(v, tuple) else v for k, v in
                                           ((k, getattr(cfg.ptv3, 'strides' if k == 'stride' else k)) for k in PTV3_OFFICIAL_KEYS)},
              'gaussian_head_config': {'rgb_residual': True, 'feat_residual': False, 'd_gs_feats': 64}}
    torch.save({'args': argparse.Namespace(model=f'LSM_Dust3R(config={config!r})'), 'model': own, 'epoch': 1},
               directory / 'checkpoint-final.pth')
    return config


def test_official_files_round_trip(tiny_model, tiny_pair, stages, tmp_path) -> None:
    _official_files(tiny_model, tmp_path)
    # DUSt3R and LSeg are found next to the LSM file (the config's relative paths do not exist)
    loaded = LargeSpatialModel.from_official_checkpoints(lsm=tmp_path / 'checkpoint-final.pth',
                                                         config=tiny_model.config)
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    geometry = loaded.geometry(*tiny_pair)
    semantics = loaded.semantics(*tiny_pair)
    gaussians = loaded.gaussians(*tiny_pair, geometry, semantics)
    for key in ('means', 'scales', 'rotations', 'features'):  # same weights: equal up to thread-order rounding
        torch.testing.assert_close(gaussians[key], stages['gaussians'][key], rtol=1e-5, atol=1e-6, msg=key)


def test_official_file_errors(tiny_model, tmp_path) -> None:
    config = _official_files(tiny_model, tmp_path)
    lsm = tmp_path / 'checkpoint-final.pth'
    with pytest.raises(CheckpointError, match='no LSM checkpoint'):
        LargeSpatialModel.from_official_checkpoints(dust3r=tmp_path / 'dust3r.pth')
    with pytest.raises(CheckpointError, match='not found'):
        LargeSpatialModel.from_official_checkpoints(lsm=tmp_path / 'absent.pth')
    # an LSM file alone in another folder: the DUSt3R file it names cannot be found
    lonely = tmp_path / 'lonely'
    lonely.mkdir()
    (lonely / 'checkpoint-final.pth').write_bytes(lsm.read_bytes())
    with pytest.raises(CheckpointError, match='DUSt3R file named by the LSM checkpoint was not found'):
        LargeSpatialModel.from_official_checkpoints(lsm=lonely / 'checkpoint-final.pth')
    checkpoint = torch.load(lsm, weights_only=False)
    # a DUSt3R file passed as the LSM file
    with pytest.raises(CheckpointError, match='expected LSM_Dust3R'):
        LargeSpatialModel.from_official_checkpoints(lsm=tmp_path / 'dust3r.pth', dust3r=tmp_path / 'dust3r.pth',
                                                    lseg=tmp_path / 'lseg.ckpt', config=tiny_model.config)
    broken = dict(checkpoint, model={k: v for k, v in checkpoint['model'].items()
                                     if not k.startswith('gaussian_head.')})
    broken['model']['point_transformer.not_a_weight'] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r'missing keys: gaussian_head\.gaussian_proj\.weight.*unexpected '
                                              r'keys: point_transformer\.not_a_weight'):
        LargeSpatialModel.from_official_checkpoints(lsm=broken, dust3r=tmp_path / 'dust3r.pth',
                                                    lseg=tmp_path / 'lseg.ckpt', config=tiny_model.config)
    bad_config = dict(config, point_transformer_config=dict(config['point_transformer_config'], enable_rpe=True))
    unsupported = dict(checkpoint, args=argparse.Namespace(model=f'LSM_Dust3R(config={bad_config!r})'))
    with pytest.raises(CheckpointError, match='unsupported point_transformer_config keys'):
        LargeSpatialModel.from_official_checkpoints(lsm=unsupported, dust3r=tmp_path / 'dust3r.pth',
                                                    lseg=tmp_path / 'lseg.ckpt', config=tiny_model.config)
    code = dict(checkpoint, args=argparse.Namespace(model="LSM_Dust3R(config=__import__('os').system('true'))"))
    with pytest.raises(CheckpointError, match='refused'):
        LargeSpatialModel.from_official_checkpoints(lsm=code, dust3r=tmp_path / 'dust3r.pth',
                                                    lseg=tmp_path / 'lseg.ckpt', config=tiny_model.config)


def test_lightning_hyper_parameters_are_read_as_plain_dicts(tmp_path, monkeypatch) -> None:
    """LSeg's Lightning checkpoint pickles an AttributeDict of hyper-parameters: read as a dict, no code run;
    any other global (here os.system) is still refused."""
    import os
    import sys
    import types

    from lsm_ros.model.checkpoint import load_checkpoint_file

    class AttributeDict(dict):
        pass

    AttributeDict.__module__ = 'pytorch_lightning.utilities.parsing'
    AttributeDict.__qualname__ = 'AttributeDict'
    fake = types.ModuleType('pytorch_lightning.utilities.parsing')
    fake.AttributeDict = AttributeDict
    for name in ('pytorch_lightning', 'pytorch_lightning.utilities'):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, 'pytorch_lightning.utilities.parsing', fake)
    torch.save({'state_dict': {'net.w': torch.ones(2)}, 'hyper_parameters': AttributeDict(lr=0.1)},
               tmp_path / 'lightning.ckpt')
    monkeypatch.delitem(sys.modules, 'pytorch_lightning.utilities.parsing')
    loaded = load_checkpoint_file(tmp_path / 'lightning.ckpt', mmap=True)
    assert type(loaded['hyper_parameters']) is dict and loaded['hyper_parameters'] == {'lr': 0.1}
    assert torch.equal(loaded['state_dict']['net.w'], torch.ones(2))

    class RunsCode:
        def __reduce__(self):
            return os.system, ('true',)

    torch.save({'x': RunsCode()}, tmp_path / 'code.ckpt')
    with pytest.raises(CheckpointError, match="needs the global '(posix|os).system'"):
        load_checkpoint_file(tmp_path / 'code.ckpt')
