"""lsm_node with ``image_transport:=compressed`` over loopback: it subscribes sensor_msgs/CompressedImage on the
remapped base topics + '/compressed' (as image_transport resolves them), decodes JPEG and PNG (PNG exactly), and a
pair with undecodable data is rejected and counted (bad_image_data) like a bad raw image; the node goes on.
"""
from __future__ import annotations

import copy
import threading
from typing import Any, Iterator

import numpy as np
import pytest
from conftest import STEREO_REMAPS, NodeHarness, harness_fixture
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, CompressedImage

from lsm_ros.ros import conversions
from lsm_ros.ros import node as lsm

pytestmark = pytest.mark.timeout(120)
COMPRESSED_TOPICS = {side: STEREO_REMAPS[f'{side}/image_rect'] + '/compressed' for side in ('left', 'right')}


class CompressedStereoPublisher:
    """Publishes CameraInfo on /stereo/{left,right}/camera_info and CompressedImage on
    /stereo/{left,right}/image_rect/compressed (reliable)."""

    def __init__(self, context: Any) -> None:
        self.node = Node('test_compressed_publisher', context=context)
        self.infos = {side: self.node.create_publisher(CameraInfo, STEREO_REMAPS[f'{side}/camera_info'], 10)
                      for side in ('left', 'right')}
        self.images = {side: self.node.create_publisher(CompressedImage, COMPRESSED_TOPICS[side], 10)
                       for side in ('left', 'right')}

    def connected(self) -> bool:
        return all(p.get_subscription_count() > 0 for p in (*self.infos.values(), *self.images.values()))

    def publish(self, frame: Any, stamp_ns: int, images: dict[str, CompressedImage]) -> None:
        stamp = conversions.nanoseconds_to_stamp(stamp_ns)
        for side in ('left', 'right'):
            info = copy.copy(getattr(frame, f'{side}_info'))
            info.header = copy.copy(info.header)
            info.header.stamp = stamp
            self.infos[side].publish(info)
        threading.Event().wait(0.1)      # CameraInfo normally precedes its images
        for side in ('left', 'right'):
            image = copy.copy(images[side])
            image.header = copy.copy(image.header)
            image.header.stamp = stamp
            self.images[side].publish(image)


class CompressedHarness(NodeHarness):
    """lsm_node (tiny DUSt3R, image_transport compressed) in namespace ``compressed`` and the publisher above:
    ``publish(frame, images)``, ``play(frame, images)``."""

    def __init__(self, context: Any, reconstructor: Any) -> None:
        super().__init__(context, reconstructor, namespace='compressed', image_transport='compressed',
                         log_throttle_s=0.0)

    def make_publisher(self, context: Any) -> CompressedStereoPublisher:
        return CompressedStereoPublisher(context)


graph = harness_fixture(CompressedHarness)


@pytest.fixture
def inputs(graph: CompressedHarness) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
    """The (left, right) images the reconstructor is given while the test runs."""
    reconstructor = graph.node.reconstructor
    reconstruct = reconstructor.reconstruct
    seen: list[tuple[np.ndarray, np.ndarray]] = []

    def recording_reconstruct(left: np.ndarray, right: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        seen.append((left.copy(), right.copy()))
        return reconstruct(left, right, *args, **kwargs)

    reconstructor.reconstruct = recording_reconstruct     # instance attribute, removed below
    try:
        yield seen
    finally:
        del reconstructor.reconstruct


def _rgb(frame: Any) -> dict[str, np.ndarray]:
    return {side: conversions.image_to_numpy(getattr(frame, f'{side}_image')) for side in ('left', 'right')}


def _compressed(frame: Any, codec: str) -> dict[str, CompressedImage]:
    return {side: conversions.rgb_to_compressed_image_msg(rgb, getattr(frame, f'{side}_image').header, codec)
            for side, rgb in _rgb(frame).items()}


def test_the_node_subscribes_the_compressed_topics_of_the_remapped_bases(graph: CompressedHarness) -> None:
    subscribed = {s.topic_name: s.msg_type for s in graph.node.subscriptions}
    assert graph.node.input_image_topic_names() == COMPRESSED_TOPICS
    for topic in COMPRESSED_TOPICS.values():
        assert subscribed[topic] is CompressedImage
    assert STEREO_REMAPS['left/image_rect'] not in subscribed and STEREO_REMAPS['right/image_rect'] not in subscribed
    assert subscribed[STEREO_REMAPS['left/camera_info']] is CameraInfo


def test_without_remapping_the_compressed_topic_follows_the_namespace(ros_context: Any,
                                                                      tiny_reconstructor: Any) -> None:
    from lsm_ros.ros.node import LsmNode
    from rclpy.parameter import Parameter
    node = LsmNode(tiny_reconstructor, context=ros_context, namespace='cam', use_global_arguments=False,
                   parameter_overrides=[Parameter('image_transport', value='compressed'),
                                        Parameter('managed', value=True)])
    try:
        assert node.trigger_configure().to_label() == 'transition_success'
        assert node.input_image_topic_names() == {'left': '/cam/left/image_rect/compressed',
                                                  'right': '/cam/right/image_rect/compressed'}
    finally:
        node.destroy_node()


@pytest.mark.parametrize('codec', ['png', 'jpeg'])
def test_compressed_pairs_are_decoded_and_reconstructed(graph: CompressedHarness, stereo_frames: list[Any],
                                                        inputs: list[Any], codec: str) -> None:
    frame = stereo_frames[0]
    stamp_ns = graph.play(frame, _compressed(frame, codec))
    info = graph.info(stamp_ns)
    assert (info.width, info.height) == (224, 224) and info.intrinsics_source == 'camera_info'
    assert info.pose_valid and info.pose_source == 'stereo_calibration'   # the rig's CameraInfo was used
    assert info.header.frame_id == frame.left_image.header.frame_id
    [(left, right)] = inputs
    expected = _rgb(frame)
    assert left.shape == expected['left'].shape and left.dtype == np.uint8
    if codec == 'png':                           # lossless: exactly the raw pixels
        np.testing.assert_array_equal(left, expected['left'])
        np.testing.assert_array_equal(right, expected['right'])
    else:
        assert np.abs(left.astype(int) - expected['left']).mean() < 4.0


def test_undecodable_compressed_data_rejects_the_pair_and_the_node_goes_on(graph: CompressedHarness,
                                                                           stereo_frames: list[Any],
                                                                           inputs: list[Any]) -> None:
    node = graph.node
    frame = stereo_frames[1 % len(stereo_frames)]
    good = _compressed(frame, 'jpeg')
    corrupt = copy.copy(good['right'])
    corrupt.data = conversions.byte_array(bytes(corrupt.data)[: len(corrupt.data) // 2])   # truncated jpeg
    depth = copy.copy(good['left'])
    depth.format = '16UC1; compressedDepth png'
    garbage = copy.copy(good['left'])
    garbage.data = conversions.byte_array(b'not an image at all')
    bad_stamps = []
    for images in ({'left': good['left'], 'right': corrupt}, {'left': depth, 'right': good['right']},
                   {'left': garbage, 'right': good['right']}):
        bad_stamps.append(graph.reject(frame, lsm.REJECT_IMAGE_DATA, images))
    recovered = graph.play(frame, good)
    assert not set(bad_stamps) & graph.info_stamps()               # nothing published for a rejected pair
    assert len(inputs) == 1 and recovered in graph.info_stamps()   # only the good pair reached the network
    assert node.statistics()['worker']['failed'] == 0
