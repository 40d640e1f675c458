"""Our implementation of the reference weight rule (used by the demo and --reference-weights) gives the very
tensors of the reference's own generator, gains and aliases included, in the official DUSt3R file layout."""
import sys

import pytest
import torch

from lsm_ros import reference_weights
from lsm_ros.model.checkpoint import map_official_state_dict

REFERENCE = reference_weights.find_reference_dir()
if REFERENCE is None:
    pytest.skip('reference folder ../shared/reference/lsm_vitl_256 not found', allow_module_level=True)
sys.path.insert(0, str(REFERENCE.parent))
import lsmref  # noqa: E402


def test_rule_matches_the_reference_generator_on_sampled_entries():
    config = lsmref.read_config(str(REFERENCE))
    gains = config['weight_rule_gains']
    rows = lsmref.read_manifest(str(REFERENCE))
    picked = [r for r in rows if r[0] in gains or r[3]] + rows[::97]  # gained, aliased, and a spread of others
    ours = reference_weights.generate_reference_state_dict(REFERENCE, tuple(r[0] for r in picked), progress=False)
    for name, shape, dtype, alias in picked:
        source = alias or name
        expected = lsmref.ref_tensor(source, shape, getattr(torch, dtype), config['base_seed'], gains.get(source))
        assert torch.equal(ours[name], expected), name
    assert any(r[0] in gains for r in picked) and any(r[3] for r in picked)


def test_reference_checkpoints_have_the_official_layouts(monkeypatch):
    # only keys and strings are checked here: generate placeholders, not the 4.4 GB of values
    from lsm_ros.model.lsm import LsmConfig, lsm_config_from_checkpoint
    monkeypatch.setattr(reference_weights, 'reference_tensor',
                        lambda name, shape, dtype, seed, gain=None: torch.empty(0))
    files = reference_weights.reference_checkpoints(REFERENCE, progress=False)
    assert files['dust3r']['args'].model.startswith('AsymmetricCroCo3DStereo(')
    mapped, unmapped = map_official_state_dict(files['dust3r']['model'])
    assert set(unmapped) <= {'mask_token'} and len(mapped) > 900
    assert all(k.startswith('net.') for k in files['lseg']['state_dict'])
    assert 'net.clip_pretrained.text_projection' in files['lseg']['state_dict']
    config = lsm_config_from_checkpoint(files['lsm'], None)
    assert LsmConfig.from_official(config) == LsmConfig()  # the released configuration
    assert not any(k.startswith(('dust3r', 'lseg_feature_extractor')) for k in files['lsm']['model'])
    assert 'gaussian_head.gaussian_proj.weight' in files['lsm']['model']


def test_threads_give_the_same_tensors_and_aliases_share_their_target():
    """workers > 1 (the CUDA parity test's fast path) generates the very same values; an alias whose target lies
    outside the prefixes gets the target's tensor."""
    prefixes = ('point_transformer.embedding', 'dust3r.dust3r.downstream_head1.dpt.scratch.layer_rn')
    serial = reference_weights.generate_reference_state_dict(REFERENCE, prefixes, progress=False)
    threaded = reference_weights.generate_reference_state_dict(REFERENCE, prefixes, progress=False, workers=4)
    assert list(serial) == list(threaded) and len(serial) >= 5
    for name, value in serial.items():
        assert torch.equal(value, threaded[name]), name
    alias = 'dust3r.dust3r.downstream_head1.dpt.scratch.layer_rn.0.weight'
    target = reference_weights.generate_reference_state_dict(
        REFERENCE, ('dust3r.dust3r.downstream_head1.dpt.scratch.layer1_rn.weight',), progress=False)
    assert torch.equal(threaded[alias], next(iter(target.values())))
