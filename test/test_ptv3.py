"""Unit tests of the pure-PyTorch Point Transformer V3 of LSM: serialization codes, submanifold convolution with
duplicate voxels, pooling / unpooling, patch attention, and the tiny model end to end (random weights)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lsm_ros.model import sparse_conv
from lsm_ros.model.ptv3 import (CHECKPOINT_PREFIX, PointTransformerV3LSM, PTv3Config, SerializedAttention,
                                SerializedPooling, SerializedUnpooling, patch_gather_index, strip_checkpoint_prefix,
                                voxel_grid)
from lsm_ros.model.serialization import (ORDERS, encode, grid_depth, hilbert_encode, serialization_codes,
                                         z_order_encode)
from lsm_ros.model.sparse_conv import (build_neighbour_map, host_ints, kernel_offsets, neighbour_map, submanifold_conv,
                                       voxelise)
from host_sync import HostSyncCounter
from lsm_ros.reference_weights import find_reference_dir, read_manifest

REFERENCE = find_reference_dir()
def _random_grid(n: int, depth: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1 << depth, (n, 3), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ serialization
def _z_order_slow(x: int, y: int, z: int, depth: int) -> int:
    code = 0
    for i in range(depth):
        code |= ((x >> i) & 1) << (3 * i + 2) | ((y >> i) & 1) << (3 * i + 1) | ((z >> i) & 1) << (3 * i)
    return code


def _hilbert_slow(point: list[int], bits: int) -> int:
    """Skilling (2004): AxesToTranspose on one point, then the transposed index read out bit by bit, MSB first,
    axis 0 first."""
    axes = list(point)
    top = 1 << (bits - 1)
    q = top
    while q > 1:
        p = q - 1
        for i in range(3):
            if axes[i] & q:
                axes[0] ^= p
            else:
                t = (axes[0] ^ axes[i]) & p
                axes[0] ^= t
                axes[i] ^= t
        q >>= 1
    for i in range(1, 3):
        axes[i] ^= axes[i - 1]
    t = 0
    q = top
    while q > 1:
        if axes[2] & q:
            t ^= q - 1
        q >>= 1
    axes = [a ^ t for a in axes]
    code = 0
    for b in range(bits - 1, -1, -1):
        for i in range(3):
            code = (code << 1) | ((axes[i] >> b) & 1)
    return code


@pytest.mark.parametrize('depth', [1, 3, 8, 11, 16])
def test_z_order_matches_per_bit_reference(depth: int) -> None:
    grid = _random_grid(300, depth, seed=depth)
    expected = [_z_order_slow(*g, depth) for g in grid.tolist()]
    assert z_order_encode(grid, depth).tolist() == expected


@pytest.mark.parametrize('depth', [1, 2, 5, 8, 16])
def test_hilbert_matches_per_point_skilling(depth: int) -> None:
    grid = _random_grid(300, depth, seed=100 + depth)
    assert hilbert_encode(grid, depth).tolist() == [_hilbert_slow(g, depth) for g in grid.tolist()]


@pytest.mark.parametrize('depth', [1, 2, 3])
def test_hilbert_is_a_unit_step_curve(depth: int) -> None:
    side = 1 << depth
    cells = torch.tensor(list(itertools.product(range(side), repeat=3)))
    codes = hilbert_encode(cells, depth)
    assert sorted(codes.tolist()) == list(range(side ** 3))
    path = cells[torch.argsort(codes)]
    assert bool(((path[1:] - path[:-1]).abs().sum(1) == 1).all())


def test_known_codes() -> None:
    """Values of the official Pointcept encoders (z_order.xyz2key, hilbert.encode)."""
    corners = torch.tensor(list(itertools.product(range(2), repeat=3)))
    assert hilbert_encode(corners, 1).tolist() == [0, 1, 3, 2, 7, 6, 4, 5]
    grid = torch.tensor([[0, 0, 0], [1, 2, 3], [3, 2, 1], [7, 0, 5], [2, 6, 4], [5, 5, 5], [6, 1, 7], [4, 3, 0]])
    assert hilbert_encode(grid, 3).tolist() == [0, 48, 20, 440, 160, 325, 434, 493]
    assert z_order_encode(grid, 3).tolist() == [0, 29, 53, 357, 240, 455, 363, 274]
    big = torch.tensor([[1000, 2000, 3000], [65535, 0, 12345]])
    assert hilbert_encode(big, 16).tolist() == [63505582080, 279423209514058]


def test_transposed_orders_and_batch_bits() -> None:
    grid = _random_grid(200, 6, seed=7)
    swapped = grid[:, [1, 0, 2]]
    codes = serialization_codes(grid, 6, ORDERS)
    assert codes.shape == (4, 200) and codes.dtype == torch.int64
    assert torch.equal(codes[0], z_order_encode(grid, 6))
    assert torch.equal(codes[1], z_order_encode(swapped, 6))
    assert torch.equal(codes[2], hilbert_encode(grid, 6))
    assert torch.equal(codes[3], hilbert_encode(swapped, 6))
    batch = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(8))
    batched = serialization_codes(grid, 6, ORDERS, batch=batch)
    assert torch.equal(batched >> 18, batch.expand(4, -1))
    assert torch.equal(batched & ((1 << 18) - 1), codes)
    assert grid_depth(torch.tensor([[0, 5, 2]])) == 3
    with pytest.raises(ValueError):
        encode(grid, 6, 'peano')


# ------------------------------------------------------------------------------------------------ sparse conv
def _subm_conv_slow(feat: torch.Tensor, grid: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                    ) -> torch.Tensor:
    """The duplicate-voxel rule, point by point, with dictionaries (float64)."""
    k = weight.shape[1]
    centre = k ** 3 // 2
    feat, weight = feat.double(), weight.double()
    members: dict[tuple[int, ...], list[int]] = {}
    for i, g in enumerate(grid.tolist()):
        members.setdefault(tuple(g), []).append(i)
    offsets = kernel_offsets(k).tolist()
    out = torch.zeros(feat.shape[0], weight.shape[0], dtype=torch.float64)
    for i, g in enumerate(grid.tolist()):
        acc = weight[:, k // 2, k // 2, k // 2] @ feat[i] + (0 if bias is None else bias.double())
        is_rep = members[tuple(g)][0] == i
        for t, (dx, dy, dz) in enumerate(offsets):
            neighbours = members.get((g[0] + dx, g[1] + dy, g[2] + dz))
            if not neighbours or t == centre:
                continue
            w = weight[:, t // (k * k), (t // k) % k, t % k]
            if t > centre:
                acc = acc + w @ feat[neighbours[0]]
            elif is_rep:
                acc = acc + w @ feat[neighbours].sum(0)
        out[i] = acc
    return out


@pytest.mark.parametrize('kernel_size', [3, 5])
@pytest.mark.parametrize('dense_lookup', [True, False])
def test_submanifold_conv_duplicate_rule(kernel_size: int, dense_lookup: bool, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    monkeypatch.setattr(sparse_conv, '_DENSE_LOOKUP_CELLS', 1 << 25 if dense_lookup else 0)
    monkeypatch.setattr(sparse_conv, '_GATHER_VALUES', 4096)   # several im2col chunks
    generator = torch.Generator().manual_seed(kernel_size)
    grid = torch.randint(0, 5, (160, 3), generator=generator) + 40    # ~125 cells: many duplicates
    feat = torch.randn(160, 4, generator=generator)
    weight = torch.randn(6, kernel_size, kernel_size, kernel_size, 4, generator=generator)
    bias = torch.randn(6, generator=generator)
    neighbour_map = build_neighbour_map(grid, kernel_size)
    assert not neighbour_map.unique
    out = submanifold_conv(feat, weight, bias, neighbour_map)
    torch.testing.assert_close(out.double(), _subm_conv_slow(feat, grid, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dense_lookup', [True, False])
def test_submanifold_conv_unique_voxels_is_cross_correlation(dense_lookup: bool, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    monkeypatch.setattr(sparse_conv, '_DENSE_LOOKUP_CELLS', 1 << 25 if dense_lookup else 0)
    generator = torch.Generator().manual_seed(3)
    cells = torch.randperm(8 * 9 * 10, generator=generator)[:300]
    grid = torch.stack([cells // 90, (cells // 10) % 9, cells % 10], dim=1)
    feat = torch.randn(300, 5, generator=generator)
    weight = torch.randn(7, 3, 3, 3, 5, generator=generator)
    bias = torch.randn(7, generator=generator)
    neighbour_map = build_neighbour_map(grid, 3)
    assert neighbour_map.unique
    out = submanifold_conv(feat, weight, bias, neighbour_map)
    dense = torch.zeros(1, 5, 8, 9, 10)
    dense[0, :, grid[:, 0], grid[:, 1], grid[:, 2]] = feat.t()
    expected = F.conv3d(dense, weight.permute(0, 4, 1, 2, 3), bias, padding=1)[0][:, grid[:, 0], grid[:, 1],
                                                                                  grid[:, 2]].t()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_kernel_tap_layout() -> None:
    """Weight (out, kx, ky, kz, in): tap (kx, ky, kz) reads the neighbour at offset (kx, ky, kz) - k//2."""
    assert kernel_offsets(3)[(2 * 3 + 0) * 3 + 1].tolist() == [1, -1, 0]
    grid = torch.tensor([[5, 5, 5], [6, 4, 5], [4, 6, 5]])
    feat = torch.tensor([[1.0], [10.0], [100.0]])
    weight = torch.zeros(1, 3, 3, 3, 1)
    weight[0, 2, 0, 1, 0] = 1.0
    out = submanifold_conv(feat, weight, None, build_neighbour_map(grid, 3))
    assert out[:, 0].tolist() == [10.0, 0.0, 1.0]


