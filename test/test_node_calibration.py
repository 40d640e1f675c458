"""lsm_node's CameraInfo -> CameraCalibration alone (lsm_ros.ros.calibration): rectified intrinsics, baseline, the
rectified-stereo-rig flag (pose from the calibration instead of PnP) and a pair's CameraInfo lookup."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from sensor_msgs.msg import CameraInfo
from std_msgs.msg import Header

from lsm_ros.ros import conversions, names
from lsm_ros.ros.calibration import calibration_from_camera_infos, is_rectified_rig, pair_calibration
from lsm_ros.ros.input_checks import InputRejected
from lsm_ros.ros.sync import CameraInfoCache

pytestmark = pytest.mark.timeout(60)
K = np.array([[721.5, 0.0, 609.6], [0.0, 721.5, 172.9], [0.0, 0.0, 1.0]])   # KITTI-like rectified intrinsics
SIZE = (1242, 375)
BASELINE_M = 0.573


def rig(baseline_m: float = BASELINE_M) -> tuple[CameraInfo, CameraInfo]:
    """The CameraInfos stereo_image_proc expects of a rectified rig: equal P[:3,:3], right P[0,3] = -fx*B."""
    left = conversions.model_camera_info(K, *SIZE, Header(), P=np.hstack([K, np.zeros((3, 1))]))
    right = conversions.model_camera_info(K, *SIZE, Header(), P=np.hstack([K, [[-K[0, 0] * baseline_m], [0], [0]]]))
    return left, right


def test_a_rectified_rig_is_flagged_with_its_baseline() -> None:
    left, right = rig()
    assert is_rectified_rig(left, right)
    calibration = calibration_from_camera_infos(left, right, SIZE)
    assert calibration.rectified_stereo and calibration.baseline_m == pytest.approx(BASELINE_M)
    np.testing.assert_allclose(calibration.K_left, K)
    np.testing.assert_allclose(calibration.K_right, K)
    assert calibration.source == 'camera_info'


def _changed(info: CameraInfo, index: int, value: float) -> CameraInfo:
    info = copy.deepcopy(info)
    p = list(info.p)
    p[index] = value
    info.p = p
    return info


@pytest.mark.parametrize('what,make', [
    ('right P[1,3] (a vertical offset)', lambda l, r: (l, _changed(r, 7, -5.0))),
    ('right P[2,3]', lambda l, r: (l, _changed(r, 11, 0.1))),
    ('a left translation', lambda l, r: (_changed(l, 3, -10.0), r)),
    ('other right intrinsics', lambda l, r: (l, _changed(r, 0, 700.0))),
    ('another right principal point', lambda l, r: (l, _changed(r, 2, 600.0))),
    ('no baseline', lambda l, r: (l, _changed(r, 3, 0.0))),
    ('a negative baseline', lambda l, r: (l, _changed(r, 3, 400.0))),
    ('no projections (raw cameras)', lambda l, r: (_changed(_zero_p(l), 0, 0.0), _zero_p(r))),
])
def test_anything_but_a_rectified_rig_keeps_pnp(what: str, make) -> None:
    left, right = make(*rig())
    assert not is_rectified_rig(left, right), what
    try:
        calibration = calibration_from_camera_infos(left, right, SIZE)
    except ValueError:
        return   # an unusable calibration is rejected before (bad_camera_info)
    assert not calibration.rectified_stereo, what


def _zero_p(info: CameraInfo) -> CameraInfo:
    info = copy.deepcopy(info)
    info.p = [0.0] * 12
    return info


def test_pair_calibration_finds_the_camera_info_of_the_stamp_or_says_why_not() -> None:
    left, right = rig()
    cache: CameraInfoCache[CameraInfo] = CameraInfoCache()
    once: list[tuple[str, str]] = []
    topic = {'left': '/cam/left/camera_info', 'right': '/cam/right/camera_info'}.__getitem__

    def info_once(key: str, message: str) -> None:
        once.append((key, message))

    with pytest.raises(InputRejected) as missing:
        pair_calibration(cache, 1_000, SIZE, 0.5, topic, info_once)
    assert missing.value.reason == names.REJECT_NO_CAMERA_INFO and '/cam/left/camera_info' in str(missing.value)
    cache.update('left', 1_000, left)
    cache.update('right', 1_000, right)
    assert pair_calibration(cache, 1_000 + 400_000_000, SIZE, 0.5, topic, info_once).rectified_stereo
    with pytest.raises(InputRejected) as late:
        pair_calibration(cache, 1_000 + 600_000_000, SIZE, 0.5, topic, info_once)   # beyond the tolerance
    assert late.value.reason == names.REJECT_NO_CAMERA_INFO
    with pytest.raises(InputRejected) as other_size:
        pair_calibration(cache, 1_000, (640, 480), 0.5, topic, info_once)
    assert other_size.value.reason == names.REJECT_BAD_CAMERA_INFO and '1242x375' in str(other_size.value)
    cache.update('left', 2_000, left)
    cache.update('right', 2_000, rig(baseline_m=0.0)[1])
    for _ in range(2):
        calibration = pair_calibration(cache, 2_000, SIZE, 0.0, topic, info_once)
        assert calibration.baseline_m is None and not calibration.rectified_stereo
    assert [key for key, _ in once] == ['no_baseline_zero'] * 2   # NodeCounters.info_once logs a key once
    assert 'P[0,3] = -fx*B is 0' in once[0][1]
