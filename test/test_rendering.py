"""lsm_ros.rendering: the torch compositor against the brute-force oracle, gsplat's conventions (projection and SH
against gsplat's own pure-torch reference functions), pixel and quaternion conventions, source-view
reconstruction, backend selection, validation, and (CUDA only) gsplat against the torch backend."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lsm_ros import rendering
from lsm_ros.rendering import (SH_C0, SH_C1, RenderOutput, evaluate_sh, project_gaussians, render_gaussians,
                               render_gaussians_reference)

CHANNELS = ('rgb', 'depth', 'alpha', 'features')


def _camera(dtype: torch.dtype = torch.float64, cx: float = 23.2, cy: float = 20.7) -> tuple[torch.Tensor, ...]:
    """A rotated, translated world_to_camera and an OpenCV K for a 48x40 image."""
    angle = 0.3
    rotation = torch.tensor([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0],
                             [-math.sin(angle), 0, math.cos(angle)]], dtype=dtype)
    world_to_camera = torch.eye(4, dtype=dtype)
    world_to_camera[:3, :3] = rotation
    world_to_camera[:3, 3] = torch.tensor([0.2, -0.1, 0.3], dtype=dtype)
    K = torch.tensor([[40.0, 0, cx], [0, 42.0, cy], [0, 0, 1]], dtype=dtype)
    return world_to_camera, K


def random_scene(seed: int, n: int = 400, width: int = 48, height: int = 40, dtype: torch.dtype = torch.float64,
                 sh_degree: int = 3, channels: int = 5) -> dict:
    """Overlapping anisotropic rotated Gaussians, some behind the camera or the near plane, some off the image or
    below 1/255 opacity, some with opacity above 1, and a pile of opaque ones where pixels stop early."""
    assert n >= 200, 'the special groups below take the first 160 Gaussians'
    g = torch.Generator().manual_seed(seed)

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, dtype=dtype)

    world_to_camera, K = _camera(dtype)
    z = 0.5 + 3 * uniform(n)
    z[:20] = -0.5 + 0.6 * uniform(20)                       # behind the camera and around the near plane
    u, v = -10 + (width + 20) * uniform(n), -10 + (height + 20) * uniform(n)
    cluster = slice(20, 60)                                  # opaque pile-up in one region: pixels stop early
    u[cluster], v[cluster] = 15 + 15 * uniform(40), 12 + 13 * uniform(40)
    in_camera = torch.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], dim=-1)
    means = (in_camera - world_to_camera[:3, 3]) @ world_to_camera[:3, :3]
    rotations = torch.randn(n, 4, generator=g, dtype=dtype)
    scales = (0.005 + 0.08 * uniform(n, 3)) * z.abs()[:, None] ** 0.5
    scales[:, 2] *= 0.2
    opacities = uniform(n)
    opacities[20:140] = 0.95 + 0.05 * uniform(120)
    opacities[140:150] = 1.0 + 0.2 * uniform(10)              # above 1: gsplat clamps the radius to 3.33 sigma
    opacities[150:155] = 0.9 / 255
    scales[cluster] = 0.06 * z[cluster, None]
    opacities[cluster] = 0.99 + 0.01 * uniform(40)
    sh = 0.5 * torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g, dtype=dtype)
    features = torch.randn(n, channels, generator=g, dtype=dtype)
    return dict(means=means, rotations_xyzw=rotations, scales=scales, opacities=opacities, sh=sh, features=features,
                world_to_camera=world_to_camera, K=K, width=width, height=height)


def max_differences(a: RenderOutput, b: RenderOutput) -> dict[str, float]:
    out = {}
    for name in CHANNELS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.shape == y.shape, name
            out[name] = float((x.double() - y.double()).abs().max())
    return out


# ------------------------------------------------------------------------- torch compositor vs the oracle
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_torch_compositor_matches_brute_force_reference(seed: int) -> None:
    scene = random_scene(seed)
    out = render_gaussians(**scene)
    reference = render_gaussians_reference(**scene)
    assert all(d <= 1e-5 for d in max_differences(out, reference).values()), max_differences(out, reference)
    assert out.rgb.shape == (40, 48, 3) and out.depth.shape == (40, 48) and out.features.shape == (40, 48, 5)
    assert 0.2 < float(reference.alpha.mean()) < 0.99


def test_scene_exercises_early_termination(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stop rule changes the images of this scene, and without it both renderers still agree."""
    scene = random_scene(0)
    with_stop = render_gaussians_reference(**scene)
    monkeypatch.setattr(rendering, 'TRANSMITTANCE_MIN', 1e-300)
    without_stop = render_gaussians_reference(**scene)
    assert max(max_differences(with_stop, without_stop).values()) > 1e-3
    assert (1 - with_stop.alpha).min() > 1e-4            # T never falls to 1e-4: the pixel stops before
    assert all(d <= 1e-5 for d in max_differences(render_gaussians(**scene), without_stop).values())


