"""numpy <-> ROS message conversions (no cv_bridge, no sensor_msgs_py): images, camera infos, clouds, poses.

Conventions: images are row-major (H, W[, C]); 3-D quantities are in REP 103 optical frames (x right,
y down, z forward); 4x4 poses ``T_a_b`` map points of frame b into frame a; quaternions are ROS (x, y, z, w).
Every conversion is vectorised (a 131k-point cloud takes a few milliseconds).
"""
from __future__ import annotations

import array
import sys
from typing import Any

import cv2

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Pose, PoseStamped, Quaternion, Transform, TransformStamped, Vector3
from geometry_msgs.msg import Point as PointMsg
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointField, PointCloud2
from std_msgs.msg import Header

# 8-bit colour encodings accepted from cameras: name -> (channels, indices of R, G, B in a pixel).
COLOR_ENCODINGS: dict[str, tuple[int, tuple[int, int, int]]] = {
    'rgb8': (3, (0, 1, 2)),
    'bgr8': (3, (2, 1, 0)),
    'rgba8': (4, (0, 1, 2)),
    'bgra8': (4, (2, 1, 0)),
    'mono8': (1, (0, 0, 0)),
}
SUPPORTED_IMAGE_ENCODINGS: tuple[str, ...] = tuple(COLOR_ENCODINGS)
DEPTH_ENCODING = '32FC1'

# ~/points layout: x y z rgb confidence, all FLOAT32 (rgb: 0x00RRGGBB bits read as a float, as PCL/RViz);
# with semantic labels also ``label``, UINT32 at offset 20 (a 24-byte point) as PCL's PointXYZRGBL has it, so
# pcl::fromROSMsg into PointXYZRGBL keeps it (PCL matches fields by name and type; rgb FLOAT32 fills its rgba).
POINT_FIELD_NAMES: tuple[str, ...] = ('x', 'y', 'z', 'rgb', 'confidence')
POINT_STEP = 4 * len(POINT_FIELD_NAMES)
LABEL_FIELD_NAME = 'label'
LABELLED_POINT_STEP = POINT_STEP + 4
_POINT_DTYPE = np.dtype([(name, '<f4') for name in POINT_FIELD_NAMES])
_LABELLED_POINT_DTYPE = np.dtype({'names': list(POINT_FIELD_NAMES) + [LABEL_FIELD_NAME],
                                  'formats': ['<f4'] * len(POINT_FIELD_NAMES) + ['<u4'],
                                  'offsets': [4 * i for i in range(len(POINT_FIELD_NAMES))] + [POINT_STEP],
                                  'itemsize': LABELLED_POINT_STEP})
_UINT32_MAX = (1 << 32) - 1
_POINTFIELD_NUMPY_TYPES = {PointField.INT8: 'i1', PointField.UINT8: 'u1', PointField.INT16: 'i2',
                           PointField.UINT16: 'u2', PointField.INT32: 'i4', PointField.UINT32: 'u4',
                           PointField.FLOAT32: 'f4', PointField.FLOAT64: 'f8'}


class ImageConversionError(ValueError):
    """An Image message cannot be read (unsupported encoding, inconsistent sizes, truncated data)."""


class CameraInfoError(ValueError):
    """A CameraInfo message holds no usable calibration."""


def byte_array(data: np.ndarray | bytes) -> array.array:
    """A ``uint8[]`` message field value (``array.array('B')``): assigning it skips rclpy's per-byte checks."""
    out = array.array('B')
    out.frombytes(data if isinstance(data, (bytes, bytearray)) else np.ascontiguousarray(data).tobytes())
    return out


def stamp_to_seconds(stamp: Time) -> float:
    """builtin_interfaces/Time -> float seconds."""
    return stamp.sec + stamp.nanosec * 1e-9


