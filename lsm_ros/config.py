"""The one typed configuration of lsm_ros.

Every field of :class:`PipelineConfig` and :class:`NodeConfig` is also a ROS parameter of ``lsm_node`` with the
same name, type, description and range (``lsm_ros.ros.params`` mirrors them 1:1; ``config/lsm.yaml`` lists
them). This module has no ROS imports: the pipeline and the CLI use it as plain dataclasses.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from lsm_ros.semantics import DEFAULT_LABELS, MAX_PHRASE_CHARS, MAX_PHRASES, validate_phrases

RESOLUTIONS = (224, 256, 512)
# Arithmetic precisions of the dense networks: lsm_ros.model.layers.PRECISIONS (not imported: no torch here).
PRECISIONS = ('fp32', 'bf16', 'fp16')
# Virtual views lsm_node can render after every reconstruction (parameter render_views).
RENDER_VIEWS = ('left', 'right', 'midway')
# How lsm_node receives its images (parameter image_transport): as image_transport's 'raw' or 'compressed'.
IMAGE_TRANSPORTS = ('raw', 'compressed')
DEVICES_HELP = "'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'"


@dataclass(frozen=True)
class ParameterSpec:
    """Description of one configuration field, as a ROS parameter descriptor needs it.

    ``type`` is bool, int, float, str or tuple (a string array: a list or tuple of str, kept as a tuple).
    ``check``: a further validation of the typed value (returns the value to keep, raises ValueError);
    ``constraints``: its rule in words, for the parameter descriptor.
    """

    name: str
    default: Any
    type: type
    description: str
    min_value: float | None = None
    max_value: float | None = None
    choices: tuple[Any, ...] | None = None
    read_only: bool = False
    check: Callable[[Any], Any] | None = None
    constraints: str = ''

    def validate(self, value: Any) -> Any:
        """Return ``value`` converted to this field's type, or raise ValueError saying why it is refused."""
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f'{self.name}: expected a bool, got {value!r}')
        elif self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f'{self.name}: expected an integer, got {value!r}')
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f'{self.name}: expected a number, got {value!r}')
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f'{self.name}: must be finite, got {value!r}')
        elif self.type is str:
            if not isinstance(value, str):
                raise ValueError(f'{self.name}: expected a string, got {value!r}')
        elif self.type is tuple:
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f'{self.name}: expected a list of strings, got {value!r}')
            value = tuple(value)
        if self.choices is not None and value not in self.choices:
            raise ValueError(f'{self.name}: {value!r} is not one of {list(self.choices)}')
        if self.min_value is not None and value < self.min_value:
            raise ValueError(f'{self.name}: {value!r} is below the minimum {self.min_value}')
        if self.max_value is not None and value > self.max_value:
            raise ValueError(f'{self.name}: {value!r} is above the maximum {self.max_value}')
        if self.check is not None:
            try:
                value = self.check(value)
            except ValueError as exc:
                raise ValueError(f'{self.name}: {exc}') from exc
        return value


def _param(default: Any, description: str, *, min_value: float | None = None, max_value: float | None = None,
           choices: Sequence[Any] | None = None, read_only: bool = False, check: Callable[[Any], Any] | None = None,
           constraints: str = '') -> Any:
    meta = dict(description=description, min_value=min_value, max_value=max_value,
                choices=tuple(choices) if choices is not None else None, read_only=read_only, check=check,
                constraints=constraints)
    return field(default=default, metadata=meta)


def validate_render_views(views: tuple[str, ...]) -> tuple[str, ...]:
    """The ``render_views`` value: distinct names among :data:`RENDER_VIEWS` (raises ValueError)."""
    for position, view in enumerate(views):
        if view not in RENDER_VIEWS:
            raise ValueError(f'unknown view {view!r}: choose among {list(RENDER_VIEWS)}')
        if view in views[:position]:
            raise ValueError(f'view {view!r} is listed twice')
    return views


