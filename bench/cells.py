"""Cell step: one GRU/LSTM time step, as a decoder runs it.

B in {1, 16, 64, 256}, H in {256, 512, 1024} (input size I = H), float32, fwd and fwd+bwd:
ours (each backend) vs nn.GRUCell / nn.LSTMCell and vs the reference code under torch.compile.
Per-step rows: also timed inside CUDA graphs with --graphs.
"""
from __future__ import annotations

import math
from typing import List

import torch
from torch import nn

import fused_s2s.functional as F
from fused_s2s.backends import reference

from .harness import Case, Context, Impl, compiled, elt_size, ours, randn, traffic

BATCHES = (1, 16, 64, 256)
HIDDEN = (256, 512, 1024)
QUICK_BATCHES = (1, 16)
QUICK_HIDDEN = (32,)
DTYPE = torch.float32
OPS = {"gru_cell": (3, nn.GRUCell), "lstm_cell": (4, nn.LSTMCell)}


def _inputs(batch: int, hidden: int, gates: int, lstm: bool):
    def make(device, dtype, rg):
        kw = dict(device=device, dtype=dtype, requires_grad=rg)
        w = 1 / math.sqrt(hidden)  # nn.GRUCell's init range: gates neither saturated nor linear
        d = dict(x=randn(batch, hidden, **kw), h=randn(batch, hidden, **kw),
                 w_ih=randn(gates * hidden, hidden, scale=w, **kw),
                 w_hh=randn(gates * hidden, hidden, scale=w, **kw),
                 b_ih=randn(gates * hidden, scale=w, **kw), b_hh=randn(gates * hidden, scale=w, **kw))
        if lstm:
            d["c"] = randn(batch, hidden, **kw)
        return d
    return make


def _state(d):
    return (d["h"], d["c"]) if "c" in d else d["h"]


def _weights(d):
    return d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"]


def _all(d):
    return [d[k] for k in ("x", "h", "c", "w_ih", "w_hh", "b_ih", "b_hh") if k in d]


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def _ours(op: str):
    fn = getattr(F, op)

    def bind_backend(backend: str):
        def bind(d):
            return (lambda: _outputs(fn(d["x"], _state(d), *_weights(d), backend=backend))), _all(d)
        return bind
    return bind_backend


def _torch_module(module_cls):
    def bind(d):
        hidden, inp = d["h"].shape[1], d["x"].shape[1]
        cell = module_cls(inp, hidden, device=d["x"].device, dtype=d["x"].dtype)
        for name, key in (("weight_ih", "w_ih"), ("weight_hh", "w_hh"), ("bias_ih", "b_ih"), ("bias_hh", "b_hh")):
            setattr(cell, name, nn.Parameter(d[key], requires_grad=d[key].requires_grad))  # shares storage
        inputs = [d[k] for k in ("x", "h", "c") if k in d]
        return (lambda: _outputs(cell(d["x"], _state(d)))), inputs + list(cell.parameters())
    return bind


def _reference(fn):
    def bind(d):
        return (lambda: _outputs(fn(d["x"], _state(d), *_weights(d)))), _all(d)
    return bind


DISPATCH_CONFIGS = None  # the dispatch run measures the benchmark's own grid


def cases(ctx: Context, configs=None) -> List[Case]:
    """configs: (batches, hidden sizes) replacing the default grid."""
    out = []
    batches, hiddens = configs or ((QUICK_BATCHES, QUICK_HIDDEN) if ctx.quick else (BATCHES, HIDDEN))
    for op, (gates, module_cls) in OPS.items():
        lstm = op == "lstm_cell"
        for dtype in ctx.dtypes_for(DTYPE):
            for hidden in hiddens:
                for batch in batches:
                    for passes in ("fwd", "fwd+bwd"):
                        states = 2 if lstm else 1
                        n_in = batch * hidden * (1 + states) + gates * hidden * (2 * hidden + 2)
                        n_out = batch * hidden * states
                        flops = 2 * batch * gates * hidden * 2 * hidden
                        impls: List[Impl] = ours(ctx, (op,), dtype, _ours(op))
                        impls.append(Impl(f"nn.{module_cls.__name__}", _torch_module(module_cls)))
                        impls.append(compiled(ctx, f"compile(reference.{op})", getattr(reference, op), _reference))
                        out.append(Case(
                            family="cells", op=op, config=dict(B=batch, H=hidden), dtype=dtype, passes=passes,
                            make_inputs=_inputs(batch, hidden, gates, lstm), impls=impls, step=True,
                            flops=flops * (1 if passes == "fwd" else 3),
                            bytes=traffic(n_in, n_out, passes) * elt_size(dtype),
                            transcendentals=batch * hidden * (5 if lstm else 3) * (1 if passes == "fwd" else 2)))
    return out
