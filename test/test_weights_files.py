"""Weight files on disk: ``weights convert`` (safetensors that load without pickle and give bit-identical outputs),
the safetensors reader and writer, ``weights check``, and the refusal of pickles that would run code, for every
loader and command. Tiny networks of the real structure stand in for the official files (same layouts)."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import safetensors.torch
import torch
from conftest import SMALL_DUST3R_STRING, official_dust3r_checkpoint

from lsm_ros import cli, weights
from lsm_ros.config import PipelineConfig
from lsm_ros.model.checkpoint import (EXTRA_KEY, KIND_KEY, CheckpointError, is_safetensors_file,
                                      load_checkpoint_file, load_dust3r_checkpoint, load_safetensors_file,
                                      parse_constructor_string, read_safetensors_header, save_safetensors_file)
from lsm_ros.model.dust3r import Dust3rConfig, Dust3rNet
from lsm_ros.model.lseg import load_lseg_checkpoint
from lsm_ros.model.lsm import _PTV3_CONFIG_KEYS, LargeSpatialModel, _our_lsm_key_to_official, lsm_config_from_checkpoint
from lsm_ros.pipeline import Reconstructor
from lsm_ros.weights import OFFICIAL_WEIGHTS, check_weights, convert_checkpoint, convert_weights, format_check_table

DUST3R, LSEG, LSM = (entry.filename for entry in OFFICIAL_WEIGHTS)
# SMALL_DUST3R_STRING is not the tiny LSM's DUSt3R: files with it need the network config given, except in the
# pipeline test, which builds this one
SIZE = 32  # image side: a multiple of LSeg's 32, small for speed


def write_official_files(model: LargeSpatialModel, directory: Path) -> dict[str, Path]:
    """The model saved as the three official files, under their names, with the official layouts and the
    extras the real ones carry (training args and state, unused entries, CLIP projections in float16, aliases)."""
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint = official_dust3r_checkpoint(model.dust3r, SMALL_DUST3R_STRING, lr=1e-4, batch_size=4)
    dust3r = checkpoint['model']  # with the layer_rn aliases (shared storage)
    torch.save({**checkpoint, 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 89}, directory / DUST3R)
    def stored_half(key: str) -> bool:  # LSeg's CLIP: projections in float16, embeddings and norms in float32
        return ('transformer.resblocks.' in key and '.ln_' not in key) or key.endswith('text_projection')

    lseg = {'net.' + k: v for k, v in model.lseg.state_dict().items()}
    lseg.update({'net.clip_pretrained.' + k: v.half() if stored_half(k) else v
                 for k, v in model.text_encoder.state_dict().items()})
    lseg.update({'net.clip_pretrained.visual.conv1.weight': torch.ones(4, 3, 2, 2, dtype=torch.float16),
                 'other.step': torch.tensor(7)})
    torch.save({'state_dict': lseg, 'epoch': 199, 'hyper_parameters': {'backbone': 'clip_vitl16_384',
                                                                      'base_lr': 0.004, 'widehead': True},
                'optimizer_states': [{'state': {}}]}, directory / LSEG)
    own = {_our_lsm_key_to_official(k): v for k, v in model.state_dict().items()
           if not k.startswith(('dust3r.', 'lseg.', 'text_encoder.'))}
    own.update({'dust3r.dust3r.' + k: v for k, v in dust3r.items() if k != 'mask_token'})
    ptv3 = model.config.ptv3
    ptv3_config = {k: list(v) if isinstance(v, tuple) else v
                   for k, v in ((k, getattr(ptv3, 'strides' if k == 'stride' else k)) for k in _PTV3_CONFIG_KEYS)}
    config = {'dust3r_config': {'freeze': 'encoder', 'pretrained_model_name_or_path': f'checkpoints/{DUST3R}'},
              'lseg_config': {'pretrained_model_name_or_path': f'checkpoints/{LSEG}', 'half_res': True},
              'point_transformer_config': ptv3_config,
              'gaussian_head_config': {'rgb_residual': True, 'feat_residual': False, 'd_gs_feats': 64}}
    torch.save({'args': argparse.Namespace(model=f'LSM_Dust3R(config={config!r})'), 'model': own, 'epoch': 1},
               directory / LSM)
    return {'dust3r': directory / DUST3R, 'lseg': directory / LSEG, 'lsm': directory / LSM}


@pytest.fixture(scope='module')
def files(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The official files in official/, their conversions (made together) in converted/."""
    root = tmp_path_factory.mktemp('weights')
    official = write_official_files(tiny_model, root / 'official')
    converted = convert_weights(root / 'converted', **{k: str(v) for k, v in official.items()})
    return {**official, **{f'{result.kind}_st': result.path for result in converted}}


