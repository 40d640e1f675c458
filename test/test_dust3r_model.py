"""Fast unit tests of the DUSt3R network, its post-processing and the safe checkpoint loader (tiny random nets)."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import official_dust3r_checkpoint

from lsm_ros.model import (CheckpointError, Dust3rConfig, Dust3rNet, load_checkpoint_file, load_dust3r_checkpoint,
                           parse_constructor_string)
from lsm_ros.model.checkpoint import ALIASES, map_official_state_dict, official_key_to_ours, our_key_to_official
from lsm_ros.model.dpt import dense_confidence, dense_points, postprocess
from lsm_ros.model.layers import Attention, PatchEmbed, RoPE2D

OFFICIAL_STRING = ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', "
                   "img_size=(512, 512), head_type='dpt', output_mode='pts3d', depth_mode=('exp', -inf, inf), "
                   "conf_mode=('exp', 1, inf), enc_embed_dim=1024, enc_depth=24, enc_num_heads=16, "
                   "dec_embed_dim=768, dec_depth=12, dec_num_heads=12)")
# a small network that an official constructor string can describe (standard DPT widths)
SMALL_STRING = ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', "
                "img_size=(64, 64), head_type='dpt', output_mode='pts3d', depth_mode=('exp', -inf, inf), "
                "conf_mode=('exp', 1, inf), enc_embed_dim=64, enc_depth=2, enc_num_heads=4, "
                "dec_embed_dim=32, dec_depth=2, dec_num_heads=2)")
LSM_STRING = ("LSM_Dust3R(config={'dust3r_config': {'freeze': 'encoder', 'pretrained_model_name_or_path': "
              "'/ckpt/dust3r.pth'}, 'point_transformer_config': {'cross_dust': True, 'enc_depths': [1, 1, 1, 3, 1], "
              "'enc_channels': [32, 64, 128, 256, 512]}, 'gaussian_head_config': {'rgb_residual': True, "
              "'d_gs_feats': 64}, 'lseg_config': {'pretrained_model_name_or_path': '/ckpt/lseg.ckpt', "
              "'half_res': True}, 'freeze_dust3r': False, 'freeze_lseg': True})")


@pytest.fixture(scope='module')
def tiny_net() -> Dust3rNet:
    torch.manual_seed(0)
    return Dust3rNet(Dust3rConfig.tiny()).eval()


def _images(batch: int = 1, height: int = 48, width: int = 80, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(2 * batch, 3, height, width, generator=generator) * 2 - 1
    return images[:batch], images[batch:]


# ------------------------------------------------------------------------------------------------ layers
def _rope_reference(tokens: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Direct 2-D RoPE: channel pair (j, j + D/4) of the y half (offset 0) and of the x half (offset D/2) is
    rotated by the angle pos * base ** (-2j / (D/2))."""
    out = tokens.double().clone()
    head_dim = tokens.shape[-1]
    half, quarter = head_dim // 2, head_dim // 4
    for b in range(tokens.shape[0]):
        for n in range(tokens.shape[2]):
            for axis, offset in ((0, 0), (1, half)):
                pos = float(positions[b, n, axis])
                for j in range(quarter):
                    angle = pos * base ** (-2.0 * j / half)
                    c, s = math.cos(angle), math.sin(angle)
                    first = tokens[b, :, n, offset + j].double()
                    second = tokens[b, :, n, offset + j + quarter].double()
                    out[b, :, n, offset + j] = first * c - second * s
                    out[b, :, n, offset + j + quarter] = second * c + first * s
    return out


def test_rope2d_matches_direct_rotation() -> None:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 3, 7, 16, generator=generator)
    positions = torch.randint(0, 20, (2, 7, 2), generator=generator)
    expected = _rope_reference(tokens, positions, 100.0)
    torch.testing.assert_close(RoPE2D(100.0)(tokens, positions).double(), expected, atol=1e-5, rtol=1e-5)


def test_rope2d_scores_depend_on_relative_position_only() -> None:
    generator = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 1, 1, 5, 8, generator=generator, dtype=torch.float64)
    pos_q, pos_k = torch.tensor([[[3, 5]] * 5]), torch.tensor([[[1, 9]] * 5])
    shift = torch.tensor([4, 7])
    rope = RoPE2D(100.0)
    scores = (rope(q, pos_q) * rope(k, pos_k)).sum(-1)
    shifted = (rope(q, pos_q + shift) * rope(k, pos_k + shift)).sum(-1)
    torch.testing.assert_close(scores, shifted)


