"""The exact torch k-nearest-neighbour distances (lsm_ros/model/knn.py) against a scipy k-d tree oracle."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from host_sync import HostSyncCounter

from lsm_ros.model import knn as knn_module
from lsm_ros.model.gaussian_head import knn_mean_squared_distance
from lsm_ros.model.knn import knn_squared_distances
from lsm_ros.reference_weights import find_reference_dir

_REFERENCE_DIR = find_reference_dir()
REFERENCE = (_REFERENCE_DIR or Path('/nonexistent')) / 'gaussians.npz'


def oracle(points: np.ndarray, k: int = 3) -> np.ndarray:
    """(N,3) float32 → (N,k) float32: the k smallest float32 ``(dx*dx + dy*dy) + dz*dz`` to the other finite points.

    Candidates are the k+4 nearest in float64 (a k-d tree), so float32 rounding can never push a true neighbour out;
    non-finite points are nobody's neighbour and get +inf, as do missing neighbours."""
    from scipy.spatial import cKDTree

    points = np.asarray(points, np.float32)
    n = len(points)
    out = np.full((n, k), np.inf, np.float32)
    finite = np.isfinite(points).all(axis=1)
    index = np.flatnonzero(finite)
    if len(index) < 2:
        return out
    kept = points[index]
    tree = cKDTree(kept.astype(np.float64))
    m = min(len(index), k + 5)
    distances, neighbours = tree.query(kept.astype(np.float64), k=m)
    neighbours = neighbours.reshape(len(index), m)
    squared = _squared(kept[neighbours], kept[:, None, :])
    squared[neighbours == np.arange(len(index))[:, None]] = np.inf   # the point itself (wherever it landed)
    if m < k + 1:
        squared = np.concatenate([squared, np.full((len(index), k + 1 - m), np.inf, np.float32)], axis=1)
    squared = np.sort(squared, axis=1)
    # where float32 rounding could rank a farther point lower (near-ties of many points), take every point inside
    # the float64 ball that holds all float32 values <= the k-th
    radius = np.sqrt(squared[:, k - 1].astype(np.float64)) * (1 + 1e-5) + 1e-30
    unsure = np.flatnonzero((m < len(index)) & (distances.reshape(len(index), m)[:, -1] <= radius))
    for row in unsure:
        ball = np.array(tree.query_ball_point(kept[row].astype(np.float64), radius[row]), np.int64)
        ball = ball[ball != row]
        squared[row, :k] = np.sort(_squared(kept[ball], kept[row][None, :]))[:k]
    out[index] = squared[:, :k]
    return out


def _squared(candidates: np.ndarray, queries: np.ndarray) -> np.ndarray:
    with np.errstate(over='ignore'):
        delta = candidates - queries
        return (delta[..., 0] * delta[..., 0] + delta[..., 1] * delta[..., 1]) + delta[..., 2] * delta[..., 2]


def mean_of(squared: np.ndarray) -> np.ndarray:
    total = squared[:, 0]
    for column in range(1, squared.shape[1]):
        total = total + squared[:, column]
    return total / np.float32(squared.shape[1])


def assert_exact(points: np.ndarray, k: int = 3) -> None:
    points = np.ascontiguousarray(points, np.float32)
    ours = knn_squared_distances(torch.from_numpy(points), k).numpy()
    np.testing.assert_array_equal(ours, oracle(points, k))
    if k == 3:
        np.testing.assert_array_equal(knn_mean_squared_distance(torch.from_numpy(points)).numpy(),
                                      mean_of(oracle(points, k)))


@pytest.mark.parametrize('n', [4, 5, 9, 17, 18, 40, 1000, 8000])
def test_random_clouds(n: int) -> None:
    rng = np.random.default_rng(n)
    assert_exact(rng.normal(size=(n, 3)))
    assert_exact(rng.uniform(-5, 5, size=(n, 3)) + 1000.0)   # far from the origin: float32 spacing ~6e-5


@pytest.mark.parametrize('k', [1, 2, 5])
def test_other_k(k: int) -> None:
    assert_exact(np.random.default_rng(k).normal(size=(3000, 3)), k)


