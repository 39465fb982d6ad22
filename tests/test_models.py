import pytest
import torch
from torch import nn

import fused_s2s
from fused_s2s.backends import registry, torch_backend
from fused_s2s.demo.data import PAD, Vocab, date_task, date_vocabs, make_batch
from fused_s2s.demo.decoding import greedy_decode
from fused_s2s.demo.models import ATTENTIONS, CELLS, AttnDecoder, Encoder, Seq2Seq, sequence_loss
from fused_s2s.demo.train import load_checkpoint, save_checkpoint

from conftest import REQUIRED

COMBOS = [(c, a) for c in CELLS for a in ATTENTIONS]


def small_model(cell="gru", attention="bahdanau", layers=1, backend="torch", seed=0, **kw):
    torch.manual_seed(seed)
    src_vocab, tgt_vocab = date_vocabs()
    return Seq2Seq(len(src_vocab), len(tgt_vocab), embedding_size=8, hidden_size=12, num_layers=layers,
                   cell=cell, attention=attention, backend=backend, **kw)


def date_batch(n=6, seed=0):
    src_vocab, tgt_vocab = date_vocabs()
    pairs, _ = date_task(n, 1, seed=seed)
    return make_batch(pairs, src_vocab, tgt_vocab)


@pytest.mark.parametrize("cell,attention", COMBOS)
def test_forward_backward_every_design(cell, attention):
    model = small_model(cell, attention, layers=2)
    b = date_batch()
    logits, weights = model(b.src, b.src_lengths, b.tgt_in, return_attention=True)
    assert logits.shape == (*b.tgt_in.shape, model.config["tgt_vocab_size"])
    assert weights.shape == (*b.tgt_in.shape, b.src.shape[1])
    pad = torch.arange(b.src.shape[1]) >= b.src_lengths[:, None]
    assert torch.all(weights.masked_select(pad[:, None, :]) == 0)  # padding gets exactly no attention
    torch.testing.assert_close(weights.sum(-1), torch.ones(b.tgt_in.shape))
    sequence_loss(logits, b.tgt_out).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("cell,attention", [("gru", "bahdanau"), ("lstm", "general"), ("lstm", "concat")])
def test_extra_padding_changes_nothing(cell, attention):
    """Masks and packing: more PAD columns after every source give the same logits."""
    model = small_model(cell, attention, layers=2).eval()
    b = date_batch(5)
    padded = torch.cat([b.src, torch.full((5, 7), PAD)], dim=1)
    torch.testing.assert_close(model(padded, b.src_lengths, b.tgt_in), model(b.src, b.src_lengths, b.tgt_in))


def test_each_example_is_independent_of_its_batch():
    model = small_model("lstm", "dot").eval()
    b = date_batch(4)
    full = model(b.src, b.src_lengths, b.tgt_in)
    for i in range(4):
        n = int(b.src_lengths[i])
        one = model(b.src[i:i + 1, :n], b.src_lengths[i:i + 1], b.tgt_in[i:i + 1])
        torch.testing.assert_close(one[0], full[i])


def test_loss_ignores_padding():
    vocab = Vocab.build("abcdefgh")
    pairs = [("abc", "d"), ("ab", "efgh"), ("h", "abcdefg")]
    torch.manual_seed(0)
    model = Seq2Seq(len(vocab), len(vocab), 8, 12, backend="torch").eval()
    b = make_batch(pairs, vocab, vocab)
    loss = sequence_loss(model(b.src, b.src_lengths, b.tgt_in), b.tgt_out)
    total, count = 0.0, 0
    for pair in pairs:
        one = make_batch([pair], vocab, vocab)
        n = one.num_tgt_tokens
        total += sequence_loss(model(one.src, one.src_lengths, one.tgt_in), one.tgt_out) * n
        count += n
    torch.testing.assert_close(loss, total / count)


def test_pad_and_bos_are_never_predicted():
    model = small_model()
    b = date_batch()
    logits = model(b.src, b.src_lengths, b.tgt_in)
    assert torch.isinf(logits[..., 0]).all() and torch.isinf(logits[..., 1]).all()
    assert torch.isfinite(sequence_loss(logits, b.tgt_out))


def test_only_fused_modules_inside():
    model = small_model("lstm", "general", layers=2)
    kinds = {type(m) for m in model.modules()}
    assert not any(issubclass(k, (nn.RNNBase, nn.RNNCellBase)) for k in kinds)
    assert {fused_s2s.LSTM, fused_s2s.LSTMCell, fused_s2s.LuongAttention} <= kinds
    assert {fused_s2s.GRU, fused_s2s.GRUCell, fused_s2s.BahdanauAttention} <= {type(m) for m in small_model().modules()}


@pytest.mark.parametrize("cell,attention", [("gru", "bahdanau"), ("lstm", "dot"), ("gru", "concat")])
def test_every_cell_and_attention_call_goes_through_the_backend(monkeypatch, cell, attention):
    calls = {}

    def spy(name):
        real = getattr(torch_backend, name)

        def wrapper(*args):
            calls[name] = calls.get(name, 0) + 1
            return real(*args)
        monkeypatch.setattr(torch_backend, name, wrapper)

    for name in ("gru_cell_fwd", "lstm_cell_fwd", "additive_attention_fwd", "dot_attention_fwd"):
        spy(name)
    model = small_model(cell, attention, layers=2)
    b = date_batch()
    model(b.src, b.src_lengths, b.tgt_in)
    steps = b.tgt_in.shape[1]
    attn_op = "additive_attention_fwd" if attention in ("bahdanau", "concat") else "dot_attention_fwd"
    assert calls.get(attn_op) == steps  # one fused call per decoder step
    # 2 decoder layers per step, plus the encoder's layers, also ours
    assert calls.get(f"{cell}_cell_fwd", 0) > 2 * steps


