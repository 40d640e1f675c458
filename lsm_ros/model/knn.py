"""Exact k-nearest-neighbour squared distances in pure torch, one code path on every device.

The quantity is the one of 3DGS's ``distCUDA2``: for every point, the ``k`` smallest squared distances to the
*other* points, each evaluated in float32 as ``(dx*dx + dy*dy) + dz*dz`` with ``d = neighbour - point``; points
at distance 0 count. Only values are returned, so ties between neighbours never matter.

Method (Morton order, window bound, box split into Morton ranges, dense tiles):

1. **Morton order.** The finite points are quantised to 21 bits per axis over their bounding box,
   ``q(v) = clamp(floor(fl32(fl32(v - low) * scale)), 0, 2**21 - 1)`` -- a monotone function of ``v`` -- and sorted
   by the interleaved (Morton) code of ``q``. The Morton code is monotone in each coordinate, so every point of an
   integer box ``[a, b]`` has a code in ``[code(a), code(b)]``.
2. **Upper bound.** The ``k``-th smallest squared distance to the ``2*WINDOW_HALF`` neighbours in Morton order
   (the other finite points among them; more neighbours where ``k`` needs them) is an upper bound ``u`` of the
   exact answer: they are real points. The pair values come from shifted slices of the sorted coordinates (each
   pair evaluated once: ``d`` and ``-d`` give the same bits).
3. **Box -> ranges.** Every ``q`` with ``fl32(|q-p|^2) <= u`` satisfies ``|q_a - p_a| <= h = sqrt(u)`` widened by a
   few ulps on each axis, so its quantised coordinates lie in the integer box ``[q(p - h), q(p + h)]`` (monotone
   rounding). With ``2**j`` the smallest power of two above the box's widest integer extent, the box meets at most
   two level-``j`` Morton cells per axis; it is cut along those cell boundaries into at most 8 pieces, each inside
   one cell. A piece's points have codes in ``[code(piece low), code(piece high)]``, a contiguous run of the sorted
   points (``searchsorted``) inside its cell's run, so the pieces' runs are disjoint and cover the box.
4. **Dense tiles.** The runs ("pieces") are grouped by length in quarter-octave classes; each class is processed
   as dense ``(pieces, width)`` tiles (at most ``TILE_ELEMENTS`` pairs per tile): gathered candidates, float32
   values, the point itself and the padding pointed at a sentinel at ``+inf`` (non-finite points are ``+inf``
   candidates too), ``topk`` per piece. The ``k``
   smallest of each point's 8 pieces (``8 x k`` values) are its answer. Exact because every point within the
   bound ``u`` (which is at least the true ``k``-th value) is a candidate.

Host synchronisations: exactly one (the per-class piece counts and widths, one device-to-host copy). No integer
matmul anywhere; no numpy/scipy. A point whose bound is not finite (fewer than ``k`` finite points in its window,
or squares overflowing float32) gets the whole cloud as one piece (brute force for that point).

Non-finite input: a point with a NaN or infinite coordinate is treated as infinitely far from every point
(itself and other non-finite points included). It is never a neighbour, and its own values are ``+inf``. A finite
point with fewer than ``k`` finite other points gets ``+inf`` for the missing neighbours.

Neighbours are ranked by their float32 values. The former scipy k-d tree ranked them in float64 and then took the
float32 values; both agree (bit for bit on the LSM reference) except where float32 rounding reorders near-ties,
e.g. a point 1e5 away from a cluster of 0.01 spread, where this module's value is the smaller by an ulp.
"""
from __future__ import annotations

import torch
from torch import Tensor

WINDOW_HALF = 8                 # Morton window: 2*8 neighbours in curve order give the upper bound
TILE_ELEMENTS = 1 << 21         # candidate pairs per dense tile (a few x 8 MB of temporaries)
_BITS = 21                      # quantisation bits per axis (3 x 21 = 63-bit Morton codes)
_SENTINEL_KEY = (1 << 63) - 1   # code of non-finite points: sorted last (a run reaching them adds +inf values only)
_CLASSES_PER_OCTAVE = 4         # piece-length classes: widths grow by 2**(1/4) (padding <= 19 %)


def _host_list(values: Tensor) -> list[int]:
    """(M,) integer tensor → Python ints in one device-to-host copy (a host synchronisation on an accelerator, made
    visible to dispatch-mode counters as ``aten._to_copy`` to the CPU)."""
    return values.to(device='cpu', copy=True).tolist()


def _spread_bits(v: Tensor) -> Tensor:
    """(...) int64 in [0, 2**21) → the same bits spread to every third position (Morton helper)."""
    v = v & 0x1FFFFF
    v = (v | (v << 32)) & 0x1F00000000FFFF
    v = (v | (v << 16)) & 0x1F0000FF0000FF
    v = (v | (v << 8)) & 0x100F00F00F00F00F
    v = (v | (v << 4)) & 0x10C30C30C30C30C3
    v = (v | (v << 2)) & 0x1249249249249249
    return v


