"""The Large Spatial Model (LSM): DUSt3R geometry + LSeg semantics + PTv3 fusion + Gaussian head (pure PyTorch).

Stage API (a public contract)::

    model = LargeSpatialModel.from_official_checkpoints(dust3r=..., lseg=..., lsm='checkpoint-final.pth')
    geometry = model.geometry(img1, img2)        # pts3d_1, conf_1, pts3d_2, conf_2, enc_feat
    semantics = model.semantics(img1, img2)      # lseg_features, lseg_token_feature, lseg_res_feature
    gaussians = model.gaussians(img1, img2, geometry, semantics)   # means, scales, rotations, opacities, sh, features

``geometry`` and ``semantics`` take ``precision='fp32'`` (default, exact), ``'bf16'`` or ``'fp16'`` (CUDA): DUSt3R or
LSeg then runs under autocast and returns float32; PTv3 and the Gaussian head always run in float32.

Images are pre-processed (B, 3, H, W) float32 tensors in [-1, 1] (H, W multiples of 16; multiples of 128 keep
LSeg's 8x8 token pooling exact). Every 3-D quantity is in view 1's camera frame (OpenCV/REP 103 optical frame)
in DUSt3R's units. Gaussian rows are ordered (batch, view, row, column): view 1's pixels row-major, then view 2's.
Quaternions are (x, y, z, w), real part last, as in the official code.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import (SAFETENSORS_SUFFIX, CheckpointError, args_model_string, load_checkpoint_file,
                         load_dust3r_checkpoint, parse_constructor_string, state_dict_problems)
from .clip_text import ClipTextConfig, ClipTextEncoder
from .dust3r import Dust3rConfig, Dust3rNet
from .gaussian_head import GaussianHead, GaussianHeadConfig, knn_mean_squared_distance
from .layers import autocast, fp32_matmul
from .lseg import LSegConfig, LSegFeatureExtractor, decode_labels, load_lseg_checkpoint, upsample_logits
from .ptv3 import PointTransformerV3LSM, PTv3Config

logger = logging.getLogger(__name__)

LSM_CLASS_NAME = 'LSM_Dust3R'
TOKEN_POOL = 8          # LSeg features are average-pooled 8x8 into the tokens PTv3 cross-attends to
GRID_SIZE = 0.01        # PTv3 voxel size in normalised coordinates
# LSM-file prefixes whose weights the official from_pretrained takes from the DUSt3R and LSeg files instead
_COMPANION_PREFIXES = ('dust3r', 'lseg_feature_extractor')
# official LSM key prefix -> our module prefix (the nn.Sequential wrappers hold the convolution at index 1 / 0)
_LSM_KEY_RENAMES = (('feature_expansion.1.', 'feature_expansion.'), ('feature_reduction.0.', 'feature_reduction.'))
_PTV3_CONFIG_KEYS = ('enc_depths', 'enc_channels', 'enc_num_head', 'enc_patch_size', 'dec_depths', 'dec_channels',
                     'dec_num_head', 'dec_patch_size', 'cross_dust', 'cross_lseg', 'cross_multi_scale', 'stride')


@dataclass(frozen=True)
class LsmConfig:
    """Configuration of every LSM part; defaults are the released model (``configs/default.yaml``)."""

    dust3r: Dust3rConfig = field(default_factory=Dust3rConfig)
    lseg: LSegConfig = field(default_factory=LSegConfig)
    clip: ClipTextConfig = field(default_factory=ClipTextConfig)
    ptv3: PTv3Config = field(default_factory=PTv3Config)
    head: GaussianHeadConfig = field(default_factory=GaussianHeadConfig)

    def __post_init__(self) -> None:
        checks = ((self.ptv3.dust_channels, self.dust3r.enc_embed_dim, 'PTv3 dust_channels', 'DUSt3R encoder width'),
                  (self.ptv3.lseg_channels, self.lseg.out_c, 'PTv3 lseg_channels', 'LSeg feature width'),
                  (self.ptv3.multi_scale_channels, self.lseg.out_c, 'PTv3 multi_scale_channels', 'LSeg feature width'),
                  (self.head.point_feature_dim, self.ptv3.dec_channels[0], 'Gaussian head input', 'PTv3 output width'),
                  (self.clip.embed_dim, self.lseg.out_c, 'CLIP text embedding', 'LSeg feature width'))
        for value, expected, name, source in checks:
            if value != expected:
                raise ValueError(f'{name} ({value}) must equal the {source} ({expected})')

    @classmethod
    def tiny(cls) -> 'LsmConfig':
        """A few-channel model with the real structure, for fast tests (random weights)."""
        dust3r, lseg = Dust3rConfig.tiny(), LSegConfig.tiny()
        ptv3 = replace(PTv3Config.tiny(), dust_channels=dust3r.enc_embed_dim, lseg_channels=lseg.out_c,
                       multi_scale_channels=lseg.out_c)
        return cls(dust3r=dust3r, lseg=lseg, clip=ClipTextConfig.tiny(), ptv3=ptv3,
                   head=GaussianHeadConfig(point_feature_dim=ptv3.dec_channels[0]))

    @classmethod
    def from_official(cls, config: Mapping[str, Any]) -> 'LsmConfig':
        """From the ``config={...}`` dict of the LSM file's ``args.model`` (unknown keys are refused)."""
        ptv3_given = dict(config.get('point_transformer_config') or {})
        unknown = sorted(set(ptv3_given) - set(_PTV3_CONFIG_KEYS))
        if unknown:
            raise CheckpointError(f'unsupported point_transformer_config keys in the LSM file: {unknown}')
        ptv3_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in ptv3_given.items()}
        stages = len(ptv3_kwargs.get('enc_depths', PTv3Config.enc_depths))
        ptv3_kwargs['strides'] = tuple(ptv3_kwargs.pop('stride', (2,) * (stages - 1)))  # PTv3's default stride 2
        try:
            ptv3 = PTv3Config(**ptv3_kwargs)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f'unsupported point_transformer_config in the LSM file: {err}') from None
        head_given = dict(config.get('gaussian_head_config') or {})
        if head_given.get('feat_residual'):
            raise CheckpointError('gaussian_head_config.feat_residual=True is not supported (LSM releases use False)')
        head = GaussianHeadConfig(point_feature_dim=ptv3.dec_channels[0],
                                  feature_dim=int(head_given.get('d_gs_feats', 64)),
                                  rgb_residual=bool(head_given.get('rgb_residual', True)))
        lseg_given = dict(config.get('lseg_config') or {})
        if not lseg_given.get('half_res', True):
            raise CheckpointError('lseg_config.half_res=False is not supported (LSM releases use half_res=True)')
        return cls(ptv3=ptv3, head=head)


