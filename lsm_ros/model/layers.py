"""Transformer building blocks of the DUSt3R/CroCo network (timm-style, pure PyTorch).

Shape letters used throughout: B batch, N tokens, C channels, h heads, D = C / h head channels.
Token positions are integer (y, x) coordinates on the patch grid, shape (B, N, 2).
Also the arithmetic precisions of the dense networks (:data:`PRECISIONS`, :func:`autocast`).
"""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Any, ContextManager, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LAYER_NORM_EPS = 1e-6
# Arithmetic of the dense networks: 'fp32' exact; 'bf16' / 'fp16' their matrix products and convolutions under
# torch.autocast (the transformers' residual streams and layer norms and the networks' outputs stay float32).
PRECISIONS = ('fp32', 'bf16', 'fp16')
_AUTOCAST_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def check_precision(precision: str, device: torch.device | str) -> None:
    """Raise ValueError for a precision not in :data:`PRECISIONS` or one ``device`` cannot run: 'fp16' needs
    CUDA, 'bf16' on CUDA a GPU with bfloat16 support."""
    if precision not in PRECISIONS:
        raise ValueError(f'unknown precision {precision!r}: choose among {list(PRECISIONS)}')
    device_type = torch.device(device).type
    if precision == 'fp16' and device_type != 'cuda':
        raise ValueError(f"precision 'fp16' needs a CUDA device (got {device_type}); use 'bf16' or 'fp32' on "
                         'the CPU')
    if precision == 'bf16' and device_type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise ValueError("precision 'bf16' is not supported by this GPU; use 'fp16' or 'fp32'")


# TF32 (tensor-float-32 matrix products and convolutions on NVIDIA GPUs) is a process-wide setting of PyTorch.
# The precision contexts below hold it for their own work and give the previous setting back when the last one
# exits. Exact holders ('fp32') win over fast ones ('bf16'/'fp16') while both are active (nested, or in two threads).
_TF32_LOCK = threading.Lock()
_TF32_HOLDERS = {'exact': 0, 'fast': 0}
_TF32_SAVED: list[tuple[tuple[Any, str, Any], ...]] = []    # the settings before the first holder entered


def _tf32_settings() -> tuple[tuple[Any, str], ...]:
    """The (object, attribute) pairs that choose TF32 for float32 cuBLAS matmuls and cuDNN convolutions: the
    ``fp32_precision`` API of torch >= 2.9 where present ('ieee' / 'tf32'), else the legacy ``allow_tf32`` flags
    (mixing both APIs makes torch refuse to read the legacy flags, so only one is touched)."""
    cuda_matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    conv = getattr(cudnn, 'conv', None)
    try:
        new_api = conv is not None and isinstance(cuda_matmul.fp32_precision, str) \
            and isinstance(conv.fp32_precision, str)
    except (AttributeError, RuntimeError):
        new_api = False
    if new_api:
        return (cuda_matmul, 'fp32_precision'), (conv, 'fp32_precision')
    return (cuda_matmul, 'allow_tf32'), (cudnn, 'allow_tf32')


def _tf32_value(attribute: str, allow: bool) -> Any:
    if attribute == 'fp32_precision':
        return 'tf32' if allow else 'ieee'
    return allow


def _apply_tf32_holders() -> None:
    """Set TF32 from the active holders (exact wins), or restore the saved settings when none is left.
    Called with _TF32_LOCK held."""
    if _TF32_HOLDERS['exact'] or _TF32_HOLDERS['fast']:
        allow = not _TF32_HOLDERS['exact']
        for owner, attribute in _tf32_settings():
            setattr(owner, attribute, _tf32_value(attribute, allow))
    elif _TF32_SAVED:
        for owner, attribute, value in _TF32_SAVED.pop():
            setattr(owner, attribute, value)


