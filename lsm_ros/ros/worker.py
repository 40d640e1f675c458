"""``lsm_node``'s inference thread: checked pairs are reconstructed on one
:class:`~lsm_ros.ros.sync.LatestPairWorker` thread ("latest pair wins": while a pair is being processed only the
newest waiting pair is kept), each with its own parameter snapshot.

A pair whose inference raises (an exception, or running out of memory: then cached accelerator memory is released)
is dropped and counted (``reconstruction_failed``, ``out_of_memory``); a burst of such failures is logged once (its
first failure, at error level) and its end once ('recovered after N failed pairs'). A good reconstruction goes to
``publish(pair, result, reconstructor)``.

:class:`InferenceWorker` needs no node: the model, the config switch, the memory release and the logger are given
as callables (a test gives fakes).
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from lsm_ros.config import PipelineConfig
from lsm_ros.pipeline import Reconstruction, Reconstructor
from lsm_ros.ros.counters import NodeCounters
from lsm_ros.ros.inputs import PreparedPair
from lsm_ros.ros.names import REJECT_OUT_OF_MEMORY, REJECT_RECONSTRUCTION
from lsm_ros.ros.runtime import OUT_OF_MEMORY_ERRORS
from lsm_ros.ros.sync import LatestPairWorker

WORKER_IDLE_STATS = dict(submitted=0, processed=0, dropped=0, failed=0, discarded_on_stop=0)
Publish = Callable[[PreparedPair, Reconstruction, Reconstructor], None]
PipelineConfigSwitch = Callable[[Reconstructor, PipelineConfig], ContextManager[None]]


def _no_switch(reconstructor: Reconstructor, pipeline: PipelineConfig) -> ContextManager[None]:
    return contextlib.nullcontext()


class InferenceWorker:
    """The inference thread of one configuration (:meth:`start` .. :meth:`stop`) and the failure bookkeeping.

    ``reconstructor()``: the model (None: not configured, the pair is skipped); ``active()``: whether pairs are
    processed (else a pair reaching the thread is counted in ``pairs_discarded_inactive``); ``use_threads()``: gives
    the thread its torch thread count; ``pipeline_config(reconstructor, pipeline)``: a context in which the model
    runs with the pair's pipeline config; ``release_memory(device)``: after running out of memory.
    """

    def __init__(self, *, counters: NodeCounters, reconstructor: Callable[[], Reconstructor | None],
                 active: Callable[[], bool], publish: Publish, release_memory: Callable[[torch.device], None],
                 use_threads: Callable[[], None] = lambda: None,
                 pipeline_config: PipelineConfigSwitch = _no_switch) -> None:
        self._counters = counters
        self._reconstructor, self._active, self._publish = reconstructor, active, publish
        self._release_memory, self._use_threads, self._pipeline_config = release_memory, use_threads, pipeline_config
        self._worker: LatestPairWorker[PreparedPair] | None = None
        self._failure_burst = 0                     # pairs failed in a row (inference)

    # ------------------------------------------------------------------------------------------ thread
    def start(self, log_interval_s: float) -> None:
        """Start the thread (configure)."""
        self._worker = LatestPairWorker(self.process, logger=self._counters.get_logger(), name='lsm_inference',
                                        log_interval_s=log_interval_s).start()

    def stop(self, timeout_s: float) -> bool:
        """Stop the thread after its current pair (cleanup); False when it did not end within ``timeout_s``."""
        worker = self._worker
        if worker is None or not worker.running:
            return True
        return worker.stop(timeout_s=timeout_s)

    @property
    def started(self) -> bool:
        return self._worker is not None

    @property
    def running(self) -> bool:
        return self._worker is not None and self._worker.running

    def submit(self, pair: PreparedPair) -> bool:
        """Make ``pair`` the pending one (replacing a pending pair); False when there is no running thread."""
        worker = self._worker
        if worker is None:
            return False
        try:
            worker.submit(pair)  # replaces a still pending pair (counted in stats()['dropped'])
        except RuntimeError:     # stopped by a concurrent cleanup
            return False
        return True

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until nothing is pending or running (True at once without a thread)."""
        worker = self._worker
        return True if worker is None else worker.wait_idle(timeout_s)

    def stats(self) -> dict[str, int]:
        """The thread's counters (submitted, processed, dropped, failed, discarded_on_stop)."""
        worker = self._worker
        return worker.stats() if worker is not None else dict(WORKER_IDLE_STATS)

    @property
    def failure_burst(self) -> int:
        """Pairs failed in a row."""
        with self._counters.lock:
            return self._failure_burst

    # ------------------------------------------------------------------------------------------ one pair
    def process(self, pair: PreparedPair) -> None:
        """On the thread: reconstruct one pair with its parameter snapshot and publish its products. A failed
        inference drops the pair (counted by reason; a burst of failures is logged once)."""
        processing = self._active()
        if not processing:
            self._counters.count('pairs_discarded_inactive')
        reconstructor = self._reconstructor()
        if not processing or reconstructor is None:
            return
        self._use_threads()
        out_of_memory = False
        try:
            with self._pipeline_config(reconstructor, pair.settings.pipeline):
                result = reconstructor.reconstruct(pair.left_rgb, pair.right_rgb, pair.calibration)
        except OUT_OF_MEMORY_ERRORS as exc:
            self._failed(pair, REJECT_OUT_OF_MEMORY, exc)
            out_of_memory = True
        except Exception as exc:  # noqa: BLE001 - one failed pair must not stop the node
            self._failed(pair, REJECT_RECONSTRUCTION, exc)
            return
        if out_of_memory:   # outside the except block: its traceback no longer holds the failed forward's tensors
            self._release_memory(reconstructor.device)
            return
        self._succeeded()
        self._publish(pair, result, reconstructor)

    def _failed(self, pair: PreparedPair, reason: str, exc: BaseException) -> None:
        """Count a failed pair; log only the first failure of a burst (error level)."""
        self._counters.count_rejected(reason)
        with self._counters.lock:
            self._failure_burst += 1
            first = self._failure_burst == 1
        if first:
            kind = 'ran out of memory' if reason == REJECT_OUT_OF_MEMORY else 'failed'
            self._counters.get_logger().error(
                f'reconstruction of the pair at {pair.stamp_ns * 1e-9:.6f} s {kind}: {type(exc).__name__}: {exc}. '
                f'The pair is dropped ({reason}); further failures are counted, not logged, until a pair succeeds; '
                '~/query and ~/render answer from the last good reconstruction')

    def _succeeded(self) -> None:
        """End a burst of failures (one info line saying how many pairs it dropped)."""
        with self._counters.lock:
            failed, self._failure_burst = self._failure_burst, 0
        if failed:
            self._counters.get_logger().info(f'recovered after {failed} failed pair{"s" if failed != 1 else ""}')