def _per_sample(value: Tensor | Sequence[Tensor] | None, name: str, batch: int) -> Sequence[Tensor] | None:
    """A per-sample input of :meth:`LargeSpatialModel.gaussians`: one 2-D tensor (batch 1), a 3-D stack of them
    or a sequence of them (one per sample)."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.dim() not in (2, 3):
            raise ValueError(f'{name} must be a 2-D tensor (batch 1) or one per sample, got {tuple(value.shape)}')
        value = [value] if value.dim() == 2 else list(value.unbind(0))
    if len(value) != batch:
        raise ValueError(f'{len(value)} {name} tensors for a batch of {batch}')
    return value


def merge_points(pts3d_1: Tensor, pts3d_2: Tensor, img1: Tensor, img2: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both views' points and colours of one sample, normalised as PTv3 receives them.

    Args: pts3d_1, pts3d_2 (H,W,3) in view 1's frame; img1, img2 (3,H,W) in [-1,1].
    Returns ``coord`` (2HW,3) = (P - center) / scale, ``color`` (2HW,3), ``center`` (1,1,3), ``scale`` (1,1,1),
    with P the points of view 1 (row-major) then view 2, center their float32 mean and scale the largest
    absolute centred coordinate. The reductions run on a (1,N,3) tensor as the official code does, so the float32
    summation order (which decides voxel boundaries) is the same.
    """
    points = torch.stack([pts3d_1, pts3d_2]).reshape(1, -1, 3)
    color = torch.stack([img1, img2]).permute(0, 2, 3, 1).reshape(-1, 3)
    center = torch.mean(points, dim=1, keepdim=True)
    centred = points - center
    scale = torch.max(torch.max(torch.abs(centred), dim=1, keepdim=True)[0], dim=2, keepdim=True)[0]
    return (centred / scale)[0], color, center, scale


