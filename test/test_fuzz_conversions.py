"""Property-based fuzzing of the message conversions of lsm_ros.ros.conversions (no ROS graph needed).

Properties: for any Image, CompressedImage or CameraInfo (including values rclpy accepts in-process without range
checks: negative sizes, wrongly sized matrices), the conversions either return a well-formed result or raise the
documented :class:`ImageConversionError` / :class:`CameraInfoError`; valid inputs round-trip exactly (8-bit raw
encodings with row padding, PNG of every colour type and bit depth).
"""
from __future__ import annotations

import math
import resource
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
from builtin_interfaces.msg import Time
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header

from lsm_ros.ros import conversions as conv

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ROUND_TRIP = settings(FUZZ, max_examples=100)
HEADER = Header(stamp=Time(sec=7, nanosec=11), frame_id='fuzz')
OTHER_ENCODINGS = ('16UC1', 'mono16', 'yuv422', 'bayer_rggb8', '32FC1', '8UC3', 'RGB8', 'rgb8 ', '', 'rgb16')
# The largest int rclpy lets an in-process message hold is unbounded: try well past uint32 too.
SIZES = st.one_of(st.integers(0, 9), st.integers(-3, 3), st.integers(2**31 - 2, 2**32 + 2), st.integers(-2**40, 2**40))


# ----------------------------------------------------------------------------------------------- helpers
def _raw_image(pixels: np.ndarray, encoding: str, padding: bytes = b'', bigendian: int = 0) -> Image:
    """An Image of ``pixels`` (H, W[, C]) with ``padding`` appended to every row."""
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, -1)
    data = b''.join(row.tobytes() + padding for row in rows)
    msg = Image(header=HEADER, height=height, width=width, encoding=encoding, is_bigendian=bigendian,
                step=rows.shape[1] + len(padding))
    msg.data = conv.byte_array(data)
    return msg


def _expected_rgb(pixels: np.ndarray, encoding: str) -> np.ndarray:
    """What image_to_numpy must return for ``pixels`` stored in ``encoding`` (independent of the module's table)."""
    if encoding == 'mono8':
        return np.repeat(pixels[:, :, None], 3, axis=2)
    if encoding.startswith('bgr'):
        return pixels[:, :, [2, 1, 0]]
    return pixels[:, :, :3]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack('>I', len(payload)) + kind + payload + struct.pack('>I', zlib.crc32(kind + payload))


def _png(samples: np.ndarray, colour_type: int) -> bytes:
    """A PNG written here, not by OpenCV: (H, W, C) uint8 or uint16 samples, C = 1 (grey), 2 (grey + alpha),
    3 (RGB) or 4 (RGBA), PNG colour type 0, 4, 2 or 6."""
    height, width, _ = samples.shape
    depth = 16 if samples.dtype == np.uint16 else 8
    rows = samples.astype('>u2' if depth == 16 else 'u1').reshape(height, -1)
    raw = b''.join(b'\x00' + row.tobytes() for row in rows)
    header = struct.pack('>IIBBBBB', width, height, depth, colour_type, 0, 0, 0)
    return (conv.PNG_SIGNATURE + _png_chunk(b'IHDR', header) + _png_chunk(b'IDAT', zlib.compress(raw))
            + _png_chunk(b'IEND', b''))


def _compressed(data: bytes, image_format: str = 'png') -> CompressedImage:
    msg = CompressedImage(header=HEADER, format=image_format)
    msg.data = conv.byte_array(data)
    return msg


def _check_rgb(out: np.ndarray, height: int | None = None, width: int | None = None) -> None:
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.flags.c_contiguous and out.shape[0] > 0 and out.shape[1] > 0
    if height is not None:
        assert out.shape[:2] == (height, width)


def _camera_info(K: list[float], P: list[float], width: int = 64, height: int = 48,
                 d: list[float] | None = None, distortion_model: str = 'plumb_bob') -> CameraInfo:
    info = CameraInfo(header=HEADER, width=width, height=height, distortion_model=distortion_model)
    info.k, info.p, info.d = K, P, [0.0] * 5 if d is None else d
    return info


# ------------------------------------------------------------------------------------------------ Image
def _pick(draw: st.DrawFn, *choices: st.SearchStrategy) -> object:
    """Draw from one of ``choices``, each equally likely (st.one_of leans towards the simplest branch)."""
    return draw(choices[draw(st.integers(0, len(choices) - 1))])


