"""Batched greedy decoding and batched beam search.

Both run the encoder once per source and reuse its key projections at every step (they live
in the `Memory` that `Seq2Seq.encode` returns). Beam search keeps one decoder row per
hypothesis but never copies the encoder memory per beam: `Memory.kv_batch_idx` maps each
row to its source row and the attention ops read the shared keys through it.

Any model with `encode(src, src_lengths) -> (memory, state)` and
`decode_step(tokens, state, memory) -> (log_probs (B,V), state, weights (B,S))`, where
`state.select(index)` picks batch rows and `memory` is a `Memory`, can be decoded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .data import BOS, EOS, PAD, Vocab, encode_sources


@dataclass
class Hypotheses:
    """One decoded hypothesis per source.

    tokens (B,T) int64, ending with EOS (unless the length limit cut it), PAD after; lengths (B,)
    counts tokens up to and including EOS; log_probs (B,) is the sum of the token
    log-probabilities (not length-normalised); attention (B,T,S) when asked for.
    """
    tokens: Tensor
    lengths: Tensor
    log_probs: Tensor
    attention: Optional[Tensor] = None


def _length_limits(src: Tensor, src_lengths: Tensor, max_len: Optional[int]) -> Tensor:
    """(B,) int64: how many tokens each source may produce. The default, 2 * source length + 10,
    is per source, so a source decodes the same whatever batch it is in."""
    if not isinstance(src, Tensor) or src.dim() != 2 or src.shape[0] == 0:
        raise ValueError(f"src must be a non-empty (batch, time) tensor, got {getattr(src, 'shape', src)}")
    if not isinstance(src_lengths, Tensor) or src_lengths.shape != src.shape[:1]:
        raise ValueError(f"src_lengths must be a ({src.shape[0]},) tensor, got "
                         f"{getattr(src_lengths, 'shape', src_lengths)}")
    if max_len is None:
        return 2 * src_lengths.to(src.device, torch.long) + 10
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    return torch.full((src.shape[0],), max_len, dtype=torch.long, device=src.device)


@dataclass
class GreedyState:
    """What greedy decoding carries from step to step, all on the device: the last tokens (B,),
    the decoder state, which rows are finished (B,) bool, their summed log-probabilities (B,),
    and each row's length limit (B,)."""
    tokens: Tensor
    decoder: object
    finished: Tensor
    log_probs: Tensor
    limits: Tensor

    @classmethod
    def start(cls, model, src: Tensor, src_lengths: Tensor, max_len: Optional[int] = None):
        """Encode the sources -> (memory, the state before the first step)."""
        limits = _length_limits(src, src_lengths, max_len)
        memory, decoder = model.encode(src, src_lengths)
        batch, device = src.shape[0], src.device
        return memory, cls(torch.full((batch,), BOS, dtype=torch.long, device=device), decoder,
                           torch.zeros(batch, dtype=torch.bool, device=device), torch.zeros(batch, device=device),
                           limits)


def greedy_step(model, memory, g: GreedyState, step: int):
    """Greedy step number `step` (from 0): -> (emitted tokens (B,), attention weights (B,S),
    the next GreedyState). No host sync and no data-dependent shape, so a run of steps can be
    captured in a CUDA graph; rows already finished emit PAD."""
    step_log_probs, decoder, weights = model.decode_step(g.tokens, g.decoder, memory)
    best, tokens = step_log_probs.max(dim=-1)
    tokens = tokens.masked_fill(g.finished, PAD)
    log_probs = g.log_probs + best.masked_fill(g.finished, 0.0)
    finished = g.finished | (tokens == EOS) | (step + 1 >= g.limits)
    return tokens, weights, GreedyState(tokens, decoder, finished, log_probs, g.limits)


