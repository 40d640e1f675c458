"""Stage parity of the full LSM on CUDA against the reference ``lsm_vitl_256`` (issue 11, items 3 and 4).

Every test is marked ``cuda`` and skips without a CUDA device. The module imports nothing from ROS and uses no
conftest fixture, so ``pytest --noconftest test/test_parity_cuda.py`` works on a GPU machine without rclpy
(scripts/gpu_check.sh runs it); the reference folder is found by ``find_reference_dir`` ($LSM_ROS_REFERENCE, else
the shared folder).

Exact fp32 (``precision='fp32'``: autocast off, TF32 off for matmuls and cuDNN), each stage within 1e-4 relative
(max |ours - ref| / max |ref|, on the reference's reduced arrays: every k-th pixel, the Gaussian and per-level
subsets of its config.json, as test/test_parity_lsm.py compares on the CPU):

- DUSt3R and LSeg end to end from the reference images;
- PTv3 (per level) and the Gaussian head given the reference point maps, encoder tokens, LSeg tokens, level-0 order
  ``order0`` and voxel grid ``grid_coord0`` (injected: voxel boundaries are chaotic under float32 rounding);
- LSM's labelling of the source views' Gaussian features (float16 logits: absolute tolerance).

The bf16 fast path on CUDA: ray depth within 1 % of fp32 on >= 99 % of the pixels and label agreement >= 98 %,
measured per network (DUSt3R, LSeg, PTv3 with TF32) and recorded (``record_property``, the log); the bounds are
asserted for the pipeline's CUDA choice (``CUDA_NETWORK_PRECISIONS['bf16']``).

The reference weights (1.1 G values, rule lsmref-v1) are generated on the CPU in threads and loaded with
``LargeSpatialModel.from_official_checkpoints`` from in-memory official-layout dicts (no files), as
``reference_weights.reference_checkpoints`` makes them.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping

import numpy as np
import pytest
import torch

from lsm_ros.model.layers import autocast
from lsm_ros.model.lsm import LargeSpatialModel, merge_points
from lsm_ros.reference_weights import find_reference_dir, reference_checkpoints

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]

REFERENCE = find_reference_dir()
MAX_RELATIVE_ERROR = 1e-4
LABEL_LOGIT_ABS_TOLERANCE = 4e-3   # float16 logits of magnitude ~5: one rounding step is 2e-3 to 4e-3
VOXEL_FLIPS_ALLOWED = 100          # points of the CUDA-computed grid in another voxel than grid_coord0 (README §5.6)
DUST3R_KEYS = ('pts3d_1', 'conf_1', 'pts3d_2', 'conf_2', 'enc_feat')
LSEG_KEYS = ('lseg_features', 'lseg_token_feature', 'lseg_res_feature')
LABELS = ('wall', 'floor', 'ceiling', 'chair', 'table', 'sofa', 'bed', 'other')
# phrase sets whose arg-max labels vary over the pair (the reference weights give every pixel LSM's 'bed')
PHRASE_SETS = (('door', 'lamp', 'shelf', 'curtain', 'plant', 'mirror', 'stove', 'clock'),
               ('window', 'desk', 'cabinet', 'pillow', 'vase', 'sink', 'fridge', 'rug'),
               ('bookcase', 'blanket', 'picture', 'toilet', 'counter', 'monitor', 'box', 'stairs'),
               ('bathtub', 'television', 'keyboard', 'bag', 'bottle', 'cup', 'railing', 'tree'))
BF16_DEPTH_TOLERANCE, BF16_DEPTH_FRACTION, BF16_LABEL_AGREEMENT = 0.01, 0.99, 0.98
# ours -> reference name of the Gaussian arrays
GAUSSIAN_NAMES = (('means', 'means'), ('scales', 'scales'), ('rotations', 'rotations'), ('opacities', 'opacities'),
                  ('sh', 'sh_coeffs'), ('features', 'gs_feats'), ('covariances', 'covs'))


# ---------------------------------------------------------------------------------------------- reference
class Reference:
    """The reference arrays ('file.array' -> array) and its documented reductions (config.json)."""

    def __init__(self, directory) -> None:
        self.directory = directory
        self.config = json.loads((directory / 'config.json').read_text())
        self.arrays: dict[str, np.ndarray] = {}
        for name in ('inputs', 'dust3r', 'lseg', 'ptv3', 'gaussians', 'labels'):
            with np.load(directory / f'{name}.npz') as data:
                self.arrays.update({f'{name}.{key}': data[key] for key in data.files})

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def reduce(self, key: str, array: np.ndarray) -> np.ndarray:
        """``array`` at full size -> the stored reduction of ``key`` (every k-th pixel, a subset), else as is."""
        reduction = self.config.get('reductions', {}).get(key)
        if reduction is None or list(array.shape) != list(reduction['full_shape']):
            return array
        op = reduction['op']
        if op == 'gaussian_subset':
            return array[self.arrays['gaussians.idx']]
        if op.startswith('every'):
            step = int(op[len('every'):])
            return array[..., ::step, ::step]
        if op.startswith('ptv3_subset:'):
            return array[self.arrays['ptv3.' + op.split(':', 1)[1]]]
        raise ValueError(f'unknown reduction {op!r} of {key}')

    def relative_error(self, key: str, ours: torch.Tensor | np.ndarray) -> float:
        """max |ours - ref| / max |ref| over the reference's (reduced) array ``key``; inf if not finite."""
        array = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
        reference = self.arrays[key]
        array = self.reduce(key, array)
        if array.shape != reference.shape:
            assert array.size == reference.size, (key, array.shape, reference.shape)
            array = array.reshape(reference.shape)
        if not np.isfinite(array).all():
            return float('inf')
        difference = np.abs(array.astype(np.float64) - reference.astype(np.float64)).max()
        return float(difference / np.abs(reference.astype(np.float64)).max())