@pytest.mark.parametrize('sh_degree', [0, 1, 2])
def test_lower_sh_degrees_no_depth_background_and_missing_channels(sh_degree: int) -> None:
    scene = random_scene(3, n=250, sh_degree=sh_degree)
    background = torch.tensor([0.2, 0.5, 0.9])
    out = render_gaussians(**scene, background=background, render_depth=False)
    reference = render_gaussians_reference(**scene, background=background, render_depth=False)
    assert out.depth is None and reference.depth is None
    assert all(d <= 1e-5 for d in max_differences(out, reference).values())
    for sh, features in ((None, scene['features']), (scene['sh'], None), (None, None)):
        partial = dict(scene, sh=sh, features=features)
        out, reference = render_gaussians(**partial), render_gaussians_reference(**partial)
        assert (out.rgb is None) == (sh is None) and (out.features is None) == (features is None)
        assert all(d <= 1e-5 for d in max_differences(out, reference).values())


def test_float32_matches_reference_within_float32_rounding() -> None:
    """float32 Gaussians: within 2e-5 of the float64 oracle (no alpha-threshold or stop decision flips here)."""
    scene = random_scene(4, dtype=torch.float32)
    out = render_gaussians(**scene)
    assert all(getattr(out, name).dtype == torch.float32 for name in CHANNELS)
    differences = max_differences(out, render_gaussians_reference(**scene))
    assert all(d <= 2e-5 for d in differences.values()), differences


