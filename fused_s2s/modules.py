"""Drop-in torch.nn modules: same constructors, parameter names, state_dicts and forward
signatures as nn.GRUCell, nn.LSTMCell, nn.GRU and nn.LSTM, plus a `backend=` argument, and the
Bahdanau and Luong attention layers.

GRU/LSTM deliberately do not inherit from nn.RNNBase: torch.compile refuses to trace instances
of it, and compiling a model without a graph break at the RNN is one of the reasons to use
these.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import functional
from .backends import dispatch, layers, native, registry

# ----------------------------------------------------------------------------------- cells


class _CellBase(nn.Module):
    gates: int
    op: str

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        if hidden_size <= 0 or input_size < 0:
            raise ValueError(f"hidden_size must be positive and input_size non-negative, got "
                             f"{hidden_size} and {input_size}")
        kw = {"device": device, "dtype": dtype}
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        self.backend = None if backend is None else registry.check_name(backend)
        self.weight_ih = nn.Parameter(torch.empty(self.gates * hidden_size, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(self.gates * hidden_size, hidden_size, **kw))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(self.gates * hidden_size, **kw))
            self.bias_hh = nn.Parameter(torch.empty(self.gates * hidden_size, **kw))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def _backend_for(self, input, hx) -> Optional[str]:
        """The backend for this step (see fused_s2s.backends.dispatch); None leaves bad input to the
        functional API's checks."""
        if not isinstance(input, Tensor) or input.dim() not in (1, 2):
            return self.backend
        training = torch.is_grad_enabled() and (input.requires_grad or self.weight_hh.requires_grad
                                                or (isinstance(hx, Tensor) and hx.requires_grad))
        return dispatch.choose(self.backend, self.op, input.device, input.dtype,
                               input.shape[0] if input.dim() == 2 else 1, self.hidden_size, training)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        return s + (f", backend={self.backend!r}" if self.backend else "")


class GRUCell(_CellBase):
    """nn.GRUCell with fused kernels: forward(input (B,I) or (I,), hx=None) -> h'."""
    gates, op = 3, "gru_cell"

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        backend = self._backend_for(input, hx)
        if backend == "native" and (hx is None or hx.dim() == input.dim()):
            # nn.GRUCell's own path (its kernel checks shapes and dtypes); no extra cost per step
            batched = input.dim() == 2
            x = input if batched else input.unsqueeze(0)
            h = x.new_zeros(x.shape[0], self.hidden_size) if hx is None else (hx if batched else hx.unsqueeze(0))
            out = torch._VF.gru_cell(x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
            return out if batched else out.squeeze(0)
        return functional.gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                                   backend=backend)


class LSTMCell(_CellBase):
    """nn.LSTMCell with fused kernels: forward(input, (hx, cx)=None) -> (h', c')."""
    gates, op = 4, "lstm_cell"

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        backend = self._backend_for(input, None if hx is None else hx[0])
        if backend == "native" and (hx is None or (len(hx) == 2 and hx[0].dim() == hx[1].dim() == input.dim())):
            batched = input.dim() == 2  # nn.LSTMCell's own path, as GRUCell's
            x = input if batched else input.unsqueeze(0)
            if hx is None:
                zeros = x.new_zeros(x.shape[0], self.hidden_size)
                hx = (zeros, zeros)
            elif not batched:
                hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
            h, c = torch._VF.lstm_cell(x, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
            return (h, c) if batched else (h.squeeze(0), c.squeeze(0))
        return functional.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                                    backend=backend)


# ---------------------------------------------------------------------------------- layers


