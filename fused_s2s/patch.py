"""`patch(model)`: put fused_s2s's recurrent modules into an existing model, in place."""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional

from torch import nn

from . import backends
from .modules import GRU, LSTM, GRUCell, LSTMCell

# exact types only: a subclass may override forward, and swapping it would drop that code
_REPLACEMENTS = {nn.GRU: GRU, nn.LSTM: LSTM, nn.GRUCell: GRUCell, nn.LSTMCell: LSTMCell}


def _fused_twin(module: nn.Module, backend: Optional[str]) -> nn.Module:
    """Our module with `module`'s configuration, holding `module`'s own Parameter objects."""
    cls = _REPLACEMENTS[type(module)]
    if isinstance(module, nn.RNNBase):
        twin = cls(module.input_size, module.hidden_size, module.num_layers, module.bias, module.batch_first,
                   module.dropout, module.bidirectional, device="meta", backend=backend)
    else:
        twin = cls(module.input_size, module.hidden_size, module.bias, device="meta", backend=backend)
    ours = dict(twin.named_parameters())
    theirs = dict(module.named_parameters())
    if ours.keys() != theirs.keys():  # cannot happen for the nn classes we map; guards their evolution
        raise RuntimeError(f"cannot patch {type(module).__name__}: parameters {sorted(theirs)} "
                           f"do not match {cls.__name__}'s {sorted(ours)}")
    for name, param in theirs.items():
        if param.shape != ours[name].shape:
            raise RuntimeError(f"cannot patch {type(module).__name__}: {name} has shape {tuple(param.shape)}, "
                               f"expected {tuple(ours[name].shape)}")
        twin._parameters[name] = param  # the same tensor: optimizers built before still hold it
    twin.train(module.training)
    return twin


def patch(model: nn.Module, backend: Optional[str] = None) -> List[str]:
    """Swap every nn.GRU, nn.LSTM, nn.GRUCell and nn.LSTMCell inside `model` for fused_s2s's
    GRU, LSTM, GRUCell and LSTMCell, in place, and return the qualified names swapped.

    The new modules hold the very same Parameter objects (same storage, device, dtype,
    requires_grad), so outputs are unchanged and an optimizer built before the patch keeps
    training them. A module used at several places becomes one fused module used at the same
    places. `backend` ("auto", "torch", "cpp", "triton"; None: the process default) is given to
    every new module. Only these exact classes are swapped (a subclass may have its own
    forward); an nn.LSTM with proj_size > 0 is left as it is, with a warning. Forward hooks
    registered on a swapped module are not carried over.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if backend is not None:
        backends._check_name(backend)
    if type(model) in _REPLACEMENTS:
        raise ValueError(f"model is itself an {type(model).__name__}: patch swaps modules inside a model; "
                         f"build fused_s2s.{_REPLACEMENTS[type(model)].__name__} and load its state_dict instead")
    twins: Dict[int, nn.Module] = {}
    swapped: List[str] = []
    # list every (parent, child) path first, then swap: the tree must not change while walked
    paths = [(parent, child_name, f"{parent_name}.{child_name}" if parent_name else child_name, child)
             for parent_name, parent in model.named_modules(remove_duplicate=False)
             for child_name, child in parent.named_children()]
    for parent, child_name, name, child in paths:
        if type(child) not in _REPLACEMENTS:
            continue
        if isinstance(child, nn.LSTM) and child.proj_size > 0:
            warnings.warn(f"fused_s2s.patch: leaving {name} as nn.LSTM (proj_size > 0 is not supported)",
                          stacklevel=2)
            continue
        if id(child) not in twins:
            twins[id(child)] = _fused_twin(child, backend)
        setattr(parent, child_name, twins[id(child)])
        swapped.append(name)
    return swapped
