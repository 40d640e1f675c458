"""CLIP's text encoder (the ViT-B/32 text tower, OpenAI layout) and tokenizer, as LSeg uses them for label phrases.

The tower is OpenAI CLIP's: token + position embedding, pre-norm transformer blocks with causal self-attention
and QuickGELU MLPs, a final LayerNorm, pooling at the end-of-text token (the largest token id of a row) and a
linear projection. It computes in the dtype of its weights (``text_projection``; float16 in LSeg's checkpoint)
except the LayerNorms, which compute in float32 and cast back, as OpenAI's ``LayerNorm`` subclass does.
The computation keeps OpenAI's sequence-first layout and ``nn.MultiheadAttention``, so the float16 results equal
the official encoder's bit for bit (checked on CPU against the LSM reference).

Parameter names are those of OpenAI's ``CLIP`` text tower (``token_embedding``, ``transformer.resblocks.{i}``,
``ln_final``, ...). Shape letters: P phrases, L = context length (77), D width, E embedding size.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from open_clip.tokenizer import SimpleTokenizer


@dataclass(frozen=True)
class ClipTextConfig:
    """Shape of the text tower (defaults: CLIP ViT-B/32, as in LSeg's checkpoint)."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    heads: int = 8
    layers: int = 12
    embed_dim: int = 512

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f'width {self.width} is not divisible by heads {self.heads}')

    @classmethod
    def tiny(cls) -> 'ClipTextConfig':
        """A small random-weight tower for unit tests (the full vocabulary, so real tokens can be encoded)."""
        return cls(width=32, heads=2, layers=2, embed_dim=32)


@functools.lru_cache(maxsize=1)
def bpe_tokenizer() -> 'SimpleTokenizer':
    """OpenAI CLIP's byte-pair tokenizer (open_clip's copy, cleaning 'lower' as ``clip.tokenize``), loaded once."""
    import lsm_ros.compat  # noqa: F401  (open_clip imports torchvision, a CUDA build on CPU torch)
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer()


class ClipLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back to the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.to(torch.float32)).to(x.dtype)


class ClipMlp(nn.Module):
    """c_fc -> QuickGELU (x * sigmoid(1.702 x)) -> c_proj."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        x = self.c_fc(x)
        return self.c_proj(x * torch.sigmoid(1.702 * x))


class ResidualAttentionBlock(nn.Module):
    """x += attn(ln_1(x)); x += mlp(ln_2(x)), sequence-first."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = ClipLayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = ClipLayerNorm(width)
        self.mlp = ClipMlp(width)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """x (L, P, D), attn_mask (L, L) additive -> (L, P, D)."""
        normed = self.ln_1(x)
        x = x + self.attn(normed, normed, normed, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class ClipTransformer(nn.Module):
    """A stack of residual attention blocks (OpenAI name ``transformer``)."""

    def __init__(self, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """x (L, P, D), attn_mask (L, L) additive -> (L, P, D)."""
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class ClipTextEncoder(nn.Module):
    """CLIP's text tower with its tokenizer: phrases -> (normalised) text features."""

    def __init__(self, config: ClipTextConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ClipTextConfig()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.transformer = ClipTransformer(config.width, config.heads, config.layers)
        self.ln_final = ClipLayerNorm(config.width)
        self.text_projection = nn.Parameter(torch.empty(config.width, config.embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=config.width ** -0.5)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the computation and of the features (that of ``text_projection``)."""
        return self.text_projection.dtype

    def tokenize(self, phrases: Sequence[str]) -> Tensor:
        """Phrases (a str counts as one) -> tokens (P, L) int64: start, BPE tokens, end, zeros.

        Text is cleaned as ``clip.tokenize`` does (ftfy, HTML unescaping, whitespace collapsed, lower case).
        Raises ValueError for a phrase of more than L tokens including start and end (never truncated) or one
        that spells a special token, TypeError for a non-str phrase.
        """
        if isinstance(phrases, str):
            phrases = [phrases]
        tokenizer = bpe_tokenizer()
        special = {tokenizer.sot_token_id, tokenizer.eot_token_id}
        length = self.config.context_length
        tokens = torch.zeros(len(phrases), length, dtype=torch.long)
        for row, phrase in enumerate(phrases):
            if not isinstance(phrase, str):
                raise TypeError(f'phrases must be str, got {type(phrase).__name__}')
            ids = tokenizer.encode(phrase)
            if special.intersection(ids):
                raise ValueError(f'phrase {phrase!r} contains a start/end-of-text marker')
            ids = [tokenizer.sot_token_id, *ids, tokenizer.eot_token_id]
            if len(ids) > length:
                raise ValueError(f'phrase {phrase[:60]!r} has {len(ids)} tokens including start and end; '
                                 f'CLIP takes at most {length}')
            tokens[row, :len(ids)] = torch.tensor(ids)
        return tokens

    def encode(self, tokens: Tensor) -> Tensor:
        """tokens (P, L) integer, each row ending with the end-of-text token (the largest id) ->
        features (P, E) in :attr:`compute_dtype`."""
        length = self.config.context_length
        if tokens.ndim != 2 or tokens.shape[1] != length or tokens.shape[0] == 0:
            raise ValueError(f'expected tokens of shape (P >= 1, {length}), got {tuple(tokens.shape)}')
        dtype, device = self.compute_dtype, self.text_projection.device
        tokens = tokens.to(device=device, dtype=torch.long)
        x = self.token_embedding(tokens).to(dtype) + self.positional_embedding.to(dtype)
        causal_mask = torch.full((length, length), float('-inf'), device=device).triu_(1).to(dtype)
        x = self.transformer(x.permute(1, 0, 2), causal_mask).permute(1, 0, 2)
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=device), tokens.argmax(dim=-1)]
        return pooled @ self.text_projection

    def encode_normalized(self, phrases: Sequence[str]) -> Tensor:
        """Phrases -> unit-length features (P, E) in :attr:`compute_dtype` (the norm computed in that dtype)."""
        features = self.encode(self.tokenize(phrases))
        return features / features.norm(dim=-1, keepdim=True)
