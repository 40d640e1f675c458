"""Submanifold sparse 3-D convolution (spconv ``SubMConv3d``) in pure PyTorch.

Weights are laid out (out, kx, ky, kz, in) as spconv stores them; tap ``t = (kx*k + ky)*k + kz`` has the offset
``(kx, ky, kz) - k//2`` in (x, y, z) and the convolution is a cross-correlation: the output at voxel ``p`` takes
``W_t`` times the feature at ``p + offset_t``.

Several points may share a voxel (PTv3's level 0 is not deduplicated). The result then follows the rule of
spconv's single-threaded CPU build (reference README section 5.5): with ``rep(v)`` the smallest point index in
voxel ``v`` and ``c`` the centre tap, point ``i`` in voxel ``p_i`` gets

    bias + W_c f_i
    + sum over taps t > c of W_t f_rep(p_i + offset_t)                   (if that voxel is occupied)
    + [i == rep(p_i)] * sum over taps t < c of W_t * sum of f_j over all points j in voxel p_i + offset_t.

With unique voxels this is ordinary submanifold cross-correlation.

Device-agnostic and nearly free of host synchronisation: the occupied voxels of a point set are found once
(:func:`voxelise`: voxel hashing by sorting, with a single device-to-host copy of the bounding box and the voxel
count, none at all when both are known), and the neighbour map of every kernel size is built from them
(:func:`neighbour_map`) without any. Linear voxel keys are elementwise multiply-adds of int64 tensors with Python
integers (CUDA has no integer matrix products).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# values of the im2col matrix gathered at once (float32: 64 MiB)
_GATHER_VALUES = 1 << 24
# voxel lookups use a dense table over the bounding box up to this many cells, else a binary search
_DENSE_LOOKUP_CELLS = 1 << 25

Triple = tuple[int, int, int]


def host_ints(*values: Tensor) -> list[int]:
    """Integer scalar tensors -> Python ints, in ONE device-to-host copy.

    On an accelerator this is a host synchronisation (it waits for the queued work); it is the only one of the
    sparse-convolution and PTv3 code, made visible to dispatch-mode counters as ``aten._to_copy`` to the CPU."""
    if not values:
        return []
    packed = torch.stack([value.reshape(()).to(torch.int64) for value in values])
    return packed.to(device='cpu', copy=True).tolist()


def run_ranks(sorted_values: Tensor) -> Tensor:
    """(N,) sorted values -> (N,) int64 rank of each value's run of equal values (0, 0, 1, 2, 2, ...); the number
    of runs is ``ranks[-1] + 1``. No host synchronisation."""
    starts = torch.ones_like(sorted_values, dtype=torch.bool)
    starts[1:] = sorted_values[1:] != sorted_values[:-1]
    return starts.cumsum(0) - 1


@dataclass(frozen=True)
class Voxels:
    """The occupied voxels of N points.

    - ``grid`` (N,3) int64 voxel coordinates; ``lower`` / ``upper``: their per-axis minimum / maximum.
    - ``num_voxels``: V, the number of distinct voxels.
    - ``point_voxel`` (N,) int64: each point's voxel, voxels numbered in lexicographic (x, y, z) order;
      ``voxel_rep`` (V,) int64: each voxel's smallest point index. Both None when every voxel holds one point
      (V == N): neighbour maps then index points directly.
    """

    grid: Tensor
    lower: Triple
    upper: Triple
    num_voxels: int
    point_voxel: Tensor | None = None
    voxel_rep: Tensor | None = None

    @property
    def num_points(self) -> int:
        return self.grid.shape[0]

    @property
    def unique(self) -> bool:
        return self.point_voxel is None


@dataclass(frozen=True)
class NeighbourMap:
    """Kernel neighbourhoods of a set of N points in V occupied voxels.

    - ``kernel_size``: k (odd).
    - ``unique``: every voxel holds one point. Then ``neighbours`` (N, k**3) indexes points directly, N = missing.
    - Otherwise ``point_voxel`` (N,) is each point's voxel, ``voxel_rep`` (V,) each voxel's smallest point index,
      and ``upper`` (V, k**3//2) / ``lower`` (V, k**3//2) index rows of ``[f_rep (V); f_sum (V); 0]`` for the taps
      after / before the centre (2V = missing).
    """

    kernel_size: int
    unique: bool
    neighbours: Tensor | None = None
    point_voxel: Tensor | None = None
    voxel_rep: Tensor | None = None
    upper: Tensor | None = None
    lower: Tensor | None = None


def kernel_offsets(kernel_size: int, device: torch.device | str | None = None) -> Tensor:
    """Offsets (k**3, 3) int64 of the taps ``t = (kx*k + ky)*k + kz``: ``(kx, ky, kz) - k//2``."""
    r = torch.arange(kernel_size, device=device) - kernel_size // 2
    return torch.cartesian_prod(r, r, r)


def voxelise(grid: Tensor, bounds: tuple[Triple, Triple] | None = None, unique: bool = False,
             fetch: Sequence[Tensor] = ()) -> tuple[Voxels, list[int]]:
    """The occupied voxels of the points at integer voxel coordinates ``grid`` (N,3).

    ``bounds``: the per-axis (minimum, maximum) of ``grid`` when the caller knows them; ``unique``: the caller
    knows that no two points share a voxel. Whatever is not known (the bounds, the voxel count) is computed on
    ``grid``'s device and copied to the host in one transfer (:func:`host_ints`), together with the integer
    scalars ``fetch``, whose values are returned as the second element. With bounds and ``unique`` given and
    nothing to fetch there is no host synchronisation at all.
    """
    grid = grid.long()
    n = grid.shape[0]
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f'voxel coordinates must be (N, 3), got {tuple(grid.shape)}')
    if n == 0:
        return Voxels(grid, (0, 0, 0), (-1, -1, -1), 0), host_ints(*fetch)
    x, y, z = grid.unbind(1)
    if bounds is None:
        lower_t, upper_t = grid.amin(0), grid.amax(0)
        lo, extent = lower_t.unbind(0), (upper_t - lower_t + 1).unbind(0)
    else:
        lo, extent = bounds[0], tuple(u - l + 1 for l, u in zip(*bounds))
    point_voxel = num_voxels = None
    if not unique:
        # lexicographic (x, y, z) keys over the bounding box; distinct keys in ascending order are the voxels
        keys = (x - lo[0]) * (extent[1] * extent[2]) + (y - lo[1]) * extent[2] + (z - lo[2])
        sorted_keys, permutation = torch.sort(keys)
        rank = run_ranks(sorted_keys)
        point_voxel = torch.empty_like(rank).scatter_(0, permutation, rank)
        num_voxels = rank[-1] + 1
    to_fetch = list(fetch)
    if bounds is None:
        to_fetch = [*lower_t.unbind(0), *upper_t.unbind(0), *to_fetch]
    if num_voxels is not None:
        to_fetch.insert(6 if bounds is None else 0, num_voxels)
    values = host_ints(*to_fetch)
    if bounds is None:
        bounds = (tuple(values[0:3]), tuple(values[3:6]))
        values = values[6:]
    if num_voxels is None:
        return Voxels(grid, bounds[0], bounds[1], n), values
    num_voxels, values = values[0], values[1:]
    if num_voxels == n:
        return Voxels(grid, bounds[0], bounds[1], n), values
    voxel_rep = torch.full((num_voxels,), n, dtype=torch.long, device=grid.device).scatter_reduce_(
        0, point_voxel, torch.arange(n, device=grid.device), 'amin')
    return Voxels(grid, bounds[0], bounds[1], num_voxels, point_voxel, voxel_rep), values


