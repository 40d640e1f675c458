"""Checks of ``lsm_node``'s input that need no node state: whether an image size suits the model, a pair's stereo
calibration from its CameraInfo, why a right CameraInfo gives no baseline. They return or raise the problem; the
node (:class:`~lsm_ros.ros.node.LsmNode`) turns it into a rejection reason (``REJECT_*``) or a log line."""
from __future__ import annotations

import numpy as np
from sensor_msgs.msg import CameraInfo

from lsm_ros.pipeline import CameraCalibration
from lsm_ros.preprocess import plan_crop
from lsm_ros.ros import conversions

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


def calibration_from_camera_infos(left_info: CameraInfo, right_info: CameraInfo,
                                  size: tuple[int, int]) -> CameraCalibration:
    """The rectified intrinsics and stereo baseline (None when the right CameraInfo has none) of a pair whose images
    are ``size`` = (width, height); raises ValueError (:class:`~lsm_ros.ros.conversions.CameraInfoError`, or
    :class:`~lsm_ros.pipeline.CameraCalibration`'s own checks) when a CameraInfo is unusable or for another size."""
    for side, info in (('left', left_info), ('right', right_info)):
        _, _, width, height = conversions.camera_info_to_matrices(info)
        if (width, height) != size:
            raise conversions.CameraInfoError(
                f'{side} CameraInfo is for {width}x{height} images, the images are {size[0]}x{size[1]}')
    K_left = conversions.rectified_intrinsics(left_info)
    K_right = conversions.rectified_intrinsics(right_info)
    return CameraCalibration(K_left=K_left, K_right=K_right,
                             baseline_m=conversions.stereo_baseline_from_camera_info(right_info),
                             source='camera_info')


def no_baseline_reason(right_info: CameraInfo) -> tuple[str, str]:
    """(kind, what was seen) for a right CameraInfo that gives no stereo baseline, where ``P[0,3] = -fx*B`` with B >
    0 is expected. kind: 'zero' (P[0,3] is 0: a monocular or unrectified calibration), 'wrong_sign' (P[0,3] > 0:
    a negative baseline, e.g. the left camera's info on the right topic or swapped cameras), 'no_projection' (P
    malformed, all zeros or its fx not positive) or 'not_finite' (P, or B = -P[0,3]/fx, is not finite)."""
    try:
        P = np.asarray(right_info.p, dtype=np.float64).reshape(3, 4)
    except ValueError:
        return 'no_projection', f'the right CameraInfo has a malformed projection P ({len(right_info.p)} values)'
    fx, tx = P[0, 0], P[0, 3]
    if not np.isfinite(P).all():
        return 'not_finite', f'the right CameraInfo\'s projection P is not finite (P[0,3] = {tx!r})'
    if fx <= 0:
        return 'no_projection', (f'the right CameraInfo has no rectified projection P (P[0,0] = fx = {fx:g}), so no '
                                 'stereo baseline (P[0,3] = -fx*B)')
    if tx == 0:
        return 'zero', 'the right CameraInfo has no stereo baseline (P[0,3] = -fx*B is 0)'
    if tx < 0:
        return 'not_finite', (f'the right CameraInfo\'s baseline B = -P[0,3]/fx = {-tx:g}/{fx:g} is not a finite '
                              'number')
    return 'wrong_sign', (f'the right CameraInfo has P[0,3] = {tx:g} > 0, which is a negative baseline B = -P[0,3]/fx '
                          f'= {-tx / fx:g} (the right camera of a stereo pair has P[0,3] = -fx*B < 0: is the left '
                          'camera\'s CameraInfo on the right topic, or are the cameras swapped?); it is not used')