@pytest.fixture(scope='module')
def reference() -> Reference:
    if REFERENCE is None:
        pytest.skip('reference folder lsm_vitl_256 not found (set LSM_ROS_REFERENCE)')
    return Reference(REFERENCE)


@pytest.fixture(scope='module')
def model(reference: Reference) -> Iterator[LargeSpatialModel]:
    start = time.perf_counter()
    checkpoints = reference_checkpoints(reference.directory, progress=False, workers=min(16, os.cpu_count() or 1))
    generated = time.perf_counter()
    loaded = LargeSpatialModel.from_official_checkpoints(**checkpoints, device='cuda')
    del checkpoints
    logger.info('reference weights generated in %.1f s, loaded onto %s in %.1f s', generated - start,
                torch.cuda.get_device_name(), time.perf_counter() - generated)
    yield loaded
    del loaded
    torch.cuda.empty_cache()


@pytest.fixture(scope='module')
def images(reference: Reference) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.from_numpy(reference['inputs.images']).cuda()
    return batch[0:1], batch[1:2]


@pytest.fixture(scope='module')
def fp32(model: LargeSpatialModel, images) -> dict[str, dict[str, torch.Tensor]]:
    """Our fp32 DUSt3R and LSeg outputs on CUDA from the reference images."""
    geometry = model.geometry(*images, precision='fp32')
    semantics = model.semantics(*images, precision='fp32')
    torch.cuda.synchronize()
    return dict(geometry=geometry, semantics=semantics)


def _check(reference: Reference, record_property, key: str, ours: torch.Tensor | np.ndarray,
           bound: float = MAX_RELATIVE_ERROR) -> float:
    error = reference.relative_error(key, ours)
    record_property(f'{key}_max_relative', error)
    logger.info('%-44s max relative error %.3e', key, error)
    assert error <= bound, f'{key}: max relative error {error:.3e} > {bound:g}'
    return error