def images() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return (torch.rand(1, 3, SIZE, SIZE, generator=generator) * 2 - 1,
            torch.rand(1, 3, SIZE, SIZE, generator=generator) * 2 - 1)


def assert_same_tensors(expected: dict, actual: dict) -> None:
    assert set(expected) == set(actual)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key


# ------------------------------------------------------------------------------------------------ convert
def test_conversions_hold_the_same_tensors_and_load_without_pickle(files, monkeypatch) -> None:
    assert [files[f'{kind}_st'].name for kind in ('dust3r', 'lseg', 'lsm')] == [
        'DUSt3R_ViTLarge_BaseDecoder_512_dpt.safetensors', 'demo_e200.safetensors', 'checkpoint-final.safetensors']
    official = {kind: load_checkpoint_file(files[kind]) for kind in ('dust3r', 'lseg', 'lsm')}

    def no_pickle(*args: Any, **kwargs: Any) -> None:
        raise AssertionError('torch.load (pickle) used for a safetensors file')

    monkeypatch.setattr(torch, 'load', no_pickle)
    for mmap in (False, True):
        converted = {kind: load_checkpoint_file(files[f'{kind}_st'], mmap=mmap) for kind in ('dust3r', 'lseg', 'lsm')}
        assert_same_tensors(official['dust3r']['model'], converted['dust3r']['model'])
        assert_same_tensors(official['lseg']['state_dict'], converted['lseg']['state_dict'])
        assert_same_tensors(official['lsm']['model'], converted['lsm']['model'])
        assert converted['dust3r']['args'] == {'model': SMALL_DUST3R_STRING, 'lr': 1e-4, 'batch_size': 4}
        assert converted['lseg']['hyper_parameters'] == official['lseg']['hyper_parameters']
        assert 'optimizer' not in converted['dust3r'] and 'optimizer_states' not in converted['lseg']
    # converted together: the LSM file names the converted companions, the rest of its config is unchanged
    names = lsm_config_from_checkpoint(converted['lsm'], None)
    original = lsm_config_from_checkpoint(official['lsm'], None)
    assert names['dust3r_config'] == {
        'freeze': 'encoder', 'pretrained_model_name_or_path': 'DUSt3R_ViTLarge_BaseDecoder_512_dpt.safetensors'}
    assert names['lseg_config']['pretrained_model_name_or_path'] == 'demo_e200.safetensors'
    assert names['point_transformer_config'] == original['point_transformer_config']


def test_lsm_outputs_are_bit_identical(tiny_model, files) -> None:
    """Official files vs their conversions, found through the converted LSM file's companion names."""
    config = tiny_model.config
    reference = LargeSpatialModel.from_official_checkpoints(dust3r=files['dust3r'], lseg=files['lseg'],
                                                            lsm=files['lsm'], config=config)
    converted = LargeSpatialModel.from_official_checkpoints(lsm=files['lsm_st'], config=config)
    assert_same_tensors(reference.state_dict(), converted.state_dict())
    img1, img2 = images()
    expected, actual = reference(img1, img2), converted(img1, img2)
    for stage in expected:
        for key in expected[stage]:
            assert torch.equal(expected[stage][key], actual[stage][key]), (stage, key)
    phrases = ['wall', 'chair']
    assert torch.equal(reference.text_features(phrases), converted.text_features(phrases))


def test_lseg_keeps_its_float16_entries(tiny_model, files) -> None:
    config = tiny_model.config
    (pth_image, pth_text), (st_image, st_text) = (
        load_lseg_checkpoint(files[key], config=config.lseg, text_config=config.clip) for key in ('lseg', 'lseg_st'))
    assert st_text.text_projection.dtype == torch.float16
    assert_same_tensors(pth_text.state_dict(), st_text.state_dict())
    image = images()[0]
    with torch.no_grad():
        assert torch.equal(pth_image(image), st_image(image))


