"""Whole-sequence layers: fused_s2s.GRU / fused_s2s.LSTM vs nn.GRU / nn.LSTM (cuDNN on CUDA).

- the fastrnns default: T=100, B=64, I=H=512, float32 (also bidirectional);
- the long-sequence config: B=16, T=1024, I=H=768, bfloat16;
- a small-H sweep: H in {64, 128, 256}, B in {1, 8, 64}, T=100, I=H, float32.
One layer, fwd and fwd+bwd (gradients of the input and of every parameter).

On CUDA `ours:cpp` and `ours:triton` run their persistent whole-sequence kernels where those fit
(Triton: H <= 64), else the per-step kernels; `ours:<backend>(per-step)` forces the per-step
kernels, for the comparison.
"""
from __future__ import annotations

from typing import List, NamedTuple

import torch
from torch import nn

import fused_s2s

from fused_s2s.backends import persistent_autograd

from .harness import Case, Context, Impl, elt_size, ours, randn, traffic


class Config(NamedTuple):
    name: str
    T: int
    B: int
    H: int
    dtype: torch.dtype
    bidirectional: bool = False


CONFIGS = [
    Config("fastrnns", 100, 64, 512, torch.float32),
    Config("fastrnns-bi", 100, 64, 512, torch.float32, True),
    Config("long", 1024, 16, 768, torch.bfloat16),
] + [Config("small-H", 100, b, h, torch.float32) for h in (64, 128, 256) for b in (1, 8, 64)]

# the dispatch run on CPU (bench/dispatch.py): the float32 rows (the bfloat16 long-sequence
# config takes minutes per call there, and the kernels' table has no bfloat16 entries yet)
DISPATCH_CONFIGS = [c for c in CONFIGS if c.dtype == torch.float32]

QUICK_CONFIGS = [Config("quick", 8, 4, 32, torch.float32), Config("quick-bi", 8, 4, 32, torch.float32, True)]

OPS = {"GRU": (3, nn.GRU, fused_s2s.GRU), "LSTM": (4, nn.LSTM, fused_s2s.LSTM)}


def _inputs(cfg: Config, torch_cls):
    def make(device, dtype, rg):
        module = torch_cls(cfg.H, cfg.H, bidirectional=cfg.bidirectional, device=device, dtype=dtype)
        module.requires_grad_(rg)
        return dict(x=randn(cfg.T, cfg.B, cfg.H, device=device, dtype=dtype, requires_grad=rg), module=module)
    return make


def _ours(cfg: Config, our_cls):
    def bind_backend(backend: str):
        def bind(d):
            ref = d["module"]
            m = our_cls(cfg.H, cfg.H, bidirectional=cfg.bidirectional, backend=backend,
                        device=d["x"].device, dtype=d["x"].dtype)
            m.load_state_dict(ref.state_dict())
            m.requires_grad_(d["x"].requires_grad)
            return (lambda: (m(d["x"])[0],)), [d["x"], *m.parameters()]
        return bind
    return bind_backend


def _per_step(bind):
    """`bind` with the persistent route switched off while the module runs forward (the route
    is chosen there; backward follows the forward's choice)."""
    def bound(d):
        forward, wrt = bind(d)

        def run():
            previous, persistent_autograd.enabled = persistent_autograd.enabled, False
            try:
                return forward()
            finally:
                persistent_autograd.enabled = previous
        return run, wrt
    return bound


def _torch(d):
    module = d["module"]
    return (lambda: (module(d["x"])[0],)), [d["x"], *module.parameters()]


def cases(ctx: Context, configs=None) -> List[Case]:
    out = []
    for op, (gates, torch_cls, our_cls) in OPS.items():
        for cfg in configs or (QUICK_CONFIGS if ctx.quick else CONFIGS):
            for dtype in ctx.dtypes_for(cfg.dtype):
                dirs = 2 if cfg.bidirectional else 1
                states = 2 if op == "LSTM" else 1
                n_in = cfg.T * cfg.B * cfg.H + dirs * gates * cfg.H * (2 * cfg.H + 2)
                n_out = cfg.T * cfg.B * cfg.H * dirs + dirs * cfg.B * cfg.H * states
                flops = dirs * 2 * cfg.T * cfg.B * gates * cfg.H * 2 * cfg.H
                for passes in ("fwd", "fwd+bwd"):
                    impls: List[Impl] = ours(ctx, (op.lower() + "_cell",), dtype, _ours(cfg, our_cls))
                    if ctx.device.type == "cuda":
                        impls += [Impl(f"{i.name}(per-step)", _per_step(i.bind), ours=True, skip=i.skip)
                                  for i in impls if i.name in ("ours:cpp", "ours:triton")]
                    impls.append(Impl(f"nn.{op}", _torch))
                    out.append(Case(
                        family="layers", op=op,
                        config=dict(cfg=cfg.name, T=cfg.T, B=cfg.B, H=cfg.H, dir="bi" if cfg.bidirectional else "uni"),
                        dtype=dtype, passes=passes, make_inputs=_inputs(cfg, torch_cls), impls=impls,
                        flops=flops * (1 if passes == "fwd" else 3),
                        bytes=traffic(n_in, n_out, passes) * elt_size(dtype)))
    return out