# ---------------------------------------------------------------------------------------------- fp32 parity
def test_fp32_context_turns_tf32_off(model: LargeSpatialModel) -> None:
    """The exact path's context on CUDA: TF32 off for matmuls and cuDNN inside, the process setting after."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    precision_api = hasattr(matmul, 'fp32_precision') and hasattr(getattr(cudnn, 'conv', None), 'fp32_precision')
    read = ((lambda: (matmul.fp32_precision, cudnn.conv.fp32_precision)) if precision_api
            else (lambda: (matmul.allow_tf32, cudnn.allow_tf32)))
    before = read()
    with autocast('fp32', 'cuda'):
        assert all(value in (False, 'ieee') for value in read()), read()
    assert read() == before


def test_dust3r_end_to_end(reference: Reference, fp32, record_property) -> None:
    for key in DUST3R_KEYS:
        _check(reference, record_property, f'dust3r.{key}', fp32['geometry'][key])


def test_lseg_end_to_end(reference: Reference, fp32, record_property) -> None:
    for key in LSEG_KEYS:
        _check(reference, record_property, f'lseg.{key}', fp32['semantics'][key])


@pytest.fixture(scope='module')
def reference_inputs(reference: Reference, fp32) -> dict:
    """The inputs of PTv3 and the head taken from the reference (README §5.6): point maps, encoder and LSeg
    tokens, level-0 order and grid; the residual LSeg features (stored reduced only) are ours."""
    geometry = {key: torch.from_numpy(reference[f'dust3r.{key}']).cuda() for key in DUST3R_KEYS}
    semantics = dict(fp32['semantics'],
                     lseg_token_feature=torch.from_numpy(reference['lseg.lseg_token_feature']).cuda())
    return dict(geometry=geometry, semantics=semantics,
                order0=torch.from_numpy(reference['ptv3.order0']).cuda(),
                grid_coord0=torch.from_numpy(reference['ptv3.grid_coord0']).cuda())


def test_ptv3_per_level_given_reference_inputs(model: LargeSpatialModel, images, reference: Reference,
                                                reference_inputs, record_property) -> None:
    geometry, semantics = reference_inputs['geometry'], reference_inputs['semantics']
    coord, color, center, scale = merge_points(geometry['pts3d_1'][0], geometry['pts3d_2'][0], images[0][0],
                                               images[1][0])
    _check(reference, record_property, 'ptv3.center', center)
    _check(reference, record_property, 'ptv3.scale', scale)
    levels: dict[str, torch.Tensor] = {}
    with autocast('fp32', 'cuda'), torch.no_grad():
        computed_grid = model.point_transformer.level0(coord).grid
        model.point_transformer(coord, torch.cat([coord, color], 1), geometry['enc_feat'],
                                semantics['lseg_token_feature'], semantics['lseg_token_feature'],
                                grid_coord=reference_inputs['grid_coord0'],
                                serialization_order=reference_inputs['order0'], intermediates=levels)
    flips = int((computed_grid != reference_inputs['grid_coord0'].long()).any(1).sum())
    record_property('cuda_grid_coord0_points_in_other_voxels', flips)
    logger.info('grid computed on CUDA from the reference point maps: %d points in another voxel than grid_coord0',
                flips)
    assert flips <= VOXEL_FLIPS_ALLOWED
    assert levels['n_points'].tolist() == reference['ptv3.n_points'].tolist()
    assert torch.equal(levels['order0'], reference_inputs['order0'].long())
    for key, value in levels.items():
        if key.endswith('_grid_coord'):
            ours = value[torch.from_numpy(reference[f'ptv3.{key.replace("grid_coord", "idx")}']).cuda()]
            assert np.array_equal(ours.cpu().numpy(), reference[f'ptv3.{key}']), key
        elif key.endswith('_feat'):
            _check(reference, record_property, f'ptv3.{key}', value)


@pytest.fixture(scope='module')
def gaussians(model: LargeSpatialModel, images, reference_inputs) -> dict[str, torch.Tensor]:
    out = model.gaussians(*images, reference_inputs['geometry'], reference_inputs['semantics'],
                          serialization_order=reference_inputs['order0'], grid_coord=reference_inputs['grid_coord0'])
    torch.cuda.synchronize()
    return out


def test_gaussian_head_given_reference_inputs(reference: Reference, images, gaussians, record_property) -> None:
    assert all(value.device == images[0].device for value in gaussians.values())   # stays on the GPU
    _check(reference, record_property, 'ptv3.out_feat', gaussians['point_features'])
    for ours, theirs in GAUSSIAN_NAMES:
        _check(reference, record_property, f'gaussians.{theirs}', gaussians[ours])
    _check(reference, record_property, 'gaussians.means_full', gaussians['means'])
    _check(reference, record_property, 'gaussians.knn_mean_sq_dist', gaussians['knn_mean_sq_dist'])


def test_labels_given_reference_inputs(model: LargeSpatialModel, images, reference: Reference, gaussians,
                                       record_property) -> None:
    height, width = images[0].shape[-2:]
    feature_maps = gaussians['features'].view(2, height, width, -1).permute(0, 3, 1, 2)
    with autocast('fp32', 'cuda'):
        logits = model.view_label_logits(feature_maps, model.text_features(LABELS))
        expanded = model.feature_expansion(torch.nn.functional.interpolate(
            feature_maps, scale_factor=0.5, mode='bilinear', align_corners=False))
    _check(reference, record_property, 'labels.expanded_features', expanded)
    reduced = reference.reduce('labels.logits', logits.cpu().numpy())
    max_abs = float(np.abs(reduced - reference['labels.logits']).max())
    record_property('labels.logits_max_abs', max_abs)
    assert max_abs <= LABEL_LOGIT_ABS_TOLERANCE
    assert np.array_equal(logits.argmax(dim=1).cpu().numpy(), reference['labels.argmax'])


# ---------------------------------------------------------------------------------------------- bf16 accuracy
def _depth_within(geometry: Mapping[str, torch.Tensor], exact: Mapping[str, torch.Tensor]) -> float:
    """The worse view's fraction of pixels whose ray depth (distance from camera 1) is within 1 % of fp32."""
    fractions = []
    for view in (1, 2):
        depth = exact[f'pts3d_{view}'].norm(dim=-1)
        relative = (geometry[f'pts3d_{view}'].norm(dim=-1) - depth).abs() / depth
        fractions.append((relative <= BF16_DEPTH_TOLERANCE).double().mean().item())
    return min(fractions)