def test_pipeline_accepts_a_converted_dust3r_file(tmp_path) -> None:
    """Reconstructor.from_checkpoints with config paths (the network read from the file's args): geometry of the
    .pth and of its conversion."""
    torch.manual_seed(4)
    net = Dust3rNet(Dust3rConfig.from_constructor_kwargs(parse_constructor_string(SMALL_DUST3R_STRING)[1]))
    torch.save(official_dust3r_checkpoint(net, SMALL_DUST3R_STRING), tmp_path / DUST3R)
    (converted,) = convert_weights(tmp_path, dust3r=tmp_path / DUST3R)
    img1, img2 = images()
    outputs = []
    for path in (tmp_path / DUST3R, converted.path):
        reconstructor = Reconstructor.from_checkpoints(config=PipelineConfig(dust3r_checkpoint=str(path),
                                                                             device='cpu'))
        assert not reconstructor.semantic and reconstructor.weights == str(path)
        assert_same_tensors(net.state_dict(), reconstructor.network.state_dict())
        with torch.no_grad():
            outputs.append(reconstructor.network(img1, img2))
    for key in outputs[0]:
        assert torch.equal(outputs[0][key], outputs[1][key]), key


def test_companions_are_found_as_safetensors_next_to_the_lsm_file(tiny_model, files, tmp_path) -> None:
    """The official LSM file beside converted companions only: they are found by their .safetensors name."""
    shutil.copy(files['lsm'], tmp_path / LSM)
    for key in ('dust3r_st', 'lseg_st'):
        shutil.copy(files[key], tmp_path / files[key].name)
    loaded = LargeSpatialModel.from_official_checkpoints(lsm=tmp_path / LSM, config=tiny_model.config)
    assert torch.equal(loaded.dust3r.enc_norm.weight, tiny_model.dust3r.enc_norm.weight)
    # an LSM file converted alone keeps the names of the official companions
    (result,) = convert_weights(tmp_path / 'alone', lsm=files['lsm'])
    names = lsm_config_from_checkpoint(load_checkpoint_file(result.path), None)
    assert names['dust3r_config']['pretrained_model_name_or_path'] == f'checkpoints/{DUST3R}'


def test_convert_refuses_wrong_inputs(files, tmp_path, capsys) -> None:
    with pytest.raises(CheckpointError, match='demo_e200.ckpt is a lseg checkpoint, expected a dust3r checkpoint'):
        convert_checkpoint(files['lseg'], 'dust3r', tmp_path)
    with pytest.raises(weights.WeightsError, match='already a safetensors file'):
        convert_checkpoint(files['dust3r_st'], 'dust3r', tmp_path)
    with pytest.raises(weights.WeightsError, match='nothing to convert'):
        convert_weights(tmp_path)
    with pytest.raises(SystemExit, match='weights convert: .*is a dust3r checkpoint, expected a lsm checkpoint'):
        cli.main(['weights', 'convert', '--lsm', str(files['dust3r']), '--out', str(tmp_path)])
    assert list(tmp_path.iterdir()) == []
    assert cli.main(['weights', 'convert', '--dust3r', str(files['dust3r']), '--out', str(tmp_path / 'o')]) == 0
    assert 'DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth -> ' in capsys.readouterr().out
    assert is_safetensors_file(tmp_path / 'o' / 'DUSt3R_ViTLarge_BaseDecoder_512_dpt.safetensors')


# ------------------------------------------------------------------------------------------------ safetensors format
TENSORS = {'f32': torch.randn(3, 4), 'i64': torch.arange(5), 'bf16': torch.randn(2, dtype=torch.bfloat16),
           'f16': torch.randn(7, dtype=torch.float16), 'bool': torch.tensor([True, False, True]),
           'scalar': torch.tensor(2.5, dtype=torch.float64), 'empty': torch.zeros(0, 3), 'u8': torch.arange(3).byte()}


