"""Parity of Dust3rNet with the official DUSt3R forward (reference folder shared/reference/lsm_vitl_256).

The weights are regenerated from the reference manifest with ``lsmref`` (rule lsmref-v1, documented gains and
aliases), written as an official DUSt3R checkpoint file, loaded with ``load_dust3r_checkpoint`` and run on the
reference image pair. Every output must match ``dust3r.npz`` to max |err| <= 1e-4 * max |ref|.
"""
from __future__ import annotations

import argparse
import gc
import io
import logging
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from lsm_ros.model import Dust3rConfig, Dust3rNet, load_dust3r_checkpoint
from lsm_ros.model.checkpoint import to_official_state_dict

logger = logging.getLogger(__name__)

SHARED = Path(os.environ.get('LSM_ROS_SHARED', Path(__file__).resolve().parents[1].parent / 'shared'))
REFERENCE = SHARED / 'reference' / 'lsm_vitl_256'
DUST3R_PREFIX = 'dust3r.dust3r.'
OUTPUT_SHAPES = {'pts3d_1': (1, 256, 256, 3), 'conf_1': (1, 256, 256), 'pts3d_2': (1, 256, 256, 3),
                 'conf_2': (1, 256, 256), 'enc_feat': (1, 512, 1024)}
MAX_RELATIVE_ERROR = 1e-4

if not REFERENCE.is_dir():
    pytest.skip(f'reference folder {REFERENCE} not found (set LSM_ROS_SHARED)', allow_module_level=True)

sys.path.insert(0, str(REFERENCE.parent))
import lsmref  # noqa: E402  (lives next to the reference folder)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def _write_official_checkpoint(path: Path) -> None:
    """Generate only the DUSt3R entries of the manifest and save them in the official DUSt3R file layout."""
    config = lsmref.read_config(str(REFERENCE))
    rows = [row for row in lsmref.read_manifest(str(REFERENCE)) if row[0].startswith(DUST3R_PREFIX)]
    state = lsmref.generate_state_dict(str(REFERENCE), manifest=rows)  # gains and aliases as documented
    model = {name[len(DUST3R_PREFIX):]: tensor for name, tensor in state.items()}
    del state
    torch.save({'args': argparse.Namespace(model=config['dust3r_model']), 'model': model}, path)


@pytest.fixture(scope='module')
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, np.ndarray]]:
    """Our DUSt3R outputs on the reference pair (the 2.3 GB weights are generated once and freed)."""
    workdir = tmp_path_factory.mktemp('dust3r_parity')
    checkpoint = workdir / 'DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth'
    start = time.perf_counter()
    _write_official_checkpoint(checkpoint)
    gc.collect()
    logger.info('generated the reference checkpoint in %.1f s', time.perf_counter() - start)

    start = time.perf_counter()
    net: Dust3rNet = load_dust3r_checkpoint(checkpoint)
    checkpoint.unlink()
    logger.info('loaded it in %.1f s', time.perf_counter() - start)

    with np.load(REFERENCE / 'inputs.npz') as inputs:
        images = torch.from_numpy(inputs['images']).float()
    start = time.perf_counter()
    with torch.no_grad():
        result = net(images[0:1], images[1:2])
    logger.info('forward in %.1f s; peak RSS %.2f GiB', time.perf_counter() - start, _peak_rss_gib())
    del net
    gc.collect()
    arrays = {key: value.numpy() for key, value in result.items()}
    np.savez_compressed(workdir / 'dust3r_outputs.npz', **{f'dust3r.{k}': v for k, v in arrays.items()})
    yield arrays


def test_official_layout_matches_manifest() -> None:
    """Our network in the official layout has exactly the manifest's DUSt3R keys and shapes (+ mask_token)."""
    with torch.device('meta'):
        net = Dust3rNet(Dust3rConfig())
    ours = {name: tuple(t.shape) for name, t in to_official_state_dict(net.state_dict()).items()}
    ours['mask_token'] = (1, 1, net.config.dec_embed_dim)
    manifest = {name[len(DUST3R_PREFIX):]: shape for name, shape, _, _ in lsmref.read_manifest(str(REFERENCE))
                if name.startswith(DUST3R_PREFIX)}
    assert ours == manifest


def test_output_shapes(outputs: dict[str, np.ndarray]) -> None:
    assert {key: value.shape for key, value in outputs.items()} == OUTPUT_SHAPES
    assert all(value.dtype == np.float32 for value in outputs.values())


def test_parity_with_official_dust3r(outputs: dict[str, np.ndarray]) -> None:
    report = io.StringIO()
    stats = lsmref.compare({f'dust3r.{k}': v for k, v in outputs.items()}, str(REFERENCE), file=report)
    logger.info('lsmref.compare:\n%s', report.getvalue())
    with np.load(REFERENCE / 'dust3r.npz') as reference:
        for key in OUTPUT_SHAPES:
            ref = reference[key].astype(np.float64)
            assert outputs[key].shape == ref.shape, key
            relative = np.abs(outputs[key] - ref).max() / np.abs(ref).max()
            logger.info('%-8s max |err| / max |ref| = %.3e (lsmref: %.3e)', key, relative,
                        stats[f'dust3r.{key}']['max_rel'])
            assert np.isfinite(outputs[key]).all(), key
            assert relative <= MAX_RELATIVE_ERROR, f'{key}: relative error {relative:.3e}'