def test_bands_and_int32_keys_give_the_same_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many row bands (one row each, wider than the int16 key range allowed here) change nothing."""
    scene = random_scene(5, n=250)
    whole = render_gaussians(**scene)
    monkeypatch.setattr(rendering, '_PAIRS_PER_BAND', 300)
    monkeypatch.setattr(rendering, '_BAND_PIXELS', 32)
    assert all(d <= 1e-9 for d in max_differences(whole, render_gaussians(**scene)).values())


def test_empty_and_fully_culled_scenes_give_the_background() -> None:
    scene = random_scene(6, n=200)
    background = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    empty = {key: value[:0] if key in ('means', 'rotations_xyzw', 'scales', 'opacities', 'sh', 'features')
             else value for key, value in scene.items()}
    behind = dict(scene, means=scene['means'] - 100 * scene['world_to_camera'][2, :3])   # all behind the camera
    for case in (empty, behind):
        out = render_gaussians(**case, background=background)
        assert torch.equal(out.alpha, torch.zeros(40, 48, dtype=torch.float64))
        assert torch.equal(out.depth, torch.zeros(40, 48, dtype=torch.float64))
        assert torch.allclose(out.rgb, background.expand(40, 48, 3))
        assert torch.equal(out.features, torch.zeros(40, 48, 5, dtype=torch.float64))


# -------------------------------------------------------------------- gsplat's own pure-torch references
def test_projection_matches_gsplat_torch_reference() -> None:
    """means2d (gsplat's minus 0.5), conics and depths equal gsplat's _fully_fused_projection given (w, x, y, z)
    quaternions and K with cx + 0.5, cy + 0.5; its radii use 3.33 sigma, ours the opacity-aware rule."""
    torch_impl = pytest.importorskip('gsplat.cuda._torch_impl')
    scene = random_scene(7)
    ours = project_gaussians(scene['means'], scene['rotations_xyzw'], scene['scales'], scene['opacities'],
                             scene['world_to_camera'], scene['K'], 48, 40)
    K = scene['K'].clone()
    K[:2, 2] += 0.5
    covars, _ = torch_impl._quat_scale_to_covar_preci(scene['rotations_xyzw'][:, [3, 0, 1, 2]], scene['scales'],
                                                      True, False)
    radii, means2d, depths, conics, _ = torch_impl._fully_fused_projection(
        scene['means'], covars, scene['world_to_camera'][None], K[None], 48, 40, eps2d=0.3)
    visible = ours.visible
    assert 100 < int(visible.sum()) < 400
    assert ((radii[0] > 0).all(-1) | ~visible).all()       # ours is never wider than gsplat's 3.33-sigma rule
    assert torch.allclose(ours.means2d[visible], means2d[0][visible] - 0.5, atol=1e-9)
    assert torch.allclose(ours.conics[visible], conics[0][visible], rtol=1e-9, atol=1e-12)
    assert torch.allclose(ours.depths, depths[0], atol=1e-12)
    # The opacity-aware radius: ceil(min(3.33, sqrt(2 ln(255 o))) sqrt(cov_ii)).
    opacity = scene['opacities'][visible]
    extent = torch.sqrt(2 * torch.log(255 * opacity)).clamp(max=3.33)
    det = conics[0][visible, 0] * conics[0][visible, 2] - conics[0][visible, 1] ** 2
    cov_diag = torch.stack([conics[0][visible, 2], conics[0][visible, 0]], dim=-1) / det[:, None]
    assert torch.equal(ours.radii[visible].double(), torch.ceil(extent[:, None] * cov_diag.sqrt()))


@pytest.mark.parametrize('degree', [0, 1, 2, 3])
def test_evaluate_sh_matches_gsplat_torch_reference(degree: int) -> None:
    torch_impl = pytest.importorskip('gsplat.cuda._torch_impl')
    g = torch.Generator().manual_seed(degree)
    sh = torch.randn(50, (degree + 1) ** 2, 3, generator=g, dtype=torch.float64)
    directions = torch.randn(50, 3, generator=g, dtype=torch.float64) * 3       # not unit: normalised inside
    expected = torch_impl._spherical_harmonics(degree, directions, sh)
    assert torch.allclose(evaluate_sh(sh, directions), expected, atol=1e-12)


def test_evaluate_sh_direct_formulas() -> None:
    """Degree 0 is C0 * DC whatever the direction; degree 1 is -C1 y sh1 + C1 z sh2 - C1 x sh3."""
    g = torch.Generator().manual_seed(0)
    dc = torch.randn(6, 1, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(evaluate_sh(dc, torch.randn(6, 3, generator=g, dtype=torch.float64)), SH_C0 * dc[:, 0])
    directions = 2 * torch.eye(3, dtype=torch.float64)                        # +x, +y, +z, not unit
    for axis, (coefficient, sign) in enumerate(((3, -1.0), (1, -1.0), (2, 1.0))):
        coefficients = torch.zeros(1, 4, 3, dtype=torch.float64)
        coefficients[0, coefficient] = 1.0
        value = evaluate_sh(coefficients, directions[axis:axis + 1])
        assert torch.allclose(value, torch.full((1, 3), sign * SH_C1, dtype=torch.float64))


# -------------------------------------------------------------------------------------- conventions
def _single(mean: torch.Tensor, scales: tuple[float, float, float], rotation_xyzw: tuple[float, ...],
            K: torch.Tensor, width: int = 32, height: int = 24, opacity: float = 1.0) -> RenderOutput:
    f64 = torch.float64
    return render_gaussians(mean[None].to(f64), torch.tensor([rotation_xyzw], dtype=f64),
                            torch.tensor([scales], dtype=f64), torch.tensor([opacity], dtype=f64), None, None,
                            torch.eye(4, dtype=f64), K, width, height)


@pytest.mark.parametrize('principal_point', [(15.5, 11.5), (9.3, 16.8)])
def test_tiny_gaussian_at_a_pixel_peaks_there(principal_point: tuple[float, float]) -> None:
    """OpenCV pixel convention: a Gaussian projecting exactly onto pixel (u, v) peaks at [v, u], symmetrically."""
    K = torch.tensor([[30.0, 0, principal_point[0]], [0, 30.0, principal_point[1]], [0, 0, 1]], dtype=torch.float64)
    for u, v in ((7, 5), (20, 13), (0, 0)):
        z = 2.0
        mean = torch.tensor([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], dtype=torch.float64)
        alpha = _single(mean, (0.01, 0.01, 0.01), (0, 0, 0, 1), K).alpha
        assert divmod(int(alpha.argmax()), 32) == (v, u)
        assert alpha[v, u] == pytest.approx(0.999)
        if u > 0 and v > 0:
            assert alpha[v, u - 1] == pytest.approx(float(alpha[v, u + 1]), rel=1e-9)
            assert alpha[v - 1, u] == pytest.approx(float(alpha[v + 1, u]), rel=1e-9)


def test_quaternions_are_xyzw() -> None:
    """A Gaussian long along its x axis, turned 90 degrees about the optical axis by (0, 0, sin 45, cos 45)
    (x, y, z, w), lies along the image rows' direction y; read as (w, x, y, z) it would stay along x."""
    K = torch.tensor([[30.0, 0, 15.5], [0, 30.0, 11.5], [0, 0, 1]], dtype=torch.float64)
    mean = torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64)
    half = math.sqrt(0.5)
    for rotation, long_axis in (((0, 0, 0, 1), 'x'), ((0, 0, half, half), 'y')):
        alpha = _single(mean, (0.3, 0.02, 0.02), rotation, K).alpha
        rows, cols = torch.meshgrid(torch.arange(24.0, dtype=torch.float64), torch.arange(32.0, dtype=torch.float64),
                                    indexing='ij')
        spread_x = float((alpha * (cols - 15.5) ** 2).sum() / alpha.sum())
        spread_y = float((alpha * (rows - 11.5) ** 2).sum() / alpha.sum())
        assert (spread_x > 4 * spread_y) if long_axis == 'x' else (spread_y > 4 * spread_x)


