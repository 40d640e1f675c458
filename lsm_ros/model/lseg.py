"""LSeg image features (``clip_vitl16_384``), label decoding and the loader of the official LSeg checkpoint.

The image part is LSeg's dense feature network as the Large Spatial Model uses it: a ViT-L/16 whose position
embedding is resampled to the input's patch grid, four hooked block outputs reassembled into a feature pyramid
(readout 'project'), a DPT-style refine decoder with batch-normalised residual units, and ``head1``, a 1x1
convolution to 512 channels. The output is ``head1``'s map at half the input resolution (LSM's ``half_res``).

Labels are decoded as LSeg does: cosine similarity of every pixel feature with the CLIP text features of the
label phrases, scaled by LSeg's logit scale, in float16 (:func:`decode_labels`), then a bilinear x2 upsampling
with aligned corners (:func:`upsample_logits`).

Module and parameter names follow the official state dict (without its ``net.`` prefix), so loading the
official file is an identity map; the few official entries the features do not use are listed in
:data:`UNUSED_OFFICIAL_PREFIXES`.

Shape letters: B batch, H x W input image, N = (H/16)(W/16) patch tokens, C channels, P label phrases.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import CheckpointError, load_checkpoint_file, state_dict_problems
from .clip_text import ClipTextConfig, ClipTextEncoder
from .layers import EncoderBlock, PatchEmbed

logger = logging.getLogger(__name__)

# LSeg's logit scale: exp(log(1 / 0.07)) evaluated in float32 (a constant of LSeg, not a checkpoint entry).
LSEG_LOGIT_SCALE: float = torch.tensor(math.log(1 / 0.07), dtype=torch.float32).exp().item()
# The scale as the float16 label decoding applies it (rounded to float16: 14.2890625), a Python float so that no
# tensor is made on the host for it.
_LOGIT_SCALE_FP16: float = torch.tensor(LSEG_LOGIT_SCALE, dtype=torch.float32).half().item()
OFFICIAL_PREFIX = 'net.'  # keys of the LSeg network inside the Lightning checkpoint's 'state_dict'
CLIP_PREFIX = 'clip_pretrained.'
# Official entries that the features and the text encoder do not use: CLIP's image tower and logit scale, the
# ViT's final norm and classifier (LSeg computes or holds them but never reads them) and the skip branch of the
# coarsest fusion block (it gets no skip input).
UNUSED_OFFICIAL_PREFIXES = (CLIP_PREFIX + 'visual.', CLIP_PREFIX + 'logit_scale', 'pretrained.model.norm.',
                            'pretrained.model.head.', 'scratch.refinenet4.resConfUnit1.')


@dataclass(frozen=True)
class LSegConfig:
    """Shape of LSeg's ``clip_vitl16_384`` feature network (defaults: the official one).

    The reassembly resamples the four hooked layers by x4 (transposed conv), x2 (transposed conv), x1 and x1/2
    (3x3 stride-2 conv); the class token is merged into every patch token by the 'project' readout.
    """

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 16
    pretrain_grid: int = 24  # the position embedding's grid side: 384 / 16, plus one class-token entry
    hooks: tuple[int, int, int, int] = (5, 11, 17, 23)
    reassemble_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    features: int = 256
    out_c: int = 512

    def __post_init__(self) -> None:
        if len(self.hooks) != 4 or len(self.reassemble_channels) != 4:
            raise ValueError('LSegConfig needs four hooks and four reassemble channel counts')
        if list(self.hooks) != sorted(set(self.hooks)) or self.hooks[0] < 0 or self.hooks[-1] >= self.depth:
            raise ValueError(f'hooks {self.hooks} must be increasing block indices below depth {self.depth}')
        if self.embed_dim % self.num_heads:
            raise ValueError(f'embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}')

    @classmethod
    def tiny(cls) -> 'LSegConfig':
        """A small random-weight network of the same structure, for unit tests."""
        return cls(embed_dim=32, depth=4, num_heads=2, pretrain_grid=4, hooks=(0, 1, 2, 3),
                   reassemble_channels=(8, 16, 32, 32), features=16, out_c=32)

    @property
    def input_multiple(self) -> int:
        """Image sides must be multiples of this: the coarsest level halves the patch grid once more."""
        return 2 * self.patch_size


# ------------------------------------------------------------------------------------------------ backbone
def resample_position_embedding(pos_embed: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """LSeg's resampling of a ViT position embedding to another patch grid.

    pos_embed (1, 1 + g*g, C): the class token's entry, then a g x g grid in row-major order ->
    (1, 1 + h*w, C) for ``grid_hw`` = (h, w). The grid is resampled bilinearly with align_corners=False and
    no antialiasing, also when shrinking; the class token's entry is kept.
    """
    cls_entry, grid = pos_embed[:, :1], pos_embed[0, 1:]
    side = math.isqrt(grid.shape[0])
    if side * side != grid.shape[0]:
        raise ValueError(f'position embedding grid of {grid.shape[0]} entries is not square')
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=grid_hw, mode='bilinear', align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_hw[0] * grid_hw[1], -1)
    return torch.cat([cls_entry, grid], dim=1)


class VisionTransformer(nn.Module):
    """ViT with a class token and a resampled position embedding; returns the hooked blocks' outputs."""

    def __init__(self, config: LSegConfig) -> None:
        super().__init__()
        self.hooks = config.hooks
        self.patch_embed = PatchEmbed(config.patch_size, config.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.pretrain_grid ** 2, config.embed_dim))
        self.blocks = nn.ModuleList(EncoderBlock(config.embed_dim, config.num_heads, config.mlp_ratio)
                                    for _ in range(config.depth))

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) -> the outputs (B, 1 + N, C) of the four hooked blocks (class token first)."""
        patch_tokens, _ = self.patch_embed(images)
        grid_hw = (images.shape[-2] // self.patch_embed.patch_size, images.shape[-1] // self.patch_embed.patch_size)
        x = torch.cat([self.cls_token.expand(images.shape[0], -1, -1), patch_tokens], dim=1)
        x = x + resample_position_embedding(self.pos_embed, grid_hw)
        hooked = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.hooks:
                hooked.append(x)
                if len(hooked) == len(self.hooks):
                    break
        return hooked


class ProjectReadout(nn.Module):
    """Readout 'project': every patch token is concatenated with the class token, then Linear + exact GELU."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, 1 + N, C), class token first -> (B, N, C)."""
        patches = tokens[:, 1:]
        readout = tokens[:, :1].expand_as(patches)
        return self.project(torch.cat((patches, readout), dim=-1))