def test_voxelise_matches_unique_and_fetches_once() -> None:
    generator = torch.Generator().manual_seed(11)
    grid = torch.randint(0, 6, (400, 3), generator=generator) + torch.tensor([3, -2, 7])   # duplicates
    with HostSyncCounter() as counter:
        voxels, fetched = voxelise(grid, fetch=[torch.tensor(41), grid.sum()])
    assert counter.syncs == {'_to_copy': 1} and fetched == [41, int(grid.sum())]
    keys, inverse = torch.unique(grid, dim=0, return_inverse=True)     # lexicographic voxels
    assert voxels.num_voxels == keys.shape[0] < 400 and not voxels.unique
    assert voxels.lower == tuple(grid.min(0).values.tolist()) and voxels.upper == tuple(grid.max(0).values.tolist())
    assert torch.equal(voxels.point_voxel, inverse)
    first = [min(i for i in range(400) if inverse[i] == v) for v in range(keys.shape[0])]
    assert voxels.voxel_rep.tolist() == first
    with HostSyncCounter() as counter:      # bounds known: only the voxel count is fetched
        known, _ = voxelise(grid, (voxels.lower, voxels.upper))
    assert counter.total == 1 and torch.equal(known.point_voxel, voxels.point_voxel)
    unique_grid = keys[torch.randperm(keys.shape[0], generator=generator)]
    with HostSyncCounter() as counter:      # bounds and uniqueness known: nothing to fetch
        unique, _ = voxelise(unique_grid, (voxels.lower, voxels.upper), unique=True)
    assert counter.total == 0 and unique.unique and unique.num_voxels == keys.shape[0]
    assert voxelise(unique_grid)[0].unique      # found unique by counting
    assert host_ints() == []


