"""Fast unit tests of LSeg's feature extractor, label decoding, the CLIP text encoder and tokenizer, and the LSeg
checkpoint loader (tiny random networks; the full-size parity lives in the parity test module)."""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from lsm_ros.model.checkpoint import CheckpointError
from lsm_ros.model.clip_text import ClipTextConfig, ClipTextEncoder, bpe_tokenizer
from lsm_ros.model.lseg import (CLIP_PREFIX, LSEG_LOGIT_SCALE, OFFICIAL_PREFIX, UNUSED_OFFICIAL_PREFIXES, LSegConfig,
                                LSegFeatureExtractor, decode_labels, load_lseg_checkpoint,
                                resample_position_embedding, upsample_logits)
from lsm_ros.reference_weights import find_reference_dir, read_manifest

REFERENCE = find_reference_dir()
LSM_LSEG_PREFIX = 'lseg_feature_extractor.'
LABELS = ['wall', 'floor', 'ceiling', 'chair', 'table', 'sofa', 'bed', 'other']
SOT, EOT = 49406, 49407
needs_reference = pytest.mark.skipif(REFERENCE is None, reason='reference folder shared/reference/lsm_vitl_256 absent')


@pytest.fixture(scope='module')
def tiny_extractor() -> LSegFeatureExtractor:
    torch.manual_seed(0)
    extractor = LSegFeatureExtractor(LSegConfig.tiny()).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for module in extractor.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
    return extractor


@pytest.fixture(scope='module')
def tiny_text_encoder() -> ClipTextEncoder:
    torch.manual_seed(1)
    return ClipTextEncoder(ClipTextConfig.tiny()).eval()


def _official_checkpoint(extractor: LSegFeatureExtractor, text_encoder: ClipTextEncoder) -> dict:
    """Our networks' weights in the official Lightning layout, with the official entries we do not use."""
    state = OrderedDict((OFFICIAL_PREFIX + k, v.clone()) for k, v in extractor.state_dict().items())
    state.update((OFFICIAL_PREFIX + CLIP_PREFIX + k, v.clone()) for k, v in text_encoder.state_dict().items())
    dim, features = extractor.config.embed_dim, extractor.config.features
    state.update({
        'net.pretrained.model.norm.weight': torch.ones(dim), 'net.pretrained.model.norm.bias': torch.zeros(dim),
        'net.pretrained.model.head.weight': torch.zeros(10, dim), 'net.pretrained.model.head.bias': torch.zeros(10),
        'net.scratch.refinenet4.resConfUnit1.conv1.weight': torch.zeros(features, features, 3, 3),
        'net.scratch.refinenet4.resConfUnit1.bn1.num_batches_tracked': torch.zeros((), dtype=torch.long),
        'net.clip_pretrained.logit_scale': torch.tensor(4.6052),
        'net.clip_pretrained.visual.conv1.weight': torch.zeros(8, 3, 32, 32, dtype=torch.float16)})
    return {'epoch': 199, 'global_step': 1000, 'state_dict': state, 'optimizer_states': [], 'hyper_parameters': {}}


def _as_stored_in_lseg(state: dict) -> dict:
    """CLIP entries in LSeg's dtypes: attention/MLP projections (weights and biases) and text_projection in
    float16, embeddings and LayerNorms in float32. Keys with or without the 'net.clip_pretrained.' prefix."""
    def stored_half(key: str) -> bool:
        return ('transformer.resblocks.' in key and '.ln_' not in key) or key.endswith('text_projection')
    return {k: v.half() if stored_half(k) else v for k, v in state.items()}


def _load_tiny(checkpoint: dict | str | Path) -> tuple[LSegFeatureExtractor, ClipTextEncoder]:
    return load_lseg_checkpoint(checkpoint, config=LSegConfig.tiny(), text_config=ClipTextConfig.tiny())


# ------------------------------------------------------------------------------------------------ image features
def test_tiny_forward_shapes_and_dtype(tiny_extractor: LSegFeatureExtractor) -> None:
    with torch.no_grad():
        square = tiny_extractor(torch.rand(2, 3, 64, 64) * 2 - 1)
        wide = tiny_extractor(torch.rand(1, 3, 64, 96) * 2 - 1)
    assert square.shape == (2, 32, 32, 32) and square.dtype == torch.float32
    assert wide.shape == (1, 32, 32, 48)
    assert torch.isfinite(square).all() and torch.isfinite(wide).all()