@st.composite
def arbitrary_images(draw: st.DrawFn) -> Image:
    """Image messages with any encoding, sizes (huge and negative included), step, data and endianness flag;
    about a third of them consistent."""
    supported = st.sampled_from(conv.SUPPORTED_IMAGE_ENCODINGS)
    encoding = _pick(draw, supported, supported, st.sampled_from(OTHER_ENCODINGS), st.text(max_size=10))
    height = _pick(draw, st.integers(1, 9), st.integers(-3, 9), SIZES)
    width = _pick(draw, st.integers(1, 9), st.integers(-3, 9), SIZES)
    channels = conv.COLOR_ENCODINGS[encoding][0] if encoding in conv.COLOR_ENCODINGS else draw(st.integers(1, 4))
    row_bytes = width * channels
    step = _pick(draw, st.just(row_bytes), st.integers(max(row_bytes, 0), max(row_bytes, 0) + 8), SIZES)
    consistent = step * height
    near = [n for n in (consistent, consistent - 1, consistent + 1) if 0 <= n <= 4096]
    length = _pick(draw, st.sampled_from(near or [0]), st.just(near[0] if near else 0), st.integers(0, 600))
    msg = Image(header=HEADER, height=height, width=width, step=step, encoding=encoding,
                is_bigendian=draw(st.integers(0, 255)))
    msg.data = conv.byte_array(draw(st.binary(min_size=length, max_size=length)))
    return msg


@FUZZ
@given(arbitrary_images())
def test_any_image_converts_or_raises_image_conversion_error(msg: Image) -> None:
    valid = (msg.encoding in conv.COLOR_ENCODINGS and msg.height > 0 and msg.width > 0
             and msg.step >= msg.width * conv.COLOR_ENCODINGS[msg.encoding][0]
             and len(msg.data) == msg.step * msg.height)
    try:
        out = conv.image_to_numpy(msg)
    except conv.ImageConversionError as exc:
        assert not valid, exc
        assert isinstance(exc, ValueError) and str(exc)
        return
    assert valid
    _check_rgb(out, msg.height, msg.width)


@ROUND_TRIP
@given(st.sampled_from(conv.SUPPORTED_IMAGE_ENCODINGS), st.integers(1, 9), st.integers(1, 9),
       st.binary(max_size=9), st.integers(0, 1), st.data())
def test_valid_raw_images_round_trip_exactly(encoding: str, height: int, width: int, padding: bytes,
                                             bigendian: int, data: st.DataObject) -> None:
    channels = conv.COLOR_ENCODINGS[encoding][0]
    shape = (height, width) if channels == 1 else (height, width, channels)
    pixels = data.draw(hnp.arrays(np.uint8, shape))
    out = conv.image_to_numpy(_raw_image(pixels, encoding, padding, bigendian))
    _check_rgb(out, height, width)
    np.testing.assert_array_equal(out, _expected_rgb(pixels, encoding))


@ROUND_TRIP
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=8).map(
    lambda s: (s[0], s[1], 3))))
def test_rgb_and_mono_messages_round_trip_through_cdr(rgb: np.ndarray) -> None:
    msg = deserialize_message(serialize_message(conv.rgb_to_image_msg(rgb, HEADER)), Image)
    np.testing.assert_array_equal(conv.image_to_numpy(msg), rgb)
    mono = np.ascontiguousarray(rgb[:, :, 1])
    msg = deserialize_message(serialize_message(conv.mono_to_image_msg(mono, HEADER)), Image)
    np.testing.assert_array_equal(conv.image_to_numpy(msg), np.repeat(mono[:, :, None], 3, axis=2))


@FUZZ
@given(st.sampled_from(conv.SUPPORTED_IMAGE_ENCODINGS), st.integers(2**16, 2**31), st.integers(2**16, 2**31),
       st.binary(max_size=64))
def test_huge_dimensions_with_tiny_data_are_refused_at_once(encoding: str, height: int, width: int,
                                                           data: bytes) -> None:
    channels = conv.COLOR_ENCODINGS[encoding][0]
    msg = Image(header=HEADER, height=height, width=width, encoding=encoding, step=width * channels)
    msg.data = conv.byte_array(data)
    with pytest.raises(conv.ImageConversionError, match='truncated'):
        conv.image_to_numpy(msg)


