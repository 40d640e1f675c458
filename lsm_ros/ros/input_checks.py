"""Checks of ``lsm_node``'s input that need no node state: decoding a raw or compressed image, whether its size suits
the model, and whether a pair's images agree. They raise :class:`InputRejected` with the node's rejection reason
(``REJECT_*`` of :mod:`lsm_ros.ros.names`) and the message to log; :mod:`lsm_ros.ros.calibration` checks the
CameraInfo."""
from __future__ import annotations

import numpy as np
from sensor_msgs.msg import CompressedImage, Image

from lsm_ros.preprocess import plan_crop
from lsm_ros.ros import conversions
from lsm_ros.ros.names import REJECT_ENCODING, REJECT_IMAGE_DATA, REJECT_SIZE_MISMATCH


class InputRejected(ValueError):
    """A pair that cannot be reconstructed; ``reason`` is one of the REJECT_* keys."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# Smallest image side lsm_ros.preprocess takes (it refuses a side under 2 pixels); an image must also leave a
# non-empty crop at the model resolution (lsm_ros.preprocess.plan_crop), else it is rejected as bad_image_data.
MIN_IMAGE_SIDE_PX = 2


def model_input_problem(width: int, height: int, resolution: int) -> str | None:
    """Why an image of ``width`` x ``height`` cannot be pre-processed for the model at ``resolution`` (None: it can):
    a side under :data:`MIN_IMAGE_SIDE_PX`, or a resize and crop (:func:`lsm_ros.preprocess.plan_crop`) that leaves
    nothing, e.g. a very elongated image at 512."""
    if width < MIN_IMAGE_SIDE_PX or height < MIN_IMAGE_SIDE_PX:
        return (f'{width}x{height} pixels is too small: the model\'s pre-processing needs at least '
                f'{MIN_IMAGE_SIDE_PX}x{MIN_IMAGE_SIDE_PX} pixels')
    try:
        plan_crop((width, height), resolution)   # type: ignore[arg-type]
    except ValueError as exc:
        return str(exc)
    return None


def decode_image(side: str, msg: Image | CompressedImage, stamp_text: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a raw or compressed image; raises :class:`InputRejected` (unsupported encoding, data
    that does not match its sizes or does not decode)."""
    if isinstance(msg, CompressedImage):
        try:
            return conversions.compressed_image_to_numpy(msg)
        except conversions.ImageConversionError as exc:
            raise InputRejected(REJECT_IMAGE_DATA, f'{side} compressed image ({msg.format!r}) at {stamp_text}: '
                                f'{exc}: dropped') from exc
    if msg.encoding not in conversions.SUPPORTED_IMAGE_ENCODINGS:
        raise InputRejected(REJECT_ENCODING, f'{side} image at {stamp_text} has encoding {msg.encoding!r}; '
                            f'lsm_node takes {", ".join(conversions.SUPPORTED_IMAGE_ENCODINGS)}: dropped')
    try:
        return conversions.image_to_numpy(msg)
    except conversions.ImageConversionError as exc:
        raise InputRejected(REJECT_IMAGE_DATA, f'{side} image at {stamp_text}: {exc}: dropped') from exc


def check_pair_images(left: np.ndarray, right: np.ndarray, resolution: int, stamp_text: str) -> None:
    """Raise :class:`InputRejected` unless both (H, W, 3) images can be pre-processed at ``resolution``
    (bad_image_data) and have the same size (size_mismatch)."""
    for side, array in (('left', left), ('right', right)):
        problem = model_input_problem(array.shape[1], array.shape[0], resolution)
        if problem is not None:
            raise InputRejected(REJECT_IMAGE_DATA, f'{side} image at {stamp_text}: {problem}: dropped')
    if left.shape != right.shape:
        (left_h, left_w), (right_h, right_w) = left.shape[:2], right.shape[:2]
        raise InputRejected(REJECT_SIZE_MISMATCH, f'pair at {stamp_text}: left image is {left_w}x{left_h}, right '
                            f'image {right_w}x{right_h}; both must have the same size: dropped')
