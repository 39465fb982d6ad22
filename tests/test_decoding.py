import itertools
import math

import pytest
import torch

from fused_s2s.demo.data import BOS, EOS, PAD, date_task, date_vocabs, make_batch, training_batches
from fused_s2s.demo.decoding import GreedyState, beam_search, decode, greedy_decode, greedy_step, translate
from fused_s2s.demo.models import DecoderState, Memory, Seq2Seq
from fused_s2s.demo.train import evaluate, train


def build(cell, attention, seed=0):
    torch.manual_seed(seed)
    src_vocab, tgt_vocab = date_vocabs()
    return Seq2Seq(len(src_vocab), len(tgt_vocab), 16, 32, cell=cell, attention=attention, backend="torch")


@pytest.fixture(scope="module", params=[("gru", "bahdanau"), ("lstm", "general")], ids=lambda p: "-".join(p))
def trained(request):
    """A model trained briefly: it writes well-formed dates but is unsure of them, so beam
    search finds better hypotheses than greedy on many of these examples."""
    model = build(*request.param)
    src_vocab, tgt_vocab = date_vocabs()
    train_pairs, test_pairs = date_task(5000, 64, seed=1)
    train(model, training_batches(train_pairs, src_vocab, tgt_vocab, 64, seed=1), 150, lr=5e-3, progress=False)
    return model.eval(), make_batch(test_pairs, src_vocab, tgt_vocab)


def teacher_forced_log_prob(model, batch, tokens):
    """Sum of log p(token) of each row of `tokens` (up to its EOS) under teacher forcing, using
    the same per-step distribution the decoders use."""
    memory, state = model.encode(batch.src, batch.src_lengths)
    previous = torch.full((tokens.shape[0],), BOS)
    total = torch.zeros(tokens.shape[0])
    for t in range(tokens.shape[1]):
        log_probs, state, _ = model.decode_step(previous, state, memory)
        step = log_probs.gather(1, tokens[:, t:t + 1])[:, 0]
        total += torch.where(tokens[:, t] == PAD, torch.zeros_like(step), step)
        previous = tokens[:, t]
    return total


def check_hypotheses(hyp, batch_size):
    assert hyp.tokens.shape[0] == batch_size and hyp.lengths.shape == (batch_size,)
    for row, n in zip(hyp.tokens.tolist(), hyp.lengths.tolist()):
        assert PAD not in row[:n] and BOS not in row and all(t == PAD for t in row[n:])
        assert EOS not in row[:n - 1]


def run_greedy_steps(model, src, src_lengths, steps, max_len=None):
    """`steps` greedy steps with no early stop: the loop a CUDA graph captures."""
    memory, g = GreedyState.start(model, src, src_lengths, max_len)
    tokens = []
    for step in range(steps):
        emitted, _, g = greedy_step(model, memory, g, step)
        tokens.append(emitted)
    return torch.stack(tokens, 1), g


def test_fixed_step_greedy_loop_matches_greedy_decode(trained):
    """Running past the point where every row finished only appends PAD: the fixed-length
    loop (no host sync) gives greedy_decode's tokens and log-probabilities."""
    model, batch = trained
    with torch.no_grad():
        expected = greedy_decode(model, batch.src, batch.src_lengths)
        tokens, g = run_greedy_steps(model, batch.src, batch.src_lengths, expected.tokens.shape[1] + 3)
    n = expected.tokens.shape[1]
    assert torch.equal(tokens[:, :n], expected.tokens) and bool((tokens[:, n:] == PAD).all())
    assert bool(g.finished.all())
    torch.testing.assert_close(g.log_probs, expected.log_probs)


