"""`patch(model)`: give the nn.GRU/LSTM/GRUCell/LSTMCell modules of an existing model fused_s2s's
forward, in place, without making them anything other than what they were.

Each module found keeps its identity and becomes an instance of a subclass of its own nn class
(`PatchedGRU(fused_s2s.GRU, nn.GRU)`, ...): its forward is fused_s2s.GRU's (one implementation
for both), everything else is nn's. So `isinstance(m, nn.GRU)` still holds, and so do its
attributes (`hidden_size`, `proj_size`, `_flat_weights`, `all_weights`, `flatten_parameters()`),
state_dict keys, hooks, parameter objects, `.to()`/`.half()` handling, deepcopy and pickling.

fused_s2s.GRU/LSTM themselves stay outside nn.RNNBase: torch.compile graph-breaks on every
instance of nn.RNN/GRU/LSTM (patched ones included) unless torch._dynamo.config.allow_rnn is set.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from .backends import layers, registry
from .modules import GRU, LSTM, GRUCell, LSTMCell


class _Patched:
    """What the patched classes share: nn's own __init__ (plus `backend=`), and nn's flat-weight
    bookkeeping rather than the standalone modules' (the MRO would pick ours first)."""

    def __init__(self, *args, backend: Optional[str] = None, **kwargs) -> None:
        self._nn_class.__init__(self, *args, **kwargs)
        self.backend = None if backend is None else registry.check_name(backend)

    def extra_repr(self) -> str:
        s = self._nn_class.extra_repr(self)
        return s + (f", backend={self.backend!r}" if self.backend else "")


class _PatchedLayers(_Patched):
    # on CUDA nn's version packs the weights into one buffer for cuDNN; ours would do nothing
    flatten_parameters = nn.RNNBase.flatten_parameters
    all_weights = nn.RNNBase.all_weights  # also counts weight_hr (proj_size)

    def forward(self, input, hx=None, *, lengths: Optional[Tensor] = None):
        # A padded tensor that auto (or the backend asked for) gives to native runs nn's own
        # forward: the same kernel call, and no Python of ours around it (a decoder calls its
        # RNN once per step, so a few microseconds per call add up); everything else, ours.
        if lengths is None and isinstance(input, Tensor) and input.dim() in (2, 3) and self._native_call(input, hx):
            return self._nn_class.forward(self, input, hx)
        return super().forward(input, hx, lengths=lengths)

    def _native_call(self, input: Tensor, hx) -> bool:
        batched = input.dim() == 3
        steps = input.shape[1 if batched and self.batch_first else 0]
        batch = (input.shape[0 if self.batch_first else 1]) if batched else 1
        first = hx[0] if isinstance(hx, tuple) and hx else hx
        training = torch.is_grad_enabled() and (input.requires_grad or self.weight_hh_l0.requires_grad
                                                or (isinstance(first, Tensor) and first.requires_grad))
        return layers.backend_choice(self._nn_class.__name__, self.backend, input, batch, steps, self.hidden_size,
                                     False, None, training) == "native"


class PatchedGRU(_PatchedLayers, GRU, nn.GRU):
    """An nn.GRU whose forward is fused_s2s.GRU's; what patch() makes of an nn.GRU."""
    _nn_class = nn.GRU


class PatchedLSTM(_PatchedLayers, LSTM, nn.LSTM):
    """An nn.LSTM whose forward is fused_s2s.LSTM's; what patch() makes of an nn.LSTM."""
    _nn_class = nn.LSTM


class PatchedGRUCell(_Patched, GRUCell, nn.GRUCell):
    """An nn.GRUCell whose forward is fused_s2s.GRUCell's."""
    _nn_class = nn.GRUCell


class PatchedLSTMCell(_Patched, LSTMCell, nn.LSTMCell):
    """An nn.LSTMCell whose forward is fused_s2s.LSTMCell's."""
    _nn_class = nn.LSTMCell


# exact types only: a subclass may override forward, and patching it would drop that code
_PATCHED = {cls._nn_class: cls for cls in (PatchedGRU, PatchedLSTM, PatchedGRUCell, PatchedLSTMCell)}


def patch(model: nn.Module, backend: Optional[str] = None) -> List[str]:
    """Give every nn.GRU, nn.LSTM, nn.GRUCell and nn.LSTMCell in `model` (`model` itself
    included) fused_s2s's forward, in place; return the qualified names patched ("" for
    `model` itself; a module used at several places is listed under each name).

    Each module stays the same object, an instance of its nn class (PatchedGRU is an nn.GRU,
    ...): its parameters, buffers, hooks and attributes are untouched, so outputs are unchanged,
    an optimizer built before keeps training it, and client code that checks
    isinstance(m, nn.LSTM) or reads m.proj_size still works. `backend` ("auto", "torch", "cpp",
    "triton"; None: the process default) is given to every patched module. Only these exact
    classes are patched (a subclass may have its own forward); nn.LSTM(proj_size > 0) included.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if backend is not None:
        registry.check_name(backend)
    patched: Dict[int, nn.Module] = {}
    names: List[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) not in patched and type(module) not in _PATCHED:
            continue
        if id(module) not in patched:
            module.__class__ = _PATCHED[type(module)]
            module.backend = backend
            patched[id(module)] = module
        names.append(name)
    return names
