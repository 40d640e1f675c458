"""Writers for reconstruction products: PLY point clouds and 3-D Gaussians, images, false-colour depth, JSON
(no ROS, no torch)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np


def write_ply(path: str | Path, xyz: np.ndarray, rgb: np.ndarray | None = None,
              scalars: Mapping[str, np.ndarray] | None = None) -> Path:
    """Binary little-endian PLY of N points: ``xyz`` (N,3) float32, optional ``rgb`` (N,3) uint8 (red, green,
    blue properties, as MeshLab/CloudCompare/Open3D read them) and extra per-point ``scalars``: uint8 arrays (e.g.
    labels) are written as uchar properties, anything else as float32."""
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
        kind = 'u1' if values.dtype == np.uint8 else 'f4'
        fields.append((name, kind, values.astype(kind)))
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


# The per-vertex properties of a 3D Gaussian Splatting PLY, in the order of the INRIA reference writer
# (GaussianModel.save_ply); lsm_ros appends the semantic feature as feat_0 .. feat_{F-1}.
GAUSSIAN_PLY_LEADING = ('x', 'y', 'z', 'nx', 'ny', 'nz', 'f_dc_0', 'f_dc_1', 'f_dc_2')
GAUSSIAN_PLY_TRAILING = ('opacity', 'scale_0', 'scale_1', 'scale_2', 'rot_0', 'rot_1', 'rot_2', 'rot_3')
GAUSSIAN_FIELDS = ('means', 'scales', 'rotations', 'opacities', 'sh', 'features')
_OPACITY_EPS = 1e-7


def gaussian_ply_properties(sh_coefficients: int = 16, feature_dim: int = 64) -> list[str]:
    """Vertex property names of :func:`write_gaussian_ply` for ``sh_coefficients`` per colour channel (16 for
    SH degree 3) and ``feature_dim`` semantic channels."""
    rest = [f'f_rest_{i}' for i in range(3 * (sh_coefficients - 1))]
    return [*GAUSSIAN_PLY_LEADING, *rest, *GAUSSIAN_PLY_TRAILING] + [f'feat_{i}' for i in range(feature_dim)]


def write_gaussian_ply(path: str | Path, cloud: Any) -> Path:
    """Write N Gaussians as a standard 3D Gaussian Splatting PLY (binary little endian, float32 properties).

    ``cloud``: a :class:`lsm_ros.pipeline.GaussianCloud` (or anything with its attributes): ``means`` (N,3),
    ``scales`` (N,3) > 0, ``rotations`` (N,4) unit quaternions (x, y, z, w), ``opacities`` (N,1) in (0,1), ``sh``
    (N,K,3) SH coefficients (DC first, RGB last), ``features`` (N,F). Stored as the INRIA writer stores its
    parameters, so that splat viewers open the file: x y z, nx ny nz (0), f_dc_0..2 (DC per channel),
    f_rest_* channel-major (f_rest_{c*(K-1)+k-1} = sh[:, k, c]), opacity as its logit (clipped to 1e-7 from
    0 and 1), scale_0..2 as logs, rot_0..3 as (w, x, y, z); then feat_0..F-1. Coordinates stay in the cloud's
    frame (for LSM the left camera's optical frame: x right, y down, z forward, as COLMAP/3DGS cameras).
    """
    arrays = {name: np.asarray(getattr(cloud, name)) for name in GAUSSIAN_FIELDS}
    n = len(arrays['means'])
    expected = {'means': (n, 3), 'scales': (n, 3), 'rotations': (n, 4), 'opacities': (n, 1)}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise ValueError(f'{name} must be {shape}, got {arrays[name].shape}')
    sh, features = arrays['sh'], arrays['features'].reshape(n, -1)
    if sh.ndim != 3 or sh.shape[0] != n or sh.shape[2] != 3 or sh.shape[1] < 1:
        raise ValueError(f'sh must be (N={n}, K, 3), got {sh.shape}')
    if not (arrays['scales'] > 0).all():
        raise ValueError('scales must be positive (they are stored as logs)')
    opacity = np.clip(arrays['opacities'][:, 0].astype(np.float64), _OPACITY_EPS, 1.0 - _OPACITY_EPS)
    rest = sh[:, 1:, :].transpose(0, 2, 1).reshape(n, -1)            # (N, 3*(K-1)), channel-major
    columns = [np.zeros(n)] * 3 + [sh[:, 0, c] for c in range(3)] + [rest[:, i] for i in range(rest.shape[1])]
    columns += [np.log(opacity / (1.0 - opacity))] + [np.log(arrays['scales'][:, i].astype(np.float64))
                                                      for i in range(3)]
    columns += [arrays['rotations'][:, i] for i in (3, 0, 1, 2)] + [features[:, i] for i in range(features.shape[1])]
    names = gaussian_ply_properties(sh.shape[1], features.shape[1])[3:]
    return write_ply(path, arrays['means'], scalars=dict(zip(names, columns)))


def read_gaussian_ply(path: str | Path) -> dict[str, np.ndarray]:
    """Read a 3D Gaussian Splatting PLY (:func:`write_gaussian_ply`, or the INRIA layout without feat_*) back
    into the activated parameters under the GaussianCloud field names: ``means`` (N,3), ``scales`` (N,3),
    ``rotations`` (N,4) (x, y, z, w), ``opacities`` (N,1), ``sh`` (N,K,3), ``features`` (N,F), all float32."""
    props = read_ply(path)
    names = list(props)
    rest = [name for name in names if name.startswith('f_rest_')]
    features = [name for name in names if name.startswith('feat_')]
    if len(rest) % 3:
        raise ValueError(f'{path}: {len(rest)} f_rest_* properties is not a multiple of 3')
    expected = gaussian_ply_properties(len(rest) // 3 + 1, len(features))
    if names != expected:
        raise ValueError(f'{path}: not a 3D Gaussian Splatting PLY; properties {names[:12]}... differ from '
                         f'{expected[:12]}...')
    n = len(props['x'])

    def stack(keys: Sequence[str]) -> np.ndarray:
        return np.stack([props[k].astype(np.float64) for k in keys], axis=-1).reshape(n, len(keys))

    coefficients = len(rest) // 3 + 1
    sh = np.empty((n, coefficients, 3))
    sh[:, 0, :] = stack(['f_dc_0', 'f_dc_1', 'f_dc_2'])
    sh[:, 1:, :] = stack(rest).reshape(n, 3, coefficients - 1).transpose(0, 2, 1)
    cloud = dict(means=stack(['x', 'y', 'z']), scales=np.exp(stack(['scale_0', 'scale_1', 'scale_2'])),
                 rotations=stack(['rot_1', 'rot_2', 'rot_3', 'rot_0']),
                 opacities=1.0 / (1.0 + np.exp(-stack(['opacity']))), sh=sh, features=stack(features))
    return {name: cloud[name].astype(np.float32) for name in GAUSSIAN_FIELDS}


def write_mono_png(path: str | Path, mono: np.ndarray) -> Path:
    """Write an (H,W) uint8 image as a single-channel (grey) PNG."""
    mono = np.asarray(mono)
    if mono.ndim != 2 or mono.dtype != np.uint8:
        raise ValueError(f'mono must be (H, W) uint8, got {mono.shape} {mono.dtype}')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(mono)):
        raise OSError(f'could not write {path}')
    return path


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