def test_attention_matches_explicit_softmax() -> None:
    torch.manual_seed(0)
    attention = Attention(32, num_heads=4, rope=RoPE2D(100.0)).eval()
    x = torch.randn(2, 6, 32)
    positions = torch.randint(0, 4, (2, 6, 2))
    q, k, v = attention.qkv(x).reshape(2, 6, 3, 4, 8).permute(2, 0, 3, 1, 4)
    q, k = attention.rope(q, positions), attention.rope(k, positions)
    weights = F.softmax(q @ k.transpose(-2, -1) * 8 ** -0.5, dim=-1)
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(attention(x, positions), expected, atol=1e-6, rtol=1e-5)


def test_patch_embed_tokens_are_row_major() -> None:
    embed = PatchEmbed(patch_size=16, embed_dim=8)
    images = torch.zeros(1, 3, 48, 80)
    changed = images.clone()
    changed[:, :, 16:32, 64:80] = 1.0  # patch (row 1, column 4) of a 3 x 5 grid
    tokens, positions = embed(images)
    tokens_changed, _ = embed(changed)
    differs = (tokens != tokens_changed).any(-1)[0]
    assert differs.nonzero().flatten().tolist() == [1 * 5 + 4]
    assert positions.shape == (1, 15, 2)
    assert positions[0].tolist() == [[i // 5, i % 5] for i in range(15)]


def _uncached_tables(rope: RoPE2D, positions: torch.Tensor, channels: int, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    return RoPE2D._cos_sin(RoPE2D(rope.base), positions.clone(), channels, dtype)   # a fresh module and tensor


def test_rope2d_tables_are_cached_per_positions_tensor() -> None:
    rope = RoPE2D(100.0)
    positions = PatchEmbed(16, 8).patch_positions(3, 5, torch.device('cpu')).expand(2, -1, -1)
    tokens = torch.randn(2, 2, 15, 16, generator=torch.Generator().manual_seed(2))
    first = rope(tokens, positions)
    assert len(rope._tables) == 2                      # y and x halves
    cos, sin = rope._cos_sin(positions[..., 0], 8, torch.float32)
    again_cos, _ = rope._cos_sin(positions[..., 0], 8, torch.float32)
    assert again_cos is cos and len(rope._tables) == 2   # a new view of the same positions hits
    expected_cos, expected_sin = _uncached_tables(rope, positions[..., 0], 8, torch.float32)
    assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)
    assert torch.equal(rope(tokens, positions), first)
    half = rope._cos_sin(positions[..., 0], 8, torch.bfloat16)[0]
    assert half.dtype == torch.bfloat16 and len(rope._tables) == 3
    # other positions with equal shape miss; changing the cached positions in place invalidates its entry
    other = torch.randint(0, 9, (2, 15, 2), generator=torch.Generator().manual_seed(3))
    assert torch.equal(rope(tokens, other), RoPE2D(100.0)(tokens, other.clone()))
    base = positions.clone()
    rope(tokens, base)
    base.add_(1)
    assert torch.equal(rope(tokens, base), RoPE2D(100.0)(tokens, base.clone()))
    assert not torch.equal(rope(tokens, base), first)
    for _ in range(2 * RoPE2D.CACHE_ENTRIES):           # bounded
        rope(tokens, other.clone())
    assert len(rope._tables) == RoPE2D.CACHE_ENTRIES
    rope.to(torch.float64)                               # moving the module empties its cache
    assert len(rope._tables) == 0


def test_patch_embed_positions_are_one_tensor_per_grid(tiny_net: Dust3rNet) -> None:
    embed = tiny_net.patch_embed
    _, first = embed(torch.zeros(1, 3, 48, 80))
    _, second = embed(torch.zeros(3, 3, 48, 80))
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
    assert second.shape == (3, 15, 2) and torch.equal(second[2], first[0])
    _, other = embed(torch.zeros(1, 3, 32, 32))
    assert other.shape == (1, 4, 2) and other.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()


# ------------------------------------------------------------------------------------------------ network
def test_forward_shapes_and_keys(tiny_net: Dust3rNet) -> None:
    img1, img2 = _images(batch=2, height=48, width=80)
    with torch.no_grad():
        out = tiny_net(img1, img2)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        'pts3d_1': (2, 48, 80, 3), 'conf_1': (2, 48, 80), 'pts3d_2': (2, 48, 80, 3), 'conf_2': (2, 48, 80),
        'enc_feat': (2, 2 * 3 * 5, 64)}
    assert all(torch.isfinite(v).all() for v in out.values())
    assert (out['conf_1'] >= 1).all() and (out['conf_2'] >= 1).all()


def test_enc_feat_is_view1_then_view2(tiny_net: Dust3rNet) -> None:
    img1, img2 = _images(batch=1, height=32, width=64)
    with torch.no_grad():
        enc_feat = tiny_net(img1, img2)['enc_feat']
        tokens1, tokens2 = tiny_net.encode(img1).tokens, tiny_net.encode(img2).tokens
    torch.testing.assert_close(enc_feat[:, :8], tokens1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc_feat[:, 8:], tokens2, atol=1e-5, rtol=1e-5)


def test_views_are_not_interchangeable(tiny_net: Dust3rNet) -> None:
    img1, img2 = _images(batch=1, height=32, width=32)
    with torch.no_grad():
        forward, swapped = tiny_net(img1, img2), tiny_net(img2, img1)
    torch.testing.assert_close(forward['enc_feat'][:, :4], swapped['enc_feat'][:, 4:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(forward['pts3d_1'], swapped['pts3d_2'])  # different decoders and heads per view


@pytest.mark.parametrize('shape1, shape2', [((1, 3, 40, 64), (1, 3, 40, 64)),
                                            ((1, 3, 32, 50), (1, 3, 32, 50)),
                                            ((1, 3, 32, 64), (1, 3, 64, 32)),
                                            ((1, 1, 32, 32), (1, 1, 32, 32)),
                                            ((3, 32, 32), (3, 32, 32))])
def test_bad_image_shapes_raise(tiny_net: Dust3rNet, shape1: tuple, shape2: tuple) -> None:
    with pytest.raises(ValueError):
        tiny_net(torch.zeros(shape1), torch.zeros(shape2))


# ------------------------------------------------------------------------------------------------ post-processing
def test_depth_modes() -> None:
    xyz = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    direction = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 0.0]])
    inf = math.inf
    torch.testing.assert_close(dense_points(xyz, ('exp', -inf, inf)), direction * math.expm1(5.0))
    torch.testing.assert_close(dense_points(xyz, ('square', -inf, inf)), direction * 25.0)
    torch.testing.assert_close(dense_points(xyz, ('linear', -inf, inf)), xyz)
    with pytest.raises(ValueError):
        dense_points(xyz, ('exp', 0.0, inf))
    with pytest.raises(ValueError):
        dense_points(xyz, ('log', -inf, inf))