def test_clustered_cloud_with_very_different_densities() -> None:
    rng = np.random.default_rng(1)
    parts = [rng.normal(scale=1e-4, size=(3000, 3)) + 0.5,          # a tight cluster
             rng.normal(scale=3.0, size=(2000, 3)),                  # a wide one
             rng.normal(scale=1e-2, size=(3000, 3)) - 2.0,
             rng.uniform(-50, 50, size=(200, 3))]                    # sparse background
    assert_exact(np.concatenate(parts))


def test_duplicates_count_at_distance_zero() -> None:
    rng = np.random.default_rng(2)
    points = rng.normal(size=(3000, 3)).astype(np.float32)
    points[10:13] = points[12]                       # three equal points: two zeros + one distance
    points[50:52] = points[51]
    points[100:400] = points[7]                      # 301 copies: all zeros
    points[1000:1004] = points[1004]                 # exactly k+1 copies of one point... plus the original
    assert_exact(points)
    ours = knn_mean_squared_distance(torch.from_numpy(points)).numpy()
    assert ours[200] == 0 and ours[10] > 0 and ours[50] > 0
    assert_exact(np.repeat(rng.normal(size=(50, 3)), 2, axis=0))     # every point exactly twice
    assert_exact(np.zeros((100, 3)))                                  # all points equal


def test_flat_and_anisotropic_clouds() -> None:
    rng = np.random.default_rng(3)
    plane = rng.uniform(-1, 1, size=(8000, 3))
    plane[:, 2] = 0.0                                                 # exactly planar
    assert_exact(plane)
    sheet = rng.normal(size=(8000, 3)) * np.array([10.0, 1.0, 1e-6])  # 7 decades between the axes
    assert_exact(sheet)
    line = np.zeros((3000, 3))
    line[:, 0] = rng.uniform(0, 1, 3000)
    assert_exact(line)
    grid = np.stack(np.meshgrid(*[np.arange(12.0)] * 3, indexing='ij'), -1).reshape(-1, 3)  # many exact ties
    assert_exact(grid * 0.1)


def test_far_outliers() -> None:
    rng = np.random.default_rng(4)
    points = np.concatenate([rng.normal(scale=0.01, size=(8000, 3)),
                             rng.normal(size=(5, 3)) * 1e5,
                             np.array([[3e7, 0, 0], [-3e7, 1, 1], [0, 0, 1e30]])])
    assert_exact(points)


def test_huge_coordinates_whose_squares_overflow() -> None:
    rng = np.random.default_rng(5)
    points = rng.normal(size=(200, 3)) * 1e19
    points[:100] = rng.normal(size=(100, 3))
    assert_exact(points)                               # inf squared distances are inf values, not errors


def test_non_finite_points_are_infinitely_far() -> None:
    rng = np.random.default_rng(6)
    points = rng.normal(size=(3000, 3)).astype(np.float32)
    points[5, 0] = np.nan
    points[6] = np.inf
    points[7, 2] = -np.inf
    points[8] = np.nan
    ours = knn_squared_distances(torch.from_numpy(points), 3).numpy()
    assert np.isinf(ours[5:9]).all()
    finite = np.isfinite(points).all(axis=1)
    np.testing.assert_array_equal(ours[finite], oracle(points[finite]))
    assert_exact(points)
    # fewer than k finite other points: their missing neighbours are infinitely far
    few = np.full((10, 3), np.nan, np.float32)
    few[:3] = rng.normal(size=(3, 3))
    ours = knn_squared_distances(torch.from_numpy(few), 3).numpy()
    assert np.isfinite(ours[:3, :2]).all() and np.isinf(ours[:3, 2]).all() and np.isinf(ours[3:]).all()
    assert np.isinf(knn_mean_squared_distance(torch.from_numpy(few)).numpy()).all()


def test_degenerate_input_raises() -> None:
    with pytest.raises(ValueError, match='more than 3 points'):
        knn_mean_squared_distance(torch.zeros(3, 3))
    with pytest.raises(ValueError, match='more than 3 points'):
        knn_mean_squared_distance(torch.zeros(0, 3))
    with pytest.raises(ValueError, match=r'\(N, 3\)'):
        knn_squared_distances(torch.zeros(10, 2), 3)


