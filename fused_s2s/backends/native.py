"""The `native` path: a whole GRU/LSTM module call (every layer and direction) on PyTorch's own
fused RNN (torch._VF.gru / lstm: cuDNN on CUDA, oneDNN or ATen on CPU, what nn.GRU/nn.LSTM
run), on our weights, which are in nn's layout and order. The cells call torch._VF.gru_cell /
lstm_cell directly (see fused_s2s.modules and fused_s2s.functional)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .tensors import can_read_values


def unsupported_reason(steps: int, packed: bool, lengths: Optional[Tensor]) -> Optional[str]:
    """Why PyTorch's fused RNN cannot take this module call, or None."""
    if steps == 0:
        return "PyTorch's RNN kernels need at least one time step"
    if lengths is not None and not can_read_values(lengths):
        return ("lengths= is run by packing, which needs the lengths on the host: not while torch.compile "
                "traces or a CUDA graph captures")
    if packed and torch.compiler.is_compiling():
        return "torch.compile cannot trace PyTorch's packed RNN kernel (data-dependent batch sizes)"
    return None


def run_layers(cell: str, x: Tensor, batch_sizes: Optional[Tensor], states: List[Tensor],
               weights: Sequence[Tensor], setup: Tuple, batch_first: bool, lengths: Optional[Tensor],
               batched: bool) -> Tuple[Tensor, List[Tensor]]:
    """All layers and directions in one call -> (output, final states). cell: "gru" or "lstm";
    x: the packed rows with their batch_sizes, or the padded input as the caller gave it;
    weights: nn's flat weight list; setup: (bias, num_layers, dropout, training, bidirectional)."""
    has_cell_state = cell == "lstm"
    run = torch._VF.lstm if has_cell_state else torch._VF.gru
    hx = tuple(states) if has_cell_state else states[0]
    if batch_sizes is not None:
        result = run(x, batch_sizes, hx, weights, *setup)
        return result[0], list(result[1:])
    if not batched:
        x = x.unsqueeze(0 if batch_first else 1)
    if lengths is None:
        result = run(x, hx, weights, *setup, batch_first)
        return result[0], list(result[1:])
    # lengths=: packed and unpacked around the call (the lengths on the host: no sync on CPU,
    # one on CUDA, as packing costs there); rows of length 0 keep their state, output zeros
    host = lengths.cpu()
    total = x.shape[1 if batch_first else 0]
    if bool((host == total).all()):
        result = run(x, hx, weights, *setup, batch_first)
        return result[0], list(result[1:])
    p = pack_padded_sequence(x, host.clamp(min=1), batch_first=batch_first, enforce_sorted=False)
    sorted_states = [s.index_select(1, p.sorted_indices) for s in states]
    result = run(p.data, p.batch_sizes, tuple(sorted_states) if has_cell_state else sorted_states[0], weights,
                 *setup)
    out, _ = pad_packed_sequence(PackedSequence(result[0], p.batch_sizes, p.sorted_indices, p.unsorted_indices),
                                 batch_first=batch_first, total_length=total)
    final = [s.index_select(1, p.unsorted_indices) for s in result[1:]]
    empty = host == 0
    if bool(empty.any()):
        empty = empty.to(out.device)
        out = out.masked_fill(empty[:, None, None] if batch_first else empty[None, :, None], 0)
        final = [torch.where(empty[None, :, None], s0, s) for s0, s in zip(states, final)]
    return out, final