@pytest.mark.parametrize('shape', [(1, 3, 48, 64), (1, 3, 64, 80), (1, 1, 64, 64), (3, 64, 64)])
def test_rejects_bad_image_shapes(tiny_extractor: LSegFeatureExtractor, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        tiny_extractor(torch.zeros(shape))


def test_batch_items_are_independent(tiny_extractor: LSegFeatureExtractor) -> None:
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        both = tiny_extractor(images)
        second = tiny_extractor(images[1:])
    torch.testing.assert_close(both[1:], second, rtol=1e-5, atol=1e-6)


@needs_reference
def test_official_layout_matches_manifest() -> None:
    """Full-size networks (on the meta device) have exactly the manifest's LSeg names and shapes, apart from the
    documented unused entries, which all exist in the manifest."""
    with torch.device('meta'):
        extractor = LSegFeatureExtractor(LSegConfig())
        text_encoder = ClipTextEncoder(ClipTextConfig())
    manifest = {name[len(LSM_LSEG_PREFIX):]: shape for name, shape, _, _ in read_manifest(REFERENCE)
                if name.startswith(LSM_LSEG_PREFIX)}
    ours = {k: tuple(v.shape) for k, v in extractor.state_dict().items()}
    ours.update((CLIP_PREFIX + k, tuple(v.shape)) for k, v in text_encoder.state_dict().items())
    used = {k: v for k, v in manifest.items() if not k.startswith(UNUSED_OFFICIAL_PREFIXES)}
    assert ours == used
    for prefix in UNUSED_OFFICIAL_PREFIXES:
        assert any(k.startswith(prefix) for k in manifest), prefix


def _direct_bilinear(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Slow bilinear resampling with half-pixel centres (align_corners=False), no antialiasing: (g, g, C)."""
    in_h, in_w, channels = grid.shape
    out = np.zeros((out_h, out_w, channels))

    def taps(index: int, size_in: int, size_out: int) -> tuple[int, int, float]:
        source = max((index + 0.5) * size_in / size_out - 0.5, 0.0)
        low = min(int(math.floor(source)), size_in - 1)
        return low, min(low + 1, size_in - 1), source - low

    for y in range(out_h):
        y0, y1, wy = taps(y, in_h, out_h)
        for x in range(out_w):
            x0, x1, wx = taps(x, in_w, out_w)
            out[y, x] = ((1 - wy) * ((1 - wx) * grid[y0, x0] + wx * grid[y0, x1])
                         + wy * ((1 - wx) * grid[y1, x0] + wx * grid[y1, x1]))
    return out


@pytest.mark.parametrize('grid_hw', [(5, 5), (3, 7), (8, 4), (16, 16)])
def test_position_embedding_resampling_matches_direct_bilinear(grid_hw: tuple[int, int]) -> None:
    torch.manual_seed(2)
    pos_embed = torch.randn(1, 1 + 5 * 5, 3)
    resampled = resample_position_embedding(pos_embed, grid_hw)
    assert resampled.shape == (1, 1 + grid_hw[0] * grid_hw[1], 3)
    assert torch.equal(resampled[:, 0], pos_embed[:, 0])
    expected = _direct_bilinear(pos_embed[0, 1:].reshape(5, 5, 3).double().numpy(), *grid_hw)
    np.testing.assert_allclose(resampled[0, 1:].numpy(), expected.reshape(-1, 3), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ labels
def test_logit_scale_is_lsegs_float32_constant() -> None:
    assert LSEG_LOGIT_SCALE == float(np.exp(np.float32(np.log(1 / 0.07)), dtype=np.float32))
    if REFERENCE is not None:
        with np.load(REFERENCE / 'lseg.npz') as reference:
            assert np.float32(LSEG_LOGIT_SCALE) == reference['logit_scale']


def test_decode_labels_matches_direct_reference() -> None:
    torch.manual_seed(3)
    features = torch.randn(2, 32, 4, 5) * 3
    text = torch.randn(6, 32)
    text = (text / text.norm(dim=-1, keepdim=True)).half()
    logits = decode_labels(features, text)
    assert logits.shape == (2, 6, 4, 5) and logits.dtype == torch.float32
    expected = torch.empty(2, 6, 4, 5, dtype=torch.float64)
    for b in range(2):
        for y in range(4):
            for x in range(5):
                pixel = features[b, :, y, x]
                unit = (pixel / pixel.norm()).half()
                scaled = (unit.float() * LSEG_LOGIT_SCALE).half()  # the product rounded to float16
                expected[b, :, y, x] = text.double() @ scaled.double()
    # float16 products: within one float16 rounding step of the exact dot product (|logit| <= 14.3)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-3, atol=4e-3)
    with pytest.raises(ValueError):
        decode_labels(features, text[:, :16])


def test_upsample_logits_is_bilinear_with_aligned_corners() -> None:
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing='ij')
    ramp = (0.5 * rows - 2.0 * cols)[None, None].expand(1, 2, 4, 6)
    upsampled = upsample_logits(ramp)
    assert upsampled.shape == (1, 2, 8, 12)
    out_rows, out_cols = torch.meshgrid(torch.arange(8.0), torch.arange(12.0), indexing='ij')
    expected = 0.5 * out_rows * 3 / 7 - 2.0 * out_cols * 5 / 11  # a linear ramp is reproduced exactly
    torch.testing.assert_close(upsampled[0, 1], expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ loader
def test_loader_round_trip(tiny_extractor: LSegFeatureExtractor, tiny_text_encoder: ClipTextEncoder,
                           tmp_path: Path) -> None:
    checkpoint = _official_checkpoint(tiny_extractor, tiny_text_encoder)
    checkpoint['state_dict'] = _as_stored_in_lseg(checkpoint['state_dict'])
    path = tmp_path / 'demo_e200.ckpt'
    torch.save(checkpoint, path)
    extractor, text_encoder = _load_tiny(path)
    assert not extractor.training and not text_encoder.training
    assert text_encoder.text_projection.dtype == torch.float16 == text_encoder.compute_dtype
    assert text_encoder.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.float16
    assert text_encoder.transformer.resblocks[0].attn.in_proj_bias.dtype == torch.float16
    assert text_encoder.token_embedding.weight.dtype == torch.float32
    assert text_encoder.ln_final.weight.dtype == torch.float32
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(extractor(images), tiny_extractor(images), rtol=0, atol=0)
        features = text_encoder.encode_normalized(LABELS[:3])
    assert features.dtype == torch.float16 and features.shape == (3, 32)


def test_loader_accepts_a_loaded_dict(tiny_extractor: LSegFeatureExtractor,
                                      tiny_text_encoder: ClipTextEncoder) -> None:
    extractor, text_encoder = _load_tiny(_official_checkpoint(tiny_extractor, tiny_text_encoder))
    assert isinstance(extractor, LSegFeatureExtractor) and isinstance(text_encoder, ClipTextEncoder)
    loaded, source = extractor.state_dict(), tiny_extractor.state_dict()
    assert loaded.keys() == source.keys()
    for key, value in source.items():
        assert torch.equal(loaded[key], value), key


def test_loader_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match='not found'):
        _load_tiny(tmp_path / 'absent.ckpt')


def test_loader_refuses_code_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / 'unsafe.ckpt'
    torch.save({'state_dict': {}, 'hyper_parameters': _NotAllowed()}, path)
    with pytest.raises(CheckpointError, match='refused'):
        _load_tiny(path)


class _NotAllowed:
    """A global that weights_only loading must refuse."""


def test_loader_without_state_dict() -> None:
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        _load_tiny({'model': {}})


@pytest.mark.parametrize('change, message', [
    ('missing', r'1 missing keys: scratch\.head1\.bias'),
    ('missing_clip', r'1 missing keys: clip_pretrained\.ln_final\.weight'),
    ('unexpected', r'1 unexpected keys: scratch\.extra\.weight'),
    ('shape', r'1 shape mismatches: pretrained\.model\.pos_embed: checkpoint \(1, 10, 32\)'),
    ('clip_shape', r'shape mismatches: clip_pretrained\.text_projection: checkpoint \(32, 8\)'),
    ('not_tensor', r'pretrained\.model\.cls_token: \w+ +where the model has torch\.float32'),
])
def test_loader_reports_mismatches(tiny_extractor: LSegFeatureExtractor, tiny_text_encoder: ClipTextEncoder,
                                   change: str, message: str) -> None:
    checkpoint = _official_checkpoint(tiny_extractor, tiny_text_encoder)
    state = checkpoint['state_dict']
    if change == 'missing':
        del state['net.scratch.head1.bias']
    elif change == 'missing_clip':
        del state['net.clip_pretrained.ln_final.weight']
    elif change == 'unexpected':
        state['net.scratch.extra.weight'] = torch.zeros(1)
    elif change == 'shape':
        state['net.pretrained.model.pos_embed'] = torch.zeros(1, 10, 32)
    elif change == 'clip_shape':
        state['net.clip_pretrained.text_projection'] = torch.zeros(32, 8)
    else:
        state['net.pretrained.model.cls_token'] = [0.0]
    with pytest.raises(CheckpointError, match=message):
        _load_tiny(checkpoint)


# ------------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_edge_cases(tiny_text_encoder: ClipTextEncoder) -> None:
    tokenize = tiny_text_encoder.tokenize
    empty = tokenize([''])
    assert empty.shape == (1, 77) and empty.dtype == torch.int64
    assert empty[0, :3].tolist() == [SOT, EOT, 0] and not empty[0, 2:].any()
    assert torch.equal(tokenize('wall'), tokenize(['wall']))
    assert torch.equal(tokenize(['  WALL \n\t ']), tokenize(['wall']))  # case and whitespace
    assert torch.equal(tokenize(['dining   Table']), tokenize(['dining table']))
    assert torch.equal(tokenize(['salt &amp; pepper']), tokenize(['salt & pepper']))  # HTML entities
    assert torch.equal(tokenize(['cafÃ©']), tokenize(['café']))  # ftfy repairs mojibake
    assert not torch.equal(tokenize(['wall!']), tokenize(['wall']))  # punctuation is kept
    assert (tokenize(['café']) > 0).sum() > 2
    assert tokenize([]).shape == (0, 77)


def test_tokenizer_length_limit(tiny_text_encoder: ClipTextEncoder) -> None:
    longest = tiny_text_encoder.tokenize(['a ' * 75])  # 75 tokens + start + end = 77
    assert longest[0, 0] == SOT and longest[0, 76] == EOT and (longest[0, 1:76] == longest[0, 1]).all()
    with pytest.raises(ValueError, match='78 tokens'):
        tiny_text_encoder.tokenize(['wall', 'a ' * 76])


def test_tokenizer_rejects_bad_phrases(tiny_text_encoder: ClipTextEncoder) -> None:
    with pytest.raises(TypeError):
        tiny_text_encoder.tokenize([3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match='marker'):
        tiny_text_encoder.tokenize(['a <end_of_text> b'])


@needs_reference
def test_tokenizer_matches_reference_tokens(tiny_text_encoder: ClipTextEncoder) -> None:
    with np.load(REFERENCE / 'lseg.npz') as reference:
        expected = reference['text_tokens']
    assert np.array_equal(tiny_text_encoder.tokenize(LABELS).numpy(), expected.astype(np.int64))


# ------------------------------------------------------------------------------------------------ text encoder
def test_text_encoder_matches_open_clip(tiny_text_encoder: ClipTextEncoder) -> None:
    """An independent implementation (open_clip's text tower, QuickGELU) with the same fp32 weights."""
    import lsm_ros.compat  # noqa: F401  (torchvision on CPU torch)
    from open_clip.transformer import QuickGELU, TextTransformer
    config = tiny_text_encoder.config
    tower = TextTransformer(context_length=config.context_length, vocab_size=config.vocab_size, width=config.width,
                            heads=config.heads, layers=config.layers, output_dim=config.embed_dim,
                            act_layer=QuickGELU).eval()
    tower.load_state_dict(tiny_text_encoder.state_dict(), strict=True)
    tokens = tiny_text_encoder.tokenize(LABELS + ['a photo of a dining table', ''])
    with torch.no_grad():
        ours = tiny_text_encoder.encode(tokens)
        theirs = tower(tokens)
    assert ours.shape == (10, config.embed_dim) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_causal_mask_and_end_token_pooling(tiny_text_encoder: ClipTextEncoder) -> None:
    tokens = tiny_text_encoder.tokenize(['wall', 'a dining table'])
    padded = tokens.clone()
    for row in range(2):  # any ids after the end token (smaller than it) must not matter
        end = int(tokens[row].argmax())
        padded[row, end + 1:] = torch.randint(1, EOT, (77 - end - 1,))
    changed_before_end = tokens.clone()
    changed_before_end[1, 2] = 1000
    with torch.no_grad():
        reference = tiny_text_encoder.encode(tokens)
        torch.testing.assert_close(tiny_text_encoder.encode(padded), reference, rtol=0, atol=1e-6)
        assert not torch.allclose(tiny_text_encoder.encode(changed_before_end)[1], reference[1])
        torch.testing.assert_close(tiny_text_encoder.encode(changed_before_end)[0], reference[0], rtol=0, atol=1e-6)


def test_float16_encoder_and_normalisation(tiny_text_encoder: ClipTextEncoder) -> None:
    """Weights stored as in LSeg's checkpoint (projections in float16): float16 features close to fp32 ones,
    LayerNorms in float32, unit norm computed in float16."""
    half = ClipTextEncoder(tiny_text_encoder.config).eval()
    half.load_state_dict(_as_stored_in_lseg(tiny_text_encoder.state_dict()), assign=True)
    assert half.compute_dtype == torch.float16 and half.ln_final.weight.dtype == torch.float32
    tokens = half.tokenize(LABELS)
    with torch.no_grad():
        features = half.encode(tokens)
        normalized = half.encode_normalized(LABELS)
        full = tiny_text_encoder.encode(tokens)
    assert features.dtype == normalized.dtype == torch.float16
    torch.testing.assert_close(features.float(), full, rtol=0, atol=2e-2 * full.abs().max().item())
    assert torch.equal(normalized, features / features.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(normalized.float().norm(dim=-1), torch.ones(8), rtol=0, atol=2e-3)
    with pytest.raises(ValueError):
        half.encode(tokens[:, :10])


def test_tokenizer_is_loaded_once() -> None:
    assert bpe_tokenizer() is bpe_tokenizer()