def neighbour_map(voxels: Voxels, kernel_size: int) -> NeighbourMap:
    """Neighbour map of the points of ``voxels`` for a k**3 kernel (no host synchronisation)."""
    if kernel_size % 2 != 1:
        raise ValueError(f'submanifold convolution needs an odd kernel size, got {kernel_size}')
    grid, device = voxels.grid, voxels.grid.device
    n, taps = voxels.num_points, kernel_size ** 3
    if n == 0:
        return NeighbourMap(kernel_size, True, neighbours=grid.new_zeros((0, taps)))
    radius = kernel_size // 2
    # keys over the bounding box grown by the kernel radius: a neighbour's key never wraps around an axis
    extent = [u - l + 1 + 2 * radius for l, u in zip(voxels.lower, voxels.upper)]
    origin = [l - radius for l in voxels.lower]
    stride_x, stride_y = extent[1] * extent[2], extent[2]

    def linear_keys(coords: Tensor) -> Tensor:
        x, y, z = coords.unbind(-1)
        return (x - origin[0]) * stride_x + (y - origin[1]) * stride_y + (z - origin[2])

    offsets = kernel_offsets(kernel_size, device)
    deltas = offsets[:, 0] * stride_x + offsets[:, 1] * stride_y + offsets[:, 2]          # (k**3,)
    # the entries to look up: points when voxels are unique, else voxels (at their representative's position)
    entries = grid if voxels.unique else grid.index_select(0, voxels.voxel_rep)
    count = entries.shape[0]
    keys = linear_keys(entries)                   # ascending for voxels (lexicographic), any order for points
    query = keys[:, None] + deltas                 # (count, k**3)
    cells = extent[0] * extent[1] * extent[2]
    if cells <= _DENSE_LOOKUP_CELLS:
        table = torch.full((cells,), count, dtype=torch.long, device=device)
        table[keys] = torch.arange(count, device=device)
        neighbours = table[query]
    else:
        sorted_keys, permutation = (keys, None) if not voxels.unique else torch.sort(keys)
        found = torch.searchsorted(sorted_keys, query).clamp_(max=count - 1)
        hit = sorted_keys[found] == query
        found = found if permutation is None else permutation[found]
        neighbours = torch.where(hit, found, count)
    if voxels.unique:
        return NeighbourMap(kernel_size, True, neighbours=neighbours)
    num_voxels, centre = voxels.num_voxels, taps // 2
    missing = 2 * num_voxels
    upper = neighbours[:, centre + 1:]
    lower = neighbours[:, :centre]
    return NeighbourMap(
        kernel_size, False, point_voxel=voxels.point_voxel, voxel_rep=voxels.voxel_rep,
        upper=torch.where(upper < num_voxels, upper, missing),
        lower=torch.where(lower < num_voxels, lower + num_voxels, missing))


