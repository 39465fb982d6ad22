"""End to end: the demo model (fused_s2s.demo.models.Seq2Seq), ours vs the same model in plain torch.nn.

- train_step: teacher-forced forward, the padding-aware cross-entropy, backward (gradients
  of every parameter; the optimizer step is the same for both and left out);
- greedy_decode: encode, then T decoder steps taking the argmax (no early stop), no_grad;
- greedy_loop: the T decoder steps alone (sources encoded beforehand), also inside a CUDA
  graph with --graphs.
Each reports target tokens per second (B * T / time).

The tutorial-style model (bench/tutorial_model.py: PyTorch's seq2seq tutorial's encoder and
attention decoder, nn.GRU run one step at a time in the decoder) is timed unpatched (`plain
(unpatched)`) and after `fused_s2s.patch(model, backend)` (`ours:<backend>`):
tutorial_train_step (teacher forced, NLL loss, backward) and tutorial_greedy (encode and T
argmax steps, no_grad).

The plain twin has the same parameters: nn.GRU/nn.LSTM (cuDNN on CUDA) over packed sources
for the encoder, nn.GRUCell/nn.LSTMCell for the decoder, and the naive attention code of
bench.attention.
"""
from __future__ import annotations

import copy
import math
from typing import List, NamedTuple

import torch
import torch.nn.functional as TF
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .attention import naive_additive, naive_dot
from .harness import Case, Context, Impl, ours

DTYPE = torch.float32


class Config(NamedTuple):
    name: str
    cell: str
    attention: str
    B: int
    S: int          # source length
    T: int          # target length
    E: int          # embedding size
    H: int          # decoder hidden size (encoder: H/2 per direction)
    layers: int
    vocab: int


CONFIGS = [Config("gru-bahdanau", "gru", "bahdanau", 64, 50, 50, 256, 512, 2, 1000),
           Config("lstm-dot", "lstm", "dot", 64, 50, 50, 256, 512, 2, 1000)]
QUICK_CONFIGS = [Config("gru-bahdanau", "gru", "bahdanau", 4, 6, 6, 16, 32, 1, 20),
                 Config("lstm-dot", "lstm", "dot", 4, 6, 6, 16, 32, 2, 20)]


class NaiveAttention(nn.Module):
    """The model's attention layer computed by the naive code, on the same parameters."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def project_keys(self, keys):
        return self.layer.project_keys(keys)

    def forward(self, query, keys, values=None, mask=None, *, lengths=None, kv_batch_idx=None, proj_keys=None):
        if lengths is not None or kv_batch_idx is not None:
            raise NotImplementedError("the naive baseline takes a mask and one query row per source")
        layer = self.layer
        values = keys if values is None else values
        proj_keys = self.project_keys(keys) if proj_keys is None else proj_keys
        mask = torch.ones(keys.shape[:2], dtype=torch.bool, device=keys.device) if mask is None else mask
        score = getattr(layer, "score", None)
        if isinstance(score, nn.Module):  # additive: Bahdanau, or Luong "concat"
            return naive_additive(score.query_proj(query), proj_keys, score.energy_vector(), values, mask)
        if layer.score_name == "general":
            query = query @ layer.weight
        if layer.scale is not None:
            query = query * layer.scale
        return naive_dot(query, proj_keys, values, mask)


class PackingRNN(nn.Module):
    """nn.GRU/nn.LSTM taking padded input with `lengths=` as the encoder calls it, by packing
    and unpacking: what plain PyTorch code does (a host copy of the lengths included)."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x, hx=None, *, lengths):
        first = self.rnn.batch_first
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=first, enforce_sorted=False)
        out, state = self.rnn(packed, hx)
        return pad_packed_sequence(out, batch_first=first, total_length=x.shape[1 if first else 0])[0], state