def stamp_to_nanoseconds(stamp: Time) -> int:
    """builtin_interfaces/Time -> integer nanoseconds (exact, for pairing and ordering)."""
    return stamp.sec * 1_000_000_000 + stamp.nanosec


def nanoseconds_to_stamp(nanoseconds: int) -> Time:
    """Integer nanoseconds -> builtin_interfaces/Time."""
    sec, nanosec = divmod(int(nanoseconds), 1_000_000_000)
    return Time(sec=sec, nanosec=nanosec)


def make_header(stamp: Time, frame_id: str) -> Header:
    """A new Header (messages never share a Header object)."""
    return Header(stamp=Time(sec=stamp.sec, nanosec=stamp.nanosec), frame_id=frame_id)


# ------------------------------------------------------------------------------------------------ images
def image_to_numpy(msg: Image) -> np.ndarray:
    """sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8) -> (H, W, 3) uint8 RGB, a new array.

    Mono images are replicated into the three channels (the model takes RGB); alpha is dropped. Row padding
    (``step`` > width * channels) is skipped. ``is_bigendian`` does not matter for 8-bit data.
    Raises :class:`ImageConversionError` for other encodings, zero or negative sizes and data inconsistent with
    ``height * step`` (rclpy does not range-check fields set in-process, so negative sizes can occur).
    """
    encoding = msg.encoding
    if not isinstance(encoding, str) or encoding not in COLOR_ENCODINGS:
        raise ImageConversionError(f'unsupported image encoding {encoding!r}: use one of '
                                   f'{list(SUPPORTED_IMAGE_ENCODINGS)}')
    channels, rgb_index = COLOR_ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0 or step < 0:
        raise ImageConversionError(f'empty or negative {encoding} image ({width}x{height}, step {step})')
    row_bytes = width * channels
    if step < row_bytes:
        raise ImageConversionError(f'{encoding} image {width}x{height}: step {step} is smaller than '
                                   f'width * {channels} = {row_bytes}')
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size != step * height:
        kind = 'truncated' if data.size < step * height else 'oversized'
        raise ImageConversionError(f'{kind} {encoding} image {width}x{height}: {data.size} data bytes, '
                                   f'expected step * height = {step} * {height} = {step * height}')
    pixels = data.reshape(height, step)[:, :row_bytes].reshape(height, width, channels)
    return np.ascontiguousarray(pixels[:, :, list(rgb_index)])


# Largest compressed payload decoded (bytes) and decoded image (pixels): a corrupt or hostile message cannot
# make the decoder allocate without bound (the size is read from the header before anything is decoded).
MAX_COMPRESSED_BYTES = 64 * 1024 * 1024
MAX_DECODED_PIXELS = 8192 * 8192
COMPRESSED_CODECS = ('jpeg', 'png')
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
JPEG_SIGNATURE = b'\xff\xd8\xff'
# JPEG start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic coding).
_JPEG_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def _format_codec(image_format: str) -> str:
    """The codec named by a CompressedImage ``format``; raises :class:`ImageConversionError`."""
    text = str(image_format).strip().lower()
    if 'compresseddepth' in text.replace(' ', ''):
        raise ImageConversionError(f'compressed depth images ({image_format!r}) are not camera images')
    codec = next((c for c in COMPRESSED_CODECS if c in text or (c == 'jpeg' and 'jpg' in text)), None)
    if codec is None:
        raise ImageConversionError(f'unsupported compressed image format {image_format!r}: use '
                                   f'{" or ".join(COMPRESSED_CODECS)} (image_transport compressed)')
    return codec


