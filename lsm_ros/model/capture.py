"""CUDA-graph capture of the fixed-shape networks (DUSt3R, LSeg), keyed by input shape and precision.

A network whose input shape is fixed launches the same kernels with the same arguments for every pair: capturing
them once in a CUDA graph and replaying it removes the per-kernel launch cost of eager PyTorch (thousands of
launches per pair). :class:`GraphCache` keeps one captured graph per :func:`capture_key` (name, device, input
shapes and dtypes, precision): a new resolution or precision captures again (after warm-up runs), an old key is
evicted beyond ``max_entries``. On the CPU, or when disabled, :meth:`GraphCache.run` simply calls the function.

Rules for a function to be captured (DUSt3R's and LSeg's forwards follow them): tensors in, a dict of tensors out;
no host synchronisation (``.item()``, ``nonzero``, data-dependent shapes, ``.cpu()``), no new tensors taken from
the host, only parameters that do not require grad (autocast's weight-cast cache then stays unused). Replays write
into the graph's static output buffers; :meth:`GraphCache.run` returns clones, so a result stays valid after the
next replay. A graph holds the addresses of the module's parameters: call :meth:`GraphCache.clear` whenever they
move (``.to(...)``, a dtype cast, offloading), which also frees the graphs' memory pools.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

_log = logging.getLogger(__name__)

GraphFunction = Callable[..., Mapping[str, Tensor]]
DEFAULT_WARMUP_RUNS = 3     # eager runs on a side stream before capture (cuDNN/cuBLAS choose their algorithms)
DEFAULT_MAX_ENTRIES = 4     # captured graphs kept per cache (e.g. two networks x two resolutions)


def capture_key(name: str, inputs: Sequence[Tensor], precision: str) -> tuple[Hashable, ...]:
    """The identity of a capture: ``name`` of the network, the inputs' device, shapes and dtypes, and the
    precision it runs in. Two calls with equal keys launch the same kernels."""
    for tensor in inputs:
        if not isinstance(tensor, Tensor):
            raise TypeError(f'graph inputs must be tensors, got {type(tensor).__name__}')
    return (name, str(inputs[0].device) if inputs else 'none', precision,
            tuple((tuple(t.shape), str(t.dtype)) for t in inputs))


@dataclass
class CapturedGraph:
    """A captured graph with its static input and output buffers."""

    graph: Any                       # torch.cuda.CUDAGraph (or a test double with a replay() method)
    static_inputs: tuple[Tensor, ...]
    static_outputs: dict[str, Tensor]

    def replay(self, inputs: Sequence[Tensor]) -> dict[str, Tensor]:
        """Copy ``inputs`` into the static inputs, replay on the current stream, return clones of the outputs."""
        for static, tensor in zip(self.static_inputs, inputs):
            static.copy_(tensor)
        self.graph.replay()
        return {key: value.clone() for key, value in self.static_outputs.items()}


def capture_cuda_graph(function: GraphFunction, inputs: Sequence[Tensor], warmup_runs: int = DEFAULT_WARMUP_RUNS
                       ) -> CapturedGraph:
    """Capture ``function(*inputs)`` in a CUDA graph: ``warmup_runs`` eager runs on a side stream (as
    torch.cuda.graphs requires), then the capture with static copies of ``inputs`` (capture_error_mode
    'thread_local': other threads, e.g. a ROS query callback, may keep using the GPU meanwhile)."""
    device = inputs[0].device
    if device.type != 'cuda':
        raise ValueError(f'CUDA graphs need CUDA tensors, got {device}')
    with torch.cuda.device(device):   # the capture stream of torch.cuda.graph is made on the current device
        static_inputs = tuple(t.detach().clone() for t in inputs)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup_runs):
                function(*static_inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, capture_error_mode='thread_local'):
            outputs = function(*static_inputs)
    if not isinstance(outputs, Mapping) or not all(isinstance(v, Tensor) for v in outputs.values()):
        raise TypeError('a captured function must return a dict of tensors')
    return CapturedGraph(graph, static_inputs, dict(outputs))


class GraphCache:
    """Captured graphs of fixed-shape functions, least recently used first out.

    ``enabled``: capture on CUDA (False, or a CPU input: :meth:`run` calls the function eagerly).
    ``capture``: the capture routine (default :func:`capture_cuda_graph`; tests inject a double).
    Thread-safe; captures and replays of one cache are serialised. A key whose capture fails runs eagerly from
    then on (logged once), so an uncapturable function costs speed, never a result.
    """

    def __init__(self, enabled: bool, *, max_entries: int = DEFAULT_MAX_ENTRIES,
                 capture: Callable[[GraphFunction, Sequence[Tensor]], CapturedGraph] = capture_cuda_graph) -> None:
        if max_entries < 1:
            raise ValueError(f'max_entries must be >= 1, got {max_entries}')
        self.enabled = enabled
        self.max_entries = max_entries
        self._capture = capture
        self._graphs: OrderedDict[tuple[Hashable, ...], CapturedGraph] = OrderedDict()
        self._failed: set[tuple[Hashable, ...]] = set()
        self._lock = threading.Lock()
        self.captures = 0     # graphs captured since construction (re-captures included)

    def __len__(self) -> int:
        return len(self._graphs)

    def keys(self) -> list[tuple[Hashable, ...]]:
        """The keys of the graphs held, least recently used first."""
        with self._lock:
            return list(self._graphs)

    def active_for(self, inputs: Sequence[Tensor]) -> bool:
        """True when :meth:`run` would capture/replay (enabled and CUDA inputs) rather than run eagerly."""
        return self.enabled and bool(inputs) and inputs[0].device.type == 'cuda'

    def run(self, name: str, function: GraphFunction, inputs: Sequence[Tensor], precision: str
            ) -> dict[str, Tensor]:
        """``function(*inputs)``: replayed from the graph of ``capture_key(name, inputs, precision)``, captured
        first if missing; eagerly when not :meth:`active_for` the inputs."""
        inputs = tuple(inputs)
        if not self.active_for(inputs):
            return dict(function(*inputs))
        key = capture_key(name, inputs, precision)
        with self._lock:
            if key in self._failed:
                return dict(function(*inputs))
            captured = self._graphs.get(key)
            if captured is None:
                _log.info('capturing %s in a CUDA graph (%s)', name, key[2:])
                try:
                    captured = self._capture(function, inputs)
                except Exception as exc:   # noqa: BLE001 (any capture error: run eagerly instead)
                    _log.warning('could not capture %s in a CUDA graph (%s: %s): it runs eagerly', name,
                                 type(exc).__name__, exc)
                    self._failed.add(key)
                    return dict(function(*inputs))
                self.captures += 1
                self._graphs[key] = captured
                while len(self._graphs) > self.max_entries:
                    evicted, _ = self._graphs.popitem(last=False)
                    _log.info('dropped the CUDA graph of %s', evicted)
            self._graphs.move_to_end(key)
            return captured.replay(inputs)

    def clear(self) -> None:
        """Drop every graph (their memory pools are freed once no replay output refers to them)."""
        with self._lock:
            self._graphs.clear()
            self._failed.clear()