def test_negative_sizes_are_refused() -> None:
    msg = Image(header=HEADER, height=1, width=-2, encoding='rgb8', step=0)  # rclpy stores these unchecked
    with pytest.raises(conv.ImageConversionError, match='negative'):
        conv.image_to_numpy(msg)


# ------------------------------------------------------------------------------------- CompressedImage
FORMATS = ('jpeg', 'png', 'jpg', 'PNG', 'JPEG', ' png ', 'rgb8; jpeg compressed bgr8', 'bgr8; png compressed bgr8',
           'mono8; png compressed mono8', 'rgba8; png compressed bgra8', '16UC1; compressedDepth png',
           '32FC1; compressedDepth', 'theora', 'tiff', 'webp', 'bmp', '', 'rgb8; zstd compressed', 'raw')
ODD_FORMATS = st.one_of(st.sampled_from(FORMATS), st.text(max_size=30))
PREFIXES = st.sampled_from([b'', conv.PNG_SIGNATURE, conv.PNG_SIGNATURE + b'\x00\x00\x00\x0dIHDR',
                            conv.JPEG_SIGNATURE, conv.JPEG_SIGNATURE + b'\xe0\x00\x10JFIF\x00', b'P5\n1 1\n255\n',
                            b'BM', b'II*\x00', b'RIFF\x00\x00\x00\x00WEBP'])


def _format_names_supported_codec(image_format: str) -> bool:
    text = image_format.strip().lower()
    return 'compresseddepth' not in text.replace(' ', '') and any(c in text for c in ('jpeg', 'jpg', 'png'))


@FUZZ
@given(ODD_FORMATS, PREFIXES, st.binary(max_size=300))
def test_any_compressed_image_decodes_or_raises_image_conversion_error(image_format: str, prefix: bytes,
                                                                       tail: bytes) -> None:
    msg = _compressed(prefix + tail, image_format)
    try:
        out = conv.compressed_image_to_numpy(msg)
    except conv.ImageConversionError as exc:
        assert str(exc)
        if not _format_names_supported_codec(image_format):
            assert 'format' in str(exc) or 'compressed depth' in str(exc)
        return
    assert _format_names_supported_codec(image_format)
    assert bytes(msg.data[:8]) == conv.PNG_SIGNATURE or bytes(msg.data[:3]) == conv.JPEG_SIGNATURE
    _check_rgb(out)


@st.composite
def truncated_payloads(draw: st.DrawFn) -> tuple[bytes, str, np.ndarray]:
    codec = draw(st.sampled_from(conv.COMPRESSED_CODECS))
    rgb = draw(hnp.arrays(np.uint8, (draw(st.integers(1, 12)), draw(st.integers(1, 12)), 3)))
    data = bytes(conv.rgb_to_compressed_image_msg(rgb, HEADER, codec=codec).data)
    return data[:draw(st.integers(0, len(data) - 1))], codec, rgb


@FUZZ
@given(truncated_payloads(), st.sampled_from(FORMATS[:9]))
def test_truncated_jpeg_and_png_are_refused(payload: tuple[bytes, str, np.ndarray], image_format: str) -> None:
    data, codec, rgb = payload
    try:
        out = conv.compressed_image_to_numpy(_compressed(data, image_format))
    except conv.ImageConversionError:
        return
    # Only a PNG cut inside its final IEND chunk may still hold the whole image; then it must be exact.
    assert codec == 'png', len(data)
    np.testing.assert_array_equal(out, rgb)


@ROUND_TRIP
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=16).map(
    lambda s: (s[0], s[1], 3))), st.sampled_from([f for f in FORMATS if _format_names_supported_codec(f)]))
def test_png_round_trips_exactly_under_any_accepted_format(rgb: np.ndarray, image_format: str) -> None:
    msg = conv.rgb_to_compressed_image_msg(rgb, HEADER, codec='png')
    assert msg.format == 'rgb8; png compressed bgr8'
    msg = deserialize_message(serialize_message(msg), CompressedImage)
    msg.format = image_format  # the payload's signature decides the codec
    np.testing.assert_array_equal(conv.compressed_image_to_numpy(msg), rgb)