def _jpeg_size(data: memoryview) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header, walking the marker segments; nothing is decoded."""
    position, size = 2, len(data)
    while position + 4 <= size:
        if data[position] != 0xFF:
            raise ImageConversionError(f'corrupt jpeg image: no marker at byte {position}')
        marker = data[position + 1]
        if marker == 0xFF:                                    # fill byte
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:          # markers without a segment
            position += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):                      # SOI, EOI or scan data before any frame header
            break
        length = int.from_bytes(data[position + 2:position + 4], 'big')
        if length < 2:
            raise ImageConversionError(f'corrupt jpeg image: segment of length {length} at byte {position}')
        if marker in _JPEG_SOF_MARKERS:
            if position + 9 > size:
                break
            height = int.from_bytes(data[position + 5:position + 7], 'big')
            width = int.from_bytes(data[position + 7:position + 9], 'big')
            return width, height
        position += 2 + length
    raise ImageConversionError(f'corrupt or truncated jpeg image: no frame header in {size} bytes')


def _compressed_payload_size(data: memoryview) -> tuple[str, int, int]:
    """(codec, width, height) of a JPEG or PNG payload, from its header (no decoding)."""
    if bytes(data[:8]) == PNG_SIGNATURE:
        if len(data) < 24 or bytes(data[12:16]) != b'IHDR':
            raise ImageConversionError(f'corrupt or truncated png image: no IHDR header in {len(data)} bytes')
        return 'png', int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')
    if bytes(data[:3]) == JPEG_SIGNATURE:
        # A complete JPEG ends with EOI (FF D9), possibly followed by zero padding; older OpenCV versions decode a
        # truncated one into a partly grey image instead of failing.
        if not bytes(data[-4096:]).rstrip(b'\x00').endswith(b'\xff\xd9'):
            raise ImageConversionError(f'truncated jpeg image: no end-of-image marker in {len(data)} bytes')
        return ('jpeg',) + _jpeg_size(data)
    raise ImageConversionError(f'the data ({len(data)} bytes, starting {bytes(data[:8]).hex()}) is neither a jpeg '
                               'nor a png image')


def compressed_image_to_numpy(msg: CompressedImage) -> np.ndarray:
    """sensor_msgs/CompressedImage (JPEG or PNG, as image_transport's ``compressed`` plugin publishes) ->
    (H, W, 3) uint8 RGB, a new array.

    ``format`` is either a bare codec (``jpeg``, ``png``) or image_transport's ``"<encoding>; <codec> compressed
    [<encoding>]"``; ``compressedDepth`` and other codecs are refused. The payload must be a JPEG or a PNG (told by
    its signature, which wins over the codec named in ``format``); its size is read from the header and checked
    against :data:`MAX_DECODED_PIXELS` before decoding. Colour payloads are decoded by OpenCV in its BGR order and
    returned as RGB, grey ones are replicated into three channels, alpha is dropped, 16-bit samples keep their
    high byte. Raises :class:`ImageConversionError` for an unknown format, empty/oversized/corrupt data.
    """
    named_codec = _format_codec(msg.format)
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size == 0:
        raise ImageConversionError(f'empty {named_codec} image (no data)')
    if data.size > MAX_COMPRESSED_BYTES:
        raise ImageConversionError(f'{named_codec} image of {data.size} bytes exceeds {MAX_COMPRESSED_BYTES} bytes')
    codec, width, height = _compressed_payload_size(memoryview(data))
    if width == 0 or height == 0:
        raise ImageConversionError(f'corrupt {codec} image: its header gives the size {width}x{height}')
    if width * height > MAX_DECODED_PIXELS:
        raise ImageConversionError(f'{codec} image {width}x{height} exceeds {MAX_DECODED_PIXELS} pixels')
    try:
        decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageConversionError(f'corrupt {codec} image: {exc}') from exc
    if decoded is None or decoded.size == 0:
        raise ImageConversionError(f'corrupt {codec} image: OpenCV could not decode {data.size} bytes')
    if decoded.shape[0] * decoded.shape[1] > MAX_DECODED_PIXELS:
        raise ImageConversionError(f'{codec} image {decoded.shape[1]}x{decoded.shape[0]} exceeds '
                                   f'{MAX_DECODED_PIXELS} pixels')
    if decoded.dtype != np.uint8:  # 16-bit PNG: keep the high byte, as an 8-bit camera image
        if decoded.dtype != np.uint16:
            raise ImageConversionError(f'{codec} image of {decoded.dtype} samples: expected 8 or 16 bits')
        decoded = (decoded >> 8).astype(np.uint8)
    if decoded.ndim == 2:
        return np.ascontiguousarray(np.repeat(decoded[:, :, None], 3, axis=2))
    if decoded.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(decoded, 3, axis=2))
    if decoded.shape[2] not in (3, 4):
        raise ImageConversionError(f'{codec} image with {decoded.shape[2]} channels: expected 1, 3 or 4')
    return np.ascontiguousarray(decoded[:, :, 2::-1])  # BGR(A) -> RGB


def rgb_to_compressed_image_msg(rgb: np.ndarray, header: Header, codec: str = 'jpeg',
                                quality: int = 95) -> CompressedImage:
    """(H, W, 3) uint8 RGB -> sensor_msgs/CompressedImage in image_transport's format (``rgb8; jpeg compressed
    bgr8``); for test publishers and bag tools."""
    if codec not in COMPRESSED_CODECS:
        raise ValueError(f'codec must be one of {COMPRESSED_CODECS}, got {codec!r}')
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if codec == 'jpeg' else []
    ok, encoded = cv2.imencode('.jpg' if codec == 'jpeg' else '.png',
                               np.ascontiguousarray(rgb[:, :, ::-1]), params)
    if not ok:
        raise ValueError(f'OpenCV could not encode a {rgb.shape} image as {codec}')
    msg = CompressedImage(header=header, format=f'rgb8; {codec} compressed bgr8')
    msg.data = byte_array(encoded)
    return msg


def _image_msg(pixels: np.ndarray, encoding: str, header: Header) -> Image:
    pixels = np.ascontiguousarray(pixels)
    height, width = pixels.shape[:2]
    # The row size from the shape, not strides[0]: numpy calls an array with one row contiguous whatever its row
    # stride (a (1, 5) slice of a (1, 10) array keeps stride 10), which gave a step larger than the data.
    step = int(np.prod(pixels.shape[1:], dtype=np.int64)) * pixels.itemsize
    msg = Image(header=header, height=height, width=width, encoding=encoding,
                is_bigendian=int(pixels.dtype.byteorder == '>' or
                                 (pixels.dtype.byteorder == '=' and sys.byteorder == 'big')),
                step=step)
    msg.data = byte_array(pixels)
    return msg


def rgb_to_image_msg(rgb: np.ndarray, header: Header) -> Image:
    """(H, W, 3) uint8 RGB -> rgb8 Image."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f'rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}')
    return _image_msg(rgb, 'rgb8', header)


