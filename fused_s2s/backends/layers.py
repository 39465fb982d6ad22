"""A GRU/LSTM module call on our kernels: the choice of path, one direction interface over the
two kernel paths, and the loop over layers and directions.

The paths (`choose_path`): "native" (PyTorch's fused RNN on our weights, see `native`), the
persistent whole-sequence kernels (`persistent_autograd`: one call per layer direction; on
CUDA one kernel launch, on CPU the C++ time loop) or the per-step kernels (`gru_layer` / `lstm_layer`: the autograd Functions over
the packed-rows layout). Both kernel paths are a `Directions`: `prepare` takes the module's
input rows into the path's layout, a call runs one layer direction (or, where `pairs`, both
directions of a layer at once), and `restore` takes the last layer's output back to rows.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import dispatch, native, persistent_autograd
from .autograd import GRUFunction, LSTMFunction
from .tensors import autocast_inputs

# ------------------------------------------------------------------- one direction, per step


def gru_layer(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
              b_hh: Optional[Tensor], batch_sizes: Sequence[int], reverse: bool, *,
              lengths: Optional[Tensor] = None, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """One GRU layer direction over packed rows x (N, I) -> (output rows (N, H), h_n (B, H)).
    `lengths` (B,) int64 on x's device, with constant batch sizes: row b runs steps t < lengths[b].
    The arguments are those the modules (or the cell functions) have already checked."""
    x, h0, w_ih, w_hh, b_ih, b_hh = autocast_inputs(x, h0, w_ih, w_hh, b_ih, b_hh)
    gx = F.linear(x, w_ih, b_ih).contiguous()  # the input projection: one GEMM for all steps
    return GRUFunction.apply(gx, h0.contiguous(), w_hh.contiguous(), b_hh, tuple(batch_sizes), reverse,
                             dispatch.kernel_backend(backend, "gru_cell", x, gx.numel()), lengths,
                             torch.is_grad_enabled())


def lstm_layer(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
               b_hh: Optional[Tensor], batch_sizes: Sequence[int], reverse: bool, *,
               lengths: Optional[Tensor] = None, backend: Optional[str] = None,
               w_hr: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer direction over packed rows -> (output rows, h_n, c_n); `lengths` as gru_layer.
    `w_hr` (P, H): nn.LSTM's projection (proj_size P); h0, h_n and the output rows are then (., P)."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = autocast_inputs(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    gx = F.linear(x, w_ih, b_ih).contiguous()
    return LSTMFunction.apply(gx, h0.contiguous(), c0.contiguous(), w_hh.contiguous(), b_hh,
                              tuple(batch_sizes), reverse, dispatch.kernel_backend(backend, "lstm_cell", x, gx.numel()),
                              lengths, None if w_hr is None else w_hr.contiguous(), torch.is_grad_enabled())


# ------------------------------------------------------------------------ the choice of path


def backend_choice(op: str, requested: Optional[str], data: Tensor, batch: int, steps: int, hidden: int,
                   packed: bool, lengths: Optional[Tensor], training: bool) -> str:
    """dispatch.choose for one module call: "native" or a kernel backend name (or "auto"), in
    the dtype the call computes in (autocast's, when on)."""
    autocast = torch.is_autocast_enabled(data.device.type)
    dtype = torch.get_autocast_dtype(data.device.type) if autocast else data.dtype
    return dispatch.choose(requested, op, data.device, dtype, batch, hidden, training,
                           native.unsupported_reason(steps, packed, lengths), steps)


def choose_path(op: str, requested: Optional[str], data: Tensor, rows: int, batch: int, steps: int,
                hidden: int, packed: bool, lengths: Optional[Tensor], projected: bool,
                training: bool) -> Tuple[str, str]:
    """("native", "native"), ("persistent", the backend with those kernels) or ("per-step", a
    kernel backend name or "auto") for one module call. op: "GRU" or "LSTM"; data: the input
    (its device and dtype), of `rows` rows over `steps` steps; `projected`: proj_size > 0 (the
    persistent kernels have no projection)."""
    name = backend_choice(op, requested, data, batch, steps, hidden, packed, lengths, training)
    if name == "native":
        return "native", name
    if not projected:
        kernels, _ = persistent_autograd.route(op, name, data, rows, batch, hidden, training)
        if kernels is not None:
            return "persistent", kernels
    return "per-step", name


# ------------------------------------------------------------------- the direction interface

Weights = Tuple[Optional[Tensor], ...]  # (w_ih, w_hh, b_ih, b_hh) and, when projected, w_hr


class Directions:
    """How a kernel path runs layer directions; see the module docstring."""
    pairs = False  # whether one call runs both directions of a layer (stacked weights and states)

    def prepare(self, rows: Tensor) -> Tensor:
        return rows

    def restore(self, out: Tensor) -> Tensor:
        return out

    def __call__(self, x: Tensor, states: List[Tensor], weights: Weights, reverse: bool):
        """-> (output, final h[, final c])."""
        raise NotImplementedError


class PerStepDirections(Directions):
    """The per-step kernels of `backend` over the rows (N, I) of a padded or packed batch."""

    def __init__(self, cell: str, batch_sizes: List[int], lengths: Optional[Tensor], backend: str) -> None:
        self.cell, self.batch_sizes, self.lengths, self.backend = cell, batch_sizes, lengths, backend

    def __call__(self, x, states, weights, reverse):
        if self.cell == "gru":
            return gru_layer(x, states[0], *weights, self.batch_sizes, reverse, lengths=self.lengths,
                             backend=self.backend)
        w_ih, w_hh, b_ih, b_hh, *w_hr = weights
        return lstm_layer(x, states[0], states[1], w_ih, w_hh, b_ih, b_hh, self.batch_sizes, reverse,
                          lengths=self.lengths, backend=self.backend, w_hr=w_hr[0] if w_hr else None)


class PersistentDirections(Directions):
    """The whole-sequence kernels of `kernels` over padded (T, B, I) input, masked by lengths;
    the Triton ones run both directions of a bidirectional layer in one launch."""

    def __init__(self, cell: str, batch_sizes: List[int], lengths: Optional[Tensor], kernels: str,
                 bidirectional: bool) -> None:
        self.cell, self.batch_sizes, self.lengths, self.kernels = cell, batch_sizes, lengths, kernels
        self.pairs = kernels == "triton" and bidirectional
        self._restore: Optional[Callable[[Tensor], Tensor]] = None

    def prepare(self, rows):
        x, self.lengths, self._restore = _to_padded(rows, self.batch_sizes, self.lengths)
        return x

    def restore(self, out):
        return self._restore(out)

    def __call__(self, x, states, weights, reverse):
        run = getattr(persistent_autograd, f"persistent_{self.cell}_layer")  # looked up per call: tests stand in
        return run(x, *states, *weights, self.lengths, reverse, backend=self.kernels)


def _to_padded(data: Tensor, batch_sizes: List[int], lengths: Optional[Tensor]):
    """Rows (N, I) of a padded or packed layout -> (x (T, B, I), lengths on the device or None,
    the function taking output (T, B, H) back to rows)."""
    steps, batch = len(batch_sizes), batch_sizes[0]
    if all(b == batch for b in batch_sizes):  # padded (a packed batch of equal lengths is one too)
        return data.view(steps, batch, data.shape[1]), lengths, lambda out: out.reshape(steps * batch, out.shape[2])
    # packed: rows sorted by length, so the padded batch is in sorted order too
    x, host_lengths = pad_packed_sequence(PackedSequence(data, torch.tensor(batch_sizes)))
    return x, host_lengths.to(data.device), lambda out: pack_padded_sequence(out, host_lengths).data


# ---------------------------------------------------------------- layers and directions


def run_stack(directions: Directions, rows: Tensor, states: List[Tensor],
              weights: Callable[[int, int], Weights], num_layers: int, num_directions: int,
              dropout: float) -> Tuple[Tensor, List[Tensor]]:
    """Every layer and direction of a module call -> (output rows (N, D * output size) in the
    input rows' layout, final states [(L * D, B, size)]). states: [(L * D, B, size)];
    weights(layer, direction): that layer direction's weights; `dropout` between layers (0 when
    the module is not training)."""
    x = directions.prepare(rows)
    finals: List[List[Tensor]] = [[] for _ in states]
    for layer in range(num_layers):
        first = layer * num_directions
        if directions.pairs:
            stacked = tuple(None if w[0] is None else torch.stack(w)
                            for w in zip(*(weights(layer, d) for d in range(num_directions))))
            result = directions(x, [s[first:first + num_directions] for s in states], stacked, False)
            outputs = list(result[0].unbind(0))
            for f, s in zip(finals, result[1:]):
                f.extend(s.unbind(0))
        else:
            outputs = []
            for direction in range(num_directions):
                result = directions(x, [s[first + direction] for s in states], weights(layer, direction),
                                    direction == 1)
                outputs.append(result[0])
                for f, s in zip(finals, result[1:]):
                    f.append(s)
        x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        if dropout > 0 and layer < num_layers - 1:
            x = F.dropout(x, dropout, training=True)
    return directions.restore(x), [torch.stack(f) for f in finals]