@pytest.mark.parametrize('kernel_size', [3, 5])
@pytest.mark.parametrize('dense_lookup', [True, False])
def test_neighbour_maps_need_no_host_sync_nor_integer_matmul(kernel_size: int, dense_lookup: bool,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Both lookups (dense table, binary search) for duplicate and unique voxels, against a dictionary."""
    monkeypatch.setattr(sparse_conv, '_DENSE_LOOKUP_CELLS', 1 << 25 if dense_lookup else 0)
    generator = torch.Generator().manual_seed(kernel_size)
    grid = torch.randint(0, 7, (300, 3), generator=generator) * torch.tensor([1, 2, 1]) + 5
    for points in (grid, torch.unique(grid, dim=0)):
        voxels, _ = voxelise(points)
        with HostSyncCounter() as counter:
            neighbours = neighbour_map(voxels, kernel_size)
        assert counter.total == 0 and counter.integer_matmuls == 0, (counter.syncs, counter.integer_matmuls)
        first: dict[tuple[int, ...], int] = {}
        for i, g in enumerate(points.tolist()):
            first.setdefault(tuple(g), i)
        offsets = kernel_offsets(kernel_size).tolist()
        if voxels.unique:
            expected = [[first.get((g[0] + dx, g[1] + dy, g[2] + dz), len(points)) for dx, dy, dz in offsets]
                        for g in points.tolist()]
            assert neighbours.unique and neighbours.neighbours.tolist() == expected
        else:
            rep = neighbours.voxel_rep.tolist()
            voxel_of_rep = {r: v for v, r in enumerate(rep)}
            centre, num_voxels = kernel_size ** 3 // 2, len(rep)
            for v, r in enumerate(rep):
                g = points[r].tolist()
                found = [voxel_of_rep.get(first.get((g[0] + dx, g[1] + dy, g[2] + dz)), -1)
                         for dx, dy, dz in offsets]
                assert neighbours.upper[v].tolist() == [f if f >= 0 else 2 * num_voxels for f in found[centre + 1:]]
                assert neighbours.lower[v].tolist() == [f + num_voxels if f >= 0 else 2 * num_voxels
                                                        for f in found[:centre]]


# ------------------------------------------------------------------------------------------------ levels
def _surface_points(side: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A wavy sheet of side*side points spaced ~0.8 voxels (shared voxels occur), and 6 input features."""
    generator = torch.Generator().manual_seed(seed)
    u, v = torch.meshgrid(torch.linspace(-0.2, 0.2, side), torch.linspace(-0.2, 0.2, side), indexing='ij')
    w = 0.05 * torch.sin(12 * u) * torch.cos(9 * v)
    coord = torch.stack([u, v, w], -1).reshape(-1, 3) + 0.002 * torch.randn(side * side, 3, generator=generator)
    color = torch.rand(side * side, 3, generator=generator) * 2 - 1
    return coord, torch.cat([coord, color], 1)


def test_pooling_and_unpooling_match_loops() -> None:
    torch.manual_seed(0)
    model = PointTransformerV3LSM(PTv3Config.tiny()).eval()
    coord, _ = _surface_points(24)
    level = model.level0(coord)
    child = level.pool(2)
    codes0 = level.codes[0].tolist()
    keys = sorted({c >> 3 for c in codes0})
    assert child.codes[0].tolist() == keys
    assert child.cluster.tolist() == [keys.index(c >> 3) for c in codes0]
    for j, key in enumerate(keys):
        members = [i for i, c in enumerate(codes0) if c >> 3 == key]
        assert bool((level.grid[members] >> 1 == child.grid[j]).all())
        assert bool((level.codes[:, members] >> 3 == child.codes[:, j:j + 1]).all())
        torch.testing.assert_close(child.coord[j], level.coord[members].mean(0))
    assert torch.equal(torch.sort(child.codes, dim=1).values, child.codes.gather(1, child.orders))
    assert child.voxels.unique and child.voxels.num_voxels == child.num_points
    assert child.voxels.lower == tuple(child.grid.min(0).values.tolist())
    assert child.voxels.upper == tuple(child.grid.max(0).values.tolist())

    pooling = SerializedPooling(8, 16, 1e-3).eval()
    feat = torch.randn(level.num_points, 8)
    with torch.no_grad():
        pooled = pooling(feat, child.cluster, child.num_points)
        projected = pooling.proj(feat)
        expected = torch.stack([projected[child.cluster == j].max(0).values for j in range(len(keys))])
        torch.testing.assert_close(pooled, F.gelu(pooling.norm(expected)))
        unpooling = SerializedUnpooling(16, 8, 12, 1e-3).eval()
        out, skip = unpooling(pooled, feat, child.cluster)
        expected_skip = unpooling.proj_skip(feat)
        parent = unpooling.proj(pooled)
        expected_out = torch.stack([expected_skip[i] + parent[child.cluster[i]] for i in range(level.num_points)])
    torch.testing.assert_close(skip, expected_skip)
    torch.testing.assert_close(out, expected_out)


@pytest.mark.parametrize('n, patch', [(10, 16), (64, 16), (70, 16), (31, 8)])
def test_patch_padding_rule(n: int, patch: int) -> None:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    k = min(n, patch)
    r = n % k
    expected = list(range(n)) + (list(range(n - k, n - r)) if r else [])
    assert patch_gather_index(order, patch).tolist() == order[expected].tolist()


@pytest.mark.parametrize('n, patch', [(10, 16), (64, 16), (70, 16)])
def test_patch_attention_matches_loop(n: int, patch: int) -> None:
    torch.manual_seed(n)
    attention = SerializedAttention(8, 2, patch).eval()
    feat = torch.randn(n, 8)
    order = torch.randperm(n)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(n))
    with torch.no_grad():
        out = attention(feat, order, inverse)
        q, k, v = attention.qkv(feat).reshape(n, 3, 2, 4).unbind(1)
        k_patch = min(n, patch)
        full = n // k_patch * k_patch
        expected = torch.empty(n, 8)
        for position in range(n):
            start = position // k_patch * k_patch if position < full else n - k_patch
            members = order[start:start + k_patch]
            point = order[position]
            heads = []
            for h in range(2):
                weights = torch.softmax(k[members, h] @ q[point, h] / 2.0, dim=0)
                heads.append(weights @ v[members, h])
            expected[point] = attention.proj(torch.cat(heads))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ model
