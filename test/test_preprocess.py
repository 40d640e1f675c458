"""Tests of lsm_ros.preprocess: the official LSM demo pre-processing and the recorded crop."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from lsm_ros.preprocess import ImageCrop, plan_crop, preprocess_image, preprocess_pair

SHARED = Path(os.environ.get('LSM_ROS_SHARED', Path(__file__).resolve().parents[1].parent / 'shared'))
REFERENCE_INPUTS = SHARED / 'reference' / 'lsm_vitl_256' / 'inputs.npz'
SCENE2 = SHARED / 'data' / 'lsm_demo_pairs' / 'scene2'


def _random_image(width: int, height: int, channels: int | None = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width) if channels is None else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _gaussian_blob(width: int, height: int, centre: tuple[float, float], sigma: float) -> np.ndarray:
    ys, xs = np.mgrid[:height, :width]
    value = 20 + 220 * np.exp(-((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / (2 * sigma ** 2))
    return np.round(value).astype(np.uint8)


@pytest.mark.skipif(not REFERENCE_INPUTS.exists(), reason=f'shared reference data absent ({SHARED})')
def test_matches_official_preprocessing_of_reference_pair() -> None:
    """Bit-exact against the official LSM demo's images (measured with Pillow 13.0.0)."""
    reference = np.load(REFERENCE_INPUTS)['images']
    left, right = (np.asarray(PIL.Image.open(SCENE2 / f'processed_00{i}.png').convert('RGB')) for i in (0, 1))
    views = preprocess_pair(left, right, 256)
    for view, expected in zip(views, reference):
        assert view.crop == ImageCrop(input_size=(512, 384), resized_size=(341, 256), crop_box=(42, 0, 298, 256))
        assert view.tensor.shape == (1, 3, 256, 256)
        assert view.tensor.dtype == torch.float32
        np.testing.assert_array_equal(view.tensor[0].numpy(), expected)
        np.testing.assert_array_equal(view.rgb.transpose(2, 0, 1), np.round((expected + 1.0) * 127.5))


@pytest.mark.parametrize(('input_size', 'resolution', 'crop_multiple', 'resized_size', 'crop_box'), [
    # landscape 4:3
    ((512, 384), 224, 32, (299, 224), (37, 0, 261, 224)),
    ((512, 384), 256, 32, (341, 256), (42, 0, 298, 256)),
    ((512, 384), 512, 32, (512, 384), (0, 0, 512, 384)),
    ((640, 480), 512, 32, (512, 384), (0, 0, 512, 384)),
    # portrait
    ((384, 512), 256, 32, (256, 341), (0, 42, 256, 298)),
    ((384, 512), 512, 32, (384, 512), (0, 0, 384, 512)),
    # square: 4:3 crop at 512
    ((600, 600), 224, 32, (224, 224), (0, 0, 224, 224)),
    ((600, 600), 512, 32, (512, 512), (0, 64, 512, 448)),
    # LSM demo scene1: odd sizes that differ by one pixel
    ((505, 378), 256, 32, (342, 256), (43, 0, 299, 256)),
    ((506, 378), 256, 32, (343, 256), (43, 0, 299, 256)),
    ((505, 378), 512, 32, (512, 383), (0, 15, 512, 367)),
    ((506, 378), 512, 32, (512, 382), (0, 15, 512, 367)),
    ((505, 378), 512, 16, (512, 383), (0, 7, 512, 375)),
    # KITTI
    ((1241, 376), 224, 32, (739, 224), (257, 0, 481, 224)),
    ((1241, 376), 256, 32, (845, 256), (294, 0, 550, 256)),
    ((1241, 376), 512, 32, (512, 155), (0, 13, 512, 141)),
    ((1241, 376), 512, 16, (512, 155), (0, 5, 512, 149)),
    # enlarging a small image
    ((101, 37), 512, 32, (512, 188), (0, 14, 512, 174)),
])
def test_resize_and_crop_sizes(input_size: tuple[int, int], resolution: int, crop_multiple: int,
                               resized_size: tuple[int, int], crop_box: tuple[int, int, int, int]) -> None:
    view = preprocess_image(_random_image(*input_size), resolution,  # type: ignore[arg-type]
                            crop_multiple=crop_multiple)
    assert view.crop == plan_crop(input_size, resolution, crop_multiple=crop_multiple)  # type: ignore[arg-type]
    assert view.crop.resized_size == resized_size
    assert view.crop.crop_box == crop_box
    width, height = view.crop.model_size
    assert view.rgb.shape == (height, width, 3) and view.rgb.dtype == np.uint8
    assert tuple(view.tensor.shape) == (1, 3, height, width)
    if resolution == 512:
        assert width % crop_multiple == 0 and height % crop_multiple == 0
    else:
        assert width == height == resolution