def test_confidence_modes() -> None:
    c = torch.tensor([-2.0, 0.0, 3.0])
    torch.testing.assert_close(dense_confidence(c, ('exp', 1.0, math.inf)), 1.0 + c.exp())
    torch.testing.assert_close(dense_confidence(c, ('exp', 1.0, 5.0)), 1.0 + c.exp().clamp(max=4.0))
    torch.testing.assert_close(dense_confidence(c, ('sigmoid', 0.5, 2.5)), 0.5 + 2.0 * torch.sigmoid(c))
    with pytest.raises(ValueError):
        dense_confidence(c, ('softplus', 1.0, math.inf))


def test_postprocess_layout() -> None:
    raw = torch.randn(2, 4, 5, 6)
    points, confidence = postprocess(raw, ('linear', -math.inf, math.inf), ('exp', 1.0, math.inf))
    torch.testing.assert_close(points, raw[:, :3].permute(0, 2, 3, 1))
    torch.testing.assert_close(confidence, 1.0 + raw[:, 3].exp())


# ------------------------------------------------------------------------------------------------ config
def test_config_from_official_string() -> None:
    name, kwargs = parse_constructor_string(OFFICIAL_STRING)
    assert name == 'AsymmetricCroCo3DStereo'
    assert kwargs['depth_mode'] == ('exp', -math.inf, math.inf) and kwargs['conf_mode'] == ('exp', 1, math.inf)
    assert Dust3rConfig.from_constructor_kwargs(kwargs) == Dust3rConfig()
    assert Dust3rConfig().head_hooks == (0, 6, 9, 12)


