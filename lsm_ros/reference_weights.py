"""Deterministic reference weights in the official checkpoint layouts (UNTRAINED).

The official checkpoints cannot be redistributed. The parity reference of this project
(``shared/reference/lsm_vitl_256``: outputs of the official code run with known weights) defines its weights by
a documented rule, ``lsmref-v1``, from a state-dict manifest: every tensor is a function of its name in the LSM
checkpoint and a base seed. This module implements that rule, so tests and the demo can run the real network
at the real size, loaded through the same code paths as the official files. These weights are not trained:
outputs made with them are not real reconstructions.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm

from lsm_ros.shared_data import shared_directory

_log = logging.getLogger(__name__)

WEIGHT_RULE = 'lsmref-v1'
DUST3R_PREFIX = 'dust3r.dust3r.'
LSEG_PREFIX = 'lseg_feature_extractor.'
REFERENCE_NAME = 'lsm_vitl_256'


def find_reference_dir() -> Path | None:
    """The reference folder: ``$LSM_ROS_REFERENCE``, else ``reference/lsm_vitl_256`` of the shared folder."""
    candidates = []
    if os.environ.get('LSM_ROS_REFERENCE'):
        candidates.append(Path(os.environ['LSM_ROS_REFERENCE']))
    candidates.append(shared_directory() / 'reference' / REFERENCE_NAME)
    for path in candidates:
        if (path / 'manifest.tsv').is_file() and (path / 'config.json').is_file():
            return path
    return None


def reference_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, base_seed: int,
                     gain: float | None = None) -> torch.Tensor:
    """Rule lsmref-v1: the tensor of state-dict entry ``name`` (its key in the LSM checkpoint)."""
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    generator = torch.Generator().manual_seed((zlib.crc32(name.encode()) ^ base_seed) & 0x7FFFFFFF)
    normal = torch.randn(shape, generator=generator, dtype=torch.float32)
    if name.endswith('running_var'):
        value = 1.0 + 0.1 * normal.abs()
    elif name.endswith('running_mean'):
        value = 0.1 * normal
    elif len(shape) == 0:
        value = normal
    elif len(shape) == 1:
        value = (1.0 + 0.1 * normal) if name.endswith('weight') else 0.02 * normal
    else:
        value = normal / (normal.numel() / shape[0]) ** 0.5
    if gain is not None and gain != 1.0:
        value = value * gain
    return value.to(dtype)


def read_manifest(reference_dir: Path) -> list[tuple[str, tuple[int, ...], str, str]]:
    """Rows (name, shape, dtype name, alias_of or '') of ``manifest.tsv``, in state-dict order."""
    rows = []
    with open(reference_dir / 'manifest.tsv') as f:
        header = f.readline().rstrip('\n').split('\t')
        if header[:3] != ['name', 'shape', 'dtype']:
            raise ValueError(f'{reference_dir}/manifest.tsv: unexpected header {header}')
        for line in f:
            cols = line.rstrip('\n').split('\t')
            if cols[0]:
                rows.append((cols[0], tuple(json.loads(cols[1])), cols[2], cols[3] if len(cols) > 3 else ''))
    return rows


def generate_reference_state_dict(reference_dir: Path, prefixes: Iterable[str] = ('',),
                                  progress: bool = True, workers: int = 1) -> 'OrderedDict[str, torch.Tensor]':
    """The LSM checkpoint's state dict entries whose names start with one of ``prefixes`` (LSM key names).

    ``workers`` > 1 generates the tensors in a thread pool (torch releases the GIL; each tensor comes from its own
    seeded generator, so the values do not depend on it): several times faster on a many-core host."""
    config = json.loads((reference_dir / 'config.json').read_text())
    if config.get('weight_rule') != WEIGHT_RULE:
        raise ValueError(f'{reference_dir}: weight rule {config.get("weight_rule")!r}, expected {WEIGHT_RULE}')
    base_seed = int(config['base_seed'])
    gains = config.get('weight_rule_gains', {})
    prefixes = tuple(prefixes)
    rows = [r for r in read_manifest(reference_dir) if r[0].startswith(prefixes)]
    canonical = [row for row in rows if not row[3]]
    missing_targets = {alias: row for row in rows if (alias := row[3]) and not any(r[0] == alias for r in canonical)}

    def generate(row: tuple[str, tuple[int, ...], str, str]) -> torch.Tensor:
        name, shape, dtype_name, _ = row
        return reference_tensor(name, shape, getattr(torch, dtype_name), base_seed, gains.get(name))

    # an alias whose target lies outside ``prefixes``: computed under the target's name, once
    jobs = canonical + [(alias, row[1], row[2], '') for alias, row in missing_targets.items()]
    bar = tqdm(total=len(jobs), desc='reference weights', unit='tensor', disable=not progress, leave=False)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        values = {}
        for job, value in zip(jobs, pool.map(generate, jobs)):
            values[job[0]] = value
            bar.update()
    bar.close()
    # the same parameter registered under a second name gets the very tensor of its first name
    return OrderedDict((name, values[alias or name]) for name, _, _, alias in rows)


def reference_checkpoints(reference_dir: Path | None = None, progress: bool = True,
                          workers: int = 1) -> dict[str, dict]:
    """The reference weights as the three official files hold them, in memory: ``{'dust3r': ..., 'lseg': ...,
    'lsm': ...}`` for :meth:`LargeSpatialModel.from_official_checkpoints`. The LSM entry carries only the
    LSM-own weights (the official loader ignores its DUSt3R and LSeg copies). ``workers``: threads generating the
    tensors (:func:`generate_reference_state_dict`)."""
    reference_dir = reference_dir or find_reference_dir()
    if reference_dir is None:
        raise FileNotFoundError('reference folder not found (../shared/reference/lsm_vitl_256 or $LSM_ROS_REFERENCE)')
    config = json.loads((reference_dir / 'config.json').read_text())
    _log.info('generating the reference LSM weights (rule %s, untrained) from %s', WEIGHT_RULE, reference_dir)
    state = generate_reference_state_dict(reference_dir, progress=progress, workers=workers)
    dust3r = OrderedDict((k[len(DUST3R_PREFIX):], v) for k, v in state.items() if k.startswith(DUST3R_PREFIX))
    lseg = OrderedDict(('net.' + k[len(LSEG_PREFIX):], v) for k, v in state.items() if k.startswith(LSEG_PREFIX))
    own = OrderedDict((k, v) for k, v in state.items() if not k.startswith((DUST3R_PREFIX, LSEG_PREFIX)))
    return dict(dust3r={'args': argparse.Namespace(model=config['dust3r_model']), 'model': dust3r},
                lseg={'state_dict': lseg},
                lsm={'args': argparse.Namespace(model=f"LSM_Dust3R(config={config['lsm_config']!r})"), 'model': own})