class LargeSpatialModel(nn.Module):
    """The full LSM network. Submodules: ``dust3r``, ``lseg``, ``text_encoder``, ``point_transformer``,
    ``gaussian_head``, ``feature_expansion`` (64→512 1x1 conv) and ``feature_reduction`` (512→64 1x1 conv)."""

    def __init__(self, config: LsmConfig | None = None, *, dust3r: Dust3rNet | None = None,
                 lseg: LSegFeatureExtractor | None = None, text_encoder: ClipTextEncoder | None = None) -> None:
        super().__init__()
        self.config = config or LsmConfig()
        cfg = self.config
        self.dust3r = dust3r if dust3r is not None else Dust3rNet(cfg.dust3r)
        self.lseg = lseg if lseg is not None else LSegFeatureExtractor(cfg.lseg)
        self.text_encoder = text_encoder if text_encoder is not None else ClipTextEncoder(cfg.clip)
        self.point_transformer = PointTransformerV3LSM(cfg.ptv3)
        self.gaussian_head = GaussianHead(cfg.head)
        lseg_dim = cfg.lseg.out_c
        self.feature_expansion = nn.Conv2d(cfg.head.feature_dim, lseg_dim, kernel_size=1)
        self.feature_reduction = nn.Conv2d(lseg_dim, cfg.head.feature_dim, kernel_size=1)
        self._text_cache: dict[str, Tensor] = {}
        self._text_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ stages
    @torch.no_grad()
    def geometry(self, img1: Tensor, img2: Tensor, precision: str = 'fp32') -> dict[str, Tensor]:
        """DUSt3R: ``pts3d_1``/``pts3d_2`` (B,H,W,3) in view 1's frame, ``conf_1``/``conf_2`` (B,H,W),
        ``enc_feat`` (B, 2·(H/16)(W/16), 1024) encoder tokens (view 1's then view 2's), float32.
        ``precision``: 'fp32' (exact), 'bf16' or 'fp16' (network under autocast, post-processing float32)."""
        return self.dust3r(img1, img2, precision=precision)

    @torch.no_grad()
    def semantics(self, img1: Tensor, img2: Tensor, precision: str = 'fp32') -> dict[str, Tensor]:
        """LSeg: ``lseg_features`` (2B,512,H/2,W/2) for cat([img1, img2]); ``lseg_token_feature``
        (B, 2·(H/16)(W/16), 512) their 8x8 average pools, view 1's then view 2's, row-major;
        ``lseg_res_feature`` (2B,64,H,W) the reduced features added to the Gaussian features; float32.
        ``precision``: as for :meth:`geometry` (LSeg's network under autocast, the rest float32)."""
        batch = img1.shape[0]
        with autocast(precision, img1.device):
            features = self.lseg(torch.cat([img1, img2]))
        with fp32_matmul(precision, img1.device):   # TF32 allowed on CUDA unless precision is 'fp32'
            features = features.float()
            tokens = F.avg_pool2d(features, TOKEN_POOL)
            tokens = tokens.unflatten(0, (2, batch)).permute(1, 0, 3, 4, 2).flatten(1, 3)  # (v b) c h w -> b (v h w) c
            residual = F.interpolate(self.feature_reduction(features), scale_factor=2, mode='bilinear',
                                     align_corners=False)
        return dict(lseg_features=features, lseg_token_feature=tokens, lseg_res_feature=residual)

    @torch.no_grad()
    def gaussians(self, img1: Tensor, img2: Tensor, geometry: Mapping[str, Tensor], semantics: Mapping[str, Tensor],
                  serialization_order: Tensor | Sequence[Tensor] | None = None,
                  grid_coord: Tensor | Sequence[Tensor] | None = None, precision: str = 'fp32') -> dict[str, Tensor]:
        """PTv3 over the merged points, then the Gaussian head; one row per Gaussian, rows (batch, view, row, col).

        ``serialization_order``: the level-0 orders to use, (4, 2HW) int64 (batch 1) or one per sample; None
        sorts the codes (stable sort: ties in shared voxels keep pixel order). ``grid_coord``: the level-0 voxel
        grid to use (PTv3's name), (2HW, 3) int (batch 1) or one per sample; None computes it from the merged
        points (``trunc((coord - min coord) / 0.01)``). Both reproduce a recorded run exactly where the voxel
        boundaries are sensitive to float32 rounding (reference README §5.6). ``precision``: 'fp32' (default) runs
        PTv3 and the head in exact float32; 'bf16' / 'fp16' keep float32 but allow TF32 matrix products and
        convolutions on CUDA (no effect on the CPU). Returns ``means`` (M,3), ``scales`` (M,3), ``rotations``
        (M,4) unit quaternions (x, y, z, w), ``opacities`` (M,1) in (0,1), ``sh`` (M,16,3) degree-3 SH (DC first,
        RGB last), ``features`` (M,64), plus ``covariances`` (M,3,3), ``point_features`` (M,64) (PTv3 output),
        ``knn_mean_sq_dist`` (M,), ``center`` (B,3), ``scale`` (B,), with M = B·2·H·W. Runs in float32, also
        inside an autocast.
        """
        batch = img1.shape[0]
        serialization_order = _per_sample(serialization_order, 'serialization_order', batch)
        grid_coord = _per_sample(grid_coord, 'grid_coord', batch)
        residual = semantics['lseg_res_feature'].unflatten(0, (2, batch))  # (v b) c h w
        per_sample: list[dict[str, Tensor]] = []
        with fp32_matmul(precision, img1.device):
            for b in range(batch):
                coord, color, center, scale = merge_points(geometry['pts3d_1'][b], geometry['pts3d_2'][b],
                                                           img1[b], img2[b])
                point_features = self.point_transformer(
                    coord, torch.cat([coord, color], dim=1), geometry['enc_feat'][b:b + 1],
                    semantics['lseg_token_feature'][b:b + 1], semantics['lseg_token_feature'][b:b + 1],
                    grid_coord=None if grid_coord is None else grid_coord[b],
                    serialization_order=None if serialization_order is None else serialization_order[b])
                means = coord * scale[0] + center[0]
                out = self.gaussian_head(point_features, means, color,
                                         residual[:, b].permute(0, 2, 3, 1).reshape(-1, residual.shape[2]),
                                         knn_mean_squared_distance(means))
                out.update(point_features=point_features, center=center.reshape(1, 3), scale=scale.reshape(1))
                per_sample.append(out)
        return {key: torch.cat([sample[key] for sample in per_sample]) for key in per_sample[0]}

    @torch.no_grad()
    def forward(self, img1: Tensor, img2: Tensor, precision: str = 'fp32') -> dict[str, dict[str, Tensor]]:
        """All three stages: {'geometry': ..., 'semantics': ..., 'gaussians': ...}; ``precision`` applies to
        DUSt3R and LSeg (PTv3 and the Gaussian head run in float32)."""
        geometry = self.geometry(img1, img2, precision)
        semantics = self.semantics(img1, img2, precision)
        return dict(geometry=geometry, semantics=semantics,
                    gaussians=self.gaussians(img1, img2, geometry, semantics))

    # ------------------------------------------------------------------------------------------ text queries
    @torch.no_grad()
    def text_features(self, phrases: Sequence[str]) -> Tensor:
        """(P,512) float16 unit CLIP text embeddings, cached per phrase (thread-safe)."""
        with self._text_lock:
            missing = [p for p in dict.fromkeys(phrases) if p not in self._text_cache]
            if missing:
                device = next(self.text_encoder.parameters()).device
                encoded = self.text_encoder.encode_normalized(missing).to(device)
                self._text_cache.update(zip(missing, encoded))
            return torch.stack([self._text_cache[p] for p in phrases])

    @torch.no_grad()
    def view_label_logits(self, features: Tensor, text_features: Tensor) -> Tensor:
        """LSM's labelling of a feature image: (V,64,H,W) Gaussian features (rendered, or the source views'
        per-pixel features) → (V,P,H,W) float32 logits = logit_scale · cosine, decoded at half resolution and
        upsampled with align_corners=True as LSeg does."""
        expanded = self.feature_expansion(F.interpolate(features, scale_factor=0.5, mode='bilinear',
                                                        align_corners=False))
        # to the input size: LSeg's x2 for even sizes, the same resampling for any size (rendered views)
        return upsample_logits(decode_labels(expanded, text_features), features.shape[-2:])

    @torch.no_grad()
    def point_label_logits(self, features: Tensor, text_features: Tensor) -> Tensor:
        """(N,64) Gaussian features → (N,P) float32 logits, the same decoding per Gaussian (no resampling)."""
        weight = self.feature_expansion.weight.flatten(1)
        expanded = F.linear(features, weight, self.feature_expansion.bias)
        return decode_labels(expanded.T.reshape(1, -1, features.shape[0], 1), text_features)[0, :, :, 0].T

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_official_checkpoints(cls, dust3r: str | os.PathLike[str] | Mapping[str, Any] | None = None,
                                  lseg: str | os.PathLike[str] | Mapping[str, Any] | None = None,
                                  lsm: str | os.PathLike[str] | Mapping[str, Any] | None = None,
                                  device: str | torch.device = 'cpu', config: LsmConfig | None = None
                                  ) -> 'LargeSpatialModel':
        """Load the three official files, as ``LSM_Dust3R.from_pretrained`` does by default.

        ``lsm``: checkpoint-final.pth (its ``dust3r*``/``lseg_feature_extractor*`` entries are ignored: those
        parts come from the DUSt3R file DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth and the LSeg file demo_e200.ckpt).
        When ``dust3r`` or ``lseg`` is None, the file named in the LSM file's config is used: as given, else
        next to the LSM file (or its ``.safetensors`` conversion there). Each file may also be the
        ``.safetensors`` conversion of the official one (``lsm-ros weights convert``), and each argument an already
        loaded checkpoint dict. ``config``: the network shapes when they are not the released ones (small test
        models; the files then must match it). Raises CheckpointError with the file and the offending keys for
        anything missing or mismatched.
        """
        if lsm is None:
            raise CheckpointError('no LSM checkpoint given: pass lsm=checkpoint-final.pth')
        lsm_path = None if isinstance(lsm, Mapping) else Path(lsm)
        checkpoint = lsm if isinstance(lsm, Mapping) else load_checkpoint_file(lsm_path, mmap=True)
        official_config = lsm_config_from_checkpoint(checkpoint, lsm_path)
        released = LsmConfig.from_official(official_config)  # refuses configurations this code does not implement
        dust3r = dust3r if dust3r is not None else companion_checkpoint_path(
            official_config, 'dust3r_config', lsm_path, 'DUSt3R')
        lseg = lseg if lseg is not None else companion_checkpoint_path(
            official_config, 'lseg_config', lsm_path, 'LSeg')
        dust3r_net = load_dust3r_checkpoint(dust3r, device='cpu', config=config.dust3r if config else None)
        lseg_net, text_encoder = load_lseg_checkpoint(lseg, device='cpu', config=config.lseg if config else None,
                                                      text_config=config.clip if config else None)
        if config is None:
            config = replace(released, dust3r=dust3r_net.config, lseg=lseg_net.config, clip=text_encoder.config)
        model = cls(config, dust3r=dust3r_net, lseg=lseg_net, text_encoder=text_encoder)
        model.load_lsm_state_dict(checkpoint.get('model'), source=str(lsm_path or 'LSM checkpoint'))
        del checkpoint
        model.requires_grad_(False)  # inference only
        logger.info('loaded LSM (%.1f M parameters)', sum(p.numel() for p in model.parameters()) / 1e6)
        return model.to(device).eval()

    def load_lsm_state_dict(self, state: Any, source: str = 'LSM checkpoint') -> None:
        """Load the LSM-own parts (PTv3, Gaussian head, feature expansion/reduction) from an official LSM state
        dict; its DUSt3R and LSeg entries are skipped."""
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{source}: no state dict under 'model'")
        own = {}
        for key, value in state.items():
            if key.startswith(_COMPANION_PREFIXES):
                continue
            for official, ours in _LSM_KEY_RENAMES:
                if key.startswith(official):
                    key = ours + key[len(official):]
            own[key] = value
        expected = {k: v for k, v in self.state_dict().items()
                    if not k.startswith(('dust3r.', 'lseg.', 'text_encoder.'))}
        problems = state_dict_problems(expected, own, _our_lsm_key_to_official)
        if problems:
            raise CheckpointError(f'{source} does not match the LSM network; ' + '; '.join(problems))
        self.load_state_dict(own, strict=False)