class Reassemble(nn.Module):
    """One pyramid level from a hooked layer: readout, token grid -> map, 1x1 conv, resampling.

    Submodules are named by their index in LSeg's ``nn.Sequential`` (1 and 2 were parameter-free reshapes):
    '0' readout, '3' 1x1 projection, '4' resampling (identity at scale 1, where LSeg has no module).
    """

    def __init__(self, dim: int, channels: int, scale: float) -> None:
        super().__init__()
        self.add_module('0', ProjectReadout(dim))
        self.add_module('3', nn.Conv2d(dim, channels, kernel_size=1))
        if scale in (4, 2):
            self.add_module('4', nn.ConvTranspose2d(channels, channels, kernel_size=int(scale), stride=int(scale)))
        elif scale == 0.5:
            self.add_module('4', nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1))
        elif scale == 1:
            self.add_module('4', nn.Identity())
        else:
            raise ValueError(f'unsupported reassemble scale {scale}')

    def forward(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """tokens (B, 1 + N, C) -> (B, channels, h*scale, w*scale) for the patch grid ``grid_hw`` = (h, w)."""
        x = self.get_submodule('0')(tokens).transpose(1, 2).unflatten(2, grid_hw)
        return self.get_submodule('4')(self.get_submodule('3')(x))


class LSegBackbone(nn.Module):
    """The ViT and the reassembly of its four hooked layers (official name ``pretrained``)."""

    SCALES = (4, 2, 1, 0.5)

    def __init__(self, config: LSegConfig) -> None:
        super().__init__()
        self.model = VisionTransformer(config)
        for level, (channels, scale) in enumerate(zip(config.reassemble_channels, self.SCALES), start=1):
            self.add_module(f'act_postprocess{level}', Reassemble(config.embed_dim, channels, scale))

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) -> four maps (B, C_i, H/4, W/4), (H/8, W/8), (H/16, W/16), (H/32, W/32)."""
        patch = self.model.patch_embed.patch_size
        grid_hw = (images.shape[-2] // patch, images.shape[-1] // patch)
        layers = self.model(images)
        return [self.get_submodule(f'act_postprocess{level}')(tokens, grid_hw)
                for level, tokens in enumerate(layers, start=1)]


# ------------------------------------------------------------------------------------------------ decoder
class ResidualConvUnit(nn.Module):
    """x + bn2(conv2(relu(bn1(conv1(relu(x)))))) with 3x3 convolutions without bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, h, w) -> (B, C, h, w)."""
        out = self.bn1(self.conv1(F.relu(x)))
        return self.bn2(self.conv2(F.relu(out))) + x


class FusionBlock(nn.Module):
    """(x + resConfUnit1(skip)) -> resConfUnit2 -> bilinear x2 (aligned corners) -> 1x1 out_conv."""

    def __init__(self, channels: int, with_skip: bool = True) -> None:
        super().__init__()
        if with_skip:
            self.resConfUnit1 = ResidualConvUnit(channels)
        self.resConfUnit2 = ResidualConvUnit(channels)
        self.out_conv = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        """x (B, C, h, w), skip (B, C, h, w) (only with ``with_skip``) -> (B, C, 2h, 2w)."""
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = F.interpolate(self.resConfUnit2(x), scale_factor=2, mode='bilinear', align_corners=True)
        return self.out_conv(x)


class RefineDecoder(nn.Module):
    """LSeg's ``scratch``: 3x3 projections of the pyramid to ``features`` channels, four fusion blocks from
    coarse to fine, and ``head1`` (1x1 conv to ``out_c``)."""

    def __init__(self, config: LSegConfig) -> None:
        super().__init__()
        for level, channels in enumerate(config.reassemble_channels, start=1):
            self.add_module(f'layer{level}_rn',
                            nn.Conv2d(channels, config.features, kernel_size=3, padding=1, bias=False))
        for level in range(1, 5):
            self.add_module(f'refinenet{level}', FusionBlock(config.features, with_skip=level != 4))
        self.head1 = nn.Conv2d(config.features, config.out_c, kernel_size=1)

    def forward(self, layers: list[Tensor]) -> Tensor:
        """The four pyramid maps, finest first, (B, C_i, h_i, w_i) -> (B, out_c, 2 h_1, 2 w_1)."""
        projected = [self.get_submodule(f'layer{level}_rn')(x) for level, x in enumerate(layers, start=1)]
        path = self.get_submodule('refinenet4')(projected[3])
        for level in (3, 2, 1):
            path = self.get_submodule(f'refinenet{level}')(path, projected[level - 1])
        return self.head1(path)


class LSegFeatureExtractor(nn.Module):
    """LSeg's dense image features at half resolution (LSM's ``extract_features`` with ``half_res``)."""

    def __init__(self, config: LSegConfig | None = None) -> None:
        super().__init__()
        self.config = config or LSegConfig()
        self.pretrained = LSegBackbone(self.config)
        self.scratch = RefineDecoder(self.config)

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [-1, 1] (LSM passes its normalised images unchanged), H and W multiples of 32
        -> features (B, out_c, H/2, W/2)."""
        multiple = self.config.input_multiple
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f'expected images of shape (B, 3, H, W), got {tuple(images.shape)}')
        if images.shape[-2] % multiple or images.shape[-1] % multiple:
            raise ValueError(f'image size {images.shape[-2]}x{images.shape[-1]} is not a multiple of {multiple}')
        return self.scratch(self.pretrained(images))