def _labels(model: LargeSpatialModel, images, geometry, semantics, precision: str = 'fp32') -> list[torch.Tensor]:
    """Arg-max labels of the source views' Gaussian features for LSM's labels and every phrase set."""
    height, width = images[0].shape[-2:]
    features = model.gaussians(*images, geometry, semantics, precision=precision)['features']
    features = features.view(2, height, width, -1).permute(0, 3, 1, 2)
    return [model.view_label_logits(features, model.text_features(phrases)).argmax(dim=1)
            for phrases in (LABELS, *PHRASE_SETS)]


def _agreement(ours: list[torch.Tensor], exact: list[torch.Tensor]) -> tuple[float, float]:
    """(LSM labels, mean over the phrase sets) fraction of pixels with the same label."""
    values = [(a == b).double().mean().item() for a, b in zip(ours, exact)]
    return values[0], float(np.mean(values[1:]))


def test_bf16_accuracy_per_network(model: LargeSpatialModel, images, fp32, record_property) -> None:
    """Each network in bf16 alone (and PTv3 + head with TF32), against fp32 end to end from the images: the figures
    that decide ``CUDA_NETWORK_PRECISIONS``; the bounds hold for the pipeline's choice."""
    from lsm_ros.pipeline import network_precisions
    if not torch.cuda.is_bf16_supported():
        pytest.skip('this GPU has no bfloat16')
    exact_geometry, exact_semantics = fp32['geometry'], fp32['semantics']
    exact_labels = _labels(model, images, exact_geometry, exact_semantics)
    assert all(len(torch.unique(labels)) > 1 for labels in exact_labels[1:])
    bf16_geometry = model.geometry(*images, precision='bf16')
    bf16_semantics = model.semantics(*images, precision='bf16')
    variants = {'dust3r': (bf16_geometry, exact_semantics, 'fp32'),
                'lseg': (exact_geometry, bf16_semantics, 'fp32'),
                'ptv3_tf32': (exact_geometry, exact_semantics, 'bf16')}
    figures = {'dust3r_depth_within_1pct': _depth_within(bf16_geometry, exact_geometry)}
    for name, (geometry, semantics, ptv3_precision) in variants.items():
        lsm, phrases = _agreement(_labels(model, images, geometry, semantics, ptv3_precision), exact_labels)
        figures[f'{name}_label_agreement'] = lsm
        figures[f'{name}_phrase_set_agreement'] = phrases
    chosen = network_precisions('bf16', 'cuda')
    geometry = bf16_geometry if chosen['dust3r'] == 'bf16' else exact_geometry
    semantics = bf16_semantics if chosen['lseg'] == 'bf16' else exact_semantics
    lsm, phrases = _agreement(_labels(model, images, geometry, semantics, 'bf16'), exact_labels)
    figures.update(pipeline_depth_within_1pct=_depth_within(geometry, exact_geometry),
                   pipeline_label_agreement=lsm, pipeline_phrase_set_agreement=phrases)
    for name, value in figures.items():
        record_property(f'bf16_{name}', value)
    logger.info('bf16 on %s (pipeline choice %s): %s', torch.cuda.get_device_name(), chosen,
                ', '.join(f'{k} {v:.4f}' for k, v in figures.items()))
    assert figures['pipeline_depth_within_1pct'] >= BF16_DEPTH_FRACTION
    assert figures['pipeline_label_agreement'] >= BF16_LABEL_AGREEMENT
    assert figures['pipeline_phrase_set_agreement'] >= BF16_LABEL_AGREEMENT
