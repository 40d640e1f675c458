"""``lsm_node``'s products: one :class:`ProductPublishers` creates the lifecycle publishers and publishes every product
of a reconstruction.

Publishes (reliable, keep-last 2; stamp = the pair's left stamp; frame = the left camera's optical frame,
``left_frame_id`` or the left image's frame_id, except the right depth and camera info, in the right camera's frame):

- ``~/points`` sensor_msgs/PointCloud2: both views merged, fields x y z rgb confidence;
- ``~/left/depth``, ``~/right/depth`` sensor_msgs/Image 32FC1 (NaN invalid), model resolution;
- ``~/left/camera_info``, ``~/right/camera_info``: intrinsics of the depth images (model resolution);
- ``~/relative_pose`` geometry_msgs/PoseStamped: the estimated right camera in the left frame (only when the pose
  succeeded);
- ``~/info`` lsm_ros/ReconstructionInfo: scale, intrinsics source, sizes, timings, active labels (every pair);
- ``/tf`` left -> estimated right camera TransformStamped, only when ``publish_tf`` (and the pose succeeded): child
  frame ``estimated_right_frame_id``, default ``<right frame>_estimated`` (the right image's own frame belongs to
  robot_state_publisher).

With the semantic model every reconstruction is also labelled with the active label set (parameter ``labels``;
value i = labels[i]): ``~/semantic/labels`` (mono8 arg-max label of the left view, the geometry of
``~/left/depth``), ``~/semantic/overlay`` (rgb8, the label colours over the left model image) and a ``label`` field of
``~/points`` (uint32, PCL's PointXYZRGBL label: the label of each point's Gaussian); ``~/semantic/label_info``
(vision_msgs/LabelInfo, transient local: class_id i is labels[i]) is published on activation and again whenever the
label set changes. The parameter ``render_views`` ('left', 'right', 'midway')
publishes virtual views after every reconstruction: ``~/render/<view>/image`` (rgb8) and
``~/render/<view>/camera_info`` (model size): 'left' in the left frame, 'right' (at the estimated relative pose) in
the right frame, 'midway' (half the relative pose, mean intrinsics) in ``<left frame>_midway``, broadcast on /tf
with ``publish_tf``.

A failed publish is counted (``publish_failures``) and warned; the other products are still published. The node is
anything with ``create_lifecycle_publisher``, ``destroy_lifecycle_publisher``, ``lifecycle_state`` and ``context``.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, Protocol

import numpy as np
from geometry_msgs.msg import PoseStamped
from lifecycle_msgs.msg import State
from rclpy.lifecycle import LifecycleState
from rclpy.qos import QoSProfile
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage
from vision_msgs.msg import LabelInfo, VisionClass

from lsm_ros import semantics
from lsm_ros.config import NodeConfig
from lsm_ros.msg import ReconstructionInfo
from lsm_ros.pipeline import Reconstruction, Reconstructor
from lsm_ros.ros import conversions, diagnostics
from lsm_ros.ros.counters import NodeCounters
from lsm_ros.ros.diagnostics import LatencyMonitor
from lsm_ros.ros.inputs import PreparedPair
from lsm_ros.ros.names import (INFO_TOPIC, LABEL_INFO_QOS, LEFT_DEPTH_TOPIC, LEFT_MODEL_INFO_TOPIC, NETWORK_STAGES,
                               POINTS_TOPIC, PRODUCT_QOS, RELATIVE_POSE_TOPIC, RIGHT_DEPTH_TOPIC,
                               RIGHT_MODEL_INFO_TOPIC, SEMANTIC_LABEL_INFO_TOPIC, SEMANTIC_LABELS_TOPIC,
                               SEMANTIC_OVERLAY_TOPIC, STATE_ACTIVE, TF_QOS, TF_TOPIC, render_view_topics)
from lsm_ros.ros.services import MIDWAY_FRAME_SUFFIX, midway_pose, render_view_camera
from lsm_ros.semantics import QueryResult

PRODUCT_TYPES = ((POINTS_TOPIC, PointCloud2), (LEFT_DEPTH_TOPIC, Image), (RIGHT_DEPTH_TOPIC, Image),
                 (LEFT_MODEL_INFO_TOPIC, CameraInfo), (RIGHT_MODEL_INFO_TOPIC, CameraInfo),
                 (RELATIVE_POSE_TOPIC, PoseStamped), (INFO_TOPIC, ReconstructionInfo))
NO_SCALE: tuple[str, str, float | None] = (diagnostics.SCALE_UNKNOWN, '', None)


class PublisherNode(Protocol):
    """What :class:`ProductPublishers` needs of a (lifecycle) node."""

    lifecycle_state: str
    context: Any

    def create_lifecycle_publisher(self, msg_type: Any, topic: str, qos: QoSProfile) -> Any: ...

    def destroy_lifecycle_publisher(self, publisher: Any) -> Any: ...


class ProductPublishers:
    """The product publishers of one configuration and the publishing of each reconstruction (module docstring).

    ``latency``: gets each pair's latency (arrival of its later image to its ~/info); :attr:`last_scale`: (scale,
    scale source, baseline in m or None) of the last published reconstruction, for /diagnostics."""

    def __init__(self, node: PublisherNode, counters: NodeCounters, latency: LatencyMonitor) -> None:
        self._node, self._counters, self._latency = node, counters, latency
        self.by_topic: dict[str, Any] = {}
        self._tf_publisher: Any = None               # created when publish_tf is first true
        self._label_info: tuple[str, ...] | None = None   # the label set ~/semantic/label_info last published
        self.last_scale = NO_SCALE

    # ------------------------------------------------------------------------------------------ publishers
    def _create(self, msg_type: Any, topic: str, qos: QoSProfile) -> Any:
        """A lifecycle publisher (silent while the node is not active), enabled at once when created while active."""
        publisher = self._node.create_lifecycle_publisher(msg_type, topic, qos)
        if self._node.lifecycle_state == STATE_ACTIVE:
            publisher.on_activate(LifecycleState(label=STATE_ACTIVE, state_id=State.PRIMARY_STATE_ACTIVE))
        return publisher

    def create(self, semantic: bool, render_views: tuple[str, ...]) -> None:
        """Configure: the product publishers (and the semantic ones and those of ``render_views``)."""
        for topic, msg_type in PRODUCT_TYPES:
            self.by_topic[topic] = self._create(msg_type, topic, PRODUCT_QOS)
        if semantic:
            for topic in (SEMANTIC_LABELS_TOPIC, SEMANTIC_OVERLAY_TOPIC):
                self.by_topic[topic] = self._create(Image, topic, PRODUCT_QOS)
            self.by_topic[SEMANTIC_LABEL_INFO_TOPIC] = self._create(LabelInfo, SEMANTIC_LABEL_INFO_TOPIC,
                                                                    LABEL_INFO_QOS)
            self.create_render_views(render_views)

    def create_render_views(self, views: tuple[str, ...]) -> None:
        """Publishers of the render views not published yet (they stay when a view is removed)."""
        for view in views:
            image_topic, info_topic = render_view_topics(view)
            if image_topic not in self.by_topic:
                self.by_topic[info_topic] = self._create(CameraInfo, info_topic, PRODUCT_QOS)
                self.by_topic[image_topic] = self._create(Image, image_topic, PRODUCT_QOS)

    def destroy(self) -> None:
        """Cleanup: every publisher destroyed, the last scale forgotten."""
        publishers = list(self.by_topic.values()) + ([self._tf_publisher] if self._tf_publisher else [])
        self.by_topic, self._tf_publisher, self._label_info = {}, None, None
        for publisher in publishers:
            self._node.destroy_lifecycle_publisher(publisher)

    def forget(self) -> None:
        """The scale of the last reconstruction forgotten (cleanup)."""
        with self._counters.lock:
            self.last_scale = NO_SCALE

    # ------------------------------------------------------------------------------------------ products
    def publish_label_info(self, labels: tuple[str, ...], header: Header) -> None:
        """~/semantic/label_info for the label set ``labels`` (class_id i: labels[i]), unless that set is the one
        published last (the publisher is transient local: late subscribers get it). Only with the semantic model,
        while active (the node calls it on activation and on a change of ``labels``)."""
        if SEMANTIC_LABEL_INFO_TOPIC not in self.by_topic or labels == self._label_info:
            return
        self._publish(SEMANTIC_LABEL_INFO_TOPIC, lambda: LabelInfo(
            header=header, threshold=0.0,
            class_map=[VisionClass(class_id=index, class_name=label) for index, label in enumerate(labels)]))
        self._label_info = labels

    def label(self, pair: PreparedPair, result: Reconstruction, reconstructor: Reconstructor) -> QueryResult | None:
        """The active label set's answer on both views; None (warned) when the query fails."""
        labels = pair.settings.node.labels
        try:
            return reconstructor.query(result, labels, views=(0, 1))
        except Exception as exc:  # noqa: BLE001 - the geometry products are still published
            self._counters.count('labelling_failures')
            self._counters.warnings.warning('labelling_failed', f'labelling the pair at {pair.stamp_ns * 1e-9:.6f} s '
                                            f'with {list(labels)} failed ({type(exc).__name__}: {exc}): semantic '
                                            'products and the label field not published')
            return None

    def publish(self, pair: PreparedPair, result: Reconstruction, labelled: QueryResult | None,
                reconstructor: Reconstructor) -> None:
        """Publish every product of ``result`` stamped with the pair's stamp, with the pair's parameters."""
        cfg = pair.settings.node
        stamp = conversions.nanoseconds_to_stamp(pair.stamp_ns)

        def left_header() -> Header:
            return conversions.make_header(stamp, pair.left_frame)

        def right_header() -> Header:
            return conversions.make_header(stamp, pair.right_frame)

        width, height = result.size
        points = result.points(stride=cfg.point_stride)
        point_labels = None
        if labelled is not None and labelled.point_labels is not None:
            point_labels = labelled.point_labels[points['index']]
        self._publish(POINTS_TOPIC, lambda: conversions.pointcloud2_from_points(
            points['xyz'], points['rgb'], points['confidence'], left_header(), labels=point_labels))
        if labelled is not None:
            left_labels = labelled.label_images()[labelled.view_position(0)]
            palette = semantics.label_palette(len(labelled.phrases))
            self._publish(SEMANTIC_LABELS_TOPIC, lambda: conversions.mono_to_image_msg(left_labels, left_header()))
            self._publish(SEMANTIC_OVERLAY_TOPIC, lambda: conversions.rgb_to_image_msg(
                semantics.overlay(result.image_1, left_labels, cfg.overlay_alpha, palette), left_header()))
        self._publish(LEFT_DEPTH_TOPIC, lambda: conversions.depth_to_image_msg(result.depth_1, left_header()))
        self._publish(RIGHT_DEPTH_TOPIC, lambda: conversions.depth_to_image_msg(result.depth_2, right_header()))
        self._publish(LEFT_MODEL_INFO_TOPIC, lambda: conversions.model_camera_info(result.K_1, width, height,
                                                                                    left_header()))
        self._publish(RIGHT_MODEL_INFO_TOPIC, lambda: conversions.model_camera_info(result.K_2, width, height,
                                                                                     right_header()))
        self._publish_pose(pair, result, cfg, reconstructor.semantic, left_header())
        baseline = pair.calibration.baseline_m if pair.calibration and pair.calibration.baseline_m else 0.0
        info = ReconstructionInfo(
            header=left_header(), metric_scale=bool(result.metric_scale), scale_source=result.scale_source,
            scale_factor=float(result.scale_factor), baseline_m=float(baseline),
            intrinsics_source=result.intrinsics_source, width=int(width), height=int(height),
            k_left=np.asarray(result.K_1, dtype=np.float64).ravel().tolist(),
            k_right=np.asarray(result.K_2, dtype=np.float64).ravel().tolist(),
            num_points=int(points['xyz'].shape[0]), pose_valid=bool(result.pose.success),
            pose_source=result.pose_source,
            pose_inliers=int(result.pose.num_inliers),
            inference_time_s=float(sum(result.timings_s.get(stage, 0.0) for stage in NETWORK_STAGES)),
            labels=list(labelled.phrases) if labelled is not None else [])
        latency_s = time.monotonic() - pair.received_s
        info.total_time_s = float(latency_s)
        self._publish(INFO_TOPIC, lambda: info)
        self._latency.record(max(latency_s, 0.0))
        scale = diagnostics.SCALE_METRIC if result.metric_scale else diagnostics.SCALE_MODEL_UNITS
        self._counters.count('processed')
        with self._counters.lock:
            self.last_scale = (scale, result.scale_source, baseline or None)
        if cfg.render_views and result.gaussians is not None:
            self._publish_render_views(pair, result, cfg.render_views, reconstructor)

    def _publish_pose(self, pair: PreparedPair, result: Reconstruction, cfg: NodeConfig, semantic: bool,
                      header: Header) -> None:
        """~/relative_pose and, with ``publish_tf``, /tf (the right camera, and the midway view's frame)."""
        if not result.pose.success:
            self._counters.count('pose_failures')
            self._counters.warnings.warning('pose_failed', f'relative pose of the pair at {pair.stamp_ns * 1e-9:.6f} '
                                            f's failed ({result.pose.message}): ~/relative_pose and /tf not '
                                            'published')
            return
        self._publish(RELATIVE_POSE_TOPIC, lambda: conversions.pose_stamped_from_matrix(result.T_1_2, header))
        if cfg.publish_tf:
            transforms = [(result.T_1_2, pair.estimated_right_frame)]
            if 'midway' in cfg.render_views and semantic:
                transforms.append((midway_pose(result.T_1_2), pair.left_frame + MIDWAY_FRAME_SUFFIX))
            self.publish_tf(transforms, header)

    def _publish_render_views(self, pair: PreparedPair, result: Reconstruction, views: tuple[str, ...],
                              reconstructor: Reconstructor) -> None:
        """Render and publish the ``render_views`` of a reconstruction (rgb8 image and camera info per view)."""
        stamp = conversions.nanoseconds_to_stamp(pair.stamp_ns)
        for view in views:
            image_topic, info_topic = render_view_topics(view)
            if image_topic not in self.by_topic:
                continue  # named by a parameter change whose publishers are being created
            if view != 'left' and not result.pose.success:
                self._counters.warnings.warning(f'render_{view}_no_pose', f'no relative pose for the pair at '
                                                f'{pair.stamp_ns * 1e-9:.6f} s: render view {view!r} not published')
                continue
            camera, frame = render_view_camera(view, result, pair.left_frame, pair.right_frame)
            try:
                rendered = reconstructor.render(result, camera.T_left_camera, camera.K,
                                                (camera.width, camera.height), channels=('rgb',))
            except Exception as exc:  # noqa: BLE001 - a failed render must not stop the node
                self._counters.count('render_view_failures')
                self._counters.warnings.warning(f'render_{view}_failed', f'rendering view {view!r} of the pair at '
                                                f'{pair.stamp_ns * 1e-9:.6f} s failed: {type(exc).__name__}: {exc}')
                continue
            header = conversions.make_header(stamp, frame)
            self._publish(image_topic, functools.partial(conversions.unit_rgb_to_image_msg, rendered.rgb, header))
            self._publish(info_topic, functools.partial(conversions.model_camera_info, rendered.K, rendered.width,
                                                        rendered.height, header))

    def publish_tf(self, transforms: list[tuple[np.ndarray, str]], header: Header) -> None:
        """Broadcast ``(T_left_child, child frame)`` transforms from the left frame (the estimated right camera
        first)."""
        right_frame = transforms[0][1]
        if right_frame == header.frame_id:
            self._counters.warnings.warning('tf_same_frame', f'the left and the estimated right frame are both '
                                            f'{right_frame!r}: set left_frame_id/estimated_right_frame_id to publish '
                                            '/tf')
            return
        if self._tf_publisher is None:
            self._tf_publisher = self._create(TFMessage, TF_TOPIC, TF_QOS)
        message = TFMessage(transforms=[conversions.transform_stamped_from_matrix(T, header, child)
                                        for T, child in transforms])
        try:
            self._tf_publisher.publish(message)
        except Exception as exc:  # noqa: BLE001 - rclpy raises RCLError (and others on shutdown)
            self._failed(TF_TOPIC, exc)

    def _publish(self, topic: str, build: Callable[[], Any]) -> None:
        if not self._node.context.ok():   # shutting down (e.g. a signal): the products of a pair in flight are dropped
            self._counters.count('unpublished_at_shutdown')
            return
        try:
            self.by_topic[topic].publish(build())
        except Exception as exc:  # noqa: BLE001 - a failed publish must not stop the others
            self._failed(topic, exc)

    def _failed(self, topic: str, exc: Exception) -> None:
        self._counters.count('publish_failures')
        self._counters.warnings.warning(f'publish_{topic}', f'publishing {topic} failed: {type(exc).__name__}: '
                                        f'{exc}')
