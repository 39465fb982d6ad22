"""Autograd Functions over the persistent whole-sequence GRU/LSTM kernels: those of
fused_s2s._C (backend "cpp": the CUDA kernels of csrc/cuda/persistent_rnn.h, see
fused_s2s/backends/persistent.py, and on CPU the C++ time loop of csrc/cpu/persistent_rnn.cpp)
and the Triton ones for hidden sizes up to 64 (backend "triton"; triton_kernels/persistent_rnn.py).
All take the same arguments and give the same outputs.

Layout: padded and time-major. gx (T,B,G*H) = x @ W_ih^T + b_ih for all steps (one GEMM by the
caller: `persistent_gru_layer` / `persistent_lstm_layer` do it), h0/c0 (B,H), W_hh (G*H,H), b_hh
(G*H) or None, lengths (B,) or None. A row b runs the steps t < lengths[b] (from its own last
step when reversed, as in a PackedSequence); `out` is zero past a row's length and h_n/c_n are
the state after its last step. One call per layer direction, forward and backward; the
backward kernel gives the gate gradients of every step and dW_hh, db_hh are whole-sequence GEMMs
here (dW_ih, db_ih and dx follow from gx through autograd).

fused_s2s.GRU/LSTM run their layers here when `route()` finds nothing in the way: a backend with
whole-sequence kernels for the input's device chosen for the call (CUDA: "cpp" or "triton"; CPU:
"cpp"), kernels that fit the shape (forward, and backward when gradients are needed), not
inside torch.compile (it traces the per-step custom ops), and not switched off with
$FUSED_S2S_PERSISTENT=0 or `fused_s2s.backends.persistent_autograd.enabled = False`.
"""
from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import registry
from .persistent import MAX_ROWS_PER_BLOCK, previous_states, recurrent_weight_gradients
from .tensors import autocast_inputs, no_autocast

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # CUDA's; the CPU loop also takes float64
_CPU_DTYPES = _DTYPES + (torch.float64,)
KERNEL_BACKENDS = ("cpp", "triton")  # the backends that have persistent layer kernels

enabled = os.environ.get("FUSED_S2S_PERSISTENT", "1") != "0"


def _extension() -> ModuleType:
    return registry.load("cpp")


def _kernels(backend: str = "cpp") -> Tuple[Optional[ModuleType], Optional[str]]:
    """(the backend's module, None) if it has the persistent kernels, else (None, why not)."""
    if backend not in KERNEL_BACKENDS:
        return None, f"backend {backend!r} has no persistent kernels (those have: {', '.join(KERNEL_BACKENDS)})"
    try:
        module = _extension() if backend == "cpp" else registry.load(backend)
    except registry.BackendUnavailable as e:
        return None, str(e)
    return module, None


def _require_kernels(backend: str = "cpp") -> ModuleType:
    module, reason = _kernels(backend)
    if module is None:
        raise RuntimeError(f"persistent GRU/LSTM kernels unavailable: {reason}")
    return module


@functools.lru_cache(maxsize=256)
def _plan_reason(cell: str, dtype: torch.dtype, batch: int, hidden: int, device: torch.device, backward: bool,
                 max_blocks: int, max_rows_per_block: int) -> Optional[str]:
    plan = _require_kernels().persistent_rnn_plan(cell, dtype, batch, hidden, device, backward=backward,
                                                  max_blocks=max_blocks, max_rows_per_block=max_rows_per_block)
    return None if plan["fits"] else f"{'backward' if backward else 'forward'} plan: {plan['reason']}"


