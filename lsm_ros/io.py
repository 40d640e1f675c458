"""Writers for reconstruction products: PLY point clouds, false-colour depth, JSON (no ROS, no torch)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np


def write_ply(path: str | Path, xyz: np.ndarray, rgb: np.ndarray | None = None,
              scalars: Mapping[str, np.ndarray] | None = None) -> Path:
    """Binary little-endian PLY of N points: ``xyz`` (N,3) float32, optional ``rgb`` (N,3) uint8 (red, green,
    blue properties, as MeshLab/CloudCompare/Open3D read them) and extra float32 per-point ``scalars``."""
    path = Path(path)
    xyz = np.asarray(xyz, dtype=np.float32).reshape(-1, 3)
    n = len(xyz)
    fields: list[tuple[str, str, np.ndarray]] = [(a, 'f4', xyz[:, i]) for i, a in enumerate('xyz')]
    if rgb is not None:
        rgb = np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)
        if len(rgb) != n:
            raise ValueError(f'rgb has {len(rgb)} rows for {n} points')
        fields += [(c, 'u1', rgb[:, i]) for i, c in enumerate(('red', 'green', 'blue'))]
    for name, values in (scalars or {}).items():
        values = np.asarray(values).reshape(-1)
        if len(values) != n:
            raise ValueError(f'scalar {name!r} has {len(values)} values for {n} points')
        fields.append((name, 'f4', values.astype(np.float32)))
    record = np.empty(n, dtype=[(name, '<' + kind) for name, kind, _ in fields])
    for name, _, values in fields:
        record[name] = values
    ply_type = {'f4': 'float', 'u1': 'uchar'}
    header = ['ply', 'format binary_little_endian 1.0', 'comment written by lsm_ros', f'element vertex {n}']
    header += [f'property {ply_type[kind]} {name}' for name, kind, _ in fields]
    header.append('end_header')
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'wb') as f:
        f.write(('\n'.join(header) + '\n').encode('ascii'))
        f.write(record.tobytes())
    return path


def read_ply(path: str | Path) -> dict[str, np.ndarray]:
    """Read a binary little-endian vertex-only PLY written by :func:`write_ply` (property name → array)."""
    data = Path(path).read_bytes()
    end = data.index(b'end_header\n') + len(b'end_header\n')
    lines = data[:end].decode('ascii').splitlines()
    if lines[0] != 'ply' or lines[1] != 'format binary_little_endian 1.0':
        raise ValueError(f'{path}: not a binary little-endian PLY')
    n = next(int(line.split()[2]) for line in lines if line.startswith('element vertex'))
    kinds = {'float': '<f4', 'uchar': 'u1', 'double': '<f8', 'int': '<i4', 'uint': '<u4'}
    dtype = [(line.split()[2], kinds[line.split()[1]]) for line in lines if line.startswith('property')]
    record = np.frombuffer(data, dtype=dtype, count=n, offset=end)
    return {name: record[name].copy() for name, _ in dtype}


def depth_to_color(depth: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """False-colour (turbo) RGB uint8 (H,W,3) of a depth map; near is red, far is blue; NaN/invalid is black.
    The range defaults to the 2nd..98th percentile of the valid depths."""
    depth = np.asarray(depth, dtype=np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    out = np.zeros(depth.shape + (3,), np.uint8)
    if not valid.any():
        return out
    lo = float(np.percentile(depth[valid], 2)) if vmin is None else vmin
    hi = float(np.percentile(depth[valid], 98)) if vmax is None else vmax
    hi = hi if hi > lo else lo + 1e-6
    # inverse depth spreads the colours where a robot needs them (near range)
    inv = (1.0 / np.clip(depth, lo, hi) - 1.0 / hi) / (1.0 / lo - 1.0 / hi)
    grey = np.zeros(depth.shape, np.uint8)
    grey[valid] = np.clip(inv[valid] * 255.0, 0, 255).astype(np.uint8)
    colored = cv2.applyColorMap(grey, cv2.COLORMAP_TURBO)[..., ::-1]  # BGR → RGB
    out[valid] = colored[valid]
    return out


def write_rgb_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an (H,W,3) uint8 RGB image as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(np.asarray(rgb, np.uint8)[..., ::-1])):
        raise OSError(f'could not write {path}')
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f'not JSON serialisable: {type(value).__name__}')


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Pretty JSON with numpy support; non-finite floats become null (valid JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = json.loads(json.dumps(data, default=_json_default))
    path.write_text(json.dumps(_finite_or_none(plain), indent=2) + '\n')
    return path
