#!/usr/bin/env python3
"""Benchmark of lsm_ros.rendering.render_gaussians on an LSM-like scene (no ROS).

The scene: 2 views x 256 x 256 pixel-aligned Gaussians (131072) on a synthetic wavy surface seen by a stereo-like
pair (view 2 is 0.25 m to the right of view 1 and turned 5 degrees towards it), scales about one pixel footprint
(z / f times U(0.5, 1.5) per axis), random rotations, opacities U(0.3, 1), degree-3 SH, 64-d features. It is
rendered into view 1 (the world frame) at 256 x 256: rgb only, then rgb + depth + alpha + 64-d features. Prints
the warm median and minimum wall times on the CPU (and on CUDA when available).

    .venv/bin/python scripts/bench_render.py [--threads 2] [--repeats 7]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lsm_ros.rendering import SH_C0, render_gaussians  # noqa: E402

SIZE = 256
FOCAL = SIZE / (2 * math.tan(math.radians(30)))      # 60-degree field of view, as LSM's reference focal
FEATURE_DIM = 64


def surface_depth(x_over_z: torch.Tensor, y_over_z: torch.Tensor, origin: torch.Tensor, rotation: torch.Tensor,
                  iterations: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray parameters t where the rays origin + t R (x, y, 1) meet the surface z = 2 + 0.2 sin(3x) cos(2y), and
    the ray directions R (x, y, 1)."""
    direction = torch.stack([x_over_z, y_over_z, torch.ones_like(x_over_z)], dim=-1) @ rotation.T
    t = torch.full_like(x_over_z, 2.0)
    for _ in range(iterations):
        point = origin + t[..., None] * direction
        height = 2 + 0.2 * torch.sin(3 * point[..., 0]) * torch.cos(2 * point[..., 1])
        t = (height - origin[2]) / direction[..., 2]
    return t, direction


def lsm_like_scene(seed: int = 0) -> dict:
    """The 131072 Gaussians and view 1's camera (float32, CPU)."""
    generator = torch.Generator().manual_seed(seed)
    K = torch.tensor([[FOCAL, 0, (SIZE - 1) / 2], [0, FOCAL, (SIZE - 1) / 2], [0, 0, 1]], dtype=torch.float64)
    v, u = torch.meshgrid(torch.arange(SIZE, dtype=torch.float64), torch.arange(SIZE, dtype=torch.float64),
                          indexing='ij')
    x_over_z, y_over_z = (u - K[0, 2]) / FOCAL, (v - K[1, 2]) / FOCAL
    yaw = math.radians(-5)
    views = [(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)),
             (torch.tensor([0.25, 0.0, 0.0], dtype=torch.float64),
              torch.tensor([[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0], [-math.sin(yaw), 0, math.cos(yaw)]],
                           dtype=torch.float64))]
    means, footprints = [], []
    for origin, rotation in views:
        t, direction = surface_depth(x_over_z, y_over_z, origin, rotation)
        means.append((origin + t[..., None] * direction).reshape(-1, 3))
        footprints.append((t / FOCAL).reshape(-1))
    means = torch.cat(means).float()
    n = len(means)
    footprint = torch.cat(footprints).float()
    scales = footprint[:, None] * (0.5 + torch.rand(n, 3, generator=generator))
    rotations = torch.randn(n, 4, generator=generator)
    rotations = rotations / rotations.norm(dim=-1, keepdim=True)
    opacities = 0.3 + 0.7 * torch.rand(n, generator=generator)
    colour = 0.5 + 0.4 * torch.sin(means[:, :1] * torch.tensor([[5.0, 7.0, 11.0]]) + means[:, 1:2] * 3)
    sh = 0.05 * torch.randn(n, 16, 3, generator=generator)
    sh[:, 0] = (colour - 0.5) / SH_C0
    features = torch.randn(n, FEATURE_DIM, generator=generator)
    return dict(means=means, rotations_xyzw=rotations, scales=scales, opacities=opacities, sh=sh,
                features=features, world_to_camera=torch.eye(4), K=K.float(), width=SIZE, height=SIZE)


def timings(function: Callable[[], object], repeats: int, synchronise: Callable[[], None]) -> list[float]:
    """Wall times (s) of ``repeats`` calls after one warm-up call."""
    function()
    synchronise()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronise()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads (default 2)')
    parser.add_argument('--repeats', type=int, default=7, help='timed calls per case after a warm-up (default 7)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scene = lsm_like_scene()
    print(f'scene: {len(scene["means"])} Gaussians, {SIZE}x{SIZE}, SH degree 3, {FEATURE_DIM}-d features; '
          f'torch {torch.__version__}, {args.threads} threads, {args.repeats} repeats, '
          f'load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs')
    devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    for device in devices:
        on_device = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                     for key, value in scene.items()}
        synchronise = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
        cases = {
            'rgb only': dict(on_device, features=None, render_depth=False),
            'rgb+depth+alpha+64-d features': on_device,
        }
        for name, kwargs in cases.items():
            times = timings(lambda: render_gaussians(**kwargs), args.repeats, synchronise)
            print(f'{device:4s} {name:32s} median {statistics.median(times) * 1e3:8.1f} ms   '
                  f'min {min(times) * 1e3:8.1f} ms')


if __name__ == '__main__':
    main()
