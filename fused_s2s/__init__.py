"""fused_s2s: fused GRU/LSTM and Bahdanau/Luong attention kernels for RNN seq2seq models.

    import fused_s2s
    rnn = fused_s2s.GRU(256, 512, num_layers=2, bidirectional=True)   # drop-in for nn.GRU
    rnn.load_state_dict(torch_gru.state_dict())
    fused_s2s.set_backend("cpp")   # or backend="triton" per module/function; default "auto"
"""
from . import backends, functional, reference
from .backends import BackendUnavailable, get_backend, set_backend
from .modules import GRU, LSTM, BahdanauAttention, GRUCell, LSTMCell, LuongAttention
from .patch import PatchedGRU, PatchedGRUCell, PatchedLSTM, PatchedLSTMCell
from .patch import patch  # the function (it shadows its submodule's name on purpose)

__version__ = "0.1.0"

__all__ = [
    "GRU", "LSTM", "GRUCell", "LSTMCell", "BahdanauAttention", "LuongAttention",
    "functional", "reference", "backends", "set_backend", "get_backend", "BackendUnavailable", "patch",
    "PatchedGRU", "PatchedLSTM", "PatchedGRUCell", "PatchedLSTMCell",
]
