"""Test set-up shared by every test module.

At import time, before any module imports rclpy, the DDS traffic of this pytest session is confined to this
machine: ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, a ROS_DOMAIN_ID of its own (reserved with a lock file, so
that concurrent sessions differ) and FASTDDS_DEFAULT_PROFILES_FILE=<repo>/config/fastdds_localhost.xml.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from lsm_ros.ros.isolation import apply_localhost_only_environment, reserve_domain_id  # noqa: E402 (no rclpy)

ROS_ENVIRONMENT = apply_localhost_only_environment(domain_id=reserve_domain_id())
# Official weights installed on this machine (lsm-ros weights fetch) must not change what the tests run: the default
# weights folder of this session (and of the processes it starts) is an empty one of its own.
os.environ['LSM_ROS_WEIGHTS'] = tempfile.mkdtemp(prefix='lsm_ros_test_weights_')
assert 'rclpy' not in sys.modules or os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] == 'LOCALHOST'

# After the isolation, on first use: RosGraph (the tests' in-process graph: add(), close()), wait_until and
# DEFAULT_EXECUTOR_THREADS of lsm_ros.ros.graph, which imports rclpy; ``from conftest import RosGraph`` works as
# before (module __getattr__). This module imports no rclpy itself, so a session without ROS (the CUDA tests on a GPU
# machine: ``pytest -m cuda``) can run the tests that need none; the test modules that need ROS are then reported
# as skipped (:func:`pytest_make_collect_report`).
_ROS_GRAPH_NAMES = frozenset({'DEFAULT_EXECUTOR_THREADS', 'RosGraph'})
# what a test module fails to import where ROS is not installed (rclpy, generated interfaces, rosbag2, launch)
_ROS_MODULE_MISSING = re.compile(r"No module named '(rclpy|rosidl\w*|rosbag2\w*|rcl\w*|\w+_msgs|\w+_interfaces|"
                                 r"lsm_ros\.(msg|srv)|launch\w*|ament\w*|tf2\w*|message_filters)[.']")


def __getattr__(name: str) -> Any:
    if name in _ROS_GRAPH_NAMES:
        from lsm_ros.ros import graph
        return getattr(graph, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def wait_until(*args: Any, **kwargs: Any) -> bool:
    """lsm_ros.ros.graph.wait_until (predicate, timeout_s, poll_s), imported on the first wait."""
    from lsm_ros.ros import graph
    return graph.wait_until(*args, **kwargs)


@functools.lru_cache(maxsize=1)
def ros_available() -> bool:
    """True when rclpy can be imported (asked only once a test module failed to import, after the isolation)."""
    try:
        import rclpy  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """Without ROS (no rclpy), a test module that cannot be imported for want of a ROS package is skipped with
    that reason instead of failing the collection; with ROS nothing changes."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and isinstance(collector, pytest.Module) and not ros_available():
        missing = _ROS_MODULE_MISSING.search(str(report.longrepr))
        if missing:
            report.outcome = 'skipped'
            report.longrepr = (str(collector.path), 0, f'Skipped: needs ROS 2 ({missing.group(1)} is not '
                                                       f'importable in this session)')

# The tiny random DUSt3R of the ROS tests: ~1 s per pair on 2 CPU cores at 224x224. The wide PnP threshold
# lets the relative pose of random point maps succeed, so every product (pose, /tf) is exercised.
TINY_NETWORK = dict(enc_embed_dim=32, enc_depth=1, enc_num_heads=2, dec_embed_dim=32, dec_depth=1, dec_num_heads=2,
                    dpt_layer_dims=(8, 16, 32, 64), dpt_feature_dim=16, dpt_last_dim=8)
TINY_PIPELINE = dict(device='cpu', resolution=224, pose_max_points=512, pose_ransac_iterations=20,
                     pose_reprojection_error_px=100.0)