@ROUND_TRIP
@given(st.sampled_from([(1, 0), (2, 4), (3, 2), (4, 6)]), st.sampled_from([np.uint8, np.uint16]), st.data())
def test_png_of_every_colour_type_and_depth_gives_rgb(channels_and_type: tuple[int, int], dtype: type,
                                                     data: st.DataObject) -> None:
    """Grey, grey + alpha, RGB, RGBA at 8 and 16 bits, written without OpenCV: alpha dropped, grey replicated,
    16-bit samples reduced to their high byte."""
    channels, colour_type = channels_and_type
    samples = data.draw(hnp.arrays(dtype, (data.draw(st.integers(1, 10)), data.draw(st.integers(1, 10)), channels)))
    out = conv.compressed_image_to_numpy(_compressed(_png(samples, colour_type), 'png'))
    eight_bit = (samples >> 8).astype(np.uint8) if dtype == np.uint16 else samples
    expected = np.repeat(eight_bit[:, :, :1], 3, axis=2) if channels <= 2 else eight_bit[:, :, :3]
    np.testing.assert_array_equal(out, expected)


@ROUND_TRIP
@given(st.integers(1, 24), st.integers(1, 24), st.tuples(*[st.integers(0, 255)] * 3), st.integers(80, 100))
def test_jpeg_of_a_flat_colour_decodes_to_that_colour(height: int, width: int, colour: tuple[int, int, int],
                                                     quality: int) -> None:
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = colour
    out = conv.compressed_image_to_numpy(conv.rgb_to_compressed_image_msg(rgb, HEADER, quality=quality))
    _check_rgb(out, height, width)
    assert np.abs(out.astype(int) - rgb).max() <= 6   # chroma subsampling and quantisation only


HEADER_SIZES = st.one_of(st.tuples(st.integers(1, 300), st.integers(1, 300)),
                        st.tuples(st.integers(1, 65535), st.integers(1, 65535)).filter(
                            lambda size: size[0] * size[1] > conv.MAX_DECODED_PIXELS))


@FUZZ
@given(st.sampled_from(conv.COMPRESSED_CODECS), HEADER_SIZES)
def test_header_sizes_are_checked_before_decoding(codec: str, size: tuple[int, int]) -> None:
    """A header claiming any size: either it is within MAX_DECODED_PIXELS (and the forged payload then fails to
    decode) or it is refused as too large, never decoded."""
    width, height = size
    data = bytearray(conv.rgb_to_compressed_image_msg(np.zeros((4, 4, 3), np.uint8), HEADER, codec=codec).data)
    if codec == 'png':
        data[16:24] = struct.pack('>II', width, height)   # IHDR, its CRC left stale
    else:
        sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
        data[sof + 5:sof + 9] = struct.pack('>HH', height, width)
    try:
        out = conv.compressed_image_to_numpy(_compressed(bytes(data), codec))
    except conv.ImageConversionError as exc:
        if width * height > conv.MAX_DECODED_PIXELS:
            assert 'exceeds' in str(exc)
        return
    assert (height, width) == (4, 4) or codec == 'jpeg'
    _check_rgb(out, height, width)


def test_a_png_decompression_bomb_is_refused_without_decoding() -> None:
    """Regression: a PNG header's size was only checked after decoding, so 160 kB of PNG saying 9000x9000 16-bit
    grey (162 MB decoded; a 1.1 MB one of 12000x12000 RGBA took 11 s and 2.2 GB) was decoded in full first."""
    width = height = 9000
    row = b'\x00' + bytes(width * 2)
    compressor = zlib.compressobj(9)
    idat = b''.join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    data = (conv.PNG_SIGNATURE + _png_chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 16, 0, 0, 0, 0))
            + _png_chunk(b'IDAT', idat) + _png_chunk(b'IEND', b''))
    assert len(data) < 200_000
    peak_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(conv.ImageConversionError, match='9000x9000 exceeds'):
        conv.compressed_image_to_numpy(_compressed(data, 'mono16; png compressed mono16'))
    assert time.perf_counter() - started < 0.2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before_kb < 50_000