@pytest.mark.parametrize('override, message', [
    ({'pos_embed': 'cosine'}, 'pos_embed'),
    ({'head_type': 'linear'}, 'head_type'),
    ({'output_mode': 'pts3d+desc'}, 'output_mode'),
    ({'conf_mode': None}, 'conf_mode'),
    ({'depth_mode': ('exp', 0, math.inf)}, 'depth_mode'),
    ({'enc_num_heads': 7}, 'head dim'),
    ({'landscape_only': 'yes'}, 'landscape_only'),
    ({'norm_layer': 'LayerNorm'}, 'unknown'),
])
def test_config_rejects_unsupported(override: dict, message: str) -> None:
    kwargs = parse_constructor_string(OFFICIAL_STRING)[1] | override
    with pytest.raises(ValueError, match=message):
        Dust3rConfig.from_constructor_kwargs(kwargs)


# ------------------------------------------------------------------------------------------------ parser
def test_parse_lsm_string_with_nested_dict() -> None:
    name, kwargs = parse_constructor_string(LSM_STRING)
    assert name == 'LSM_Dust3R'
    config = kwargs['config']
    assert config['point_transformer_config']['enc_depths'] == [1, 1, 1, 3, 1]
    assert config['dust3r_config']['freeze'] == 'encoder'
    assert config['freeze_dust3r'] is False and config['lseg_config']['half_res'] is True


def test_parse_literals() -> None:
    _, kwargs = parse_constructor_string("C(a=-inf, b=+2.5, c=(1, -3, [nan]), d={1: None, 'x': (True,)}, e='s')")
    assert kwargs['a'] == -math.inf and kwargs['b'] == 2.5 and kwargs['e'] == 's'
    assert kwargs['c'][:2] == (1, -3) and math.isnan(kwargs['c'][2][0])
    assert kwargs['d'] == {1: None, 'x': (True,)}


@pytest.mark.parametrize('text', [
    "__import__('os').system('x')",
    "C(a=__import__('os').system('x'))",
    "C(a=os.path)",
    "C(a=lambda: 0)",
    "C(a=some_name)",
    "C(a=1 + 2)",
    "C(a=[i for i in range(3)])",
    "C(a=f'{1}')",
    "C(a=b'bytes')",
    "C(a=-'text')",
    "C(a={**other})",
    "C(**{'a': 1})",
    "C(1)",
    "C.attr(a=1)",
    "C(a=1",
    "42",
    "C(a=1); import os",
])
def test_parse_refuses_code(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    monkeypatch.setattr(os, 'system', lambda *a: calls.append(a))
    with pytest.raises(CheckpointError):
        parse_constructor_string(text)
    assert not calls


# ------------------------------------------------------------------------------------------------ safe file loading
class _Custom:
    pass


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_load_refuses_custom_class(tmp_path: Path) -> None:
    path = tmp_path / 'custom.pth'
    torch.save({'model': {}, 'extra': _Custom()}, path)
    with pytest.raises(CheckpointError, match='_Custom.*never executed'):
        load_checkpoint_file(path)


def test_load_refuses_reduce_to_os_system(tmp_path: Path) -> None:
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'args': _RunsShell(marker), 'model': {}}, path)
    with pytest.raises(CheckpointError, match='system'):
        load_checkpoint_file(path)
    with pytest.raises(CheckpointError):
        load_dust3r_checkpoint(path)
    assert not marker.exists()


def test_load_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match='not found'):
        load_checkpoint_file(tmp_path / 'absent.pth')
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'this is not a checkpoint' * 20)
    with pytest.raises(CheckpointError, match='not a readable PyTorch checkpoint'):
        load_checkpoint_file(garbage)


def test_load_accepts_namespace(tmp_path: Path) -> None:
    path = tmp_path / 'ok.pth'
    torch.save({'args': argparse.Namespace(model='X()'), 'model': {'w': torch.ones(2)}}, path)
    loaded = load_checkpoint_file(path)
    assert loaded['args'].model == 'X()' and torch.equal(loaded['model']['w'], torch.ones(2))


