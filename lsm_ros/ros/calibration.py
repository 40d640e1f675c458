"""CameraInfo -> :class:`~lsm_ros.pipeline.CameraCalibration` for ``lsm_node`` (no node state): the rectified
intrinsics of both images, the stereo baseline of a calibrated rig (right ``P[0,3] = -fx*B``), why a right CameraInfo
gives no baseline, whether both describe a rectified stereo rig (then the relative pose comes from the calibration,
not PnP), and :func:`pair_calibration`, which finds a pair's CameraInfo in the node's cache and turns what is
missing or unusable into the node's rejection (:class:`~lsm_ros.ros.input_checks.InputRejected`)."""
from __future__ import annotations

from typing import Callable

import numpy as np
from sensor_msgs.msg import CameraInfo

from lsm_ros.cameras import is_rectified_stereo_rig
from lsm_ros.pipeline import CameraCalibration
from lsm_ros.ros import conversions
from lsm_ros.ros.input_checks import InputRejected
from lsm_ros.ros.names import REJECT_BAD_CAMERA_INFO, REJECT_NO_CAMERA_INFO, stamp_text
from lsm_ros.ros.sync import CameraInfoCache, Side


def calibration_from_camera_infos(left_info: CameraInfo, right_info: CameraInfo,
                                  size: tuple[int, int]) -> CameraCalibration:
    """The rectified intrinsics and stereo baseline (None when the right CameraInfo has none) of a pair whose images
    are ``size`` = (width, height), flagged ``rectified_stereo`` when the two CameraInfos describe a rectified rig
    (:func:`is_rectified_rig`: the pose then comes from the calibration, not PnP); raises ValueError
    (:class:`~lsm_ros.ros.conversions.CameraInfoError`, or :class:`~lsm_ros.pipeline.CameraCalibration`'s own checks)
    when a CameraInfo is unusable or for another size."""
    for side, info in (('left', left_info), ('right', right_info)):
        _, _, width, height = conversions.camera_info_to_matrices(info)
        if (width, height) != size:
            raise conversions.CameraInfoError(
                f'{side} CameraInfo is for {width}x{height} images, the images are {size[0]}x{size[1]}')
    K_left = conversions.rectified_intrinsics(left_info)
    K_right = conversions.rectified_intrinsics(right_info)
    baseline = conversions.stereo_baseline_from_camera_info(right_info)
    return CameraCalibration(K_left=K_left, K_right=K_right, baseline_m=baseline, source='camera_info',
                             rectified_stereo=baseline is not None and is_rectified_rig(left_info, right_info))


def is_rectified_rig(left_info: CameraInfo, right_info: CameraInfo) -> bool:
    """Whether two CameraInfos (of images of one size) describe a rectified stereo rig, as stereo_image_proc's
    inputs do: both projections ``P`` set with the same ``P[:3, :3]`` (the images are rectified to it), the right
    one ``P[0,3] = -fx*B`` (B > 0) and no other translation (:func:`lsm_ros.cameras.is_rectified_stereo_rig`)."""
    P_left = np.asarray(left_info.p, dtype=np.float64)
    P_right = np.asarray(right_info.p, dtype=np.float64)
    if P_left.size != 12 or P_right.size != 12 or not (P_left.any() and P_right.any()):
        return False   # no rectified projection: the images are not known to be rectified
    P_left, P_right = P_left.reshape(3, 4), P_right.reshape(3, 4)
    if P_left[:, 3].any():
        return False   # the left camera is the rig's origin
    return is_rectified_stereo_rig(P_left[:, :3], P_right[:, :3], P_right)


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


def pair_calibration(cache: CameraInfoCache[CameraInfo] | None, stamp_ns: int, size: tuple[int, int],
                     tolerance_s: float, info_topic: Callable[[Side], str],
                     info_once: Callable[[str, str], None]) -> CameraCalibration:
    """The calibration of the pair at ``stamp_ns`` (images of ``size`` = (width, height)) from the CameraInfo of each
    side in ``cache`` within ``tolerance_s`` of the stamp. Raises :class:`InputRejected`: missing_camera_info (none in
    time on the topic ``info_topic(side)`` names in the message), bad_camera_info (unusable). A CameraInfo
    without a baseline is no error: ``info_once(key, message)`` says so once per kind."""
    text = stamp_text(stamp_ns)
    tolerance_ns = round(tolerance_s * 1e9)
    infos: dict[Side, CameraInfo] = {}
    for side in ('left', 'right'):
        info = cache.lookup(side, stamp_ns, tolerance_ns) if cache is not None else None
        if info is None:
            raise InputRejected(REJECT_NO_CAMERA_INFO, (
                f'no CameraInfo on {info_topic(side)} within camera_info_tolerance_s = {tolerance_s} s of the pair '
                f'at {text}: dropped. Publish it, or set use_camera_info:=false to estimate the intrinsics from the '
                'images (no metric scale).'))
        infos[side] = info
    try:
        calibration = calibration_from_camera_infos(infos['left'], infos['right'], size)
    except ValueError as exc:  # CameraInfoError, or CameraCalibration's own checks
        raise InputRejected(REJECT_BAD_CAMERA_INFO, f'pair at {text}: unusable CameraInfo: {exc}. Fix the '
                            'calibration or set use_camera_info:=false: dropped') from exc
    if calibration.baseline_m is None:
        kind, seen = no_baseline_reason(infos['right'])
        info_once(f'no_baseline_{kind}', f'{seen}: products are in model units, not metres')
    return calibration