@contextlib.contextmanager
def tf32_mode(allow: bool) -> Iterator[None]:
    """Inside: TF32 for float32 matrix products (cuBLAS) and convolutions (cuDNN) on (``allow``) or off; on exit,
    also after an exception, the process's previous settings come back once no such context is active any more.

    The flags are process-wide (PyTorch has no per-thread TF32 setting): while any context with ``allow=False``
    is active, TF32 stays off for all, so a concurrent fast context may lose TF32 but an exact one never gets it.
    Changing the flags by hand while a context is active is undone on its exit. Called by :func:`autocast` and
    :func:`fp32_matmul` for CUDA devices only; on its own it changes the flags whatever the device."""
    kind = 'fast' if allow else 'exact'
    with _TF32_LOCK:
        if not (_TF32_HOLDERS['exact'] or _TF32_HOLDERS['fast']):
            _TF32_SAVED.append(tuple((owner, attribute, getattr(owner, attribute))
                                     for owner, attribute in _tf32_settings()))
        _TF32_HOLDERS[kind] += 1
        try:
            _apply_tf32_holders()
        except BaseException:
            _TF32_HOLDERS[kind] -= 1
            _apply_tf32_holders()
            raise
    try:
        yield
    finally:
        with _TF32_LOCK:
            _TF32_HOLDERS[kind] -= 1
            _apply_tf32_holders()


def autocast(precision: str, device: torch.device | str) -> ContextManager[None]:
    """The context a dense network runs in, for ``device``'s type.

    - 'fp32': autocast disabled (the exact path stays exact inside an enclosing autocast too) and, on CUDA, TF32
      off for matrix products and cuDNN convolutions (:func:`tf32_mode`).
    - 'bf16' / 'fp16': autocast to bfloat16 / float16 and, on CUDA, TF32 allowed for what stays float32.

    On the CPU only the autocast part applies. The precision is checked at once (:func:`check_precision`)."""
    check_precision(precision, device)
    device_type = torch.device(device).type
    if precision == 'fp32':
        cast = torch.autocast(device_type, enabled=False)
    else:
        cast = torch.autocast(device_type, dtype=_AUTOCAST_DTYPES[precision])
    return _with_tf32(cast, precision, device_type)


def fp32_matmul(precision: str, device: torch.device | str) -> ContextManager[None]:
    """The context of the float32 parts of a network run at ``precision``: autocast disabled, and on CUDA TF32
    off for 'fp32' (exact) but allowed for 'bf16' / 'fp16' (the fast path's float32 matrix products and
    convolutions). On the CPU only the autocast part applies. Only the name of the precision is checked here (the
    network that runs at it checks that the device supports it)."""
    if precision not in PRECISIONS:
        raise ValueError(f'unknown precision {precision!r}: choose among {list(PRECISIONS)}')
    device_type = torch.device(device).type
    return _with_tf32(torch.autocast(device_type, enabled=False), precision, device_type)


@contextlib.contextmanager
def _with_tf32(cast: torch.autocast, precision: str, device_type: str) -> Iterator[None]:
    with cast, (tf32_mode(precision != 'fp32') if device_type == 'cuda' else contextlib.nullcontext()):
        yield


def _capturing_or_compiling(tensor: Tensor) -> bool:
    """Whether ``tensor`` is being traced by torch.compile or its stream captured into a CUDA graph: tables made
    then must not be cached (a captured allocation belongs to the graph's memory pool)."""
    if torch.compiler.is_compiling():
        return True
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


