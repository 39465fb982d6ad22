"""Persistent whole-sequence GRU/LSTM layers for small hidden sizes (H <= 64): the time loop
runs inside one kernel and each program owns a block of 16 batch rows for the whole sequence,
with every gate's W_hh block held on chip from the first step to the last. A program computes
all hidden units of its rows, so the state never leaves it between steps: no grid barrier and
no exchange through memory. One launch runs a whole layer instead of one (or three) per step;
the grid's second axis is the direction, so both directions of a bidirectional layer run at
once (tensors stacked along a leading direction dimension, see the launchers).

Same layout, arguments and outputs as the CUDA persistent kernels (fused_s2s._C
`persistent_{gru,lstm}_{fwd,bwd}`, documented in csrc/cuda/persistent_rnn.h), so the autograd
Functions of fused_s2s.backends.persistent_autograd drive either: padded time-major gx (T,B,G*H), h0/c0
(B,H), w_hh (G*H,H), b_hh (G*H) or None, lengths (B,) int64 or None (row b runs steps
t < lengths[b], a reversed row from its own last step); an inactive row keeps its state and
writes zeros to out/saved/c_seq. GRU saved = [r, z, n, gh_n], LSTM saved = activated [i, f, g, o]
and c_seq = the cell state after each step. Math in float32; h is rounded to the tensor dtype
every step (what the per-step path stores), c and the carried gradients stay float32.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, block, check, dot_precision, mm, sigmoid, tanh, unsupported_reason

MAX_HIDDEN = 64
"""The largest hidden size these kernels take: every gate's H x H block of W_hh stays in the
program's registers for the whole sequence (LSTM at H = 64: 64 KB in float32)."""
BLOCK_B = 16  # batch rows per program (the MMA tile height)


def persistent_reason(device: torch.device, dtype: torch.dtype, hidden: int, cell: str = "gru",
                      backward: bool = False) -> Optional[str]:
    """None if a `cell` layer of `hidden` units runs on these kernels here (forward, and the
    backward too when `backward`), else why not."""
    if hidden > MAX_HIDDEN:
        return f"the Triton persistent kernels take hidden sizes up to {MAX_HIDDEN}, got {hidden}"
    reason = unsupported_reason("gru_cell", device, dtype)
    if reason is not None or torch.device(device).type != "cuda":
        return reason
    reason = broken_triton_reason(cell, backward, dtype, hidden)
    if reason is not None:
        return reason
    is_lstm = cell == "lstm"
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    for kernel in (_forward_kernel, _backward_kernel) if backward else (_forward_kernel,):
        try:
            limit, need = _shared_memory_limit(index), _shared_memory(kernel, is_lstm, dtype, block(hidden), index)
        except Exception:  # noqa: BLE001 - a precheck only: a kernel that cannot compile says why at launch
            return None
        if need > limit:
            name = "backward" if kernel is _backward_kernel else "forward"
            return (f"the Triton persistent {cell.upper()} {name} at hidden size {hidden} in {dtype} needs {need} "
                    f"bytes of shared memory, the device allows {limit}")
    return None


BROKEN_TRITON = ("3.9.0",)
"""Triton versions that abort the process (not raise) compiling a variant: refused up front."""


def broken_triton_reason(cell: str, backward: bool, dtype: torch.dtype, hidden: int) -> Optional[str]:
    """Why this Triton cannot compile the layer's kernels, or None: Triton 3.9.0 hits an LLVM
    assertion on the float32 LSTM backward with hidden blocks of 32 or 64 (3.6-3.8 compile it)."""
    if backward and cell == "lstm" and dtype == torch.float32 and block(hidden) >= 32 \
            and triton.__version__ in BROKEN_TRITON:
        return (f"Triton {triton.__version__} aborts the process (an LLVM assertion) compiling the persistent "
                f"LSTM backward in float32 for hidden sizes above 16; Triton 3.6-3.8 compile it")
    return None


def _shared_memory_limit(index: int) -> int:
    """The most shared memory a block may opt in to on CUDA device `index`."""
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


