"""Space-filling-curve codes of voxel grids, as Point Transformer V3 serializes point clouds.

Pure PyTorch, vectorised over points (the loops run over bits), on any device.

- ``z``: Morton code, bit ``i`` of x, y, z at bit positions ``3i+2``, ``3i+1``, ``3i``.
- ``hilbert``: the 3-D Hilbert index of Skilling (2004, "Programming the Hilbert curve") with ``depth`` bits
  per axis, its transposed form read out with x as the most significant axis of every bit triple.
- ``z-trans`` / ``hilbert-trans``: the same codes of the columns (y, x, z).
- A batch index is OR-ed in above bit ``3 * depth``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

ORDERS = ('z', 'z-trans', 'hilbert', 'hilbert-trans')
MAX_DEPTH = 16


def _interleave(x: Tensor, y: Tensor, z: Tensor, depth: int) -> Tensor:
    """Bits ``i < depth`` of x, y, z (N,) int64 interleaved into (N,) int64 codes, x the most significant."""
    code = torch.zeros_like(x)
    for i in range(depth):
        code |= ((x >> i) & 1) << (3 * i + 2) | ((y >> i) & 1) << (3 * i + 1) | ((z >> i) & 1) << (3 * i)
    return code


def z_order_encode(grid: Tensor, depth: int = MAX_DEPTH) -> Tensor:
    """Morton codes of integer voxel coordinates ``grid`` (N,3) -> (N,) int64, using bits ``< depth``."""
    x, y, z = grid.long().unbind(-1)
    return _interleave(x, y, z, depth)


def hilbert_encode(grid: Tensor, depth: int) -> Tensor:
    """Hilbert indices of integer voxel coordinates ``grid`` (N,3) in ``[0, 2**depth)`` -> (N,) int64.

    Skilling's AxesToTranspose on the three axes (vectorised), then the transposed index interleaved with x as
    the most significant axis.
    """
    mask = (1 << depth) - 1
    axes = [c & mask for c in grid.long().unbind(-1)]
    # inverse undo: rotate / reflect the lower bits, from the most significant bit down
    for q in range(depth - 1, 0, -1):
        high, low = 1 << q, (1 << q) - 1
        for i in range(3):
            bit_set = (axes[i] & high) != 0
            axes[0] = torch.where(bit_set, axes[0] ^ low, axes[0])
            if i > 0:
                swap = torch.where(bit_set, 0, (axes[0] ^ axes[i]) & low)
                axes[0] = axes[0] ^ swap
                axes[i] = axes[i] ^ swap
    # Gray encode
    axes[1] = axes[1] ^ axes[0]
    axes[2] = axes[2] ^ axes[1]
    flip = torch.zeros_like(axes[2])
    for q in range(depth - 1, 0, -1):
        flip = torch.where((axes[2] & (1 << q)) != 0, flip ^ ((1 << q) - 1), flip)
    return _interleave(axes[0] ^ flip, axes[1] ^ flip, axes[2] ^ flip, depth)


def encode(grid: Tensor, depth: int, order: str, batch: Tensor | None = None) -> Tensor:
    """Codes (N,) int64 of ``grid`` (N,3) for one of :data:`ORDERS`; ``batch`` (N,) goes above bit ``3*depth``."""
    if order not in ORDERS:
        raise ValueError(f'unknown serialization order {order!r}; expected one of {ORDERS}')
    if order.endswith('-trans'):
        x, y, z = grid.unbind(-1)
        grid = torch.stack([y, x, z], dim=-1)     # (no index list: that would be a host-to-device copy)
    code = z_order_encode(grid, depth) if order.startswith('z') else hilbert_encode(grid, depth)
    if batch is not None:
        code = (batch.long() << (3 * depth)) | code
    return code


def serialization_codes(grid: Tensor, depth: int, orders: Sequence[str] = ORDERS,
                        batch: Tensor | None = None) -> Tensor:
    """Codes of ``grid`` (N,3) for every order: (len(orders), N) int64."""
    if not 0 <= depth <= MAX_DEPTH:
        raise ValueError(f'serialization depth {depth} outside [0, {MAX_DEPTH}]')
    return torch.stack([encode(grid, depth, order, batch) for order in orders])


def grid_depth(grid: Tensor) -> int:
    """``bit_length(max(grid))``: the number of bits per axis that PTv3 serializes (a host synchronisation on an
    accelerator; PTv3 takes it from the bounds its voxelisation fetches instead)."""
    return int(grid.max()).bit_length() if grid.numel() else 0
