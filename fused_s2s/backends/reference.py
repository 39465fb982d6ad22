"""The specification: every op of fused_s2s in plain PyTorch, differentiated by autograd.

Every backend is tested against these functions (computed in float64). They are written for
clarity, not speed: the additive attention here materialises the (B, Tq, Tk, A) tanh tensor
that the fused kernels never build.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def gru_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
             b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None) -> Tensor:
    """PyTorch's GRU cell, gates in the order (r, z, n)."""
    gx = torch.nn.functional.linear(input, w_ih, b_ih)
    gh = torch.nn.functional.linear(hx, w_hh, b_hh)
    gx_r, gx_z, gx_n = gx.chunk(3, dim=-1)
    gh_r, gh_z, gh_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(gx_r + gh_r)
    z = torch.sigmoid(gx_z + gh_z)
    n = torch.tanh(gx_n + r * gh_n)
    return (1 - z) * n + z * hx


def lstm_cell(input: Tensor, state: Tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None,
              w_hr: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """PyTorch's LSTM cell, gates in the order (i, f, g, o). With projections (nn.LSTM's
    proj_size P, LSTMP): hx and the returned h are (.., P), w_hh is (4H, P), w_hr (P, H), and
    h' = w_hr (o * tanh(c')); the cell state stays (.., H)."""
    hx, cx = state
    gates = torch.nn.functional.linear(input, w_ih, b_ih) + torch.nn.functional.linear(hx, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * cx + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (h if w_hr is None else torch.nn.functional.linear(h, w_hr)), c


def valid_positions(mask: Optional[Tensor], lengths: Optional[Tensor], batch: int, tk: int,
                    device: torch.device) -> Tensor:
    """(batch, tk) bool: True where a source position is real (mask and lengths combined)."""
    valid = torch.ones(batch, tk, dtype=torch.bool, device=device)
    if mask is not None:
        valid = valid & mask
    if lengths is not None:
        valid = valid & (torch.arange(tk, device=device) < lengths[:, None])
    return valid


def masked_softmax(scores: Tensor, valid: Tensor) -> Tensor:
    """Softmax over the last dim in float32 (float64 stays float64); invalid positions get
    exactly 0 and a row with no valid position gives all zeros (never NaN)."""
    acc = torch.promote_types(scores.dtype, torch.float32)
    s = scores.to(acc).masked_fill(~valid, float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True).detach()  # any constant works; detached keeps grads clean
    # only a row with no valid position (max -inf) is special; NaN and +inf propagate as in softmax
    row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
    p = torch.exp(s - row_max)  # exp(-inf) = 0 at invalid positions
    denom = p.sum(dim=-1, keepdim=True)
    return (p / torch.where(denom == 0, torch.ones_like(denom), denom)).to(scores.dtype)


def kv_rows(t: Optional[Tensor], kv_batch_idx: Optional[Tensor]) -> Optional[Tensor]:
    """A key-side tensor (keys, values, mask, lengths) seen from the query rows."""
    if t is None or kv_batch_idx is None:
        return t
    return t.index_select(0, kv_batch_idx)


def additive_attention(q_proj: Tensor, k_proj: Tensor, v: Tensor, values: Tensor,
                       mask: Optional[Tensor] = None, *, lengths: Optional[Tensor] = None,
                       kv_batch_idx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """e[b,t,s] = v . tanh(q_proj[b,t] + k_proj[b,s]); weights = masked softmax over s.

    q_proj (B,A) or (B,Tq,A); k_proj (Bk,Tk,A); v (A,); values (Bk,Tk,Dv); mask (Bk,Tk) bool;
    lengths (Bk,); kv_batch_idx (B,) maps each query row to its key row (beam search).
    """
    single = q_proj.dim() == 2
    q = q_proj.unsqueeze(1) if single else q_proj
    k, vals = kv_rows(k_proj, kv_batch_idx), kv_rows(values, kv_batch_idx)
    valid = valid_positions(kv_rows(mask, kv_batch_idx), kv_rows(lengths, kv_batch_idx),
                            k.shape[0], k.shape[1], k.device)
    scores = torch.tanh(q.unsqueeze(2) + k.unsqueeze(1)) @ v  # (B, Tq, Tk)
    weights = masked_softmax(scores, valid[:, None, :])
    context = weights @ vals
    return (context.squeeze(1), weights.squeeze(1)) if single else (context, weights)


def dot_attention(query: Tensor, keys: Tensor, values: Tensor, mask: Optional[Tensor] = None,
                  scale: Optional[float] = None, *, lengths: Optional[Tensor] = None,
                  kv_batch_idx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """e[b,t,s] = scale * query[b,t] . keys[b,s] (scale defaults to 1, Luong's "dot")."""
    single = query.dim() == 2
    q = query.unsqueeze(1) if single else query
    k, vals = kv_rows(keys, kv_batch_idx), kv_rows(values, kv_batch_idx)
    valid = valid_positions(kv_rows(mask, kv_batch_idx), kv_rows(lengths, kv_batch_idx),
                            k.shape[0], k.shape[1], k.device)
    scores = (q @ k.transpose(1, 2)) * (1.0 if scale is None else scale)
    weights = masked_softmax(scores, valid[:, None, :])
    context = weights @ vals
    return (context.squeeze(1), weights.squeeze(1)) if single else (context, weights)
