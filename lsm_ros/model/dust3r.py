"""DUSt3R geometry network (CroCo ``AsymmetricCroCo3DStereo`` with DPT heads), as the Large Spatial Model uses it.

Two images of one size are encoded by a shared ViT, decoded by two cross-attending transformer decoders (one per
view) and turned into dense 3-D point maps by one DPT head per view. Both point maps are in view 1's camera frame.
Positions use 2-D RoPE; the patch embedding never transposes portrait images (LSM's ``PatchEmbedDust3R``).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .dpt import CONF_MODES, DEPTH_MODES, ConfMode, DepthMode, DPTHead, postprocess
from .layers import LAYER_NORM_EPS, DecoderBlock, EncoderBlock, PatchEmbed, RoPE2D, autocast

CLASS_NAME = 'AsymmetricCroCo3DStereo'
_ROPE_PATTERN = re.compile(r'RoPE(\d+(?:\.\d*)?)')
# keyword arguments of the official constructor (AsymmetricCroCo3DStereo and CroCoNet)
_CONSTRUCTOR_KEYS = frozenset({
    'output_mode', 'head_type', 'depth_mode', 'conf_mode', 'freeze', 'landscape_only', 'patch_embed_cls',
    'img_size', 'patch_size', 'mask_ratio', 'enc_embed_dim', 'enc_depth', 'enc_num_heads', 'dec_embed_dim',
    'dec_depth', 'dec_num_heads', 'mlp_ratio', 'norm_im2_in_dec', 'pos_embed'})


def _mode_tuple(name: str, value: Any, allowed: tuple[str, ...]) -> tuple[str, float, float]:
    if not (isinstance(value, (tuple, list)) and len(value) == 3 and isinstance(value[0], str)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value[1:])):
        raise ValueError(f'{name} must be a tuple (mode, vmin, vmax), got {value!r}')
    if value[0] not in allowed:
        raise ValueError(f'{name} {value[0]!r} is not supported; expected one of {allowed}')
    return value[0], float(value[1]), float(value[2])


@dataclass(frozen=True)
class Dust3rConfig:
    """Architecture of a DUSt3R network. Defaults: DUSt3R_ViTLarge_BaseDecoder_512_dpt."""

    enc_embed_dim: int = 1024
    enc_depth: int = 24
    enc_num_heads: int = 16
    dec_embed_dim: int = 768
    dec_depth: int = 12
    dec_num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    rope_base: float = 100.0
    norm_context_in_decoder: bool = True
    depth_mode: DepthMode = ('exp', -math.inf, math.inf)
    conf_mode: ConfMode = ('exp', 1.0, math.inf)
    img_size: tuple[int, int] = (512, 512)  # training resolution (recorded; any multiple of patch_size runs)
    dpt_layer_dims: tuple[int, int, int, int] = (96, 192, 384, 768)
    dpt_feature_dim: int = 256
    dpt_last_dim: int = 128

    def __post_init__(self) -> None:
        for name in ('enc_embed_dim', 'enc_depth', 'enc_num_heads', 'dec_embed_dim', 'dec_depth', 'dec_num_heads',
                     'patch_size', 'dpt_feature_dim', 'dpt_last_dim'):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f'{name} must be a positive integer, got {value!r}')
        for dim, heads, part in ((self.enc_embed_dim, self.enc_num_heads, 'encoder'),
                                 (self.dec_embed_dim, self.dec_num_heads, 'decoder')):
            if dim % heads or (dim // heads) % 4:
                raise ValueError(f'{part}: embed dim {dim} / {heads} heads must give a head dim divisible by 4 '
                                 '(2-D RoPE)')
        if self.dpt_feature_dim % 2:
            raise ValueError(f'dpt_feature_dim must be even, got {self.dpt_feature_dim}')
        if len(self.dpt_layer_dims) != 4:
            raise ValueError(f'dpt_layer_dims needs 4 entries, got {self.dpt_layer_dims!r}')
        if not (self.rope_base > 0 and self.mlp_ratio > 0):
            raise ValueError('rope_base and mlp_ratio must be positive')
        object.__setattr__(self, 'depth_mode', _mode_tuple('depth_mode', self.depth_mode, DEPTH_MODES))
        object.__setattr__(self, 'conf_mode', _mode_tuple('conf_mode', self.conf_mode, CONF_MODES))
        if not (self.depth_mode[1] == -math.inf and self.depth_mode[2] == math.inf):
            raise ValueError(f'depth_mode bounds must be (-inf, inf), got {self.depth_mode}')
        if len(self.img_size) != 2 or any(s % self.patch_size for s in self.img_size):
            raise ValueError(f'img_size {self.img_size!r} must be (H, W), multiples of patch_size {self.patch_size}')

    @property
    def head_hooks(self) -> tuple[int, int, int, int]:
        """Indices into [encoder output, decoder block 1 .. dec_depth] that feed the DPT levels 0..3."""
        depth = self.dec_depth
        return 0, depth * 2 // 4, depth * 3 // 4, depth

    @classmethod
    def tiny(cls) -> Dust3rConfig:
        """A small random-weight network for tests (encoder 64-d x 2, decoder 32-d x 2, narrow DPT)."""
        return cls(enc_embed_dim=64, enc_depth=2, enc_num_heads=4, dec_embed_dim=32, dec_depth=2, dec_num_heads=2,
                   dpt_layer_dims=(8, 16, 24, 32), dpt_feature_dim=16, dpt_last_dim=8)

    @classmethod
    def from_constructor_kwargs(cls, kwargs: Mapping[str, Any]) -> Dust3rConfig:
        """Config from the keyword arguments of an official ``AsymmetricCroCo3DStereo(...)`` constructor string.

        Accepted: pos_embed 'RoPE<base>', patch_embed_cls 'PatchEmbedDust3R' or 'ManyAR_PatchEmbed' (both run as
        PatchEmbedDust3R with landscape_only=False, as LSM does), head_type 'dpt', output_mode 'pts3d', the size
        arguments, depth_mode, conf_mode, and the training-only freeze, mask_ratio, landscape_only.
        Raises ValueError for unknown keys or unsupported values.
        """
        kwargs = dict(kwargs)
        unknown = sorted(set(kwargs) - _CONSTRUCTOR_KEYS)
        if unknown:
            raise ValueError(f'unknown {CLASS_NAME} arguments: {unknown}')
        pos_embed = kwargs.pop('pos_embed', 'cosine')
        match = _ROPE_PATTERN.fullmatch(pos_embed) if isinstance(pos_embed, str) else None
        if match is None:
            raise ValueError(f"pos_embed {pos_embed!r} is not supported; only 'RoPE<base>' (e.g. 'RoPE100')")
        choices = {'head_type': ('dpt',), 'output_mode': ('pts3d',),
                   'patch_embed_cls': ('PatchEmbedDust3R', 'ManyAR_PatchEmbed'),
                   'freeze': ('none', 'mask', 'encoder'), 'landscape_only': (True, False),
                   'norm_im2_in_dec': (True, False)}
        defaults = {'head_type': 'linear', 'output_mode': 'pts3d', 'patch_embed_cls': 'PatchEmbedDust3R',
                    'freeze': 'none', 'landscape_only': True, 'norm_im2_in_dec': True}
        chosen = {}
        for key, allowed in choices.items():
            value = kwargs.pop(key, defaults[key])
            if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
                raise ValueError(f'{key}={value!r} is not supported; expected one of {allowed}')
            chosen[key] = value
        mask_ratio = kwargs.pop('mask_ratio', 0.9)
        if not isinstance(mask_ratio, (int, float)) or isinstance(mask_ratio, bool):
            raise ValueError(f'mask_ratio must be a number, got {mask_ratio!r}')
        img_size = kwargs.pop('img_size', 224)
        if isinstance(img_size, int) and not isinstance(img_size, bool):
            img_size = (img_size, img_size)
        if not (isinstance(img_size, (tuple, list)) and len(img_size) == 2
                and all(isinstance(s, int) and not isinstance(s, bool) for s in img_size)):
            raise ValueError(f'img_size must be an int or (H, W), got {img_size!r}')
        # CroCoNet's defaults for the size arguments the string leaves out
        sizes = {'enc_embed_dim': 768, 'enc_depth': 12, 'enc_num_heads': 12, 'dec_embed_dim': 512,
                 'dec_depth': 8, 'dec_num_heads': 16, 'patch_size': 16}
        sizes.update({k: kwargs.pop(k) for k in list(kwargs) if k in sizes})
        mlp_ratio = kwargs.pop('mlp_ratio', 4)
        if not isinstance(mlp_ratio, (int, float)) or isinstance(mlp_ratio, bool):
            raise ValueError(f'mlp_ratio must be a number, got {mlp_ratio!r}')
        return cls(**sizes, mlp_ratio=float(mlp_ratio), rope_base=float(match.group(1)),
                   norm_context_in_decoder=chosen['norm_im2_in_dec'],
                   depth_mode=kwargs.pop('depth_mode', ('exp', -math.inf, math.inf)),
                   conf_mode=kwargs.pop('conf_mode', ('exp', 1, math.inf)),
                   img_size=tuple(img_size))


@dataclass
class Encoded:
    """Encoder output of an image batch: tokens (B, N, enc_dim) after enc_norm, positions (B, N, 2) (y, x)."""

    tokens: Tensor
    positions: Tensor


class Dust3rNet(nn.Module):
    """DUSt3R's ``AsymmetricCroCo3DStereo`` for two views of the same size, with DPT heads (pure PyTorch).

    Module names follow the official ones for the transformer (``enc_blocks``, ``dec_blocks1`` = official
    ``dec_blocks``, ``dec_blocks2``, ...); the heads are ``head1``/``head2`` (:class:`DPTHead`).
    ``lsm_ros.model.checkpoint`` maps official state dicts onto these names.
    """

    def __init__(self, config: Dust3rConfig) -> None:
        super().__init__()
        self.config = config
        rope = RoPE2D(config.rope_base)
        self.patch_embed = PatchEmbed(config.patch_size, config.enc_embed_dim)
        self.enc_blocks = nn.ModuleList(
            EncoderBlock(config.enc_embed_dim, config.enc_num_heads, config.mlp_ratio, rope)
            for _ in range(config.enc_depth))
        self.enc_norm = nn.LayerNorm(config.enc_embed_dim, eps=LAYER_NORM_EPS)
        self.decoder_embed = nn.Linear(config.enc_embed_dim, config.dec_embed_dim)
        self.dec_blocks1, self.dec_blocks2 = (nn.ModuleList(
            DecoderBlock(config.dec_embed_dim, config.dec_num_heads, config.mlp_ratio, rope,
                         config.norm_context_in_decoder)
            for _ in range(config.dec_depth)) for _ in range(2))
        self.dec_norm = nn.LayerNorm(config.dec_embed_dim, eps=LAYER_NORM_EPS)
        token_dims = (config.enc_embed_dim,) + 3 * (config.dec_embed_dim,)
        self.head1, self.head2 = (DPTHead(token_dims, config.dpt_layer_dims, config.dpt_feature_dim,
                                          config.dpt_last_dim, out_channels=4, patch_size=config.patch_size)
                                  for _ in range(2))

    def encode(self, images: Tensor) -> Encoded:
        """images (B, 3, H, W) in [-1, 1], H and W multiples of the patch size -> :class:`Encoded`.
        The residual stream stays float32 under autocast (only the blocks' matrix products are reduced)."""
        tokens, positions = self.patch_embed(images)
        tokens = tokens.float()
        for block in self.enc_blocks:
            tokens = block(tokens, positions)
        return Encoded(self.enc_norm(tokens), positions)

    def decode(self, view1: Encoded, view2: Encoded) -> tuple[list[Tensor], list[Tensor]]:
        """Run both decoders. Block i of each view attends to the other view's output of block i-1.

        Returns per view the list [encoder tokens (B, N, enc_dim), decoder block 1 .. dec_depth outputs
        (B, N, dec_dim)], the last one after dec_norm (the input list of the DPT heads).
        """
        outputs1, outputs2 = [view1.tokens], [view2.tokens]
        x1, x2 = self.decoder_embed(view1.tokens).float(), self.decoder_embed(view2.tokens).float()
        for block1, block2 in zip(self.dec_blocks1, self.dec_blocks2):
            x1, x2 = (block1(x1, x2, view1.positions, view2.positions),
                      block2(x2, x1, view2.positions, view1.positions))
            outputs1.append(x1)
            outputs2.append(x2)
        outputs1[-1] = self.dec_norm(outputs1[-1])
        outputs2[-1] = self.dec_norm(outputs2[-1])
        return outputs1, outputs2

    def predict(self, decoded1: list[Tensor], decoded2: list[Tensor], image_size: tuple[int, int]
                ) -> dict[str, Tensor]:
        """Heads and post-processing: decoder lists of :meth:`decode` -> pts3d_1, conf_1, pts3d_2, conf_2
        (points (B, H, W, 3) in view 1's frame, confidences (B, H, W)). The post-processing (exp/expm1) runs in
        float32 outside any autocast."""
        hooks = self.config.head_hooks
        out: dict[str, Tensor] = {}
        for index, (head, decoded) in enumerate(((self.head1, decoded1), (self.head2, decoded2)), start=1):
            raw = head([decoded[i] for i in hooks], image_size)
            with torch.autocast(raw.device.type, enabled=False):
                out[f'pts3d_{index}'], out[f'conf_{index}'] = postprocess(raw.float(), self.config.depth_mode,
                                                                           self.config.conf_mode)
        return out

    def forward(self, img1: Tensor, img2: Tensor, precision: str = 'fp32') -> dict[str, Tensor]:
        """img1, img2 (B, 3, H, W) float in [-1, 1], same shape, H and W multiples of the patch size.

        Returns ``pts3d_1`` (B, H, W, 3) view 1's points, ``conf_1`` (B, H, W), ``pts3d_2`` (B, H, W, 3) view 2's
        points in view 1's frame, ``conf_2`` (B, H, W), and ``enc_feat`` (B, 2N, enc_dim): the encoder tokens
        after enc_norm, view 1's N = (H/p)(W/p) row-major tokens, then view 2's; all float32.
        ``precision`` ('fp32', 'bf16', 'fp16'; see :func:`~.layers.autocast`): the encoder, decoders and heads
        run under that autocast, the post-processing in float32.
        """
        self._check_images(img1, img2)
        with autocast(precision, img1.device):
            encoded = self.encode(torch.cat((img1, img2), dim=0))  # one batch, as the official code does
            tokens1, tokens2 = encoded.tokens.chunk(2, dim=0)
            positions1, positions2 = encoded.positions.chunk(2, dim=0)
            view1, view2 = Encoded(tokens1, positions1), Encoded(tokens2, positions2)
            out = self.predict(*self.decode(view1, view2), image_size=(img1.shape[-2], img1.shape[-1]))
        out['enc_feat'] = torch.cat((tokens1, tokens2), dim=1).float()
        return out

    def _check_images(self, img1: Tensor, img2: Tensor) -> None:
        if img1.ndim != 4 or img1.shape[1] != 3:
            raise ValueError(f'images must be (B, 3, H, W), got {tuple(img1.shape)}')
        if img1.shape != img2.shape:
            raise ValueError(f'both views must have the same shape, got {tuple(img1.shape)} and {tuple(img2.shape)}')
        p = self.config.patch_size
        if img1.shape[-2] % p or img1.shape[-1] % p:
            raise ValueError(f'image size {img1.shape[-2]}x{img1.shape[-1]} must be a multiple of {p}')