class _RecurrentLayers(nn.Module):
    """What GRU and LSTM share: parameters named and ordered as in nn.GRU/nn.LSTM, and a
    forward in four short steps: read the input layout (`_read_input`: padded, batch_first,
    unbatched, PackedSequence, padded with `lengths=`), choose the path (backends.layers:
    PyTorch's own RNN, the persistent whole-sequence kernels, or the per-step kernels), run it
    (`_run_native` / `_run_kernels`: layers, directions, dropout), and write the output in the
    caller's layout (`_write_output`). `proj_size` (LSTM only, as in nn.LSTM): h is projected to
    proj_size features by weight_hr_l{k}."""
    gates: int
    has_cell_state: bool
    op: str  # the op's name in the dispatch table

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, backend: Optional[str] = None) -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        if proj_size != 0 and not self.has_cell_state:
            raise ValueError(f"proj_size is only supported for LSTM, not {type(self).__name__}")
        if not isinstance(proj_size, int) or isinstance(proj_size, bool) or not 0 <= proj_size < hidden_size:
            raise ValueError(f"proj_size must be an integer in [0, hidden_size) = [0, {hidden_size}) "
                             f"(0: no projection), got {proj_size!r}")
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout <= 1) or isinstance(dropout, bool):
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, proj_size
        self.backend = None if backend is None else registry.check_name(backend)
        kw = {"device": device, "dtype": dtype}
        g = self.gates * hidden_size
        self._flat_weights_names: List[str] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else self.output_size * self.num_directions
            for suffix in self._suffixes():
                shapes = [("weight_ih", (g, layer_input)), ("weight_hh", (g, self.output_size))]
                if bias:
                    shapes += [("bias_ih", (g,)), ("bias_hh", (g,))]
                if proj_size:
                    shapes.append(("weight_hr", (proj_size, hidden_size)))
                for kind, shape in shapes:
                    name = f"{kind}_l{layer}{suffix}"
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **kw)))
                    self._flat_weights_names.append(name)
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        """Features of h (and of each direction's output): proj_size if set, else hidden_size."""
        return self.proj_size or self.hidden_size

    def _suffixes(self) -> Tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def flatten_parameters(self) -> None:
        """No-op, for code written for nn.RNNBase (our weights need no flat buffer)."""

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        per = (4 if self.bias else 2) + (1 if self.proj_size else 0)
        flat = [getattr(self, n) for n in self._flat_weights_names]
        return [flat[i:i + per] for i in range(0, len(flat), per)]

    def _weights(self, layer: int, suffix: str):
        """(w_ih, w_hh, b_ih, b_hh), then w_hr when projected."""
        get = lambda kind: getattr(self, f"{kind}_l{layer}{suffix}", None)  # noqa: E731
        return (get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh")) + \
            ((get("weight_hr"),) if self.proj_size else ())

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        for name, default in (("proj_size", 0), ("num_layers", 1), ("bias", True), ("batch_first", False),
                              ("dropout", 0.0), ("bidirectional", False), ("backend", None)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)!r}"
        return s

    # -- forward ---------------------------------------------------------------------------

    def forward(self, input: Union[Tensor, PackedSequence], hx=None, *, lengths: Optional[Tensor] = None):
        """As nn.GRU/nn.LSTM. `lengths` (B,) integer, ours alone: batched padded input where row b
        is a sequence of lengths[b] steps. Same results as packing it (outputs zero past a row's
        length, the final state is the one after its last step), without a PackedSequence: the
        lengths stay on the device, so there is no host sync and torch.compile needs no break."""
        seq = _read_input(input, lengths, self.batch_first, self.input_size, type(self).__name__)
        autocast = torch.is_autocast_enabled(seq.data.device.type)  # then dtypes may differ
        first = self.weight_ih_l0
        if (seq.data.dtype != first.dtype and not autocast) or seq.data.device != first.device:
            raise RuntimeError(f"input ({seq.data.dtype}, {seq.data.device}) and parameters ({first.dtype}, "
                               f"{first.device}) must have the same dtype and device")
        states = self._initial_states(hx, seq, autocast)

        steps = len(seq.batch_sizes)
        rows = seq.data.shape[0] if seq.packed is not None else steps * seq.batch
        training = torch.is_grad_enabled() and (seq.data.requires_grad or self.weight_hh_l0.requires_grad
                                                or any(s.requires_grad for s in states))
        path, backend = layers.choose_path(self.op, self.backend, seq.data, rows, seq.batch, steps, self.hidden_size,
                                           seq.packed is not None, seq.lengths, bool(self.proj_size), training)
        if path == "native":
            out, final = self._run_native(seq, states)
        else:
            out, final = self._run_kernels(seq, states, path, backend)
        return _write_output(seq, out, final, path == "native", self.batch_first, self.has_cell_state)

    def _initial_states(self, hx, seq: "_Input", autocast: bool) -> List[Tensor]:
        """[h_0] or [h_0, c_0], each (L * D, B, size), in the order of the rows that run (a
        PackedSequence's sorted order)."""
        data, batch = seq.data, seq.batch
        if hx is None:
            zeros = lambda size: data.new_zeros(self.num_layers * self.num_directions, batch, size)  # noqa: E731
            return [zeros(self.output_size)] + ([zeros(self.hidden_size)] if self.has_cell_state else [])
        names = ("h_0", "c_0") if self.has_cell_state else ("hx",)
        given = list(hx) if self.has_cell_state else [hx]
        if self.has_cell_state and len(given) != 2:
            raise TypeError("hx must be a tuple (h_0, c_0) for LSTM")
        states = []
        for name, s in zip(names, given):
            if isinstance(s, Tensor) and not seq.batched:
                if s.dim() != 2:
                    raise RuntimeError(f"For unbatched 2-D input, {name} should also be 2-D but got {s.dim()}-D tensor")
                s = s.unsqueeze(1)
            self._check_state(name, s, data, batch, autocast)
            states.append(s)
        if seq.packed is not None and seq.packed.sorted_indices is not None:  # they come in the caller's order
            states = [s.index_select(1, seq.packed.sorted_indices) for s in states]
        return states

    def _check_state(self, name: str, state: Tensor, x: Tensor, batch: int, autocast: bool) -> None:
        size = self.hidden_size if name == "c_0" else self.output_size
        expected = (self.num_layers * self.num_directions, batch, size)
        if not isinstance(state, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(state).__name__}")
        if tuple(state.shape) != expected:
            raise RuntimeError(f"Expected {name} size {expected}, got {tuple(state.shape)}")
        if (state.dtype != x.dtype and not autocast) or state.device != x.device:
            raise RuntimeError(f"{name} must have the input's dtype and device ({x.dtype}, {x.device}), "
                               f"got ({state.dtype}, {state.device})")

    def _run_native(self, seq: "_Input", states: List[Tensor]):
        """The whole call on PyTorch's fused RNN, in the caller's layout (see backends.native)."""
        params = self._parameters  # (getattr for a weight that is no longer a plain Parameter, e.g. parametrized)
        flat = [params[n] if n in params else getattr(self, n) for n in self._flat_weights_names]  # nn's order
        setup = (self.bias, self.num_layers, self.dropout, self.training, self.bidirectional)
        packed = seq.packed
        return native.run_layers(self.op.lower(), seq.input if packed is None else packed.data,
                                 None if packed is None else packed.batch_sizes, states, flat, setup, self.batch_first,
                                 seq.lengths, seq.batched)

    def _run_kernels(self, seq: "_Input", states: List[Tensor], path: str, backend: str):
        """Our kernels, layer by layer and direction by direction (see backends.layers) ->
        (output rows (N, D * output_size), final states)."""
        # padded input as rows (T*B, I): a copy when batch_first
        rows = seq.data if seq.packed is not None else seq.data.reshape(-1, seq.data.shape[2])
        if seq.lengths is not None:  # padding is ignored as packing would, even NaN
            padding = torch.arange(len(seq.batch_sizes), device=rows.device)[:, None] >= seq.lengths  # (T, B)
            rows = rows.masked_fill(padding.reshape(-1, 1), 0)
        cell = self.op.lower()
        if path == "persistent":
            directions = layers.PersistentDirections(cell, seq.batch_sizes, seq.lengths, backend, self.bidirectional)
        else:
            directions = layers.PerStepDirections(cell, seq.batch_sizes, seq.lengths, backend)
        suffixes = self._suffixes()
        return layers.run_stack(directions, rows, states, lambda layer, d: self._weights(layer, suffixes[d]),
                                self.num_layers, self.num_directions, self.dropout if self.training else 0.0)