# ------------------------------------------------------------------------------------------------ labels
def decode_labels(features: Tensor, text_features_normalized: Tensor) -> Tensor:
    """LSeg's label logits: features (B, C, h, w) float32, text_features_normalized (P, C) -> (B, P, h, w)
    float32.

    Every pixel's feature is L2-normalised in float32 and cast to float16, multiplied by
    :data:`LSEG_LOGIT_SCALE` rounded to float16 (as torch multiplies a float16 tensor by a float32 0-dim tensor;
    the product rounded to float16), and multiplied with the text features in float16
    (cast to float16 if they are not); the float16 logits are returned as float32.
    """
    batch, channels, height, width = features.shape
    if text_features_normalized.ndim != 2 or text_features_normalized.shape[1] != channels:
        raise ValueError(f'text features {tuple(text_features_normalized.shape)} do not match {channels} feature '
                         'channels')
    pixels = features.permute(0, 2, 3, 1).reshape(-1, channels)
    pixels = pixels / pixels.norm(dim=-1, keepdim=True)
    # float16 x float32 0-dim tensor computes in float16 (the scale rounded to float16): the same product, exact
    # in float32 and rounded once, with the scale as a Python float
    logits = (pixels.half() * _LOGIT_SCALE_FP16) @ text_features_normalized.to(torch.float16).t()
    return logits.float().view(batch, height, width, -1).permute(0, 3, 1, 2)