@dataclass
class PipelineConfig:
    """Model files, device and camera recovery: everything the framework-free pipeline needs."""

    dust3r_checkpoint: str = _param(
        '', 'Path of the official DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth (DUSt3R file format). Empty: the '
        'DUSt3R file named inside lsm_checkpoint, else random weights (untrained outputs).', read_only=True)
    lseg_checkpoint: str = _param(
        '', 'Path of the official LSeg demo_e200.ckpt (used by the semantic stages).', read_only=True)
    lsm_checkpoint: str = _param(
        '', 'Path of the official LSM checkpoint-final.pth (used by the semantic stages).', read_only=True)
    device: str = _param('auto', f'Torch device: {DEVICES_HELP}.', read_only=True)
    resolution: int = _param(
        256, 'Model input resolution: 224 or 256 (short side, centre square crop) or 512 (long side, '
        'multiples of 16), as in the official demo.', choices=RESOLUTIONS, read_only=True)
    precision: str = _param(
        'fp32', "Arithmetic of the dense networks. 'fp32': exact (the official implementation's results). 'bf16' "
        '(CPU with AVX512-BF16/AMX, or CUDA): LSeg under bfloat16 autocast, DUSt3R stays fp32 (in bf16 its depth '
        "would differ from fp32 by over 1 % on a fifth to a third of the pixels); 'fp16' (CUDA only): DUSt3R and "
        'LSeg under float16 autocast (depth within about 1 % of fp32). Reduced precision is approximate: '
        'matrix products and convolutions are rounded (the transformers\' residual streams stay float32), and '
        'small point-map changes move points across PTv3 voxels. Always float32: the point-map exp post-processing, '
        'point merging and voxelisation, PTv3, kNN and the Gaussian head (CLIP text features and label '
        'decoding are float16, as in the official code).', choices=PRECISIONS, read_only=True)
    cuda_graphs: bool = _param(
        False, 'CUDA only (no effect on the CPU): capture DUSt3R and LSeg, whose input shape is fixed, in CUDA graphs '
        'and replay them (one capture per resolution and precision, on the first pair: that pair is slower; the '
        'graphs keep their activation memory). Same results as eager execution.', read_only=True)
    cuda_streams: bool = _param(
        False, 'CUDA only (no effect on the CPU): run LSeg on a second CUDA stream beside DUSt3R, and PTv3 with the '
        'Gaussian head there beside the camera recovery. Same results as one stream.', read_only=True)
    min_confidence: float = _param(
        1.0, 'Points and depth pixels with a DUSt3R confidence below this are dropped (NaN in depth). '
        'Confidence is 1 + exp(c) >= 1, so 1.0 keeps everything.', min_value=1.0, max_value=1.0e6)
    pose_reprojection_error_px: float = _param(
        5.0, 'Inlier threshold of the relative-pose RANSAC (PnP, pixels at model resolution).',
        min_value=0.1, max_value=100.0)
    pose_ransac_iterations: int = _param(
        100, 'Relative-pose RANSAC rounds: 8 x this many 6-point PnP hypotheses, scored together on the device.', min_value=1, max_value=100000)
    pose_max_points: int = _param(
        8192, 'At most this many confident pixels (chosen deterministically) enter the PnP RANSAC.',
        min_value=16, max_value=1 << 20)


