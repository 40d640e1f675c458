"""``lsm_node``'s model through its life cycle: load (configure), warm up and reload (activate), offload (deactivate),
release (cleanup, shutdown, error), the torch thread count of the configuration, and the load state /diagnostics
reports (unconfigured, loading, ready, failed with the error).

- configure: torch threads (``torch_threads``), the model built from the checkpoint parameters (the official files
  installed by ``lsm-ros weights fetch`` when none is set), or the one passed to the node's constructor;
- activate: the model back on its device if deactivate moved it, one timed warm-up forward on a synthetic pair at
  the model size;
- deactivate: on CUDA the model moves to the CPU and the cached CUDA memory is released;
- release: the model is dropped (a model passed to the constructor is only moved off the accelerator and kept for
  the next configure), the torch thread count is restored.

Every inference runs inside :meth:`ModelManager.pipeline_config` with its pair's pipeline parameters: runtime changes
made meanwhile reach the model only afterwards, so one forward never mixes two configs.

:class:`ModelManager` has no rclpy: a test gives it a logger source and a fake or tiny reconstructor.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Callable, Iterator

import torch

from lsm_ros.config import NodeConfig, PipelineConfig, parameter_specs
from lsm_ros.pipeline import Reconstructor
from lsm_ros.ros import diagnostics
from lsm_ros.ros.counters import Logger, LoggerSource
from lsm_ros.ros.params import ParameterSnapshot
from lsm_ros.ros.runtime import OUT_OF_MEMORY_ERRORS, TorchThreads, warmup_pair
from lsm_ros.weights import default_weights_dir, installed_checkpoints

CHECKPOINT_HELP = (
    'lsm_node needs the official DUSt3R weights: pass the file with -p dust3r_checkpoint:=/path/to/'
    'DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth (or lsm_checkpoint:=/path/to/checkpoint-final.pth, whose config '
    'names the DUSt3R file), e.g. `ros2 run lsm_ros lsm_node --ros-args -p dust3r_checkpoint:=...`, '
    '`ros2 launch lsm_ros lsm.launch.py dust3r_checkpoint:=...` or in config/lsm.yaml; or install the three '
    'official files with `lsm-ros weights fetch` (used when no checkpoint parameter is set).')
CHECKPOINT_PARAMETERS = ('lsm_checkpoint', 'dust3r_checkpoint', 'lseg_checkpoint')
SETTABLE_PIPELINE_FIELDS = tuple(spec.name for spec in parameter_specs(PipelineConfig) if not spec.read_only)
READ_ONLY_PIPELINE_FIELDS = tuple(spec.name for spec in parameter_specs(PipelineConfig) if spec.read_only)


def build_reconstructor(pipeline: PipelineConfig, get_logger: LoggerSource) -> Reconstructor:
    """The model of the checkpoint parameters; when none is set, of the official files installed by
    ``lsm-ros weights fetch`` (``$LSM_ROS_WEIGHTS`` or ``~/.cache/lsm_ros/weights``); ValueError when neither."""
    if not (pipeline.dust3r_checkpoint or pipeline.lsm_checkpoint):
        installed = installed_checkpoints()
        if not installed:
            raise ValueError(f'no checkpoint configured and none installed in {default_weights_dir()}. '
                             + CHECKPOINT_HELP)
        get_logger().info(f'no checkpoint parameter set: using the official weights installed in '
                          f'{default_weights_dir()}: {", ".join(installed.values())}')
        pipeline = dataclasses.replace(pipeline, **installed)
    return Reconstructor.from_checkpoints(config=pipeline)


def pipeline_config_for(reconstructor: Reconstructor, parameters: PipelineConfig) -> PipelineConfig:
    """The reconstructor's config with the runtime-settable pipeline parameters applied."""
    return dataclasses.replace(reconstructor.config,
                               **{name: getattr(parameters, name) for name in SETTABLE_PIPELINE_FIELDS})