def upsample_logits(logits: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """LSeg's ``output_conv``: bilinear with align_corners=True, (B, P, h, w) -> (B, P, 2h, 2w), or to ``size``
    (H, W) (with aligned corners the sampling grid follows from the sizes alone: (2h, 2w) is exactly the x2)."""
    size = (2 * logits.shape[-2], 2 * logits.shape[-1]) if size is None else tuple(size)
    return F.interpolate(logits, size=size, mode='bilinear', align_corners=True)


# ------------------------------------------------------------------------------------------------ loading
def load_lseg_checkpoint(source: str | os.PathLike[str] | Mapping[str, Any], device: str | torch.device = 'cpu',
                         config: LSegConfig | None = None, text_config: ClipTextConfig | None = None,
                         ) -> tuple[LSegFeatureExtractor, ClipTextEncoder]:
    """Build LSeg's feature extractor and CLIP text encoder (eval mode, on ``device``) from the official LSeg
    checkpoint (``demo_e200.ckpt``).

    source: a checkpoint path (read safely and memory-mapped, so the entries not used, e.g. optimizer states, are
    never read; see :func:`load_checkpoint_file`) or an already loaded checkpoint dict. The network's entries are
    ``checkpoint['state_dict']['net.' + name]``; entries without the ``net.`` prefix are not part of the network and are ignored, like LSM does. The image part is converted to float32,
    the CLIP entries keep their stored dtypes (the text encoder computes in the dtype of ``text_projection``).
    Tensors of a dict source become parameters without a copy where no conversion is needed: do not modify
    them afterwards. config / text_config: the shapes (defaults: the official ones).
    Raises CheckpointError for a missing or unreadable file, a missing 'state_dict', and missing keys,
    unexpected keys or shape mismatches (naming a few of each).
    """
    checkpoint = load_checkpoint_file(source, mmap=True) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'LSeg checkpoint must be a dict, got {type(checkpoint).__name__}')
    state_dict = checkpoint.get('state_dict')
    if not isinstance(state_dict, Mapping):
        raise CheckpointError("LSeg checkpoint has no 'state_dict' (expected a PyTorch-Lightning checkpoint)")
    network = {key[len(OFFICIAL_PREFIX):]: value for key, value in state_dict.items()
               if isinstance(key, str) and key.startswith(OFFICIAL_PREFIX)}
    if len(network) < len(state_dict):
        logger.info('ignoring %d LSeg checkpoint entries without the %r prefix', len(state_dict) - len(network),
                    OFFICIAL_PREFIX)
    used = {k: v for k, v in network.items() if not k.startswith(UNUSED_OFFICIAL_PREFIXES)}
    image_state = {k: v for k, v in used.items() if not k.startswith(CLIP_PREFIX)}
    text_state = {k[len(CLIP_PREFIX):]: v for k, v in used.items() if k.startswith(CLIP_PREFIX)}

    with torch.device('meta'):
        extractor = LSegFeatureExtractor(config)
        text_encoder = ClipTextEncoder(text_config)
    expected = dict(extractor.state_dict())
    expected.update({CLIP_PREFIX + k: v for k, v in text_encoder.state_dict().items()})
    problems = state_dict_problems(expected, used)
    if problems:
        raise CheckpointError('checkpoint does not match the LSeg network (names without the "net." prefix); '
                              + '; '.join(problems))
    extractor.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v
                               for k, v in image_state.items()}, strict=True, assign=True)
    text_encoder.load_state_dict(text_state, strict=True, assign=True)
    logger.info('loaded LSeg: ViT %dx%d, %.1f M image parameters; CLIP text encoder in %s, %.1f M parameters',
                extractor.config.embed_dim, extractor.config.depth,
                sum(p.numel() for p in extractor.parameters()) / 1e6, text_encoder.compute_dtype,
                sum(p.numel() for p in text_encoder.parameters()) / 1e6)
    return extractor.to(device).eval(), text_encoder.to(device).eval()