@dataclass
class NodeConfig:
    """Topics, synchronisation, publishing and life cycle of ``lsm_node``."""

    image_transport: str = _param(
        'raw', "How the images arrive, as image_transport names it: 'raw' subscribes sensor_msgs/Image on "
        "left/image_rect and right/image_rect; 'compressed' subscribes sensor_msgs/CompressedImage (JPEG or PNG, as "
        "image_transport's compressed plugin publishes it) on <base topic>/compressed, the base topic resolved with "
        'its remapping (left/image_rect:=/cam/left/image_rect -> /cam/left/image_rect/compressed). Undecodable data '
        'rejects the pair (bad_image_data).', choices=IMAGE_TRANSPORTS, read_only=True)
    approximate_sync: bool = _param(
        True, 'Pair left/right images whose stamps differ by at most sync_tolerance_s (false: equal stamps '
        'only, as from a hardware-synchronised stereo camera).')
    sync_tolerance_s: float = _param(
        0.02, 'Largest left/right stamp difference (seconds) paired when approximate_sync is true. Also answers to '
        "stereo_image_proc's name approximate_sync_tolerance_seconds.",
        min_value=0.0, max_value=10.0)
    sync_queue_size: int = _param(
        10, 'Images kept per side while waiting for their partner. Also answers to stereo_image_proc\'s name '
        'queue_size.', min_value=1, max_value=1000)
    use_camera_info: bool = _param(
        True, 'Use left/camera_info and right/camera_info: real intrinsics, and metric scale from a calibrated '
        'stereo baseline (right P[0,3] = -fx*B). A pair without matching CameraInfo is then rejected. '
        'false: intrinsics are estimated from the point maps and the scale is the model\'s.')
    camera_info_tolerance_s: float = _param(
        0.5, 'Largest stamp difference (seconds) between an image and the CameraInfo used for it.',
        min_value=0.0, max_value=3600.0)
    camera_info_wait_s: float = _param(
        1.0, 'How long (seconds, arrival time) a synchronised pair whose CameraInfo has not arrived yet waits for '
        'it (CameraInfo travels on its own topics and may be delivered after the images); one pair waits at a '
        'time, a newer one replaces it. 0: reject such a pair at once (missing_camera_info).',
        min_value=0.0, max_value=10.0)
    max_input_age_s: float = _param(
        0.0, 'Reject pairs whose stamp is older than this (seconds, node clock); 0 disables the check. Pairs '
        'not newer than the last processed pair are always rejected.', min_value=0.0, max_value=3600.0)
    publish_tf: bool = _param(
        False, 'Also broadcast the estimated pose of the right camera in the left camera frame on /tf, as the frame '
        'estimated_right_frame_id.')
    left_frame_id: str = _param(
        '', "Frame of all products (the left camera's optical frame). Empty: the left image's header.frame_id.")
    right_frame_id: str = _param(
        '', "Frame of the right camera's products (~/right/depth, ~/right/camera_info). Empty: the right image's "
        'header.frame_id.')
    estimated_right_frame_id: str = _param(
        '', "Frame of the estimated right camera: the child frame of /tf (publish_tf) and the frame ~/relative_pose "
        "places in the left frame. Empty: the right camera's frame + '_estimated'. Never the right image's own frame, "
        'which robot_state_publisher (the URDF) owns.')
    point_stride: int = _param(
        1, 'Publish every n-th pixel (in rows and columns) of each view in ~/points.', min_value=1, max_value=64)
    labels: tuple[str, ...] = _param(
        DEFAULT_LABELS, 'Active label set of the semantic model (LSM + LSeg checkpoints): the phrases whose '
        'arg-max label ~/semantic/labels and ~/semantic/overlay show and the label field of ~/points carries '
        '(value i = labels[i]); also the phrases of a ~/query request without phrases. A change applies from the '
        'next published reconstruction. Ignored by the geometry-only model.', check=validate_phrases,
        constraints=f'1 to {MAX_PHRASES} distinct phrases of 1 to {MAX_PHRASE_CHARS} characters')
    overlay_alpha: float = _param(
        0.5, 'Opacity of the label colours over the left model image in ~/semantic/overlay (0: image only, '
        '1: colours only).', min_value=0.0, max_value=1.0)
    query_cluster_distance: float = _param(
        0.05, 'Clustering distance of the 3-D answers of ~/query (detections): two points of a phrase at most this '
        'far apart belong to the same object (exact single linkage). In the reconstruction\'s units: metres when the '
        'scale is metric (calibrated stereo baseline), else the model\'s units (scene depths of order 1). A request\'s '
        'cluster_distance > 0 overrides it.', min_value=1.0e-4, max_value=100.0)
    query_min_cluster_points: int = _param(
        10, 'Objects of fewer points than this are left out of the detections of ~/query (their points stay in the '
        'phrase\'s cloud).', min_value=1, max_value=1000000)
    render_views: tuple[str, ...] = _param(
        (), 'Virtual views rendered from the semantic Gaussians after every reconstruction, published as rgb8 on '
        '~/render/<view>/image with ~/render/<view>/camera_info (model size, stamp of the pair): \'left\' (the left '
        'camera, left frame), \'right\' (the right camera at the estimated relative pose, right frame), '
        '\'midway\' (halfway between them: half the translation, half the rotation, the mean intrinsics; frame '
        '<left frame>_midway, broadcast on /tf with publish_tf). Right and midway need a successful relative pose. '
        'Each view costs a render on the inference thread (about 1 s at 256x256 on a 2-core CPU). Empty: none. '
        'Ignored by the geometry-only model.', check=validate_render_views,
        constraints=f'distinct names among {", ".join(RENDER_VIEWS)}')
    log_throttle_s: float = _param(
        5.0, 'Repeated warnings about bad input are logged at most once per this many seconds.',
        min_value=0.0, max_value=3600.0)
    diagnostics_period_s: float = _param(
        1.0, 'Period (seconds) of the health report on /diagnostics (diagnostic_msgs/DiagnosticArray: the statuses '
        '<node>: inputs, <node>: processing and <node>: model), published in every lifecycle state, unconfigured '
        'included (a failed configure is reported as model state failed).', min_value=0.1, max_value=60.0)
    managed: bool = _param(
        False, 'Life cycle. false: lsm_node configures and activates itself at start-up. true: it starts '
        'unconfigured and waits for lifecycle transitions (ros2 lifecycle set /lsm/lsm_node configure, then '
        'activate; the launch file does both with managed:=true autostart:=true): configure loads the weights and '
        'creates the topics and services, activate warms the model up and starts processing, deactivate stops '
        'processing and frees accelerator memory (the last reconstruction is kept), cleanup releases everything.',
        read_only=True)
    torch_threads: int = _param(
        0, 'Intra-op threads of torch (torch.set_num_threads), set when the node configures. 0: every CPU core the '
        'process may use. Measured on 2 cores under a 30 Hz stream (full LSM, 256x256): 2 threads 9.2 s per pair, '
        '1 thread 14.1 s, no image lost either way (docs/performance.md). Set fewer to leave cores to other '
        'processes of the robot.', min_value=0, max_value=1024, read_only=True)


