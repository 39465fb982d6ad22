"""The `torch` backend: the kernel contract, written in plain PyTorch.

Every backend (this module, the compiled extension `fused_s2s._C`, and
`fused_s2s.triton_kernels`) exposes the same eight primitives with the same signatures,
argument order and outputs. The autograd Functions in `fused_s2s.backends.autograd` call only these,
so this file is both the `torch` backend and the template the kernels follow.

Conventions (the Function layer guarantees them before a primitive is called):
- every tensor argument is contiguous and on one device; floating tensors share one dtype;
- `mask` is bool (Bk, Tk) or None; `lengths` is int64 (Bk,) or None; a source position s of
  key row b is valid iff mask[b, s] (when given) and s < lengths[b] (when given);
- `kv_batch_idx` is int64 (Bq,) or None: query row i reads key/value/mask/length row
  kv_batch_idx[i] (None: the identity, Bq == Bk). Backward returns dk/dvalues per *query*
  row (Bq, ...); the Function reduces them onto the key rows with index_add_;
- gate math and softmax accumulate in float32 for every input dtype (float64 stays float64);
  outputs have the input dtype, except `lse`, which has the accumulation dtype;
- a row with no valid position has weights 0, context 0, lse = -inf, and zero gradients.

Cells (one time step; gx = x @ w_ih.T + b_ih comes in precomputed, for a layer as one GEMM):
  gru_cell_fwd(gx (B,3H), h (B,H), w_hh (3H,H), b_hh (3H,)|None) -> (h_new (B,H), saved (B,4H))
      saved = [r, z, n, gh_n] with gh_n = (h @ w_hh.T + b_hh)[:, 2H:]
  gru_cell_bwd(grad_h_new, h, saved) -> (grad_gx (B,3H), grad_gh (B,3H), grad_h_direct (B,H))
      the caller finishes: grad_h = grad_h_direct + grad_gh @ w_hh, grad_w_hh = grad_gh.T @ h
  lstm_cell_fwd(gx (B,4H), h (B,P), c (B,H), w_hh (4H,P), b_hh|None) -> (h_new (B,H), c_new (B,H), saved (B,4H))
      saved = activated gates [sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)]; h_new = o * tanh(c_new).
      P = H without projections; with them (nn.LSTM's proj_size) h is the projected state and
      the caller projects h_new with w_hr (P,H) itself: a GEMM over the whole row of h_new,
      which a kernel tiled over hidden units cannot finish in its epilogue
  lstm_cell_bwd(grad_h_new, grad_c_new, c, c_new, saved) -> (grad_gates (B,4H), grad_c (B,H))
      grad_gx = grad_gh = grad_gates; the caller finishes grad_h = grad_gates @ w_hh (B,P)

Attention (queries always 3-D here; the Function adds/removes the Tq = 1 dim):
  additive_attention_fwd(q (Bq,Tq,A), k (Bk,Tk,A), v (A,), values (Bk,Tk,Dv), mask, lengths,
                         kv_batch_idx) -> (context (Bq,Tq,Dv), weights (Bq,Tq,Tk), lse (Bq,Tq))
  additive_attention_bwd(grad_context, grad_weights, q, k, v, values, mask, lengths,
                         kv_batch_idx, weights, lse) -> (dq, dk (Bq,Tk,A), dv (A,), dvalues (Bq,Tk,Dv))
  dot_attention_fwd(q (Bq,Tq,D), k (Bk,Tk,D), values, mask, lengths, kv_batch_idx, scale)
      -> (context, weights, lse)
  dot_attention_bwd(grad_context, grad_weights, q, k, values, mask, lengths, kv_batch_idx,
                    scale, weights, lse) -> (dq, dk (Bq,Tk,D), dvalues (Bq,Tk,Dv))
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .reference import kv_rows, valid_positions


def up(t: Tensor) -> Tensor:
    """The accumulation dtype: float32 for half/bfloat16/float32, float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))

# ----------------------------------------------------------------------------------- cells


