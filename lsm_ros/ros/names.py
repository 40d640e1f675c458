"""The names ``lsm_node`` is known by (its contract): input and output topics, services, default frames, the QoS of
its products, the lifecycle state labels and the reasons (``REJECT_*``) for which a pair gives no output.

Plain constants, shared by the node's parts (:mod:`lsm_ros.ros.inputs`, :mod:`lsm_ros.ros.publishers`, ...) and
re-exported by :mod:`lsm_ros.ros.node`, whose callers (tests, the demo, the docs generator) keep importing them
from there.
"""
from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from lsm_ros.ros import diagnostics

NODE_NAME = 'lsm_node'
# Input topics (relative: remap them, e.g. left/image_rect:=/stereo/left/image_rect).
LEFT_IMAGE_TOPIC = 'left/image_rect'
RIGHT_IMAGE_TOPIC = 'right/image_rect'
LEFT_INFO_TOPIC = 'left/camera_info'
RIGHT_INFO_TOPIC = 'right/camera_info'
INPUT_TOPICS = (LEFT_IMAGE_TOPIC, RIGHT_IMAGE_TOPIC, LEFT_INFO_TOPIC, RIGHT_INFO_TOPIC)
COMPRESSED_SUFFIX = '/compressed'    # image_transport 'compressed': <resolved base topic>/compressed
# Output topics (private: /<namespace>/lsm_node/...).
POINTS_TOPIC = '~/points'
LEFT_DEPTH_TOPIC = '~/left/depth'
RIGHT_DEPTH_TOPIC = '~/right/depth'
LEFT_MODEL_INFO_TOPIC = '~/left/camera_info'
RIGHT_MODEL_INFO_TOPIC = '~/right/camera_info'
RELATIVE_POSE_TOPIC = '~/relative_pose'
INFO_TOPIC = '~/info'
TF_TOPIC = '/tf'
OUTPUT_TOPICS = (POINTS_TOPIC, LEFT_DEPTH_TOPIC, RIGHT_DEPTH_TOPIC, LEFT_MODEL_INFO_TOPIC, RIGHT_MODEL_INFO_TOPIC,
                 RELATIVE_POSE_TOPIC, INFO_TOPIC)
# Timed stages of the network forward (reported as ReconstructionInfo.inference_time_s).
NETWORK_STAGES = ('network', 'semantics', 'gaussians')
# Outputs of the semantic model only.
SEMANTIC_LABELS_TOPIC = '~/semantic/labels'
SEMANTIC_OVERLAY_TOPIC = '~/semantic/overlay'
SEMANTIC_LABEL_INFO_TOPIC = '~/semantic/label_info'   # vision_msgs/LabelInfo of the active labels, transient local
SEMANTIC_TOPICS = (SEMANTIC_LABELS_TOPIC, SEMANTIC_OVERLAY_TOPIC, SEMANTIC_LABEL_INFO_TOPIC)
QUERY_SERVICE = '~/query'
RENDER_SERVICE = '~/render'
# Frames used when neither the parameter nor the image header names one.
DEFAULT_LEFT_FRAME = 'lsm_left_camera_optical_frame'
DEFAULT_RIGHT_FRAME = 'lsm_right_camera_optical_frame'

PRODUCT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=2, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
LABEL_INFO_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.TRANSIENT_LOCAL)  # latched: a late subscriber gets it too
TF_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE,
                    durability=DurabilityPolicy.VOLATILE)  # as tf2_ros.TransformBroadcaster
DIAGNOSTICS_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE)  # as diagnostic_updater

# Reasons for which a pair gives no output (counted in LsmNode.statistics()['rejected']).
REJECT_ENCODING = 'unsupported_encoding'
REJECT_IMAGE_DATA = 'bad_image_data'
REJECT_SIZE_MISMATCH = 'size_mismatch'
REJECT_NO_CAMERA_INFO = 'missing_camera_info'
REJECT_BAD_CAMERA_INFO = 'bad_camera_info'
REJECT_STALE = 'stale_stamp'
REJECT_TOO_OLD = 'too_old'
# inference raised / ran out of (accelerator or host) memory: diagnostics reports these as failures, not bad input
REJECT_RECONSTRUCTION, REJECT_OUT_OF_MEMORY = diagnostics.INFERENCE_FAILURE_REASONS

# Lifecycle: primary states (labels as lifecycle_msgs/State and `ros2 lifecycle get` spell them).
STATE_UNCONFIGURED = 'unconfigured'
STATE_INACTIVE = 'inactive'
STATE_ACTIVE = 'active'
STATE_FINALIZED = 'finalized'


__all__ = ['NODE_NAME', 'LEFT_IMAGE_TOPIC', 'RIGHT_IMAGE_TOPIC', 'LEFT_INFO_TOPIC', 'RIGHT_INFO_TOPIC', 'INPUT_TOPICS',
           'COMPRESSED_SUFFIX', 'POINTS_TOPIC', 'LEFT_DEPTH_TOPIC', 'RIGHT_DEPTH_TOPIC', 'LEFT_MODEL_INFO_TOPIC',
           'RIGHT_MODEL_INFO_TOPIC', 'RELATIVE_POSE_TOPIC', 'INFO_TOPIC', 'TF_TOPIC', 'OUTPUT_TOPICS', 'NETWORK_STAGES',
           'SEMANTIC_LABELS_TOPIC', 'SEMANTIC_OVERLAY_TOPIC', 'SEMANTIC_LABEL_INFO_TOPIC', 'SEMANTIC_TOPICS',
           'QUERY_SERVICE', 'RENDER_SERVICE', 'DEFAULT_LEFT_FRAME', 'DEFAULT_RIGHT_FRAME', 'PRODUCT_QOS',
           'LABEL_INFO_QOS', 'TF_QOS', 'DIAGNOSTICS_QOS', 'REJECT_ENCODING', 'REJECT_IMAGE_DATA', 'REJECT_SIZE_MISMATCH',
           'REJECT_NO_CAMERA_INFO', 'REJECT_BAD_CAMERA_INFO', 'REJECT_STALE', 'REJECT_TOO_OLD', 'REJECT_RECONSTRUCTION',
           'REJECT_OUT_OF_MEMORY', 'STATE_UNCONFIGURED', 'STATE_INACTIVE', 'STATE_ACTIVE', 'STATE_FINALIZED',
           'render_view_topics', 'stamp_text']


def render_view_topics(view: str) -> tuple[str, str]:
    """(image, camera_info) topics of a ``render_views`` view."""
    return f'~/render/{view}/image', f'~/render/{view}/camera_info'


def stamp_text(stamp_ns: int) -> str:
    """A stamp in log messages: seconds with 6 decimals."""
    return f'{stamp_ns * 1e-9:.6f} s'
