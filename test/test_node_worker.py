"""lsm_node's inference thread alone (lsm_ros.ros.worker.InferenceWorker) with a fake model: publishing, latest pair
wins, failures counted by reason and logged once per burst, memory released after running out of it, pairs reaching
an inactive node discarded."""
from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import pytest
import torch

from conftest import LogRecords
from lsm_ros.config import NodeConfig, PipelineConfig
from lsm_ros.ros import names
from lsm_ros.ros.counters import NodeCounters
from lsm_ros.ros.inputs import PreparedPair
from lsm_ros.ros.params import ParameterSnapshot
from lsm_ros.ros.worker import InferenceWorker

pytestmark = pytest.mark.timeout(60)


class FakeReconstructor:
    """reconstruct() returns the stamp it was given in the left image, or raises the scripted error."""

    device = torch.device('cpu')

    def __init__(self, errors: dict[int, BaseException] | None = None) -> None:
        self.errors = errors or {}
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[int] = []

    def reconstruct(self, left: np.ndarray, right: np.ndarray, calibration: Any = None) -> str:
        self.gate.wait(10.0)
        stamp = int(left[0, 0, 0])
        self.calls.append(stamp)
        if stamp in self.errors:
            raise self.errors[stamp]
        return f'result {stamp}'


def pair(stamp: int) -> PreparedPair:
    rgb = np.full((4, 4, 3), stamp, dtype=np.uint8)
    return PreparedPair(stamp_ns=stamp, left_rgb=rgb, right_rgb=rgb, calibration=None, left_frame='l',
                        right_frame='r', estimated_right_frame='r_estimated', received_s=0.0,
                        settings=ParameterSnapshot(PipelineConfig(), NodeConfig()))


def make(reconstructor: FakeReconstructor, active: bool = True) -> tuple[InferenceWorker, NodeCounters, list, list,
                                                                          LogRecords]:
    logs = LogRecords()
    logger = logging.getLogger(f'test_node_worker.{id(logs)}')
    logger.addHandler(logs)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    counters = NodeCounters(lambda: logger, 0.0)
    published: list[tuple[int, Any]] = []
    released: list[str] = []
    worker = InferenceWorker(counters=counters, reconstructor=lambda: reconstructor, active=lambda: active,
                             publish=lambda p, result, rec: published.append((p.stamp_ns, result)),
                             release_memory=lambda device: released.append(device.type))
    return worker, counters, published, released, logs


def test_pairs_are_reconstructed_and_published_on_the_thread_the_latest_pending_wins() -> None:
    reconstructor = FakeReconstructor()
    worker, counters, published, _, _ = make(reconstructor)
    assert worker.stats() == dict(submitted=0, processed=0, dropped=0, failed=0, discarded_on_stop=0)
    assert not worker.submit(pair(1))                 # not started: refused
    worker.start(log_interval_s=1.0)
    reconstructor.gate.clear()
    assert worker.submit(pair(1))
    for stamp in (2, 3, 4):                          # while 1 runs, only the newest waiting pair is kept
        assert worker.submit(pair(stamp))
    reconstructor.gate.set()
    assert worker.wait_idle(10.0)
    assert [stamp for stamp, _ in published] in ([1, 4], [4])   # 1 may be replaced before the thread took it
    assert published[-1] == (4, 'result 4')
    stats = worker.stats()
    assert stats['submitted'] == 4 and stats['submitted'] == stats['processed'] + stats['dropped']
    assert worker.stop(5.0) and not worker.running


def test_a_burst_of_failures_is_counted_logged_once_and_its_end_once() -> None:
    reconstructor = FakeReconstructor({2: RuntimeError('boom'), 3: torch.OutOfMemoryError('oom'),
                                       4: MemoryError('host')})
    worker, counters, published, released, logs = make(reconstructor)
    for stamp in (1, 2, 3, 4, 5):
        worker.process(pair(stamp))                   # synchronously, as the thread would
        if stamp == 3:
            assert worker.failure_burst == 2
    _, rejected, _ = counters.snapshot()
    assert rejected == {names.REJECT_RECONSTRUCTION: 1, names.REJECT_OUT_OF_MEMORY: 2}
    assert released == ['cpu', 'cpu']                 # after each out-of-memory only
    assert [stamp for stamp, _ in published] == [1, 5] and worker.failure_burst == 0
    errors = [m for level, m in logs.records if level == 'ERROR']
    assert len(errors) == 1 and 'failed: RuntimeError: boom' in errors[0] and names.REJECT_RECONSTRUCTION in errors[0]
    assert [m for level, m in logs.records if level == 'INFO'] == ['recovered after 3 failed pairs']


def test_a_pair_reaching_an_inactive_node_is_discarded_unreconstructed() -> None:
    reconstructor = FakeReconstructor()
    worker, counters, published, _, _ = make(reconstructor, active=False)
    worker.process(pair(1))
    assert reconstructor.calls == [] and published == []
    assert counters.snapshot()[0] == {'pairs_discarded_inactive': 1}


def test_the_pair_runs_inside_its_pipeline_config() -> None:
    entered: list[PipelineConfig] = []

    class Switch:
        def __init__(self, reconstructor: Any, pipeline: PipelineConfig) -> None:
            entered.append(pipeline)

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: Any) -> None:
            entered.append(None)

    reconstructor = FakeReconstructor()
    counters = NodeCounters(lambda: logging.getLogger('test_node_worker'), 0.0)
    worker = InferenceWorker(counters=counters, reconstructor=lambda: reconstructor, active=lambda: True,
                             publish=lambda *args: None, release_memory=lambda device: None, pipeline_config=Switch)
    p = pair(7)
    worker.process(p)
    assert entered == [p.settings.pipeline, None]
