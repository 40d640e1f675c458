"""Counting the aten ops that synchronise with an accelerator's host, and integer matrix products (which CUDA does
not implement), in a TorchDispatchMode: the one counter of the tests (PTv3, kNN, cameras, stereo rig)."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that wait for the device on an accelerator (their result decides a shape or a Python value)
_SYNCING_OPS = {'_local_scalar_dense', 'nonzero', '_unique2', 'unique_dim', 'unique_consecutive', 'masked_select',
                'is_nonzero', 'equal', 'allclose', 'bincount', 'histc'}
_MATMUL_OPS = {'mm', 'addmm', 'mv', 'addmv', 'bmm', 'baddbmm', 'dot', 'vdot', 'matmul', 'linear'}


def _copies_to_host(source: torch.Tensor, kwargs: dict) -> bool:
    """A ``_to_copy`` that reads a tensor on the host: from an accelerator to the CPU, or (on the CPU, where such
    a copy dispatches only when asked for) an explicit same-dtype copy to the CPU, the pattern of the code's host
    reads (``.to(device='cpu', copy=True)``). A dtype conversion that stays on the CPU is no host read."""
    target = kwargs.get('device')
    if target is None or torch.device(target).type != 'cpu':
        return False
    return source.device.type != 'cpu' or kwargs.get('dtype') in (None, source.dtype)


class HostSyncCounter(TorchDispatchMode):
    """Counts, by op name, the aten ops that synchronise with an accelerator's host (also on the CPU, where they
    cost nothing): the ops of ``_SYNCING_OPS``, copies to the host (:func:`_copies_to_host`, e.g.
    ``lsm_ros.model.sparse_conv.host_ints``), boolean-mask indexing and ``repeat_interleave`` without ``output_size``; and the
    matrix products of integer tensors (``integer_matmuls``), which CUDA does not implement."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: dict[str, int] = {}
        self.integer_matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        syncing = (name in _SYNCING_OPS
                   or (name == '_to_copy' and _copies_to_host(args[0], kwargs))
                   or (name == 'index' and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                               for i in (args[1] if len(args) > 1 else ()) if i is not None))
                   or (name == 'repeat_interleave' and kwargs.get('output_size') is None and len(args) < 4))
        if syncing:
            self.syncs[name] = self.syncs.get(name, 0) + 1
        if name in _MATMUL_OPS and any(not (t.is_floating_point() or t.is_complex()) for t in tensors):
            self.integer_matmuls += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.syncs.values())