@functools.lru_cache(maxsize=None)
def _shared_memory(kernel, is_lstm: bool, dtype: torch.dtype, block_h: int, index: int) -> int:
    """Shared memory of `kernel` compiled for device `index` as the launchers launch it (the
    compiled kernel is cached, so the launch that follows does not compile it again)."""
    with torch.cuda.device(index):
        args = [torch.int64 if name == "len_ptr" else dtype if name.endswith("_ptr") else 16
                for name in kernel.arg_names[:kernel.arg_names.index("REVERSE") + 1]]
        flags = {name: True for name in ("HAS_BIAS", "HAS_LENGTHS", "SAVE", "HAS_GRAD_OUT", "HAS_GRAD_H_N",
                                         "HAS_GRAD_C_N") if name in kernel.arg_names}
        compiled = kernel.warmup(*args, IS_LSTM=is_lstm, **flags, **_meta(block_h), grid=(1,))
    return compiled.metadata.shared


def _meta(block_h: int) -> dict:
    """The launch's block sizes and warps for a hidden block of block_h."""
    return dict(PRECISION=dot_precision(), BLOCK_B=BLOCK_B, BLOCK_H=block_h, num_warps=4 if block_h <= 32 else 8)


@triton.jit
def _gate_blocks(w_ptr, H, cols, IS_LSTM: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Every gate's H x H block of w_hh as a (k, j) tile, zero outside H: w[gate*H + j, k] (for
    h @ W^T) when TRANSPOSED, else w[gate*H + k, j] (for dgh @ W). GRU's three gates come back
    with the last one repeated in the fourth place."""
    ok = (cols < H)[:, None] & (cols < H)[None, :]
    if TRANSPOSED:
        at = (cols * H)[None, :] + cols[:, None]
    else:
        at = (cols * H)[:, None] + cols[None, :]
    w0 = tl.load(w_ptr + at, mask=ok, other=0.0)
    w1 = tl.load(w_ptr + H * H + at, mask=ok, other=0.0)
    w2 = tl.load(w_ptr + 2 * H * H + at, mask=ok, other=0.0)
    w3 = w2
    if IS_LSTM:
        w3 = tl.load(w_ptr + 3 * H * H + at, mask=ok, other=0.0)
    return w0, w1, w2, w3


@triton.jit
def _program_tile(len_ptr, T, B, H, HAS_LENGTHS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's batch rows and the hidden columns: (rows, cols, ok (rows x cols in
    range), state offsets into a (B, H) tensor, each row's length clamped to [0, T] (T without
    lengths): a reversed row's first step is then t = len - 1 <= T - 1, never one past the end)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < B
    ok = row_ok[:, None] & (cols < H)[None, :]
    lens = tl.full((BLOCK_B,), T, tl.int64)
    if HAS_LENGTHS:
        lens = tl.minimum(tl.maximum(tl.load(len_ptr + rows, mask=row_ok, other=0), 0), T)
    return rows, cols, ok, rows[:, None] * H + cols[None, :], lens


@triton.jit
def _direction(REVERSE):
    """(d, whether direction d runs last step first): program axis 1 is the direction, and the
    second one of a bidirectional pair runs opposite to the first (REVERSE: the first's)."""
    d = tl.program_id(1).to(tl.int64)
    return d, (d + REVERSE) % 2 == 1


@triton.jit
def _forward_kernel(gx_ptr, h0_ptr, c0_ptr, w_ptr, b_ptr, len_ptr, out_ptr, h_n_ptr, c_n_ptr, saved_ptr, c_seq_ptr,
                    T, B, H, REVERSE, IS_LSTM: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_LENGTHS: tl.constexpr, SAVE: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    G: tl.constexpr = 4 if IS_LSTM else 3
    rows, cols, ok, state, lens = _program_tile(len_ptr, T, B, H, HAS_LENGTHS, BLOCK_B, BLOCK_H)
    # the direction (program axis 1): its own slice of every per-direction tensor
    d, rev = _direction(REVERSE)
    gx_ptr += d * T * B * G * H
    w_ptr += d * G * H * H
    b_ptr += d * G * H
    h0_ptr += d * B * H
    c0_ptr += d * B * H
    h_n_ptr += d * B * H
    c_n_ptr += d * B * H
    out_ptr += d * T * B * H
    c_seq_ptr += d * T * B * H
    saved_ptr += d * T * B * 4 * H
    col_ok = cols < H
    dt = out_ptr.dtype.element_ty
    w0, w1, w2, w3 = _gate_blocks(w_ptr, H, cols, IS_LSTM, True)  # on chip for the whole sequence
    zero = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    b0, b1, b2, b3 = zero, zero, zero, zero
    if HAS_BIAS:
        b0 = zero + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        b1 = zero + tl.load(b_ptr + H + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        b2 = zero + tl.load(b_ptr + 2 * H + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if IS_LSTM:
            b3 = zero + tl.load(b_ptr + 3 * H + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    h = tl.load(h0_ptr + state, mask=ok, other=0.0).to(tl.float32)
    c = zero
    if IS_LSTM:
        c = tl.load(c0_ptr + state, mask=ok, other=0.0).to(tl.float32)
    for s in range(0, T):
        t = tl.where(rev, T - 1 - s, s)
        active = ok & (t < lens)[:, None]
        hq = h.to(dt)
        gx = gx_ptr + (t * B + rows)[:, None] * (G * H) + cols[None, :]
        a0 = mm(hq, w0, b0, True, PRECISION)
        a1 = mm(hq, w1, b1, True, PRECISION)
        a2 = mm(hq, w2, b2, True, PRECISION)
        x0 = tl.load(gx, mask=active, other=0.0).to(tl.float32)
        x1 = tl.load(gx + H, mask=active, other=0.0).to(tl.float32)
        x2 = tl.load(gx + 2 * H, mask=active, other=0.0).to(tl.float32)
        if IS_LSTM:
            a3 = mm(hq, w3, b3, True, PRECISION)
            x3 = tl.load(gx + 3 * H, mask=active, other=0.0).to(tl.float32)
            i, f, g, o = sigmoid(x0 + a0), sigmoid(x1 + a1), tanh(x2 + a2), sigmoid(x3 + a3)
            c_new = f * c + i * g
            h_new = o * tanh(c_new)
            c = tl.where(active, c_new, c)
            saved_parts = (i, f, g, o)
            if SAVE:
                tl.store(c_seq_ptr + t * B * H + state, tl.where(active, c_new, 0.0).to(dt), mask=ok)
        else:
            r, z = sigmoid(x0 + a0), sigmoid(x1 + a1)
            n = tanh(x2 + r * a2)
            h_new = (1.0 - z) * n + z * h
            saved_parts = (r, z, n, a2)
        tl.store(out_ptr + t * B * H + state, tl.where(active, h_new, 0.0).to(dt), mask=ok)
        if SAVE:
            saved = saved_ptr + (t * B + rows)[:, None] * (4 * H) + cols[None, :]
            for q in tl.static_range(4):
                tl.store(saved + q * H, tl.where(active, saved_parts[q], 0.0).to(dt), mask=ok)
        h = tl.where(active, h_new.to(dt).to(tl.float32), h)
    tl.store(h_n_ptr + state, h.to(dt), mask=ok)
    if IS_LSTM:
        tl.store(c_n_ptr + state, c.to(dt), mask=ok)


@triton.jit
def _backward_kernel(grad_out_ptr, grad_h_n_ptr, grad_c_n_ptr, out_ptr, h0_ptr, c0_ptr, c_seq_ptr, saved_ptr,
                     w_ptr, len_ptr, grad_gx_ptr, grad_gh_ptr, grad_h0_ptr, grad_c0_ptr, T, B, H, REVERSE,
                     IS_LSTM: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                     HAS_GRAD_OUT: tl.constexpr, HAS_GRAD_H_N: tl.constexpr, HAS_GRAD_C_N: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    G: tl.constexpr = 4 if IS_LSTM else 3
    rows, cols, ok, state, lens = _program_tile(len_ptr, T, B, H, HAS_LENGTHS, BLOCK_B, BLOCK_H)
    d, rev = _direction(REVERSE)
    grad_out_ptr += d * T * B * H
    out_ptr += d * T * B * H
    c_seq_ptr += d * T * B * H
    saved_ptr += d * T * B * 4 * H
    w_ptr += d * G * H * H
    grad_gx_ptr += d * T * B * G * H
    grad_gh_ptr += d * T * B * G * H
    grad_h_n_ptr += d * B * H
    grad_c_n_ptr += d * B * H
    h0_ptr += d * B * H
    c0_ptr += d * B * H
    grad_h0_ptr += d * B * H
    grad_c0_ptr += d * B * H
    dt = grad_gx_ptr.dtype.element_ty
    w0, w1, w2, w3 = _gate_blocks(w_ptr, H, cols, IS_LSTM, False)  # dh_prev = sum of dgh_gate @ W_gate
    zero = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    dh, dc = zero, zero
    if HAS_GRAD_H_N:
        dh = tl.load(grad_h_n_ptr + state, mask=ok, other=0.0).to(tl.float32)
    if HAS_GRAD_C_N:
        dc = tl.load(grad_c_n_ptr + state, mask=ok, other=0.0).to(tl.float32)
    for s in range(0, T):
        t = tl.where(rev, s, T - 1 - s)  # the forward's steps, last first
        active = ok & (t < lens)[:, None]
        # the step before t in the forward's order, or the initial state at a row's first step
        t_prev = tl.where(rev, t + 1, t - 1)
        first = tl.where(rev, t == lens - 1, t == 0)[:, None]
        from_seq = active & ~first
        g = dh
        if HAS_GRAD_OUT:
            g += tl.load(grad_out_ptr + t * B * H + state, mask=active, other=0.0).to(tl.float32)
        g = tl.where(active, g, 0.0)
        saved = saved_ptr + (t * B + rows)[:, None] * (4 * H) + cols[None, :]
        s0 = tl.load(saved, mask=ok, other=0.0).to(tl.float32)
        s1 = tl.load(saved + H, mask=ok, other=0.0).to(tl.float32)
        s2 = tl.load(saved + 2 * H, mask=ok, other=0.0).to(tl.float32)
        s3 = tl.load(saved + 3 * H, mask=ok, other=0.0).to(tl.float32)
        gates = (t * B + rows)[:, None] * (G * H) + cols[None, :]
        if IS_LSTM:
            i, f, gg, o = s0, s1, s2, s3
            c_new = tl.load(c_seq_ptr + t * B * H + state, mask=ok, other=0.0).to(tl.float32)
            c_prev = tl.where(from_seq, tl.load(c_seq_ptr + t_prev * B * H + state, mask=from_seq, other=0.0),
                              tl.load(c0_ptr + state, mask=ok, other=0.0)).to(tl.float32)
            tc = tanh(c_new)
            d_o = g * tc * o * (1.0 - o)
            dct = dc + g * o * (1.0 - tc * tc)
            d_i = dct * gg * i * (1.0 - i)
            d_f = dct * c_prev * f * (1.0 - f)
            d_g = dct * i * (1.0 - gg * gg)
            parts = (d_i.to(dt), d_f.to(dt), d_g.to(dt), d_o.to(dt))
            for q in tl.static_range(4):
                tl.store(grad_gx_ptr + gates + q * H, parts[q], mask=ok)
            dh_new = mm(parts[0], w0, zero, True, PRECISION)
            dh_new = mm(parts[1], w1, dh_new, True, PRECISION)
            dh_new = mm(parts[2], w2, dh_new, True, PRECISION)
            dh_new = mm(parts[3], w3, dh_new, True, PRECISION)
            dc = tl.where(active, dct * f, dc)
        else:
            r, z, n, gh_n = s0, s1, s2, s3
            h_prev = tl.where(from_seq, tl.load(out_ptr + t_prev * B * H + state, mask=from_seq, other=0.0),
                              tl.load(h0_ptr + state, mask=ok, other=0.0)).to(tl.float32)
            d_n = g * (1.0 - z) * (1.0 - n * n)
            d_z = g * (h_prev - n) * z * (1.0 - z)
            d_r = d_n * gh_n * r * (1.0 - r)
            gx_parts = (d_r.to(dt), d_z.to(dt), d_n.to(dt))
            gh_parts = (gx_parts[0], gx_parts[1], (d_n * r).to(dt))
            for q in tl.static_range(3):
                tl.store(grad_gx_ptr + gates + q * H, gx_parts[q], mask=ok)
                tl.store(grad_gh_ptr + gates + q * H, gh_parts[q], mask=ok)
            dh_new = mm(gh_parts[0], w0, (g * z).to(dt).to(tl.float32), True, PRECISION)
            dh_new = mm(gh_parts[1], w1, dh_new, True, PRECISION)
            dh_new = mm(gh_parts[2], w2, dh_new, True, PRECISION)
        dh = tl.where(active, dh_new, dh)
    tl.store(grad_h0_ptr + state, dh.to(dt), mask=ok)
    if IS_LSTM:
        tl.store(grad_c0_ptr + state, dc.to(dt), mask=ok)


# --------------------------------------------------------------------------------- launchers
# Every per-direction tensor may carry a leading direction dimension D (2: both directions of a
# bidirectional layer in one launch, the second running opposite to `reverse`); lengths are
# shared. Without it, D = 1.


class _Layer:
    """The checks every launcher makes, and the sizes: D, T, B, H and `lead` ((D,) or ())."""

    def __init__(self, op: str, first: torch.Tensor, first_name: str, seq: torch.Tensor, seq_name: str,
                 seq_width: int, w_hh: torch.Tensor, gates: int, lengths: Optional[torch.Tensor]) -> None:
        if not isinstance(first, torch.Tensor) or first.dim() not in (2, 3):
            raise ValueError(f"{op}: {first_name} must be a (B, H) or (D, B, H) tensor, got "
                             f"{getattr(first, 'shape', type(first).__name__)}")
        self.lead = tuple(first.shape[:-2])
        self.D = self.lead[0] if self.lead else 1
        self.B, self.H = first.shape[-2:]
        if self.D not in (1, 2):
            raise ValueError(f"{op}: the direction dimension of {first_name} must be 1 or 2, got {self.D}")
        if first.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{op}: {first_name} must be float32/float16/bfloat16, got {first.dtype}")
        reason = persistent_reason(first.device, first.dtype, self.H, op.split("_")[1], op.endswith("_bwd"))
        if reason is not None:
            raise ValueError(f"{op}: {reason}")
        self.like = first
        self.check(first_name, first, self.B, self.H)
        self.T = seq.shape[-3] if isinstance(seq, torch.Tensor) and seq.dim() == len(self.lead) + 3 else -1
        self.check(seq_name, seq, self.T, self.B, seq_width * self.H)
        self.check("w_hh", w_hh, gates * self.H, self.H)
        if lengths is not None:
            check("lengths", lengths, (self.B,), torch.int64, first.device)

    def check(self, name: str, t: torch.Tensor, *shape: int) -> None:
        """t: a per-direction tensor of `shape`, in the layer's dtype and on its device."""
        check(name, t, self.lead + tuple(None if n < 0 else n for n in shape), self.like.dtype, self.like.device)

    def empty(self, *shape: int) -> torch.Tensor:
        return self.like.new_empty(self.lead + shape)

    def launch(self, kernel, *args, reverse: bool, **meta) -> None:
        if self.T == 0 or self.B == 0:
            return
        kernel[(triton.cdiv(self.B, BLOCK_B), self.D)](
            *args, self.T, self.B, self.H, int(bool(reverse)), **meta, **_meta(block(self.H)))


def _or(t: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    """A pointer argument for an optional tensor (the kernel never reads it when absent)."""
    return fallback if t is None else t


def persistent_gru_fwd(gx, h0, w_hh, b_hh, lengths, reverse: bool, save: bool, *knobs):
    """-> (out (T,B,H), h_n (B,H), saved (T,B,4H) or None). `knobs` (the CUDA kernels' tiling
    knobs) are accepted and unused."""
    L = _Layer("persistent_gru_fwd", h0, "h0", gx, "gx", 3, w_hh, 3, lengths)
    if b_hh is not None:
        L.check("b_hh", b_hh, 3 * L.H)
    out, h_n = L.empty(L.T, L.B, L.H), h0.clone()
    saved = L.empty(L.T, L.B, 4 * L.H) if save else None
    L.launch(_forward_kernel, gx, h0, h0, w_hh, _or(b_hh, w_hh), _or(lengths, h0), out, h_n, h_n, _or(saved, out),
             out, reverse=reverse, IS_LSTM=False, HAS_BIAS=b_hh is not None, HAS_LENGTHS=lengths is not None,
             SAVE=bool(save))
    return out, h_n, saved


def persistent_lstm_fwd(gx, h0, c0, w_hh, b_hh, lengths, reverse: bool, save: bool, *knobs):
    """-> (out, h_n, c_n, saved (T,B,4H) or None, c_seq (T,B,H) or None)."""
    L = _Layer("persistent_lstm_fwd", h0, "h0", gx, "gx", 4, w_hh, 4, lengths)
    L.check("c0", c0, L.B, L.H)
    if b_hh is not None:
        L.check("b_hh", b_hh, 4 * L.H)
    out, h_n, c_n = L.empty(L.T, L.B, L.H), h0.clone(), c0.clone()
    saved, c_seq = (L.empty(L.T, L.B, 4 * L.H), L.empty(L.T, L.B, L.H)) if save else (None, None)
    L.launch(_forward_kernel, gx, h0, c0, w_hh, _or(b_hh, w_hh), _or(lengths, h0), out, h_n, c_n, _or(saved, out),
             _or(c_seq, out), reverse=reverse, IS_LSTM=True, HAS_BIAS=b_hh is not None,
             HAS_LENGTHS=lengths is not None, SAVE=bool(save))
    return out, h_n, c_n, saved, c_seq


def persistent_gru_bwd(grad_out, grad_h_n, out, h0, saved, w_hh, lengths, reverse: bool, *knobs):
    """-> (grad_gx (T,B,3H), grad_gh (T,B,3H), grad_h0 (B,H)); a missing gradient is zero."""
    L = _Layer("persistent_gru_bwd", h0, "h0", out, "out", 1, w_hh, 3, lengths)
    L.check("saved", saved, L.T, L.B, 4 * L.H)
    for name, t, shape in (("grad_out", grad_out, (L.T, L.B, L.H)), ("grad_h_n", grad_h_n, (L.B, L.H))):
        if t is not None:
            L.check(name, t, *shape)
    grad_gx, grad_gh = L.empty(L.T, L.B, 3 * L.H), L.empty(L.T, L.B, 3 * L.H)
    grad_h0 = torch.zeros_like(h0) if grad_h_n is None else grad_h_n.clone()
    L.launch(_backward_kernel, _or(grad_out, out), _or(grad_h_n, h0), h0, out, h0, h0, out, saved, w_hh,
             _or(lengths, h0), grad_gx, grad_gh, grad_h0, grad_h0, reverse=reverse, IS_LSTM=False,
             HAS_LENGTHS=lengths is not None, HAS_GRAD_OUT=grad_out is not None, HAS_GRAD_H_N=grad_h_n is not None,
             HAS_GRAD_C_N=False)
    return grad_gx, grad_gh, grad_h0


def persistent_lstm_bwd(grad_out, grad_h_n, grad_c_n, c0, c_seq, saved, w_hh, lengths, reverse: bool, *knobs):
    """-> (grad_gates (T,B,4H), grad_h0, grad_c0 (B,H)); a missing gradient is zero."""
    L = _Layer("persistent_lstm_bwd", c0, "c0", c_seq, "c_seq", 1, w_hh, 4, lengths)
    L.check("saved", saved, L.T, L.B, 4 * L.H)
    for name, t, shape in (("grad_out", grad_out, (L.T, L.B, L.H)), ("grad_h_n", grad_h_n, (L.B, L.H)),
                           ("grad_c_n", grad_c_n, (L.B, L.H))):
        if t is not None:
            L.check(name, t, *shape)
    grad_gates = L.empty(L.T, L.B, 4 * L.H)
    grad_h0 = torch.zeros_like(c0) if grad_h_n is None else grad_h_n.clone()
    grad_c0 = torch.zeros_like(c0) if grad_c_n is None else grad_c_n.clone()
    L.launch(_backward_kernel, _or(grad_out, c_seq), _or(grad_h_n, c0), _or(grad_c_n, c0), c_seq, c0, c0, c_seq,
             saved, w_hh, _or(lengths, c0), grad_gates, grad_gates, grad_h0, grad_c0, reverse=reverse, IS_LSTM=True,
             HAS_LENGTHS=lengths is not None, HAS_GRAD_OUT=grad_out is not None, HAS_GRAD_H_N=grad_h_n is not None,
             HAS_GRAD_C_N=grad_c_n is not None)
    return grad_gates, grad_h0, grad_c0