class _Input(NamedTuple):
    """A GRU/LSTM call's input, read once: `data` is the packed rows (N, I) or the padded input
    time-major (T, B, I) (a view of `input`), `batch_sizes` the rows of each step, `lengths` the
    checked int64 lengths of padded input (or None)."""
    input: Tensor
    data: Tensor
    batch_sizes: List[int]
    batch: int
    batched: bool
    packed: Optional[PackedSequence]
    lengths: Optional[Tensor]


def _read_input(input, lengths: Optional[Tensor], batch_first: bool, input_size: int, module: str) -> _Input:
    """The input layouts nn.GRU/nn.LSTM take (padded, batch_first, unbatched, PackedSequence)
    and ours (padded with `lengths=`), checked as nn checks them."""
    if isinstance(input, PackedSequence):
        if lengths is not None:
            raise ValueError("lengths is for padded input; a PackedSequence carries its own")
        batch_sizes = input.batch_sizes.tolist()
        seq = _Input(input.data, input.data, batch_sizes, batch_sizes[0] if batch_sizes else 0, True, input, None)
    else:
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a Tensor or PackedSequence, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"{module}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if batch_first and batched:
            x = x.transpose(0, 1)
        steps, batch = x.shape[0], x.shape[1]
        if lengths is not None:
            if not batched:
                raise ValueError("lengths needs batched (3-D) input")
            lengths = functional._check_index("lengths", lengths, (batch,), x.device, steps)
        seq = _Input(input, x, [batch] * steps, batch, batched, None, lengths)
    if seq.data.shape[-1] != input_size:
        raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {input_size}, "
                           f"got {seq.data.shape[-1]}")
    if not seq.data.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {seq.data.dtype}")
    return seq