CONFIG_SECTIONS = (PipelineConfig, NodeConfig)


def parameter_specs(config_cls: type) -> list[ParameterSpec]:
    """The :class:`ParameterSpec` of every field of a config dataclass, in declaration order."""
    specs = []
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        specs.append(ParameterSpec(
            name=f.name, default=f.default, type=type(f.default), description=meta['description'],
            min_value=meta['min_value'], max_value=meta['max_value'], choices=meta['choices'],
            read_only=meta['read_only'], check=meta['check'], constraints=meta['constraints']))
    return specs


# Other names of node parameters, as stereo_image_proc spells them: declared too, always equal to the parameter they
# name (setting one sets both; one request giving them different values is refused).
PARAMETER_ALIASES = {'approximate_sync_tolerance_seconds': 'sync_tolerance_s', 'queue_size': 'sync_queue_size'}


def alias_specs() -> list[ParameterSpec]:
    """The :class:`ParameterSpec` of every :data:`PARAMETER_ALIASES` name: its parameter's, renamed."""
    specs = {spec.name: spec for cls in CONFIG_SECTIONS for spec in parameter_specs(cls)}
    return [dataclasses.replace(specs[target], name=alias, description=(
        f"stereo_image_proc's name of {target} (the same value: setting one sets both). "
        + specs[target].description.split(' Also answers to')[0])) for alias, target in PARAMETER_ALIASES.items()]


def all_parameter_specs() -> Iterator[ParameterSpec]:
    """Every ROS parameter of ``lsm_node``: the pipeline's fields, the node's, then the aliases."""
    for cls in CONFIG_SECTIONS:
        yield from parameter_specs(cls)
    yield from alias_specs()


def config_from_mapping(config_cls: type, values: Mapping[str, Any], *, strict: bool = True) -> Any:
    """Build ``config_cls`` from a flat mapping, validating every value (unknown keys: ValueError if strict)."""
    specs = {s.name: s for s in parameter_specs(config_cls)}
    unknown = sorted(set(values) - set(specs))
    if unknown and strict:
        raise ValueError(f'unknown {config_cls.__name__} fields: {unknown}; known: {sorted(specs)}')
    kwargs = {name: specs[name].validate(value) for name, value in values.items() if name in specs}
    return config_cls(**kwargs)
