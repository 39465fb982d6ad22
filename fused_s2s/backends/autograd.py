"""One autograd.Function per op, with hand-written backward passes.

The recurrent Functions run a whole layer (one direction) over the "packed data" layout that
PyTorch's PackedSequence uses: rows of all time steps stacked, step t owning
`batch_sizes[t]` rows (the longest sequences first). A padded (T, B, ...) input is the same
layout with batch_sizes = (B,) * T, and a single cell step is T = 1. The input projection
gx = x @ w_ih.T + b_ih is computed by the caller as one GEMM over all steps; here each step
runs the fused cell primitive, and backward accumulates dW_hh and db_hh as one GEMM / one sum
over the whole sequence instead of per step.

With `lengths` (B,) (constant batch sizes only), row b runs only the steps t < lengths[b], in
either direction, as if it had been packed: past its length a row keeps its state, outputs
zeros and saves zero gates, so its gradients pass through unchanged. This is the padded
alternative to packing: no host-side batch sizes, so torch.compile traces it without a break.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .ops import call
from .tensors import no_autocast
from .torch_backend import up


def _steps(batch_sizes: Sequence[int], reverse: bool) -> List[Tuple[int, int, int]]:
    """(time step, row offset, row count) of each step in processing order."""
    offsets, off = [], 0
    for t, bs in enumerate(batch_sizes):
        offsets.append((t, off, bs))
        off += bs
    steps = [s for s in offsets if s[2] > 0]
    return steps[::-1] if reverse else steps


def _active_steps(lengths: Optional[Tensor], steps: int) -> Optional[Tensor]:
    """(T, B, 1) bool: row b runs step t iff t < lengths[b]; None when every row runs every step."""
    return None if lengths is None else (torch.arange(steps, device=lengths.device)[:, None] < lengths)[..., None]


def _keep(active: Optional[Tensor], new: Tensor, old) -> Tensor:
    """`new` on the rows that ran this step, `old` (a tensor or 0) on the others."""
    return new if active is None else torch.where(active, new, old)


def _replace_rows(state: Tensor, head: Tensor) -> Tensor:
    """`state` with its first head.shape[0] rows replaced by `head` (rows past it keep theirs)."""
    return head if head.shape[0] == state.shape[0] else torch.cat([head, state[head.shape[0]:]])


def _rows(parts: List[Tensor], in_row_order: bool, like: Tensor, width: int) -> Tensor:
    """Per-step row blocks, collected in processing order, as one (N, width) tensor in row
    order. Collecting and concatenating once costs one copy instead of one per step."""
    if not parts:
        return like.new_empty(0, width)
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts if in_row_order else parts[::-1])


class GRUFunction(torch.autograd.Function):
    """One GRU layer direction. Saves per step: h_prev (N,H) and the gates [r,z,n,gh_n] (N,4H)."""

    @staticmethod
    @no_autocast
    def forward(ctx, gx: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor],
                batch_sizes: Tuple[int, ...], reverse: bool, backend: str,
                lengths: Optional[Tensor] = None, keep: bool = True) -> Tuple[Tensor, Tensor]:
        """keep=False (inference: the caller runs without grad): nothing is collected or joined
        for backward (forward itself always runs with grad off, so it cannot tell)."""
        hidden = h0.shape[1]
        active = _active_steps(lengths, len(batch_sizes))
        outs, h_prevs, saveds = [], [], []
        h = h0
        for t, off, bs in _steps(batch_sizes, reverse):
            h_prev = h[:bs]
            h_new, saved = call("gru_cell_fwd", backend, gx[off:off + bs], h_prev, w_hh, b_hh)
            a = None if active is None else active[t]
            outs.append(_keep(a, h_new, 0))
            if keep:
                h_prevs.append(h_prev)
                saveds.append(_keep(a, saved, 0))
            h = _replace_rows(h, _keep(a, h_new, h_prev))
        in_order = not reverse
        if keep:
            ctx.save_for_backward(_rows(h_prevs, in_order, gx, hidden), _rows(saveds, in_order, gx, 4 * hidden),
                                  w_hh, active)
        ctx.setup = (tuple(batch_sizes), reverse, backend, b_hh is not None)
        out = torch.cat(outs if in_order else outs[::-1]) if outs else gx.new_empty(0, hidden)
        return out, h.clone() if h is h0 else h  # an output must not be an input

    @staticmethod
    @no_autocast
    def backward(ctx, grad_out: Tensor, grad_h_n: Tensor):
        h_prev_all, saved_all, w_hh, active = ctx.saved_tensors
        batch_sizes, reverse, backend, has_bias = ctx.setup
        grad_out = grad_out.contiguous()
        d_gxs, d_ghs = [], []
        dh = grad_h_n.contiguous()
        for t, off, bs in reversed(_steps(batch_sizes, reverse)):
            a = None if active is None else active[t]
            g = _keep(a, dh[:bs] + grad_out[off:off + bs], 0)  # zero gates saved: zero gate gradients
            d_gx, d_gh, dh_direct = call("gru_cell_bwd", backend, g, h_prev_all[off:off + bs],
                                         saved_all[off:off + bs])
            d_gxs.append(d_gx)
            d_ghs.append(d_gh)
            dh = _replace_rows(dh, _keep(a, torch.addmm(dh_direct, d_gh, w_hh), dh[:bs]))
        gates = 3 * w_hh.shape[1]
        grad_gx, grad_gh = _rows(d_gxs, reverse, saved_all, gates), _rows(d_ghs, reverse, saved_all, gates)
        grad_w_hh = grad_gh.t() @ h_prev_all if ctx.needs_input_grad[2] else None
        grad_b_hh = grad_gh.sum(0) if has_bias and ctx.needs_input_grad[3] else None
        return grad_gx, dh, grad_w_hh, grad_b_hh, None, None, None, None, None


class LSTMFunction(torch.autograd.Function):
    """One LSTM layer direction. Saves per step: h_prev (N,P), c_prev, c_new (N,H each) and the
    activated gates (N,4H); tanh(c_new) is recomputed in backward.

    With projections (w_hr (P,H), nn.LSTM's proj_size) the cell primitive takes the projected
    h_prev (B,P) for its recurrent GEMM and returns the unprojected o * tanh(c_new) (B,H); the
    step's h_new = that @ w_hr.T is one more GEMM here. Backward recomputes o * tanh(c_new)
    from what is saved anyway and forms grad_w_hr as one GEMM over the whole sequence."""

    @staticmethod
    @no_autocast
    def forward(ctx, gx: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor],
                batch_sizes: Tuple[int, ...], reverse: bool, backend: str,
                lengths: Optional[Tensor] = None, w_hr: Optional[Tensor] = None,
                keep: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
        hidden, out_size = c0.shape[1], h0.shape[1]  # keep: as GRUFunction's
        active = _active_steps(lengths, len(batch_sizes))
        outs, h_prevs, c_prevs, c_news, saveds = [], [], [], [], []
        h, c = h0, c0
        for t, off, bs in _steps(batch_sizes, reverse):
            h_prev, c_prev = h[:bs], c[:bs]
            h_new, c_new, saved = call("lstm_cell_fwd", backend, gx[off:off + bs], h_prev, c_prev, w_hh, b_hh)
            if w_hr is not None:
                h_new = h_new @ w_hr.t()
            a = None if active is None else active[t]
            c_next = _keep(a, c_new, c_prev)  # saved as c_new: finite, and with zero gates it passes dc through
            outs.append(_keep(a, h_new, 0))
            if keep:
                for parts, part in ((h_prevs, h_prev), (c_prevs, c_prev), (c_news, c_next), (saveds, _keep(a, saved, 0))):
                    parts.append(part)
            h, c = _replace_rows(h, _keep(a, h_new, h_prev)), _replace_rows(c, c_next)
        in_order = not reverse
        if keep:
            ctx.save_for_backward(_rows(h_prevs, in_order, gx, out_size),
                                  *(_rows(p, in_order, gx, hidden) for p in (c_prevs, c_news)),
                                  _rows(saveds, in_order, gx, 4 * hidden), w_hh, active, w_hr)
        ctx.setup = (tuple(batch_sizes), reverse, backend, b_hh is not None)
        out = torch.cat(outs if in_order else outs[::-1]) if outs else gx.new_empty(0, out_size)
        return out, (h.clone() if h is h0 else h), (c.clone() if c is c0 else c)

    @staticmethod
    @no_autocast
    def backward(ctx, grad_out: Tensor, grad_h_n: Tensor, grad_c_n: Tensor):
        h_prev_all, c_prev_all, c_new_all, saved_all, w_hh, active, w_hr = ctx.saved_tensors
        batch_sizes, reverse, backend, has_bias = ctx.setup
        grad_out = grad_out.contiguous()
        grad_gate_parts, grad_h_parts = [], []
        dh, dc = grad_h_n.contiguous(), grad_c_n.contiguous()
        for t, off, bs in reversed(_steps(batch_sizes, reverse)):
            rows = slice(off, off + bs)
            a = None if active is None else active[t]
            g_h = _keep(a, dh[:bs] + grad_out[rows], 0)
            if w_hr is not None:
                grad_h_parts.append(g_h)
                g_h = g_h @ w_hr  # through the projection, onto o * tanh(c_new)
            grad_gates, dc_prev = call("lstm_cell_bwd", backend, g_h, dc[:bs].contiguous(), c_prev_all[rows],
                                       c_new_all[rows], saved_all[rows])
            grad_gate_parts.append(grad_gates)
            dh = _replace_rows(dh, _keep(a, grad_gates @ w_hh, dh[:bs]))
            dc = _replace_rows(dc, _keep(a, dc_prev, dc[:bs]))
        grad_gates_all = _rows(grad_gate_parts, reverse, saved_all, saved_all.shape[1])
        grad_w_hh = grad_gates_all.t() @ h_prev_all if ctx.needs_input_grad[3] else None
        grad_b_hh = grad_gates_all.sum(0) if has_bias and ctx.needs_input_grad[4] else None
        grad_w_hr = None
        if w_hr is not None and ctx.needs_input_grad[9]:
            hidden = c_new_all.shape[1]
            unprojected = (up(saved_all[:, 3 * hidden:]) * torch.tanh(up(c_new_all))).to(c_new_all.dtype)
            grad_w_hr = _rows(grad_h_parts, reverse, saved_all, w_hr.shape[0]).t() @ unprojected
        return grad_gates_all, dh, dc, grad_w_hh, grad_b_hh, None, None, None, None, grad_w_hr, None


def _reduce_to_key_rows(grad_rows: Tensor, like: Tensor, kv_batch_idx: Optional[Tensor]) -> Tensor:
    """Per-query-row gradients of a key-side tensor, summed onto the key rows they read."""
    if kv_batch_idx is None:
        return grad_rows
    return torch.zeros_like(like).index_add_(0, kv_batch_idx, grad_rows.to(like.dtype))


def _is_empty(q: Tensor, k: Tensor) -> bool:
    return q.shape[0] == 0 or q.shape[1] == 0 or k.shape[1] == 0 or k.shape[0] == 0


class AdditiveAttentionFunction(torch.autograd.Function):
    """Saves the inputs, the weights and the log-sum-exp; backward recomputes tanh(q + k)."""

    @staticmethod
    @no_autocast
    def forward(ctx, q, k, v, values, mask, lengths, kv_batch_idx, backend):
        if _is_empty(q, k):  # nothing to attend to: zero context, weights of shape (Bq,Tq,Tk)
            ctx.empty = True
            ctx.save_for_backward(q, k, v, values)
            return q.new_zeros(q.shape[0], q.shape[1], values.shape[2]), q.new_zeros(q.shape[0], q.shape[1], k.shape[1])
        ctx.empty = False
        context, weights, lse = call("additive_attention_fwd", backend, q, k, v, values, mask, lengths, kv_batch_idx)
        ctx.save_for_backward(q, k, v, values, mask, lengths, kv_batch_idx, weights, lse)
        ctx.backend = backend
        return context, weights

    @staticmethod
    @no_autocast
    def backward(ctx, grad_context, grad_weights):
        if ctx.empty:
            return tuple(torch.zeros_like(t) for t in ctx.saved_tensors) + (None,) * 4
        q, k, v, values, mask, lengths, kv_batch_idx, weights, lse = ctx.saved_tensors
        dq, dk_rows, dv, dvalues_rows = call(
            "additive_attention_bwd", ctx.backend, grad_context.contiguous(), grad_weights.contiguous(),
            q, k, v, values, mask, lengths, kv_batch_idx, weights, lse)
        return (dq, _reduce_to_key_rows(dk_rows, k, kv_batch_idx), dv,
                _reduce_to_key_rows(dvalues_rows, values, kv_batch_idx), None, None, None, None)


class DotAttentionFunction(torch.autograd.Function):
    """Saves the inputs, the weights and the log-sum-exp."""

    @staticmethod
    @no_autocast
    def forward(ctx, q, k, values, mask, lengths, kv_batch_idx, scale, backend):
        if _is_empty(q, k):
            ctx.empty = True
            ctx.save_for_backward(q, k, values)
            return q.new_zeros(q.shape[0], q.shape[1], values.shape[2]), q.new_zeros(q.shape[0], q.shape[1], k.shape[1])
        ctx.empty = False
        context, weights, lse = call("dot_attention_fwd", backend, q, k, values, mask, lengths, kv_batch_idx, scale)
        ctx.save_for_backward(q, k, values, mask, lengths, kv_batch_idx, weights, lse)
        ctx.setup = (scale, backend)
        return context, weights

    @staticmethod
    @no_autocast
    def backward(ctx, grad_context, grad_weights):
        if ctx.empty:
            return tuple(torch.zeros_like(t) for t in ctx.saved_tensors) + (None,) * 5
        q, k, values, mask, lengths, kv_batch_idx, weights, lse = ctx.saved_tensors
        scale, backend = ctx.setup
        dq, dk_rows, dvalues_rows = call(
            "dot_attention_bwd", backend, grad_context.contiguous(), grad_weights.contiguous(),
            q, k, values, mask, lengths, kv_batch_idx, scale, weights, lse)
        return (dq, _reduce_to_key_rows(dk_rows, k, kv_batch_idx),
                _reduce_to_key_rows(dvalues_rows, values, kv_batch_idx), None, None, None, None, None)
