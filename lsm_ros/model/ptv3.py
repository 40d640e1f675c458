"""Point Transformer V3 as the Large Spatial Model configures and extends it, in pure PyTorch.

This re-implements ``PTV3`` of LSM (``large_spatial_model/ptv3.py``, a subclass of Pointcept's
``PointTransformerV3`` at the commit LSM pins) for inference, without spconv, torch_scatter or flash-attn:

- serialization by z-order / Hilbert codes (:mod:`.serialization`), no shuffling of the orders: block ``b`` of a
  stage uses order row ``b mod len(orders)``;
- sparse convolutions as submanifold convolutions with spconv's duplicate-voxel rule (:mod:`.sparse_conv`);
- patch attention in float32 over ``min(n, patch_size)`` consecutive points of an order (``enable_flash=False``);
- LSM's cross-attention blocks: DUSt3R tokens and LSeg tokens after the encoder, LSeg tokens again after the
  first decoder stage.

One point cloud per call. Level-0 points stay in input order; level ``L >= 1`` points are sorted by the z-order
code of their voxels, as in the official code. The state dict has the official names and shapes (sparse
convolution weights as the (out, k, k, k, in) parameter itself), so an LSM checkpoint loads with ``strict=True``
after removing the ``point_transformer.`` prefix.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Mlp
from .serialization import MAX_DEPTH, ORDERS, serialization_codes
from .sparse_conv import NeighbourMap, Voxels, host_ints, neighbour_map, run_ranks, submanifold_conv, voxelise

_log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = 'point_transformer.'


@dataclass(frozen=True)
class PTv3Config:
    """PTv3 hyper-parameters; the defaults are LSM's (``configs/default.yaml`` plus PTv3's defaults)."""

    in_channels: int = 6
    stem_kernel_size: int = 5
    orders: tuple[str, ...] = ORDERS
    strides: tuple[int, ...] = (2, 2, 2, 2)
    enc_depths: tuple[int, ...] = (1, 1, 1, 3, 1)
    enc_channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    enc_num_head: tuple[int, ...] = (2, 4, 8, 16, 32)
    enc_patch_size: tuple[int, ...] = (1024, 1024, 1024, 1024, 1024)
    dec_depths: tuple[int, ...] = (1, 1, 1, 1)
    dec_channels: tuple[int, ...] = (64, 64, 128, 256)
    dec_num_head: tuple[int, ...] = (4, 4, 8, 16)
    dec_patch_size: tuple[int, ...] = (1024, 1024, 1024, 1024)
    mlp_ratio: float = 4.0
    grid_size: float = 0.01
    cross_dust: bool = True
    cross_lseg: bool = True
    cross_multi_scale: bool = True
    dust_channels: int = 1024
    lseg_channels: int = 512
    multi_scale_channels: int = 512
    dust_num_heads: int = 8
    lseg_num_heads: int = 8
    multi_scale_num_heads: int = 4
    bn_eps: float = 1e-3
    ln_eps: float = 1e-5

    def __post_init__(self) -> None:
        stages = len(self.enc_depths)
        for name in ('enc_channels', 'enc_num_head', 'enc_patch_size'):
            if len(getattr(self, name)) != stages:
                raise ValueError(f'{name} needs {stages} entries (one per encoder stage)')
        for name in ('strides', 'dec_depths', 'dec_channels', 'dec_num_head', 'dec_patch_size'):
            if len(getattr(self, name)) != stages - 1:
                raise ValueError(f'{name} needs {stages - 1} entries (one per decoder stage)')
        for stride in self.strides:
            if stride < 2 or stride & (stride - 1):
                raise ValueError(f'pooling stride {stride} is not a power of two >= 2')
        unknown = set(self.orders) - set(ORDERS)
        if unknown or not self.orders:
            raise ValueError(f'orders must be a non-empty subset of {ORDERS}, got {self.orders}')

    @classmethod
    def tiny(cls) -> 'PTv3Config':
        """A four-level model with 8..32 channels and patches of 64 points, for fast tests."""
        return cls(
            enc_depths=(1, 1, 1, 4), enc_channels=(8, 16, 16, 32), enc_num_head=(1, 2, 2, 4),
            enc_patch_size=(64, 64, 64, 64), strides=(2, 2, 2), dec_depths=(1, 1, 1), dec_channels=(16, 16, 16),
            dec_num_head=(2, 2, 2), dec_patch_size=(64, 64, 64), dust_channels=24, lseg_channels=16,
            multi_scale_channels=16, dust_num_heads=4, lseg_num_heads=4, multi_scale_num_heads=2)


def voxel_grid(coord: Tensor, grid_size: float) -> Tensor:
    """PTv3's voxel coordinates (N,3) int32: ``trunc((coord - min coord) / grid_size)`` in coord's dtype."""
    return torch.div(coord - coord.min(0)[0], grid_size, rounding_mode='trunc').int()


def _inverse_permutation(order: Tensor) -> Tensor:
    """Inverse of each row of ``order`` (R, n): (R, n) int64."""
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


@dataclass
class PointLevel:
    """The points of one level of the hierarchy: voxel grid (n,3) int64, mean coordinates (n,3), serialization
    depth, codes / orders / inverse orders (R, n) int64, the occupied voxels (:class:`Voxels`, with the grid's
    bounding box on the host), and for levels >= 1 the cluster (n_parent,) of every parent point.

    ``pending_checks``: (device bool scalar, error message) pairs of input checks whose results have not been
    copied to the host yet; :meth:`pool` fetches them with its point count (no extra synchronisation), and
    :meth:`run_pending_checks` on its own."""

    grid: Tensor
    coord: Tensor
    depth: int
    codes: Tensor
    orders: Tensor
    inverses: Tensor
    voxels: Voxels
    cluster: Tensor | None = None
    pending_checks: list[tuple[Tensor, str]] = field(default_factory=list)
    _maps: dict[int, NeighbourMap] = field(default_factory=dict)

    @property
    def num_points(self) -> int:
        return self.grid.shape[0]

    def neighbour_map(self, kernel_size: int) -> NeighbourMap:
        """The sparse-convolution neighbour map for this kernel size, built once per level (no host sync)."""
        if kernel_size not in self._maps:
            self._maps[kernel_size] = neighbour_map(self.voxels, kernel_size)
        return self._maps[kernel_size]

    def run_pending_checks(self) -> None:
        """Copy the results of :attr:`pending_checks` to the host (one synchronisation) and raise ValueError for
        the first that failed."""
        checks, self.pending_checks = self.pending_checks, []
        _raise_failed(checks, host_ints(*(flag for flag, _ in checks)))

    def pool(self, stride: int) -> 'PointLevel':
        """The next level: clusters are the distinct row-0 codes ``>> 3*log2(stride)``, in ascending order.

        One host synchronisation: the number of clusters (with the pending checks). Row 0 of ``orders`` sorts
        row 0 of ``codes``, so the clusters are the runs of equal shifted codes along it; the coarser voxels are
        unique and their bounding box follows from this level's."""
        shift = (stride - 1).bit_length()
        if shift > self.depth:
            shift = 0
        codes = self.codes >> (3 * shift)
        order = self.orders[0]
        rank = run_ranks(codes[0].index_select(0, order))
        cluster = torch.empty_like(rank).scatter_(0, order, rank)
        checks, self.pending_checks = self.pending_checks, []
        fetched = host_ints(rank[-1] + 1, *(flag for flag, _ in checks))
        _raise_failed(checks, fetched[1:])
        num_clusters, n = fetched[0], self.num_points
        head = torch.full((num_clusters,), n, dtype=torch.long, device=cluster.device).scatter_reduce_(
            0, cluster, torch.arange(n, device=cluster.device), 'amin')
        counts = torch.zeros(num_clusters, dtype=self.coord.dtype, device=cluster.device).index_add_(
            0, cluster, torch.ones(n, dtype=self.coord.dtype, device=cluster.device))
        codes = codes[:, head]
        orders = torch.argsort(codes, dim=1, stable=True)
        coord = self.coord.new_zeros((num_clusters, 3)).index_add_(0, cluster, self.coord)
        coord = coord / counts[:, None]
        grid = self.grid[head] >> shift
        bounds = (tuple(v >> shift for v in self.voxels.lower), tuple(v >> shift for v in self.voxels.upper))
        voxels, _ = voxelise(grid, bounds, unique=True)
        return PointLevel(grid, coord, self.depth - shift, codes, orders, _inverse_permutation(orders), voxels,
                          cluster)