def persistent_layer_available(mode: str, x: Tensor, hidden: int, *, training: bool = True,
                               batch_first: bool = False, max_blocks: int = 0,
                               max_rows_per_block: int = MAX_ROWS_PER_BLOCK, backend: str = "cpp") -> Optional[str]:
    """None if a `mode` ("GRU"/"LSTM") layer direction of `hidden` units over the padded input
    x (T,B,I), or (B,T,I) with batch_first, can run on the persistent kernels here, in x's
    dtype; else the reason it cannot. `training`: the backward kernel must fit too."""
    if not isinstance(x, Tensor) or x.dim() != 3:
        return "x must be a 3-D tensor"
    return _fit_reason(mode, x.dtype, x.device, x.shape[0 if batch_first else 1], hidden, training, max_blocks,
                       max_rows_per_block, backend)


def _fit_reason(mode: str, dtype: torch.dtype, device: torch.device, batch: int, hidden: int, training: bool,
                max_blocks: int = 0, max_rows_per_block: int = MAX_ROWS_PER_BLOCK,
                backend: str = "cpp") -> Optional[str]:
    cell = str(mode).lower()
    if cell not in ("gru", "lstm"):
        return f"mode must be 'GRU' or 'LSTM', got {mode!r}"
    module, reason = _kernels(backend)
    if reason is not None:
        return reason
    if backend == "triton":  # one program per 16 batch rows, no plan: the hidden size decides
        return module.persistent_reason(device, dtype, hidden, cell, training)
    if device.type == "cpu":  # the C++ time loop: any shape
        return None if dtype in _CPU_DTYPES else f"the CPU whole-sequence loop supports {_names(_CPU_DTYPES)}, not {dtype}"
    if device.type != "cuda":
        return f"the persistent kernels need CPU or CUDA tensors, got device {device}"
    if not module.has_cuda:
        return "fused_s2s._C was built without CUDA kernels, so without the persistent CUDA kernels"
    if dtype not in _DTYPES:
        return f"the persistent kernels support {_names(_DTYPES)}, not {dtype}"
    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    for backward in (False, True) if training else (False,):
        reason = _plan_reason(cell, dtype, int(batch), int(hidden), device, backward, int(max_blocks),
                              int(max_rows_per_block))
        if reason is not None:
            return reason
    return None


def route(mode: str, backend: Optional[str], data: Tensor, rows: int, batch: int, hidden: int,
          training: bool) -> Tuple[Optional[str], str]:
    """(the backend whose persistent kernels a GRU/LSTM module should run its layers on, "") or
    (None, why not). data: the module's input (its device and dtype; the call's dtype is the
    autocast dtype when autocast is on); rows: its rows N over all steps (padded or packed)."""
    if not enabled:
        return None, "switched off ($FUSED_S2S_PERSISTENT=0 or persistent_autograd.enabled = False)"
    if rows == 0:
        return None, "no steps or no rows: nothing to launch"
    if torch.compiler.is_compiling():
        return None, "inside torch.compile the per-step custom ops are traced instead"
    kind = data.device.type
    if kind not in ("cpu", "cuda"):
        return None, f"the whole-sequence kernels need CPU or CUDA tensors, got device {data.device}"
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else data.dtype
    op = "gru_cell" if mode.lower() == "gru" else "lstm_cell"
    name = registry.resolve(backend, op, data.device, dtype, rows * 4 * hidden)
    if kind != "cuda" and name != "cpp":  # Triton on CPU is its interpreter: for tests, not for speed
        return None, f"off CUDA only backend 'cpp' has whole-sequence kernels, the call runs on {name!r}"
    reason = _fit_reason(mode, dtype, data.device, batch, hidden, training, backend=name)
    return (name, "") if reason is None else (None, reason)