class _TableCache:
    """A small thread-safe LRU cache of tensors computed from an input tensor, keyed by that tensor's identity
    (its storage, offset, shape, strides, dtype) plus extra hashable parts.

    Each entry keeps a reference to its input tensor, so its storage cannot be freed and its address reused by
    another tensor while the entry lives, and records the input's version counter: an in-place change of the input
    makes the entry stale. Inputs made anew for every call simply miss (and the oldest entry goes)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, tuple[Tensor, int, Any]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(tensor: Tensor, extra: tuple) -> tuple:
        return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tensor.stride(), tensor.dtype) + extra

    def get(self, tensor: Tensor, extra: tuple) -> Any | None:
        if _capturing_or_compiling(tensor):
            return None
        key = self._key(tensor, extra)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[1] != tensor._version:
                return None
            self._entries.move_to_end(key)
            return entry[2]

    def put(self, tensor: Tensor, extra: tuple, value: Any) -> None:
        if _capturing_or_compiling(tensor):
            return
        key = self._key(tensor, extra)
        with self._lock:
            self._entries[key] = (tensor, tensor._version, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __getstate__(self) -> dict:       # copies and pickles of a module start with an empty cache
        return {'max_entries': self.max_entries}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state['max_entries'])

    def __len__(self) -> int:
        return len(self._entries)


class RoPE2D(nn.Module):
    """2-D rotary position embedding (CroCo's 'RoPE<base>').

    The head channels are split in two halves: the first half is rotated by the token's y position, the
    second half by its x position. Each half (D/2 channels) uses the 1-D rotate-half formulation with
    inverse frequencies ``1 / base ** (arange(0, D/2, 2) / (D/2))``, duplicated as ``cat(freqs, freqs)``.

    The cos / sin tables are cached per positions tensor (the patch grid of :class:`PatchEmbed`, the same tensor
    for every image of one size), channel count and dtype, so a fixed-shape network computes them once and a
    captured graph (CUDA graphs, torch.compile) holds no table computation; ``.to()`` / ``.cuda()`` etc. empty
    the cache. The tables are computed exactly as without the cache.
    """

    CACHE_ENTRIES = 32   # (positions view) x (channels) x (dtype) combinations kept: a few per image size

    def __init__(self, base: float = 100.0) -> None:
        super().__init__()
        self.base = float(base)
        self._tables = _TableCache(self.CACHE_ENTRIES)

    def extra_repr(self) -> str:
        return f'base={self.base}'

    def _apply(self, *args: Any, **kwargs: Any) -> 'RoPE2D':
        self._tables.clear()
        return super()._apply(*args, **kwargs)

    def _cos_sin(self, positions: Tensor, channels: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions (B, N) integer -> cos, sin (B, 1, N, channels) for a 1-D rotation of `channels` (cached)."""
        cached = self._tables.get(positions, (channels, dtype))
        if cached is not None:
            return cached
        inv_freq = 1.0 / self.base ** (
            torch.arange(0, channels, 2, device=positions.device, dtype=torch.float32) / channels)
        freqs = positions.to(torch.float32)[..., None] * inv_freq  # (B, N, channels/2)
        freqs = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, N, channels)
        tables = freqs.cos().to(dtype), freqs.sin().to(dtype)
        self._tables.put(positions, (channels, dtype), tables)
        return tables

    @staticmethod
    def _rotate_half(x: Tensor) -> Tensor:
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)

    def _rotate_1d(self, x: Tensor, positions: Tensor) -> Tensor:
        cos, sin = self._cos_sin(positions, x.shape[-1], x.dtype)
        return x * cos + self._rotate_half(x) * sin

    def forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """tokens (B, h, N, D) with D a multiple of 4, positions (B, N, 2) as (y, x) -> (B, h, N, D)."""
        if tokens.shape[-1] % 4 != 0:
            raise ValueError(f'RoPE2D needs a head dimension divisible by 4, got {tokens.shape[-1]}')
        y_part, x_part = tokens.chunk(2, dim=-1)
        return torch.cat((self._rotate_1d(y_part, positions[..., 0]),
                          self._rotate_1d(x_part, positions[..., 1])), dim=-1)


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, C) -> (B, h, N, C/h)."""
    batch, tokens, channels = x.shape
    return x.reshape(batch, tokens, num_heads, channels // num_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, h, N, D) -> (B, N, h*D)."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and optional 2-D RoPE on q and k."""

    def __init__(self, dim: int, num_heads: int, rope: RoPE2D | None = None) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.rope = rope

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """x (B, N, C), positions (B, N, 2) (needed with RoPE only) -> (B, N, C)."""
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, D)
        if self.rope is not None:
            q = self.rope(q, positions)
            k = self.rope(k, positions)
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class CrossAttention(nn.Module):
    """Multi-head attention of query tokens onto context tokens (keys = values = context), with
    separate q/k/v projections and optional 2-D RoPE (q by the query positions, k by the context positions)."""

    def __init__(self, dim: int, num_heads: int, rope: RoPE2D | None = None) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.projq = nn.Linear(dim, dim, bias=True)
        self.projk = nn.Linear(dim, dim, bias=True)
        self.projv = nn.Linear(dim, dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.rope = rope

    def forward(self, query: Tensor, context: Tensor, query_positions: Tensor, context_positions: Tensor) -> Tensor:
        """query (B, Nq, C), context (B, Nk, C), positions (B, Nq, 2) / (B, Nk, 2) -> (B, Nq, C)."""
        q = _split_heads(self.projq(query), self.num_heads)
        k = _split_heads(self.projk(context), self.num_heads)
        v = _split_heads(self.projv(context), self.num_heads)
        if self.rope is not None:
            q = self.rope(q, query_positions)
            k = self.rope(k, context_positions)
        return self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))