def _raise_failed(checks: list[tuple[Tensor, str]], results: list[int]) -> None:
    for (_, message), passed in zip(checks, results):
        if not passed:
            raise ValueError(message)


class SubMConv3d(nn.Module):
    """spconv-style submanifold convolution; ``weight`` (out, k, k, k, in), optional ``bias`` (out,)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, kernel_size, kernel_size, kernel_size, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.weight[0].numel())
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, feat: Tensor, neighbour_map: NeighbourMap) -> Tensor:
        """(N, in) -> (N, out)."""
        return submanifold_conv(feat, self.weight, self.bias, neighbour_map)


def patch_gather_index(order: Tensor, patch_size: int) -> Tensor:
    """Indices (P*K,) of the points of P patches of ``K = min(n, patch_size)`` consecutive points of ``order``
    (n,). If ``n mod K = r != 0`` the last patch is the last K points of the order: its r new points followed by
    the ``K - r`` points before them (whose outputs are taken from the previous patch)."""
    n = order.shape[0]
    k = min(n, patch_size)
    r = n % k if k else 0
    return order if r == 0 else torch.cat([order, order[n - k:n - r]])


class SerializedAttention(nn.Module):
    """Multi-head softmax attention within patches of serialized points (float32, no RPE)."""

    def __init__(self, channels: int, num_heads: int, patch_size: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f'{channels} channels do not split into {num_heads} heads')
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, feat: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
        """feat (n, C), order / inverse (n,) one serialization and its inverse -> (n, C)."""
        n, channels = feat.shape
        if n == 0:
            return self.proj(feat)
        k = min(n, self.patch_size)
        index = patch_gather_index(order, self.patch_size)
        qkv = self.qkv(feat.index_select(0, index)).reshape(-1, k, 3, self.num_heads, channels // self.num_heads)
        q, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)         # (P, H, K, C/H) each
        out = F.scaled_dot_product_attention(q, key, value)         # softmax(q k^T / sqrt(C/H)) v
        out = out.transpose(1, 2).reshape(-1, channels)[:n]
        return self.proj(out.index_select(0, inverse))


class Block(nn.Module):
    """PTv3 block, pre-norm: x += CPE(x); x += Attn(LN(x)); x += MLP(LN(x)).
    CPE is submanifold conv (k=3, bias) -> Linear -> LayerNorm."""

    def __init__(self, channels: int, num_heads: int, patch_size: int, mlp_ratio: float, ln_eps: float) -> None:
        super().__init__()
        self.cpe = nn.ModuleList([SubMConv3d(channels, channels, 3, bias=True), nn.Linear(channels, channels),
                                  nn.LayerNorm(channels, eps=ln_eps)])
        self.norm1 = nn.Sequential(nn.LayerNorm(channels, eps=ln_eps))
        self.attn = SerializedAttention(channels, num_heads, patch_size)
        self.norm2 = nn.Sequential(nn.LayerNorm(channels, eps=ln_eps))
        self.mlp = nn.Sequential(Mlp(channels, int(channels * mlp_ratio)))

    def forward(self, feat: Tensor, level: PointLevel, order_index: int, conv_input: Tensor | None = None) -> Tensor:
        """feat (n, C) at ``level``, attending along order row ``order_index`` -> (n, C).

        ``conv_input`` (n, C), when given, replaces ``feat`` as the input of the CPE convolution (not of its
        residual): see :class:`SerializedUnpooling`."""
        conv, linear, norm = self.cpe
        conv_input = feat if conv_input is None else conv_input
        feat = feat + norm(linear(conv(conv_input, level.neighbour_map(conv.kernel_size))))
        feat = feat + self.attn(self.norm1(feat), level.orders[order_index], level.inverses[order_index])
        return feat + self.mlp(self.norm2(feat))


class SerializedPooling(nn.Module):
    """Linear, max over each cluster of the next level, BatchNorm, GELU."""

    def __init__(self, in_channels: int, out_channels: int, bn_eps: float) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)
        self.norm = nn.Sequential(nn.BatchNorm1d(out_channels, eps=bn_eps, momentum=0.01))
        self.act = nn.Sequential(nn.GELU())

    def forward(self, feat: Tensor, cluster: Tensor, num_clusters: int) -> Tensor:
        """feat (n, C_in), cluster (n,) in [0, m) -> (m, C_out)."""
        projected = self.proj(feat)
        pooled = projected.new_zeros((num_clusters, projected.shape[1])).scatter_reduce_(
            0, cluster[:, None].expand_as(projected), projected, 'amax', include_self=False)
        return self.act(self.norm(pooled))


class SerializedUnpooling(nn.Module):
    """Parent features: (Linear, BN, GELU)(skip) + (Linear, BN, GELU)(child) gathered by cluster.

    The official code adds the child term to ``point.feat`` only, not to the spconv tensor of the point, so the
    CPE convolution of the next block sees the projected skip features alone. ``forward`` returns both.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, bn_eps: float) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(in_channels, out_channels),
                                  nn.BatchNorm1d(out_channels, eps=bn_eps, momentum=0.01), nn.GELU())
        self.proj_skip = nn.Sequential(nn.Linear(skip_channels, out_channels),
                                       nn.BatchNorm1d(out_channels, eps=bn_eps, momentum=0.01), nn.GELU())

    def forward(self, feat: Tensor, skip: Tensor, cluster: Tensor) -> tuple[Tensor, Tensor]:
        """feat (m, C_in) child level, skip (n, C_skip) parent level, cluster (n,) -> (features (n, C_out),
        projected skip features (n, C_out): the next CPE convolution's input)."""
        skip = self.proj_skip(skip)
        return skip + self.proj(feat).index_select(0, cluster), skip


