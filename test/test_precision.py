"""Reduced-precision path (PipelineConfig.precision) on tiny random models: the fp32 default stays bit-exact,
bf16 runs on the CPU with float32 outputs, fp16 is refused without CUDA, and the setting is a ROS parameter."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL_IMAGE_SIZE

from lsm_ros import config as config_module
from lsm_ros.config import PipelineConfig, config_from_mapping, parameter_specs
from lsm_ros.model import layers
from lsm_ros.model.lsm import LargeSpatialModel, LsmConfig
from lsm_ros.pipeline import NETWORK_PRECISIONS, Reconstructor
from lsm_ros.preprocess import preprocess_pair

SIZE = TINY_MODEL_IMAGE_SIZE  # image side of the tiny_model tests (conftest's tiny_pair)
GEOMETRY_KEYS = ('pts3d_1', 'conf_1', 'pts3d_2', 'conf_2', 'enc_feat')
SEMANTIC_KEYS = ('lseg_features', 'lseg_token_feature', 'lseg_res_feature')
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


@pytest.fixture(scope='module')
def images() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    return tuple(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(2))


def _range_relative_difference(points: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """|Δ distance from camera 1| / distance, per pixel (the ray depth; z is meaningless for random weights)."""
    return (points.norm(dim=-1) - reference.norm(dim=-1)).abs() / reference.norm(dim=-1)


def _assert_equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], keys: tuple[str, ...]) -> None:
    for key in keys:
        assert torch.equal(ours[key], theirs[key]), key


def test_precision_choices_match_the_model() -> None:
    assert config_module.PRECISIONS == layers.PRECISIONS
    assert set(NETWORK_PRECISIONS) == set(layers.PRECISIONS)
    assert PipelineConfig().precision == 'fp32'
    assert all(set(parts.values()) <= {'fp32', name} for name, parts in NETWORK_PRECISIONS.items())


@pytest.mark.parametrize('value,reason', [('int8', 'not one of'), ('FP32', 'not one of'), (16, 'expected a string')])
def test_unknown_precision_is_refused(value, reason) -> None:
    with pytest.raises(ValueError, match=reason):
        config_from_mapping(PipelineConfig, {'precision': value})
    with pytest.raises(ValueError):
        layers.check_precision(value, 'cpu')


def test_fp16_on_the_cpu_is_refused(tiny_model, tiny_pair) -> None:
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
        Reconstructor.from_config(LsmConfig.tiny(), device='cpu', precision='fp16')
    with pytest.raises(ValueError, match='CUDA'):
        tiny_model.geometry(*tiny_pair, precision='fp16')
    with pytest.raises(ValueError, match='CUDA'):
        tiny_model.semantics(*tiny_pair, precision='fp16')


def test_fp32_is_bit_exact_also_inside_an_autocast(tiny_model, tiny_pair) -> None:
    geometry, semantics = tiny_model.geometry(*tiny_pair), tiny_model.semantics(*tiny_pair)
    gaussians = tiny_model.gaussians(*tiny_pair, geometry, semantics)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _assert_equal(tiny_model.geometry(*tiny_pair, precision='fp32'), geometry, GEOMETRY_KEYS)
        _assert_equal(tiny_model.semantics(*tiny_pair, precision='fp32'), semantics, SEMANTIC_KEYS)
        _assert_equal(tiny_model.gaussians(*tiny_pair, geometry, semantics), gaussians, tuple(gaussians))
    _assert_equal(tiny_model.dust3r(*tiny_pair), geometry, GEOMETRY_KEYS)


def test_bf16_runs_on_the_cpu_with_float32_outputs(tiny_model, tiny_pair) -> None:
    reference = tiny_model.geometry(*tiny_pair), tiny_model.semantics(*tiny_pair)
    reduced = tiny_model.geometry(*tiny_pair, precision='bf16'), tiny_model.semantics(*tiny_pair, precision='bf16')
    for ours, theirs in zip(reduced, reference):
        for key, value in theirs.items():
            assert ours[key].dtype == torch.float32 and ours[key].shape == value.shape, key
            assert torch.isfinite(ours[key]).all(), key
            assert not torch.equal(ours[key], value), f'{key}: bf16 ran in fp32'
    for view in (1, 2):
        relative = _range_relative_difference(reduced[0][f'pts3d_{view}'], reference[0][f'pts3d_{view}'])
        assert relative.median() < 0.01 and relative.max() < 0.05, (view, relative.median(), relative.max())
    for key in SEMANTIC_KEYS:
        cosine = F.cosine_similarity(reduced[1][key], reference[1][key], dim=-1 if key == 'lseg_token_feature' else 1)
        assert cosine.min() > 0.999, key
    gaussians = tiny_model.gaussians(*tiny_pair, *reduced)
    assert all(value.dtype in (torch.float32, torch.int64) for value in gaussians.values())


def _recording(method, calls: list) -> Any:
    """``method`` that also appends (its precision argument, its output) to ``calls``."""
    def wrapper(*args, **kwargs):
        out = method(*args, **kwargs)
        calls.append((kwargs.get('precision'), out))
        return out
    return wrapper


@pytest.fixture(scope='module')
def pipeline_runs(images) -> dict[str, tuple[Reconstructor, Any, dict[str, list]]]:
    """precision -> (reconstructor, its reconstruction of ``images``, the geometry/semantics calls it made)."""
    runs = {}
    for precision in ('fp32', 'bf16'):
        reconstructor = Reconstructor.from_config(LsmConfig.tiny(), device='cpu', resolution=224, precision=precision,
                                                  pose_max_points=512, pose_ransac_iterations=20)
        calls: dict[str, list] = {'geometry': [], 'semantics': []}
        for name, recorded in calls.items():
            setattr(reconstructor.network, name, _recording(getattr(reconstructor.network, name), recorded))
        runs[precision] = reconstructor, reconstructor.reconstruct(*images), calls
    return runs


@torch.no_grad()
def test_pipeline_fp32_equals_the_model_called_directly(pipeline_runs, images) -> None:
    reconstructor, result, calls = pipeline_runs['fp32']
    view1, view2 = preprocess_pair(*images, 224)
    geometry = reconstructor.network.geometry(view1.tensor, view2.tensor)
    semantics = reconstructor.network.semantics(view1.tensor, view2.tensor)
    assert calls['geometry'][0][0] == calls['semantics'][0][0] == 'fp32'
    _assert_equal(calls['geometry'][0][1], geometry, GEOMETRY_KEYS)
    _assert_equal(calls['semantics'][0][1], semantics, SEMANTIC_KEYS)
    for key in ('pts3d_1', 'conf_1', 'pts3d_2', 'conf_2'):
        np.testing.assert_array_equal(result.network_outputs[key], geometry[key].numpy())


@torch.no_grad()
def test_bf16_pipeline_runs_lseg_reduced_and_dust3r_exact(pipeline_runs, images) -> None:
    reconstructor, reduced, calls = pipeline_runs['bf16']
    _, exact, exact_calls = pipeline_runs['fp32']
    assert reconstructor.precisions == {'dust3r': 'fp32', 'lseg': 'bf16'}
    assert calls['geometry'][0][0] == 'fp32' and calls['semantics'][0][0] == 'bf16'
    for key, value in exact.network_outputs.items():
        np.testing.assert_array_equal(reduced.network_outputs[key], value)
    view1, view2 = preprocess_pair(*images, 224)
    _assert_equal(calls['semantics'][0][1], reconstructor.network.semantics(view1.tensor, view2.tensor,
                                                                           precision='bf16'), SEMANTIC_KEYS)
    np.testing.assert_array_equal(reduced.gaussians.means, exact.gaussians.means)
    assert reduced.gaussians.features.dtype == np.float32
    assert not np.array_equal(reduced.gaussians.features, exact.gaussians.features)
    cosine = F.cosine_similarity(torch.from_numpy(reduced.gaussians.features),
                                 torch.from_numpy(exact.gaussians.features), dim=1)
    assert cosine.min() > 0.999


def test_precision_is_a_read_only_ros_parameter_with_choices() -> None:
    pytest.importorskip('rclpy')
    from lsm_ros.ros.params import parameter_descriptor
    spec = next(s for s in parameter_specs(PipelineConfig) if s.name == 'precision')
    assert spec.choices == ('fp32', 'bf16', 'fp16') and spec.read_only and spec.type is str
    descriptor = parameter_descriptor(spec)
    assert descriptor.read_only and "one of: 'fp32', 'bf16', 'fp16'" in descriptor.additional_constraints
    assert 'exact' in descriptor.description and 'approximate' in descriptor.description
    assert [f.name for f in dataclasses.fields(PipelineConfig)].index('precision') == 5   # after resolution


@CUDA
@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_reduced_precision_on_cuda(tiny_model, tiny_pair, precision) -> None:
    if precision == 'bf16' and not torch.cuda.is_bf16_supported():
        pytest.skip('this GPU has no bfloat16')
    model = LargeSpatialModel(LsmConfig.tiny()).eval()
    model.load_state_dict(tiny_model.state_dict())
    model = model.cuda()
    img1, img2 = (image.cuda() for image in tiny_pair)
    reference = model.geometry(img1, img2)
    reduced = model.geometry(img1, img2, precision=precision)
    semantics = model.semantics(img1, img2, precision=precision)
    assert all(value.dtype == torch.float32 for value in (*reduced.values(), *semantics.values()))
    for view in (1, 2):
        relative = _range_relative_difference(reduced[f'pts3d_{view}'], reference[f'pts3d_{view}'])
        assert relative.max() < 0.05, (view, relative.max())
    gaussians = model.gaussians(img1, img2, reduced, semantics)
    assert torch.isfinite(gaussians['means']).all()


# ------------------------------------------------------------------------------------------------ TF32 control
def _tf32_flags() -> dict[str, Any]:
    """The TF32 settings :func:`layers.tf32_mode` manages, by attribute path (read through the same API)."""
    return {f'{type(owner).__module__}.{attribute}': getattr(owner, attribute)
            for owner, attribute in layers._tf32_settings()}


def _allowed(flags: dict[str, Any]) -> set[bool]:
    return {value in (True, 'tf32') for value in flags.values()}


@pytest.fixture
def user_tf32_setting():
    """A deliberately odd user setting (matmul TF32 on, cuDNN TF32 off), restored after the test."""
    settings = layers._tf32_settings()
    saved = [(owner, attribute, getattr(owner, attribute)) for owner, attribute in settings]
    (matmul, matmul_attribute), (conv, conv_attribute) = settings
    setattr(matmul, matmul_attribute, layers._tf32_value(matmul_attribute, True))
    setattr(conv, conv_attribute, layers._tf32_value(conv_attribute, False))
    yield _tf32_flags()
    for owner, attribute, value in saved:
        setattr(owner, attribute, value)
    assert not any(layers._TF32_HOLDERS.values()) and not layers._TF32_SAVED


def test_tf32_mode_sets_and_restores_the_process_setting(user_tf32_setting) -> None:
    assert _allowed(user_tf32_setting) == {True, False}
    with layers.tf32_mode(False):
        assert _allowed(_tf32_flags()) == {False}
        with layers.tf32_mode(True):           # exact wins while an exact holder is active
            assert _allowed(_tf32_flags()) == {False}
        assert _allowed(_tf32_flags()) == {False}
    assert _tf32_flags() == user_tf32_setting
    with layers.tf32_mode(True):
        assert _allowed(_tf32_flags()) == {True}
        with layers.tf32_mode(False):          # fp32 inside a fast context: exact, then fast again
            assert _allowed(_tf32_flags()) == {False}
        assert _allowed(_tf32_flags()) == {True}
    assert _tf32_flags() == user_tf32_setting


def test_tf32_mode_restores_after_an_exception(user_tf32_setting) -> None:
    with pytest.raises(RuntimeError, match='inside'):
        with layers.tf32_mode(True):
            with layers.tf32_mode(False):
                raise RuntimeError('inside')
    assert _tf32_flags() == user_tf32_setting


def test_tf32_mode_holds_across_threads(user_tf32_setting) -> None:
    """Two threads: while the exact one runs, TF32 is off for both; the setting comes back after the last."""
    import threading
    entered, release = threading.Event(), threading.Event()

    def exact() -> None:
        with layers.tf32_mode(False):
            entered.set()
            release.wait(10)

    worker = threading.Thread(target=exact)
    with layers.tf32_mode(True):
        worker.start()
        assert entered.wait(10)
        assert _allowed(_tf32_flags()) == {False}
        release.set()
        worker.join(10)
        assert _allowed(_tf32_flags()) == {True}
    assert _tf32_flags() == user_tf32_setting


def test_precision_contexts_leave_tf32_alone_on_the_cpu(user_tf32_setting) -> None:
    for precision in ('fp32', 'bf16'):
        for make in (layers.autocast, layers.fp32_matmul):
            with make(precision, 'cpu'):
                assert _tf32_flags() == user_tf32_setting
                assert torch.is_autocast_enabled('cpu') == (make is layers.autocast and precision == 'bf16')
    with layers.autocast('bf16', 'cpu'):
        assert torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16
        with layers.fp32_matmul('bf16', 'cpu'):
            assert not torch.is_autocast_enabled('cpu')
        assert torch.is_autocast_enabled('cpu')
    with pytest.raises(ValueError, match='unknown precision'):
        layers.fp32_matmul('int8', 'cpu')


def test_precision_contexts_set_tf32_for_cuda_devices(user_tf32_setting) -> None:
    """The CUDA branch, on any build (the flags exist without a GPU): fp32 exact, bf16 TF32, restored after."""
    for precision, allowed in (('fp32', False), ('bf16', True)):
        for make in (layers.autocast, layers.fp32_matmul):
            if precision == 'bf16' and make is layers.autocast and not torch.cuda.is_available():
                continue      # autocast's check_precision asks the GPU whether it has bfloat16
            with make(precision, 'cuda'):
                assert _allowed(_tf32_flags()) == {allowed}, (precision, make.__name__)
            assert _tf32_flags() == user_tf32_setting
    with layers.fp32_matmul('bf16', 'cuda'), layers.fp32_matmul('fp32', 'cuda'):
        assert _allowed(_tf32_flags()) == {False}
