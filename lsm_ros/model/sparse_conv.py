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

With unique voxels this is ordinary submanifold cross-correlation. The neighbour map of a point set is built
once (voxel hashing by sorting) and reused by every convolution with the same kernel size on those points.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# values of the im2col matrix gathered at once (float32: 64 MiB)
_GATHER_VALUES = 1 << 24
# voxel lookups use a dense table over the bounding box up to this many cells, else a binary search
_DENSE_LOOKUP_CELLS = 1 << 25


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


def build_neighbour_map(grid: Tensor, kernel_size: int) -> NeighbourMap:
    """Neighbour map of the points at integer voxel coordinates ``grid`` (N,3) for a k**3 kernel."""
    if kernel_size % 2 != 1:
        raise ValueError(f'submanifold convolution needs an odd kernel size, got {kernel_size}')
    grid = grid.long()
    n = grid.shape[0]
    if n == 0:
        return NeighbourMap(kernel_size, True, neighbours=grid.new_zeros((0, kernel_size ** 3)))
    radius = kernel_size // 2
    shifted = grid - grid.min(0).values + radius
    extent = shifted.max(0).values + radius + 1
    strides = torch.stack([extent[1] * extent[2], extent[2], torch.ones_like(extent[2])])
    keys = shifted @ strides
    voxel_keys, point_voxel = torch.unique(keys, sorted=True, return_inverse=True)
    num_voxels = voxel_keys.shape[0]
    voxel_rep = torch.full((num_voxels,), n, dtype=torch.long, device=grid.device).scatter_reduce_(
        0, point_voxel, torch.arange(n, device=grid.device), 'amin')
    query = voxel_keys[:, None] + kernel_offsets(kernel_size, grid.device) @ strides      # (V, k**3)
    cells = int(extent.prod())
    if cells <= _DENSE_LOOKUP_CELLS:
        table = torch.full((cells,), num_voxels, dtype=torch.long, device=grid.device)
        table[voxel_keys] = torch.arange(num_voxels, device=grid.device)
        neighbours = table[query]
    else:
        found = torch.searchsorted(voxel_keys, query).clamp_(max=num_voxels - 1)
        neighbours = torch.where(voxel_keys[found] == query, found, num_voxels)
    centre = kernel_size ** 3 // 2
    if num_voxels == n:
        # one point per voxel: index points directly, N marks a missing neighbour
        point_of_voxel = torch.cat([voxel_rep, voxel_rep.new_tensor([n])])
        return NeighbourMap(kernel_size, True, neighbours=point_of_voxel[neighbours[point_voxel]])
    missing = 2 * num_voxels
    upper = neighbours[:, centre + 1:]
    lower = neighbours[:, :centre]
    return NeighbourMap(
        kernel_size, False, point_voxel=point_voxel, voxel_rep=voxel_rep,
        upper=torch.where(upper < num_voxels, upper, missing),
        lower=torch.where(lower < num_voxels, lower + num_voxels, missing))


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