def _tokens(config: PTv3Config, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 12, config.dust_channels, generator=generator),
            torch.randn(1, 10, config.lseg_channels, generator=generator),
            torch.randn(1, 10, config.multi_scale_channels, generator=generator))


@pytest.fixture(scope='module')
def tiny_ptv3() -> PointTransformerV3LSM:
    torch.manual_seed(0)
    model = PointTransformerV3LSM(PTv3Config.tiny()).eval()
    with torch.no_grad():   # non-trivial BatchNorm statistics
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def test_tiny_model_forward(tiny_ptv3: PointTransformerV3LSM) -> None:
    config = tiny_ptv3.config
    coord, feat = _surface_points()
    tokens = _tokens(config)
    intermediates: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out = tiny_ptv3(coord, feat, *tokens, intermediates=intermediates)
        again = tiny_ptv3(coord, feat, *tokens)
    assert out.shape == (coord.shape[0], config.dec_channels[0]) and bool(out.isfinite().all())
    assert torch.equal(out, again)
    n_points = intermediates['n_points'].tolist()
    assert len(n_points) == len(config.enc_depths) and n_points[0] == coord.shape[0]
    assert n_points == sorted(n_points, reverse=True) and n_points[-1] > 1
    assert torch.equal(intermediates['enc0_grid_coord'], voxel_grid(coord, config.grid_size).long())
    for level, n in enumerate(n_points):
        assert intermediates[f'enc{level}_feat'].shape == (n, config.enc_channels[level])
        assert intermediates[f'enc{level}_grid_coord'].shape == (n, 3)
        if level < len(n_points) - 1:
            assert intermediates[f'dec{level}_feat'].shape == (n, config.dec_channels[level])
    assert intermediates['decoder_block_dust_feat'].shape == (n_points[-1], config.enc_channels[-1])
    assert intermediates['decoder_block_lseg_feat'].shape == (n_points[-1], config.enc_channels[-1])
    assert intermediates['decoder_block_multi_scale_feat'].shape == (n_points[-2], config.dec_channels[-1])
    assert torch.equal(intermediates['dec0_feat'], out)
    for level in range(1, len(n_points)):   # levels >= 1: unique voxels in ascending z-order
        grid = intermediates[f'enc{level}_grid_coord']
        codes = z_order_encode(grid)
        assert bool((codes[1:] > codes[:-1]).all())


