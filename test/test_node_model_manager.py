"""lsm_node's model through the life cycle alone (lsm_ros.ros.model_manager.ModelManager) with a fake model: load
(injected or built), the load state, warm-up failures, offload, release, and a parameter change never reaching a
forward in flight."""
from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

import numpy as np
import pytest
import torch

from lsm_ros.config import PipelineConfig
from lsm_ros.ros import diagnostics
from lsm_ros.ros.model_manager import ModelManager

pytestmark = pytest.mark.timeout(60)


class FakeReconstructor:
    """What ModelManager uses of a Reconstructor; ``offload()`` moves it off ``device`` unless it is the CPU."""

    def __init__(self, device: str = 'cpu', error: BaseException | None = None) -> None:
        self.device = torch.device(device)
        self.config = PipelineConfig(resolution=224)
        self.weights, self.semantic, self.trained_weights = 'fake weights', False, False
        self.error = error
        self.events: list[str] = []
        self.seen_configs: list[PipelineConfig] = []
        self.started, self.release = threading.Event(), threading.Event()
        self.release.set()

    def reconstruct(self, left: np.ndarray, right: np.ndarray, calibration: Any = None) -> None:
        self.seen_configs.append(self.config)
        self.events.append(f'reconstruct {left.shape[1]}x{left.shape[0]}')
        self.started.set()
        self.release.wait(10.0)
        if self.error is not None:
            raise self.error

    def reload(self) -> None:
        self.events.append('reload')

    def offload(self) -> bool:
        self.events.append('offload')
        return self.device.type != 'cpu'


def make(injected: FakeReconstructor | None, pipeline: PipelineConfig | None = None,
         build: Any = None) -> tuple[ModelManager, list[str], dict[str, PipelineConfig]]:
    released: list[str] = []
    current = {'pipeline': pipeline or PipelineConfig(resolution=224)}
    manager = ModelManager(injected, get_logger=lambda: logging.getLogger('test_node_model_manager'),
                           current_pipeline=lambda: current['pipeline'],
                           release_memory=lambda device: released.append(device.type),
                           **({'build': build} if build else {}))
    return manager, released, current


def test_an_injected_model_is_reloaded_configured_and_kept_over_release() -> None:
    fake = FakeReconstructor()
    manager, released, current = make(fake, PipelineConfig(resolution=224, min_confidence=3.0))
    assert manager.model is fake and manager.reconstructor is None and not manager.on_device
    assert manager.weights_to_load(PipelineConfig()) == 'fake weights'
    assert manager.load(current['pipeline'], torch_threads=1) is fake
    assert fake.events == ['reload'] and fake.config.min_confidence == 3.0 and manager.on_device
    assert manager.state()[0] == diagnostics.MODEL_LOADING   # the node sets ready once everything is up
    manager.release()
    assert manager.reconstructor is None and manager.model is fake and fake.events[-1] == 'offload'
    assert released == ['cpu'] and manager.state() == (diagnostics.MODEL_UNCONFIGURED, '', '')
    manager.release(drop_injected=True)
    assert manager.model is None


def test_without_an_injected_model_the_checkpoint_parameters_build_one() -> None:
    built: list[PipelineConfig] = []

    def build(pipeline: PipelineConfig, get_logger: Any) -> FakeReconstructor:
        built.append(pipeline)
        return FakeReconstructor()

    manager, _, _ = make(None, build=build)
    pipeline = PipelineConfig(dust3r_checkpoint='/weights/dust3r.pth', resolution=224)
    assert manager.weights_to_load(pipeline) == 'dust3r_checkpoint=/weights/dust3r.pth'
    assert manager.weights_to_load(PipelineConfig()) == 'no checkpoint configured'
    model = manager.load(pipeline, torch_threads=1)
    assert built == [pipeline] and manager.reconstructor is model and model.events == []
    manager.release()


def test_activate_warms_up_at_the_model_size_and_reports_a_failure_with_memory_released() -> None:
    fake = FakeReconstructor()
    manager, released, current = make(fake)
    manager.load(current['pipeline'], torch_threads=1)
    assert manager.activate(fake) is None and fake.events[-1] == 'reconstruct 224x224'
    fake.error = torch.OutOfMemoryError('CUDA out of memory')
    failure = manager.activate(fake)
    assert failure.startswith('the warm-up forward ran out of memory (OutOfMemoryError') and released == ['cpu']
    fake.error = ValueError('bad')
    assert manager.activate(fake) == 'the warm-up forward failed (ValueError: bad); still inactive'
    manager.release()


def test_offload_frees_an_accelerator_only_and_activate_reloads() -> None:
    cpu = FakeReconstructor()
    manager, released, current = make(cpu)
    manager.load(current['pipeline'], torch_threads=1)
    assert not manager.offload(cpu) and manager.on_device and released == []
    manager.release()
    gpu = FakeReconstructor(device='meta')            # any device but the CPU stands for an accelerator
    manager, released, current = make(gpu)
    manager.load(current['pipeline'], torch_threads=1)
    assert manager.offload(gpu) and not manager.on_device and released == ['meta']
    assert manager.activate(gpu) is None and gpu.events[-2:] == ['reload', 'reconstruct 224x224']
    assert manager.on_device


def test_a_parameter_change_waits_for_the_forward_in_flight() -> None:
    fake = FakeReconstructor()
    manager, _, current = make(fake)
    manager.load(current['pipeline'], torch_threads=1)
    pair_config = dataclasses.replace(current['pipeline'], min_confidence=2.0)
    fake.release.clear()

    def forward() -> None:
        with manager.pipeline_config(fake, pair_config):
            fake.reconstruct(np.zeros((4, 4, 3)), np.zeros((4, 4, 3)))

    thread = threading.Thread(target=forward)
    thread.start()
    assert fake.started.wait(10.0)
    current['pipeline'] = dataclasses.replace(current['pipeline'], min_confidence=5.0)
    assert manager.apply(current['pipeline']) is fake
    assert fake.config.min_confidence == 2.0          # the forward keeps its pair's config
    fake.release.set()
    thread.join(10.0)
    assert fake.seen_configs[-1].min_confidence == 2.0 and fake.config.min_confidence == 5.0
    manager.apply(dataclasses.replace(current['pipeline'], min_confidence=7.0))
    assert fake.config.min_confidence == 7.0          # no forward: at once
    manager.release()