def test_tensor_is_normalised_rgb() -> None:
    view = preprocess_image(_random_image(640, 480), 256)
    np.testing.assert_allclose(view.tensor[0].numpy(), view.rgb.transpose(2, 0, 1) / 127.5 - 1.0, atol=1e-6)
    assert view.tensor.min() >= -1.0 and view.tensor.max() <= 1.0


def test_mono_and_rgba_inputs() -> None:
    mono = _random_image(752, 480, channels=None)
    from_mono = preprocess_image(mono, 512)
    from_rgb = preprocess_image(np.repeat(mono[:, :, None], 3, axis=2), 512)
    np.testing.assert_array_equal(from_mono.rgb, from_rgb.rgb)
    assert np.array_equal(from_mono.rgb[..., 0], from_mono.rgb[..., 2])

    rgba = _random_image(640, 480, channels=4)
    np.testing.assert_array_equal(preprocess_image(rgba, 224).rgb,
                                  preprocess_image(np.ascontiguousarray(rgba[..., :3]), 224).rgb)


@pytest.mark.parametrize('image', [
    np.zeros((48, 64, 3), np.float32),
    np.zeros((48, 64), np.uint16),
    np.zeros((48, 64, 3), np.int64),
    np.zeros((48, 64, 2), np.uint8),
    np.zeros((48, 64, 3, 1), np.uint8),
    np.zeros((64,), np.uint8),
])
def test_bad_images_are_rejected(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r'shape|dtype') as error:
        preprocess_image(image, 256)
    assert str(image.shape) in str(error.value)


def test_bad_resolution_is_rejected() -> None:
    with pytest.raises(ValueError, match='resolution'):
        preprocess_image(_random_image(64, 48), 300)  # type: ignore[arg-type]


def test_pair_of_different_model_sizes_is_rejected() -> None:
    with pytest.raises(ValueError, match=r'512x384.*512x288.*same image size'):
        preprocess_pair(_random_image(640, 480), _random_image(640, 360), 512)
    left, right = preprocess_pair(_random_image(505, 378), _random_image(506, 378), 512)
    assert left.crop.model_size == right.crop.model_size == (512, 352)


@pytest.mark.parametrize(('input_size', 'resolution'), [
    ((640, 480), 224), ((640, 480), 512), ((1241, 376), 256), ((1241, 376), 512), ((505, 378), 512),
    ((101, 37), 512), ((384, 512), 256),
])
def test_intrinsics_mapping(input_size: tuple[int, int], resolution: int) -> None:
    """K_model projects a 3-D point where the resize + crop puts K_input's projection; the round trip is exact."""
    crop = plan_crop(input_size, resolution)  # type: ignore[arg-type]
    width, height = input_size
    K_input = np.array([[0.9 * width, 0.0, width / 2 - 3.2], [0.0, 0.88 * width, height / 2 + 1.7], [0, 0, 1]])
    K_model = crop.intrinsics_to_model(K_input)
    np.testing.assert_allclose(crop.intrinsics_to_input(K_model), K_input, rtol=0, atol=1e-9 * width)

    points = np.random.default_rng(3).uniform([-1, -0.5, 1.5], [1, 0.5, 4], size=(50, 3))
    projected_input = points @ K_input.T
    projected_input = projected_input[:, :2] / projected_input[:, 2:]
    sx, sy = crop.resized_size[0] / width, crop.resized_size[1] / height
    expected_model = np.stack([(projected_input[:, 0] + 0.5) * sx - 0.5 - crop.crop_box[0],
                               (projected_input[:, 1] + 0.5) * sy - 0.5 - crop.crop_box[1]], axis=-1)
    projected_model = points @ K_model.T
    np.testing.assert_allclose(projected_model[:, :2] / projected_model[:, 2:], expected_model, atol=1e-9)
    np.testing.assert_allclose(crop.pixels_to_model(projected_input), expected_model, atol=1e-9)


@pytest.mark.parametrize(('input_size', 'centre', 'sigma'), [
    ((640, 480), (301.3, 211.7), 6.0), ((1241, 376), (700.2, 150.6), 8.0), ((101, 77), (40.3, 30.8), 3.0),
])
@pytest.mark.parametrize('resolution', [224, 256, 512])
def test_pixel_convention_matches_pil_resampling(input_size: tuple[int, int], centre: tuple[float, float],
                                                 sigma: float, resolution: int) -> None:
    """A blob's centroid in the model image is where the recorded crop maps its input centre (to 0.05 px)."""
    view = preprocess_image(_gaussian_blob(*input_size, centre, sigma), resolution)  # type: ignore[arg-type]
    weight = np.clip(view.rgb[..., 0].astype(np.float64) - 20.0, 0.0, None)
    ys, xs = np.mgrid[:weight.shape[0], :weight.shape[1]]
    centroid = np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()
    np.testing.assert_allclose(view.crop.pixels_to_model(centre), centroid, atol=0.05)
