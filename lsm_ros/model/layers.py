"""Transformer building blocks of the DUSt3R/CroCo network (timm-style, pure PyTorch).

Shape letters used throughout: B batch, N tokens, C channels, h heads, D = C / h head channels.
Token positions are integer (y, x) coordinates on the patch grid, shape (B, N, 2).
Also the arithmetic precisions of the dense networks (:data:`PRECISIONS`, :func:`autocast`).
"""
from __future__ import annotations

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


def autocast(precision: str, device: torch.device | str) -> torch.autocast:
    """The context a dense network runs in: autocast to bfloat16/float16 on ``device``'s type, or (for 'fp32')
    autocast disabled, so that the exact path stays exact inside an enclosing autocast too."""
    check_precision(precision, device)
    device_type = torch.device(device).type
    if precision == 'fp32':
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=_AUTOCAST_DTYPES[precision])


class RoPE2D(nn.Module):
    """2-D rotary position embedding (CroCo's 'RoPE<base>').

    The head channels are split in two halves: the first half is rotated by the token's y position, the
    second half by its x position. Each half (D/2 channels) uses the 1-D rotate-half formulation with
    inverse frequencies ``1 / base ** (arange(0, D/2, 2) / (D/2))``, duplicated as ``cat(freqs, freqs)``.
    """

    def __init__(self, base: float = 100.0) -> None:
        super().__init__()
        self.base = float(base)

    def extra_repr(self) -> str:
        return f'base={self.base}'

    def _cos_sin(self, positions: Tensor, channels: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions (B, N) integer -> cos, sin (B, 1, N, channels) for a 1-D rotation of `channels`."""
        inv_freq = 1.0 / self.base ** (
            torch.arange(0, channels, 2, device=positions.device, dtype=torch.float32) / channels)
        freqs = positions.to(torch.float32)[..., None] * inv_freq  # (B, N, channels/2)
        freqs = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, N, channels)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

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
    """Non-overlapping patch embedding: Conv2d(3, C, p, stride p), tokens in row-major patch order."""

    def __init__(self, patch_size: int, embed_dim: int, in_channels: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W), H and W multiples of the patch size ->
        tokens (B, N, C) and positions (B, N, 2) int64 (y, x) with N = (H/p)(W/p), row-major."""
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f'image size {height}x{width} is not a multiple of the patch size {self.patch_size}')
        features = self.proj(images)  # (B, C, H/p, W/p)
        batch, _, grid_h, grid_w = features.shape
        ys, xs = torch.meshgrid(torch.arange(grid_h, device=images.device),
                                torch.arange(grid_w, device=images.device), indexing='ij')
        positions = torch.stack((ys, xs), dim=-1).reshape(1, grid_h * grid_w, 2).expand(batch, -1, -1)
        return features.flatten(2).transpose(1, 2), positions