def test_non_jpeg_non_png_payloads_are_not_decoded() -> None:
    """OpenCV would decode a PGM, BMP, ... whatever the format says; only JPEG and PNG are accepted."""
    pgm = b'P5\n2 2\n255\n\x00\x01\x02\x03'
    assert cv2.imdecode(np.frombuffer(pgm, np.uint8), cv2.IMREAD_UNCHANGED) is not None
    with pytest.raises(conv.ImageConversionError, match='neither a jpeg nor a png'):
        conv.compressed_image_to_numpy(_compressed(pgm, 'jpeg'))


def test_a_jpeg_without_end_marker_is_truncated() -> None:
    data = bytes(conv.rgb_to_compressed_image_msg(np.zeros((8, 8, 3), np.uint8), HEADER).data)
    with pytest.raises(conv.ImageConversionError, match='end-of-image'):
        conv.compressed_image_to_numpy(_compressed(data[:-2], 'jpeg'))
    padded = conv.compressed_image_to_numpy(_compressed(data + bytes(16), 'jpeg'))   # zero padding is fine
    assert padded.shape == (8, 8, 3)


# ----------------------------------------------------------------------------------------------- CameraInfo
SPECIAL_FLOATS = st.sampled_from([0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e-300, 1e300, -1e300,
                                  5e-324])
ANY_FLOAT = st.one_of(st.floats(allow_nan=True, allow_infinity=True), SPECIAL_FLOATS)


@st.composite
def valid_projection(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, float, int, int]:
    """(K, P of the right camera, baseline, width, height) of a plausible calibrated rectified stereo camera."""
    fx, fy = draw(st.floats(1.0, 5000.0)), draw(st.floats(1.0, 5000.0))
    width, height = draw(st.integers(1, 4096)), draw(st.integers(1, 4096))
    cx, cy = draw(st.floats(-width, 2.0 * width)), draw(st.floats(-height, 2.0 * height))
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    baseline = draw(st.floats(1e-3, 10.0))
    P = np.hstack([K, [[-fx * baseline], [0.0], [0.0]]])
    return K, P, baseline, width, height


@st.composite
def garbage_camera_infos(draw: st.DrawFn) -> CameraInfo:
    """CameraInfo with any values and matrix sizes (rclpy keeps wrongly sized arrays set in-process)."""
    def matrix(size: int) -> list[float]:
        length = draw(st.one_of(st.just(size), st.integers(0, 16)))
        return draw(st.lists(ANY_FLOAT, min_size=length, max_size=length))
    if draw(st.booleans()):   # a valid calibration with a few entries spoilt
        K, P, _, width, height = draw(valid_projection())
        K_list, P_list = K.ravel().tolist(), P.ravel().tolist()
        for _ in range(draw(st.integers(1, 3))):
            target = draw(st.sampled_from([K_list, P_list]))
            target[draw(st.integers(0, len(target) - 1))] = draw(ANY_FLOAT)
    else:
        K_list, P_list = matrix(9), matrix(12)
        width, height = draw(SIZES), draw(SIZES)
    return _camera_info(K_list, P_list, width, height, d=draw(st.lists(ANY_FLOAT, max_size=15)),
                        distortion_model=draw(st.sampled_from(['plumb_bob', 'rational_polynomial', 'equidistant', '',
                                                               'unknown'])))


def _is_pinhole(M: np.ndarray) -> bool:
    return bool(np.isfinite(M).all() and M[0, 0] > 0 and M[1, 1] > 0 and M[1, 0] == 0
                and np.allclose(M[2], (0.0, 0.0, 1.0), rtol=0, atol=1e-9))


@FUZZ
@given(garbage_camera_infos())
def test_any_camera_info_gives_a_usable_calibration_or_camera_info_error(info: CameraInfo) -> None:
    try:
        K, P, width, height = conv.camera_info_to_matrices(info)
    except conv.CameraInfoError as exc:
        assert isinstance(exc, ValueError) and str(exc)
        with pytest.raises(conv.CameraInfoError):
            conv.rectified_intrinsics(info)
    else:
        assert K.shape == (3, 3) and P.shape == (3, 4) and width > 0 and height > 0
        assert np.isfinite(P).all() and _is_pinhole(K)
        np.testing.assert_array_equal(K.ravel(), np.asarray(info.k, dtype=np.float64))
        try:
            rectified = conv.rectified_intrinsics(info)
        except conv.CameraInfoError as exc:
            assert 'P is set' in str(exc)
        else:
            assert _is_pinhole(rectified)
    baseline = conv.stereo_baseline_from_camera_info(info)
    assert baseline is None or (isinstance(baseline, float) and math.isfinite(baseline) and baseline > 0)


