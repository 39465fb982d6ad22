"""Additive (Bahdanau) attention: e[t, s] = sum_a v[a] tanh(q[t, a] + k[s, a]), computed
blockwise over A in registers (never a (Tq, Tk, A) tensor in memory), a masked softmax over s,
and the context. Contract and math: fused_s2s.backends.torch_backend.additive_attention_fwd / _bwd;
the shared forward/backward structure is described in ._attention."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _attention as att
from ._common import block, check, dot_precision, nonempty, tanh

Tensor = torch.Tensor


@triton.autotune(configs=att.KEY_FEATURE_CONFIGS, key=["BLOCK_T", "TK_BUCKET", "A", "Dv"], prune_configs_by=att.PRUNE)
@triton.jit
def _additive_attention_fwd_kernel(q_ptr, k_ptr, v_ptr, values_ptr, mask_ptr, lengths_ptr, kv_idx_ptr,
                                   scores_ptr, m_ptr, l_ptr, acc_ptr,
                                   Tq, Tk, A, Dv, SPLIT_LEN, NUM_SPLITS, TK_BUCKET,
                                   HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_KV_IDX: tl.constexpr,
                                   FUSED_VALUES: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr,
                                   BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr):
    i, kv, ts, t_ok, ds, d_ok, split, start, end, m, l, acc = att.forward_program(
        kv_idx_ptr, lengths_ptr, Tq, Tk, Dv, SPLIT_LEN, HAS_KV_IDX, HAS_LENGTHS, BLOCK_T, BLOCK_DV)
    for s0 in range(start, end, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        s_ok = ss < end
        scores = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
        for a0 in range(0, A, BLOCK_F):
            fs = a0 + tl.arange(0, BLOCK_F)
            f_ok = fs < A
            q = tl.load(q_ptr + (i * Tq + ts)[:, None] * A + fs[None, :],
                        mask=t_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
            k = tl.load(k_ptr + (kv * Tk + ss)[:, None] * A + fs[None, :],
                        mask=s_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
            v = tl.load(v_ptr + fs, mask=f_ok, other=0.0).to(tl.float32)  # 0 past A: no contribution
            scores += tl.sum(tanh(q[:, None, :] + k[None, :, :]) * v[None, None, :], axis=2)
        m, l, acc = att.softmax_block(scores, i, kv, ts, t_ok, ss, end, m, l, acc, ds, d_ok, Tq, Tk, Dv,
                                      scores_ptr, values_ptr, mask_ptr, HAS_MASK, BLOCK_T >= 16, PRECISION,
                                      FUSED_VALUES)
    att.store_split(i, ts, t_ok, split, m, l, acc, ds, d_ok, Tq, Dv, NUM_SPLITS, m_ptr, l_ptr, acc_ptr,
                    FUSED_VALUES)


@triton.autotune(configs=att.KEY_FEATURE_CONFIGS, key=["BLOCK_T", "TK_BUCKET", "A"], prune_configs_by=att.PRUNE)
@triton.jit
def _additive_attention_bwd_dq_kernel(d_scores_ptr, q_ptr, k_ptr, v_ptr, lengths_ptr, kv_idx_ptr, dq_ptr, dv_part_ptr,
                                      Tq, Tk, A, TK_BUCKET,
                                      HAS_LENGTHS: tl.constexpr, HAS_KV_IDX: tl.constexpr,
                                      BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr):
    """dq[t] = v * sum_s dS[t, s] (1 - tanh^2), and this program's share of
    dv = sum_{t, s} dS[t, s] tanh(q[t] + k[s]): per (query row, query block, feature block)."""
    i, tb, kv, kv_len, ts, t_ok, fs, f_ok = att.feature_program(kv_idx_ptr, lengths_ptr, Tq, Tk, A, HAS_KV_IDX,
                                                                HAS_LENGTHS, OVER_KEYS=False, BLOCK=BLOCK_T,
                                                                BLOCK_F=BLOCK_F)
    q = tl.load(q_ptr + (i * Tq + ts)[:, None] * A + fs[None, :], mask=t_ok[:, None] & f_ok[None, :],
                other=0.0).to(tl.float32)
    dq = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
    dv = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for s0 in range(0, kv_len, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        s_ok = ss < kv_len
        d_s = tl.load(d_scores_ptr + (i * Tq + ts)[:, None] * Tk + ss[None, :],
                      mask=t_ok[:, None] & s_ok[None, :], other=0.0)[:, :, None]
        k = tl.load(k_ptr + (kv * Tk + ss)[:, None] * A + fs[None, :], mask=s_ok[:, None] & f_ok[None, :],
                    other=0.0).to(tl.float32)
        th = tanh(q[:, None, :] + k[None, :, :])  # recomputed
        dq += tl.sum(d_s * (1.0 - th * th), axis=1)
        dv += tl.sum(tl.sum(d_s * th, axis=1), axis=0)
    v = tl.load(v_ptr + fs, mask=f_ok, other=0.0).to(tl.float32)
    tl.store(dq_ptr + (i * Tq + ts)[:, None] * A + fs[None, :], (dq * v[None, :]).to(dq_ptr.dtype.element_ty),
             mask=t_ok[:, None] & f_ok[None, :])
    tl.store(dv_part_ptr + (i * tl.num_programs(1) + tb) * A + fs, dv, mask=f_ok)


@triton.autotune(configs=att.KEY_FEATURE_CONFIGS, key=["BLOCK_T", "TQ_BUCKET", "A"], prune_configs_by=att.PRUNE)
@triton.jit
def _additive_attention_bwd_dk_kernel(d_scores_ptr, q_ptr, k_ptr, v_ptr, lengths_ptr, kv_idx_ptr, dk_ptr,
                                      Tq, Tk, A, TQ_BUCKET,
                                      HAS_LENGTHS: tl.constexpr, HAS_KV_IDX: tl.constexpr,
                                      BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr):
    """dk[s] = v * sum_t dS[t, s] (1 - tanh^2) for query row i: per (query row, key block,
    feature block), looping over the queries; 0 past the row's length."""
    i, sb, kv, kv_len, ss, s_ok, fs, f_ok = att.feature_program(kv_idx_ptr, lengths_ptr, Tq, Tk, A, HAS_KV_IDX,
                                                                HAS_LENGTHS, OVER_KEYS=True, BLOCK=BLOCK_S,
                                                                BLOCK_F=BLOCK_F)
    k = tl.load(k_ptr + (kv * Tk + ss)[:, None] * A + fs[None, :], mask=s_ok[:, None] & f_ok[None, :],
                other=0.0).to(tl.float32)
    dk = tl.zeros((BLOCK_S, BLOCK_F), dtype=tl.float32)
    n_queries = tl.where(sb * BLOCK_S < kv_len, Tq, 0)  # a block past the length stays 0
    for t0 in range(0, n_queries, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        t_ok = ts < Tq
        d_s = tl.load(d_scores_ptr + (i * Tq + ts)[:, None] * Tk + ss[None, :],
                      mask=t_ok[:, None] & s_ok[None, :], other=0.0)[:, :, None]
        q = tl.load(q_ptr + (i * Tq + ts)[:, None] * A + fs[None, :], mask=t_ok[:, None] & f_ok[None, :],
                    other=0.0).to(tl.float32)
        th = tanh(q[:, None, :] + k[None, :, :])  # recomputed
        dk += tl.sum(d_s * (1.0 - th * th), axis=0)
    v = tl.load(v_ptr + fs, mask=f_ok, other=0.0).to(tl.float32)
    tl.store(dk_ptr + (i * Tk + ss)[:, None] * A + fs[None, :], (dk * v[None, :]).to(dk_ptr.dtype.element_ty),
             mask=(ss < Tk)[:, None] & f_ok[None, :])


def _forward(q: Tensor, k: Tensor, v: Tensor, values: Tensor, mask: Optional[Tensor], lengths: Optional[Tensor],
             kv_batch_idx: Optional[Tensor], num_splits: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """additive_attention_fwd with the number of key splits exposed (None: chosen for the device)."""
    pb = att.problem(q, k, values, mask, lengths, kv_batch_idx, None)
    A = q.shape[2]
    check("v", v, (A,), q.dtype, q.device)
    if pb.Bq * pb.Tq == 0 or pb.Tk == 0:
        return att.empty_forward(q, pb)
    num_splits, split_len = att.key_splits(pb, q.device, num_splits)
    scores, m, l, acc = att.forward_buffers(q, pb, num_splits)
    grid = (pb.Bq, triton.cdiv(pb.Tq, pb.block_t), num_splits)
    _additive_attention_fwd_kernel[grid](
        nonempty(q), nonempty(k), nonempty(v), nonempty(values), pb.mask, pb.lengths, pb.kv_idx,
        scores, m, l, acc, pb.Tq, pb.Tk, A, pb.Dv, split_len, num_splits, block(pb.Tk),
        HAS_MASK=pb.has_mask, HAS_LENGTHS=pb.has_lengths, HAS_KV_IDX=pb.has_kv_idx, PRECISION=dot_precision(),
        FUSED_VALUES=pb.fused_values, BLOCK_T=pb.block_t, BLOCK_DV=att.value_block(pb))
    return att.combine(q, values, pb, num_splits, scores, m, l, acc)


def additive_attention_fwd(q: Tensor, k: Tensor, v: Tensor, values: Tensor, mask: Optional[Tensor],
                           lengths: Optional[Tensor], kv_batch_idx: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    return _forward(q, k, v, values, mask, lengths, kv_batch_idx)


def additive_attention_bwd(grad_context: Tensor, grad_weights: Tensor, q: Tensor, k: Tensor, v: Tensor,
                           values: Tensor, mask: Optional[Tensor], lengths: Optional[Tensor],
                           kv_batch_idx: Optional[Tensor], weights: Tensor, lse: Tensor
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    pb = att.problem(q, k, values, mask, lengths, kv_batch_idx, None)
    A = q.shape[2]
    check("v", v, (A,), q.dtype, q.device)
    att.check_backward(grad_context, grad_weights, weights, lse, q, pb)
    if pb.Bq * pb.Tq == 0 or pb.Tk == 0:
        return (torch.zeros_like(q), q.new_zeros(pb.Bq, pb.Tk, A), torch.zeros_like(v),
                q.new_zeros(pb.Bq, pb.Tk, pb.Dv))
    precision = dot_precision()
    d_scores = att.softmax_bwd(grad_context, grad_weights, weights, values, pb, 1.0, precision)
    n_tblocks = triton.cdiv(pb.Tq, pb.block_t)
    dq, dk = torch.empty_like(q), q.new_empty(pb.Bq, pb.Tk, A)
    dv_part = torch.empty(pb.Bq, n_tblocks, A, dtype=torch.float32, device=q.device)
    if A:
        flags = dict(HAS_LENGTHS=pb.has_lengths, HAS_KV_IDX=pb.has_kv_idx, BLOCK_T=pb.block_t)
        _additive_attention_bwd_dq_kernel[lambda meta: (pb.Bq, n_tblocks, triton.cdiv(A, meta["BLOCK_F"]))](
            d_scores, q, k, v, pb.lengths, pb.kv_idx, dq, dv_part, pb.Tq, pb.Tk, A, block(pb.Tk), **flags)
        _additive_attention_bwd_dk_kernel[
            lambda meta: (pb.Bq, triton.cdiv(pb.Tk, meta["BLOCK_S"]), triton.cdiv(A, meta["BLOCK_F"]))](
            d_scores, q, k, v, pb.lengths, pb.kv_idx, dk, pb.Tq, pb.Tk, A, block(pb.Tq), **flags)
    dv = dv_part.sum(dim=(0, 1)).to(q.dtype)  # a fixed-order reduction: deterministic
    dvalues = att.pt_x(weights, grad_context, pb, q.dtype, precision)
    return dq, dk, dv, dvalues
