"""The functional API: argument checks, backend choice, then the autograd Functions.

Every function takes a keyword `backend=` ("auto", "torch", "cpp", "triton", and for the cells
"native"; None means the process default, see `fused_s2s.backends.registry` and
`fused_s2s.backends.dispatch`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .backends import dispatch, registry
from .backends.autograd import AdditiveAttentionFunction, DotAttentionFunction
from .backends.layers import gru_layer, lstm_layer
from .backends.tensors import autocast_inputs, can_read_values, value_range

# ------------------------------------------------------------------------------ arg checks


def _require(cond: bool, message, exc: type = ValueError) -> None:
    """Raise `exc` when `cond` fails. `message` may be a function building the text, so that the
    per-step hot path never pays for formatting a message it does not raise."""
    if not cond:
        raise exc(message() if callable(message) else message)


def _check_tensor(name: str, t, dims: Sequence[int], like: Optional[Tensor] = None) -> None:
    _require(isinstance(t, Tensor), lambda: f"{name} must be a Tensor, got {type(t).__name__}", TypeError)
    _require(t.dim() in dims, lambda: f"{name} must have {' or '.join(map(str, dims))} dimensions, "
             f"got shape {tuple(t.shape)}")
    if like is None:
        _require(t.is_floating_point(), lambda: f"{name} must be a floating-point tensor, got {t.dtype}", TypeError)
        return
    _require(t.dtype == like.dtype, lambda: f"{name} has dtype {t.dtype} but the input has {like.dtype}", TypeError)
    _require(t.device == like.device, lambda: f"{name} is on {t.device} but the input is on {like.device}")


def _check_shape(name: str, t: Optional[Tensor], shape: Tuple[int, ...]) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_index(name: str, t: Optional[Tensor], shape: Tuple[int, ...], device: torch.device,
                 upper: int) -> Optional[Tensor]:
    """An integer tensor of `shape` with values in [0, upper]; returned as contiguous int64."""
    if t is None:
        return None
    _require(isinstance(t, Tensor) and not t.is_floating_point() and t.dtype != torch.bool,
             f"{name} must be an integer tensor", TypeError)
    _check_shape(name, t, shape)
    t = t.to(device=device, dtype=torch.int64).contiguous()
    if t.numel() and can_read_values(t):
        # an out-of-range index would make a kernel read out of bounds: check it here
        lo, hi = value_range(t)
        _require(lo >= 0 and hi <= upper, lambda: f"{name} values must lie in [0, {upper}], got [{lo}, {hi}]")
    return t


# ----------------------------------------------------------------------------------- cells


def _check_cell(input: Tensor, hx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih, b_hh,
                gates: int, cx: Optional[Tensor] = None) -> int:
    """Every check of a cell's arguments, each naming what is wrong; returns the hidden size."""
    _check_tensor("input", input, (1, 2))
    _check_tensor("w_ih", w_ih, (2,), input)
    _check_tensor("w_hh", w_hh, (2,), input)
    hidden = w_hh.shape[1]
    _check_shape("w_hh", w_hh, (gates * hidden, hidden))
    _check_shape("w_ih", w_ih, (gates * hidden, input.shape[-1]))
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None:
            _check_tensor(name, b, (1,), input)
            _check_shape(name, b, (gates * hidden,))
    for name, state in (("hx", hx), ("cx", cx)):
        if state is not None:
            _check_tensor(name, state, (input.dim(),), input)
            _check_shape(name, state, tuple(input.shape[:-1]) + (hidden,))
    return hidden


def _native_takes(input: Tensor, hx, cx, w_ih, w_hh: Tensor, b_ih, b_hh, gates: int) -> bool:
    """Whether PyTorch's cell kernel may be handed these arguments unchecked. It checks dtypes,
    devices and the input and state sizes itself (a failure there reruns _check_cell for a
    message naming the argument), but would run without complaint on a wrong gate count (the
    rows still split), a broadcastable bias or a state of another rank: those are checked here,
    in a few attribute reads, so that a decoder step pays no more than nn's cell does."""
    try:
        rows = gates * w_hh.shape[1]
        return (w_hh.shape[0] == rows and w_ih.dim() == 2 and w_ih.shape[0] == rows
                and (b_ih is None or b_ih.shape == (rows,)) and (b_hh is None or b_hh.shape == (rows,))
                and (hx is None or hx.dim() == input.dim()) and (cx is None or cx.dim() == input.dim()))
    except AttributeError:  # an argument that is not a tensor
        return False