def test_writer_and_reader_agree_with_the_safetensors_library(tmp_path) -> None:
    save_safetensors_file(tmp_path / 'ours.safetensors', TENSORS, {'k': 'v'})
    assert_same_tensors(TENSORS, safetensors.torch.load_file(tmp_path / 'ours.safetensors'))
    with safetensors.safe_open(tmp_path / 'ours.safetensors', 'pt') as f:
        assert f.metadata() == {'k': 'v'}
    safetensors.torch.save_file(TENSORS, tmp_path / 'theirs.safetensors', metadata={'a': 'b'})
    for mmap in (True, False):
        tensors, metadata = load_safetensors_file(tmp_path / 'theirs.safetensors', mmap=mmap)
        assert_same_tensors(TENSORS, tensors) and metadata == {'a': 'b'}
    # a plain safetensors state dict (no lsm_ros metadata) loads as a plain dict
    assert_same_tensors(TENSORS, load_checkpoint_file(tmp_path / 'theirs.safetensors'))
    # memory-mapped tensors are private: writing to them never changes the file
    tensors, _ = load_safetensors_file(tmp_path / 'ours.safetensors', mmap=True)
    tensors['f32'].zero_()
    assert torch.equal(load_safetensors_file(tmp_path / 'ours.safetensors')[0]['f32'], TENSORS['f32'])


def _raw_safetensors(path: Path, header: dict, data: bytes, pad: bool = True) -> Path:
    encoded = json.dumps(header).encode()
    if pad:
        encoded += b' ' * (-len(encoded) % 8)
    path.write_bytes(struct.pack('<Q', len(encoded)) + encoded + data)
    return path


def test_unaligned_tensors_are_read_correctly(tmp_path) -> None:
    values = torch.tensor([1.5, -2.0, 3.25])
    data = b'\x07\x00' + values.numpy().tobytes()
    path = _raw_safetensors(tmp_path / 'odd.safetensors', {
        'a': {'dtype': 'I16', 'shape': [1], 'data_offsets': [0, 2]},
        'b': {'dtype': 'F32', 'shape': [3], 'data_offsets': [2, 14]}}, data)
    for mmap in (True, False):
        tensors, _ = load_safetensors_file(path, mmap=mmap)
        assert torch.equal(tensors['b'], values) and tensors['a'].item() == 7


GOOD_ENTRY = {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]}


@pytest.mark.parametrize('header, data, message', [
    ({'w': {**GOOD_ENTRY, 'dtype': 'F31'}}, bytes(8), "unsupported dtype 'F31'"),
    ({'w': {**GOOD_ENTRY, 'shape': [3]}}, bytes(8), '8 bytes for shape'),
    ({'w': {**GOOD_ENTRY, 'data_offsets': [0, 16]}}, bytes(8), 'outside the 8 data bytes'),
    ({'w': {**GOOD_ENTRY, 'shape': [-2]}}, bytes(8), 'bad shape'),
    ({'w': GOOD_ENTRY, 'v': {**GOOD_ENTRY, 'data_offsets': [4, 12]}}, bytes(12), 'overlap'),
    ({'w': {**GOOD_ENTRY, 'extra': 1}}, bytes(8), 'exactly dtype, shape and data_offsets'),
    ({'__metadata__': {'a': 1}, 'w': GOOD_ENTRY}, bytes(8), 'must map strings to strings'),
    ({'__metadata__': {KIND_KEY: 'bert'}, 'w': GOOD_ENTRY}, bytes(8), "unknown lsm_ros.kind 'bert'"),
    ({'__metadata__': {KIND_KEY: 'lsm', EXTRA_KEY: '{bad'}, 'w': GOOD_ENTRY}, bytes(8), 'not valid JSON'),
    ({'__metadata__': {KIND_KEY: 'lsm', EXTRA_KEY: '{"model": 1}'}, 'w': GOOD_ENTRY}, bytes(8), "without 'model'"),
])
def test_malformed_safetensors_are_refused(tmp_path, header, data, message) -> None:
    path = _raw_safetensors(tmp_path / 'bad.safetensors', header, data)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint_file(path)


def test_bad_safetensors_headers_are_refused(tmp_path) -> None:
    lying = tmp_path / 'lying.safetensors'
    lying.write_bytes(struct.pack('<Q', 1 << 40) + b'{}')
    with pytest.raises(CheckpointError, match='extension but is not a safetensors file'):
        load_checkpoint_file(lying)
    with pytest.raises(CheckpointError, match='does not fit the file'):
        read_safetensors_header(lying)
    not_json = _raw_safetensors(tmp_path / 'nj.safetensors', {}, b'')
    not_json.write_bytes(struct.pack('<Q', 8) + b'{nope!!}')
    with pytest.raises(CheckpointError, match='not valid JSON'):
        load_checkpoint_file(not_json)


