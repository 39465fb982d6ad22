"""LSTM cell, one time step: the recurrent GEMM h @ w_hh.T on tensor blocks with the gate math
as its epilogue (forward), and one fused pointwise kernel (backward). Contract and math:
fused_s2s.backends.torch_backend.lstm_cell_fwd / lstm_cell_bwd. With projections h is (B, P) (the GEMM's
depth K = P) and h_new = o * tanh(c_new) comes out unprojected: a program holds a block of
hidden units, not the whole row the projection reads, so the caller projects it."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import CELL_CONFIGS, POINTWISE_BLOCK, block, check, dot_precision, gate_matmul, sigmoid, tanh


@triton.autotune(configs=CELL_CONFIGS, key=["B_BUCKET", "H", "K"])
@triton.jit
def _lstm_cell_fwd_kernel(gx_ptr, h_ptr, c_ptr, w_ptr, b_ptr, h_new_ptr, c_new_ptr, saved_ptr, B, H, K, B_BUCKET,
                          HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok, col_ok = rows < B, cols < H
    acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        h_tile = tl.load(h_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc_i = gate_matmul(acc_i, h_tile, w_ptr, 0, cols, ks, col_ok, k_ok, H, K, PRECISION)
        acc_f = gate_matmul(acc_f, h_tile, w_ptr, 1, cols, ks, col_ok, k_ok, H, K, PRECISION)
        acc_g = gate_matmul(acc_g, h_tile, w_ptr, 2, cols, ks, col_ok, k_ok, H, K, PRECISION)
        acc_o = gate_matmul(acc_o, h_tile, w_ptr, 3, cols, ks, col_ok, k_ok, H, K, PRECISION)
    if HAS_BIAS:
        acc_i += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_f += tl.load(b_ptr + H + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(b_ptr + 2 * H + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_o += tl.load(b_ptr + 3 * H + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # epilogue: the gates of this (batch block, hidden block)
    ok = row_ok[:, None] & col_ok[None, :]
    gx = gx_ptr + rows[:, None] * (4 * H) + cols[None, :]
    i = sigmoid(tl.load(gx, mask=ok, other=0.0).to(tl.float32) + acc_i)
    f = sigmoid(tl.load(gx + H, mask=ok, other=0.0).to(tl.float32) + acc_f)
    g = tanh(tl.load(gx + 2 * H, mask=ok, other=0.0).to(tl.float32) + acc_g)
    o = sigmoid(tl.load(gx + 3 * H, mask=ok, other=0.0).to(tl.float32) + acc_o)
    state = rows[:, None] * H + cols[None, :]
    c = tl.load(c_ptr + state, mask=ok, other=0.0).to(tl.float32)
    c_new = f * c + i * g
    h_new = o * tanh(c_new)
    out_type = h_new_ptr.dtype.element_ty
    tl.store(h_new_ptr + state, h_new.to(out_type), mask=ok)
    tl.store(c_new_ptr + state, c_new.to(c_new_ptr.dtype.element_ty), mask=ok)
    saved = saved_ptr + rows[:, None] * (4 * H) + cols[None, :]
    tl.store(saved, i.to(out_type), mask=ok)
    tl.store(saved + H, f.to(out_type), mask=ok)
    tl.store(saved + 2 * H, g.to(out_type), mask=ok)
    tl.store(saved + 3 * H, o.to(out_type), mask=ok)


@triton.jit
def _lstm_cell_bwd_kernel(grad_h_new_ptr, grad_c_new_ptr, c_ptr, c_new_ptr, saved_ptr, grad_gates_ptr, grad_c_ptr,
                          H, N, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < N
    row, col = idx // H, idx % H
    saved = saved_ptr + row * (4 * H) + col
    i = tl.load(saved, mask=ok, other=0.0).to(tl.float32)
    f = tl.load(saved + H, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(saved + 2 * H, mask=ok, other=0.0).to(tl.float32)
    o = tl.load(saved + 3 * H, mask=ok, other=0.0).to(tl.float32)
    tanh_c = tanh(tl.load(c_new_ptr + idx, mask=ok, other=0.0).to(tl.float32))  # recomputed, not saved
    grad_h = tl.load(grad_h_new_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    d_c = tl.load(grad_c_new_ptr + idx, mask=ok, other=0.0).to(tl.float32) + grad_h * o * (1.0 - tanh_c * tanh_c)
    c = tl.load(c_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    out_type = grad_gates_ptr.dtype.element_ty
    gates = grad_gates_ptr + row * (4 * H) + col
    tl.store(gates, (d_c * g * i * (1.0 - i)).to(out_type), mask=ok)
    tl.store(gates + H, (d_c * c * f * (1.0 - f)).to(out_type), mask=ok)
    tl.store(gates + 2 * H, (d_c * i * (1.0 - g * g)).to(out_type), mask=ok)
    tl.store(gates + 3 * H, (grad_h * tanh_c * o * (1.0 - o)).to(out_type), mask=ok)
    tl.store(grad_c_ptr + idx, (d_c * f).to(grad_c_ptr.dtype.element_ty), mask=ok)


def lstm_cell_fwd(gx: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_hh: torch.Tensor,
                  b_hh: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check("h", h, (None, None))
    check("c", c, (h.shape[0], None), h.dtype, h.device)
    (B, P), H = h.shape, c.shape[1]  # P = H, or the LSTM's proj_size
    check("gx", gx, (B, 4 * H), h.dtype, h.device)
    check("w_hh", w_hh, (4 * H, P), h.dtype, h.device)
    if b_hh is not None:
        check("b_hh", b_hh, (4 * H,), h.dtype, h.device)
    h_new, c_new, saved = torch.empty_like(c), torch.empty_like(c), h.new_empty(B, 4 * H)
    if c.numel() == 0:
        return h_new, c_new, saved
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(H, meta["BLOCK_H"]))  # noqa: E731
    _lstm_cell_fwd_kernel[grid](gx, h, c, w_hh, w_hh if b_hh is None else b_hh, h_new, c_new, saved, B, H, P, block(B),
                                HAS_BIAS=b_hh is not None, PRECISION=dot_precision())
    return h_new, c_new, saved


def lstm_cell_bwd(grad_h_new: torch.Tensor, grad_c_new: torch.Tensor, c: torch.Tensor, c_new: torch.Tensor,
                  saved: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    check("c", c, (None, None))
    B, H = c.shape
    check("grad_h_new", grad_h_new, (B, H), c.dtype, c.device)
    check("grad_c_new", grad_c_new, (B, H), c.dtype, c.device)
    check("c_new", c_new, (B, H), c.dtype, c.device)
    check("saved", saved, (B, 4 * H), c.dtype, c.device)
    grad_gates, grad_c = c.new_empty(B, 4 * H), torch.empty_like(c)
    if c.numel() == 0:
        return grad_gates, grad_c
    _lstm_cell_bwd_kernel[(triton.cdiv(c.numel(), POINTWISE_BLOCK),)](
        grad_h_new, grad_c_new, c, c_new, saved, grad_gates, grad_c, H, c.numel(), BLOCK=POINTWISE_BLOCK)
    return grad_gates, grad_c