def gru_cell_fwd(gx: Tensor, h: Tensor, w_hh: Tensor, b_hh: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    gh = up(torch.nn.functional.linear(h, w_hh, b_hh))
    gx_r, gx_z, gx_n = up(gx).chunk(3, dim=1)
    gh_r, gh_z, gh_n = gh.chunk(3, dim=1)
    r = torch.sigmoid(gx_r + gh_r)
    z = torch.sigmoid(gx_z + gh_z)
    n = torch.tanh(gx_n + r * gh_n)
    h_new = (1 - z) * n + z * up(h)
    saved = torch.cat([r, z, n, gh_n], dim=1)
    return h_new.to(h.dtype), saved.to(h.dtype)


def gru_cell_bwd(grad_h_new: Tensor, h: Tensor, saved: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    g = up(grad_h_new)
    r, z, n, gh_n = up(saved).chunk(4, dim=1)
    d_n = g * (1 - z) * (1 - n * n)              # through n = tanh(.)
    d_z = g * (up(h) - n) * z * (1 - z)          # through z = sigmoid(.)
    d_r = d_n * gh_n * r * (1 - r)               # through r = sigmoid(.), r multiplies gh_n
    grad_gx = torch.cat([d_r, d_z, d_n], dim=1)
    grad_gh = torch.cat([d_r, d_z, d_n * r], dim=1)
    grad_h_direct = g * z
    dt = h.dtype
    return grad_gx.to(dt), grad_gh.to(dt), grad_h_direct.to(dt)


def lstm_cell_fwd(gx: Tensor, h: Tensor, c: Tensor, w_hh: Tensor,
                  b_hh: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    g = up(gx) + up(torch.nn.functional.linear(h, w_hh, b_hh))
    g_i, g_f, g_g, g_o = g.chunk(4, dim=1)
    i, f, gg, o = torch.sigmoid(g_i), torch.sigmoid(g_f), torch.tanh(g_g), torch.sigmoid(g_o)
    c_new = f * up(c) + i * gg
    h_new = o * torch.tanh(c_new)
    saved = torch.cat([i, f, gg, o], dim=1)
    return h_new.to(h.dtype), c_new.to(c.dtype), saved.to(h.dtype)


def lstm_cell_bwd(grad_h_new: Tensor, grad_c_new: Tensor, c: Tensor, c_new: Tensor,
                  saved: Tensor) -> Tuple[Tensor, Tensor]:
    i, f, gg, o = up(saved).chunk(4, dim=1)
    tanh_c = torch.tanh(up(c_new))               # recomputed rather than saved
    gh = up(grad_h_new)
    d_c = up(grad_c_new) + gh * o * (1 - tanh_c * tanh_c)
    d_i = d_c * gg * i * (1 - i)
    d_f = d_c * up(c) * f * (1 - f)
    d_g = d_c * i * (1 - gg * gg)
    d_o = gh * tanh_c * o * (1 - o)
    grad_gates = torch.cat([d_i, d_f, d_g, d_o], dim=1)
    return grad_gates.to(c.dtype), (d_c * f).to(c.dtype)


# ------------------------------------------------------------------------------- attention


def _softmax_with_lse(scores: Tensor, valid: Tensor) -> Tuple[Tensor, Tensor]:
    """scores (Bq,Tq,Tk) in the accumulation dtype, valid (Bq,Tk) -> (weights, lse (Bq,Tq)).

    Weights are exp(s - max) / sum rather than exp(s - lse): s - max is exact for the largest
    scores, while s - lse carries an error of eps * |s|, which large scores make visible."""
    s = scores.masked_fill(~valid[:, None, :], float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True)
    # only a row with no valid position (max -inf) is special; NaN and +inf propagate
    row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    p = torch.exp(s - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    weights = p / torch.where(denom == 0, torch.ones_like(denom), denom)
    lse = (row_max + torch.log(denom)).squeeze(-1)  # -inf for a row with no valid position
    return weights, lse


def _softmax_bwd(grad_context: Tensor, grad_weights: Tensor, values_rows: Tensor,
                 weights: Tensor) -> Tensor:
    """Gradient of the scores: dS = W * (dW - rowsum(W * dW)), dW = dC @ V.T + dW_direct."""
    w = up(weights)
    d_w = up(grad_context) @ up(values_rows).transpose(1, 2) + up(grad_weights)
    return w * (d_w - (w * d_w).sum(dim=-1, keepdim=True))


def additive_attention_fwd(q: Tensor, k: Tensor, v: Tensor, values: Tensor, mask: Optional[Tensor],
                           lengths: Optional[Tensor], kv_batch_idx: Optional[Tensor]
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    k_rows, values_rows = kv_rows(k, kv_batch_idx), kv_rows(values, kv_batch_idx)
    valid = valid_positions(kv_rows(mask, kv_batch_idx), kv_rows(lengths, kv_batch_idx),
                            q.shape[0], k.shape[1], q.device)
    scores = torch.tanh(up(q)[:, :, None, :] + up(k_rows)[:, None, :, :]) @ up(v)
    weights, lse = _softmax_with_lse(scores, valid)
    context = weights @ up(values_rows)
    return context.to(q.dtype), weights.to(q.dtype), lse


def additive_attention_bwd(grad_context: Tensor, grad_weights: Tensor, q: Tensor, k: Tensor, v: Tensor,
                           values: Tensor, mask: Optional[Tensor], lengths: Optional[Tensor],
                           kv_batch_idx: Optional[Tensor], weights: Tensor, lse: Tensor
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    k_rows, values_rows = kv_rows(k, kv_batch_idx), kv_rows(values, kv_batch_idx)
    d_scores = _softmax_bwd(grad_context, grad_weights, values_rows, weights)  # (Bq,Tq,Tk)
    t = torch.tanh(up(q)[:, :, None, :] + up(k_rows)[:, None, :, :])          # recomputed
    d_pre = d_scores[..., None] * up(v) * (1 - t * t)                          # (Bq,Tq,Tk,A)
    dq = d_pre.sum(dim=2)
    dk = d_pre.sum(dim=1)
    dv = (d_scores[..., None] * t).sum(dim=(0, 1, 2))
    dvalues = up(weights).transpose(1, 2) @ up(grad_context)
    dt = q.dtype
    return dq.to(dt), dk.to(dt), dv.to(dt), dvalues.to(dt)


def dot_attention_fwd(q: Tensor, k: Tensor, values: Tensor, mask: Optional[Tensor],
                      lengths: Optional[Tensor], kv_batch_idx: Optional[Tensor], scale: float
                      ) -> Tuple[Tensor, Tensor, Tensor]:
    k_rows, values_rows = kv_rows(k, kv_batch_idx), kv_rows(values, kv_batch_idx)
    valid = valid_positions(kv_rows(mask, kv_batch_idx), kv_rows(lengths, kv_batch_idx),
                            q.shape[0], k.shape[1], q.device)
    scores = (up(q) @ up(k_rows).transpose(1, 2)) * scale
    weights, lse = _softmax_with_lse(scores, valid)
    context = weights @ up(values_rows)
    return context.to(q.dtype), weights.to(q.dtype), lse


def dot_attention_bwd(grad_context: Tensor, grad_weights: Tensor, q: Tensor, k: Tensor, values: Tensor,
                      mask: Optional[Tensor], lengths: Optional[Tensor], kv_batch_idx: Optional[Tensor],
                      scale: float, weights: Tensor, lse: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    k_rows, values_rows = kv_rows(k, kv_batch_idx), kv_rows(values, kv_batch_idx)
    d_scores = _softmax_bwd(grad_context, grad_weights, values_rows, weights) * scale
    dq = d_scores @ up(k_rows)
    dk = d_scores.transpose(1, 2) @ up(q)
    dvalues = up(weights).transpose(1, 2) @ up(grad_context)
    dt = q.dtype
    return dq.to(dt), dk.to(dt), dvalues.to(dt)