def announce_configuration(logger: Logger, rec: Reconstructor, cfg: NodeConfig, input_topics: dict[str, str],
                           labels_topic: str, query_service: str, render_service: str) -> None:
    """Log what a configure set up (model, sync, inputs; the semantic outputs), and a banner for untrained weights."""
    logger.info(f'lsm_node configured: weights {rec.weights}, device {rec.device}, resolution '
                f'{rec.config.resolution}, {"approximate" if cfg.approximate_sync else "exact"} stereo sync, '
                f'camera info {"used" if cfg.use_camera_info else "ignored (intrinsics estimated)"}; '
                f'{cfg.image_transport} images from {input_topics["left"]} and {input_topics["right"]}')
    if rec.semantic:
        logger.info(f'semantic model: labels {list(cfg.labels)} on {labels_topic}; text queries on {query_service}; '
                    f'rendering on {render_service}'
                    + (f'; render views {list(cfg.render_views)}' if cfg.render_views else ''))
    elif cfg.render_views:
        logger.warning(f'render_views {list(cfg.render_views)} ignored: the geometry-only model has no Gaussians')
    if not rec.trained_weights:
        banner = '!' * 100
        logger.error(f'\n{banner}\n  UNTRAINED WEIGHTS ({rec.weights}): every product of this node is '
                     f'meaningless.\n  {CHECKPOINT_HELP}\n{banner}')


