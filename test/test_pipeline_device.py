"""Device residency, precision storage and the CUDA speed paths of the pipeline.

CPU (always): the CUDA-graph cache logic (keys, re-capture on a new shape or precision, LRU eviction, clones of the
static outputs) with a CPU stand-in for the capture; ``cuda_graphs``/``cuda_streams`` are no-ops on the CPU (same
results bit for bit); reduced-precision weight storage is exact and reversible; the Gaussians' device tensors are
kept for query/render; the per-device precision tables. CUDA (marker ``cuda``, skipped without a GPU): graphs and
streams give eager results, bf16 stores LSeg's weights in bf16 and fp32 restores them, offload drops the device
tensors and graphs, and a query of 8 phrases is timed.
"""
from __future__ import annotations

import time
from dataclasses import fields, replace
from typing import Any, Mapping, Sequence

import numpy as np
import pytest
import torch
from conftest import TINY_PIPELINE

from lsm_ros.model.capture import CapturedGraph, GraphCache, capture_key
from lsm_ros.model.lsm import LsmConfig
from lsm_ros.pipeline import (CUDA_NETWORK_PRECISIONS, NETWORK_PRECISIONS, GaussianCloud, Reconstructor,
                              network_precisions, store_weights)
from lsm_ros.semantics import DEFAULT_LABELS

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


def _pair(seed: int = 3, size: int = 240) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (size, size + 40, 3), dtype=np.uint8),
            rng.integers(0, 256, (size, size + 40, 3), dtype=np.uint8))


class _CpuGraph:
    """A CPU stand-in of a captured CUDA graph: replay() recomputes the function from the static inputs into the
    static output buffers, as a graph replay overwrites them."""

    def __init__(self, function: Any, static_inputs: Sequence[torch.Tensor], static_outputs: Mapping[str, Any]):
        self.function, self.static_inputs, self.static_outputs = function, static_inputs, static_outputs
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        for key, value in self.function(*self.static_inputs).items():
            self.static_outputs[key].copy_(value)


def _cpu_capture(function: Any, inputs: Sequence[torch.Tensor]) -> CapturedGraph:
    static_inputs = tuple(t.clone() for t in inputs)
    static_outputs = {k: torch.empty_like(v) for k, v in function(*static_inputs).items()}
    return CapturedGraph(_CpuGraph(function, static_inputs, static_outputs), static_inputs, static_outputs)


class _ActiveOnCpu(GraphCache):
    def active_for(self, inputs: Sequence[torch.Tensor]) -> bool:
        return self.enabled


