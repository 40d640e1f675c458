"""Feature PCA colouring (one basis for every frame) and the shared colour maps."""
from __future__ import annotations

import numpy as np
import pytest

from lsm_ros.visualization import FeaturePca, feature_pca_colors


def test_pca_colours_follow_the_main_directions() -> None:
    rng = np.random.default_rng(0)
    directions = np.linalg.qr(rng.normal(size=(16, 3)))[0]          # (16, 3) orthonormal
    weights = rng.normal(size=(5000, 3)) * np.array([10.0, 3.0, 1.0])
    features = weights @ directions.T + 0.01 * rng.normal(size=(5000, 16)) + 5.0
    pca = FeaturePca.fit(features)
    # the basis spans the three directions, ordered by variance, with a fixed sign
    np.testing.assert_allclose(np.abs(pca.basis.T @ directions), np.eye(3), atol=1e-2)
    assert (pca.basis[np.abs(pca.basis).argmax(axis=0), np.arange(3)] > 0).all()
    rgb = pca.colors(features)
    assert rgb.dtype == np.uint8 and rgb.shape == (5000, 3)
    # red follows the first component monotonically
    order = np.argsort(weights[:, 0] * np.sign(directions[:, 0] @ pca.basis[:, 0]))
    assert np.all(np.diff(rgb[order, 0].astype(int)) >= -1) or np.all(np.diff(rgb[order[::-1], 0].astype(int)) >= -1)
    assert rgb[:, 0].min() == 0 and rgb[:, 0].max() == 255


def test_one_basis_gives_the_same_colour_to_the_same_feature() -> None:
    rng = np.random.default_rng(1)
    features = rng.normal(size=(1000, 8))
    pca = FeaturePca.fit(features)
    frame_a, frame_b = features[:10].reshape(2, 5, 8), features[5:15].reshape(2, 5, 8)
    assert np.array_equal(pca.colors(frame_a).reshape(-1, 3)[5:], pca.colors(frame_b).reshape(-1, 3)[:5])


def test_map_colouring_masks_empty_pixels_and_non_finite_values() -> None:
    rng = np.random.default_rng(2)
    features = rng.normal(size=(6, 7, 4))
    alpha = np.ones((6, 7))
    alpha[0] = 0.0
    features[1, 1] = np.nan
    rgb = feature_pca_colors(features, alpha)
    assert rgb.shape == (6, 7, 3) and (rgb[0] == 0).all() and (rgb[1, 1] == 0).all()
    assert (feature_pca_colors(features, np.zeros((6, 7))) == 0).all()
    with pytest.raises(ValueError, match='two finite'):
        FeaturePca.fit(np.full((3, 4), np.nan))