def plain_twin(model: nn.Module) -> nn.Module:
    """The same Seq2Seq with every fused module swapped for torch.nn (or naive) code."""
    twin = copy.deepcopy(model)
    rnn = twin.encoder.rnn
    torch_rnn = {"GRU": nn.GRU, "LSTM": nn.LSTM}[type(rnn).__name__](
        rnn.input_size, rnn.hidden_size, rnn.num_layers, bias=rnn.bias, batch_first=rnn.batch_first,
        dropout=rnn.dropout, bidirectional=rnn.bidirectional)
    torch_rnn.load_state_dict(rnn.state_dict())
    twin.encoder.rnn = PackingRNN(torch_rnn)
    cells = []
    for cell in twin.decoder.cells:
        torch_cell = {"GRUCell": nn.GRUCell, "LSTMCell": nn.LSTMCell}[type(cell).__name__](
            cell.input_size, cell.hidden_size, bias=cell.bias)
        torch_cell.load_state_dict(cell.state_dict())
        cells.append(torch_cell)
    twin.decoder.cells = nn.ModuleList(cells)
    twin.decoder.attention = NaiveAttention(twin.decoder.attention)
    p = next(model.parameters())
    return twin.to(device=p.device, dtype=p.dtype)


def _inputs(cfg: Config):
    def make(device, dtype, rg):
        from fused_s2s.demo.models import Seq2Seq
        model = Seq2Seq(cfg.vocab, cfg.vocab, cfg.E, cfg.H, cfg.layers, cfg.cell, cfg.attention)
        model = model.to(device=device, dtype=dtype)
        lengths = torch.randint(math.ceil(cfg.S / 2), cfg.S + 1, (cfg.B,))
        lengths[0] = cfg.S
        src = torch.randint(4, cfg.vocab, (cfg.B, cfg.S))
        src[torch.arange(cfg.S) >= lengths[:, None]] = 0  # PAD
        tgt = torch.randint(4, cfg.vocab, (cfg.B, cfg.T + 1))
        return dict(model=model, src=src.to(device), src_lengths=lengths.to(device),
                    tgt_in=tgt[:, :-1].to(device), tgt_out=tgt[:, 1:].to(device))
    return make


def _train_step(model, d):
    from fused_s2s.demo.models import sequence_loss
    model.train()
    return (lambda: (sequence_loss(model(d["src"], d["src_lengths"], d["tgt_in"]), d["tgt_out"]),)), \
        list(model.parameters())


def _greedy_steps(model, memory, g, steps: int):
    """`steps` greedy steps, no early stop (nothing to sync on: a CUDA graph can capture it)."""
    from fused_s2s.demo.decoding import greedy_step
    out = []
    for step in range(steps):
        tokens, _, g = greedy_step(model, memory, g, step)
        out.append(tokens)
    return (torch.stack(out, 1),)


def _greedy(model, d, steps: int):
    """Encode, then decode: the whole greedy_decode row."""
    from fused_s2s.demo.decoding import GreedyState
    model.eval()

    def decode():
        memory, g = GreedyState.start(model, d["src"], d["src_lengths"], max_len=steps)
        return _greedy_steps(model, memory, g, steps)
    return decode, []


def _greedy_loop(model, d, steps: int):
    """The decoder loop alone, from sources encoded once: the greedy_loop row (per-step work,
    also timed inside a CUDA graph with --graphs)."""
    from fused_s2s.demo.decoding import GreedyState
    model.eval()
    with torch.no_grad():
        memory, start = GreedyState.start(model, d["src"], d["src_lengths"], max_len=steps)
    return (lambda: _greedy_steps(model, memory, start, steps)), []


# op -> (passes, bind(model, inputs, target steps))
OPS = {"train_step": ("fwd+bwd", lambda model, d, steps: _train_step(model, d)),
       "greedy_decode": ("fwd", _greedy),
       "greedy_loop": ("fwd", _greedy_loop)}


def _bind(cfg: Config, op: str, make_model):
    def bind(d):
        return OPS[op][1](make_model(d["model"]), d, cfg.T)
    return bind


def _ours(cfg: Config, op: str):
    def bind_backend(backend: str):
        def make_model(base):
            from fused_s2s.demo.models import Seq2Seq
            model = Seq2Seq(**base.config, backend=backend)
            model.load_state_dict(base.state_dict())
            p = next(base.parameters())
            return model.to(device=p.device, dtype=p.dtype)
        return _bind(cfg, op, make_model)
    return bind_backend


