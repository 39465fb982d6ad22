"""Dot (Luong) attention: e[t, s] = scale * q[t] . k[s] with tl.dot on blocks, a masked softmax
over s, and the context. Contract and math: fused_s2s.backends.torch_backend.dot_attention_fwd / _bwd;
the shared forward/backward structure is described in ._attention."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _attention as att
from ._common import block, dot_precision, mm, nonempty

Tensor = torch.Tensor


@triton.autotune(configs=att.KEY_FEATURE_CONFIGS, key=["BLOCK_T", "TK_BUCKET", "D", "Dv"], prune_configs_by=att.PRUNE)
@triton.jit
def _dot_attention_fwd_kernel(q_ptr, k_ptr, values_ptr, mask_ptr, lengths_ptr, kv_idx_ptr,
                              scores_ptr, m_ptr, l_ptr, acc_ptr,
                              scale, Tq, Tk, D, Dv, SPLIT_LEN, NUM_SPLITS, TK_BUCKET,
                              HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_KV_IDX: tl.constexpr,
                              FUSED_VALUES: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr,
                              BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr):
    i, kv, ts, t_ok, ds, d_ok, split, start, end, m, l, acc = att.forward_program(
        kv_idx_ptr, lengths_ptr, Tq, Tk, Dv, SPLIT_LEN, HAS_KV_IDX, HAS_LENGTHS, BLOCK_T, BLOCK_DV)
    for s0 in range(start, end, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        s_ok = ss < end
        scores = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
        for f0 in range(0, D, BLOCK_F):
            fs = f0 + tl.arange(0, BLOCK_F)
            f_ok = fs < D
            q = tl.load(q_ptr + (i * Tq + ts)[:, None] * D + fs[None, :], mask=t_ok[:, None] & f_ok[None, :], other=0.0)
            k_t = tl.load(k_ptr + (kv * Tk + ss)[None, :] * D + fs[:, None], mask=f_ok[:, None] & s_ok[None, :],
                          other=0.0)
            scores = mm(q, k_t, scores, BLOCK_T >= 16, PRECISION)
        m, l, acc = att.softmax_block(scores * scale, i, kv, ts, t_ok, ss, end, m, l, acc, ds, d_ok, Tq, Tk, Dv,
                                      scores_ptr, values_ptr, mask_ptr, HAS_MASK, BLOCK_T >= 16, PRECISION,
                                      FUSED_VALUES)
    att.store_split(i, ts, t_ok, split, m, l, acc, ds, d_ok, Tq, Dv, NUM_SPLITS, m_ptr, l_ptr, acc_ptr,
                    FUSED_VALUES)


def _forward(q: Tensor, k: Tensor, values: Tensor, mask: Optional[Tensor], lengths: Optional[Tensor],
             kv_batch_idx: Optional[Tensor], scale: float, num_splits: Optional[int] = None
             ) -> Tuple[Tensor, Tensor, Tensor]:
    """dot_attention_fwd with the number of key splits exposed (None: chosen for the device)."""
    pb = att.problem(q, k, values, mask, lengths, kv_batch_idx, None)
    D = q.shape[2]
    if pb.Bq * pb.Tq == 0 or pb.Tk == 0:
        return att.empty_forward(q, pb)
    num_splits, split_len = att.key_splits(pb, q.device, num_splits)
    scores, m, l, acc = att.forward_buffers(q, pb, num_splits)
    grid = (pb.Bq, triton.cdiv(pb.Tq, pb.block_t), num_splits)
    _dot_attention_fwd_kernel[grid](
        nonempty(q), nonempty(k), nonempty(values), pb.mask, pb.lengths, pb.kv_idx,
        scores, m, l, acc, float(scale), pb.Tq, pb.Tk, D, pb.Dv, split_len, num_splits, block(pb.Tk),
        HAS_MASK=pb.has_mask, HAS_LENGTHS=pb.has_lengths, HAS_KV_IDX=pb.has_kv_idx, PRECISION=dot_precision(),
        FUSED_VALUES=pb.fused_values, BLOCK_T=pb.block_t, BLOCK_DV=att.value_block(pb))
    return att.combine(q, values, pb, num_splits, scores, m, l, acc)


def dot_attention_fwd(q: Tensor, k: Tensor, values: Tensor, mask: Optional[Tensor], lengths: Optional[Tensor],
                      kv_batch_idx: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    return _forward(q, k, values, mask, lengths, kv_batch_idx, scale)


def dot_attention_bwd(grad_context: Tensor, grad_weights: Tensor, q: Tensor, k: Tensor, values: Tensor,
                      mask: Optional[Tensor], lengths: Optional[Tensor], kv_batch_idx: Optional[Tensor],
                      scale: float, weights: Tensor, lse: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    pb = att.problem(q, k, values, mask, lengths, kv_batch_idx, None)
    att.check_backward(grad_context, grad_weights, weights, lse, q, pb)
    if pb.Bq * pb.Tq == 0 or pb.Tk == 0:
        return torch.zeros_like(q), q.new_zeros(pb.Bq, pb.Tk, q.shape[2]), q.new_zeros(pb.Bq, pb.Tk, pb.Dv)
    precision = dot_precision()
    d_scores = att.softmax_bwd(grad_context, grad_weights, weights, values, pb, scale, precision)
    dq = att.p_y(d_scores, k, pb, q.dtype, precision)        # dS @ k
    dk = att.pt_x(d_scores, q, pb, q.dtype, precision)       # dS.T @ q
    dvalues = att.pt_x(weights, grad_context, pb, q.dtype, precision)
    return dq, dk, dvalues