def mono_to_image_msg(mono: np.ndarray, header: Header) -> Image:
    """(H, W) uint8 -> mono8 Image."""
    mono = np.asarray(mono)
    if mono.ndim != 2 or mono.dtype != np.uint8:
        raise ValueError(f'mono must be (H, W) uint8, got {mono.shape} {mono.dtype}')
    return _image_msg(mono, 'mono8', header)


def mask_to_image_msg(mask: np.ndarray, header: Header) -> Image:
    """(H, W) bool -> mono8 Image, 255 inside the mask and 0 outside."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.bool_:
        raise ValueError(f'mask must be (H, W) bool, got {mask.shape} {mask.dtype}')
    return _image_msg(mask.astype(np.uint8) * np.uint8(255), 'mono8', header)


def unit_rgb_to_image_msg(rgb: np.ndarray, header: Header) -> Image:
    """(H, W, 3) float RGB in [0, 1] (e.g. a rendered view) -> rgb8 Image: clipped, rounded; NaN is black."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or not np.issubdtype(rgb.dtype, np.floating):
        raise ValueError(f'rgb must be (H, W, 3) floats in [0, 1], got {rgb.shape} {rgb.dtype}')
    return rgb_to_image_msg(np.round(np.clip(np.nan_to_num(rgb, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8),
                            header)


def float_image_to_msg(values: np.ndarray, header: Header) -> Image:
    """(H, W) floats (depth, opacity, ...; NaN kept) -> 32FC1 Image (little endian)."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f'a {DEPTH_ENCODING} image must be (H, W), got shape {values.shape}')
    return _image_msg(values.astype('<f4', copy=False), DEPTH_ENCODING, header)


def depth_to_image_msg(depth: np.ndarray, header: Header) -> Image:
    """(H, W) depth (metres or model units along the optical axis, NaN invalid) -> 32FC1 Image (little endian)."""
    return float_image_to_msg(depth, header)


def depth_image_to_numpy(msg: Image) -> np.ndarray:
    """32FC1 Image -> (H, W) float32 (native byte order), honouring ``step`` and ``is_bigendian``."""
    if msg.encoding != DEPTH_ENCODING:
        raise ImageConversionError(f'expected a {DEPTH_ENCODING} depth image, got {msg.encoding!r}')
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if height == 0 or width == 0 or step < 4 * width or data.size != step * height:
        raise ImageConversionError(f'inconsistent {DEPTH_ENCODING} image: {width}x{height}, step {step}, '
                                   f'{data.size} bytes')
    rows = data.reshape(height, step)[:, :4 * width]
    return rows.copy().view('>f4' if msg.is_bigendian else '<f4').reshape(height, width).astype(np.float32)


# ------------------------------------------------------------------------------------------ camera infos
def _matrix(values: Any, rows: int, cols: int, name: str) -> np.ndarray:
    """A CameraInfo matrix field -> (rows, cols) float64; raises :class:`CameraInfoError` for another size or
    non-numbers (rclpy does not check array sizes of fields set in-process)."""
    try:
        array_ = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CameraInfoError(f'CameraInfo {name} is not numeric: {exc}') from exc
    if array_.size != rows * cols:
        raise CameraInfoError(f'CameraInfo {name} has {array_.size} values, expected {rows * cols}')
    return array_.reshape(rows, cols)


_PINHOLE_ZERO_TOLERANCE = 1e-9   # largest |value| taken as 0 (and |K[2,2] - 1| as 1) in a camera matrix


def _is_pinhole(M: np.ndarray) -> bool:
    """True for an upper-triangular camera matrix [fx, s, cx; 0, fy, cy; 0, 0, 1] with fx, fy > 0 (skew allowed)."""
    return bool(M[0, 0] > 0 and M[1, 1] > 0 and abs(M[1, 0]) <= _PINHOLE_ZERO_TOLERANCE
                and abs(M[2, 0]) <= _PINHOLE_ZERO_TOLERANCE and abs(M[2, 1]) <= _PINHOLE_ZERO_TOLERANCE
                and abs(M[2, 2] - 1.0) <= _PINHOLE_ZERO_TOLERANCE)


def camera_info_to_matrices(msg: CameraInfo) -> tuple[np.ndarray, np.ndarray, int, int]:
    """CameraInfo -> (K (3,3), P (3,4), width, height), float64.

    Raises :class:`CameraInfoError` when K is unusable (all zeros, non-finite, not [fx, s, cx; 0, fy, cy; 0, 0, 1]
    with fx, fy > 0), P is non-finite, a matrix has the wrong size or the image size is not positive.
    """
    K = _matrix(msg.k, 3, 3, 'K')
    P = _matrix(msg.p, 3, 4, 'P')
    width, height = int(msg.width), int(msg.height)
    if not np.any(K):
        raise CameraInfoError('CameraInfo K is all zeros (uncalibrated camera)')
    if not (np.isfinite(K).all() and np.isfinite(P).all()):
        raise CameraInfoError('CameraInfo K or P holds non-finite values')
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise CameraInfoError(f'CameraInfo K has non-positive focal lengths fx={K[0, 0]}, fy={K[1, 1]}')
    if not _is_pinhole(K):
        raise CameraInfoError(f'CameraInfo K is not a pinhole matrix [fx, s, cx, 0, fy, cy, 0, 0, 1]: '
                              f'{K.ravel().tolist()}')
    if width <= 0 or height <= 0:
        raise CameraInfoError(f'CameraInfo has no image size ({width}x{height})')
    return K, P, width, height


def rectified_intrinsics(msg: CameraInfo) -> np.ndarray:
    """(3,3) intrinsics of the *rectified* image (``image_rect``): P[:3,:3] when P is set, else K.

    A stereo_image_proc pipeline publishes rectified images with the CameraInfo of the raw camera, whose
    ``P`` is the projection of the rectified image; K describes the raw, distorted image. A P that is set but
    is no pinhole projection (non-positive focal lengths, a last row other than [0, 0, 1, *]) raises
    :class:`CameraInfoError` rather than silently falling back to the raw K.
    """
    K, P, _, _ = camera_info_to_matrices(msg)
    if not np.any(P[:3, :3]):
        return K
    if not _is_pinhole(P[:3, :3]):
        raise CameraInfoError(f'CameraInfo P is set but is not a rectified projection [fx, 0, cx, Tx, 0, fy, cy, Ty, '
                              f'0, 0, 1, 0] with fx, fy > 0: {P.ravel().tolist()}')
    return P[:3, :3].copy()


def stereo_baseline_from_camera_info(right_info: CameraInfo) -> float | None:
    """Stereo baseline B (metres) from the right camera's projection ``P[0,3] = -fx * B``; None when unknown
    (P unset, malformed or non-finite, no positive finite baseline)."""
    try:
        P = _matrix(right_info.p, 3, 4, 'P')
    except CameraInfoError:
        return None
    if not np.isfinite(P).all() or P[0, 0] <= 0:
        return None
    with np.errstate(over='ignore', divide='ignore', invalid='ignore'):
        baseline = -P[0, 3] / P[0, 0]
    return float(baseline) if np.isfinite(baseline) and baseline > 0 else None


def model_camera_info(K: np.ndarray, width: int, height: int, header: Header,
                      P: np.ndarray | None = None) -> CameraInfo:
    """CameraInfo of an undistorted image of size ``width`` x ``height`` with intrinsics ``K`` (a model-resolution
    image or a rendered view): plumb_bob with zero distortion, R = I, P = [K|0]."""
    K = np.asarray(K, dtype=np.float64).reshape(3, 3)
    P = np.hstack([K, np.zeros((3, 1))]) if P is None else np.asarray(P, dtype=np.float64).reshape(3, 4)
    return CameraInfo(header=header, width=int(width), height=int(height), distortion_model='plumb_bob',
                      d=[0.0] * 5, k=K.ravel().tolist(), r=np.eye(3).ravel().tolist(), p=P.ravel().tolist())


def resized_intrinsics(K: np.ndarray, size: tuple[int, int], new_size: tuple[int, int]) -> np.ndarray:
    """(3,3) intrinsics of an image of ``size`` (width, height) -> those of the same view resampled to
    ``new_size``, pixel centres at integer coordinates (OpenCV): x' = (x + 0.5) * s - 0.5 per axis."""
    sx, sy = new_size[0] / size[0], new_size[1] / size[1]
    resample = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
    return resample @ np.asarray(K, dtype=np.float64).reshape(3, 3)


# ---------------------------------------------------------------------------------------------- clouds
def pack_rgb_float(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 -> (N,) float32 whose bits are 0x00RRGGBB (PCL/RViz ``rgb`` field)."""
    rgb = np.asarray(rgb, dtype=np.uint32)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    return packed.astype('<u4').view('<f4')


def unpack_rgb_float(rgb_float: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_rgb_float`: (N,) float32 -> (N, 3) uint8."""
    packed = np.ascontiguousarray(rgb_float, dtype='<f4').view('<u4')
    return np.stack([(packed >> 16) & 0xFF, (packed >> 8) & 0xFF, packed & 0xFF], axis=-1).astype(np.uint8)


def pointcloud2_from_points(xyz: np.ndarray, rgb: np.ndarray, confidence: np.ndarray, header: Header,
                            labels: np.ndarray | None = None, value_field: str = 'confidence') -> PointCloud2:
    """Unordered cloud (height 1) with FLOAT32 fields x y z rgb confidence, point_step 20, little endian; with
    ``labels`` (N,) also a UINT32 ``label`` field at offset 20 (point_step 24), PCL's PointXYZRGBL label.
    ``value_field``: the name of the fifth field, which carries ``confidence`` (e.g. 'probability' in ~/query).

    ``xyz`` (N,3) in ``header.frame_id``, ``rgb`` (N,3) uint8, ``confidence`` (N,), ``labels`` integers in
    [0, 2**32); points must be finite (is_dense is true).
    """
    xyz = np.asarray(xyz)
    count = xyz.shape[0]
    if xyz.shape != (count, 3) or np.shape(rgb) != (count, 3) or np.shape(confidence) != (count,):
        raise ValueError(f'xyz (N,3), rgb (N,3), confidence (N,) expected, got {xyz.shape}, '
                         f'{np.shape(rgb)}, {np.shape(confidence)}')
    if labels is not None and (np.shape(labels) != (count,) or not np.issubdtype(np.asarray(labels).dtype, np.integer)
                               or np.any(np.asarray(labels) < 0) or np.any(np.asarray(labels) > _UINT32_MAX)):
        raise ValueError(f'labels must be (N,) = ({count},) integers in [0, 2**32), got shape {np.shape(labels)}')
    points = np.zeros(count, dtype=_POINT_DTYPE if labels is None else _LABELLED_POINT_DTYPE)
    points['x'], points['y'], points['z'] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    points['rgb'] = pack_rgb_float(rgb)
    points['confidence'] = confidence
    fields = [PointField(name=name, offset=4 * i, datatype=PointField.FLOAT32, count=1)
              for i, name in enumerate(POINT_FIELD_NAMES[:-1] + (value_field,))]
    point_step = POINT_STEP
    if labels is not None:
        points[LABEL_FIELD_NAME] = labels
        fields.append(PointField(name=LABEL_FIELD_NAME, offset=POINT_STEP, datatype=PointField.UINT32, count=1))
        point_step = LABELLED_POINT_STEP
    msg = PointCloud2(header=header, height=1, width=count, fields=fields, is_bigendian=False,
                      point_step=point_step, row_step=point_step * count, is_dense=True)
    msg.data = byte_array(points)
    return msg


def pointcloud2_to_numpy(msg: PointCloud2) -> dict[str, np.ndarray]:
    """PointCloud2 -> {field name: (N,) array} for every field (any layout); plus ``xyz`` (N,3) float32 and,
    when an ``rgb`` field exists, ``rgb_u8`` (N,3) uint8."""
    order = '>' if msg.is_bigendian else '<'
    dtype = np.dtype({'names': [f.name for f in msg.fields],
                      'formats': [order + _POINTFIELD_NUMPY_TYPES[f.datatype] for f in msg.fields],
                      'offsets': [f.offset for f in msg.fields], 'itemsize': msg.point_step})
    count = msg.width * msg.height
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if msg.row_step * msg.height != data.size or msg.point_step * msg.width > msg.row_step:
        raise ValueError(f'inconsistent PointCloud2: {data.size} bytes, row_step {msg.row_step}, '
                         f'height {msg.height}, point_step {msg.point_step}, width {msg.width}')
    rows = data.reshape(msg.height, msg.row_step)[:, :msg.point_step * msg.width]
    points = np.ascontiguousarray(rows).view(dtype).reshape(count)
    out = {name: points[name].astype(points[name].dtype.newbyteorder('=')) for name in dtype.names}
    if {'x', 'y', 'z'} <= set(out):
        out['xyz'] = np.stack([out['x'], out['y'], out['z']], axis=-1).astype(np.float32)
    if 'rgb' in out:
        out['rgb_u8'] = unpack_rgb_float(out['rgb'])
    return out


# ----------------------------------------------------------------------------------------------- poses
def _rotation_translation(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(4,4) rigid transform -> (unit quaternion x y z w with w >= 0, translation (3,))."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.isfinite(T).all():
        raise ValueError(f'expected a finite 4x4 transform, got shape {T.shape}')
    quaternion = Rotation.from_matrix(T[:3, :3]).as_quat()
    quaternion /= np.linalg.norm(quaternion)
    if quaternion[3] < 0:
        quaternion = -quaternion
    return quaternion, T[:3, 3].copy()


def quaternion_msg_to_matrix(q: Quaternion) -> np.ndarray:
    """geometry_msgs/Quaternion -> (3,3) rotation matrix."""
    return Rotation.from_quat([q.x, q.y, q.z, q.w]).as_matrix()


def pose_stamped_from_matrix(T: np.ndarray, header: Header) -> PoseStamped:
    """(4,4) pose of a frame in ``header.frame_id`` -> PoseStamped."""
    q, t = _rotation_translation(T)
    pose = Pose(position=PointMsg(x=float(t[0]), y=float(t[1]), z=float(t[2])),
                orientation=Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])))
    return PoseStamped(header=header, pose=pose)


def transform_stamped_from_matrix(T: np.ndarray, header: Header, child_frame_id: str) -> TransformStamped:
    """(4,4) pose of ``child_frame_id`` in ``header.frame_id`` (T_parent_child) -> TransformStamped."""
    q, t = _rotation_translation(T)
    transform = Transform(translation=Vector3(x=float(t[0]), y=float(t[1]), z=float(t[2])),
                          rotation=Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])))
    return TransformStamped(header=header, child_frame_id=child_frame_id, transform=transform)


