import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_s2s
from fused_s2s.patch import patch


# A translation model in the style of the PyTorch seq2seq tutorial, written with plain torch.nn.

class EncoderRNN(nn.Module):
    def __init__(self, vocab, hidden):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)

    def forward(self, src):
        return self.gru(self.embedding(src))


class AdditiveAttention(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.Wa, self.Ua, self.Va = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 1)

    def forward(self, query, keys):
        scores = self.Va(torch.tanh(self.Wa(query) + self.Ua(keys))).squeeze(2).unsqueeze(1)
        weights = F.softmax(scores, dim=-1)
        return torch.bmm(weights, keys), weights


class AttnDecoderRNN(nn.Module):
    def __init__(self, hidden, vocab):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.attention = AdditiveAttention(hidden)
        self.gru = nn.GRU(2 * hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, encoder_outputs, hidden, target):
        outputs = []
        for t in range(target.shape[1]):  # teacher forcing
            embedded = self.embedding(target[:, t:t + 1])
            context, _ = self.attention(hidden.permute(1, 0, 2), encoder_outputs)
            output, hidden = self.gru(torch.cat((embedded, context), dim=2), hidden)
            outputs.append(self.out(output))
        return F.log_softmax(torch.cat(outputs, dim=1), dim=-1)


class TutorialSeq2Seq(nn.Module):
    def __init__(self, vocab=11, hidden=16):
        super().__init__()
        self.encoder, self.decoder = EncoderRNN(vocab, hidden), AttnDecoderRNN(hidden, vocab)

    def loss(self, src, tgt_in, tgt_out):
        outputs, hidden = self.encoder(src)
        log_probs = self.decoder(outputs, hidden, tgt_in)
        return F.nll_loss(log_probs.flatten(0, 1), tgt_out.flatten())


def tutorial_data(batch=5, src_len=7, tgt_len=6, vocab=11):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, vocab, (batch, src_len), generator=g),
            torch.randint(0, vocab, (batch, tgt_len), generator=g),
            torch.randint(0, vocab, (batch, tgt_len), generator=g))


def test_tutorial_model_same_loss_and_gradients_after_patch():
    torch.manual_seed(0)
    model = TutorialSeq2Seq()
    reference = copy.deepcopy(model)
    params_before = dict(model.named_parameters())
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # built before the patch
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)

    swapped = patch(model, backend="torch")

    assert swapped == ["encoder.gru", "decoder.gru"]
    assert type(model.encoder.gru) is fused_s2s.GRU and type(model.decoder.gru) is fused_s2s.GRU
    assert model.encoder.gru.backend == "torch" and model.encoder.gru.batch_first
    for name, p in model.named_parameters():
        assert p is params_before[name], name  # the very same tensors
    assert model.state_dict().keys() == state_before.keys()
    data = tutorial_data()
    for step in range(2):
        losses = []
        for m, opt in ((model, optimizer), (reference, reference_optimizer)):
            opt.zero_grad()
            loss = m.loss(*data)
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[0], losses[1])
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=f"{name} at step {step}")
        optimizer.step()
        reference_optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    assert not torch.equal(model.encoder.gru.weight_hh_l0, state_before["encoder.gru.weight_hh_l0"])


def test_patch_every_kind_packed_and_shared():
    torch.manual_seed(0)
    shared = nn.GRUCell(4, 6)

    class Zoo(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, 5, num_layers=2, bidirectional=True, dropout=0.0)
            self.cells = nn.ModuleList([nn.LSTMCell(3, 4, bias=False), shared])
            self.again = shared
            self.deep = nn.Sequential(nn.Linear(3, 3), nn.GRU(3, 2, bias=False, batch_first=True))

    zoo = Zoo().double()
    reference = copy.deepcopy(zoo)
    swapped = patch(zoo)
    assert sorted(swapped) == sorted(["lstm", "cells.0", "cells.1", "again", "deep.1"])
    assert zoo.cells[1] is zoo.again and type(zoo.again) is fused_s2s.GRUCell  # still shared
    assert type(zoo.cells[0]) is fused_s2s.LSTMCell and zoo.cells[0].bias_ih is None
    assert zoo.lstm.weight_hh_l1_reverse.dtype == torch.float64

    x = torch.randn(7, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([7, 2, 5])
    for m in (zoo, reference):
        m.out, (m.h, m.c) = m.lstm(pack_padded_sequence(x, lengths, enforce_sorted=False))
    torch.testing.assert_close(zoo.out.data, reference.out.data)
    torch.testing.assert_close(zoo.h, reference.h)
    torch.testing.assert_close(zoo.c, reference.c)
    h = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(zoo.again(x[0, :, :1].repeat(1, 4), h), reference.again(x[0, :, :1].repeat(1, 4), h))
    torch.testing.assert_close(zoo.deep(x)[0], reference.deep(x)[0])
    torch.testing.assert_close(zoo.cells[0](x[0])[1], reference.cells[0](x[0])[1])


def test_patch_leaves_what_it_cannot_take():
    class MyGRU(nn.GRU):  # a subclass may carry its own forward: not ours to replace
        pass

    model = nn.ModuleDict({"sub": MyGRU(2, 3), "proj": nn.LSTM(2, 4, proj_size=2), "ok": nn.LSTMCell(2, 2)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert patch(model) == ["ok"]
    assert any("proj" in str(w.message) for w in caught)
    assert type(model["sub"]) is MyGRU and type(model["proj"]) is nn.LSTM
    with pytest.warns(UserWarning, match="proj"):
        assert patch(model) == []  # patching twice changes nothing more


def test_patch_bad_arguments():
    with pytest.raises(ValueError, match="itself"):
        patch(nn.GRU(2, 3))
    with pytest.raises(TypeError, match="model"):
        patch("model")
    with pytest.raises(ValueError, match="backend"):
        patch(nn.Sequential(nn.GRU(2, 3)), backend="cudnn")


def test_patch_is_exported():
    assert fused_s2s.patch is patch
