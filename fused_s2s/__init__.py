"""fused_s2s: fused GRU/LSTM and Bahdanau/Luong attention kernels for RNN seq2seq models.

    import fused_s2s
    rnn = fused_s2s.GRU(256, 512, num_layers=2, bidirectional=True)   # drop-in for nn.GRU
    rnn.load_state_dict(torch_gru.state_dict())
    fused_s2s.set_backend("cpp")   # or backend="triton" per module/function; default "auto"

The package in three layers, imports running one way (demo -> face -> plumbing):
- the public face, here: the nn modules (`modules`), `functional`, `patch`, backend selection;
- `fused_s2s.backends`: how an op reaches a kernel (the reference math, the backends, custom
  ops, autograd Functions, dispatch tables, the extension's build);
- `fused_s2s.demo`: an application on the face (the embedded task, Seq2Seq, decoding,
  training, the command line).
"""
from . import functional
from .backends.info import describe as info
from .backends.registry import BackendUnavailable, get_backend, set_backend
from .modules import GRU, LSTM, BahdanauAttention, GRUCell, LSTMCell, LuongAttention
from .patch import PatchedGRU, PatchedGRUCell, PatchedLSTM, PatchedLSTMCell
from .patch import patch  # the function (it shadows its submodule's name on purpose)

__version__ = "0.1.0"

__all__ = [
    "GRU", "LSTM", "GRUCell", "LSTMCell", "BahdanauAttention", "LuongAttention",
    "functional", "set_backend", "get_backend", "BackendUnavailable", "patch", "info",
    "PatchedGRU", "PatchedLSTM", "PatchedGRUCell", "PatchedLSTMCell",
]