@FUZZ
@given(valid_projection(), st.lists(st.floats(-1.0, 1.0), max_size=15),
       st.sampled_from(['plumb_bob', 'rational_polynomial', 'equidistant', '']))
def test_valid_calibration_round_trips_whatever_the_distortion(projection: tuple, d: list[float],
                                                              distortion_model: str) -> None:
    K, P, baseline, width, height = projection
    info = deserialize_message(serialize_message(_camera_info(K.ravel().tolist(), P.ravel().tolist(), width, height,
                                                              d, distortion_model)), CameraInfo)
    K_out, P_out, width_out, height_out = conv.camera_info_to_matrices(info)
    np.testing.assert_array_equal(K_out, K)
    np.testing.assert_array_equal(P_out, P)
    assert (width_out, height_out) == (width, height)
    np.testing.assert_array_equal(conv.rectified_intrinsics(info), P[:, :3])
    assert conv.stereo_baseline_from_camera_info(info) == pytest.approx(baseline, rel=1e-9)
    unset_p = _camera_info(K.ravel().tolist(), [0.0] * 12, width, height, d, distortion_model)
    np.testing.assert_array_equal(conv.rectified_intrinsics(unset_p), K)   # no P: the camera's K
    assert conv.stereo_baseline_from_camera_info(unset_p) is None


@pytest.mark.parametrize('entry, value, message', [
    (0, 0.0, 'non-positive'), (0, -500.0, 'non-positive'), (4, -1.0, 'non-positive'), (0, math.nan, 'non-finite'),
    (2, math.inf, 'non-finite'), (8, 0.0, 'not a pinhole'), (6, 3.0, 'not a pinhole'), (3, 1.0, 'not a pinhole'),
    (8, 2.0, 'not a pinhole')])
def test_spoilt_k_is_refused(entry: int, value: float, message: str) -> None:
    K = [500.0, 0.0, 320.0, 0.0, 500.0, 240.0, 0.0, 0.0, 1.0]
    K[entry] = value
    with pytest.raises(conv.CameraInfoError, match=message):
        conv.camera_info_to_matrices(_camera_info(K, [0.0] * 12))


@pytest.mark.parametrize('entry, value', [(0, -450.0), (5, -450.0), (10, 0.0), (8, 1.0), (4, 2.0)])
def test_a_set_but_malformed_p_is_refused_not_replaced_by_k(entry: int, value: float) -> None:
    """Regression: a P with e.g. a negative focal length was silently replaced by the raw camera's K."""
    K = [500.0, 0.0, 320.0, 0.0, 500.0, 240.0, 0.0, 0.0, 1.0]
    P = [450.0, 0.0, 310.0, -54.0, 0.0, 450.0, 235.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    P[entry] = value
    with pytest.raises(conv.CameraInfoError, match='P is set'):
        conv.rectified_intrinsics(_camera_info(K, P))


@pytest.mark.parametrize('field, size', [('k', 8), ('k', 0), ('k', 12), ('p', 9), ('p', 13)])
def test_wrongly_sized_matrices_raise_camera_info_error(field: str, size: int) -> None:
    """rclpy does not check array sizes of in-process messages: a reshape ValueError used to escape."""
    info = _camera_info([500.0, 0.0, 320.0, 0.0, 500.0, 240.0, 0.0, 0.0, 1.0], [0.0] * 12)
    setattr(info, field, [1.0] * size)
    with pytest.raises(conv.CameraInfoError, match='values, expected'):
        conv.camera_info_to_matrices(info)
    if field == 'p':
        assert conv.stereo_baseline_from_camera_info(info) is None


def test_overflowing_baseline_is_unknown() -> None:
    """Regression: P[0,0] = 1e-300 with P[0,3] = -1e300 gave an infinite baseline instead of None."""
    P = [1e-300, 0.0, 0.0, -1e300, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert conv.stereo_baseline_from_camera_info(_camera_info([1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0], P)) is None