# ------------------------------------------------------------------------------------------------ check
def _with_hashes(paths: dict[str, Path], wrong: str = '') -> tuple:
    return tuple(dataclasses.replace(entry, size=paths[entry.key].stat().st_size,
                                     sha256=hashlib.sha256(b'other').hexdigest() if entry.key == wrong
                                     else weights.sha256_file(paths[entry.key]))
                 for entry in OFFICIAL_WEIGHTS)


def test_check_verifies_presence_size_hash_and_kind(tiny_model, files, tmp_path) -> None:
    folder = tmp_path / 'w'
    folder.mkdir()
    for key in ('dust3r', 'lseg', 'lsm', 'dust3r_st'):
        shutil.copy(files[key], folder / files[key].name)
    paths = {key: folder / files[key].name for key in ('dust3r', 'lseg', 'lsm')}
    rows = check_weights(folder, config=tiny_model.config)
    assert [(row.path.name, row.status, row.sha256, row.loads) for row in rows] == [
        (DUST3R, 'UNVERIFIED', 'unpublished', 'ok'), ('DUSt3R_ViTLarge_BaseDecoder_512_dpt.safetensors', 'ok', '-',
                                                      'ok'),
        (LSEG, 'UNVERIFIED', 'unpublished', 'ok'), (LSM, 'UNVERIFIED', 'unpublished', 'ok')]
    assert all(row.ok for row in rows)
    table = format_check_table(rows)
    assert f'SHA-256 of this copy: {weights.sha256_file(paths["lseg"])}' in table
    assert 'NOT verified against a published hash' in table and 'LSM (PTv3 and Gaussian head)' in table
    rows = check_weights(folder, files=_with_hashes(paths), config=tiny_model.config, only=['lseg', 'lsm'])
    assert [(row.status, row.size, row.sha256) for row in rows] == [('ok', 'ok', 'ok')] * 2
    (row,) = check_weights(folder, files=_with_hashes(paths, wrong='lsm'), config=tiny_model.config, only=['lsm'])
    assert row.status == 'FAIL' and row.sha256 == 'WRONG' and 'the published one is' in row.detail
    # the released shapes (no config; DUSt3R's from its args): the tiny networks' files do not match them
    rows = check_weights(folder, hashes=False)
    assert [row.loads for row in rows] == ['FAIL'] * 4
    assert 'does not match the DUSt3R network' in rows[0].detail and 'shape mismatches' in rows[0].detail
    assert 'does not match the LSeg network' in rows[2].detail and 'does not match the LSM network' in rows[3].detail


def test_check_names_missing_swapped_partial_and_converted_files(tiny_model, files, tmp_path) -> None:
    shutil.copy(files['lseg'], tmp_path / DUST3R)                 # the LSeg file under the DUSt3R name
    (tmp_path / f'{LSM}.part').write_bytes(b'partial')
    rows = check_weights(tmp_path, config=tiny_model.config, hashes=False)
    assert [row.status for row in rows] == ['FAIL', 'MISSING', 'MISSING'] and not any(row.ok for row in rows)
    assert 'is a LSeg checkpoint, expected the DUSt3R checkpoint' in rows[0].detail
    assert 'partial download checkpoint-final.pth.part present' in rows[2].detail
    assert '`lsm-ros weights fetch --only lseg` says how' in rows[1].detail
    shutil.copy(files['lseg_st'], tmp_path / files['lseg_st'].name)  # only the conversion of the LSeg file
    rows = check_weights(tmp_path, config=tiny_model.config, only=['lseg'])
    assert [(row.path.name, row.status, row.ok) for row in rows] == [(LSEG, 'converted', True),
                                                                      ('demo_e200.safetensors', 'ok', True)]