TINY_MODEL_IMAGE_SIZE = 64   # side of the random images of the tiny_model tests (a multiple of LSeg's 32)
# The official constructor string of a small DUSt3R (its DPT heads keep the default widths, so it is not the tiny
# LSM's DUSt3R): the network of the small official-layout files of the checkpoint tests.
SMALL_DUST3R_STRING = ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', "
                       "img_size=(512, 512), head_type='dpt', output_mode='pts3d', depth_mode=('exp', -inf, inf), "
                       "conf_mode=('exp', 1, inf), enc_embed_dim=64, enc_depth=2, enc_num_heads=4, "
                       "dec_embed_dim=32, dec_depth=2, dec_num_heads=2)")
EUROC_BAG_RELATIVE = Path('data') / 'euroc_v101_stereo_rosbag2' / 'euroc_v101_stereo_db3'


def pytest_report_header(config: Any) -> str:
    return 'ROS isolation: ' + ', '.join(f'{k}={v}' for k, v in ROS_ENVIRONMENT.items())


def official_dust3r_checkpoint(net: Any, model_string: str, **args: Any) -> dict:
    """``net`` (a Dust3rNet) in the official DUSt3R file layout: ``{'args': Namespace(model=model_string, **args),
    'model': official state dict}``, with the layer_rn aliases and the (unused) ``mask_token`` of the real file."""
    import argparse

    import torch

    from lsm_ros.model.checkpoint import to_official_state_dict
    state = to_official_state_dict(net.state_dict())
    state['mask_token'] = torch.zeros(1, 1, net.config.dec_embed_dim)
    return {'args': argparse.Namespace(model=model_string, **args), 'model': state}


class LogRecords(logging.Handler):
    """Collects (level name, message) of the records of the logger it is added to, for the tests of the node's
    parts (they log through a logger they are given)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelname, record.getMessage()))


def write_small_dust3r_file(path: Path, model_string: str = SMALL_DUST3R_STRING, seed: int = 0) -> Path:
    """A small random DUSt3R (seeded) saved at ``path`` in the official file layout; returns ``path``."""
    import torch

    from lsm_ros.model import Dust3rConfig, Dust3rNet
    from lsm_ros.model.checkpoint import parse_constructor_string
    torch.manual_seed(seed)
    net = Dust3rNet(Dust3rConfig.from_constructor_kwargs(parse_constructor_string(model_string)[1]))
    torch.save(official_dust3r_checkpoint(net, model_string), path)
    return path


@pytest.fixture(scope='session')
def shared_dir() -> Path:
    """The project's shared folder: $LSM_ROS_SHARED, else <repo>/../shared."""
    return Path(os.environ.get('LSM_ROS_SHARED') or REPO_ROOT.parent / 'shared')


@pytest.fixture(scope='session')
def tiny_reconstructor() -> Any:
    """The real Reconstructor with a tiny random DUSt3R (untrained)."""
    from lsm_ros.model import Dust3rConfig
    from lsm_ros.pipeline import Reconstructor
    return Reconstructor.from_config(Dust3rConfig(**TINY_NETWORK), **TINY_PIPELINE)


@pytest.fixture(scope='session')
def tiny_lsm_reconstructor() -> Any:
    """The real Reconstructor with a tiny random full LSM (geometry, semantics, Gaussians, queries; untrained)."""
    from lsm_ros.model.lsm import LsmConfig
    from lsm_ros.pipeline import Reconstructor
    return Reconstructor.from_config(LsmConfig.tiny(), **TINY_PIPELINE)


@pytest.fixture(scope='module')
def tiny_model() -> Any:
    """The tiny random LargeSpatialModel (seed 0, eval mode), one per test module."""
    import torch

    from lsm_ros.model.lsm import LargeSpatialModel, LsmConfig
    torch.manual_seed(0)
    return LargeSpatialModel(LsmConfig.tiny()).eval()