# ------------------------------------------------------------------------------------------------ key mapping
def test_key_mapping_table() -> None:
    pairs = {
        'enc_blocks.0.attn.qkv.weight': 'enc_blocks.0.attn.qkv.weight',
        'dec_blocks.3.cross_attn.projk.bias': 'dec_blocks1.3.cross_attn.projk.bias',
        'dec_blocks2.3.cross_attn.projk.bias': 'dec_blocks2.3.cross_attn.projk.bias',
        'downstream_head1.dpt.scratch.refinenet1.resConfUnit1.conv1.weight': 'head1.fusion.0.residual1.conv1.weight',
        'downstream_head2.dpt.scratch.refinenet4.out_conv.bias': 'head2.fusion.3.out_conv.bias',
        'downstream_head1.dpt.act_postprocess.0.1.weight': 'head1.reassemble.0.resample.weight',
        'downstream_head1.dpt.act_postprocess.3.0.bias': 'head1.reassemble.3.project.bias',
        'downstream_head2.dpt.scratch.layer3_rn.weight': 'head2.feature_convs.2.weight',
        'downstream_head1.dpt.head.4.weight': 'head1.output.conv3.weight',
    }
    for official, ours in pairs.items():
        assert official_key_to_ours(official) == ours
        assert our_key_to_official(ours) == official
    assert official_key_to_ours('mask_token') is None


def test_every_parameter_has_an_official_name(tiny_net: Dust3rNet) -> None:
    for key in tiny_net.state_dict():
        official = our_key_to_official(key)
        assert official is not None and official_key_to_ours(official) == key


def test_round_trip_through_official_file(tmp_path: Path) -> None:
    torch.manual_seed(3)
    config = Dust3rConfig.from_constructor_kwargs(parse_constructor_string(SMALL_STRING)[1])
    net = Dust3rNet(config).eval()
    checkpoint = official_dust3r_checkpoint(net, SMALL_STRING)
    assert set(ALIASES) <= set(checkpoint['model']) and 'mask_token' in checkpoint['model']
    path = tmp_path / 'small.pth'
    torch.save(checkpoint, path)
    loaded = load_dust3r_checkpoint(path)
    assert loaded.config == config and not loaded.training
    img1, img2 = _images(batch=1, height=32, width=48)
    with torch.no_grad():
        expected, actual = net(img1, img2), loaded(img1, img2)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_plain_state_dict_with_config(tiny_net: Dust3rNet) -> None:
    state = official_dust3r_checkpoint(tiny_net, 'unused')['model']
    loaded = load_dust3r_checkpoint(state, config=tiny_net.config)
    for key, value in tiny_net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_mismatch_messages(tiny_net: Dust3rNet) -> None:
    state = official_dust3r_checkpoint(tiny_net, 'unused')['model']
    del state['enc_norm.weight']
    state['dec_blocks.0.norm4.weight'] = torch.ones(32)
    state['something_else'] = torch.ones(1)
    state['decoder_embed.weight'] = torch.zeros(32, 63)
    with pytest.raises(CheckpointError) as info:
        load_dust3r_checkpoint(state, config=tiny_net.config)
    message = str(info.value)
    assert '1 missing keys: enc_norm.weight' in message
    assert '2 unexpected keys: something_else, dec_blocks.0.norm4.weight' in message
    assert '1 shape mismatches: decoder_embed.weight: checkpoint (32, 63) vs model (32, 64)' in message


def test_missing_keys_are_counted(tiny_net: Dust3rNet) -> None:
    state = {k: v for k, v in official_dust3r_checkpoint(tiny_net, 'unused')['model'].items()
             if not k.startswith('enc_blocks.')}
    with pytest.raises(CheckpointError, match=r'24 missing keys: enc_blocks\.0\.norm1\.weight, .*\(19 more\)'):
        load_dust3r_checkpoint(state, config=tiny_net.config)


def test_alias_must_equal_canonical(tiny_net: Dust3rNet) -> None:
    state = official_dust3r_checkpoint(tiny_net, 'unused')['model']
    alias = 'downstream_head2.dpt.scratch.layer_rn.1.weight'
    state[alias] = state[alias] + 1
    with pytest.raises(CheckpointError, match='alias'):
        map_official_state_dict(state)


@pytest.mark.parametrize('model_string, message', [
    (SMALL_STRING.replace('AsymmetricCroCo3DStereo', 'CroCoNet'), 'expected'),
    (SMALL_STRING.replace("'RoPE100'", "'cosine'"), 'pos_embed'),
    (SMALL_STRING.replace("img_size=(64, 64)", "img_size=__import__('os')"), 'refused'),
])
def test_checkpoint_args_are_validated(tiny_net: Dust3rNet, model_string: str, message: str) -> None:
    checkpoint = official_dust3r_checkpoint(tiny_net, model_string)
    with pytest.raises(CheckpointError, match=message):
        load_dust3r_checkpoint(checkpoint)
