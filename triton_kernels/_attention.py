"""What the additive and dot attention kernels share.

Forward, for a score function S (additive or dot):
  1. `_<op>_fwd_kernel`, one program per (query row, query block, key split): streams over the
     split's key blocks (none beyond the row's length), writes the raw float32 scores
     (-inf where masked) and keeps an online softmax: running max m, sum l, context acc;
  2. `_combine_kernel`, one program per query: merges the splits into lse, the context and
     the normalised weights exp(score - max) / sum (exactly 0 where masked; a row with no
     valid position gets lse = -inf, zero weights and a zero context; a row with a NaN or
     +inf score is NaN throughout, as torch.softmax makes it).
  Values wider than MAX_FUSED_DV do not fit on chip beside the scores (shared memory and
  registers grow with the value block): then step 1 leaves them out, step 2 writes the float32
  weights over the raw scores, and `_p_y_kernel` computes context = weights @ values with a
  grid axis over value blocks.

Backward, from the saved weights:
  `_softmax_bwd_kernel`: dS = W * (dW - rowsum(W * dW)) * scale, dW = dC @ V.T + grad_weights
  (a loop over chunks of at most MAX_DV_CHUNK values, the reduction axis), into a float32
  buffer; then per op dq (per query block, over keys) and dk (per key block,
  over queries); `_pt_x_kernel` computes dvalues = W.T @ dC (and dot's dk = dS.T @ q),
  `_p_y_kernel` dot's dq = dS @ k. No atomics: every output element has one owner.

Query blocks: BLOCK_T = 1 (one query a program; products are broadcast sums) when Tq < 16,
else 16 (tl.dot needs block dims >= 16 on a GPU), so that a decoder step (Tq = 1) wastes no
work on padding rows.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, block, check, configs, dot_precision, mm, nonempty, num_programs_target

DOT_ROWS = 16        # query block when tl.dot is used
MIN_SPLIT_KEYS = 64  # fewest keys worth a split of their own
MAX_FUSED_DV = 256   # widest values the forward kernels accumulate on chip (else a second pass)
MAX_DV_CHUNK = 128   # widest chunk of values the softmax backward holds at a time


def query_block(tq: int) -> int:
    return DOT_ROWS if tq >= DOT_ROWS else 1


def tile_registers(config, block_t: int, block_dv: int, values_bytes: int) -> float:
    """32-bit registers a thread of `config` needs for its tiles: the float32 (BLOCK_T, BLOCK_DV)
    context, the (BLOCK_S, BLOCK_DV) values both as loaded and upcast to float32, their float32
    broadcast product when a query block of one multiplies without tl.dot, and the (BLOCK_T,
    BLOCK_S, BLOCK_F) additive scores."""
    s, f = config.kwargs["BLOCK_S"], config.kwargs.get("BLOCK_F", 1)
    values = s * block_dv * (1 + values_bytes / 4)
    product = s * block_dv if block_t == 1 else 0
    return (block_t * block_dv + values + product + block_t * s * f) / (32 * config.num_warps)


def _prune_large_tiles(configs_, named_args, **kwargs):
    """Drop configs needing more than 128 tile registers a thread (tile_registers): past that,
    ptxas spills on sm_90. Keeps at least the lightest config."""
    args = {**named_args, **kwargs}
    values = args.get("values_ptr")
    values_bytes = values.element_size() if isinstance(values, torch.Tensor) else 4

    def per_thread(c):
        return tile_registers(c, args.get("BLOCK_T", 1), args.get("BLOCK_DV", 0), values_bytes)
    kept = [c for c in configs_ if per_thread(c) <= 128]
    return kept or [min(configs_, key=per_thread)]


# Autotune candidates per kernel family: block over keys (S) and over the feature dim (F: A
# for additive scores, D for dot scores, the output width for the products).
KEY_FEATURE_CONFIGS = configs(
    [triton.Config({"BLOCK_S": 16, "BLOCK_F": 16}, num_warps=4),
     triton.Config({"BLOCK_S": 16, "BLOCK_F": 32}, num_warps=4),
     triton.Config({"BLOCK_S": 16, "BLOCK_F": 16}, num_warps=8),
     triton.Config({"BLOCK_S": 32, "BLOCK_F": 16}, num_warps=8),
     triton.Config({"BLOCK_S": 32, "BLOCK_F": 32}, num_warps=8),
     triton.Config({"BLOCK_S": 64, "BLOCK_F": 16}, num_warps=8)],
    triton.Config({"BLOCK_S": 16, "BLOCK_F": 16}, num_warps=4))
KEY_CONFIGS = configs(
    [triton.Config({"BLOCK_S": 16}, num_warps=4),
     triton.Config({"BLOCK_S": 16}, num_warps=8),
     triton.Config({"BLOCK_S": 32}, num_warps=4),
     triton.Config({"BLOCK_S": 64}, num_warps=8)],
    triton.Config({"BLOCK_S": 16}, num_warps=4))
PRUNE = {"early_config_prune": _prune_large_tiles}


# ------------------------------------------------------------------------ jit building blocks

@triton.jit
def kv_row_and_length(i, kv_idx_ptr, lengths_ptr, Tk, HAS_KV_IDX: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """The key row that query row i reads, and the end of its possibly-valid positions."""
    kv = i
    if HAS_KV_IDX:
        kv = tl.load(kv_idx_ptr + i).to(tl.int32)
    kv_len = i * 0 + Tk  # a tensor even when Tk == 1 is specialised to a constant
    if HAS_LENGTHS:
        kv_len = tl.minimum(tl.maximum(tl.load(lengths_ptr + kv).to(tl.int32), 0), Tk)
    return kv, kv_len


@triton.jit
def forward_program(kv_idx_ptr, lengths_ptr, Tq, Tk, Dv, SPLIT_LEN,
                    HAS_KV_IDX: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr):
    """What a forward program (query row i, query block, key split) works on: the key row kv,
    the queries ts (t_ok), the value columns ds (d_ok), the split's keys [start, end), and the
    online softmax state (m, l, acc) it starts from."""
    i, tb, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv, kv_len = kv_row_and_length(i, kv_idx_ptr, lengths_ptr, Tk, HAS_KV_IDX, HAS_LENGTHS)
    ts = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = ts < Tq
    ds = tl.arange(0, BLOCK_DV)
    d_ok = ds < Dv
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, kv_len)  # no key block past the row's length
    m = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_T,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_T, BLOCK_DV), dtype=tl.float32)
    return i, kv, ts, t_ok, ds, d_ok, split, start, end, m, l, acc


@triton.jit
def softmax_block(scores, i, kv, ts, t_ok, ss, end, m, l, acc, ds, d_ok, Tq, Tk, Dv,
                  scores_ptr, values_ptr, mask_ptr,
                  HAS_MASK: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
                  FUSED_VALUES: tl.constexpr):
    """Mask one (BLOCK_T, BLOCK_S) block of raw scores, store it, and fold it into the online
    softmax state (m, l, acc) together with its values (FUSED_VALUES; else acc stays as it is).
    Returns the new state."""
    s_ok = ss < end
    valid = s_ok
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + kv * Tk + ss, mask=s_ok, other=0) != 0)
    scores = tl.where(valid[None, :], scores, float("-inf"))
    tl.store(scores_ptr + (i * Tq + ts)[:, None] * Tk + ss[None, :], scores, mask=t_ok[:, None] & s_ok[None, :])
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    # shift by the running max while it is finite, else by 0: a NaN or +inf score then shows in l
    shift_old = tl.where(tl.abs(m) < float("inf"), m, 0.0)
    shift_new = tl.where(tl.abs(m_new) < float("inf"), m_new, 0.0)
    alpha = tl.where(m == float("-inf"), 0.0, tl.exp(shift_old - shift_new))  # l, acc are 0 then
    p = tl.exp(scores - shift_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    if FUSED_VALUES:
        values = tl.load(values_ptr + (kv * Tk + ss)[:, None] * Dv + ds[None, :],
                         mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        acc = mm(p, values, acc * alpha[:, None], USE_DOT, PRECISION)
    return m_new, l, acc


@triton.jit
def store_split(i, ts, t_ok, split, m, l, acc, ds, d_ok, Tq, Dv, NUM_SPLITS, m_ptr, l_ptr, acc_ptr,
                FUSED_VALUES: tl.constexpr):
    part = (i * Tq + ts) * NUM_SPLITS + split
    tl.store(m_ptr + part, m, mask=t_ok)
    tl.store(l_ptr + part, l, mask=t_ok)
    if FUSED_VALUES:
        tl.store(acc_ptr + part[:, None] * Dv + ds[None, :], acc, mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def feature_program(kv_idx_ptr, lengths_ptr, Tq, Tk, F, HAS_KV_IDX: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                    OVER_KEYS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_F: tl.constexpr):
    """What a program over (query row i, block b of the queries, or of the keys if OVER_KEYS,
    feature block) works on: the key row kv and its length, the block's positions (ok: below Tq,
    or below the row's length) and the features fs (f_ok) of F."""
    i, b, fb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv, kv_len = kv_row_and_length(i, kv_idx_ptr, lengths_ptr, Tk, HAS_KV_IDX, HAS_LENGTHS)
    bound = Tq
    if OVER_KEYS:
        bound = kv_len
    at = b * BLOCK + tl.arange(0, BLOCK)
    ok = at < bound
    fs = fb * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = fs < F
    return i, b, kv, kv_len, at, ok, fs, f_ok


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, scores_ptr, lengths_ptr, kv_idx_ptr,
                    context_ptr, weights_ptr, lse_ptr, Tq, Tk, Dv, NUM_SPLITS,
                    HAS_LENGTHS: tl.constexpr, HAS_KV_IDX: tl.constexpr, FUSED_VALUES: tl.constexpr,
                    BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """Without FUSED_VALUES: no context here; the float32 weights replace the raw scores."""
    row = tl.program_id(0)  # flattened (query row, query)
    kv, kv_len = kv_row_and_length(row // Tq, kv_idx_ptr, lengths_ptr, Tk, HAS_KV_IDX, HAS_LENGTHS)
    splits = tl.arange(0, BLOCK_SPLITS)
    split_ok = splits < NUM_SPLITS
    m = tl.load(m_ptr + row * NUM_SPLITS + splits, mask=split_ok, other=float("-inf"))
    l = tl.load(l_ptr + row * NUM_SPLITS + splits, mask=split_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    shift_split = tl.where(tl.abs(m) < float("inf"), m, 0.0)
    shift = tl.where(tl.abs(m_max) < float("inf"), m_max, 0.0)  # the row max, as in each split
    split_scale = tl.where(l == 0.0, 0.0, tl.exp(shift_split - shift))  # an empty split adds nothing
    total = tl.sum(l * split_scale, axis=0)
    # a NaN or +inf score makes l NaN or inf: the whole row is NaN, as torch.softmax gives
    norm = tl.where(total < float("inf"), total, float("nan"))
    norm = tl.where(total == 0.0, 1.0, norm)  # no valid position: weights and context 0
    tl.store(lse_ptr + row, tl.where(total == 0.0, float("-inf"), shift + tl.log(norm)))
    if FUSED_VALUES:
        for d0 in range(0, Dv, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < Dv
            acc = tl.load(acc_ptr + (row * NUM_SPLITS + splits)[:, None] * Dv + ds[None, :],
                          mask=split_ok[:, None] & d_ok[None, :], other=0.0)
            context = tl.sum(acc * split_scale[:, None], axis=0) / norm
            tl.store(context_ptr + row * Dv + ds, context.to(context_ptr.dtype.element_ty), mask=d_ok)
    # exp(s - max) / sum rather than exp(s - lse): exact for the largest scores
    for s0 in range(0, Tk, BLOCK_K):
        ss = s0 + tl.arange(0, BLOCK_K)
        scores = tl.load(scores_ptr + row * Tk + ss, mask=ss < kv_len, other=float("-inf"))
        weights = tl.exp(scores - shift) / norm
        tl.store(weights_ptr + row * Tk + ss, weights.to(weights_ptr.dtype.element_ty), mask=ss < Tk)
        if not FUSED_VALUES:  # each program reads back only what it wrote itself, same layout
            tl.store(scores_ptr + row * Tk + ss, weights, mask=ss < Tk)


@triton.autotune(configs=KEY_CONFIGS, key=["BLOCK_T", "TK_BUCKET", "Dv"], prune_configs_by=PRUNE)
@triton.jit
def _softmax_bwd_kernel(grad_context_ptr, grad_weights_ptr, weights_ptr, values_ptr, lengths_ptr, kv_idx_ptr,
                        d_scores_ptr, scale, Tq, Tk, Dv, TK_BUCKET,
                        HAS_LENGTHS: tl.constexpr, HAS_KV_IDX: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr):
    """d_scores = scale * W * (dW - rowsum(W * dW)), dW = dC @ V.T + grad_weights, for positions
    below the row's length (the consumers treat the rest as 0). dC @ V.T sums over Dv in chunks
    of BLOCK_DV."""
    i, tb = tl.program_id(0), tl.program_id(1)
    kv, kv_len = kv_row_and_length(i, kv_idx_ptr, lengths_ptr, Tk, HAS_KV_IDX, HAS_LENGTHS)
    ts = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = ts < Tq
    row_base = (i * Tq + ts) * Tk
    delta = tl.zeros((BLOCK_T,), dtype=tl.float32)
    # pass 1: dW into the buffer, and its weighted row sum
    for s0 in range(0, kv_len, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        s_ok = ss < kv_len
        ok = t_ok[:, None] & s_ok[None, :]
        at = row_base[:, None] + ss[None, :]
        d_w = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
        for d0 in range(0, Dv, BLOCK_DV):
            ds = d0 + tl.arange(0, BLOCK_DV)
            d_ok = ds < Dv
            grad_context = tl.load(grad_context_ptr + (i * Tq + ts)[:, None] * Dv + ds[None, :],
                                   mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            values = tl.load(values_ptr + (kv * Tk + ss)[:, None] * Dv + ds[None, :],
                             mask=s_ok[:, None] & d_ok[None, :], other=0.0)
            d_w = mm(grad_context, tl.trans(values), d_w, BLOCK_T >= 16, PRECISION)
        d_w += tl.load(grad_weights_ptr + at, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(weights_ptr + at, mask=ok, other=0.0).to(tl.float32)
        delta += tl.sum(w * d_w, axis=1)
        tl.store(d_scores_ptr + at, d_w, mask=ok)
    tl.debug_barrier()  # pass 2 reads what other threads of this program wrote in pass 1
    for s0 in range(0, kv_len, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        ok = t_ok[:, None] & (ss < kv_len)[None, :]
        at = row_base[:, None] + ss[None, :]
        d_w = tl.load(d_scores_ptr + at, mask=ok, other=0.0)
        w = tl.load(weights_ptr + at, mask=ok, other=0.0).to(tl.float32)
        tl.store(d_scores_ptr + at, w * (d_w - delta[:, None]) * scale, mask=ok)


@triton.autotune(configs=KEY_FEATURE_CONFIGS, key=["BLOCK_T", "TQ_BUCKET", "D"])
@triton.jit
def _pt_x_kernel(p_ptr, x_ptr, lengths_ptr, kv_idx_ptr, out_ptr, Tq, Tk, D, TQ_BUCKET,
                 HAS_LENGTHS: tl.constexpr, HAS_KV_IDX: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr):
    """out[i, s, :] = sum_t p[i, t, s] * x[i, t, :] for s below the row's length, 0 beyond:
    per (query row, key block, feature block), looping over the queries."""
    i, sb, kv, kv_len, ss, s_ok, fs, f_ok = feature_program(kv_idx_ptr, lengths_ptr, Tq, Tk, D, HAS_KV_IDX, HAS_LENGTHS,
                                                            OVER_KEYS=True, BLOCK=BLOCK_S, BLOCK_F=BLOCK_F)
    acc = tl.zeros((BLOCK_S, BLOCK_F), dtype=tl.float32)
    n_queries = tl.where(sb * BLOCK_S < kv_len, Tq, 0)  # a block past the length stays 0
    for t0 in range(0, n_queries, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        t_ok = ts < Tq
        p_t = tl.load(p_ptr + (i * Tq + ts)[None, :] * Tk + ss[:, None],
                      mask=s_ok[:, None] & t_ok[None, :], other=0.0)
        x = tl.load(x_ptr + (i * Tq + ts)[:, None] * D + fs[None, :],
                    mask=t_ok[:, None] & f_ok[None, :], other=0.0)
        acc = mm(p_t, x, acc, BLOCK_T >= 16, PRECISION)
    tl.store(out_ptr + (i * Tk + ss)[:, None] * D + fs[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(ss < Tk)[:, None] & f_ok[None, :])


@triton.autotune(configs=KEY_FEATURE_CONFIGS, key=["BLOCK_T", "TK_BUCKET", "D"])
@triton.jit
def _p_y_kernel(p_ptr, y_ptr, lengths_ptr, kv_idx_ptr, out_ptr, Tq, Tk, D, TK_BUCKET,
                HAS_LENGTHS: tl.constexpr, HAS_KV_IDX: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr):
    """out[i, t, :] = sum_s p[i, t, s] * y[kv(i), s, :] over s below the row's length:
    per (query row, query block, feature block), looping over the keys."""
    i, tb, kv, kv_len, ts, t_ok, fs, f_ok = feature_program(kv_idx_ptr, lengths_ptr, Tq, Tk, D, HAS_KV_IDX, HAS_LENGTHS,
                                                            OVER_KEYS=False, BLOCK=BLOCK_T, BLOCK_F=BLOCK_F)
    acc = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
    for s0 in range(0, kv_len, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        s_ok = ss < kv_len
        p = tl.load(p_ptr + (i * Tq + ts)[:, None] * Tk + ss[None, :],
                    mask=t_ok[:, None] & s_ok[None, :], other=0.0)
        y = tl.load(y_ptr + (kv * Tk + ss)[:, None] * D + fs[None, :],
                    mask=s_ok[:, None] & f_ok[None, :], other=0.0)
        acc = mm(p, y, acc, BLOCK_T >= 16, PRECISION)
    tl.store(out_ptr + (i * Tq + ts)[:, None] * D + fs[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=t_ok[:, None] & f_ok[None, :])


# ---------------------------------------------------------------------------- launchers


class Problem(NamedTuple):
    """One attention call's sizes and its optional tensors, ready for the kernels."""
    Bq: int
    Tq: int
    Tk: int
    Dv: int
    mask: torch.Tensor      # uint8 view of the bool mask (or a placeholder)
    lengths: torch.Tensor
    kv_idx: torch.Tensor
    has_mask: bool
    has_lengths: bool
    has_kv_idx: bool
    block_t: int
    fused_values: bool  # the forward accumulates the context on chip (Dv <= MAX_FUSED_DV)


def problem(q: torch.Tensor, k: torch.Tensor, values: torch.Tensor, mask: Optional[torch.Tensor],
            lengths: Optional[torch.Tensor], kv_batch_idx: Optional[torch.Tensor], q_width: Optional[int]) -> Problem:
    """Check the contract's preconditions for the tensors all attention primitives take.
    q_width: the feature size q must share with k (None: the caller checks it)."""
    check("q", q, (None, None, q_width))
    Bq, Tq, F = q.shape
    check("k", k, (None, None, F), q.dtype, q.device)
    Bk, Tk = k.shape[0], k.shape[1]
    check("values", values, (Bk, Tk, None), q.dtype, q.device)
    if kv_batch_idx is None and Bk != Bq:
        raise ValueError(f"q has {Bq} rows but k has {Bk}: pass kv_batch_idx to map query rows to key rows")
    if kv_batch_idx is not None:
        check("kv_batch_idx", kv_batch_idx, (Bq,), torch.int64, q.device)
    if mask is not None:
        check("mask", mask, (Bk, Tk), torch.bool, q.device)
    if lengths is not None:
        check("lengths", lengths, (Bk,), torch.int64, q.device)
    placeholder = q if q.numel() else q.new_empty(1)
    return Problem(Bq, Tq, Tk, values.shape[2],
                   placeholder if mask is None else nonempty(mask.view(torch.uint8)),
                   placeholder if lengths is None else nonempty(lengths),
                   placeholder if kv_batch_idx is None else nonempty(kv_batch_idx),
                   mask is not None, lengths is not None, kv_batch_idx is not None, query_block(Tq),
                   values.shape[2] <= MAX_FUSED_DV)


def value_block(pb: Problem) -> int:
    """BLOCK_DV of the forward kernels (the whole Dv, or a placeholder when the values are left
    to the second pass)."""
    return block(pb.Dv) if pb.fused_values else 16


def key_splits(pb: Problem, device: torch.device, num_splits: Optional[int] = None):
    """(number of splits, keys per split): split the keys only when the queries alone leave
    the device idle (a decoder step), and never below MIN_SPLIT_KEYS keys per split."""
    if num_splits is None:
        programs = pb.Bq * triton.cdiv(pb.Tq, pb.block_t)
        target = num_programs_target(device)
        num_splits = 1 if programs >= target else min(triton.cdiv(target, programs),
                                                      triton.cdiv(pb.Tk, MIN_SPLIT_KEYS))
    split_len = triton.cdiv(triton.cdiv(pb.Tk, max(num_splits, 1)), 16) * 16  # whole 16-key blocks
    return triton.cdiv(pb.Tk, split_len), split_len


def empty_forward(q: torch.Tensor, pb: Problem):
    """Results for a call with no work: no queries, no rows or no keys."""
    context = q.new_zeros(pb.Bq, pb.Tq, pb.Dv)
    weights = q.new_zeros(pb.Bq, pb.Tq, pb.Tk)
    lse = torch.full((pb.Bq, pb.Tq), float("-inf"), dtype=torch.float32, device=q.device)
    return context, weights, lse


def forward_buffers(q: torch.Tensor, pb: Problem, num_splits: int):
    """Raw float32 scores and the per-split online-softmax state (m, l, acc)."""
    rows = pb.Bq * pb.Tq
    f32 = dict(dtype=torch.float32, device=q.device)
    acc = torch.empty(rows, num_splits, max(pb.Dv, 1), **f32) if pb.fused_values else torch.empty(1, **f32)
    return (torch.empty(rows, pb.Tk, **f32), torch.empty(rows, num_splits, **f32),
            torch.empty(rows, num_splits, **f32), acc)


def combine(q: torch.Tensor, values: torch.Tensor, pb: Problem, num_splits: int, scores, m, l, acc):
    """(context, weights, lse) from the forward kernel's splits; values wider than the forward
    kernels take go through the second pass (context = float32 weights @ values)."""
    context = q.new_empty(pb.Bq, pb.Tq, pb.Dv)
    weights = q.new_empty(pb.Bq, pb.Tq, pb.Tk)
    lse = torch.empty(pb.Bq, pb.Tq, dtype=torch.float32, device=q.device)
    _combine_kernel[(pb.Bq * pb.Tq,)](
        m, l, acc, scores, pb.lengths, pb.kv_idx, nonempty(context), weights, lse, pb.Tq, pb.Tk, pb.Dv,
        num_splits, HAS_LENGTHS=pb.has_lengths, HAS_KV_IDX=pb.has_kv_idx, FUSED_VALUES=pb.fused_values,
        BLOCK_SPLITS=block(num_splits, 1), BLOCK_D=min(block(pb.Dv), 128),
        BLOCK_K=min(block(pb.Tk), 256 if not INTERPRETED else 16))
    if not pb.fused_values:
        context = p_y(scores, values, pb, q.dtype, dot_precision())
    return context, weights, lse


def softmax_bwd(grad_context, grad_weights, weights, values, pb: Problem, scale: float, precision: str):
    """dS as float32 (Bq*Tq, Tk); positions at or past a row's length are left unwritten."""
    d_scores = torch.empty(pb.Bq * pb.Tq, pb.Tk, dtype=torch.float32, device=weights.device)
    grid = (pb.Bq, triton.cdiv(pb.Tq, pb.block_t))
    _softmax_bwd_kernel[grid](
        nonempty(grad_context), grad_weights, weights, nonempty(values),
        pb.lengths, pb.kv_idx, d_scores, float(scale), pb.Tq, pb.Tk, pb.Dv, block(pb.Tk),
        HAS_LENGTHS=pb.has_lengths, HAS_KV_IDX=pb.has_kv_idx, PRECISION=precision,
        BLOCK_T=pb.block_t, BLOCK_DV=min(block(pb.Dv), MAX_DV_CHUNK))
    return d_scores


def pt_x(p: torch.Tensor, x: torch.Tensor, pb: Problem, out_dtype: torch.dtype, precision: str) -> torch.Tensor:
    """(Bq, Tk, D): p (Bq*Tq, Tk) transposed times x (Bq, Tq, D), per query row."""
    D = x.shape[-1]
    out = torch.empty(pb.Bq, pb.Tk, D, dtype=out_dtype, device=p.device)
    if out.numel():
        grid = lambda meta: (pb.Bq, triton.cdiv(pb.Tk, meta["BLOCK_S"]), triton.cdiv(D, meta["BLOCK_F"]))  # noqa: E731
        _pt_x_kernel[grid](p, x, pb.lengths, pb.kv_idx, out, pb.Tq, pb.Tk, D, block(pb.Tq),
                           HAS_LENGTHS=pb.has_lengths, HAS_KV_IDX=pb.has_kv_idx, PRECISION=precision,
                           BLOCK_T=pb.block_t)
    return out


def p_y(p: torch.Tensor, y: torch.Tensor, pb: Problem, out_dtype: torch.dtype, precision: str) -> torch.Tensor:
    """(Bq, Tq, D): p (Bq*Tq, Tk) times the key-side y (Bk, Tk, D) of each query row."""
    D = y.shape[-1]
    out = torch.empty(pb.Bq, pb.Tq, D, dtype=out_dtype, device=p.device)
    if out.numel():
        grid = lambda meta: (pb.Bq, triton.cdiv(pb.Tq, pb.block_t), triton.cdiv(D, meta["BLOCK_F"]))  # noqa: E731
        _p_y_kernel[grid](p, y, pb.lengths, pb.kv_idx, out, pb.Tq, pb.Tk, D, block(pb.Tk),
                          HAS_LENGTHS=pb.has_lengths, HAS_KV_IDX=pb.has_kv_idx, PRECISION=precision,
                          BLOCK_T=pb.block_t)
    return out


def check_backward(grad_context, grad_weights, weights, lse, q, pb: Problem) -> None:
    check("grad_context", grad_context, (pb.Bq, pb.Tq, pb.Dv), q.dtype, q.device)
    check("grad_weights", grad_weights, (pb.Bq, pb.Tq, pb.Tk), q.dtype, q.device)
    check("weights", weights, (pb.Bq, pb.Tq, pb.Tk), q.dtype, q.device)
    check("lse", lse, (pb.Bq, pb.Tq), torch.float32, q.device)