def _double(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    return {'sum': 2 * x + y}


# ---------------------------------------------------------------------------------------------- graph cache (CPU)
def test_capture_key_separates_shape_dtype_precision_and_name() -> None:
    a, b = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    key = capture_key('dust3r', (a, b), 'fp32')
    assert key == capture_key('dust3r', (a.clone(), b + 1), 'fp32')          # values do not matter
    assert key != capture_key('dust3r', (a, torch.zeros(1, 3, 4, 8)), 'fp32')
    assert key != capture_key('dust3r', (a, b.double()), 'fp32')
    assert key != capture_key('dust3r', (a, b), 'bf16')
    assert key != capture_key('lseg', (a, b), 'fp32')
    with pytest.raises(TypeError, match='must be tensors'):
        capture_key('dust3r', (a, np.zeros(3)), 'fp32')


def test_graph_cache_captures_once_per_key_replays_fresh_inputs_and_evicts_the_oldest() -> None:
    cache = _ActiveOnCpu(True, max_entries=2, capture=_cpu_capture)
    x, y = torch.arange(4.0), torch.ones(4)
    first = cache.run('net', _double, (x, y), 'fp32')
    second = cache.run('net', _double, (x + 10, y), 'fp32')            # same key: a replay with the new values
    assert cache.captures == 1 and len(cache) == 1
    torch.testing.assert_close(first['sum'], 2 * x + y, rtol=0, atol=0)
    torch.testing.assert_close(second['sum'], 2 * (x + 10) + y, rtol=0, atol=0)
    assert first['sum'].data_ptr() != second['sum'].data_ptr()         # clones: a replay does not change a result
    torch.testing.assert_close(first['sum'], 2 * x + y, rtol=0, atol=0)
    cache.run('net', _double, (x, y), 'bf16')                             # a new precision captures again
    cache.run('net', _double, (torch.arange(6.0), torch.ones(6)), 'fp32')  # a new shape too; the oldest goes
    assert cache.captures == 3 and len(cache) == 2
    assert [key[2] for key in cache.keys()] == ['bf16', 'fp32']
    assert cache.keys()[-1][3] == (((6,), 'torch.float32'),) * 2
    cache.run('net', _double, (x, y), 'fp32')                             # evicted before: captured anew
    assert cache.captures == 4
    cache.clear()
    assert len(cache) == 0


def test_a_failed_capture_falls_back_to_eager_runs() -> None:
    attempts = []

    def failing(function: Any, inputs: Sequence[torch.Tensor]) -> CapturedGraph:
        attempts.append(1)
        raise RuntimeError('operation not permitted when stream is capturing')
    cache = _ActiveOnCpu(True, capture=failing)
    x, y = torch.arange(3.0), torch.ones(3)
    for _ in range(2):
        torch.testing.assert_close(cache.run('net', _double, (x, y), 'fp32')['sum'], 2 * x + y)
    assert len(attempts) == 1 and cache.captures == 0 and len(cache) == 0   # tried once, then eager
    cache.clear()                                                             # e.g. new weights: try again
    cache.run('net', _double, (x, y), 'fp32')
    assert len(attempts) == 2


def test_graph_cache_runs_eagerly_on_the_cpu_or_when_disabled() -> None:
    def refuse(*_: Any) -> CapturedGraph:
        raise AssertionError('no capture expected')
    x, y = torch.arange(3.0), torch.ones(3)
    for cache in (GraphCache(True, capture=refuse), GraphCache(False, capture=refuse)):
        assert not cache.active_for((x, y))
        torch.testing.assert_close(cache.run('net', _double, (x, y), 'fp32')['sum'], 2 * x + y)
        assert cache.captures == 0 and len(cache) == 0
    with pytest.raises(ValueError):
        GraphCache(True, max_entries=0)


# ---------------------------------------------------------------------------------------------- pipeline (CPU)
@pytest.fixture(scope='module')
def eager_and_fast() -> tuple[Reconstructor, Reconstructor]:
    eager = Reconstructor.from_config(LsmConfig.tiny(), **TINY_PIPELINE)
    fast = Reconstructor.from_config(LsmConfig.tiny(), **TINY_PIPELINE, cuda_graphs=True, cuda_streams=True)
    return eager, fast


def test_cuda_options_are_no_ops_on_the_cpu(eager_and_fast: tuple[Reconstructor, Reconstructor]) -> None:
    eager, fast = eager_and_fast
    assert not fast._graphs.active_for((torch.zeros(1),)) and fast._semantic_stream is None
    left, right = _pair()
    a, b = eager.reconstruct(left, right), fast.reconstruct(left, right)
    for name in ('pts3d_1', 'pts3d_2', 'conf_1', 'conf_2', 'depth_1', 'depth_2', 'K_1', 'K_2', 'T_1_2'):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for f in fields(GaussianCloud):
        np.testing.assert_array_equal(getattr(a.gaussians, f.name), getattr(b.gaussians, f.name), err_msg=f.name)
    assert fast._graphs.captures == 0


def test_products_are_host_arrays_and_the_device_tensors_are_kept(
        eager_and_fast: tuple[Reconstructor, Reconstructor]) -> None:
    rec, _ = eager_and_fast
    result = rec.reconstruct(*_pair(5))
    for name in ('pts3d_1', 'conf_1', 'depth_2'):
        assert isinstance(getattr(result, name), np.ndarray) and getattr(result, name).dtype == np.float32
    assert all(isinstance(v, np.ndarray) for v in result.network_outputs.values())
    cached = rec._gaussian_tensors(result.gaussians)
    assert cached is rec._device_cache[id(result.gaussians)][1]        # kept by reconstruct, not uploaded again
    for f in fields(GaussianCloud):                                        # the CPU shares, no copy
        assert cached[f.name].numpy().ctypes.data == getattr(result.gaussians, f.name).ctypes.data
    assert not np.shares_memory(result.conf_1, result.network_outputs['conf_1'])   # products are their own
    answer = rec.query(result, DEFAULT_LABELS)
    assert answer.logits.shape == (2, len(DEFAULT_LABELS), *result.conf_1.shape)
    assert rec._gaussian_tensors(result.gaussians) is cached
    others = [rec.reconstruct(*_pair(seed)) for seed in (6, 7)]          # the cache keeps the last two clouds
    assert id(result.gaussians) not in rec._device_cache
    assert [entry[0]() for entry in rec._device_cache.values()] == [o.gaussians for o in others]
    copy = replace(result.gaussians)                                       # not the cached object: uploaded
    np.testing.assert_array_equal(rec._gaussian_tensors(copy)['features'].numpy(), result.gaussians.features)
    assert rec.offload() is False and rec._device_cache                    # nothing to free on the CPU


def test_precision_tables_per_device() -> None:
    assert network_precisions('bf16', 'cpu') == NETWORK_PRECISIONS['bf16'] == {'dust3r': 'fp32', 'lseg': 'bf16'}
    assert network_precisions('fp32', 'cuda') == CUDA_NETWORK_PRECISIONS['fp32'] == {'dust3r': 'fp32',
                                                                                      'lseg': 'fp32'}
    assert set(CUDA_NETWORK_PRECISIONS) == set(NETWORK_PRECISIONS)
    with pytest.raises(ValueError, match='unknown precision'):
        network_precisions('int8', 'cpu')


def test_reduced_weight_storage_is_exact_and_reversible(tiny_model: Any, tiny_pair: Any) -> None:
    lseg = tiny_model.lseg
    before = {k: v.clone() for k, v in lseg.state_dict().items()}
    reference = tiny_model.semantics(*tiny_pair, precision='bf16')
    masters: dict[str, torch.Tensor] = {}
    store_weights(lseg, torch.bfloat16, masters, prefix='lseg')
    try:
        dtypes = {name: p.dtype for name, p in lseg.named_parameters()}
        assert masters and all(dtypes[key.split('.', 1)[1]] == torch.bfloat16 for key in masters)
        assert any(d == torch.float32 for d in dtypes.values())            # norms and embeddings stay float32
        stored = tiny_model.semantics(*tiny_pair, precision='bf16')         # autocast computes the same
        for key, value in reference.items():
            torch.testing.assert_close(stored[key], value, rtol=0, atol=0, msg=key)
        store_weights(lseg, torch.float16, masters, prefix='lseg')         # bf16 -> fp16 goes through float32
        for key, master in masters.items():
            assert torch.equal(lseg.get_parameter(key.split('.', 1)[1]).float(), master.half().float())
    finally:
        store_weights(lseg, None, masters, prefix='lseg')
    assert not masters
    for key, value in lseg.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key


def test_set_precision_keeps_float32_weights_on_the_cpu() -> None:
    rec = Reconstructor.from_config(LsmConfig.tiny(), **TINY_PIPELINE)
    rec.set_precision('bf16')
    assert rec.precisions == {'dust3r': 'fp32', 'lseg': 'bf16'} and rec.config.precision == 'bf16'
    assert all(p.dtype == torch.float32 for p in rec.network.parameters()) and not rec._fp32_weights
    assert not any(p.requires_grad for p in rec.network.parameters())       # inference only
    with pytest.raises(ValueError, match='fp16'):
        rec.set_precision('fp16')                                          # needs CUDA
    rec.set_precision('fp32')
    assert rec.precisions == {'dust3r': 'fp32', 'lseg': 'fp32'}


# ---------------------------------------------------------------------------------------------- CUDA
def _cuda_reconstructor(**options: Any) -> Reconstructor:
    return Reconstructor.from_config(LsmConfig.tiny(), **dict(TINY_PIPELINE, device='cuda'), **options)


@pytest.fixture(scope='module')
def cuda_eager() -> Reconstructor:
    """The eager CUDA reconstructor (tests that count captures make their own fast one: test order is free)."""
    return _cuda_reconstructor()


@pytest.mark.cuda
@cuda_only
def test_cuda_graphs_and_streams_give_the_eager_results(cuda_eager: Reconstructor) -> None:
    eager = cuda_eager
    fast = _cuda_reconstructor(cuda_graphs=True, cuda_streams=True)
    for seed in (3, 4, 3):                                  # capture, replay with other inputs, replay again
        left, right = _pair(seed)
        a, b = eager.reconstruct(left, right), fast.reconstruct(left, right)
        for name in ('pts3d_1', 'pts3d_2', 'conf_1', 'conf_2'):
            np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-5, atol=1e-5, err_msg=name)
        for f in fields(GaussianCloud):
            np.testing.assert_allclose(getattr(b.gaussians, f.name), getattr(a.gaussians, f.name), rtol=1e-4,
                                       atol=1e-4, err_msg=f.name)
    assert fast._graphs.captures == 2 and len(fast._graphs) == 2           # DUSt3R and LSeg, once each
    fast.config = replace(fast.config, resolution=256)                     # another input shape: captured again
    fast.reconstruct(*_pair(3))
    assert fast._graphs.captures == 4 and len(fast._graphs) == 4