class ModelManager:
    """The model of one node (see the module docstring). ``injected``: a reconstructor given by the caller (None:
    built at :meth:`load`); ``current_pipeline()``: the pipeline parameters in effect now; ``release_memory(device)``:
    frees cached memory once a model left a device; ``build(pipeline, get_logger)``: builds the model."""

    def __init__(self, injected: Reconstructor | None, *, get_logger: LoggerSource,
                 current_pipeline: Callable[[], PipelineConfig], release_memory: Callable[[torch.device], None],
                 build: Callable[[PipelineConfig, LoggerSource], Reconstructor] = build_reconstructor) -> None:
        self.injected = injected
        self.reconstructor: Reconstructor | None = None
        self.offloaded = False                      # deactivate moved the model off its accelerator
        self.torch_threads = TorchThreads()         # torch intra-op threads of this configuration
        self._get_logger, self._current_pipeline = get_logger, current_pipeline
        self._release_memory, self._build = release_memory, build
        self._config_lock = threading.Lock()        # reconstructor.config vs. runtime parameter changes
        self._inferring = False                     # the reconstructor runs with a pair's pipeline config
        self._state_lock = threading.Lock()
        self._state, self._error, self._loading = diagnostics.MODEL_UNCONFIGURED, '', ''

    # ------------------------------------------------------------------------------------------ state
    @property
    def model(self) -> Reconstructor | None:
        """The model in use once loaded, else the injected one (None: not built yet)."""
        return self.reconstructor if self.reconstructor is not None else self.injected

    @property
    def on_device(self) -> bool:
        """Loaded and not offloaded."""
        return self.reconstructor is not None and not self.offloaded

    def resolution(self, settings: ParameterSnapshot) -> int:
        """The input resolution of the loaded model, else of the parameters ``settings``."""
        reconstructor = self.reconstructor
        return reconstructor.config.resolution if reconstructor is not None else settings.pipeline.resolution

    def state(self) -> tuple[str, str, str]:
        """(load state, error of a failed load, what is being loaded) as /diagnostics reports them."""
        with self._state_lock:
            return self._state, self._error, self._loading

    def set_state(self, state: str, *, weights: str = '', error: str = '') -> None:
        """The model load state reported on /diagnostics (``error``: why loading failed)."""
        with self._state_lock:
            self._state, self._error, self._loading = state, error, weights

    def weights_to_load(self, pipeline: PipelineConfig) -> str:
        """What :meth:`load` is about to load: the injected model's weights, else the checkpoint parameters."""
        if self.injected is not None:
            return self.injected.weights
        files = [f'{name}={getattr(pipeline, name)}' for name in CHECKPOINT_PARAMETERS if getattr(pipeline, name)]
        return ', '.join(files) or 'no checkpoint configured'

    # ------------------------------------------------------------------------------------------ life cycle
    def load(self, pipeline: PipelineConfig, torch_threads: int) -> Reconstructor:
        """Configure: torch threads, then the injected model back on its device or a new one built from
        ``pipeline``; state 'loading' (the caller sets ready or failed). Raises what building raises."""
        self.set_state(diagnostics.MODEL_LOADING, weights=self.weights_to_load(pipeline))
        self._get_logger().info(self.torch_threads.apply(torch_threads))
        if self.injected is not None:
            reconstructor = self.injected
            self._warn_ignored_read_only(reconstructor, pipeline)
            reconstructor.reload()   # moved off the accelerator by an earlier release
        else:
            started = time.perf_counter()
            reconstructor = self._build(pipeline, self._get_logger)
            self._get_logger().info(f'model {reconstructor.weights} loaded on {reconstructor.device} in '
                                    f'{time.perf_counter() - started:.1f} s')
        with self._config_lock:
            reconstructor.config = pipeline_config_for(reconstructor, self._current_pipeline())
            self.reconstructor = reconstructor
        self.offloaded = False
        return reconstructor

    def _warn_ignored_read_only(self, reconstructor: Reconstructor, parameters: PipelineConfig) -> None:
        """An injected reconstructor fixes the read-only pipeline parameters: say which overrides are ignored."""
        for name in READ_ONLY_PIPELINE_FIELDS:
            wanted, used = getattr(parameters, name), getattr(reconstructor.config, name)
            if wanted != used:
                self._get_logger().warning(f'parameter {name}={wanted!r} ignored: the injected reconstructor was '
                                           f'built with {used!r}')

    def activate(self, reconstructor: Reconstructor) -> str | None:
        """Activate: the model back on its device when deactivate moved it, then one timed warm-up forward on a
        synthetic pair at the model size (not published). Returns why the warm-up failed (cached memory released
        then), None when it succeeded."""
        if self.offloaded:
            started = time.perf_counter()
            reconstructor.reload()
            self.offloaded = False
            self._get_logger().info(f'model back on {reconstructor.device} in '
                                    f'{time.perf_counter() - started:.2f} s')
        failure = None
        try:
            self._warm_up(reconstructor)
        except OUT_OF_MEMORY_ERRORS as exc:
            failure = f'the warm-up forward ran out of memory ({type(exc).__name__}: {exc}); still inactive'
        except Exception as exc:  # noqa: BLE001 - reported as a failed activation
            failure = f'the warm-up forward failed ({type(exc).__name__}: {exc}); still inactive'
        if failure is not None:   # outside the except blocks: their tracebacks no longer hold the forward's tensors
            self._release_memory(reconstructor.device)
        return failure

    def _warm_up(self, reconstructor: Reconstructor) -> None:
        self.torch_threads.use()
        size = reconstructor.config.resolution
        left, right = warmup_pair(size)
        started = time.perf_counter()
        with self.pipeline_config(reconstructor, self._current_pipeline()):
            reconstructor.reconstruct(left, right)
        self._get_logger().info(f'warm-up: one forward on a synthetic {size}x{size} pair on {reconstructor.device} '
                                f'took {time.perf_counter() - started:.2f} s')

    def offload(self, reconstructor: Reconstructor) -> bool:
        """Deactivate: move the model off its accelerator and release the cached memory (True); False on the CPU,
        where nothing is freed."""
        if not reconstructor.offload():
            return False
        self.offloaded = True
        self._release_memory(reconstructor.device)
        return True

    def release(self, drop_injected: bool = False) -> None:
        """Cleanup: drop the model (an injected one is moved off the accelerator and kept unless ``drop_injected``),
        restore the torch thread count; state unconfigured. A failure to move the model is logged."""
        with self._config_lock:
            reconstructor, self.reconstructor = self.reconstructor, None
        if drop_injected:
            self.injected = None
        if reconstructor is not None:
            device = reconstructor.device
            try:
                reconstructor.offload()   # a caller's reconstructor is kept, off the accelerator
            except Exception as exc:  # noqa: BLE001 - the rest is released anyway
                self._get_logger().error(f'moving the model off {device} failed: {type(exc).__name__}: {exc}')
            del reconstructor
            self._release_memory(device)
        self.offloaded = False
        self.set_state(diagnostics.MODEL_UNCONFIGURED)
        self.torch_threads.restore()

    # ------------------------------------------------------------------------------------------ parameters
    @contextlib.contextmanager
    def pipeline_config(self, reconstructor: Reconstructor, pipeline: PipelineConfig) -> Iterator[None]:
        """Run inference with ``pipeline`` as the reconstructor's config, then back to the current parameters."""
        with self._config_lock:
            self._inferring = True
            reconstructor.config = pipeline_config_for(reconstructor, pipeline)
        try:
            yield
        finally:
            with self._config_lock:
                self._inferring = False
                reconstructor.config = pipeline_config_for(reconstructor, self._current_pipeline())

    def apply(self, pipeline: PipelineConfig) -> Reconstructor | None:
        """A runtime parameter change: the model's config follows at once unless a forward runs (then it follows
        when the forward ends). Returns the loaded model."""
        with self._config_lock:
            reconstructor = self.reconstructor
            if reconstructor is not None and not self._inferring:
                reconstructor.config = pipeline_config_for(reconstructor, pipeline)
        return reconstructor
