"""Reconstructor.render: defaults, channels, label decoding of rendered features, and argument errors."""
from __future__ import annotations

import numpy as np
import pytest

IMAGE = (np.random.default_rng(0).random((240, 320, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope='module')
def result(tiny_lsm_reconstructor):
    return tiny_lsm_reconstructor.reconstruct(IMAGE, IMAGE[:, ::-1].copy())


def test_default_view_and_channels(tiny_lsm_reconstructor, result) -> None:
    view = tiny_lsm_reconstructor.render(result)
    width, height = result.size
    assert (view.width, view.height) == (width, height) and np.array_equal(view.K, result.K_1)
    assert view.rgb.shape == (height, width, 3) and view.depth.shape == (height, width)
    assert view.features.shape == (height, width, 64) and view.alpha.shape == (height, width)
    assert 0 <= view.alpha.min() and view.alpha.max() <= 1 and 0 <= view.rgb.min() and view.rgb.max() <= 1
    assert np.isnan(view.depth[view.alpha < 0.5]).all()
    assert view.label_logits is None and view.labels is None


def test_rendered_features_are_labelled(tiny_lsm_reconstructor, result) -> None:
    K = np.array([[80.0, 0, 40], [0, 80.0, 30], [0, 0, 1]])
    view = tiny_lsm_reconstructor.render(result, K=K, size=(81, 61), channels=('rgb',), phrases=['chair', 'floor'])
    assert view.rgb.shape == (61, 81, 3) and view.features is None and view.depth is None
    assert view.phrases == ('chair', 'floor') and view.label_logits.shape == (2, 61, 81)
    labels = view.labels
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 255}
    assert (labels[view.alpha < 0.5] == 255).all()


def test_render_arguments_are_checked(tiny_lsm_reconstructor, tiny_reconstructor, result) -> None:
    render = tiny_lsm_reconstructor.render
    with pytest.raises(ValueError, match='unknown render channels'):
        render(result, channels=('rgb', 'normals'))
    with pytest.raises(ValueError, match='rigid transform'):
        render(result, T_left_camera=np.diag([2.0, 1, 1, 1]))
    with pytest.raises(ValueError, match='pinhole'):
        render(result, K=np.zeros((3, 3)))
    with pytest.raises(ValueError, match='render size'):
        render(result, size=(0, 10))
    with pytest.raises(ValueError, match='empty or blank'):
        render(result, phrases=[' '])
    geometry_only = tiny_reconstructor.reconstruct(IMAGE, IMAGE)
    with pytest.raises(RuntimeError, match='no Gaussians'):
        render(geometry_only)