def build_neighbour_map(grid: Tensor, kernel_size: int) -> NeighbourMap:
    """Neighbour map of the points at integer voxel coordinates ``grid`` (N,3) for a k**3 kernel (one host
    synchronisation: :func:`voxelise`)."""
    if kernel_size % 2 != 1:
        raise ValueError(f'submanifold convolution needs an odd kernel size, got {kernel_size}')
    return neighbour_map(voxelise(grid)[0], kernel_size)


def _gather_matmul(table: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """``sum_t table[index[:, t]] @ weight[:, t].T``: (R, C_out) from table (M, C_in), index (R, T), weight
    (C_out, T, C_in), as chunked im2col matrix products."""
    rows, taps = index.shape
    flat_weight = weight.reshape(weight.shape[0], -1).t()
    chunk = max(1, _GATHER_VALUES // max(1, taps * table.shape[1]))
    out = table.new_empty((rows, weight.shape[0]))
    for start in range(0, rows, chunk):
        block = index[start:start + chunk]
        out[start:start + chunk] = table.index_select(0, block.reshape(-1)).reshape(block.shape[0], -1) @ flat_weight
    return out


def submanifold_conv(feat: Tensor, weight: Tensor, bias: Tensor | None, neighbour_map: NeighbourMap) -> Tensor:
    """Submanifold convolution of point features ``feat`` (N, C_in) with ``weight`` (C_out, k, k, k, C_in) and
    ``bias`` (C_out,) or None -> (N, C_out), following the duplicate-voxel rule of the module docstring."""
    c_out, k = weight.shape[0], weight.shape[1]
    if k != neighbour_map.kernel_size:
        raise ValueError(f'weight kernel size {k} != neighbour map kernel size {neighbour_map.kernel_size}')
    taps = weight.reshape(c_out, k ** 3, weight.shape[-1])
    zero_row = feat.new_zeros((1, feat.shape[1]))
    if neighbour_map.unique:
        out = _gather_matmul(torch.cat([feat, zero_row]), neighbour_map.neighbours, taps)
    else:
        centre = k ** 3 // 2
        point_voxel, voxel_rep = neighbour_map.point_voxel, neighbour_map.voxel_rep
        voxel_sum = feat.new_zeros((voxel_rep.shape[0], feat.shape[1])).index_add_(0, point_voxel, feat)
        table = torch.cat([feat.index_select(0, voxel_rep), voxel_sum, zero_row])
        out = feat @ taps[:, centre].t()
        out += _gather_matmul(table, neighbour_map.upper, taps[:, centre + 1:]).index_select(0, point_voxel)
        out.index_add_(0, voxel_rep, _gather_matmul(table, neighbour_map.lower, taps[:, :centre]))
    if bias is not None:
        out += bias
    return out