def _morton(q: Tensor) -> Tensor:
    """(..., 3) int64 quantised coordinates → (...) int64 Morton codes (x in the lowest bit)."""
    return _spread_bits(q[..., 0]) | (_spread_bits(q[..., 1]) << 1) | (_spread_bits(q[..., 2]) << 2)


def _squared_xyz(cx: Tensor, cy: Tensor, cz: Tensor, qx: Tensor, qy: Tensor, qz: Tensor) -> Tensor:
    """Coordinates of candidates and (broadcastable) queries → float32 ``(dx*dx + dy*dy) + dz*dz`` with d = c - q,
    each operation rounded to float32 on its own (no fused multiply-add), in place on the temporaries."""
    total = cx - qx
    total.mul_(total)
    term = cy - qy
    term.mul_(term)
    total.add_(term)
    torch.sub(cz, qz, out=term)
    term.mul_(term)
    return total.add_(term)


def _quantise(values: Tensor, low: Tensor, scale: Tensor) -> Tensor:
    """Monotone 21-bit quantisation of float32 coordinates (..., 3) → int64 (..., 3) in [0, 2**21)."""
    scaled = torch.floor((values - low) * scale).clamp(0, (1 << _BITS) - 1)
    return torch.nan_to_num(scaled, nan=0.0).long()