@pytest.mark.parametrize("cell,attention", [("gru", "bahdanau"), ("lstm", "dot"), ("gru", "concat")])
def test_beam_one_is_greedy_untrained(cell, attention):
    model = build(cell, attention).eval()
    src_vocab, tgt_vocab = date_vocabs()
    batch = make_batch(date_task(12, 1, seed=4)[0], src_vocab, tgt_vocab)
    g = greedy_decode(model, batch.src, batch.src_lengths, max_len=14, return_attention=True)
    b = beam_search(model, batch.src, batch.src_lengths, beam_size=1, max_len=14, return_attention=True)
    check_hypotheses(g, 12)
    assert torch.equal(g.tokens, b.tokens) and torch.equal(g.lengths, b.lengths)
    torch.testing.assert_close(g.log_probs, b.log_probs)
    for i, n in enumerate(g.lengths.tolist()):
        torch.testing.assert_close(g.attention[i, :n], b.attention[i, :n])
    torch.testing.assert_close(g.log_probs, teacher_forced_log_prob(model, batch, g.tokens))


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_source_decodes_the_same_in_any_batch(beam_size):
    """Per-source length limits: an untrained model that never says EOS gives each source the
    same output alone as in a batch with longer sources."""
    model = build("gru", "bahdanau").eval()
    src_vocab, tgt_vocab = date_vocabs()
    batch = make_batch(date_task(6, 1, seed=2)[0], src_vocab, tgt_vocab)
    together = decode(model, batch.src, batch.src_lengths, beam_size)
    assert (together.lengths == 2 * batch.src_lengths + 10).any()  # some source ran to its limit
    for i in range(6):
        n = int(batch.src_lengths[i])
        alone = decode(model, batch.src[i:i + 1, :n], batch.src_lengths[i:i + 1], beam_size)
        assert alone.tokens[0].tolist() == together.tokens[i, :alone.tokens.shape[1]].tolist()
        assert int(alone.lengths[0]) == int(together.lengths[i]) <= 2 * n + 10
        torch.testing.assert_close(alone.log_probs[0], together.log_probs[i])


def test_beam_one_is_greedy_trained(trained):
    model, batch = trained
    g = greedy_decode(model, batch.src, batch.src_lengths)
    b = beam_search(model, batch.src, batch.src_lengths, beam_size=1)
    assert torch.equal(g.tokens, b.tokens)
    torch.testing.assert_close(g.log_probs, b.log_probs)


@pytest.mark.parametrize("beam_size", [2, 5])
def test_beam_finds_log_prob_at_least_greedys(trained, beam_size):
    model, batch = trained
    g = greedy_decode(model, batch.src, batch.src_lengths, return_attention=True)
    b = beam_search(model, batch.src, batch.src_lengths, beam_size=beam_size, length_penalty=0.0,
                    return_attention=True)
    check_hypotheses(b, len(batch))
    assert (b.lengths == 11).float().mean() > 0.9  # the model has learned the output length
    assert torch.all(b.log_probs >= g.log_probs - 1e-5), (b.log_probs - g.log_probs)
    assert (b.log_probs > g.log_probs + 1e-3).any()  # the search does find better hypotheses here
    # the reported scores are the hypotheses' real log-probabilities
    torch.testing.assert_close(b.log_probs, teacher_forced_log_prob(model, batch, b.tokens))
    # attention rows are distributions over the real source positions
    for i, n in enumerate(b.lengths.tolist()):
        torch.testing.assert_close(b.attention[i, :n].sum(-1), torch.ones(n))
        assert torch.all(b.attention[i, :n, int(batch.src_lengths[i]):] == 0)


def test_beam_search_is_the_exact_search_when_nothing_is_pruned():
    """A scripted model whose next-token distribution depends on the whole prefix: with a beam
    wider than the number of prefixes, beam search must return the brute-force optimum."""
    vocab, max_len = 5, 4  # PAD, BOS, EOS and two real tokens
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(997, vocab, generator=generator) * 2

    class Scripted:
        def encode(self, src, src_lengths):
            batch = src.shape[0]
            keys = torch.zeros(batch, 1, 1)
            # the state carries a code of (source, prefix)
            code = torch.arange(batch, dtype=torch.float64)[None, :, None] * 1000
            return Memory(keys, keys, torch.ones(batch, 1, dtype=torch.bool)), DecoderState(code)

        def decode_step(self, tokens, state, memory):
            code = state.h[0, :, 0] * vocab + tokens.double()
            logits = table[(code % 997).long()].clone()
            logits[:, [PAD, BOS]] = float("-inf")
            return torch.log_softmax(logits, -1), DecoderState(code[None, :, None]), torch.ones(len(tokens), 1)

    def brute_force(source, length_penalty):
        best = (-math.inf, None)
        for n in range(1, max_len + 1):
            for body in itertools.product((3, 4), repeat=n - 1):
                seq = list(body) + [EOS]
                src = torch.zeros(source + 1, 1, dtype=torch.long)
                memory, state = Scripted().encode(src, None)
                state = DecoderState(state.h[:, source:source + 1])
                total, previous = 0.0, torch.tensor([BOS])
                for token in seq:
                    log_probs, state, _ = Scripted().decode_step(previous, state, memory)
                    total += float(log_probs[0, token])
                    previous = torch.tensor([token])
                best = max(best, (total / n ** length_penalty, seq))
        return best

    src, lengths = torch.zeros(3, 1, dtype=torch.long), torch.ones(3, dtype=torch.long)
    for length_penalty in (0.0, 1.0):
        hyp = beam_search(Scripted(), src, lengths, beam_size=64, max_len=max_len, length_penalty=length_penalty)
        for source in range(3):
            score, seq = brute_force(source, length_penalty)
            n = int(hyp.lengths[source])
            assert hyp.tokens[source, :n].tolist() == seq
            assert math.isclose(float(hyp.log_probs[source]) / n ** length_penalty, score, rel_tol=1e-5)


