"""The `triton` backend: the kernel contract's eight primitives (see
fused_s2s.backends.torch_backend) as Triton kernels, plus `unsupported_reason` for the backend
registry. One file per op, named as in csrc/cpu and csrc/cuda; `_attention.py` holds what the
attention kernels share. Imports torch and triton only, nothing of fused_s2s: the registry
loads it.

Runs on CUDA tensors (float32, float16, bfloat16), and on CPU tensors under Triton's
interpreter (TRITON_INTERPRET=1 set before triton is imported), which the tests use.
float32 matmuls use exact (IEEE) float32 by default; `set_allow_tf32(True)` lets them use
TensorFloat-32 instead.

Beside the primitives: persistent whole-sequence GRU/LSTM layers for hidden sizes up to 64
(`persistent_rnn`), with the same signatures as the CUDA ones in fused_s2s._C.
"""
from ._common import allow_tf32, set_allow_tf32, unsupported_reason
from .additive_attention import additive_attention_bwd, additive_attention_fwd
from .dot_attention import dot_attention_bwd, dot_attention_fwd
from .gru_cell import gru_cell_bwd, gru_cell_fwd
from .lstm_cell import lstm_cell_bwd, lstm_cell_fwd
from .persistent_rnn import (persistent_gru_bwd, persistent_gru_fwd, persistent_lstm_bwd, persistent_lstm_fwd,
                             persistent_reason)

__all__ = [
    "gru_cell_fwd", "gru_cell_bwd", "lstm_cell_fwd", "lstm_cell_bwd",
    "additive_attention_fwd", "additive_attention_bwd", "dot_attention_fwd", "dot_attention_bwd",
    "unsupported_reason", "set_allow_tf32", "allow_tf32",
    "persistent_gru_fwd", "persistent_gru_bwd", "persistent_lstm_fwd", "persistent_lstm_bwd", "persistent_reason",
]
