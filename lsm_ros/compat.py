"""Import-time compatibility for the CPU torch stack.

torchvision wheels on PyPI are CUDA builds. With a CPU-only torch, ``import torchvision`` fails while it
registers fake (meta) kernels for its compiled operators (``operator torchvision::nms does not exist``).
LSM needs none of those operators (nms, roi_align, image decoding), only ``torchvision.transforms``, which
timm and open_clip import. :func:`ensure_torchvision_importable` imports torchvision with
``torch.library.register_fake`` made a no-op for the duration of that import only. On a machine where
torchvision imports normally nothing is changed.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import sys

_log = logging.getLogger(__name__)


@contextlib.contextmanager
def _register_fake_disabled():
    import torch.library

    original = torch.library.register_fake

    def _no_op_register_fake(*args, **kwargs):
        if len(args) >= 2 or 'func' in kwargs:  # direct form: register_fake(op, func)
            return None
        return lambda func: func  # decorator form

    torch.library.register_fake = _no_op_register_fake
    try:
        yield
    finally:
        torch.library.register_fake = original


def ensure_torchvision_importable() -> bool:
    """Import torchvision (True) or report that it is absent (False). Never raises for the CPU/CUDA mismatch."""
    if 'torchvision' in sys.modules:
        return True
    try:
        importlib.import_module('torchvision')
        return True
    except ModuleNotFoundError:
        return False
    except RuntimeError as exc:
        if 'does not exist' not in str(exc):
            raise
        for name in [m for m in sys.modules if m == 'torchvision' or m.startswith('torchvision.')]:
            del sys.modules[name]
        _log.debug('torchvision is a CUDA build on a CPU torch (%s); importing without its fake kernels', exc)
        with _register_fake_disabled():
            importlib.import_module('torchvision')
        return True


ensure_torchvision_importable()
