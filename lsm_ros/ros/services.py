"""The ``~/query`` and ``~/render`` services of ``lsm_node`` without the node: checking a request, computing its
answer and filling the response, from explicit inputs (the model, the latest reconstruction, the default labels).

- refusals: :class:`ServiceRefused` (:class:`QueryRefused`, :class:`RenderRefused`), whose message is the reason
  the response gives (``success: false``); :class:`ServiceKind` names a service for the node's counters and logs;
- ~/query: :func:`parse_query_request`, :func:`query_cluster_distance`, :func:`query_answer`,
  :func:`fill_query_response` (with the 3-D answer of :mod:`lsm_ros.query3d`: clouds, detections, camera masks);
- ~/render: :func:`parse_render_request` (a :class:`RenderRequest`), :func:`render_request`,
  :func:`fill_render_response`; the cameras (:class:`VirtualCamera`) of the ``render_views`` too
  (:func:`render_view_camera`, :func:`midway_pose`);
- :class:`LatestReconstruction`: what the services answer from; :class:`ModelAccess`: admits the calls that use the
  model while the node's life cycle may move or drop it.

:class:`~lsm_ros.ros.node.LsmNode` keeps what needs its state: the latest reconstruction, the model, counting and
logging (``LsmNode._answer_service``).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from geometry_msgs.msg import Point, Pose, PoseWithCovariance, Quaternion, Vector3
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import PointCloud2, RegionOfInterest
from std_msgs.msg import Header
from vision_msgs.msg import BoundingBox3D, Detection3D, Detection3DArray, ObjectHypothesis, ObjectHypothesisWithPose

from lsm_ros import query3d, semantics
from lsm_ros.config import NodeConfig
from lsm_ros.pipeline import DEPTH_MIN_ALPHA, RENDER_CHANNELS, GaussianCloud, Reconstruction, Reconstructor, \
    RenderedView
from lsm_ros.ros import conversions
from lsm_ros.semantics import QueryResult
from lsm_ros.srv import RenderView, TextQuery
from lsm_ros.visualization import FeaturePca

RENDER_REQUEST_CHANNELS = ('rgb', 'depth', 'alpha', 'features', 'labels')   # channels of a ~/render request
DEFAULT_RENDER_CHANNELS = ('rgb', 'depth')
MAX_RENDER_SIDE = 2048           # pixels per side of a ~/render image
MAX_FEATURE_RENDER_PIXELS = 1024 * 1024  # pixels of a ~/render with features or labels (~3 GB of CPU memory)
MIDWAY_FRAME_SUFFIX = '_midway'  # frame of the 'midway' render view: <left frame>_midway
# The defaults of the ~/query 3-D answer: the node parameters' defaults.
DEFAULT_QUERY_CLUSTER_DISTANCE: float = NodeConfig.query_cluster_distance
DEFAULT_QUERY_MIN_CLUSTER_POINTS: int = NodeConfig.query_min_cluster_points
PROBABILITY_FIELD = 'probability'  # the value field of a ~/query cloud, where ~/points has 'confidence'


class ServiceRefused(ValueError):
    """A ~/query or ~/render request that cannot be answered; the message says why."""


class QueryRefused(ServiceRefused):
    """A ~/query request that cannot be answered; the message says why."""


class RenderRefused(ServiceRefused):
    """A ~/render request that cannot be answered; the message says why."""


@dataclass(frozen=True)
class ServiceKind:
    """What :meth:`LsmNode._answer_service` needs to know of a service: its name, counter prefix and noun."""

    service: str        # '~/query'
    counter: str        # statistics()['counts'][counter], counter + '_refused', counter + '_failed'
    noun: str           # in messages: 'query failed: ...'


@dataclass(frozen=True)
class LatestReconstruction:
    """The newest published reconstruction, kept for ~/query: the result, its stamp and frames, and the answer
    of the active label set (both views; None for the geometry-only model or when labelling failed)."""

    result: Reconstruction
    stamp_ns: int
    left_frame: str
    right_frame: str
    labelled: QueryResult | None

    def frame_of(self, view: int) -> str:
        """Optical frame of view ``view`` (0 left, 1 right)."""
        return self.left_frame if view == 0 else self.right_frame


@dataclass(frozen=True)
class VirtualCamera:
    """A camera to render: its pose in the left optical frame (camera-to-left), intrinsics and size in pixels."""

    T_left_camera: np.ndarray
    K: np.ndarray
    width: int
    height: int


class ModelAccess:
    """Admits the service calls that use the model, and lets the node close the model to them: :meth:`close`
    refuses new calls (with a reason) and waits for the running ones, so the model can then be moved or dropped."""

    def __init__(self, reason: str) -> None:
        self._condition = threading.Condition()
        self._users = 0
        self._open = False
        self._reason = reason

    def open(self) -> None:
        with self._condition:
            self._open = True

    def close(self, reason: str, timeout_s: float) -> bool:
        """Refuse new calls with ``reason``; True when no call uses the model any more within ``timeout_s``."""
        with self._condition:
            self._open, self._reason = False, reason
            return self._condition.wait_for(lambda: self._users == 0, timeout=timeout_s)

    @contextlib.contextmanager
    def use(self, refused: type[ServiceRefused]) -> Iterator[None]:
        """Hold the model for one call; raises ``refused`` with the reason while closed."""
        with self._condition:
            if not self._open:
                raise refused(self._reason)
            self._users += 1
        try:
            yield
        finally:
            with self._condition:
                self._users -= 1
                self._condition.notify_all()


def midway_pose(T_left_right: np.ndarray) -> np.ndarray:
    """(4,4) pose halfway between the left camera (identity) and ``T_left_right``: half the translation and half
    the rotation angle about the same axis, in the left frame."""
    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec(0.5 * Rotation.from_matrix(T_left_right[:3, :3]).as_rotvec()).as_matrix()
    T[:3, 3] = 0.5 * T_left_right[:3, 3]
    return T


def is_pinhole_matrix(K: np.ndarray) -> bool:
    """True for a finite [fx, 0, cx; 0, fy, cy; 0, 0, 1] with fx, fy > 0."""
    return bool(np.isfinite(K).all() and K[0, 0] > 0 and K[1, 1] > 0 and K[0, 1] == 0 and K[1, 0] == 0
                and np.array_equal(K[2], (0.0, 0.0, 1.0)))


def render_view_camera(view: str, result: Reconstruction, left_frame: str, right_frame: str
                       ) -> tuple[VirtualCamera, str]:
    """The camera of a ``render_views`` view ('left', 'right', 'midway') at the model size, and the frame of its
    images (the midway one: ``left_frame`` + :data:`MIDWAY_FRAME_SUFFIX`)."""
    width, height = result.size
    if view == 'left':
        return VirtualCamera(np.eye(4), result.K_1, width, height), left_frame
    if view == 'right':
        return VirtualCamera(result.T_1_2, result.K_2, width, height), right_frame
    return (VirtualCamera(midway_pose(result.T_1_2), 0.5 * (result.K_1 + result.K_2), width, height),
            left_frame + MIDWAY_FRAME_SUFFIX)


def _require_semantic(reconstructor: Reconstructor, needs: str, refused: type[ServiceRefused]) -> None:
    """Refuse (``refused``) a call on the geometry-only model; ``needs``: what the call needs of the full LSM."""
    if not reconstructor.semantic:
        raise refused(f'lsm_node runs a geometry-only model ({reconstructor.weights}): {needs} the full LSM (set '
                      'lsm_checkpoint, with dust3r_checkpoint and lseg_checkpoint unless the LSM file names them)')


# ---------------------------------------------------------------------------------------------- ~/query
def parse_query_request(request: TextQuery.Request, reconstructor: Reconstructor, default_labels: tuple[str, ...]
                        ) -> tuple[tuple[str, ...], tuple[int, ...], float]:
    """Check a ~/query request: (phrases, views, threshold); no phrases asks for ``default_labels`` (the active
    label set). Raises :class:`QueryRefused` with the reason."""
    _require_semantic(reconstructor, 'text queries need', QueryRefused)
    threshold = float(request.threshold)
    if not 0.0 <= threshold <= 1.0:   # false for NaN too
        raise QueryRefused(f'threshold must be a probability in [0, 1] (0: plain arg-max), got {threshold!r}')
    query_cluster_distance(request, DEFAULT_QUERY_CLUSTER_DISTANCE)
    try:
        views = semantics.parse_views(request.views)
        phrases = semantics.validate_phrases(list(request.phrases)) if request.phrases else default_labels
    except ValueError as exc:
        raise QueryRefused(str(exc)) from exc
    return phrases, views, threshold


def query_cluster_distance(request: TextQuery.Request, parameter: float) -> float:
    """The clustering distance of a ~/query request: its ``cluster_distance`` when > 0, else ``parameter`` (the
    node's ``query_cluster_distance``). Raises :class:`QueryRefused` for a negative or non-finite one."""
    distance = float(request.cluster_distance)
    if not (np.isfinite(distance) and distance >= 0.0):
        raise QueryRefused(f'cluster_distance must be a finite length >= 0 (0: the node\'s query_cluster_distance), '
                           f'got {distance!r}')
    return distance if distance > 0.0 else float(parameter)


def query_answer(reconstructor: Reconstructor, latest: LatestReconstruction, phrases: tuple[str, ...],
                 views: tuple[int, ...]) -> QueryResult:
    """The answer of ``phrases`` on ``views`` of the latest reconstruction: the active label set's, kept from
    publishing, when the phrases are those; else computed. Raises :class:`QueryRefused` when the model refuses."""
    if latest.labelled is not None and latest.labelled.phrases == phrases:
        return latest.labelled.select_views(views)
    try:
        return reconstructor.query(latest.result, phrases, views=views)
    except (ValueError, RuntimeError) as exc:
        raise QueryRefused(f'{type(exc).__name__}: {exc}') from exc


def phrase_cloud(points: query3d.PhrasePoints, header: Header) -> PointCloud2:
    """A phrase's points as the ~/points cloud layout (x y z rgb, FLOAT32) with its value field ``probability``
    (the phrase's probability at the point's pixel) in the place of ``confidence``."""
    return conversions.pointcloud2_from_points(points.xyz, points.rgb, points.probability, header,
                                               value_field=PROBABILITY_FIELD)


def detection_msg(detection: query3d.ObjectDetection, phrase_index: int, rank: int, header: Header) -> Detection3D:
    """A vision_msgs/Detection3D of an object: its oriented box, the phrase as class with the object's score, id
    '<phrase index>/<rank>'."""
    box = detection.box

    def pose() -> Pose:
        return Pose(position=Point(x=float(box.center[0]), y=float(box.center[1]), z=float(box.center[2])),
                    orientation=Quaternion(x=float(box.quaternion[0]), y=float(box.quaternion[1]),
                                           z=float(box.quaternion[2]), w=float(box.quaternion[3])))

    hypothesis = ObjectHypothesisWithPose(
        hypothesis=ObjectHypothesis(class_id=detection.phrase, score=float(detection.score)),
        pose=PoseWithCovariance(pose=pose()))
    size = Vector3(x=float(box.size[0]), y=float(box.size[1]), z=float(box.size[2]))
    return Detection3D(header=header, results=[hypothesis], bbox=BoundingBox3D(center=pose(), size=size),
                       id=f'{phrase_index}/{rank}')


def fill_query_response(response: TextQuery.Response, latest: LatestReconstruction, answer: QueryResult,
                        threshold: float, with_label_images: bool, *,
                        cluster_distance: float = DEFAULT_QUERY_CLUSTER_DISTANCE,
                        min_cluster_points: int = DEFAULT_QUERY_MIN_CLUSTER_POINTS) -> None:
    """Masks (view-major), optional label images, per-phrase scores, stamp and frames of an answer; and its 3-D
    answer (:func:`lsm_ros.query3d.answer_3d`): per phrase a cloud, its objects in ``detections`` (split at
    ``cluster_distance``, objects of fewer than ``min_cluster_points`` points left out), the camera masks
    (view-major, at the input image size, in the view's frame) and per view the region of its input image the
    model saw."""
    stamp = conversions.nanoseconds_to_stamp(latest.stamp_ns)

    def header(view: int) -> Header:
        return conversions.make_header(stamp, latest.frame_of(view))

    masks = answer.masks(threshold)
    response.phrases = list(answer.phrases)
    response.views = [semantics.VIEW_NAMES[v] for v in answer.views]
    response.masks = [conversions.mask_to_image_msg(masks[position, p], header(view))
                      for position, view in enumerate(answer.views) for p in range(len(answer.phrases))]
    if with_label_images:
        label_images = answer.label_images(threshold)
        response.label_images = [conversions.mono_to_image_msg(label_images[position], header(view))
                                 for position, view in enumerate(answer.views)]
    response.scores = answer.scores(threshold).tolist()
    response.max_probabilities = answer.max_probabilities().tolist()
    response.max_similarities = answer.max_similarities().tolist()
    answer_3d = query3d.answer_3d(latest.result, answer, threshold, cluster_distance, min_cluster_points)
    response.clouds = [phrase_cloud(points, header(0)) for points in answer_3d.points]
    response.detections = Detection3DArray(header=header(0), detections=[
        detection_msg(detection, p, rank, header(0))
        for p, detections in enumerate(answer_3d.detections) for rank, detection in enumerate(detections)])
    response.camera_masks = [conversions.mask_to_image_msg(view_masks[p], header(view))
                             for view_masks, view in zip(answer_3d.camera_masks, answer.views)
                             for p in range(len(answer.phrases))]
    response.camera_regions = [RegionOfInterest(x_offset=x, y_offset=y, width=width, height=height, do_rectify=False)
                               for x, y, width, height in answer_3d.camera_regions]
    response.stamp = stamp
    response.left_frame_id, response.right_frame_id = latest.left_frame, latest.right_frame
    response.success = True


# ---------------------------------------------------------------------------------------------- ~/render
@dataclass(frozen=True)
class RenderRequest:
    """A checked ~/render request: the camera as asked (intrinsics all zeros: the left model camera; size 0x0: the
    model size; both resolved against a reconstruction by :meth:`camera`), the channels and the label phrases."""

    T_left_camera: np.ndarray
    K: np.ndarray
    width: int
    height: int
    channels: tuple[str, ...]
    phrases: tuple[str, ...]

    def camera(self, result: Reconstruction) -> VirtualCamera:
        """The camera to render ``result`` from."""
        model_size = result.size
        size = (self.width, self.height) if self.width else model_size
        K = self.K if np.any(self.K) else conversions.resized_intrinsics(result.K_1, model_size, size)
        return VirtualCamera(self.T_left_camera, K, *size)


def parse_render_request(request: RenderView.Request, reconstructor: Reconstructor,
                         default_labels: tuple[str, ...]) -> RenderRequest:
    """Check a ~/render request; the 'labels' channel without phrases renders ``default_labels`` (the active label
    set). Raises :class:`RenderRefused` with the reason."""
    _require_semantic(reconstructor, 'rendering needs the semantic Gaussians of', RenderRefused)
    try:
        T_left_camera = conversions.checked_pose_msg_to_matrix(request.pose)
    except ValueError as exc:
        raise RenderRefused(f'pose: {exc}') from exc
    width, height = int(request.width), int(request.height)
    if (width == 0) != (height == 0):
        raise RenderRefused(f'width and height must both be 0 (the model size) or both be set, got '
                            f'{width}x{height}')
    if max(width, height) > MAX_RENDER_SIDE:
        raise RenderRefused(f'size {width}x{height} exceeds {MAX_RENDER_SIDE} pixels per side')
    K = np.asarray(request.k, dtype=np.float64).reshape(3, 3)
    if np.any(K) and not is_pinhole_matrix(K):
        raise RenderRefused(f'k must be [fx, 0, cx, 0, fy, cy, 0, 0, 1] with finite values and fx, fy > 0 (all '
                            f'zeros: the left model camera), got {K.ravel().tolist()}')
    channels = tuple(dict.fromkeys(request.channels)) or DEFAULT_RENDER_CHANNELS
    unknown = [c for c in channels if c not in RENDER_REQUEST_CHANNELS]
    if unknown:
        raise RenderRefused(f'unknown channel(s) {unknown}: choose among {list(RENDER_REQUEST_CHANNELS)}')
    if width * height > MAX_FEATURE_RENDER_PIXELS and {'features', 'labels'} & set(channels):
        raise RenderRefused(f'features and labels are rendered at up to {MAX_FEATURE_RENDER_PIXELS} pixels (e.g. '
                            f'1024x1024), {width}x{height} has {width * height}')
    phrases: tuple[str, ...] = ()
    if 'labels' in channels:
        try:
            phrases = semantics.validate_phrases(list(request.phrases)) if request.phrases else default_labels
        except ValueError as exc:
            raise RenderRefused(f'phrases: {exc}') from exc
    elif request.phrases:
        raise RenderRefused("phrases are for the 'labels' channel, which was not requested")
    return RenderRequest(T_left_camera, K, width, height, channels, phrases)


def render_request(reconstructor: Reconstructor, latest: LatestReconstruction, request: RenderRequest
                   ) -> tuple[VirtualCamera, RenderedView]:
    """Render the latest reconstruction as ``request`` asks: (the camera, the view). Raises :class:`RenderRefused`
    when the renderer refuses."""
    camera = request.camera(latest.result)
    try:
        rendered = reconstructor.render(
            latest.result, camera.T_left_camera, camera.K, (camera.width, camera.height),
            channels=[c for c in request.channels if c in RENDER_CHANNELS], phrases=request.phrases or None)
    except (ValueError, RuntimeError) as exc:
        raise RenderRefused(f'{type(exc).__name__}: {exc}') from exc
    return camera, rendered


def fill_render_response(response: RenderView.Response, latest: LatestReconstruction, rendered: RenderedView,
                         channels: tuple[str, ...], feature_pca: Callable[[GaussianCloud], FeaturePca]) -> None:
    """The requested images (left frame, the reconstruction's stamp), camera info, phrases and frames;
    ``feature_pca``: the PCA colouring of a reconstruction's Gaussians (called for the 'features' channel only)."""
    stamp = conversions.nanoseconds_to_stamp(latest.stamp_ns)

    def header() -> Header:
        return conversions.make_header(stamp, latest.left_frame)

    empty = rendered.alpha < DEPTH_MIN_ALPHA
    if 'rgb' in channels:
        response.rgb = conversions.unit_rgb_to_image_msg(rendered.rgb, header())
    if 'depth' in channels:
        response.depth = conversions.depth_to_image_msg(rendered.depth, header())
    if 'alpha' in channels:
        response.alpha = conversions.float_image_to_msg(rendered.alpha, header())
    if 'features' in channels:
        colors = feature_pca(latest.result.gaussians).colors(rendered.features)
        colors[empty] = 0
        response.features = conversions.rgb_to_image_msg(colors, header())
    if 'labels' in channels:
        response.labels = conversions.mono_to_image_msg(rendered.labels, header())
        response.phrases = list(rendered.phrases)
    response.camera_info = conversions.model_camera_info(rendered.K, rendered.width, rendered.height, header())
    response.stamp = stamp
    response.left_frame_id, response.right_frame_id = latest.left_frame, latest.right_frame
    response.success = True
