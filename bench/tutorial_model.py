"""An encoder and attention decoder shaped like those of PyTorch's seq2seq translation tutorial
(an embedding and a batch-first nn.GRU for the encoder; the decoder runs its nn.GRU one step at
a time on [embedding; Bahdanau context], the attention written out with three nn.Linear), as a
client model that `fused_s2s.patch` is applied to, unchanged otherwise. Written here from the
tutorial's description, for the end-to-end benchmark rows "patched vs unpatched" and the client
tests (tests/test_clients.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EncoderRNN(nn.Module):
    def __init__(self, vocab: int, hidden: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src):
        return self.gru(self.dropout(self.embedding(src)))


class AdditiveAttention(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.w_query, self.w_keys, self.v = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 1)

    def forward(self, query, keys):
        scores = self.v(torch.tanh(self.w_query(query) + self.w_keys(keys))).squeeze(2).unsqueeze(1)
        weights = F.softmax(scores, dim=-1)
        return torch.bmm(weights, keys), weights


class AttnDecoderRNN(nn.Module):
    def __init__(self, hidden: int, vocab: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.attention = AdditiveAttention(hidden)
        self.gru = nn.GRU(2 * hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)
        self.dropout = nn.Dropout(dropout)

    def step(self, token, hidden, memory):
        embedded = self.dropout(self.embedding(token))
        context, weights = self.attention(hidden.permute(1, 0, 2), memory)
        output, hidden = self.gru(torch.cat((embedded, context), dim=2), hidden)
        return self.out(output), hidden, weights

    def forward(self, memory, hidden, targets=None, steps: int = 10, sos: int = 0):
        """-> (log-probabilities (B, T, V), final hidden, attention weights (B, T, S)); teacher
        forcing with `targets`, else greedy for `steps` steps."""
        token = torch.full((memory.shape[0], 1), sos, dtype=torch.long, device=memory.device)
        outputs, attentions = [], []
        for i in range(steps if targets is None else targets.shape[1]):
            logits, hidden, weights = self.step(token, hidden, memory)
            outputs.append(logits)
            attentions.append(weights)
            token = targets[:, i:i + 1] if targets is not None else logits.argmax(-1).detach()
        return F.log_softmax(torch.cat(outputs, dim=1), dim=-1), hidden, torch.cat(attentions, dim=1)


class TutorialSeq2Seq(nn.Module):
    def __init__(self, src_vocab: int, tgt_vocab: int, hidden: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = EncoderRNN(src_vocab, hidden, dropout)
        self.decoder = AttnDecoderRNN(hidden, tgt_vocab, dropout)

    def forward(self, src, targets=None, steps: int = 10):
        memory, hidden = self.encoder(src)
        return self.decoder(memory, hidden, targets, steps)
