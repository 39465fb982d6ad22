"""Small helpers on tensors that the public face and the plumbing both use: casting under
torch.autocast, and whether a tensor's values may be read on the host."""
from __future__ import annotations

import functools
from typing import Tuple

import torch
from torch import Tensor


def autocast_inputs(*tensors):
    """Under torch.autocast, the floating tensors cast to the autocast dtype (the casts are
    differentiable, so float32 parameters still get float32 gradients); else unchanged."""
    first = tensors[0]
    if not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors)


def no_autocast(method):
    """Run an autograd Function's forward/backward with autocast off: the caller has cast the
    inputs to one dtype, and the primitives choose their own accumulation precision. The device
    type is the first tensor argument's (a backward's first gradient may be None)."""
    @functools.wraps(method)
    def wrapper(ctx, *args):
        first = args[0] if isinstance(args[0], Tensor) else next((a for a in args if isinstance(a, Tensor)), None)
        device = "cuda" if first is None else first.device.type
        if not torch.is_autocast_enabled(device):  # the common case, without a context
            return method(ctx, *args)
        with torch.autocast(device, enabled=False):
            return method(ctx, *args)
    return wrapper


def can_read_values(t: Tensor) -> bool:
    """Whether t's values may be read on the host for a check: not while torch.compile traces
    nor while a CUDA graph captures (there the checks are skipped; eager runs make them)."""
    return not torch.compiler.is_compiling() and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def value_range(t: Tensor) -> Tuple[int, int]:
    """(min, max) of a non-empty integer tensor, with one host sync for both."""
    lo, hi = torch.stack(torch.aminmax(t)).tolist()
    return lo, hi
