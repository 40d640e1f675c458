"""Process-level helpers of ``lsm_node`` (no ROS): the torch intra-op thread count (:class:`TorchThreads`), what
counts as running out of memory and how cached memory is released afterwards, and the synthetic warm-up pair."""
from __future__ import annotations

import gc
import os
import threading

import numpy as np
import torch

WARMUP_SHIFT_PX = 8              # disparity of the synthetic warm-up pair
# Errors that count as running out of memory (torch's CUDA OOM is a RuntimeError: caught before the others).
OUT_OF_MEMORY_ERRORS: tuple[type[BaseException], ...] = tuple(dict.fromkeys(
    error for error in (getattr(torch, 'OutOfMemoryError', None), getattr(torch.cuda, 'OutOfMemoryError', None),
                        MemoryError) if error is not None))


def available_cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:   # not on Linux
        return max(1, os.cpu_count() or 1)


def torch_thread_count(setting: int, cores: int | None = None) -> int:
    """The torch intra-op thread count of the ``torch_threads`` parameter: itself when > 0, else every CPU core
    this process may use (measured best with the steady executor: docs/performance.md)."""
    if setting > 0:
        return setting
    return available_cpu_cores() if cores is None else max(1, cores)


def process_torch_threads() -> int:
    """The torch thread count a thread started now gets: the process's current setting. (torch keeps the count per
    thread once a thread has used it, so the calling thread's own count may differ.)"""
    seen: list[int] = []
    probe = threading.Thread(target=lambda: seen.append(torch.get_num_threads()), name='lsm_torch_threads_probe')
    probe.start()
    probe.join()
    return seen[0]


class TorchThreads:
    """The torch intra-op thread count of one node configuration: :meth:`apply` sets it for the process (the count
    it replaced is kept), :meth:`use` gives it to the calling thread, :meth:`restore` puts the old count back.
    torch keeps the count per thread once a thread has used it (new threads start from the last count set): the
    threads that run the model call :meth:`use`."""

    def __init__(self) -> None:
        self._threads = 0                       # this configuration's count (0: untouched)
        self._before: int | None = None         # the process's count before the first apply

    def apply(self, setting: int) -> str:
        """torch.set_num_threads for the ``torch_threads`` parameter; returns the line to log."""
        threads, previous = torch_thread_count(setting), process_torch_threads()
        if self._before is None:
            self._before = previous
        self._threads = threads
        torch.set_num_threads(threads)
        how = (f'torch_threads = {setting}' if setting > 0 else
               f'torch_threads = 0: every one of the {available_cpu_cores()} CPU core(s)')
        return f'torch runs {threads} intra-op thread(s) ({how}; was {previous})'

    def use(self) -> None:
        """Give the calling thread the configured count (a no-op when it has it already, or none is configured)."""
        threads = self._threads
        if threads and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def restore(self) -> None:
        """Back to the count :meth:`apply` replaced (a no-op when nothing was applied)."""
        self._threads = 0
        if self._before is not None:
            torch.set_num_threads(self._before)
            self._before = None


def release_cached_memory(device: torch.device) -> None:
    """After running out of memory: collect garbage (tensors held by reference cycles) and, on CUDA, hand torch's
    cached blocks back to the driver."""
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def warmup_pair(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic textured pair at the model size, ``resolution`` x ``resolution`` (H,W,3) uint8 RGB each: the right
    view is the left one shifted by :data:`WARMUP_SHIFT_PX` pixels."""
    width = resolution + WARMUP_SHIFT_PX
    y, x = np.mgrid[0:resolution, 0:width].astype(np.float32)
    texture = np.stack([128 + 100 * np.sin(x / 7.0) * np.cos(y / 11.0), 255 * x / width, 255 * y / resolution],
                       axis=-1)
    pattern = np.clip(texture, 0, 255).astype(np.uint8)
    return pattern[:, WARMUP_SHIFT_PX:].copy(), pattern[:, :resolution].copy()