def _our_lsm_key_to_official(key: str) -> str:
    for official, ours in _LSM_KEY_RENAMES:
        if key.startswith(ours):
            return official + key[len(ours):]
    return key


def lsm_config_from_checkpoint(checkpoint: Any, path: Path | None) -> dict[str, Any]:
    """The ``config={...}`` dict of an official LSM file's ``args.model = "LSM_Dust3R(config={...})"``."""
    source = str(path) if path else 'LSM checkpoint'
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'{source}: not a checkpoint dict')
    text = args_model_string(checkpoint)
    if text is None:
        raise CheckpointError(f'{source}: no args.model string; is this an LSM checkpoint-final.pth?')
    class_name, kwargs = parse_constructor_string(text)
    if class_name != LSM_CLASS_NAME or not isinstance(kwargs.get('config'), Mapping):
        raise CheckpointError(f'{source}: builds {class_name}({", ".join(kwargs)}), expected '
                              f'{LSM_CLASS_NAME}(config={{...}}): is this an LSM checkpoint-final.pth?')
    return dict(kwargs['config'])


def companion_checkpoint_path(config: Mapping[str, Any], section: str, lsm_path: Path | None, what: str) -> Path:
    """The DUSt3R/LSeg file an LSM config names (``{section}.pretrained_model_name_or_path``): the path as given
    (absolute or relative to the working directory), else the same file name next to the LSM file, else its
    ``.safetensors`` conversion (``lsm-ros weights convert``) next to the LSM file."""
    named = (config.get(section) or {}).get('pretrained_model_name_or_path')
    if not isinstance(named, str) or not named:
        raise CheckpointError(f'the LSM config names no {section}.pretrained_model_name_or_path: pass the {what} '
                              'file explicitly')
    candidates = [Path(named)]
    if lsm_path is not None:
        beside = lsm_path.resolve().parent / Path(named).name
        candidates += [beside, beside.with_suffix(SAFETENSORS_SUFFIX)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise CheckpointError(f'the {what} file named by the LSM checkpoint was not found (looked for '
                          f'{", ".join(map(str, candidates))}): pass it explicitly')