def test_float64_input_is_evaluated_in_float32() -> None:
    points = np.random.default_rng(7).normal(size=(500, 3))
    ours = knn_mean_squared_distance(torch.from_numpy(points))
    assert ours.dtype == torch.float32
    np.testing.assert_array_equal(ours.numpy(), mean_of(oracle(points.astype(np.float32))))


def test_small_tiles_and_loose_bounds_give_the_same_values(monkeypatch: pytest.MonkeyPatch) -> None:
    points = np.random.default_rng(8).normal(size=(3000, 3)).astype(np.float32)
    expected = knn_squared_distances(torch.from_numpy(points), 3)
    np.testing.assert_array_equal(expected.numpy(), oracle(points))
    monkeypatch.setattr(knn_module, 'TILE_ELEMENTS', 50)          # one piece per tile, widths above the limit
    torch.testing.assert_close(knn_squared_distances(torch.from_numpy(points), 3), expected, rtol=0, atol=0)
    monkeypatch.setattr(knn_module, 'WINDOW_HALF', 1)             # looser bounds: longer pieces, same answer
    torch.testing.assert_close(knn_squared_distances(torch.from_numpy(points), 3), expected, rtol=0, atol=0)
    assert_exact(points[:500], k=1)


def test_large_k_and_surface_like_cloud_with_varying_density() -> None:
    """Two noisy, overlapping depth-map-like surfaces whose density varies ~100x, as DUSt3R point maps."""
    rng = np.random.default_rng(11)
    u, v = np.meshgrid(np.linspace(-1, 1, 120) ** 3, np.linspace(-1, 1, 100), indexing='ij')
    surface = np.stack([u, v, 0.3 * np.sin(3 * u) * np.cos(2 * v)], -1).reshape(-1, 3)
    second = surface[::2] + np.array([0.01, 0.0, 0.02])
    cloud = np.concatenate([surface, second]) + rng.normal(scale=1e-3, size=(len(surface) + len(second), 3))
    assert_exact(cloud)
    assert_exact(cloud[::3], k=12)                                  # more neighbours than the window's default


@pytest.mark.skipif(not REFERENCE.exists(), reason='needs ../shared/reference/lsm_vitl_256')
def test_reference_knn_mean_squared_distance_is_bit_identical() -> None:
    with np.load(REFERENCE) as arrays:
        means, expected = arrays['means_full'], arrays['knn_mean_sq_dist']
    ours = knn_mean_squared_distance(torch.from_numpy(means)).numpy()
    np.testing.assert_array_equal(ours, expected)


def test_host_synchronisations_are_few_and_no_integer_matmul() -> None:
    rng = np.random.default_rng(9)
    clouds = [np.concatenate([rng.normal(scale=s, size=(4000, 3)) for s in (0.01, 0.1, 1.0)]),
              np.concatenate([rng.normal(size=(3000, 3)), [[np.nan, 0, 0], [np.inf, 1, 1], [1e30, 0, 0]]])]
    for cloud in clouds:
        with HostSyncCounter() as guard:
            knn_mean_squared_distance(torch.from_numpy(cloud.astype(np.float32)))
        assert guard.integer_matmuls == 0
        # exactly one device-to-host copy: the piece counts and widths of the length classes
        assert guard.syncs == {'_to_copy': 1}, guard.syncs


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_equals_cpu() -> None:
    rng = np.random.default_rng(10)
    points = torch.from_numpy(np.concatenate([rng.normal(scale=0.01, size=(50000, 3)), rng.normal(size=(50000, 3)),
                                              np.array([[np.nan, 0, 0], [1e6, 0, 0]])]).astype(np.float32))
    cpu = knn_mean_squared_distance(points)
    cuda = knn_mean_squared_distance(points.cuda())
    assert cuda.device.type == 'cuda'
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=0, atol=0, equal_nan=True)
    if REFERENCE.exists():
        with np.load(REFERENCE) as arrays:
            means, expected = arrays['means_full'], arrays['knn_mean_sq_dist']
        np.testing.assert_array_equal(knn_mean_squared_distance(torch.from_numpy(means).cuda()).cpu().numpy(),
                                      expected)