def _names(dtypes) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def _lengths_on(lengths: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    return None if lengths is None else lengths.to(device=like.device, dtype=torch.int64).contiguous()


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


class PersistentGRUFunction(torch.autograd.Function):
    """apply(gx, h0, w_hh, b_hh, lengths, reverse, max_blocks=0, max_rows_per_block=16, backend="cpp")
    -> (out, h_n). Saves out, h0 and the gates [r, z, n, gh_n] of every step."""

    @staticmethod
    @no_autocast
    def forward(ctx, gx: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], lengths: Optional[Tensor],
                reverse: bool, max_blocks: int = 0, max_rows_per_block: int = MAX_ROWS_PER_BLOCK,
                backend: str = "cpp"):
        kernels = _require_kernels(backend)
        lengths = _lengths_on(lengths, gx)
        knobs = (int(max_blocks), int(max_rows_per_block))
        save = any(ctx.needs_input_grad[:4])
        out, h_n, saved = kernels.persistent_gru_fwd(gx.contiguous(), h0.contiguous(), w_hh.contiguous(),
                                                     _contiguous(b_hh), lengths, bool(reverse), save, *knobs)
        if save:
            ctx.save_for_backward(out, h0.contiguous(), saved, w_hh.contiguous(), lengths)
        ctx.setup = (bool(reverse), b_hh is not None, knobs, backend)
        ctx.set_materialize_grads(False)  # a missing gradient is passed to the kernel as None (zero)
        return out, h_n

    @staticmethod
    @no_autocast
    def backward(ctx, grad_out: Optional[Tensor], grad_h_n: Optional[Tensor]):
        out, h0, saved, w_hh, lengths = ctx.saved_tensors
        reverse, has_bias, knobs, backend = ctx.setup
        grad_gx, grad_gh, grad_h0 = _require_kernels(backend).persistent_gru_bwd(
            _contiguous(grad_out), _contiguous(grad_h_n), out, h0, saved, w_hh, lengths, reverse, *knobs)
        grad_w_hh, grad_b_hh = _recurrent_grads(ctx, 2, grad_gh, out, h0, lengths, reverse, has_bias)
        return grad_gx, grad_h0, grad_w_hh, grad_b_hh, None, None, None, None, None


class PersistentLSTMFunction(torch.autograd.Function):
    """apply(gx, h0, c0, w_hh, b_hh, lengths, reverse, max_blocks=0, max_rows_per_block=16,
    backend="cpp") -> (out, h_n, c_n). Saves out, h0, c0, the activated gates and the cell state
    of every step."""

    @staticmethod
    @no_autocast
    def forward(ctx, gx: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor],
                lengths: Optional[Tensor], reverse: bool, max_blocks: int = 0,
                max_rows_per_block: int = MAX_ROWS_PER_BLOCK, backend: str = "cpp"):
        kernels = _require_kernels(backend)
        lengths = _lengths_on(lengths, gx)
        knobs = (int(max_blocks), int(max_rows_per_block))
        save = any(ctx.needs_input_grad[:5])
        h0, c0, w_hh = h0.contiguous(), c0.contiguous(), w_hh.contiguous()
        out, h_n, c_n, saved, c_seq = kernels.persistent_lstm_fwd(gx.contiguous(), h0, c0, w_hh, _contiguous(b_hh),
                                                                  lengths, bool(reverse), save, *knobs)
        if save:
            ctx.save_for_backward(out, h0, c0, saved, c_seq, w_hh, lengths)
        ctx.setup = (bool(reverse), b_hh is not None, knobs, backend)
        ctx.set_materialize_grads(False)
        return out, h_n, c_n

    @staticmethod
    @no_autocast
    def backward(ctx, grad_out: Optional[Tensor], grad_h_n: Optional[Tensor], grad_c_n: Optional[Tensor]):
        out, h0, c0, saved, c_seq, w_hh, lengths = ctx.saved_tensors
        reverse, has_bias, knobs, backend = ctx.setup
        grad_gates, grad_h0, grad_c0 = _require_kernels(backend).persistent_lstm_bwd(
            _contiguous(grad_out), _contiguous(grad_h_n), _contiguous(grad_c_n), c0, c_seq, saved, w_hh, lengths,
            reverse, *knobs)
        grad_w_hh, grad_b_hh = _recurrent_grads(ctx, 3, grad_gates, out, h0, lengths, reverse, has_bias)
        return grad_gates, grad_h0, grad_c0, grad_w_hh, grad_b_hh, None, None, None, None, None