@pytest.mark.parametrize('principal_point', [(31.5, 23.5), (25.2, 28.9)])
def test_source_view_is_reproduced(principal_point: tuple[float, float]) -> None:
    """One Gaussian per pixel, back-projected from a depth map with DC = the pixel's colour, small isotropic
    scales and opacity 1, rendered from the same camera: the image (PSNR > 35 dB) and the depth come back."""
    width, height, focal = 64, 48, 55.0
    g = torch.Generator().manual_seed(11)
    image = torch.rand(height, width, 3, generator=g, dtype=torch.float64)          # texture: no smoothing hides
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                                indexing='ij')
    depth = 2.0 + 0.3 * torch.sin(cols / 9) * torch.cos(rows / 7)
    K = torch.tensor([[focal, 0, principal_point[0]], [0, focal, principal_point[1]], [0, 0, 1]],
                     dtype=torch.float64)
    means = torch.stack([(cols - K[0, 2]) / focal * depth, (rows - K[1, 2]) / focal * depth, depth], -1)
    n = width * height
    sh = torch.zeros(n, 1, 3, dtype=torch.float64)
    sh[:, 0] = (image.reshape(-1, 3) - 0.5) / SH_C0
    out = render_gaussians(means.reshape(-1, 3), torch.tensor([[0.0, 0, 0, 1]], dtype=torch.float64).expand(n, 4),
                           (0.1 * depth / focal).reshape(-1, 1).expand(n, 3), torch.ones(n, dtype=torch.float64),
                           sh, None, torch.eye(4, dtype=torch.float64), K, width, height, eps2d=1e-3)
    psnr = -10 * math.log10(float(((out.rgb - image) ** 2).mean()))
    assert psnr > 35, psnr
    assert torch.allclose(out.depth, depth, rtol=1e-3)