def pose_msg_to_matrix(pose: Pose) -> np.ndarray:
    """geometry_msgs/Pose -> (4,4) transform."""
    T = np.eye(4)
    T[:3, :3] = quaternion_msg_to_matrix(pose.orientation)
    T[:3, 3] = (pose.position.x, pose.position.y, pose.position.z)
    return T


def checked_pose_msg_to_matrix(pose: Pose, unit_tolerance: float = 1e-3) -> np.ndarray:
    """geometry_msgs/Pose from a request -> (4,4) rigid transform; raises ValueError for non-finite values or a
    quaternion whose norm is not 1 within ``unit_tolerance`` (the all-zero quaternion is not the identity: w = 1
    is). An almost unit quaternion is normalised."""
    position = np.array([pose.position.x, pose.position.y, pose.position.z], dtype=np.float64)
    quaternion = np.array([pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w],
                          dtype=np.float64)
    if not (np.isfinite(position).all() and np.isfinite(quaternion).all()):
        raise ValueError(f'the pose holds non-finite values: position {position.tolist()}, orientation (x, y, z, w) '
                         f'{quaternion.tolist()}')
    norm = float(np.linalg.norm(quaternion))
    if norm == 0.0:
        raise ValueError('the orientation is the all-zero quaternion, which is no rotation (the identity is w = 1)')
    if abs(norm - 1.0) > unit_tolerance:
        raise ValueError(f'the orientation must be a unit quaternion, its norm is {norm:.6g}')
    T = np.eye(4)
    T[:3, :3] = Rotation.from_quat(quaternion / norm).as_matrix()
    T[:3, 3] = position
    return T
