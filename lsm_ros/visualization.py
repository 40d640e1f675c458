"""Colourings of reconstruction products for people (RViz, PNG, video): depth, semantic features, labels.

Framework-free (numpy). Label colours come from :mod:`lsm_ros.semantics` (one palette for node, CLI and docs).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lsm_ros.io import depth_to_color
from lsm_ros.semantics import colorize_labels, label_palette

__all__ = ['FeaturePca', 'colorize_labels', 'depth_to_color', 'feature_pca_colors', 'label_palette']


@dataclass(frozen=True)
class FeaturePca:
    """A 3-component PCA of semantic features that maps them to RGB with a fixed basis, so that every frame of a
    video (or every view) gets the same colours. Fit it once, on the Gaussians' features."""

    mean: np.ndarray        # (C,)
    basis: np.ndarray       # (C, 3) principal directions, sign-fixed (largest loading positive)
    low: np.ndarray         # (3,) 1st percentile of the projections, mapped to 0
    high: np.ndarray        # (3,) 99th percentile, mapped to 255

    @classmethod
    def fit(cls, features: np.ndarray, max_samples: int = 65536, seed: int = 0) -> 'FeaturePca':
        """From (..., C) features (non-finite rows ignored; at most ``max_samples`` random rows used)."""
        flat = np.asarray(features, dtype=np.float64).reshape(-1, np.shape(features)[-1])
        flat = flat[np.isfinite(flat).all(axis=1)]
        if len(flat) < 2:
            raise ValueError('need at least two finite feature vectors to fit a PCA')
        if len(flat) > max_samples:
            flat = flat[np.random.default_rng(seed).choice(len(flat), max_samples, replace=False)]
        mean = flat.mean(axis=0)
        centred = flat - mean
        eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred)  # (C, C): cheap for C = 64
        basis = eigenvectors[:, np.argsort(eigenvalues)[::-1][:3]]
        if basis.shape[1] < 3:  # fewer than 3 feature channels or samples: pad with zero directions
            basis = np.pad(basis, ((0, 0), (0, 3 - basis.shape[1])))
        signs = np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(3)])
        basis = basis * np.where(signs == 0, 1.0, signs)
        projected = (flat - mean) @ basis
        low, high = np.percentile(projected, 1, axis=0), np.percentile(projected, 99, axis=0)
        return cls(mean=mean, basis=basis, low=low, high=np.maximum(high, low + 1e-12))

    def colors(self, features: np.ndarray) -> np.ndarray:
        """(..., C) features → (..., 3) uint8 RGB; non-finite features are black."""
        features = np.asarray(features, dtype=np.float64)
        finite = np.isfinite(features).all(axis=-1)
        projected = (np.where(finite[..., None], features, self.mean) - self.mean) @ self.basis
        scaled = np.clip((projected - self.low) / (self.high - self.low), 0.0, 1.0)
        rgb = np.round(scaled * 255.0).astype(np.uint8)
        rgb[~finite] = 0
        return rgb


def feature_pca_colors(features: np.ndarray, alpha: np.ndarray | None = None) -> np.ndarray:
    """(H, W, C) feature map → (H, W, 3) uint8 RGB by a PCA fitted on the map itself (pixels with ``alpha`` <
    0.5 are left out of the fit and drawn black). For consistent colours across frames use :class:`FeaturePca`."""
    features = np.asarray(features)
    covered = np.ones(features.shape[:-1], dtype=bool) if alpha is None else np.asarray(alpha) >= 0.5
    if covered.sum() < 2:
        return np.zeros(features.shape[:-1] + (3,), dtype=np.uint8)
    rgb = FeaturePca.fit(features[covered]).colors(features)
    rgb[~covered] = 0
    return rgb