# -------------------------------------------------------------------------------------- backends
def test_gsplat_backend_needs_cuda_tensors() -> None:
    scene = random_scene(8, n=200, dtype=torch.float32)
    with pytest.raises(ValueError, match='CUDA'):
        render_gaussians(**scene, backend='gsplat')
    with pytest.raises(ValueError, match='backend'):
        render_gaussians(**scene, backend='cuda')


def test_auto_on_cpu_never_calls_gsplat(monkeypatch: pytest.MonkeyPatch) -> None:
    gsplat = pytest.importorskip('gsplat')

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError('gsplat called on CPU tensors')

    monkeypatch.setattr(gsplat, 'rasterization', refuse)
    monkeypatch.setattr(sys.modules['gsplat.rendering'], 'rasterization', refuse)
    scene = random_scene(9, n=200, dtype=torch.float32)
    for backend in ('auto', 'torch'):
        assert render_gaussians(**scene, backend=backend).alpha.max() > 0


def test_cpu_rendering_does_not_import_gsplat() -> None:
    """In a fresh interpreter, rendering CPU tensors with 'auto' leaves gsplat unimported."""
    code = ('import sys, torch\n'
            'from lsm_ros.rendering import render_gaussians\n'
            'n = 50\n'
            'out = render_gaussians(torch.rand(n, 3) + torch.tensor([0, 0, 2.0]), torch.randn(n, 4),\n'
            '                       torch.full((n, 3), 0.05), torch.rand(n), torch.rand(n, 4, 3), torch.rand(n, 8),\n'
            '                       torch.eye(4), torch.tensor([[20.0, 0, 8], [0, 20, 6], [0, 0, 1]]), 16, 12)\n'
            'assert out.alpha.max() > 0\n'
            'assert not any(name.startswith("gsplat") for name in sys.modules), "gsplat was imported"\n')
    result = subprocess.run([sys.executable, '-c', code], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _fake_rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height, *, near_plane,
                        far_plane, eps2d, sh_degree, packed, tile_size, backgrounds, render_mode, rasterize_mode):
    """gsplat.rasterization's contract for one camera, implemented with the torch backend (CPU)."""
    assert packed and tile_size == 16 and rasterize_mode == 'classic' and viewmats.shape == (1, 4, 4)
    K = Ks[0].clone()
    K[:2, 2] -= 0.5                                            # gsplat's pixel centres are at +0.5
    sh, features = (colors, None) if sh_degree is not None else (None, colors)
    if sh is not None:
        assert sh.shape[1] == (sh_degree + 1) ** 2
    out = render_gaussians(means, quats[:, [1, 2, 3, 0]], scales, opacities, sh, features, viewmats[0], K, width,
                           height, near_plane=near_plane, far_plane=far_plane, eps2d=eps2d,
                           background=None if backgrounds is None else backgrounds[0], backend='torch')
    colour = out.rgb if sh is not None else out.features
    image = {'RGB': colour, 'RGB+ED': None if colour is None else torch.cat([colour, out.depth[..., None]], -1),
             'ED': out.depth[..., None]}[render_mode]
    return image[None], out.alpha[None, ..., None], {}


