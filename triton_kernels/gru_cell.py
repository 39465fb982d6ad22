"""GRU cell, one time step: the recurrent GEMM h @ w_hh.T on tensor blocks with the gate math
as its epilogue (forward), and one fused pointwise kernel (backward). Contract and math:
fused_s2s.backends.torch_backend.gru_cell_fwd / gru_cell_bwd."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import CELL_CONFIGS, POINTWISE_BLOCK, block, check, dot_precision, gate_matmul, sigmoid, tanh


@triton.autotune(configs=CELL_CONFIGS, key=["B_BUCKET", "H"])
@triton.jit
def _gru_cell_fwd_kernel(gx_ptr, h_ptr, w_ptr, b_ptr, h_new_ptr, saved_ptr, B, H, B_BUCKET,
                         HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok, col_ok = rows < B, cols < H
    acc_r = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_n = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        h_tile = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc_r = gate_matmul(acc_r, h_tile, w_ptr, 0, cols, ks, col_ok, k_ok, H, H, PRECISION)
        acc_z = gate_matmul(acc_z, h_tile, w_ptr, 1, cols, ks, col_ok, k_ok, H, H, PRECISION)
        acc_n = gate_matmul(acc_n, h_tile, w_ptr, 2, cols, ks, col_ok, k_ok, H, H, PRECISION)
    if HAS_BIAS:
        acc_r += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_z += tl.load(b_ptr + H + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_n += tl.load(b_ptr + 2 * H + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # epilogue: the gates of this (batch block, hidden block)
    ok = row_ok[:, None] & col_ok[None, :]
    gx = gx_ptr + rows[:, None] * (3 * H) + cols[None, :]
    r = sigmoid(tl.load(gx, mask=ok, other=0.0).to(tl.float32) + acc_r)
    z = sigmoid(tl.load(gx + H, mask=ok, other=0.0).to(tl.float32) + acc_z)
    n = tanh(tl.load(gx + 2 * H, mask=ok, other=0.0).to(tl.float32) + r * acc_n)
    h = tl.load(h_ptr + rows[:, None] * H + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    h_new = (1.0 - z) * n + z * h
    out_type = h_new_ptr.dtype.element_ty
    tl.store(h_new_ptr + rows[:, None] * H + cols[None, :], h_new.to(out_type), mask=ok)
    saved = saved_ptr + rows[:, None] * (4 * H) + cols[None, :]
    tl.store(saved, r.to(out_type), mask=ok)
    tl.store(saved + H, z.to(out_type), mask=ok)
    tl.store(saved + 2 * H, n.to(out_type), mask=ok)
    tl.store(saved + 3 * H, acc_n.to(out_type), mask=ok)


@triton.jit
def _gru_cell_bwd_kernel(grad_h_new_ptr, h_ptr, saved_ptr, grad_gx_ptr, grad_gh_ptr, grad_h_direct_ptr,
                         H, N, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < N
    row, col = idx // H, idx % H
    g = tl.load(grad_h_new_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    saved = saved_ptr + row * (4 * H) + col
    r = tl.load(saved, mask=ok, other=0.0).to(tl.float32)
    z = tl.load(saved + H, mask=ok, other=0.0).to(tl.float32)
    n = tl.load(saved + 2 * H, mask=ok, other=0.0).to(tl.float32)
    gh_n = tl.load(saved + 3 * H, mask=ok, other=0.0).to(tl.float32)
    d_n = g * (1.0 - z) * (1.0 - n * n)        # through n = tanh(.)
    d_z = g * (h - n) * z * (1.0 - z)          # through z = sigmoid(.)
    d_r = d_n * gh_n * r * (1.0 - r)           # through r = sigmoid(.), r multiplies gh_n
    out_type = grad_gx_ptr.dtype.element_ty
    gates = row * (3 * H) + col
    tl.store(grad_gx_ptr + gates, d_r.to(out_type), mask=ok)
    tl.store(grad_gx_ptr + gates + H, d_z.to(out_type), mask=ok)
    tl.store(grad_gx_ptr + gates + 2 * H, d_n.to(out_type), mask=ok)
    tl.store(grad_gh_ptr + gates, d_r.to(out_type), mask=ok)
    tl.store(grad_gh_ptr + gates + H, d_z.to(out_type), mask=ok)
    tl.store(grad_gh_ptr + gates + 2 * H, (d_n * r).to(out_type), mask=ok)
    tl.store(grad_h_direct_ptr + idx, (g * z).to(out_type), mask=ok)


def gru_cell_fwd(gx: torch.Tensor, h: torch.Tensor, w_hh: torch.Tensor,
                 b_hh: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    check("h", h, (None, None))
    B, H = h.shape
    check("gx", gx, (B, 3 * H), h.dtype, h.device)
    check("w_hh", w_hh, (3 * H, H), h.dtype, h.device)
    if b_hh is not None:
        check("b_hh", b_hh, (3 * H,), h.dtype, h.device)
    h_new, saved = torch.empty_like(h), h.new_empty(B, 4 * H)
    if h.numel() == 0:
        return h_new, saved
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(H, meta["BLOCK_H"]))  # noqa: E731
    _gru_cell_fwd_kernel[grid](gx, h, w_hh, w_hh if b_hh is None else b_hh, h_new, saved, B, H, block(B),
                               HAS_BIAS=b_hh is not None, PRECISION=dot_precision())
    return h_new, saved


def gru_cell_bwd(grad_h_new: torch.Tensor, h: torch.Tensor,
                 saved: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check("h", h, (None, None))
    B, H = h.shape
    check("grad_h_new", grad_h_new, (B, H), h.dtype, h.device)
    check("saved", saved, (B, 4 * H), h.dtype, h.device)
    grad_gx, grad_gh, grad_h_direct = h.new_empty(B, 3 * H), h.new_empty(B, 3 * H), torch.empty_like(h)
    if h.numel() == 0:
        return grad_gx, grad_gh, grad_h_direct
    _gru_cell_bwd_kernel[(triton.cdiv(h.numel(), POINTWISE_BLOCK),)](
        grad_h_new, h, saved, grad_gx, grad_gh, grad_h_direct, H, h.numel(), BLOCK=POINTWISE_BLOCK)
    return grad_gx, grad_gh, grad_h_direct