def test_tiny_model_orders(tiny_ptv3: PointTransformerV3LSM) -> None:
    coord, feat = _surface_points()
    tokens = _tokens(tiny_ptv3.config)
    level = tiny_ptv3.level0(coord)
    assert torch.equal(level.orders, torch.argsort(level.codes, dim=1, stable=True))
    with torch.no_grad():
        out = tiny_ptv3(coord, feat, *tokens)
        injected = tiny_ptv3(coord, feat, *tokens, grid_coord=level.grid.int(), serialization_order=level.orders)
        assert torch.equal(out, injected)
        with pytest.raises(ValueError, match='does not sort'):
            tiny_ptv3(coord, feat, *tokens, serialization_order=level.orders.flip(1))
        with pytest.raises(ValueError, match='tokens'):
            tiny_ptv3(coord, feat, tokens[0][0], *tokens[1:])


def test_tiny_model_synchronises_once_per_level(tiny_ptv3: PointTransformerV3LSM) -> None:
    """PTv3 copies to the host once per level (level 0: bounding box and voxel count; coarser levels: their point
    counts), also with an injected order (its checks ride along), and never multiplies integer matrices."""
    coord, feat = _surface_points()
    tokens = _tokens(tiny_ptv3.config)
    levels = len(tiny_ptv3.config.enc_depths)
    order = tiny_ptv3.level0(coord).orders
    with torch.no_grad():
        for injected in (None, order):
            with HostSyncCounter() as counter:
                tiny_ptv3(coord, feat, *tokens, serialization_order=injected)
            assert counter.syncs == {'_to_copy': levels}, counter.syncs
            assert counter.integer_matmuls == 0