@pytest.fixture(scope='module')
def tiny_pair() -> tuple[Any, Any]:
    """Two random (1, 3, 64, 64) images in [-1, 1] (seed 1): the tiny_model's input pair."""
    import torch
    generator = torch.Generator().manual_seed(1)
    size = TINY_MODEL_IMAGE_SIZE
    return (torch.rand(1, 3, size, size, generator=generator) * 2 - 1,
            torch.rand(1, 3, size, size, generator=generator) * 2 - 1)


@pytest.fixture(scope='session')
def stereo_bag(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The EuRoC stereo bag when present, else a small synthetic one with the same topics."""
    euroc = shared_dir / EUROC_BAG_RELATIVE
    if (euroc / 'metadata.yaml').is_file():
        return euroc
    from lsm_ros.ros.synthetic import write_synthetic_stereo_bag
    return write_synthetic_stereo_bag(tmp_path_factory.mktemp('bags') / 'synthetic', frames=4)


@pytest.fixture(scope='module')
def ros_context() -> Iterator[Any]:
    """A fresh, initialised rclpy Context per test module (shut down afterwards)."""
    import rclpy
    context = rclpy.Context()
    rclpy.init(context=context, args=[])
    try:
        yield context
    finally:
        context.try_shutdown()


@dataclass
class ReconstructGate:
    """See :func:`gated_reconstruct`."""

    entered: threading.Event     # set when a pair reached reconstruct
    release: threading.Event     # set to let it go on


@contextlib.contextmanager
def gated_reconstruct(reconstructor: Any, timeout_s: float = 180.0) -> Iterator[ReconstructGate]:
    """Hold the inference worker inside ``reconstructor.reconstruct`` (before the network) until ``release`` is set,
    at the latest on leaving the block or after ``timeout_s``; restores ``reconstruct`` afterwards."""
    from lsm_ros.ros.load_test import reconstruct_hook
    gate = ReconstructGate(threading.Event(), threading.Event())

    def hold() -> None:
        gate.entered.set()
        gate.release.wait(timeout_s)

    with reconstruct_hook(reconstructor, hold):
        try:
            yield gate
        finally:
            gate.release.set()


STEREO_REMAPS = {'left/image_rect': '/stereo/left/image_rect', 'right/image_rect': '/stereo/right/image_rect',
                 'left/camera_info': '/stereo/left/camera_info', 'right/camera_info': '/stereo/right/camera_info'}


def make_lsm_node(reconstructor: Any, context: Any, namespace: str = 'lsm', *,
                  node_options: dict[str, Any] | None = None, **parameters: Any) -> Any:
    """An LsmNode in ``namespace`` with its inputs remapped to /stereo/..., parameters given as overrides;
    ``node_options``: more keyword arguments of LsmNode (diagnostic_thresholds, ...)."""
    from rclpy.parameter import Parameter

    from lsm_ros.ros.node import LsmNode
    cli_args = ['--ros-args'] + [a for src, dst in STEREO_REMAPS.items() for a in ('-r', f'{src}:={dst}')]
    return LsmNode(reconstructor, context=context, namespace=namespace, cli_args=cli_args,
                   use_global_arguments=False,
                   parameter_overrides=[Parameter(k, value=v) for k, v in parameters.items()],
                   **(node_options or {}))


class ProductCollector:
    """A node that keeps every message of the lsm_node products, /tf and /rosout (by topic key)."""

    def __init__(self, context: Any, lsm_node: Any) -> None:
        from geometry_msgs.msg import PoseStamped
        from rcl_interfaces.msg import Log
        from rclpy.node import Node
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image, PointCloud2
        from tf2_msgs.msg import TFMessage

        from lsm_ros.msg import ReconstructionInfo
        from lsm_ros.ros import node as lsm
        self.node = Node('test_product_collector', context=context)
        self.topics = lsm_node.output_topic_names()
        self.topics[lsm.TF_TOPIC] = lsm.TF_TOPIC
        types = {lsm.POINTS_TOPIC: PointCloud2, lsm.LEFT_DEPTH_TOPIC: Image, lsm.RIGHT_DEPTH_TOPIC: Image,
                 lsm.LEFT_MODEL_INFO_TOPIC: CameraInfo, lsm.RIGHT_MODEL_INFO_TOPIC: CameraInfo,
                 lsm.RELATIVE_POSE_TOPIC: PoseStamped, lsm.INFO_TOPIC: ReconstructionInfo, lsm.TF_TOPIC: TFMessage}
        self.messages: dict[str, list[tuple[float, Any]]] = {key: [] for key in types}
        self.logs: list[Any] = []
        self._lock = threading.Lock()
        qos = QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE)
        for key, msg_type in types.items():
            self.node.create_subscription(msg_type, self.topics[key], self._keep(key), qos)
        self.node.create_subscription(Log, '/rosout', self._keep_log, QoSProfile(depth=200))

    def _keep(self, key: str) -> Callable[[Any], None]:
        def callback(msg: Any) -> None:
            with self._lock:
                self.messages[key].append((time.monotonic(), msg))
        return callback

    def _keep_log(self, msg: Any) -> None:
        with self._lock:
            self.logs.append(msg)

    def by_stamp(self, key: str, stamp_ns: int) -> list[Any]:
        """Messages of ``key`` stamped ``stamp_ns`` (:func:`message_stamp_ns`)."""
        with self._lock:
            return [msg for _, msg in self.messages[key] if message_stamp_ns(msg) == stamp_ns]

    def connected(self) -> bool:
        """Every product topic (except /tf, created on demand) has a publisher."""
        return all(self.node.count_publishers(t) > 0 for k, t in self.topics.items() if k != '/tf')


@pytest.fixture(scope='session')
def stereo_frames(stereo_bag: Path) -> list[Any]:
    """The first frames of :func:`stereo_bag`, rectified (lsm_ros.ros.bag_player.StereoFrame)."""
    from lsm_ros.ros.bag_player import read_stereo_frames
    return read_stereo_frames(stereo_bag, max_frames=4)


class StereoPublisher:
    """A node publishing stereo frames on /stereo/{left,right}/{image_rect,camera_info} (reliable)."""

    def __init__(self, context: Any) -> None:
        from rclpy.node import Node
        from sensor_msgs.msg import CameraInfo, Image
        self.node = Node('test_stereo_publisher', context=context)
        self.publishers = {key: self.node.create_publisher(msg_type, topic, 10) for key, msg_type, topic in (
            ('left_info', CameraInfo, STEREO_REMAPS['left/camera_info']),
            ('right_info', CameraInfo, STEREO_REMAPS['right/camera_info']),
            ('left_image', Image, STEREO_REMAPS['left/image_rect']),
            ('right_image', Image, STEREO_REMAPS['right/image_rect']))}

    def connected(self) -> bool:
        return all(p.get_subscription_count() > 0 for p in self.publishers.values())

    def publish(self, frame: Any, stamp_ns: int | None = None, *, left_image: Any = None, right_image: Any = None,
                with_camera_info: bool = True, info_settle_s: float = 0.1) -> int:
        """Publish a frame (optionally other images and a new stamp); CameraInfo first. Returns the stamp."""
        import copy

        from lsm_ros.ros.conversions import nanoseconds_to_stamp
        stamp_ns = frame.stamp_ns if stamp_ns is None else stamp_ns
        messages = {'left_info': frame.left_info, 'right_info': frame.right_info,
                    'left_image': left_image or frame.left_image, 'right_image': right_image or frame.right_image}
        for key, message in messages.items():
            if key.endswith('info') and not with_camera_info:
                continue
            message = copy.copy(message)
            message.header = copy.copy(message.header)
            message.header.stamp = nanoseconds_to_stamp(stamp_ns)
            self.publishers[key].publish(message)
            if key == 'right_info':
                time.sleep(info_settle_s)   # CameraInfo normally precedes its images
        return stamp_ns


NODE_TIMEOUT_S = 60.0               # generous waits for lsm_node: the 2-core machine may be shared
DISCOVERY_TIMEOUT_S = 30.0
STAMP_STEP_NS = 1_000_000_000       # NodeHarness.publish: at least this much newer than the previous frame


class NodeLogs:
    """Records what a node logs through ``get_logger()`` (forwarding it), by level; ``monkeypatch`` undoes it."""

    def __init__(self, node: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.records: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        real = node.get_logger()
        logs = self

        class Recording:
            # one call site per level: rclpy refuses a call site whose severity changes between calls
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def info(self, message: str, **kwargs: Any) -> Any:
                logs._record('info', message)
                return real.info(message, **kwargs)

            def warning(self, message: str, **kwargs: Any) -> Any:
                logs._record('warning', message)
                return real.warning(message, **kwargs)

            def error(self, message: str, **kwargs: Any) -> Any:
                logs._record('error', message)
                return real.error(message, **kwargs)

        recording = Recording()
        monkeypatch.setattr(node, 'get_logger', lambda: recording)

    def _record(self, level: str, message: str) -> None:
        with self._lock:
            self.records.append((level, message))

    def messages(self, level: str, fragment: str = '') -> list[str]:
        with self._lock:
            return [m for lvl, m in self.records if lvl == level and fragment in m]


def message_stamp_ns(msg: Any) -> int:
    """The stamp of a message's header (a TFMessage's: its first transform's), in nanoseconds."""
    from lsm_ros.ros.conversions import stamp_to_nanoseconds
    return stamp_to_nanoseconds((msg.transforms[0].header if hasattr(msg, 'transforms') else msg.header).stamp)


class NodeHarness:
    """An in-process lsm_node on the test module's Context: the node (:meth:`make_node` in ``namespace``, with
    ``parameters``), a stereo publisher (:meth:`make_publisher`), and a client node that keeps the node's ~/info by
    stamp (and the messages of the topics given to :meth:`keep`) and calls its services; all spun by a
    :class:`RosGraph` of ``executor_threads``. The constructor waits until :meth:`discovered`.

    Frames are published with strictly increasing stamps (:meth:`publish`), so the synchronizer never drops one as
    late; :meth:`play` also waits for the frame's ~/info (and kept messages), :meth:`reject` for the frame to be
    counted as rejected. Every wait for the node (a product, an answer, a rejection) lasts up to ``timeout_s``.
    :meth:`close` (also on leaving a ``with`` block) stops the graph. :func:`harness_fixture` makes the module's
    ``graph`` fixture of a harness class.
    """

    timeout_s = NODE_TIMEOUT_S
    executor_threads: int | None = None      # None: RosGraph's default, lsm_ros.ros.graph.DEFAULT_EXECUTOR_THREADS

    def __init__(self, context: Any, reconstructor: Any, namespace: str = 'lsm', **parameters: Any) -> None:
        from rclpy.node import Node

        from lsm_ros.msg import ReconstructionInfo
        from lsm_ros.ros import node as lsm
        from lsm_ros.ros.graph import RosGraph
        threads = {} if self.executor_threads is None else {'num_threads': self.executor_threads}
        self.executor = RosGraph(context, **threads)
        try:
            self.node = self.executor.add(self.make_node(reconstructor, context, namespace, **parameters))
            self.client = self.executor.add(Node(f'test_{namespace}_client', context=context))
            self._infos: dict[int, Any] = {}
            self._kept: dict[str, tuple[str, list[Any]]] = {}
            self._lock = threading.Lock()
            self._info_topic = self.node.output_topic_names()[lsm.INFO_TOPIC]
            self.client.create_subscription(ReconstructionInfo, self._info_topic, self._keep_info, self._qos())
            self.publisher = self.make_publisher(context)
            self.executor.add(self.publisher.node)
            self.last_stamp_ns = 0
            self.add_entities(context)
            assert wait_until(self.discovered, DISCOVERY_TIMEOUT_S), f'{type(self).__name__}: discovery failed'
        except BaseException:
            self.executor.close()
            raise

    # ------------------------------------------------------------------------------------------ for subclasses
    def make_node(self, reconstructor: Any, context: Any, namespace: str, **parameters: Any) -> Any:
        """The node under test: :func:`make_lsm_node`."""
        return make_lsm_node(reconstructor, context, namespace=namespace, **parameters)

    def make_publisher(self, context: Any) -> Any:
        """The node (``.node``) that publishes the frames: a :class:`StereoPublisher`."""
        return StereoPublisher(context)

    def add_entities(self, context: Any) -> None:
        """Called before the discovery wait: more nodes, clients or subscriptions."""

    def discovered(self) -> bool:
        """What the constructor waits for: the publisher's topics are subscribed."""
        return bool(self.publisher.connected())

    def close(self) -> None:
        self.executor.close()

    def __enter__(self) -> 'NodeHarness':
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ ~/info, products
    @staticmethod
    def _qos() -> Any:
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        return QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE)

    def _keep_info(self, msg: Any) -> None:
        with self._lock:
            self._infos[message_stamp_ns(msg)] = msg

    def info_stamps(self) -> set[int]:
        """The stamps of the ~/info messages received so far."""
        with self._lock:
            return set(self._infos)

    def info(self, stamp_ns: int) -> Any:
        """The ~/info of the pair stamped ``stamp_ns``, waited for."""
        assert wait_until(lambda: stamp_ns in self.info_stamps(), self.timeout_s), self.node.statistics()
        with self._lock:
            return self._infos[stamp_ns]

    def keep(self, topics: dict[str, tuple[str, Any]]) -> None:
        """Keep every message of ``topics`` ({key: (topic, message type)}) on the client node (call it from
        :meth:`add_entities`): :meth:`by_stamp`, :meth:`products`."""
        for key, (topic, msg_type) in topics.items():
            self._kept[key] = (topic, [])
            self.client.create_subscription(msg_type, topic, functools.partial(self._keep, key), self._qos())

    def _keep(self, key: str, msg: Any) -> None:
        with self._lock:
            self._kept[key][1].append(msg)

    def products_published(self) -> bool:
        """~/info and every kept topic but /tf (created on demand) have a publisher."""
        from lsm_ros.ros.node import TF_TOPIC
        topics = [self._info_topic] + [topic for topic, _ in self._kept.values() if topic != TF_TOPIC]
        return all(self.client.count_publishers(topic) > 0 for topic in topics)

    def by_stamp(self, key: str, stamp_ns: int) -> list[Any]:
        """The kept messages of ``key`` stamped ``stamp_ns`` (:func:`message_stamp_ns`), in arrival order."""
        with self._lock:
            messages = list(self._kept[key][1])
        return [msg for msg in messages if message_stamp_ns(msg) == stamp_ns]

    def products(self, stamp_ns: int) -> dict[str, Any]:
        """The ~/info (key lsm_ros.ros.node.INFO_TOPIC) and the first kept message of every key stamped
        ``stamp_ns``, waited for."""
        from lsm_ros.ros.node import INFO_TOPIC
        info = self.info(stamp_ns)
        assert wait_until(lambda: all(self.by_stamp(key, stamp_ns) for key in self._kept), self.timeout_s), \
            ({key: len(self.by_stamp(key, stamp_ns)) for key in self._kept}, self.node.statistics())
        return {INFO_TOPIC: info, **{key: self.by_stamp(key, stamp_ns)[0] for key in self._kept}}

    # ------------------------------------------------------------------------------------------ frames
    def publish(self, frame: Any, *args: Any, **kwargs: Any) -> int:
        """Publish ``frame`` (``args``/``kwargs`` go to the publisher) stamped at least STAMP_STEP_NS after the
        previous one; returns the stamp."""
        stamp_ns = max(frame.stamp_ns, self.last_stamp_ns + STAMP_STEP_NS)
        self.last_stamp_ns = stamp_ns
        self.publisher.publish(frame, stamp_ns, *args, **kwargs)
        return stamp_ns

    def play(self, frame: Any, *args: Any, **kwargs: Any) -> int:
        """Publish a frame that reconstructs and wait for its ~/info and kept messages (:meth:`products`); returns
        the stamp."""
        stamp_ns = self.publish(frame, *args, **kwargs)
        self.products(stamp_ns)
        return stamp_ns

    def reject(self, frame: Any, reason: str, *args: Any, **kwargs: Any) -> int:
        """Publish a frame that the node rejects: wait until it is counted under ``reason``; returns the stamp."""
        before = self.node.statistics()['rejected'].get(reason, 0)
        stamp_ns = self.publish(frame, *args, **kwargs)
        assert wait_until(lambda: self.node.statistics()['rejected'].get(reason, 0) == before + 1, self.timeout_s), \
            (reason, self.node.statistics())
        return stamp_ns

    # ------------------------------------------------------------------------------------------ services
    def call(self, client: Any, request: Any) -> Any:
        """Call a service of the client node and wait for the answer."""
        assert client.wait_for_service(timeout_sec=self.timeout_s), f'{client.srv_name} not available'
        future = client.call_async(request)
        assert wait_until(future.done, self.timeout_s), f'no answer to {request}'
        return future.result()

    @functools.cached_property
    def query_client(self) -> Any:
        from lsm_ros.srv import TextQuery
        return self.client.create_client(TextQuery, self.node.query_service_name())

    @functools.cached_property
    def render_client(self) -> Any:
        from lsm_ros.srv import RenderView
        return self.client.create_client(RenderView, self.node.render_service_name())

    def query(self, **fields: Any) -> Any:
        """~/query of a TextQuery.Request with ``fields``; without any, for 'chair' and 'table'."""
        from lsm_ros.srv import TextQuery
        return self.call(self.query_client, TextQuery.Request(**(fields or dict(phrases=['chair', 'table']))))

    def render(self, **fields: Any) -> Any:
        """~/render of a RenderView.Request with ``fields``; without any, of a 32x24 alpha image."""
        from lsm_ros.srv import RenderView
        return self.call(self.render_client,
                         RenderView.Request(**(fields or dict(width=32, height=24, channels=['alpha']))))

    @functools.cached_property
    def parameters(self) -> Any:
        """rclpy's parameter client of the node."""
        from rclpy.parameter_client import AsyncParameterClient
        return AsyncParameterClient(self.client, self.node.get_fully_qualified_name())

    def set_parameters(self, **values: Any) -> list[Any]:
        """One SetParameters request with every value (as `ros2 param set` or a parameter client sends it); the
        results."""
        from rclpy.parameter import Parameter
        assert self.parameters.wait_for_services(timeout_sec=DISCOVERY_TIMEOUT_S)
        future = self.parameters.set_parameters([Parameter(name, value=value) for name, value in values.items()])
        assert wait_until(future.done, self.timeout_s), f'no answer to set_parameters {values}'
        return list(future.result().results)


def harness_fixture(harness_class: Callable[[Any, Any], NodeHarness],
                    reconstructor: str = 'tiny_reconstructor') -> Any:
    """A module-scoped fixture ``graph``: ``harness_class(ros_context, <the reconstructor fixture>)``, closed after
    the module's tests (``graph = harness_fixture(MyHarness)`` in the module)."""

    @pytest.fixture(scope='module', name='graph')
    def graph(request: pytest.FixtureRequest, ros_context: Any) -> Iterator[NodeHarness]:
        with harness_class(ros_context, request.getfixturevalue(reconstructor)) as harness:
            yield harness

    return graph