def _cell(op: str, input: Tensor, hx: Optional[Tensor], cx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
          b_ih: Optional[Tensor], b_hh: Optional[Tensor], backend: Optional[str]):
    """One step of either cell -> (h', c') (c' None for the GRU): checks, the backend, unbatched
    input as a batch of one."""
    lstm = op == "lstm_cell"
    gates = 4 if lstm else 3
    # each line here runs per decoder step, beside a kernel of a few microseconds: few reads
    if torch._C._is_any_autocast_enabled() and isinstance(input, Tensor):
        # under autocast, mixed float32/low-precision arguments are fine
        input, hx, cx, w_ih, w_hh, b_ih, b_hh = autocast_inputs(input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    args = (input, hx, w_ih, w_hh, b_ih, b_hh, gates, cx)
    if not (isinstance(input, Tensor) and isinstance(w_hh, Tensor) and input.dim() in (1, 2) and w_hh.dim() == 2):
        _check_cell(*args)  # raises: the backend choice below reads these
    hidden = w_hh.shape[1]
    batched = input.dim() == 2
    grad = torch.is_grad_enabled() and (w_hh.requires_grad or input.requires_grad
                                        or training((hx, cx, w_ih, b_ih, b_hh)))
    name = dispatch.choose(backend, op, input.device, input.dtype, input.shape[0] if batched else 1, hidden, grad)
    if name != "native" or not _native_takes(input, hx, cx, w_ih, w_hh, b_ih, b_hh, gates):
        _check_cell(*args)
    x = input if batched else input.unsqueeze(0)
    zeros = x.new_zeros(x.shape[0], hidden) if hx is None or (lstm and cx is None) else None
    h0 = zeros if hx is None else (hx if batched else hx.unsqueeze(0))
    c0 = None if not lstm else (zeros if cx is None else (cx if batched else cx.unsqueeze(0)))
    if name == "native":  # what nn.GRUCell / nn.LSTMCell run
        try:
            if lstm:
                h, c = torch._VF.lstm_cell(x, (h0, c0), w_ih, w_hh, b_ih, b_hh)
            else:
                h, c = torch._VF.gru_cell(x, h0, w_ih, w_hh, b_ih, b_hh), None
        except (RuntimeError, TypeError):
            _check_cell(*args)  # a message naming the argument, where the kernel's does not
            raise
    elif lstm:
        _, h, c = lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, (x.shape[0],), False, backend=name)
    else:
        h, c = gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh, (x.shape[0],), False, backend=name)[1], None
    if not batched:
        h, c = h.squeeze(0), (None if c is None else c.squeeze(0))
    return h, c


def gru_cell(input: Tensor, hx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
             b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None, *,
             backend: Optional[str] = None) -> Tensor:
    """One GRU step, as torch.nn.GRUCell: input (B, I) or (I,), hx (B, H) or (H,) or None."""
    return _cell("gru_cell", input, hx, None, w_ih, w_hh, b_ih, b_hh, backend)[0]


