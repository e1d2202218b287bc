"""A guard that fails when code reads device values on the host (a host sync on a GPU) or branches on them.

Inside :func:`no_host_reads`, any of these raises :class:`HostRead`: reading a tensor's value into Python
(``item``, ``tolist``, ``numpy``, ``__array__``, printing, ``bool`` / ``int`` / ``float`` / ``index`` of a tensor), ops
whose output shape depends on tensor values (``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing and
assignment), waiting on the device (``torch.cuda.synchronize``, ``Event.synchronize``, ``Stream.synchronize``) and
fresh pinned host buffers (``pin_memory``).  On CPU, where the tests run, a ``.cpu()`` / ``.to(device)`` cannot be
told apart from a no-op, so copies themselves are not flagged; their use as values is.  On a CPU every such read is cheap;
on a GPU each one stalls the host until the device catches up, which is what a decode step must never do.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__, torch.Tensor.__int__,
    torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.pin_memory,
    torch.Tensor.masked_select, torch.masked_select, torch.Tensor.unique, torch.unique, torch.argwhere,
    torch.Tensor.argwhere, torch.Tensor.__array__, torch.Tensor.__format__, torch.Tensor.__repr__,
}


class HostRead(AssertionError):
    pass


class _Guard(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS:
            raise HostRead(f"host read of a device value: {getattr(func, '__name__', func)}")
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _has_bool_mask(
                args[1] if len(args) > 1 else None):
            raise HostRead("boolean-mask indexing (its output shape depends on device values)")
        return func(*args, **kwargs)


def _has_bool_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _refuse(*_args, **_kwargs):
    raise HostRead("waits for the device")


@contextlib.contextmanager
def no_host_reads():
    """Raise :class:`HostRead` on any host read of tensor values inside the block (see the module docstring)."""
    saved = (torch.cuda.synchronize, torch.cuda.Event.synchronize, torch.cuda.Stream.synchronize)
    torch.cuda.synchronize = _refuse
    torch.cuda.Event.synchronize = _refuse
    torch.cuda.Stream.synchronize = _refuse
    try:
        with _Guard():
            yield
    finally:
        torch.cuda.synchronize, torch.cuda.Event.synchronize, torch.cuda.Stream.synchronize = saved