def test_cli_check_exit_codes(tiny_model, files, tmp_path, capsys, monkeypatch) -> None:
    assert cli.main(['weights', 'check', '--dir', str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert 'MISSING' in captured.out and 'weights check failed for' in captured.err
    for key in ('dust3r', 'lseg', 'lsm'):
        shutil.copy(files[key], tmp_path / files[key].name)
    real = weights.inspect_checkpoint
    monkeypatch.setattr(weights, 'inspect_checkpoint',
                        lambda path, kind, config=None: real(path, kind, tiny_model.config))
    assert cli.main(['weights', 'check', '--dir', str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count('UNVERIFIED') == 3 and f'weights in {tmp_path}' in out
    assert cli.main(['weights', 'check', '--dir', str(tmp_path), '--only', 'lsm']) == 0
    assert capsys.readouterr().out.count('UNVERIFIED') == 1
    assert cli.main(['weights', 'check', '--dir', str(tmp_path), '--no-hash']) == 0
    out = capsys.readouterr().out
    assert 'SHA-256 of this copy' not in out and out.count('SHA-256 not computed (--no-hash)') == 3


# ------------------------------------------------------------------------------------------------ pickle safety
class RunsShell:
    """Pickled, it asks the unpickler to call os.system (weights_only loading must refuse)."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple:
        return os.system, (f'touch {self.sentinel}',)


def write_code_running_checkpoint(path: Path, sentinel: Path, kind: str) -> Path:
    """A checkpoint of ``kind``'s layout whose unpickling would run ``touch sentinel``."""
    layouts = {'dust3r': {'args': RunsShell(sentinel), 'model': {}},
               'lseg': {'state_dict': {'net.w': torch.ones(1)}, 'hyper_parameters': RunsShell(sentinel)},
               'lsm': {'args': argparse.Namespace(model='LSM_Dust3R(config={})'), 'model': {'x': RunsShell(sentinel)}}}
    torch.save(layouts[kind], path)
    return path


def test_the_code_running_checkpoint_is_live(tmp_path) -> None:
    """Control: without weights_only the payload does run, so the refusals below are meaningful."""
    sentinel = tmp_path / 'ran'
    torch.load(write_code_running_checkpoint(tmp_path / 'x.pth', sentinel, 'dust3r'), weights_only=False)
    assert sentinel.exists()


REFUSERS: dict[str, tuple[str, Callable[[Path, dict, LargeSpatialModel, Path], Any]]] = {
    'dust3r loader': ('dust3r', lambda evil, files, model, out: load_dust3r_checkpoint(evil)),
    'lseg loader': ('lseg', lambda evil, files, model, out: load_lseg_checkpoint(evil)),
    'lsm loader, LSM file': ('lsm', lambda evil, files, model, out: LargeSpatialModel.from_official_checkpoints(
        lsm=evil, dust3r=files['dust3r'], lseg=files['lseg'], config=model.config)),
    'lsm loader, DUSt3R file': ('dust3r', lambda evil, files, model, out: LargeSpatialModel.from_official_checkpoints(
        lsm=files['lsm'], dust3r=evil, lseg=files['lseg'], config=model.config)),
    'lsm loader, LSeg file': ('lseg', lambda evil, files, model, out: LargeSpatialModel.from_official_checkpoints(
        lsm=files['lsm'], dust3r=files['dust3r'], lseg=evil, config=model.config)),
    'pipeline': ('dust3r', lambda evil, files, model, out: Reconstructor.from_checkpoints(dust3r=str(evil),
                                                                                         device='cpu')),
    'convert': ('lsm', lambda evil, files, model, out: convert_checkpoint(evil, 'lsm', out)),
    'check': ('lseg', lambda evil, files, model, out: weights.inspect_checkpoint(evil, 'lseg', model.config)),
}


@pytest.mark.parametrize('name', list(REFUSERS))
def test_code_in_a_checkpoint_is_refused_and_never_run(name, files, tiny_model, tmp_path) -> None:
    kind, load = REFUSERS[name]
    sentinel = tmp_path / 'ran'
    evil = write_code_running_checkpoint(tmp_path / 'evil.pth', sentinel, kind)
    with pytest.raises(CheckpointError, match=r"refused to load .*needs the global '(posix|os)\.system'"):
        load(evil, files, tiny_model, tmp_path / 'out')
    assert not sentinel.exists() and not (tmp_path / 'out').exists()


def test_check_and_cli_convert_refuse_code(files, tmp_path, capsys) -> None:
    sentinel = tmp_path / 'ran'
    folder = tmp_path / 'w'
    folder.mkdir()
    for kind in ('dust3r', 'lseg', 'lsm'):
        write_code_running_checkpoint(folder / files[kind].name, sentinel, kind)
    rows = check_weights(folder, hashes=False)
    assert [row.status for row in rows] == ['FAIL'] * 3 and all('refused to load' in row.detail for row in rows)
    assert cli.main(['weights', 'check', '--dir', str(folder)]) == 1
    with pytest.raises(SystemExit, match='refused to load'):
        cli.main(['weights', 'convert', '--lseg', str(folder / LSEG), '--out', str(tmp_path / 'out')])
    assert not sentinel.exists()


def test_metadata_of_a_safetensors_file_cannot_run_code(files, tiny_model, tmp_path) -> None:
    """The constructor string of a converted file goes through the same literal-only parser."""
    sentinel = tmp_path / 'ran'
    tensors, metadata = load_safetensors_file(files['lsm_st'])
    extra = json.loads(metadata[EXTRA_KEY])
    extra['args']['model'] = f"LSM_Dust3R(config=__import__('os').system('touch {sentinel}'))"
    save_safetensors_file(tmp_path / 'evil.safetensors', tensors, {**metadata, EXTRA_KEY: json.dumps(extra)})
    with pytest.raises(CheckpointError, match='refused Call'):
        LargeSpatialModel.from_official_checkpoints(lsm=tmp_path / 'evil.safetensors', dust3r=files['dust3r_st'],
                                                    lseg=files['lseg_st'], config=tiny_model.config)
    assert not sentinel.exists()


def test_installed_official_weights_are_found_and_used_by_the_cli(files, tmp_path, monkeypatch) -> None:
    """`lsm-ros weights fetch` installs into the default folder; the CLI then uses those files when no checkpoint
    option is given (the full LSM when all three are there, DUSt3R alone otherwise; conversions preferred)."""
    from lsm_ros.cli import build_reconstructor
    from lsm_ros.weights import WEIGHTS_ENV, installed_checkpoints
    folder = tmp_path / 'installed'
    folder.mkdir()
    monkeypatch.setenv(WEIGHTS_ENV, str(folder))
    assert installed_checkpoints() == {}
    shutil.copy(files['dust3r'], folder / DUST3R)
    assert installed_checkpoints() == {'dust3r_checkpoint': str(folder / DUST3R)}   # geometry only
    shutil.copy(files['lsm'], folder / LSM)
    assert installed_checkpoints() == {'dust3r_checkpoint': str(folder / DUST3R)}   # the LSM needs LSeg too
    shutil.copy(files['lseg'], folder / LSEG)
    assert installed_checkpoints() == {'dust3r_checkpoint': str(folder / DUST3R),
                                       'lseg_checkpoint': str(folder / LSEG), 'lsm_checkpoint': str(folder / LSM)}
    converted_lseg = folder / files['lseg_st'].name
    shutil.copy(files['lseg_st'], converted_lseg)
    assert installed_checkpoints()['lseg_checkpoint'] == str(converted_lseg)        # no pickle when possible

    # build_reconstructor hands them to Reconstructor.from_checkpoints (whose loading the tests above cover; these
    # tiny files need their model config, which the official constructor string cannot carry)
    loaded = []
    monkeypatch.setattr(Reconstructor, 'from_checkpoints', classmethod(lambda cls, **kw: loaded.append(kw) or 'model'))
    args = argparse.Namespace(dust3r_checkpoint='', lseg_checkpoint='', lsm_checkpoint='', device='cpu',
                              resolution=224, min_confidence=1.0, reference_weights=False)
    assert build_reconstructor(args, allow_untrained=False) == 'model'
    config = loaded[0]['config']
    assert (config.dust3r_checkpoint, config.lseg_checkpoint, config.lsm_checkpoint) == (
        str(folder / DUST3R), str(converted_lseg), str(folder / LSM))
    assert (config.device, config.resolution) == ('cpu', 224)
    args.lsm_checkpoint = str(files['lsm'])           # an explicit file wins over the installed ones
    build_reconstructor(args, allow_untrained=False)
    assert loaded[1]['config'].lsm_checkpoint == str(files['lsm']) and not loaded[1]['config'].lseg_checkpoint