def lstm_cell(input: Tensor, state: Optional[Tuple[Tensor, Tensor]], w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None, *,
              backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """One LSTM step, as torch.nn.LSTMCell: returns (h', c')."""
    hx, cx = state if state is not None else (None, None)
    return _cell("lstm_cell", input, hx, cx, w_ih, w_hh, b_ih, b_hh, backend)


def training(tensors) -> bool:
    """Whether a call will need a backward pass (what the dispatch table calls fwd+bwd)."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def backend_for(op: str, device, dtype: torch.dtype = torch.float32, *, batch: int, size: int, training: bool,
                backend: Optional[str] = None, steps: Optional[int] = None) -> str:
    """The backend that a call of `op` ("GRU", "LSTM", "gru_cell", "lstm_cell",
    "additive_attention", "dot_attention") runs on, for tensors of this device and dtype, batch
    `batch`, hidden size (attention: queries per row) `size` and, for a layer, `steps` time
    steps (None: several): what `backend` (None: the process default) resolves to, "auto"
    included. Raises BackendUnavailable as the call would."""
    device = torch.device(device)
    name = dispatch.choose(backend, op, device, dtype, batch, size, training, steps=steps)
    return registry.resolve(None, dispatch.KERNEL_OP[op], device, dtype) if name == "auto" else name


# ------------------------------------------------------------------------------- attention


def _prepare_attention(query: Tensor, keys: Tensor, values: Tensor, mask, lengths, kv_batch_idx,
                       qname: str, kname: str):
    """Checks shared by both scores; returns 3-D query and normalised mask/lengths/index."""
    _check_tensor(qname, query, (2, 3))
    if isinstance(keys, Tensor) and isinstance(values, Tensor):
        query, keys, values = autocast_inputs(query, keys, values)
    _check_tensor(kname, keys, (3,), query)
    _check_tensor("values", values, (3,), query)
    bk, tk = keys.shape[0], keys.shape[1]
    _require(values.shape[:2] == keys.shape[:2],
             lambda: f"values must have shape ({bk}, {tk}, Dv) like {kname}, got {tuple(values.shape)}")
    q = query if query.dim() == 3 else query.unsqueeze(1)
    if kv_batch_idx is None:
        _require(q.shape[0] == bk, lambda: f"{qname} has batch {q.shape[0]} but {kname} has batch {bk} "
                 "(pass kv_batch_idx to map query rows to key rows)")
    kv_batch_idx = _check_index("kv_batch_idx", kv_batch_idx, (q.shape[0],), query.device, bk - 1)
    if mask is not None:
        _require(isinstance(mask, Tensor) and mask.dtype == torch.bool,
                 lambda: f"mask must be a bool tensor (True = real position), got "
                 f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}", TypeError)
        _check_shape("mask", mask, (bk, tk))
        _require(mask.device == query.device, lambda: f"mask is on {mask.device} but {qname} is on {query.device}")
        mask = mask.contiguous()
    lengths = _check_index("lengths", lengths, (bk,), query.device, tk)
    return q, keys, values, mask, lengths, kv_batch_idx


def _pick_attention(backend: Optional[str], op: str, q: Tensor, k: Tensor, values: Tensor, *others) -> str:
    name = dispatch.choose(backend, op, q.device, q.dtype, q.shape[0], q.shape[1], training((q, k, values) + others))
    if q.shape[2] == 0 or values.shape[2] == 0:
        return "torch"  # a zero feature size leaves nothing for a kernel to compute
    return dispatch.kernel_backend(name, op, q, _attention_largest(q, k, values))


def _attention_largest(q: Tensor, k: Tensor, values: Tensor) -> int:
    """Elements in the largest tensor a call reads or writes (the weights are (Bq, Tq, Tk))."""
    return max(q.numel(), k.numel(), values.numel(), q.shape[0] * q.shape[1] * k.shape[1],
               q.shape[0] * k.shape[1] * max(k.shape[2], values.shape[2]))


def additive_attention(q_proj: Tensor, k_proj: Tensor, v: Tensor, values: Tensor,
                       mask: Optional[Tensor] = None, *, lengths: Optional[Tensor] = None,
                       kv_batch_idx: Optional[Tensor] = None,
                       backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Additive (Bahdanau) attention on projected queries and keys.

    e[b,t,s] = v . tanh(q_proj[b,t] + k_proj[b,s]), weights = softmax over valid s,
    context = weights @ values. q_proj (B,A) or (B,Tq,A); k_proj (Bk,Tk,A); v (A,);
    values (Bk,Tk,Dv); mask bool (Bk,Tk), True = real position; lengths (Bk,); kv_batch_idx
    (B,) maps query rows to key rows. Returns context (B,[Tq,]Dv) and weights (B,[Tq,]Tk).
    """
    q, k, vals, mask, lengths, kv_batch_idx = _prepare_attention(
        q_proj, k_proj, values, mask, lengths, kv_batch_idx, "q_proj", "k_proj")
    _check_tensor("v", v, (1,))
    (v,) = autocast_inputs(v)
    _check_tensor("v", v, (1,), q)
    _require(q.shape[2] == k.shape[2] == v.shape[0],
             lambda: f"q_proj, k_proj and v must share the attention size, got {q.shape[2]}, {k.shape[2]}, {v.shape[0]}")
    name = _pick_attention(backend, "additive_attention", q, k, vals, v)
    context, weights = AdditiveAttentionFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), vals.contiguous(), mask, lengths, kv_batch_idx, name)
    return (context, weights) if q_proj.dim() == 3 else (context.squeeze(1), weights.squeeze(1))


def dot_attention(query: Tensor, keys: Tensor, values: Tensor, mask: Optional[Tensor] = None,
                  scale: Optional[float] = None, *, lengths: Optional[Tensor] = None,
                  kv_batch_idx: Optional[Tensor] = None,
                  backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Dot-product (Luong "dot") attention: e = scale * query . keys (scale defaults to 1)."""
    q, k, vals, mask, lengths, kv_batch_idx = _prepare_attention(
        query, keys, values, mask, lengths, kv_batch_idx, "query", "keys")
    _require(q.shape[2] == k.shape[2], lambda: f"query and keys must share the feature size, got {q.shape[2]} and {k.shape[2]}")
    scale = 1.0 if scale is None else float(scale)
    name = _pick_attention(backend, "dot_attention", q, k, vals)
    context, weights = DotAttentionFunction.apply(
        q.contiguous(), k.contiguous(), vals.contiguous(), mask, lengths, kv_batch_idx, scale, name)
    return (context, weights) if query.dim() == 3 else (context.squeeze(1), weights.squeeze(1))