def _recurrent_grads(ctx, w_index: int, grad_gh: Tensor, out: Tensor, h0: Tensor, lengths: Optional[Tensor],
                     reverse: bool, has_bias: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """dW_hh = grad_gh^T @ h_prev and db_hh = sum(grad_gh) over the whole sequence, where asked
    for (W_hh is input `w_index` of the Function, b_hh the next one). With a leading direction
    dimension (a bidirectional pair), per direction, the second one running opposite to `reverse`."""
    need_w, need_b = ctx.needs_input_grad[w_index], has_bias and ctx.needs_input_grad[w_index + 1]
    if grad_gh.dim() == 4:
        pairs = [_direction_grads(need_w, need_b, grad_gh[d], out[d], h0[d], lengths, reverse != (d == 1))
                 for d in range(grad_gh.shape[0])]
        return tuple(None if parts[0] is None else torch.stack(parts) for parts in zip(*pairs))
    return _direction_grads(need_w, need_b, grad_gh, out, h0, lengths, reverse)


def _direction_grads(need_w: bool, need_b: bool, grad_gh: Tensor, out: Tensor, h0: Tensor,
                     lengths: Optional[Tensor], reverse: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    if not need_w:
        return None, (grad_gh.reshape(-1, grad_gh.shape[-1]).sum(0) if need_b else None)
    return recurrent_weight_gradients(grad_gh, previous_states(out, h0, lengths, reverse), need_b)


def _input_projection(x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor]) -> Tensor:
    """gx = x @ w_ih^T + b_ih for all steps: one GEMM, also for a stacked pair of directions
    (w_ih (D, G*H, I) -> gx (D, T, B, G*H))."""
    if w_ih.dim() == 2:
        return F.linear(x, w_ih, b_ih)
    d, rows = w_ih.shape[0], w_ih.shape[1]
    gx = F.linear(x, w_ih.reshape(d * rows, -1), None if b_ih is None else b_ih.reshape(-1))
    return gx.view(*x.shape[:-1], d, rows).movedim(-2, 0).contiguous()


def persistent_gru_layer(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                         b_hh: Optional[Tensor], lengths: Optional[Tensor] = None, reverse: bool = False, *,
                         max_blocks: int = 0, max_rows_per_block: int = MAX_ROWS_PER_BLOCK,
                         backend: str = "cpp") -> Tuple[Tensor, Tensor]:
    """One GRU layer direction over the padded time-major x (T,B,I) -> (out (T,B,H), h_n (B,H)),
    on the persistent kernels of `backend` ("cpp" or "triton"). With "triton", h0 and the
    weights may be stacked pairs (2, ...): both directions of a bidirectional layer in one
    launch, the second reversed relative to `reverse` -> out (2,T,B,H), h_n (2,B,H)."""
    x, h0, w_ih, w_hh, b_ih, b_hh = autocast_inputs(x, h0, w_ih, w_hh, b_ih, b_hh)
    gx = _input_projection(x, w_ih, b_ih)
    return PersistentGRUFunction.apply(gx, h0, w_hh, b_hh, lengths, reverse, max_blocks, max_rows_per_block,
                                       backend)


def persistent_lstm_layer(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                          b_hh: Optional[Tensor], lengths: Optional[Tensor] = None, reverse: bool = False, *,
                          max_blocks: int = 0, max_rows_per_block: int = MAX_ROWS_PER_BLOCK,
                          backend: str = "cpp") -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer direction over the padded time-major x (T,B,I) -> (out, h_n, c_n); stacked
    pairs of directions as persistent_gru_layer."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = autocast_inputs(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    gx = _input_projection(x, w_ih, b_ih)
    return PersistentLSTMFunction.apply(gx, h0, c0, w_hh, b_hh, lengths, reverse, max_blocks, max_rows_per_block,
                                        backend)