def test_memory_is_shared_not_copied_per_beam(trained, monkeypatch):
    model, batch = trained
    attention = model.decoder.attention
    seen = {"project_keys": 0, "calls": 0}
    real_project, real_forward = attention.project_keys, attention.forward

    def project_keys(keys):
        seen["project_keys"] += 1
        return real_project(keys)

    def forward(query, keys, values=None, mask=None, **kw):
        seen["calls"] += 1
        assert keys.shape[0] == len(batch) and kw["proj_keys"].shape[0] == len(batch)  # one copy per source
        assert query.shape[0] == 3 * len(batch) and kw["kv_batch_idx"].shape == (3 * len(batch),)
        return real_forward(query, keys, values, mask, **kw)

    monkeypatch.setattr(attention, "project_keys", project_keys)
    monkeypatch.setattr(attention, "forward", forward)
    beam_search(model, batch.src, batch.src_lengths, beam_size=3)
    assert seen["project_keys"] == 1 and seen["calls"] >= 11  # keys projected once for all steps


def test_greedy_projects_keys_once(trained, monkeypatch):
    model, batch = trained
    attention = model.decoder.attention
    count = []
    real = attention.project_keys
    monkeypatch.setattr(attention, "project_keys", lambda keys: count.append(1) or real(keys))
    greedy_decode(model, batch.src, batch.src_lengths)
    assert len(count) == 1


def test_translate_and_evaluate(trained):
    model, batch = trained
    src_vocab, tgt_vocab = date_vocabs()
    _, test_pairs = date_task(5000, 64, seed=1)
    result = evaluate(model, test_pairs, src_vocab, tgt_vocab, batch_size=20)
    assert result.predictions == translate(model, [s for s, _ in test_pairs], src_vocab, tgt_vocab, batch_size=7)
    assert result.accuracy == sum(p == t for p, (_, t) in zip(result.predictions, test_pairs)) / 64
    assert result.tokens > 0 and result.tokens_per_second > 0
    beam = evaluate(model, test_pairs, src_vocab, tgt_vocab, beam_size=3, batch_size=20)
    assert beam.predictions == translate(model, [s for s, _ in test_pairs], src_vocab, tgt_vocab, beam_size=3)


def test_decode_bad_arguments():
    model = build("gru", "bahdanau").eval()
    src, lengths = torch.ones(2, 3, dtype=torch.long), torch.tensor([3, 2])
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, src, lengths, beam_size=0)
    with pytest.raises(ValueError, match="max_len"):
        greedy_decode(model, src, lengths, max_len=0)
    with pytest.raises(ValueError, match="src"):
        decode(model, src[0], lengths)
    with pytest.raises(ValueError, match="src_lengths"):
        decode(model, src, lengths[:1], beam_size=2)
    with pytest.raises(ValueError, match="length_penalty"):
        beam_search(model, src, lengths, length_penalty=-1.0)
    hyp = greedy_decode(model, src, lengths, max_len=3)  # cut by max_len: no EOS needed
    assert hyp.tokens.shape[1] <= 3