@pytest.mark.cuda
@cuda_only
def test_bf16_stores_lseg_weights_reduced_and_fp32_restores_them() -> None:
    rec = _cuda_reconstructor()
    before = {k: v.clone() for k, v in rec.network.lseg.state_dict().items()}
    rec.set_precision('bf16')
    assert any(p.dtype == torch.bfloat16 for p in rec.network.lseg.parameters())
    assert all(p.dtype == torch.float32 for p in rec.network.dust3r.parameters())   # DUSt3R stays fp32
    rec.reconstruct(*_pair())
    rec.set_precision('fp32')
    for key, value in rec.network.lseg.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.cuda
@cuda_only
def test_offload_drops_the_device_tensors_and_graphs() -> None:
    fast = _cuda_reconstructor(cuda_graphs=True, cuda_streams=True)
    result = fast.reconstruct(*_pair())
    assert fast._device_cache and len(fast._graphs)
    assert fast._gaussian_tensors(result.gaussians)['features'].is_cuda
    try:
        assert fast.offload() is True
        assert not fast._device_cache and len(fast._graphs) == 0
    finally:
        fast.reload()
    assert fast.query(result, ['chair']).logits.shape[1] == 1               # uploads again after reload


@pytest.mark.cuda
@cuda_only
def test_query_of_eight_phrases_uses_the_kept_features(
        cuda_eager: Reconstructor, record_property: Any) -> None:
    eager = cuda_eager
    result = eager.reconstruct(*_pair())
    kept = eager._device_cache[id(result.gaussians)][1]['features']
    eager.query(result, DEFAULT_LABELS)                                    # text features cached
    assert eager._gaussian_tensors(result.gaussians)['features'].data_ptr() == kept.data_ptr()   # no upload
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        eager.query(result, DEFAULT_LABELS)
        times.append(time.perf_counter() - start)
    record_property('query_8_phrases_ms_tiny', 1e3 * float(np.median(times)))
    assert eager._device_cache[id(result.gaussians)][1]['features'] is kept