class TutorialConfig(NamedTuple):
    name: str
    B: int
    S: int
    T: int
    H: int
    vocab: int


TUTORIAL_CONFIGS = [TutorialConfig("tutorial", 32, 10, 10, h, 2000) for h in (128, 256)]
QUICK_TUTORIAL_CONFIGS = [TutorialConfig("tutorial", 4, 5, 5, 16, 30)]
DISPATCH_CONFIGS = None  # the dispatch run measures the default configs


def _tutorial_inputs(cfg: TutorialConfig):
    def make(device, dtype, rg):
        from .tutorial_model import TutorialSeq2Seq
        # no dropout: every implementation's outputs are compared before timing
        model = TutorialSeq2Seq(cfg.vocab, cfg.vocab, cfg.H, dropout=0.0).to(device=device, dtype=dtype)
        return dict(model=model, src=torch.randint(1, cfg.vocab, (cfg.B, cfg.S), device=device),
                    tgt=torch.randint(1, cfg.vocab, (cfg.B, cfg.T), device=device))
    return make


def _tutorial_bind(cfg: TutorialConfig, op: str, patch_backend):
    """patch_backend None: the model as written; else a patched copy with that backend."""
    def bind(d):
        model = copy.deepcopy(d["model"])
        if patch_backend is not None:
            import fused_s2s
            fused_s2s.patch(model, backend=patch_backend)
        if op == "tutorial_train_step":
            model.train()
            loss = lambda: (TF.nll_loss(model(d["src"], d["tgt"])[0].flatten(0, 1), d["tgt"].flatten()),)  # noqa: E731
            return loss, list(model.parameters())
        model.eval()
        return (lambda: (model(d["src"], None, cfg.T)[0].argmax(-1),)), []
    return bind


def _tutorial_cases(ctx: Context) -> List[Case]:
    out = []
    for cfg in (QUICK_TUTORIAL_CONFIGS if ctx.quick else TUTORIAL_CONFIGS):
        for dtype in ctx.dtypes_for(DTYPE):
            for op, passes in (("tutorial_train_step", "fwd+bwd"), ("tutorial_greedy", "fwd")):
                impls: List[Impl] = ours(ctx, ("gru_cell",), dtype, lambda b, op=op, cfg=cfg: _tutorial_bind(cfg, op, b))
                impls.append(Impl("plain (unpatched)", _tutorial_bind(cfg, op, None)))
                out.append(Case(family="end_to_end", op=op, config=dict(cfg=cfg.name, B=cfg.B, S=cfg.S, T=cfg.T, H=cfg.H),
                                dtype=dtype, passes=passes, make_inputs=_tutorial_inputs(cfg), impls=impls,
                                unit=("tokens", cfg.B * cfg.T), rotate=False))
    return out


def cases(ctx: Context, configs=None) -> List[Case]:
    try:
        import fused_s2s.demo.models  # noqa: F401
    except Exception:
        return []  # the demo model is not part of this checkout yet
    out = _tutorial_cases(ctx)
    for cfg in configs or (QUICK_CONFIGS if ctx.quick else CONFIGS):
        for dtype in ctx.dtypes_for(DTYPE):
            for op, (passes, _) in OPS.items():
                rnn_op = "gru_cell" if cfg.cell == "gru" else "lstm_cell"
                attn_op = "additive_attention" if cfg.attention in ("bahdanau", "concat") else "dot_attention"
                impls: List[Impl] = ours(ctx, (rnn_op, attn_op), dtype, _ours(cfg, op))
                impls.append(Impl("plain torch.nn", _bind(cfg, op, plain_twin)))
                out.append(Case(
                    family="end_to_end", op=op,
                    config=dict(cfg=cfg.name, B=cfg.B, S=cfg.S, T=cfg.T, E=cfg.E, H=cfg.H, L=cfg.layers),
                    dtype=dtype, passes=passes, make_inputs=_inputs(cfg), impls=impls,
                    unit=("tokens", cfg.B * cfg.T), rotate=False, step=op == "greedy_loop"))
    return out