def test_injected_order_checks(tiny_ptv3: PointTransformerV3LSM) -> None:
    coord, feat = _surface_points(side=20)
    tokens = _tokens(tiny_ptv3.config)
    order = tiny_ptv3.level0(coord).orders
    not_permutation = order.clone()
    not_permutation[2, 5] = not_permutation[2, 6]
    with torch.no_grad():
        for bad, message in ((not_permutation, 'permutations'), (order + 1, 'permutations'),
                             (order.flip(1), 'does not sort'), (order[:, :-1], 'shape')):
            with pytest.raises(ValueError, match=message):
                tiny_ptv3.level0(coord, serialization_order=bad)
            with pytest.raises(ValueError, match=message):
                tiny_ptv3(coord, feat, *tokens, serialization_order=bad)
    deferred = tiny_ptv3.level0(coord, serialization_order=order.flip(1), defer_checks=True)
    with pytest.raises(ValueError, match='does not sort'):
        deferred.pool(2)
    with pytest.raises(ValueError, match='>= 0'):
        tiny_ptv3.level0(coord, grid_coord=voxel_grid(coord, 0.01) - 1)
    with pytest.raises(ValueError, match='bits'):
        tiny_ptv3.level0(coord, grid_coord=voxel_grid(coord, 0.01) << 12)


def test_tiny_model_is_permutation_equivariant_on_unique_voxels(tiny_ptv3: PointTransformerV3LSM) -> None:
    coord, feat = _surface_points(side=40)
    grid = voxel_grid(coord, tiny_ptv3.config.grid_size)
    voxel = torch.unique(grid, dim=0, return_inverse=True)[1]
    first = torch.full((int(voxel.max()) + 1,), len(voxel)).scatter_reduce(0, voxel, torch.arange(len(voxel)), 'amin')
    coord, feat, grid = coord[first], feat[first], grid[first]      # one point per voxel
    perm = torch.randperm(coord.shape[0], generator=torch.Generator().manual_seed(1))
    tokens = _tokens(tiny_ptv3.config)
    with torch.no_grad():
        out = tiny_ptv3(coord, feat, *tokens, grid_coord=grid)
        permuted = tiny_ptv3(coord[perm], feat[perm], *tokens, grid_coord=grid[perm])
    torch.testing.assert_close(permuted, out[perm], rtol=1e-4, atol=1e-5)


def test_strict_load_round_trip(tiny_ptv3: PointTransformerV3LSM) -> None:
    torch.manual_seed(5)
    other = PointTransformerV3LSM(PTv3Config.tiny()).eval()
    official = {CHECKPOINT_PREFIX + k: v for k, v in tiny_ptv3.state_dict().items()}
    official['gaussian_head.weight'] = torch.zeros(1)
    other.load_state_dict(strip_checkpoint_prefix(official), strict=True)
    coord, feat = _surface_points(side=20)
    tokens = _tokens(tiny_ptv3.config)
    with torch.no_grad():
        assert torch.equal(other(coord, feat, *tokens), tiny_ptv3(coord, feat, *tokens))


def test_without_cross_attention() -> None:
    config = PTv3Config(**{**PTv3Config.tiny().__dict__, 'cross_dust': False, 'cross_lseg': False,
                           'cross_multi_scale': False})
    model = PointTransformerV3LSM(config).eval()
    assert not any(k.startswith(('dust', 'lseg', 'multi', 'decoder_block')) for k in model.state_dict())
    coord, feat = _surface_points(side=16)
    with torch.no_grad():
        assert model(coord, feat).shape == (256, config.dec_channels[0])


@pytest.mark.skipif(REFERENCE is None, reason='reference folder shared/reference/lsm_vitl_256 absent')
def test_state_dict_matches_official_manifest() -> None:
    expected = [(name[len(CHECKPOINT_PREFIX):], shape, dtype) for name, shape, dtype, _ in read_manifest(REFERENCE)
                if name.startswith(CHECKPOINT_PREFIX)]
    with torch.device('meta'):
        model = PointTransformerV3LSM(PTv3Config())
    actual = [(k, tuple(v.shape), str(v.dtype).removeprefix('torch.')) for k, v in model.state_dict().items()]
    assert actual == expected


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        PTv3Config(enc_channels=(32, 64))
    with pytest.raises(ValueError):
        PTv3Config(strides=(2, 3, 2, 2))
    with pytest.raises(ValueError):
        PTv3Config(orders=('z', 'peano'))
    assert math.isclose(PTv3Config().grid_size, 0.01)