@pytest.mark.parametrize("backend", [b for b in registry.NAMES if b != "torch"])
@pytest.mark.parametrize("cell,attention", [("gru", "bahdanau"), ("lstm", "general")])
def test_backends_agree_on_the_whole_model(backend, cell, attention):
    reason = registry.unsupported_reason(backend, f"{cell}_cell", torch.device("cpu"), torch.float32)
    if reason is not None:
        pytest.skip(f"{backend} on cpu: {reason}")
    reference = small_model(cell, attention, layers=2, backend="torch")
    other = small_model(cell, attention, layers=2, backend=backend)
    b = date_batch()
    results = []
    for model in (reference, other):
        loss = sequence_loss(model(b.src, b.src_lengths, b.tgt_in), b.tgt_out)
        loss.backward()
        results.append((loss, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for g1, g0 in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g1, g0, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("cell,attention", [("gru", "bahdanau"), ("lstm", "general")])
def test_compile_fullgraph_whole_model(backend, cell, attention):
    """The demo model's training step (encoder over padded sources with lengths, teacher-forced
    attention decoder, loss, backward) compiles into one graph and gives eager's results."""
    reason = registry.unsupported_reason(backend, f"{cell}_cell", torch.device("cpu"), torch.float32)
    if reason is not None and backend not in REQUIRED:
        pytest.skip(f"{backend} on cpu: {reason}")
    model = small_model(cell, attention, layers=2, backend=backend)
    b = date_batch(4)
    src, tgt_in, tgt_out = b.src[:, :7], b.tgt_in[:, :5], b.tgt_out[:, :5]  # a short unrolled loop
    src_lengths = b.src_lengths.clamp(max=7)

    def loss_fn(src, src_lengths, tgt_in, tgt_out):
        return sequence_loss(model(src, src_lengths, tgt_in), tgt_out)

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        loss = fn(src, src_lengths, tgt_in, tgt_out)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)))
    (eager_loss, eager_grads), (loss, grads) = results
    torch.testing.assert_close(loss, eager_loss)
    for (name, _), g, g_eager in zip(model.named_parameters(), grads, eager_grads):
        assert (g is None) == (g_eager is None), name
        if g is not None:
            torch.testing.assert_close(g, g_eager, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("cell,attention", [("gru", "bahdanau"), ("lstm", "general")])
def test_checkpoint_reloads_and_decodes_the_same(tmp_path, cell, attention):
    src_vocab, tgt_vocab = date_vocabs()
    model = small_model(cell, attention, layers=2).eval()
    path = tmp_path / "sub" / "model.pt"
    save_checkpoint(str(path), model, src_vocab, tgt_vocab, note="x")
    ckpt = load_checkpoint(str(path), backend="torch")
    assert ckpt.src_vocab == src_vocab and ckpt.tgt_vocab == tgt_vocab and ckpt.extra == {"note": "x"}
    assert ckpt.model.config == model.config and not ckpt.model.training
    b = date_batch(8)
    torch.testing.assert_close(ckpt.model(b.src, b.src_lengths, b.tgt_in), model(b.src, b.src_lengths, b.tgt_in),
                               rtol=0, atol=0)
    assert torch.equal(greedy_decode(ckpt.model, b.src, b.src_lengths).tokens,
                       greedy_decode(model, b.src, b.src_lengths).tokens)
    with pytest.raises(TypeError, match="Seq2Seq"):
        save_checkpoint(str(path), nn.Linear(2, 2), src_vocab, tgt_vocab)


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="cell"):
        small_model(cell="rnn")
    with pytest.raises(ValueError, match="attention"):
        small_model(attention="luong")
    with pytest.raises(ValueError, match="hidden_size"):
        Seq2Seq(10, 10, hidden_size=13)
    with pytest.raises(ValueError, match="num_layers"):
        Seq2Seq(10, 10, num_layers=0)
    with pytest.raises(ValueError, match="dot"):
        AttnDecoder(10, memory_size=8, hidden_size=6, attention="dot")
    with pytest.raises(ValueError, match="backend"):
        small_model(backend="cuda")


def test_bad_inputs_are_named():
    model = small_model()
    b = date_batch()
    with pytest.raises(ValueError, match="lengths"):
        model(b.src, b.src_lengths + 100, b.tgt_in)
    with pytest.raises(ValueError, match="lengths"):
        model(b.src, b.src_lengths[:2], b.tgt_in)
    with pytest.raises(ValueError, match="src"):
        model(b.src[0], b.src_lengths, b.tgt_in)
    with pytest.raises(ValueError, match="tgt_in"):
        model(b.src, b.src_lengths, b.tgt_in[:2])
    with pytest.raises(ValueError, match="lengths"):
        Encoder(10)(torch.ones(2, 3, dtype=torch.long), torch.tensor([3, 0]))