class Mlp(nn.Module):
    """Linear -> exact (erf) GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, N, C) -> (B, N, C)."""
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    """Pre-norm ViT block: x += attn(norm1(x)); x += mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, rope: RoPE2D | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, rope)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """x (B, N, C), positions (B, N, 2) (needed with RoPE only) -> (B, N, C)."""
        x = x + self.attn(self.norm1(x), positions)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """CroCo decoder block: self-attention, cross-attention onto the other view's tokens, MLP (all pre-norm).

    The other view's tokens are normalised by ``norm_y`` (identity when ``norm_context`` is False).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, rope: RoPE2D | None = None,
                 norm_context: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, rope)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.cross_attn = CrossAttention(dim, num_heads, rope)
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_y = nn.LayerNorm(dim, eps=LAYER_NORM_EPS) if norm_context else nn.Identity()

    def forward(self, x: Tensor, other: Tensor, positions: Tensor, other_positions: Tensor) -> Tensor:
        """x (B, N, C) this view's tokens, other (B, M, C) the other view's tokens of the previous layer,
        positions (B, N, 2), other_positions (B, M, 2) -> (B, N, C)."""
        x = x + self.attn(self.norm1(x), positions)
        context = self.norm_y(other)
        x = x + self.cross_attn(self.norm2(x), context, positions, other_positions)
        return x + self.mlp(self.norm3(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: Conv2d(3, C, p, stride p), tokens in row-major patch order.

    The (1, N, 2) position grid of each patch-grid size and device is made once and kept (the same tensor for
    every image of that size: :class:`RoPE2D` caches its tables per positions tensor)."""

    def __init__(self, patch_size: int, embed_dim: int, in_channels: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self._grids: dict[tuple[int, int, torch.device], Tensor] = {}

    MAX_GRIDS = 16    # image sizes whose position grids are kept

    def _apply(self, *args: Any, **kwargs: Any) -> 'PatchEmbed':
        self._grids.clear()
        return super()._apply(*args, **kwargs)

    def patch_positions(self, grid_h: int, grid_w: int, device: torch.device) -> Tensor:
        """Positions (1, grid_h*grid_w, 2) int64 (y, x) of a patch grid, row-major; the same tensor on every call
        (outside graph capture and compilation)."""
        key = (grid_h, grid_w, torch.device(device))
        cached = self._grids.get(key)
        if cached is not None:
            return cached
        ys, xs = torch.meshgrid(torch.arange(grid_h, device=device), torch.arange(grid_w, device=device),
                                indexing='ij')
        positions = torch.stack((ys, xs), dim=-1).reshape(1, grid_h * grid_w, 2)
        if not _capturing_or_compiling(positions) and len(self._grids) < self.MAX_GRIDS:
            self._grids[key] = positions
        return positions

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W), H and W multiples of the patch size ->
        tokens (B, N, C) and positions (B, N, 2) int64 (y, x) with N = (H/p)(W/p), row-major."""
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f'image size {height}x{width} is not a multiple of the patch size {self.patch_size}')
        features = self.proj(images)  # (B, C, H/p, W/p)
        batch, _, grid_h, grid_w = features.shape
        positions = self.patch_positions(grid_h, grid_w, images.device).expand(batch, -1, -1)
        return features.flatten(2).transpose(1, 2), positions