class Stem(nn.Module):
    """Submanifold conv (no bias) -> BatchNorm -> GELU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bn_eps: float) -> None:
        super().__init__()
        self.conv = SubMConv3d(in_channels, out_channels, kernel_size, bias=False)
        self.norm = nn.BatchNorm1d(out_channels, eps=bn_eps, momentum=0.01)
        self.act = nn.GELU()

    def forward(self, feat: Tensor, level: PointLevel) -> Tensor:
        """(N, C_in) -> (N, C_out)."""
        return self.act(self.norm(self.conv(feat, level.neighbour_map(self.conv.kernel_size))))


class Embedding(nn.Module):
    """PTv3's embedding: the stem."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bn_eps: float) -> None:
        super().__init__()
        self.stem = Stem(in_channels, out_channels, kernel_size, bn_eps)

    def forward(self, feat: Tensor, level: PointLevel) -> Tensor:
        return self.stem(feat, level)


class DecoderBlock(nn.Module):
    """LSM's cross-attention block on all points of a level (batch 1):
    x += SelfAttn(LN1(x)); x += CrossAttn(LN2(x), LN_y(y)); x += MLP(LN3(x)); attention without biases."""

    def __init__(self, channels: int, num_heads: int, mlp_ratio: float = 4.0, ln_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels, eps=ln_eps)
        self.attn = nn.MultiheadAttention(channels, num_heads, bias=False, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(channels, num_heads, bias=False, batch_first=True)
        self.norm2 = nn.LayerNorm(channels, eps=ln_eps)
        self.norm3 = nn.LayerNorm(channels, eps=ln_eps)
        self.mlp = Mlp(channels, int(channels * mlp_ratio))
        self.norm_y = nn.LayerNorm(channels, eps=ln_eps)

    def forward(self, feat: Tensor, tokens: Tensor) -> Tensor:
        """feat (n, C) points, tokens (1, T, C) -> (n, C)."""
        x = feat[None]
        normed = self.norm1(x)
        x = x + self.attn(normed, normed, normed, need_weights=False)[0]
        memory = self.norm_y(tokens)
        x = x + self.cross_attn(self.norm2(x), memory, memory, need_weights=False)[0]
        x = x + self.mlp(self.norm3(x))
        return x[0]


class _Stage(nn.Module):
    """An encoder stage (``down`` pooling unless first, then ``block{i}``) or a decoder stage (``up``, blocks)."""

    def __init__(self, entry_name: str | None, entry: nn.Module | None, blocks: list[Block]) -> None:
        super().__init__()
        if entry is not None:
            self.add_module(entry_name, entry)
        for i, block in enumerate(blocks):
            self.add_module(f'block{i}', block)
        self.num_blocks = len(blocks)

    def blocks(self) -> list[Block]:
        return [getattr(self, f'block{i}') for i in range(self.num_blocks)]


class PointTransformerV3LSM(nn.Module):
    """LSM's PTv3: embedding, encoder stages ``enc.enc{s}``, cross-attention to DUSt3R and LSeg tokens, decoder
    stages ``dec.dec{s}`` (s descending) with the multi-scale cross-attention after the first one."""

    def __init__(self, config: PTv3Config = PTv3Config()) -> None:
        super().__init__()
        self.config = config
        cfg = config
        self.embedding = Embedding(cfg.in_channels, cfg.enc_channels[0], cfg.stem_kernel_size, cfg.bn_eps)
        self.enc = nn.Module()
        for s, depth in enumerate(cfg.enc_depths):
            down = SerializedPooling(cfg.enc_channels[s - 1], cfg.enc_channels[s], cfg.bn_eps) if s else None
            blocks = [Block(cfg.enc_channels[s], cfg.enc_num_head[s], cfg.enc_patch_size[s], cfg.mlp_ratio,
                            cfg.ln_eps) for _ in range(depth)]
            self.enc.add_module(f'enc{s}', _Stage('down', down, blocks))
        self.dec = nn.Module()
        up_channels = list(cfg.dec_channels) + [cfg.enc_channels[-1]]
        for s in reversed(range(len(cfg.dec_depths))):
            up = SerializedUnpooling(up_channels[s + 1], cfg.enc_channels[s], cfg.dec_channels[s], cfg.bn_eps)
            blocks = [Block(cfg.dec_channels[s], cfg.dec_num_head[s], cfg.dec_patch_size[s], cfg.mlp_ratio,
                            cfg.ln_eps) for _ in range(cfg.dec_depths[s])]
            self.dec.add_module(f'dec{s}', _Stage('up', up, blocks))
        bottom, first_decoded = cfg.enc_channels[-1], cfg.dec_channels[-1]
        if cfg.cross_dust:
            self.dust_feat_proj = nn.Linear(cfg.dust_channels, bottom)
            self.decoder_block_dust = DecoderBlock(bottom, cfg.dust_num_heads, ln_eps=cfg.ln_eps)
        if cfg.cross_lseg:
            self.lseg_feat_proj = nn.Linear(cfg.lseg_channels, bottom)
            self.decoder_block_lseg = DecoderBlock(bottom, cfg.lseg_num_heads, ln_eps=cfg.ln_eps)
        if cfg.cross_multi_scale:
            self.multi_scale_proj = nn.Linear(cfg.multi_scale_channels, first_decoded)
            self.decoder_block_multi_scale = DecoderBlock(first_decoded, cfg.multi_scale_num_heads,
                                                          ln_eps=cfg.ln_eps)

    def level0(self, coord: Tensor, grid_coord: Tensor | None = None,
               serialization_order: Tensor | None = None, *, defer_checks: bool = False) -> PointLevel:
        """Level 0: the voxel grid (computed from ``coord`` (N,3) unless given as ``grid_coord`` (N,3) int, the
        official PTv3 name), its occupied voxels, codes and orders.

        Without ``serialization_order`` the orders are a *stable* argsort of the codes: deterministic on every
        device. The official code uses torch's non-stable sort, whose order among points of one voxel (equal
        codes) is unspecified and changes the outputs where such a group straddles a patch boundary; pass the
        official order (R, N) to reproduce a recorded run. It is checked to be a permutation that sorts the codes;
        the second check waits for the next host synchronisation (:meth:`PointLevel.pool`) with
        ``defer_checks``, else runs here. One host synchronisation (the bounding box and voxel count, with the
        permutation check) unless a check runs here."""
        n = coord.shape[0]
        if coord.dim() != 2 or coord.shape[1] != 3 or n == 0:
            raise ValueError(f'coord must be (N >= 1, 3), got {tuple(coord.shape)}')
        if grid_coord is None:
            grid = voxel_grid(coord, self.config.grid_size).long()
        else:
            if grid_coord.is_floating_point() or grid_coord.is_complex() or grid_coord.dtype == torch.bool:
                raise ValueError(f'grid_coord must be an integer tensor, got {grid_coord.dtype}')
            grid = grid_coord.to(device=coord.device, dtype=torch.long)
        if grid.shape != coord.shape:
            raise ValueError(f'grid_coord shape {tuple(grid.shape)} != coord shape {tuple(coord.shape)}')
        num_orders = len(self.config.orders)
        fetch: list[Tensor] = []
        if serialization_order is not None:
            orders = serialization_order.to(device=coord.device, dtype=torch.long)
            if orders.shape != (num_orders, n):
                raise ValueError(f'serialization_order shape {tuple(orders.shape)} != {(num_orders, n)}')
            in_range = ((orders >= 0) & (orders < n)).all()
            orders = orders.clamp(0, n - 1)     # safe to gather with before the check's result is known
            hits = torch.zeros_like(orders).scatter_add_(1, orders, torch.ones_like(orders))
            fetch.append(in_range & (hits == 1).all())
        voxels, fetched = voxelise(grid, fetch=fetch)
        if min(voxels.lower) < 0:
            raise ValueError(f'voxel coordinates must be >= 0, got a minimum of {voxels.lower}')
        depth = max(voxels.upper).bit_length()
        if depth > MAX_DEPTH:
            raise ValueError(f'voxel coordinates up to {max(voxels.upper)} need {depth} bits per axis; PTv3 '
                             f'serializes at most {MAX_DEPTH}')
        codes = serialization_codes(grid, depth, self.config.orders)
        checks: list[tuple[Tensor, str]] = []
        if serialization_order is None:
            orders = torch.argsort(codes, dim=1, stable=True)
        else:
            if not fetched[0]:
                raise ValueError(f'serialization_order rows must be permutations of range({n})')
            checks.append(((codes.gather(1, orders).diff(dim=1) >= 0).all(),
                           'serialization_order does not sort the serialization codes of grid_coord'))
        level = PointLevel(grid, coord, depth, codes, orders, _inverse_permutation(orders), voxels,
                           pending_checks=checks)
        if not defer_checks:
            level.run_pending_checks()
        return level

    def forward(self, coord: Tensor, feat: Tensor, dust_tokens: Tensor | None = None,
                lseg_tokens: Tensor | None = None, multi_scale_tokens: Tensor | None = None, *,
                grid_coord: Tensor | None = None, serialization_order: Tensor | None = None,
                intermediates: dict[str, Tensor] | None = None) -> Tensor:
        """One point cloud -> level-0 features (N, dec_channels[0]) in input point order.

        - coord (N, 3) float32 normalised coordinates, feat (N, in_channels).
        - dust_tokens (1, T, dust_channels), lseg_tokens and multi_scale_tokens (1, S, lseg/multi_scale_channels):
          needed when the corresponding cross-attention is configured.
        - grid_coord (N, 3) int: voxel coordinates; computed from coord when None.
        - serialization_order (R, N) int: level-0 orders to use instead of a stable argsort of the codes.
        - intermediates: filled, when a dict, with ``n_points`` (levels,), ``order0`` (R, N), and per level L
          ``enc{L}_grid_coord`` (n_L, 3), ``enc{L}_feat``, ``dec{L}_feat``, and ``decoder_block_dust_feat``,
          ``decoder_block_lseg_feat`` (bottom level), ``decoder_block_multi_scale_feat``, all in level order.

        Host synchronisations: one per level (level 0: the grid's bounding box and voxel count; each coarser
        level: its point count, which fixes the shapes of its patches); none in the decoder.
        """
        cfg = self.config
        tokens = {'dust': (cfg.cross_dust, dust_tokens), 'lseg': (cfg.cross_lseg, lseg_tokens),
                  'multi_scale': (cfg.cross_multi_scale, multi_scale_tokens)}
        for name, (enabled, value) in tokens.items():
            if enabled and (value is None or value.dim() != 3 or value.shape[0] != 1):
                raise ValueError(f'{name}_tokens must be a (1, T, C) tensor, got '
                                 f'{None if value is None else tuple(value.shape)}')
        record = intermediates if intermediates is not None else {}
        level = self.level0(coord, grid_coord, serialization_order, defer_checks=True)
        levels = [level]
        record['order0'] = level.orders
        num_orders = len(cfg.orders)

        feat = self.embedding(feat, level)
        skips = []
        for s in range(len(cfg.enc_depths)):
            stage = getattr(self.enc, f'enc{s}')
            if s:
                level = level.pool(cfg.strides[s - 1])
                levels.append(level)
                feat = stage.down(feat, level.cluster, level.num_points)
            for i, block in enumerate(stage.blocks()):
                feat = block(feat, level, i % num_orders)
            skips.append(feat)
            record[f'enc{s}_grid_coord'] = level.grid
            record[f'enc{s}_feat'] = feat
        level.run_pending_checks()    # a model without pooling: the level-0 checks not yet fetched
        n_points = [lv.num_points for lv in levels]
        _log.debug('PTv3 points per level: %s', n_points)
        record['n_points'] = torch.tensor(n_points)

        if cfg.cross_dust:
            feat = self.decoder_block_dust(feat, self.dust_feat_proj(dust_tokens))
            record['decoder_block_dust_feat'] = feat
        if cfg.cross_lseg:
            feat = self.decoder_block_lseg(feat, self.lseg_feat_proj(lseg_tokens))
            record['decoder_block_lseg_feat'] = feat
        for j, s in enumerate(reversed(range(len(cfg.dec_depths)))):
            stage = getattr(self.dec, f'dec{s}')
            feat, conv_input = stage.up(feat, skips[s], levels[s + 1].cluster)
            for i, block in enumerate(stage.blocks()):
                feat = block(feat, levels[s], i % num_orders, conv_input if i == 0 else None)
            record[f'dec{s}_feat'] = feat
            if j == 0 and cfg.cross_multi_scale:
                feat = self.decoder_block_multi_scale(feat, self.multi_scale_proj(multi_scale_tokens))
                record['decoder_block_multi_scale_feat'] = feat
        return feat


def strip_checkpoint_prefix(state_dict: Mapping[str, Tensor], prefix: str = CHECKPOINT_PREFIX) -> dict[str, Tensor]:
    """The entries of an LSM state dict under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