def _write_output(seq: _Input, out: Tensor, final: List[Tensor], native_layout: bool, batch_first: bool,
                  has_cell_state: bool):
    """(output, h_n) or (output, (h_n, c_n)) in the caller's layout. out: in the input's layout
    when `native_layout` (PyTorch's RNN ran), else rows (N, D * size)."""
    packed = seq.packed
    if packed is not None:
        if packed.unsorted_indices is not None:
            final = [s.index_select(1, packed.unsorted_indices) for s in final]
        output = PackedSequence(out, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    else:
        if native_layout:
            output = out if seq.batched else out.squeeze(0 if batch_first else 1)
        else:
            output = out.reshape(len(seq.batch_sizes), seq.batch, out.shape[-1])
            if batch_first and seq.batched:
                output = output.transpose(0, 1)
            if not seq.batched:
                output = output.squeeze(1)
        if not seq.batched:
            final = [s.squeeze(1) for s in final]
    return output, (tuple(final) if has_cell_state else final[0])


class GRU(_RecurrentLayers):
    """nn.GRU with fused kernels. forward(input, hx=None, *, lengths=None) -> (output, h_n)."""
    gates, has_cell_state, op = 3, False, "GRU"


class LSTM(_RecurrentLayers):
    """nn.LSTM with fused kernels. forward(input, (h_0, c_0)=None, *, lengths=None) -> (output, (h_n, c_n)).
    With proj_size = P > 0 (LSTMP): h_n and the output have P features per direction, c_n keeps
    hidden_size, and each layer direction has weight_hr_l{k}[_reverse] (P, hidden_size), as nn.LSTM."""
    gates, has_cell_state, op = 4, True, "LSTM"


# ------------------------------------------------------------------------------- attention


class _AdditiveScore(nn.Module):
    """e = v . tanh(W_q q + b + W_k k): the bias sits in the query projection, and W_k k is
    computed once per source by project_keys()."""

    def __init__(self, query_size: int, key_size: int, hidden_size: int, normalize: bool,
                 device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.query_proj = nn.Linear(query_size, hidden_size, bias=True, **kw)
        self.key_proj = nn.Linear(key_size, hidden_size, bias=False, **kw)
        bound = 1.0 / math.sqrt(hidden_size)
        self.energy = nn.Parameter(torch.empty(hidden_size, **kw).uniform_(-bound, bound))
        self.normalize = normalize
        if normalize:  # weight normalisation of v (Salimans & Kingma; TF-Addons, GNMT)
            self.energy_gain = nn.Parameter(torch.full((), bound, **kw))

    def energy_vector(self) -> Tensor:
        if not self.normalize:
            return self.energy
        return self.energy_gain * self.energy / self.energy.norm()

    def attend(self, query, proj_keys, values, mask, lengths, kv_batch_idx, backend):
        return functional.additive_attention(self.query_proj(query), proj_keys, self.energy_vector(), values,
                                             mask, lengths=lengths, kv_batch_idx=kv_batch_idx, backend=backend)


class BahdanauAttention(nn.Module):
    """Additive attention (Bahdanau et al., 2015): e[t,s] = v . tanh(W_q q_t + b + W_k k_s).

    forward(query (B,Dq) or (B,Tq,Dq), keys (Bk,Tk,Dk), values=None (defaults to keys),
    mask=None (bool (Bk,Tk), True = real position), *, lengths=None, kv_batch_idx=None,
    proj_keys=None) -> (context, weights). Call `project_keys(keys)` once per source sequence
    and pass the result as `proj_keys=` at every decoder step to skip re-projecting the keys.
    """

    def __init__(self, query_size: int, key_size: int, hidden_size: int, normalize: bool = False,
                 device=None, dtype=None, backend: Optional[str] = None) -> None:
        super().__init__()
        self.backend = None if backend is None else registry.check_name(backend)
        self.score = _AdditiveScore(query_size, key_size, hidden_size, normalize, device, dtype)

    def project_keys(self, keys: Tensor) -> Tensor:
        return self.score.key_proj(keys)

    def forward(self, query: Tensor, keys: Tensor, values: Optional[Tensor] = None,
                mask: Optional[Tensor] = None, *, lengths: Optional[Tensor] = None,
                kv_batch_idx: Optional[Tensor] = None, proj_keys: Optional[Tensor] = None):
        proj_keys = self.project_keys(keys) if proj_keys is None else proj_keys
        return self.score.attend(query, proj_keys, keys if values is None else values, mask, lengths,
                                 kv_batch_idx, self.backend)


class LuongAttention(nn.Module):
    """Multiplicative attention (Luong et al., 2015), score "dot" (e = q.k, times `scale` if
    given), "general" (e = q.W k, computed as (W^T q).k: one small GEMM per step instead of
    projecting every key) or "concat" (additive, with `hidden_size`, default query_size).
    Same forward and project_keys as BahdanauAttention."""

    def __init__(self, query_size: int, key_size: int, score: str = "dot", hidden_size: Optional[int] = None,
                 scale: Optional[float] = None, device=None, dtype=None, backend: Optional[str] = None) -> None:
        super().__init__()
        if score not in ("dot", "general", "concat"):
            raise ValueError(f"score must be 'dot', 'general' or 'concat', got {score!r}")
        if score == "dot" and query_size != key_size:
            raise ValueError(f"score='dot' needs query_size == key_size, got {query_size} and {key_size}")
        self.score_name, self.scale = score, scale
        self.backend = None if backend is None else registry.check_name(backend)
        kw = {"device": device, "dtype": dtype}
        if score == "general":
            self.weight = nn.Parameter(torch.empty(query_size, key_size, **kw))
            nn.init.uniform_(self.weight, -1 / math.sqrt(key_size), 1 / math.sqrt(key_size))
        if score == "concat":
            self.score = _AdditiveScore(query_size, key_size, hidden_size or query_size, False, device, dtype)

    def project_keys(self, keys: Tensor) -> Tensor:
        return self.score.key_proj(keys) if self.score_name == "concat" else keys

    def forward(self, query: Tensor, keys: Tensor, values: Optional[Tensor] = None,
                mask: Optional[Tensor] = None, *, lengths: Optional[Tensor] = None,
                kv_batch_idx: Optional[Tensor] = None, proj_keys: Optional[Tensor] = None):
        values = keys if values is None else values
        proj_keys = self.project_keys(keys) if proj_keys is None else proj_keys
        if self.score_name == "concat":
            return self.score.attend(query, proj_keys, values, mask, lengths, kv_batch_idx, self.backend)
        if self.score_name == "general":
            query = query @ self.weight  # (W^T q) for each query row
        return functional.dot_attention(query, proj_keys, values, mask, self.scale, lengths=lengths,
                                        kv_batch_idx=kv_batch_idx, backend=self.backend)

    def extra_repr(self) -> str:
        return f"score={self.score_name!r}" + (f", scale={self.scale}" if self.scale is not None else "")