# ---------------------------------------------------------------------------------------------- command line
def test_cli_device_and_precision_flags_route_to_the_pipeline(tmp_path: Any, monkeypatch: Any) -> None:
    from lsm_ros import cli
    parser = cli.build_parser()
    args = parser.parse_args(['reconstruct', 'l.png', 'r.png', '--out', str(tmp_path), '--precision', 'bf16',
                              '--device', 'cpu', '--reference-weights'])
    built = {}

    def from_reference(reference_dir: Any, *, config: Any) -> str:
        built['config'] = config
        return 'reconstructor'
    monkeypatch.setattr(Reconstructor, 'from_reference', staticmethod(from_reference))
    monkeypatch.setattr('lsm_ros.reference_weights.find_reference_dir', lambda: tmp_path)
    assert cli.build_reconstructor(args, allow_untrained=False) == 'reconstructor'
    assert (built['config'].precision, built['config'].device) == ('bf16', 'cpu')
    assert parser.parse_args(['render', 'rec', '--out', str(tmp_path)]).precision == 'fp32'   # render: default
    bench = parser.parse_args(['bench', '--precision', 'fp32', 'bf16', '--cuda-graphs', '--cuda-streams'])
    assert (bench.precision, bench.cuda_graphs, bench.cuda_streams) == (['fp32', 'bf16'], True, True)
    args.precision = 'fp16'
    with pytest.raises(SystemExit, match='--precision: .*needs a CUDA device'):
        cli.build_reconstructor(args, allow_untrained=False)
    if not torch.cuda.is_available():
        args.device, args.precision = 'cuda', 'fp32'
        with pytest.raises(SystemExit, match='--device: .*CUDA is not available'):
            cli.build_reconstructor(args, allow_untrained=False)
