"""The primitives as `torch.library` custom ops, so that torch.compile sees each kernel call as
one opaque node with a known output shape (its fake implementation) instead of graph-breaking.

Each op takes the backend's name first and dispatches to that backend's module. In eager mode
`call()` skips the op layer and calls the backend directly: the dispatcher's overhead per call
is comparable to a small kernel, and the per-step recurrence makes many small calls.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.library import custom_op

from . import registry

Opt = Optional[Tensor]


def exporting_onnx() -> bool:
    """Whether torch.onnx.export(..., dynamo=True) is capturing the graph. ONNX has no
    translation of our custom ops, so there every op runs the `torch` backend's standard ops."""
    return torch.compiler.is_compiling() and torch.onnx.is_in_onnx_export()


def call(op: str, backend: str, *args):
    """Run primitive `op` of `backend`: through the custom op when compiling, directly otherwise."""
    if torch.compiler.is_compiling():
        if not torch.onnx.is_in_onnx_export():
            return getattr(torch.ops.fused_s2s, op)(backend, *args)
        backend = "torch"  # exporting to ONNX: dispatch.kernel_backend chose it already, and it runs inline
    return getattr(registry.load(backend), op)(*args)


def _run(op: str, backend: str, *args):
    return getattr(registry.load(backend), op)(*args)


# ----------------------------------------------------------------------------------- cells

@custom_op("fused_s2s::gru_cell_fwd", mutates_args=())
def gru_cell_fwd(backend: str, gx: Tensor, h: Tensor, w_hh: Tensor, b_hh: Opt) -> Tuple[Tensor, Tensor]:
    return _run("gru_cell_fwd", backend, gx, h, w_hh, b_hh)


@gru_cell_fwd.register_fake
def _(backend, gx, h, w_hh, b_hh):
    return torch.empty_like(h), h.new_empty(h.shape[0], 4 * h.shape[1])


@custom_op("fused_s2s::gru_cell_bwd", mutates_args=())
def gru_cell_bwd(backend: str, grad_h_new: Tensor, h: Tensor, saved: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return _run("gru_cell_bwd", backend, grad_h_new, h, saved)


@gru_cell_bwd.register_fake
def _(backend, grad_h_new, h, saved):
    gates = h.new_empty(h.shape[0], 3 * h.shape[1])
    return gates, torch.empty_like(gates), torch.empty_like(h)


@custom_op("fused_s2s::lstm_cell_fwd", mutates_args=())
def lstm_cell_fwd(backend: str, gx: Tensor, h: Tensor, c: Tensor, w_hh: Tensor,
                  b_hh: Opt) -> Tuple[Tensor, Tensor, Tensor]:
    return _run("lstm_cell_fwd", backend, gx, h, c, w_hh, b_hh)


@lstm_cell_fwd.register_fake
def _(backend, gx, h, c, w_hh, b_hh):  # h_new is (B, H) like c, also when h is projected (B, P)
    return torch.empty_like(c), torch.empty_like(c), c.new_empty(c.shape[0], 4 * c.shape[1])


@custom_op("fused_s2s::lstm_cell_bwd", mutates_args=())
def lstm_cell_bwd(backend: str, grad_h_new: Tensor, grad_c_new: Tensor, c: Tensor, c_new: Tensor,
                  saved: Tensor) -> Tuple[Tensor, Tensor]:
    return _run("lstm_cell_bwd", backend, grad_h_new, grad_c_new, c, c_new, saved)


@lstm_cell_bwd.register_fake
def _(backend, grad_h_new, grad_c_new, c, c_new, saved):
    return c.new_empty(c.shape[0], 4 * c.shape[1]), torch.empty_like(c)


# ------------------------------------------------------------------------------- attention

def _attention_fwd_fake(q: Tensor, k: Tensor, values: Tensor):
    bq, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    return (q.new_empty(bq, tq, values.shape[2]), q.new_empty(bq, tq, tk),
            q.new_empty(bq, tq, dtype=lse_dtype))


@custom_op("fused_s2s::additive_attention_fwd", mutates_args=())
def additive_attention_fwd(backend: str, q: Tensor, k: Tensor, v: Tensor, values: Tensor, mask: Opt,
                           lengths: Opt, kv_batch_idx: Opt) -> Tuple[Tensor, Tensor, Tensor]:
    return _run("additive_attention_fwd", backend, q, k, v, values, mask, lengths, kv_batch_idx)


@additive_attention_fwd.register_fake
def _(backend, q, k, v, values, mask, lengths, kv_batch_idx):
    return _attention_fwd_fake(q, k, values)


@custom_op("fused_s2s::additive_attention_bwd", mutates_args=())
def additive_attention_bwd(backend: str, grad_context: Tensor, grad_weights: Tensor, q: Tensor, k: Tensor,
                           v: Tensor, values: Tensor, mask: Opt, lengths: Opt, kv_batch_idx: Opt,
                           weights: Tensor, lse: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _run("additive_attention_bwd", backend, grad_context, grad_weights, q, k, v, values, mask,
                lengths, kv_batch_idx, weights, lse)


@additive_attention_bwd.register_fake
def _(backend, grad_context, grad_weights, q, k, v, values, mask, lengths, kv_batch_idx, weights, lse):
    bq, tk = q.shape[0], k.shape[1]
    return (torch.empty_like(q), k.new_empty(bq, tk, k.shape[2]), torch.empty_like(v),
            values.new_empty(bq, tk, values.shape[2]))


@custom_op("fused_s2s::dot_attention_fwd", mutates_args=())
def dot_attention_fwd(backend: str, q: Tensor, k: Tensor, values: Tensor, mask: Opt, lengths: Opt,
                      kv_batch_idx: Opt, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    return _run("dot_attention_fwd", backend, q, k, values, mask, lengths, kv_batch_idx, scale)


@dot_attention_fwd.register_fake
def _(backend, q, k, values, mask, lengths, kv_batch_idx, scale):
    return _attention_fwd_fake(q, k, values)


@custom_op("fused_s2s::dot_attention_bwd", mutates_args=())
def dot_attention_bwd(backend: str, grad_context: Tensor, grad_weights: Tensor, q: Tensor, k: Tensor,
                      values: Tensor, mask: Opt, lengths: Opt, kv_batch_idx: Opt, scale: float,
                      weights: Tensor, lse: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return _run("dot_attention_bwd", backend, grad_context, grad_weights, q, k, values, mask, lengths,
                kv_batch_idx, scale, weights, lse)


@dot_attention_bwd.register_fake
def _(backend, grad_context, grad_weights, q, k, values, mask, lengths, kv_batch_idx, scale, weights, lse):
    bq, tk = q.shape[0], k.shape[1]
    return (torch.empty_like(q), k.new_empty(bq, tk, k.shape[2]),
            values.new_empty(bq, tk, values.shape[2]))
