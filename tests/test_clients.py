"""Client code written the way other projects write it, run through patch(): a model in the style
of the PyTorch seq2seq tutorial, and an NMT model in the style of OpenNMT-py's RNN encoder and
decoders, with the habits such code has (dispatching on isinstance(self.rnn, nn.GRU), reading
proj_size, calling flatten_parameters(), counting weights through all_weights, packing). After
patch() the same outputs, gradients and training curve as before."""
import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_s2s

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/ is at the root
from bench.tutorial_model import TutorialSeq2Seq  # noqa: E402 (the PyTorch seq2seq tutorial's shape of model)

# ------------------------------------------------- OpenNMT-py's shape of RNN encoder and decoders


class RNNEncoder(nn.Module):
    def __init__(self, rnn_type, vocab, hidden, layers=2, bidirectional=True):
        super().__init__()
        directions = 2 if bidirectional else 1
        self.embeddings = nn.Embedding(vocab, hidden, padding_idx=0)
        self.rnn = getattr(nn, rnn_type)(hidden, hidden // directions, num_layers=layers,
                                         bidirectional=bidirectional, dropout=0.0)

    def forward(self, src, lengths):
        packed = pack_padded_sequence(self.embeddings(src), lengths, enforce_sorted=False)
        memory, state = self.rnn(packed)
        memory = pad_packed_sequence(memory)[0]
        state = state if isinstance(state, tuple) else (state,)  # a tuple for both kinds
        if self.rnn.bidirectional:  # (layers*2, B, H/2) -> (layers, B, H): both directions side by side
            state = tuple(torch.cat([s[0::2], s[1::2]], dim=2) for s in state)
        return memory, state


class GlobalAttention(nn.Module):
    """Luong dot/general and Bahdanau mlp scores over memory (T, B, H), written out naively."""

    def __init__(self, dim, attn_type):
        super().__init__()
        self.attn_type = attn_type
        if attn_type == "general":
            self.linear_in = nn.Linear(dim, dim, bias=False)
        if attn_type == "mlp":
            self.linear_context, self.linear_query = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim)
            self.v = nn.Linear(dim, 1, bias=False)
        self.linear_out = nn.Linear(2 * dim, dim, bias=attn_type == "mlp")

    def forward(self, query, memory, lengths):
        keys = memory.transpose(0, 1)  # (B, S, H)
        if self.attn_type == "mlp":
            scores = self.v(torch.tanh(self.linear_query(query)[:, None] + self.linear_context(keys))).squeeze(2)
        else:
            q = self.linear_in(query) if self.attn_type == "general" else query
            scores = torch.bmm(keys, q[:, :, None]).squeeze(2)
        pad = torch.arange(keys.shape[1])[None] >= lengths[:, None]
        align = F.softmax(scores.masked_fill(pad, float("-inf")), dim=-1)
        context = torch.bmm(align[:, None], keys).squeeze(1)
        return torch.tanh(self.linear_out(torch.cat([context, query], dim=1))), align


class StdRNNDecoder(nn.Module):
    """The whole target through the RNN at once, then attention: the state layout depends on the
    RNN's class, as in OpenNMT-py (`isinstance(self.rnn, nn.GRU)` takes the lone hidden state)."""

    def __init__(self, rnn_type, vocab, hidden, layers, attn_type):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, hidden)
        self.rnn = getattr(nn, rnn_type)(hidden, hidden, num_layers=layers)
        self.attn = GlobalAttention(hidden, attn_type)

    def forward(self, tgt, memory, state, lengths):
        emb = self.embeddings(tgt)
        if isinstance(self.rnn, nn.GRU):
            rnn_output, dec_state = self.rnn(emb, state[0])
        else:
            rnn_output, dec_state = self.rnn(emb, state)
        outs = [self.attn(step, memory, lengths)[0] for step in rnn_output]
        return torch.stack(outs), dec_state


class StackedCells(nn.Module):
    """OpenNMT-py's StackedLSTM / StackedGRU: one cell per layer, dropout between layers."""

    def __init__(self, cell_type, layers, input_size, hidden, dropout=0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(getattr(nn, cell_type)(input_size if i == 0 else hidden, hidden)
                                    for i in range(layers))

    def forward(self, x, state):
        lstm = isinstance(self.layers[0], nn.LSTMCell)
        new_h, new_c = [], []
        for i, layer in enumerate(self.layers):
            if lstm:
                h, c = layer(x, (state[0][i], state[1][i]))
                new_c.append(c)
            else:
                h = layer(x, state[0][i])
            x = self.dropout(h) if i + 1 != len(self.layers) else h
            new_h.append(h)
        return x, (torch.stack(new_h), torch.stack(new_c)) if lstm else (torch.stack(new_h),)


class InputFeedRNNDecoder(nn.Module):
    """Step by step, the previous attentional output fed back with the next embedding."""

    def __init__(self, rnn_type, vocab, hidden, layers, attn_type):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, hidden)
        self.rnn = StackedCells(rnn_type + "Cell", layers, 2 * hidden, hidden)
        self.attn = GlobalAttention(hidden, attn_type)

    def forward(self, tgt, memory, state, lengths):
        input_feed = memory.new_zeros(tgt.shape[1], memory.shape[2])
        outs = []
        for emb_t in self.embeddings(tgt):
            rnn_output, state = self.rnn(torch.cat([emb_t, input_feed], 1), state)
            input_feed, _ = self.attn(rnn_output, memory, lengths)
            outs.append(input_feed)
        return torch.stack(outs), state


