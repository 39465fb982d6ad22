"""Attention: additive (Bahdanau) and dot (Luong) scores, with a padding mask.

Configs (B, Tq, Tk, A), values Dv = A, float32, fwd and fwd+bwd:
- decoder step: Tq=1, B=64, Tk in {50, 200, 1000, 4000}, A=512;
- PyTorch's own attention benchmark: (1280, 1, 66, 1024) and (128, 10, 128, 1024);
- GNMT training: (256, 50, 50, 1024);
- all queries at once: B=32, Tq=Tk in {128, 512, 1024}, A=256.
Tq = 1 rows pass 2-D queries (B, A), as a decoder does, and are per-step rows (CUDA graphs).

Baselines: the naive code OpenNMT-py (GlobalAttention), fairseq and the PyTorch seq2seq
tutorial write (broadcast add, tanh, a Linear to one unit, masked_fill(-inf), softmax, bmm),
that code under torch.compile, and for dot scores F.scaled_dot_product_attention (which
returns no weights). On CUDA the additive forward rows also time the cpp kernel with the
hardware approximate tanh. Naive additive attention over all queries materialises the
(B, Tq, Tk, A) tanh tensor: the peak-memory column shows it, OOM is reported as such.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple

import torch
import torch.nn.functional as TF

import fused_s2s.functional as F

from .harness import Case, Context, Impl, compiled, elt_size, ours, randn, traffic


class Config(NamedTuple):
    name: str
    B: int
    Tq: int
    Tk: int
    A: int


CONFIGS = ([Config("decoder-step", 64, 1, tk, 512) for tk in (50, 200, 1000, 4000)]
           + [Config("torch-bench", 1280, 1, 66, 1024), Config("torch-bench", 128, 10, 128, 1024),
              Config("gnmt", 256, 50, 50, 1024)]
           + [Config("all-queries", 32, t, t, 256) for t in (128, 512, 1024)])
QUICK_CONFIGS = [Config("decoder-step", 4, 1, 16, 32), Config("all-queries", 2, 8, 8, 16)]
# the dispatch run on CPU (bench/dispatch.py): shapes whose naive baseline fits a small machine
DISPATCH_CONFIGS = [Config("decoder-step", 64, 1, 50, 512), Config("decoder-step", 64, 1, 200, 512),
                    Config("all-queries", 32, 50, 50, 256)]
DTYPE = torch.float32


def naive_additive(q, k, v, values, mask):
    """Additive attention as OpenNMT-py / the PyTorch tutorial compute it."""
    single = q.dim() == 2
    if single:
        q = q.unsqueeze(1)
    scores = TF.linear(torch.tanh(q.unsqueeze(2) + k.unsqueeze(1)), v.unsqueeze(0)).squeeze(-1)  # (B,Tq,Tk)
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    context = torch.bmm(weights, values)
    return (context.squeeze(1), weights.squeeze(1)) if single else (context, weights)


def naive_dot(q, k, values, mask):
    """Luong "dot" attention as OpenNMT-py computes it."""
    single = q.dim() == 2
    if single:
        q = q.unsqueeze(1)
    scores = torch.bmm(q, k.transpose(1, 2)).masked_fill(~mask.unsqueeze(1), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    context = torch.bmm(weights, values)
    return (context.squeeze(1), weights.squeeze(1)) if single else (context, weights)


def sdpa_dot(q, k, values, mask):
    """F.scaled_dot_product_attention with scale 1 (Luong "dot"); context only. Inputs go in as
    (B, 1 head, T, D): the fused SDPA kernels take 4-D tensors only (3-D falls back to the math path)."""
    single = q.dim() == 2
    q4 = (q.unsqueeze(1) if single else q).unsqueeze(1)
    context = TF.scaled_dot_product_attention(q4, k.unsqueeze(1), values.unsqueeze(1),
                                              attn_mask=mask[:, None, None, :], scale=1.0).squeeze(1)
    return context.squeeze(1) if single else context


def _inputs(cfg: Config, additive: bool):
    def make(device, dtype, rg):
        kw = dict(device=device, dtype=dtype, requires_grad=rg)
        q_shape = (cfg.B, cfg.A) if cfg.Tq == 1 else (cfg.B, cfg.Tq, cfg.A)
        # unit-variance scores for dot attention, as a trained model's are (not saturated)
        scale = 1.0 if additive else cfg.A ** -0.25
        lengths = torch.randint(math.ceil(cfg.Tk / 2), cfg.Tk + 1, (cfg.B,), device=device)
        lengths[0] = cfg.Tk
        d = dict(q=randn(*q_shape, scale=scale, **kw), k=randn(cfg.B, cfg.Tk, cfg.A, scale=scale, **kw),
                 values=randn(cfg.B, cfg.Tk, cfg.A, **kw),
                 mask=torch.arange(cfg.Tk, device=device) < lengths[:, None])
        if additive:
            d["v"] = randn(cfg.A, scale=cfg.A ** -0.5, **kw)
        return d
    return make


def _args(d, additive: bool):
    return (d["q"], d["k"], d["v"], d["values"]) if additive else (d["q"], d["k"], d["values"])


def _wrt(d, additive: bool):
    return list(_args(d, additive))


def _first(out):
    """The loss depends on the context (the weights feed plots and beam penalties)."""
    return (out[0],) if isinstance(out, tuple) else (out,)


def _bind_fn(fn, additive: bool):
    def bind(d):
        return (lambda: _first(fn(*_args(d, additive), d["mask"]))), _wrt(d, additive)
    return bind


def _ours(op: str, additive: bool):
    fn = getattr(F, op)

    def bind_backend(backend: str):
        def bind(d):
            return (lambda: _first(fn(*_args(d, additive), d["mask"], backend=backend))), _wrt(d, additive)
        return bind
    return bind_backend


def _cpp_approx_tanh(d):
    """The cpp forward kernel with the hardware tanh.approx.f32 (the extension's explicit
    `approx_tanh` flag; the ops use the accurate tanhf): does the approximation pay?"""
    from fused_s2s.backends import registry
    kernels = registry.load("cpp")
    q = d["q"] if d["q"].dim() == 3 else d["q"].unsqueeze(1)

    def run():
        context, _, _ = kernels.additive_attention_fwd(q.contiguous(), d["k"], d["v"], d["values"], d["mask"], None,
                                                       None, approx_tanh=True)
        return (context.view(d["q"].shape[:-1] + context.shape[-1:]),)
    return run, []


def cases(ctx: Context, configs=None) -> List[Case]:
    out = []
    for op in ("additive_attention", "dot_attention"):
        additive = op == "additive_attention"
        naive = naive_additive if additive else naive_dot
        for cfg in configs or (QUICK_CONFIGS if ctx.quick else CONFIGS):
            for dtype in ctx.dtypes_for(DTYPE):
                B, Tq, Tk, A = cfg.B, cfg.Tq, cfg.Tk, cfg.A
                n_in = B * Tq * A + 2 * B * Tk * A + (A if additive else 0) + B * Tk / elt_size(dtype)
                n_out = B * Tq * A + B * Tq * Tk  # context and weights
                pairs = B * Tq * Tk
                flops = pairs * (3 * A + 2 * A) if additive else pairs * 4 * A
                for passes in ("fwd", "fwd+bwd"):
                    impls: List[Impl] = ours(ctx, (op,), dtype, _ours(op, additive))
                    if additive and passes == "fwd" and ctx.device.type == "cuda":
                        impls += [Impl("ours:cpp(approx tanh)", _cpp_approx_tanh, ours=True, skip=i.skip)
                                  for i in impls if i.name == "ours:cpp"]
                    impls.append(Impl("naive", _bind_fn(naive, additive)))
                    impls.append(compiled(ctx, "compile(naive)", naive, lambda fn: _bind_fn(fn, additive)))
                    if not additive:
                        impls.append(Impl("sdpa", _bind_fn(sdpa_dot, additive)))
                    out.append(Case(
                        family="attention", op=op, config=dict(cfg=cfg.name, B=B, Tq=Tq, Tk=Tk, A=A),
                        dtype=dtype, passes=passes, make_inputs=_inputs(cfg, additive), impls=impls,
                        step=Tq == 1, flops=flops * (1 if passes == "fwd" else 3),
                        bytes=traffic(n_in, n_out, passes) * elt_size(dtype),
                        transcendentals=pairs * ((A if additive else 0) + 1) * (1 if passes == "fwd" else 2)))
    return out