def _window_bound(xyz: Tensor, k: int) -> Tensor:
    """(3, N) Morton-ordered coordinates (``+inf`` for non-finite points) → (N,) upper bound of the k-th smallest
    squared distance: the k-th smallest to the ``2*WINDOW_HALF`` neighbours in the order (``+inf`` if fewer)."""
    n = xyz.shape[1]
    half = min(max(WINDOW_HALF, (k + 2) // 2), n - 1)     # at least k+1 neighbours (where N allows)
    values = xyz.new_full((n, 2 * half), float('inf'))
    x, y, z = xyz
    for offset in range(1, half + 1):
        pair = _squared_xyz(x[offset:], y[offset:], z[offset:], x[:-offset], y[:-offset], z[:-offset])
        values[:-offset, half + offset - 1] = pair          # neighbour after the point
        values[offset:, half - offset] = pair               # neighbour before the point
    values = torch.nan_to_num(values, nan=float('inf'))
    return torch.topk(values, k, dim=1, largest=False, sorted=True).values[:, k - 1]


def _pieces(points: Tensor, half: Tensor, low: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Query boxes → the Morton code range of each of their (at most 8) pieces.

    ``points`` (N,3) float32, ``half`` (N,) box half-widths. Returns (N, 8) int64 first and last codes (a piece
    that does not exist has first > last).
    """
    lo = _quantise(points - half[:, None], low, scale)                    # (N,3)
    hi = _quantise(points + half[:, None], low, scale)
    extent = (hi - lo).amax(1)                                           # box spans < 2**level quantisation units
    level = torch.frexp(extent.float()).exponent.long()[:, None]       # 2**(e-1) <= extent < 2**e; 0 -> 0
    cell_lo = lo >> level
    split = ((hi >> level) > cell_lo)                                    # (N,3) the box crosses a cell boundary
    first_end = torch.where(split, ((cell_lo + 1) << level) - 1, hi)     # piece 0 on each axis: [lo, first_end]
    second_start = torch.where(split, (cell_lo + 1) << level, hi + 1)    # piece 1: [second_start, hi] (or empty)
    starts = torch.stack([lo, second_start], 1)                          # (N, 2, 3): piece, axis
    ends = torch.stack([first_end, hi], 1)
    exists = starts <= ends
    spread_start = _spread_bits(starts.clamp_max((1 << _BITS) - 1))
    spread_end = _spread_bits(ends)
    code_first = []
    code_last = []
    ok = []
    for piece in range(8):
        bx, by, bz = piece & 1, (piece >> 1) & 1, (piece >> 2) & 1
        code_first.append(spread_start[:, bx, 0] | (spread_start[:, by, 1] << 1) | (spread_start[:, bz, 2] << 2))
        code_last.append(spread_end[:, bx, 0] | (spread_end[:, by, 1] << 1) | (spread_end[:, bz, 2] << 2))
        ok.append(exists[:, bx, 0] & exists[:, by, 1] & exists[:, bz, 2])
    first = torch.stack(code_first, 1)
    last = torch.stack(code_last, 1)
    last = torch.where(torch.stack(ok, 1), last, first - 1)
    return first, last


def knn_squared_distances(points: Tensor, k: int) -> Tensor:
    """(N, 3) points → (N, k) float32: the k smallest squared distances to the *other* points, ascending.

    Exact (see the module docstring for the method, the definition and the non-finite rule). Raises
    ``ValueError`` when ``N <= k`` or the shape is not (N, 3).
    """
    if points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f'points must be (N, 3), got {tuple(points.shape)}')
    n = points.shape[0]
    if k < 1:
        raise ValueError(f'k must be positive, got {k}')
    if n <= k:
        raise ValueError(f'need more than {k} points for the neighbour distances, got {n}')
    points = points.detach().float()
    device = points.device
    inf = float('inf')
    finite = torch.isfinite(points).all(dim=1)
    points = torch.where(finite[:, None], points, torch.zeros_like(points))  # keep NaN out of every reduction

    # 1. Morton order over the finite bounding box (non-finite points last)
    low = torch.where(finite[:, None], points, inf).amin(0)
    high = torch.where(finite[:, None], points, -inf).amax(0)
    low = torch.where(torch.isfinite(low), low, torch.zeros_like(low))      # no finite point at all
    extent = torch.nan_to_num((high - low).amax(), nan=0.0, neginf=0.0).clamp_min(torch.finfo(torch.float32).tiny)
    scale = ((1 << _BITS) - 1) / extent
    codes = torch.where(finite, _morton(_quantise(points, low, scale)), torch.full((), _SENTINEL_KEY, device=device))
    codes, order = torch.sort(codes)
    ordered = points[order]
    ordered_finite = finite[order]
    # candidate coordinates (3, N+1): +inf for non-finite points and for the sentinel at position N
    xyz = torch.where(ordered_finite[:, None], ordered, inf).T.contiguous()
    xyz = torch.cat([xyz, xyz.new_full((3, 1), inf)], 1)

    # 2. upper bound and box half-widths: every q with fl32(|q-p|^2) <= bound has |q_a - p_a| <= half
    # (2**-120 covers the absolute rounding of underflowing squares, even with denormals flushed to zero)
    bound = _window_bound(xyz[:, :n], k)
    half = torch.sqrt(bound + 2.0 ** -120) * (1.0 + 2.0 ** -12)
    half = torch.where(ordered_finite, half, torch.zeros_like(half))

    # 3. pieces of the boxes → runs [start, stop) of the sorted points
    code_first, code_last = _pieces(ordered, half, low, scale)
    start = torch.searchsorted(codes, code_first)
    stop = torch.searchsorted(codes, code_last, right=True)
    length = torch.where(ordered_finite[:, None], (stop - start).clamp_min(0), 0).flatten()   # (8N,)
    start = start.flatten()

    # 4. classes of piece lengths (quarter octaves); one host copy: members and widest piece per class
    classes = _CLASSES_PER_OCTAVE * (n.bit_length() + 1) + 1
    length_class = torch.ceil(torch.log2(length.clamp_min(1).float()) * _CLASSES_PER_OCTAVE).long()
    length_class = torch.where(length > 0, length_class + 1, 0).clamp_max(classes - 1)
    members = torch.zeros(classes, dtype=torch.int64, device=device).index_add_(0, length_class,
                                                                                 torch.ones_like(length_class))
    widest = torch.zeros(classes, dtype=torch.int64, device=device).scatter_reduce_(0, length_class, length,
                                                                                   'amax')
    by_class = torch.argsort(length_class)
    table = _host_list(torch.cat([members, widest]))                        # host sync: class sizes and widths
    members, widest = table[:classes], table[classes:]

    # the non-empty pieces in class order, their runs and their points' coordinates, laid out contiguously
    first = members[0]                                                      # empty pieces come first
    rows = by_class[first:]
    run_start = start[rows]
    run_length = length[rows]
    owner = rows // 8
    own_xyz = xyz[:, owner]                                                 # (3, pieces)
    best = xyz.new_full((len(rows), k), inf)                                # k smallest per piece (any order)
    first = 0
    for size, width in zip(members[1:], widest[1:]):
        if size == 0:
            continue
        rows_per_tile = max(1, TILE_ELEMENTS // max(width, k))
        column = torch.arange(width, device=device)
        for tile_first in range(first, first + size, rows_per_tile):
            tile = slice(tile_first, min(tile_first + rows_per_tile, first + size))
            index = run_start[tile, None] + column
            index = torch.where((column < run_length[tile, None]) & (index != owner[tile, None]), index, n)
            index = index.flatten()
            values = _squared_xyz(*(torch.index_select(axis, 0, index).view(-1, width) for axis in xyz),
                                  *(axis[tile, None] for axis in own_xyz))
            if width > k:
                values = torch.topk(values, k, dim=1, largest=False, sorted=False).values
            best[tile, :values.shape[1]] = values
        first += size
    piece_best = xyz.new_full((8 * n, k), inf)
    piece_best[rows] = best
    result = torch.topk(piece_best.view(n, 8 * k), k, dim=1, largest=False, sorted=True).values
    result = torch.where(ordered_finite[:, None], result, inf)
    out = torch.empty_like(result)
    out[order] = result
    return out