@torch.no_grad()
def greedy_decode(model, src: Tensor, src_lengths: Tensor, max_len: Optional[int] = None,
                  return_attention: bool = False) -> Hypotheses:
    """Pick the most likely token at each step, for every source of the batch at once; stops
    when every row has finished (one host sync per step for that check)."""
    memory, g = GreedyState.start(model, src, src_lengths, max_len)
    out: List[Tensor] = []
    attention: List[Tensor] = []
    for step in range(int(g.limits.max())):
        tokens, weights, g = greedy_step(model, memory, g, step)
        out.append(tokens)
        if return_attention:
            attention.append(weights)
        if bool(g.finished.all()):
            break
    tokens = torch.stack(out, dim=1)
    return Hypotheses(tokens, (tokens != PAD).sum(1), g.log_probs,
                      torch.stack(attention, dim=1) if return_attention else None)


@torch.no_grad()
def beam_search(model, src: Tensor, src_lengths: Tensor, beam_size: int = 5, max_len: Optional[int] = None,
                length_penalty: float = 1.0, return_attention: bool = False) -> Hypotheses:
    """Batched beam search; returns the best hypothesis per source.

    Hypotheses are ranked by log-probability / length ** length_penalty (0: the raw
    log-probability; 1: the per-token average). Each step takes the best 2k extensions of the
    k live hypotheses of a source: those ending in EOS within the top k are set aside as
    finished (per hypothesis, never lost afterwards), the best k others stay live. A source is
    done once it has k finished hypotheses, or, with length_penalty=0, once its best finished
    one scores at least as well as every live one (log-probabilities only fall as a
    hypothesis grows), or at its length limit (then, if none finished, its best live one is
    the answer). Beam size 1 is greedy decoding.
    """
    limits = _length_limits(src, src_lengths, max_len)
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive int, got {beam_size!r}")
    if length_penalty < 0:
        raise ValueError(f"length_penalty must be >= 0, got {length_penalty}")
    device, batch, k = src.device, src.shape[0], beam_size
    rows = batch * k
    memory, state = model.encode(src, src_lengths)
    # row b*k + j is beam j of source b; every row reads source b's keys through kv_batch_idx
    memory = memory._replace(kv_batch_idx=torch.arange(batch, device=device).repeat_interleave(k))
    state = state.select(memory.kv_batch_idx)
    row_base = (torch.arange(batch, device=device) * k)[:, None]
    sources = torch.arange(batch, device=device)
    first_k = torch.arange(2 * k, device=device) < k

    scores = torch.zeros(batch, k, device=device)
    scores[:, 1:] = float("-inf")  # the beams start identical: keep one so the first step has no duplicates
    scores = scores.view(rows)
    tokens = torch.full((rows,), BOS, dtype=torch.long, device=device)
    best = _Best(batch, device)
    num_finished = torch.zeros(batch, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    history: List[Tensor] = []
    parents: List[Tensor] = []
    attention: List[Tensor] = []
    for step in range(int(limits.max())):
        step_log_probs, state, weights = model.decode_step(tokens, state, memory)
        vocab = step_log_probs.shape[-1]
        if return_attention:
            attention.append(weights)
        # every live hypothesis has step + 1 tokens after this step, so the raw score ranks them
        candidates = (scores[:, None] + step_log_probs).view(batch, k * vocab)
        top, pick = candidates.topk(2 * k, dim=1)
        token, parent = pick % vocab, row_base + pick // vocab
        is_eos = token == EOS

        # set aside the EOS extensions that rank within the top k
        finishing = is_eos & first_k & ~done[:, None]
        norm = (top / float(step + 1) ** length_penalty).masked_fill(~finishing, float("-inf"))
        cand_norm, cand_pos = norm.max(dim=1)
        best.offer(cand_norm, top[sources, cand_pos], step, parent[sources, cand_pos], eos=True)
        num_finished += finishing.sum(dim=1)

        # the best k extensions that do not end stay live (a row adds at most one EOS, so at
        # least k of the 2k are not EOS)
        keep = torch.where(is_eos, 2 * k, torch.arange(2 * k, device=device)).topk(k, dim=1, largest=False).indices
        scores = top.gather(1, keep).view(rows)
        tokens = token.gather(1, keep).view(rows)
        parent = parent.gather(1, keep).view(rows)
        state = state.select(parent)
        history.append(tokens)
        parents.append(parent)

        # a source at its length limit with nothing finished answers with its best live hypothesis
        at_limit = (step + 1 >= limits) & ~done
        live_best, live_pos = scores.view(batch, k).max(dim=1)
        fallback = at_limit & (num_finished == 0)
        live_norm = live_best / float(step + 1) ** length_penalty
        best.offer(torch.where(fallback, live_norm, float("-inf")), live_best, step,
                   row_base[:, 0] + live_pos, eos=False)
        done |= at_limit | (num_finished >= k)
        if length_penalty == 0:
            done |= best.raw >= live_best
        if bool(done.all()):
            break
    return _backtrack(history, parents, attention if return_attention else None, best)


class _Best:
    """Per source, the best answer found so far and where its tokens are."""

    def __init__(self, batch: int, device) -> None:
        self.norm = torch.full((batch,), float("-inf"), device=device)
        self.raw = torch.full((batch,), float("-inf"), device=device)
        self.step = torch.zeros(batch, dtype=torch.long, device=device)
        self.row = torch.zeros(batch, dtype=torch.long, device=device)
        self.eos = torch.zeros(batch, dtype=torch.bool, device=device)

    def offer(self, norm: Tensor, raw: Tensor, step: int, row: Tensor, eos: bool) -> None:
        """Take the candidates whose normalised score beats the current answer.

        eos=True: the answer is the hypothesis on `row` (as it was before `step`) plus an EOS at
        `step`; eos=False: the live hypothesis on `row` after `step`."""
        better = norm > self.norm
        self.norm = torch.where(better, norm, self.norm)
        self.raw = torch.where(better, raw, self.raw)
        self.step = torch.where(better, torch.full_like(self.step, step), self.step)
        self.row = torch.where(better, row, self.row)
        self.eos = torch.where(better, torch.full_like(self.eos, eos), self.eos)


def _backtrack(history: List[Tensor], parents: List[Tensor], attention: Optional[List[Tensor]],
               best: _Best) -> Hypotheses:
    """Rebuild each source's answer from the per-step tokens and back-pointers."""
    end, row, eos = best.step, best.row.clone(), best.eos
    tokens = torch.full((len(row), int(end.max()) + 1), PAD, dtype=torch.long, device=row.device)
    tokens[eos, end[eos]] = EOS
    att = None
    if attention is not None:
        att = attention[0].new_zeros(len(row), tokens.shape[1], attention[0].shape[-1])
    for t in range(tokens.shape[1] - 1, -1, -1):
        at_eos = eos & (t == end)
        walk = (t < end) | (~eos & (t == end))  # positions whose token is in the history
        if attention is not None:
            # the step-t weights were computed on the row that step t extended
            extended = torch.where(at_eos, row, parents[t][row])
            att[t <= end, t] = attention[t][extended][t <= end]
        tokens[walk, t] = history[t][row][walk]
        row = torch.where(walk, parents[t][row], row)
    return Hypotheses(tokens, end + 1, best.raw, att)


def decode(model, src: Tensor, src_lengths: Tensor, beam_size: int = 1, **kwargs) -> Hypotheses:
    """Greedy decoding for beam_size 1, beam search otherwise."""
    if beam_size == 1:
        return greedy_decode(model, src, src_lengths, **kwargs)
    return beam_search(model, src, src_lengths, beam_size, **kwargs)


def translate(model, texts: Sequence[str], src_vocab: Vocab, tgt_vocab: Vocab, beam_size: int = 1,
              batch_size: int = 256, **kwargs) -> List[str]:
    """Decode a list of source texts to target texts."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: List[str] = []
    try:
        for i in range(0, len(texts), batch_size):
            src, lengths = encode_sources(list(texts[i: i + batch_size]), src_vocab)
            hyp = decode(model, src.to(device), lengths.to(device), beam_size, **kwargs)
            results += [tgt_vocab.decode(row) for row in hyp.tokens.tolist()]
    finally:
        model.train(was_training)
    return results
