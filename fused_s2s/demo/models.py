"""An attention encoder-decoder built on the fused modules.

- `Encoder`: embedding + bidirectional multi-layer `GRU`/`LSTM` over padded sequences with
  their lengths (the modules' `lengths=`: packing's results without a PackedSequence, so the
  whole model compiles with torch.compile(fullgraph=True)).
- `AttnDecoder`: one of two classic designs, with either cell type:
  * attention="bahdanau" (Bahdanau et al., 2015): attend with the previous decoder state,
    feed [embedding; context] to the recurrent stack, predict from [state; context; embedding];
  * attention="dot" | "general" | "concat" (Luong et al., 2015): run the recurrent stack on
    [embedding; previous attentional vector] ("input feeding"), attend with the new state,
    attentional vector = tanh(W_c [context; state]), predict from it.
- `Seq2Seq`: ties them together with padding masks, teacher forcing and a loss that ignores
  padding; `encode` and `decode_step` are what greedy and beam search call.

Every recurrent cell and attention call goes through fused_s2s's modules, so the backend
(the `backend=` argument, `fused_s2s.set_backend`, or $FUSED_S2S_BACKEND) picks every kernel.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_s2s import GRU, LSTM, BahdanauAttention, GRUCell, LSTMCell, LuongAttention
from fused_s2s.functional import can_read_values, value_range

from .data import BOS, PAD

CELLS = ("gru", "lstm")
ATTENTIONS = ("bahdanau", "dot", "general", "concat")


def _check_choice(name: str, value: str, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class DecoderState(NamedTuple):
    """Recurrent state of the decoder stack: h (and c for LSTM) of shape (layers, B, H); `feed`
    (B, H) is the previous attentional vector for Luong input feeding (None for Bahdanau)."""
    h: Tensor
    c: Optional[Tensor] = None
    feed: Optional[Tensor] = None

    def select(self, index: Tensor) -> "DecoderState":
        """The state of batch rows `index` (beam search: reorder and repeat hypotheses)."""
        return DecoderState(self.h.index_select(1, index),
                            None if self.c is None else self.c.index_select(1, index),
                            None if self.feed is None else self.feed.index_select(0, index))


class Memory(NamedTuple):
    """The encoded source: keys (Bk,S,D) also used as values, their attention projection
    (computed once per source), the padding mask (Bk,S) (True = real position), and an
    optional kv_batch_idx (B,) mapping each decoder row to its source row (beam search)."""
    keys: Tensor
    proj_keys: Tensor
    mask: Tensor
    kv_batch_idx: Optional[Tensor] = None


class Encoder(nn.Module):
    """Embedding + bidirectional multi-layer GRU/LSTM; `hidden_size` per direction."""

    def __init__(self, vocab_size: int, embedding_size: int = 64, hidden_size: int = 64, num_layers: int = 1,
                 cell: str = "gru", dropout: float = 0.0, bidirectional: bool = True,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        _check_positive(vocab_size=vocab_size, embedding_size=embedding_size, hidden_size=hidden_size,
                        num_layers=num_layers)
        rnn = {"gru": GRU, "lstm": LSTM}[_check_choice("cell", cell, CELLS)]
        self.embedding = nn.Embedding(vocab_size, embedding_size, padding_idx=PAD)
        self.dropout = nn.Dropout(dropout)
        self.rnn = rnn(embedding_size, hidden_size, num_layers, batch_first=True,
                       dropout=dropout if num_layers > 1 else 0.0, bidirectional=bidirectional, backend=backend)
        self.output_size = hidden_size * (2 if bidirectional else 1)

    def forward(self, src: Tensor, lengths: Tensor):
        """src (B,S) int64, lengths (B,) -> (outputs (B,S,output_size), final state as nn.GRU/nn.LSTM
        return it); outputs at padded positions are 0."""
        if src.dim() != 2:
            raise ValueError(f"src must be (batch, time), got shape {tuple(src.shape)}")
        if lengths.shape != src.shape[:1]:
            raise ValueError(f"lengths must have shape ({src.shape[0]},), got {tuple(lengths.shape)}")
        if src.shape[0] and can_read_values(lengths):
            lo, hi = value_range(lengths)
            if lo < 1 or hi > src.shape[1]:
                raise ValueError(f"lengths must lie in [1, {src.shape[1]}], got [{lo}, {hi}]")
        return self.rnn(self.dropout(self.embedding(src)), lengths=lengths)


class AttnDecoder(nn.Module):
    """Attention decoder, Bahdanau style (attention="bahdanau") or Luong style with input
    feeding (attention="dot" | "general" | "concat"), over a stack of GRU or LSTM cells."""

    def __init__(self, vocab_size: int, memory_size: int, embedding_size: int = 64, hidden_size: int = 128,
                 num_layers: int = 1, cell: str = "gru", attention: str = "bahdanau",
                 attention_size: Optional[int] = None, dropout: float = 0.0,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        _check_positive(vocab_size=vocab_size, memory_size=memory_size, embedding_size=embedding_size,
                        hidden_size=hidden_size, num_layers=num_layers)
        self.cell = _check_choice("cell", cell, CELLS)
        self.attention_type = _check_choice("attention", attention, ATTENTIONS)
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.luong = attention != "bahdanau"
        attention_size = attention_size or hidden_size
        self.embedding = nn.Embedding(vocab_size, embedding_size, padding_idx=PAD)
        attention_backend = None if backend == "native" else backend  # native has no attention: auto's choice
        self.dropout = nn.Dropout(dropout)
        if self.luong:
            if attention == "dot" and memory_size != hidden_size:
                raise ValueError(f"attention='dot' needs hidden_size == memory_size, got {hidden_size} and {memory_size}")
            self.attention = LuongAttention(hidden_size, memory_size, score=attention,
                                            hidden_size=attention_size, backend=attention_backend)
            rnn_input = embedding_size + hidden_size  # input feeding
            self.combine = nn.Linear(memory_size + hidden_size, hidden_size, bias=False)
        else:
            self.attention = BahdanauAttention(hidden_size, memory_size, attention_size, backend=attention_backend)
            rnn_input = embedding_size + memory_size
            self.combine = nn.Linear(hidden_size + memory_size + embedding_size, hidden_size)
        cell_cls = GRUCell if cell == "gru" else LSTMCell
        self.cells = nn.ModuleList(cell_cls(rnn_input if i == 0 else hidden_size, hidden_size, backend=backend)
                                   for i in range(num_layers))
        self.generator = nn.Linear(hidden_size, vocab_size)

    def _attend(self, query: Tensor, memory: Memory) -> Tuple[Tensor, Tensor]:
        return self.attention(query, memory.keys, mask=memory.mask, kv_batch_idx=memory.kv_batch_idx,
                              proj_keys=memory.proj_keys)

    def _recur(self, x: Tensor, state: DecoderState) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """One step of the cell stack -> (top output, h (L,B,H), c (L,B,H) or None)."""
        hs, cs = [], []
        for i, cell in enumerate(self.cells):
            if i:
                x = self.dropout(x)
            if self.cell == "gru":
                x = cell(x, state.h[i])
            else:
                x, c = cell(x, (state.h[i], state.c[i]))
                cs.append(c)
            hs.append(x)
        return x, torch.stack(hs), torch.stack(cs) if cs else None

    def step(self, embedded: Tensor, state: DecoderState, memory: Memory):
        """One decoder step: embedded previous token (B,E) -> (output (B,H), new state,
        attention weights (B,S)). `generator(output)` gives the logits."""
        if self.luong:
            top, h, c = self._recur(torch.cat([embedded, state.feed], dim=1), state)
            context, weights = self._attend(top, memory)
            output = torch.tanh(self.combine(torch.cat([context, top], dim=1)))
            return output, DecoderState(h, c, output), weights
        context, weights = self._attend(state.h[-1], memory)
        top, h, c = self._recur(torch.cat([embedded, context], dim=1), state)
        output = torch.tanh(self.combine(torch.cat([top, context, embedded], dim=1)))
        return output, DecoderState(h, c), weights

    def forward(self, tgt_in: Tensor, state: DecoderState, memory: Memory):
        """Teacher forcing over tgt_in (B,T) -> (outputs (B,T,H), attention weights (B,T,S), final state)."""
        embedded = self.dropout(self.embedding(tgt_in))
        outputs, weights = [], []
        for t in range(tgt_in.shape[1]):
            out, state, w = self.step(embedded[:, t], state, memory)
            outputs.append(out)
            weights.append(w)
        return self.dropout(torch.stack(outputs, 1)), torch.stack(weights, 1), state


class Seq2Seq(nn.Module):
    """Encoder-decoder with attention.

    `hidden_size` is the decoder's state size and the encoder's output size (the bidirectional
    encoder runs hidden_size // 2 per direction), so every attention type fits. The encoder's
    final states, both directions concatenated per layer, initialise the decoder through a
    tanh bridge. `config` holds the constructor arguments (saved in checkpoints).
    """

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, embedding_size: int = 64,
                 hidden_size: int = 128, num_layers: int = 1, cell: str = "gru", attention: str = "bahdanau",
                 attention_size: Optional[int] = None, dropout: float = 0.0,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        _check_positive(hidden_size=hidden_size)
        if hidden_size % 2:
            raise ValueError(f"hidden_size must be even (the encoder runs half of it per direction), got {hidden_size}")
        self.config = dict(src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size,
                           embedding_size=embedding_size, hidden_size=hidden_size, num_layers=num_layers,
                           cell=cell, attention=attention, attention_size=attention_size, dropout=dropout)
        self.encoder = Encoder(src_vocab_size, embedding_size, hidden_size // 2, num_layers, cell, dropout,
                               backend=backend)
        self.decoder = AttnDecoder(tgt_vocab_size, hidden_size, embedding_size, hidden_size, num_layers, cell,
                                   attention, attention_size, dropout, backend=backend)
        self.bridge_h = nn.Linear(hidden_size, hidden_size)
        self.bridge_c = nn.Linear(hidden_size, hidden_size) if cell == "lstm" else None
        # PAD and BOS are never predicted: their logits are -inf everywhere (training and decoding)
        never = torch.zeros(tgt_vocab_size)
        never[[PAD, BOS]] = float("-inf")
        self.register_buffer("never_predicted", never, persistent=False)

    def logits(self, decoder_output: Tensor) -> Tensor:
        """Decoder outputs (..., H) -> logits (..., V)."""
        return self.decoder.generator(decoder_output) + self.never_predicted.to(decoder_output.dtype)

    def _bridge(self, final: Tensor, layer: nn.Linear) -> Tensor:
        """(layers*2, B, H/2) final encoder states -> (layers, B, H) initial decoder states."""
        layers, batch, half = self.config["num_layers"], final.shape[1], final.shape[2]
        both = final.view(layers, 2, batch, half).transpose(1, 2).reshape(layers, batch, 2 * half)
        return torch.tanh(layer(both))

    def encode(self, src: Tensor, src_lengths: Tensor) -> Tuple[Memory, DecoderState]:
        """Run the encoder once per source: -> (memory for attention, initial decoder state)."""
        outputs, final = self.encoder(src, src_lengths)
        mask = torch.arange(src.shape[1], device=src.device) < src_lengths.to(src.device)[:, None]
        memory = Memory(outputs, self.decoder.attention.project_keys(outputs), mask)
        if self.bridge_c is None:
            state = DecoderState(self._bridge(final, self.bridge_h))
        else:
            state = DecoderState(self._bridge(final[0], self.bridge_h), self._bridge(final[1], self.bridge_c))
        if self.decoder.luong:
            state = state._replace(feed=outputs.new_zeros(src.shape[0], self.decoder.hidden_size))
        return memory, state

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor, return_attention: bool = False):
        """Teacher-forced logits (B,T,V) for tgt_in = [BOS, y...]; with return_attention, also
        the attention weights (B,T,S)."""
        if src.dim() != 2:
            raise ValueError(f"src must be (batch, time), got shape {tuple(src.shape)}")
        if tgt_in.dim() != 2 or tgt_in.shape[0] != src.shape[0]:
            raise ValueError(f"tgt_in must be (batch={src.shape[0]}, time), got shape {tuple(tgt_in.shape)}")
        memory, state = self.encode(src, src_lengths)
        outputs, weights, _ = self.decoder(tgt_in, state, memory)
        logits = self.logits(outputs)
        return (logits, weights) if return_attention else logits

    def decode_step(self, tokens: Tensor, state: DecoderState, memory: Memory):
        """Previous tokens (B,) -> (log-probabilities (B,V) in float32, new state, attention (B,S))."""
        output, state, weights = self.decoder.step(self.decoder.embedding(tokens), state, memory)
        return F.log_softmax(self.logits(output).float(), dim=-1), state, weights


def sequence_loss(logits: Tensor, tgt_out: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy over the real (non-PAD) target tokens."""
    return F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=PAD,
                           label_smoothing=label_smoothing)