def test_gsplat_adapter_conventions_with_a_fake_rasterizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gsplat path's plumbing (quaternion order, K + 0.5, render modes, channel split) on the CPU, with a
    stand-in for gsplat.rasterization that follows its documented contract."""
    gsplat = pytest.importorskip('gsplat')
    monkeypatch.setattr(gsplat, 'rasterization', _fake_rasterization)
    scene = random_scene(10, n=200, dtype=torch.float32)
    background = torch.tensor([0.3, 0.6, 0.1])
    for sh, features, depth in ((scene['sh'], scene['features'], True), (None, scene['features'], True),
                                (scene['sh'], None, False), (None, None, True)):
        case = dict(scene, sh=sh, features=features)
        bg = background if sh is not None else None
        validated = rendering._validate(*(case[key] for key in (
            'means', 'rotations_xyzw', 'scales', 'opacities', 'sh', 'features', 'world_to_camera', 'K', 'width',
            'height')), bg, 0.01, 1e10, 0.3)
        via_gsplat = rendering._render_gsplat(validated, depth)
        direct = render_gaussians(**case, background=bg, render_depth=depth, backend='torch')
        assert all(d <= 1e-5 for d in max_differences(via_gsplat, direct).values())   # K + 0.5 - 0.5 in float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA (gsplat)')
def test_gsplat_on_cuda_agrees_with_the_torch_backend_on_cpu() -> None:
    """Same float32 scene: gsplat on CUDA vs the torch backend on the CPU. Tolerance: 5e-3 max and 5e-5 mean
    absolute difference on rgb, alpha and features (gsplat's fast-math exp and float32 transmittance can flip a
    pair at the 1/255 alpha threshold); depth where alpha > 0.5, 1e-3 relative."""
    scene = random_scene(12, n=400, dtype=torch.float32)
    on_cuda = {key: value.cuda() if isinstance(value, torch.Tensor) else value for key, value in scene.items()}
    a = render_gaussians(**on_cuda, backend='gsplat')
    b = render_gaussians(**scene, backend='torch')
    for name in ('rgb', 'alpha', 'features'):
        difference = (getattr(a, name).cpu() - getattr(b, name)).abs()
        assert float(difference.max()) <= 5e-3 and float(difference.mean()) <= 5e-5, name
    solid = b.alpha > 0.5
    assert torch.allclose(a.depth.cpu()[solid], b.depth[solid], rtol=1e-3)


# ------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize('change, message', [
    (dict(means=torch.zeros(5, 2)), 'means'),
    (dict(scales=torch.zeros(4, 3, dtype=torch.float64)), 'scales'),
    (dict(opacities=torch.zeros(5, 1, dtype=torch.float32)), 'opacities'),
    (dict(sh=torch.zeros(5, 5, 3, dtype=torch.float64)), 'sh'),
    (dict(features=torch.zeros(5, dtype=torch.float64)), 'features'),
    (dict(means=torch.zeros(5, 3, dtype=torch.int64)), 'float32 or float64'),
    (dict(world_to_camera=torch.full((4, 4), float('nan'))), 'world_to_camera'),
    (dict(world_to_camera=torch.zeros(3, 4)), 'world_to_camera'),
    (dict(K=torch.tensor([[30.0, 1, 8], [0, 30, 6], [0, 0, 1]])), 'K'),
    (dict(K=torch.tensor([[-30.0, 0, 8], [0, 30, 6], [0, 0, 1]])), 'K'),
    (dict(width=0), 'width'),
    (dict(height=2.5), 'height'),
    (dict(near_plane=2.0, far_plane=1.0), 'near_plane'),
    (dict(eps2d=-1.0), 'eps2d'),
    (dict(sh=None, background=torch.ones(3)), 'background'),
])
def test_bad_arguments_raise_value_error(change: dict, message: str) -> None:
    f64 = torch.float64
    arguments = dict(means=torch.zeros(5, 3, dtype=f64), rotations_xyzw=torch.zeros(5, 4, dtype=f64),
                     scales=torch.ones(5, 3, dtype=f64), opacities=torch.ones(5, dtype=f64),
                     sh=torch.zeros(5, 4, 3, dtype=f64), features=None, world_to_camera=torch.eye(4),
                     K=torch.tensor([[30.0, 0, 8], [0, 30, 6], [0, 0, 1]]), width=16, height=12)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        render_gaussians(**arguments)


def test_camera_may_be_numpy_and_nearly_rigid() -> None:
    """The camera may come as numpy arrays; the last row of world_to_camera may be off by rounding (inverse)."""
    scene = random_scene(13, n=200)
    view = scene['world_to_camera'].numpy().copy()
    view[3, :3] = 1e-12
    out = render_gaussians(**dict(scene, world_to_camera=view, K=scene['K'].numpy()))
    assert all(d <= 1e-9 for d in max_differences(out, render_gaussians(**scene)).values())