class NMTModel(nn.Module):
    def __init__(self, rnn_type, decoder, attn_type, vocab=13, hidden=12, layers=2):
        super().__init__()
        self.encoder = RNNEncoder(rnn_type, vocab, hidden, layers)
        self.decoder = decoder(rnn_type, vocab, hidden, layers, attn_type)
        self.generator = nn.Linear(hidden, vocab)

    def forward(self, src, lengths, tgt):
        memory, state = self.encoder(src, lengths)
        out, _ = self.decoder(tgt, memory, state, lengths)
        return F.log_softmax(self.generator(out), dim=-1)


# client-side utilities of the kinds libraries carry


def rnn_weight_count(model):
    return sum(w.numel() for m in model.modules() if isinstance(m, nn.RNNBase) for ws in m.all_weights for w in ws)


def state_sizes(model):
    """Per recurrent module: (kind, layers x directions, hidden size of h) as a decoder-init would read them."""
    sizes = []
    for m in model.modules():
        if isinstance(m, nn.LSTM):
            sizes.append(("lstm", m.num_layers * (1 + m.bidirectional), m.proj_size or m.hidden_size))
        elif isinstance(m, nn.GRU):
            sizes.append(("gru", m.num_layers * (1 + m.bidirectional), m.hidden_size))
        elif isinstance(m, (nn.LSTMCell, nn.GRUCell)):
            sizes.append(("lstm_cell" if isinstance(m, nn.LSTMCell) else "gru_cell", 1, m.hidden_size))
    return sizes


def flatten_all(model):
    for m in model.modules():
        if isinstance(m, nn.RNNBase):
            m.flatten_parameters()


# ------------------------------------------------------------------------------------ tests


def _train_side_by_side(model, loss_fn, steps):
    """Patch `model` and train it in lockstep with an unpatched copy, one optimizer each (built
    before the patch): every loss and gradient must agree, and the loss must go down."""
    reference = copy.deepcopy(model)
    optimizers = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (model, reference)]
    params_before = dict(model.named_parameters())
    swapped = fused_s2s.patch(model)
    assert swapped and all(p is params_before[n] for n, p in model.named_parameters())
    curve = []
    for step in range(steps):
        losses = []
        for m, opt in zip((model, reference), optimizers):
            torch.manual_seed(step)  # the same dropout masks on both sides
            opt.zero_grad()
            loss = loss_fn(m)
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], msg=f"loss at step {step}")
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=f"{name} at step {step}")
        for opt in optimizers:
            opt.step()
        curve.append(losses[0].item())
    assert curve[-1] < curve[0]  # it trains
    return swapped, reference


def test_tutorial_model_trains_the_same_after_patch():
    torch.manual_seed(0)
    model = TutorialSeq2Seq(11, 11, 16)
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(1, 11, (5, 7), generator=g), torch.randint(1, 11, (5, 6), generator=g)

    def loss_fn(m):
        log_probs = m(src, tgt)[0]
        return F.nll_loss(log_probs.flatten(0, 1), tgt.flatten())

    swapped, reference = _train_side_by_side(model, loss_fn, steps=5)
    assert swapped == ["encoder.gru", "decoder.gru"]
    assert isinstance(model.encoder.gru, nn.GRU) and model.encoder.gru.batch_first
    model.eval(), reference.eval()
    with torch.no_grad():  # greedy decoding: same tokens and attention
        ours, theirs = model(src, steps=6), reference(src, steps=6)
    assert torch.equal(ours[0].argmax(-1), theirs[0].argmax(-1))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("rnn_type,decoder,attn_type", [
    ("LSTM", StdRNNDecoder, "general"), ("GRU", StdRNNDecoder, "dot"),
    ("LSTM", InputFeedRNNDecoder, "mlp"), ("GRU", InputFeedRNNDecoder, "general"),
])
def test_opennmt_style_model_trains_the_same_after_patch(rnn_type, decoder, attn_type):
    torch.manual_seed(0)
    model = NMTModel(rnn_type, decoder, attn_type)
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([6, 3, 5, 1])
    src = torch.randint(1, 13, (6, 4), generator=g).masked_fill(torch.arange(6)[:, None] >= lengths, 0)
    tgt = torch.randint(1, 13, (5, 4), generator=g)
    counts, sizes = rnn_weight_count(model), state_sizes(model)

    def loss_fn(m):
        flatten_all(m)
        return F.nll_loss(m(src, lengths, tgt[:-1]).flatten(0, 1), tgt[1:].flatten())

    swapped, _ = _train_side_by_side(model, loss_fn, steps=4)
    expected = ["encoder.rnn", "decoder.rnn"] if decoder is StdRNNDecoder else \
        ["encoder.rnn", "decoder.rnn.layers.0", "decoder.rnn.layers.1"]
    assert swapped == expected
    assert rnn_weight_count(model) == counts and state_sizes(model) == sizes
