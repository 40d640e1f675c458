"""Image pre-processing of the official LSM demo, with the resize and crop recorded.

The rule is the one of LSM's ``load_images`` (``large_spatial_model/utils/visualization_utils.py`` at
NVlabs/LSM 4f12d74), which extends DUSt3R's ``load_images`` to 256:

- 224 and 256: resize so that the short side becomes ``resolution`` (the long side is set to
  ``round(resolution * max(W/H, H/W))``), then crop the largest centred square around ``(W//2, H//2)``;
- 512: resize so that the long side becomes 512, then crop around ``(W//2, H//2)`` to a size that is a
  multiple of ``crop_multiple`` (32 in the LSM demo, 16 in DUSt3R); a square image is cropped to 4:3.

Resizing uses PIL: LANCZOS when shrinking, BICUBIC otherwise; each side becomes
``round(side * long_new / long_old)``. The model input is ``(x/255 - 0.5) / 0.5``.

Pixel convention of the intrinsics: OpenCV/ROS, the centre of pixel ``i`` is at coordinate ``i``. PIL's
resampling maps the centre of output pixel ``x'`` to input coordinate ``(x' + 0.5) / s - 0.5``, where
``s = W_resized / W_input`` (per axis), i.e. ``x' + 0.5 = (x + 0.5) * s``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import PIL.Image
import torch

_log = logging.getLogger(__name__)

Resolution = Literal[224, 256, 512]
SUPPORTED_RESOLUTIONS: tuple[int, ...] = (224, 256, 512)


@dataclass(frozen=True)
class ImageCrop:
    """How an input image became the model image: resize to ``resized_size``, then crop ``crop_box``.

    Sizes are ``(width, height)`` in pixels; ``crop_box`` is ``(left, top, right, bottom)`` in resized pixels
    (right/bottom exclusive, as PIL's ``crop``).
    """

    input_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_box: tuple[int, int, int, int]

    @property
    def model_size(self) -> tuple[int, int]:
        """``(width, height)`` of the model image."""
        left, top, right, bottom = self.crop_box
        return right - left, bottom - top

    @property
    def scale(self) -> tuple[float, float]:
        """``(sx, sy)``: resized size over input size, per axis."""
        return (self.resized_size[0] / self.input_size[0], self.resized_size[1] / self.input_size[1])

    def _input_to_model_affine(self) -> np.ndarray:
        """(3,3) affine map of homogeneous pixel coordinates, input image -> model image."""
        sx, sy = self.scale
        left, top = self.crop_box[0], self.crop_box[1]
        return np.array([[sx, 0.0, 0.5 * sx - 0.5 - left],
                         [0.0, sy, 0.5 * sy - 0.5 - top],
                         [0.0, 0.0, 1.0]])

    def pixels_to_model(self, pixels_input: np.ndarray) -> np.ndarray:
        """(...,2) pixel coordinates of the input image -> the same points in the model image."""
        a = self._input_to_model_affine()
        p = np.asarray(pixels_input, dtype=np.float64)
        return p @ a[:2, :2].T + a[:2, 2]

    def intrinsics_to_model(self, K_input: np.ndarray) -> np.ndarray:
        """(3,3) camera matrix of the input image -> the camera matrix of the model image."""
        return self._input_to_model_affine() @ _as_intrinsics(K_input)

    def intrinsics_to_input(self, K_model: np.ndarray) -> np.ndarray:
        """(3,3) camera matrix of the model image -> the camera matrix of the input image."""
        return np.linalg.inv(self._input_to_model_affine()) @ _as_intrinsics(K_model)

    def pixels_to_input(self, pixels_model: np.ndarray) -> np.ndarray:
        """(...,2) pixel coordinates of the model image -> the same points in the input image (the inverse of
        :meth:`pixels_to_model`)."""
        a = np.linalg.inv(self._input_to_model_affine())
        p = np.asarray(pixels_model, dtype=np.float64)
        return p @ a[:2, :2].T + a[:2, 2]

    def model_index_maps(self) -> tuple[np.ndarray, np.ndarray]:
        """The model pixel that holds each input pixel's centre (nearest neighbour, the inverse of the resize and
        crop): ``(columns (W_in,), rows (H_in,))`` int64 model column of each input column and model row of each
        input row; -1 where the input pixel lies outside the crop (the model did not see it).

        Input pixel ``x`` has its centre at resized coordinate ``(x + 0.5) * s`` (pixel edges at integers), inside
        resized pixel ``floor((x + 0.5) * s)``, which is model pixel ``floor((x + 0.5) * s) - left``; computed in
        integers (``s`` = resized / input size), so a centre exactly on an edge goes to the next pixel.
        """
        maps = []
        for axis in (0, 1):
            low = self.crop_box[axis]
            size = self.crop_box[axis + 2] - low
            twice_centre = 2 * np.arange(self.input_size[axis], dtype=np.int64) + 1
            index = twice_centre * self.resized_size[axis] // (2 * self.input_size[axis]) - low
            index[(index < 0) | (index >= size)] = -1
            maps.append(index)
        return maps[0], maps[1]

    def input_region(self) -> tuple[int, int, int, int]:
        """``(x_offset, y_offset, width, height)`` of the input pixels the model saw (those whose centre lies in
        the crop: :meth:`model_index_maps` >= 0); a rectangle, (0, 0, 0, 0) if none."""
        columns, rows = self.model_index_maps()
        seen_x, seen_y = np.flatnonzero(columns >= 0), np.flatnonzero(rows >= 0)
        if not seen_x.size or not seen_y.size:
            return 0, 0, 0, 0
        return (int(seen_x[0]), int(seen_y[0]), int(seen_x[-1] - seen_x[0] + 1), int(seen_y[-1] - seen_y[0] + 1))

    def image_to_input(self, image_model: np.ndarray, fill: float | int | bool = 0) -> np.ndarray:
        """An image of the model size, (h, w[, C]), resampled to the input size (H_in, W_in[, C]) by nearest
        neighbour (:meth:`model_index_maps`); ``fill`` where the model did not see the input image."""
        image_model = np.asarray(image_model)
        model_width, model_height = self.model_size
        if image_model.shape[:2] != (model_height, model_width):
            raise ValueError(f'image of shape {image_model.shape} is not of the model size {model_width}x'
                             f'{model_height} (width x height) of this crop')
        columns, rows = self.model_index_maps()
        out = image_model[np.clip(rows, 0, None)[:, None], np.clip(columns, 0, None)[None, :]]
        out[(rows < 0)[:, None] | (columns < 0)[None, :]] = fill
        return out


@dataclass(frozen=True)
class PreprocessedImage:
    """One image ready for the model.

    ``tensor``: (1,3,h,w) float32 in [-1, 1]; ``rgb``: (h,w,3) uint8, the same image; ``crop``: how it was made.
    """

    tensor: torch.Tensor
    rgb: np.ndarray
    crop: ImageCrop


def _as_intrinsics(K: np.ndarray) -> np.ndarray:
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3):
        raise ValueError(f'a camera matrix must be 3x3, got shape {K.shape}')
    return K


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB, HxW mono8 or HxWx4 RGBA -> HxWx3 uint8 RGB (alpha dropped, mono replicated)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f'expected a uint8 image (HxWx3 RGB, HxW mono or HxWx4 RGBA), '
                         f'got dtype {image.dtype} with shape {image.shape}')
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        image = image[:, :, :3]
    else:
        raise ValueError(f'expected an image of shape HxW, HxWx3 or HxWx4, got shape {image.shape} '
                         f'(dtype {image.dtype})')
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f'image too small: shape {image.shape}')
    return np.ascontiguousarray(image)


def _resized_size(input_size: tuple[int, int], long_side: int) -> tuple[int, int]:
    long_old = max(input_size)
    return tuple(int(round(side * long_side / long_old)) for side in input_size)  # type: ignore[return-value]


def plan_crop(input_size: tuple[int, int], resolution: Resolution, *, crop_multiple: int = 32) -> ImageCrop:
    """The resize and crop that :func:`preprocess_image` applies to an image of ``input_size`` = (W, H)."""
    if resolution not in SUPPORTED_RESOLUTIONS:
        raise ValueError(f'resolution must be one of {SUPPORTED_RESOLUTIONS}, got {resolution!r}')
    width_in, height_in = input_size
    if resolution in (224, 256):
        long_side = round(resolution * max(width_in / height_in, height_in / width_in))
    else:
        long_side = resolution
    width, height = _resized_size(input_size, long_side)
    cx, cy = width // 2, height // 2
    if resolution in (224, 256):
        half_w = half_h = min(cx, cy)
    else:
        if crop_multiple <= 0 or crop_multiple % 2:
            raise ValueError(f'crop_multiple must be a positive even number, got {crop_multiple}')
        half_w = (2 * cx) // crop_multiple * (crop_multiple // 2)
        half_h = (2 * cy) // crop_multiple * (crop_multiple // 2)
        if width == height:
            half_h = 3 * half_w / 4
    # PIL's crop rounds each coordinate with Python's round().
    box = tuple(int(round(v)) for v in (cx - half_w, cy - half_h, cx + half_w, cy + half_h))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f'image of size {width_in}x{height_in} is too small or too elongated for resolution '
                         f'{resolution}: empty crop {box} of the {width}x{height} resized image')
    return ImageCrop(input_size=(width_in, height_in), resized_size=(width, height),
                     crop_box=box)  # type: ignore[arg-type]


def preprocess_image(image: np.ndarray, resolution: Resolution, *, crop_multiple: int = 32) -> PreprocessedImage:
    """Resize and crop an image exactly as the official LSM demo, and normalise it to [-1, 1].

    ``image``: HxWx3 uint8 RGB, HxW uint8 mono (replicated to RGB) or HxWx4 uint8 RGBA (alpha dropped).
    ``crop_multiple`` (512 only): the model size is a multiple of it; 32 as in the LSM demo, 16 as in DUSt3R.
    """
    rgb_input = _as_rgb_uint8(image)
    height_in, width_in = rgb_input.shape[:2]
    crop = plan_crop((width_in, height_in), resolution, crop_multiple=crop_multiple)
    pil_image = PIL.Image.fromarray(rgb_input)
    if crop.resized_size != crop.input_size:
        shrinking = max(crop.input_size) > max(crop.resized_size)
        resample = PIL.Image.Resampling.LANCZOS if shrinking else PIL.Image.Resampling.BICUBIC
        pil_image = pil_image.resize(crop.resized_size, resample)
    rgb = np.asarray(pil_image.crop(crop.crop_box), dtype=np.uint8).copy()
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(torch.float32).div(255.0).sub(0.5).div(0.5)
    _log.debug('preprocessed %dx%d -> resized %s, crop %s', width_in, height_in, crop.resized_size, crop.crop_box)
    return PreprocessedImage(tensor=tensor.contiguous(), rgb=rgb, crop=crop)


def preprocess_pair(left: np.ndarray, right: np.ndarray, resolution: Resolution, *,
                    crop_multiple: int = 32) -> tuple[PreprocessedImage, PreprocessedImage]:
    """Pre-process two views; raise ValueError if their model images differ in size."""
    first = preprocess_image(left, resolution, crop_multiple=crop_multiple)
    second = preprocess_image(right, resolution, crop_multiple=crop_multiple)
    if first.crop.model_size != second.crop.model_size:
        raise ValueError(
            f'the two views give model images of different sizes at resolution {resolution}: '
            f'{first.crop.model_size[0]}x{first.crop.model_size[1]} (from {first.crop.input_size[0]}x'
            f'{first.crop.input_size[1]}) and {second.crop.model_size[0]}x{second.crop.model_size[1]} (from '
            f'{second.crop.input_size[0]}x{second.crop.input_size[1]}); use two cameras with the same image size')
    return first, second
