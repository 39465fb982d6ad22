"""patch(): the modules it patches stay the nn modules they were (class, attributes, parameters,
hooks, state_dict, dtype moves, copies, pickles) and compute what they computed."""
import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_s2s
from fused_s2s.backends import registry
from fused_s2s.patch import patch

from conftest import REQUIRED

BACKENDS = [pytest.param(b, marks=[] if b in REQUIRED or registry.available()[b] is None
                         else [pytest.mark.skip(reason=f"{b} cannot load")]) for b in registry.NAMES]


def _zoo():
    return nn.ModuleDict({"gru": nn.GRU(3, 5, num_layers=2, bidirectional=True, batch_first=True),
                          "lstm": nn.LSTM(3, 4, bias=False), "gru_cell": nn.GRUCell(3, 5),
                          "lstm_cell": nn.LSTMCell(3, 4)})


def _run_zoo(zoo, x):
    """Every module of _zoo on x (B=2, T=6, 3), with given states, flattened to a list."""
    h = torch.linspace(-1, 1, 2 * 4 * 5, dtype=x.dtype).reshape(4, 2, 5)
    out, h_n = zoo["gru"](x, h)
    out2, (h2, c2) = zoo["lstm"](x.transpose(0, 1))
    h3 = zoo["gru_cell"](x[:, 0], h[0])
    h4, c4 = zoo["lstm_cell"](x[:, 1])
    return [out, h_n, out2, h2, c2, h3, h4, c4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_modules_are_still_the_nn_modules(backend):
    torch.manual_seed(0)
    zoo = _zoo()
    reference = copy.deepcopy(zoo)
    params = dict(zoo.named_parameters())
    keys = list(zoo.state_dict())
    seen = []
    zoo["gru"].register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))

    assert patch(zoo, backend=backend) == ["gru", "lstm", "gru_cell", "lstm_cell"]

    for name, cls in (("gru", nn.GRU), ("lstm", nn.LSTM), ("gru_cell", nn.GRUCell), ("lstm_cell", nn.LSTMCell)):
        m = zoo[name]
        assert isinstance(m, cls) and type(m).__name__ == "Patched" + cls.__name__, name
        assert m.backend == backend and m.hidden_size == reference[name].hidden_size
        assert f"backend='{backend}'" in repr(m)
    gru, lstm = zoo["gru"], zoo["lstm"]
    assert (gru.num_layers, gru.bidirectional, gru.batch_first, lstm.proj_size, lstm.bias) == (2, True, True, 0, False)
    assert [id(w) for w in gru._flat_weights] == [id(getattr(gru, n)) for n in gru._flat_weights_names]
    assert sum(w.numel() for ws in gru.all_weights for w in ws) == sum(p.numel() for p in gru.parameters())
    assert len(lstm.all_weights) == 1 and len(lstm.all_weights[0]) == 2  # no biases
    gru.flatten_parameters()
    assert dict(zoo.named_parameters()) == params and list(zoo.state_dict()) == keys

    x = torch.randn(2, 6, 3)
    for ours, theirs in zip(_run_zoo(zoo, x), _run_zoo(reference, x)):
        torch.testing.assert_close(ours, theirs)
    assert seen == ["PatchedGRU"]  # the hook registered before the patch still runs


def test_patched_modules_move_copy_and_pickle():
    torch.manual_seed(0)
    zoo = _zoo()
    reference = copy.deepcopy(zoo).double()
    patch(zoo, backend="torch")
    zoo.double()  # nn.RNNBase._apply rebuilds _flat_weights for the new tensors
    assert all(w.dtype == torch.float64 for w in zoo["gru"]._flat_weights)
    assert zoo["gru"]._flat_weights[0] is zoo["gru"].weight_ih_l0
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    expected = _run_zoo(reference, x)

    twin = copy.deepcopy(zoo)
    buffer = io.BytesIO()
    torch.save(zoo, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for copied in (twin, loaded):
        assert type(copied["lstm"]) is fused_s2s.PatchedLSTM and copied["lstm"].backend == "torch"
        assert copied["gru"].weight_hh_l1 is not zoo["gru"].weight_hh_l1
        for ours, theirs in zip(_run_zoo(copied, x), expected):
            torch.testing.assert_close(ours, theirs)
    plain = _zoo().double()
    plain.load_state_dict(loaded.state_dict())  # the keys nn expects
    for ours, theirs in zip(_run_zoo(plain, x), expected):
        torch.testing.assert_close(ours, theirs)


def test_patched_classes_construct_as_nn_does():
    torch.manual_seed(0)
    ours = fused_s2s.PatchedLSTM(3, 4, num_layers=2, dropout=0.0, backend="torch")
    theirs = nn.LSTM(3, 4, num_layers=2)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0])
    assert isinstance(ours, nn.LSTM) and isinstance(ours, fused_s2s.LSTM)
    cell = fused_s2s.PatchedGRUCell(3, 4, bias=False)
    assert cell.bias_ih is None and cell.backend is None and isinstance(cell, nn.GRUCell)
    with pytest.raises(ValueError, match="backend"):
        fused_s2s.PatchedGRU(3, 4, backend="cudnn")


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
    assert zoo.cells[1] is zoo.again is shared and type(shared) is fused_s2s.PatchedGRUCell  # still shared
    assert zoo.cells[0].bias_ih is None and zoo.lstm.weight_hh_l1_reverse.dtype == torch.float64

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

    model = nn.ModuleDict({"sub": MyGRU(2, 3), "ok": nn.LSTMCell(2, 2)})
    assert patch(model) == ["ok"]
    assert type(model["sub"]) is MyGRU
    assert patch(model) == []  # patching twice changes nothing more


def test_patch_the_model_itself_and_bad_arguments():
    gru = nn.GRU(2, 3)
    assert patch(gru, backend="torch") == [""] and type(gru) is fused_s2s.PatchedGRU
    with pytest.raises(TypeError, match="model"):
        patch("model")
    with pytest.raises(ValueError, match="backend"):
        patch(nn.Sequential(nn.GRU(2, 3)), backend="cudnn")


def test_patch_is_exported():
    assert fused_s2s.patch is patch


class _Tagger(nn.Module):
    """Linear -> GRU -> GRUCell step: the GRU is where dynamo breaks the graph."""

    def __init__(self):
        super().__init__()
        self.proj, self.gru, self.cell = nn.Linear(3, 4), nn.GRU(4, 5, batch_first=True), nn.GRUCell(5, 5)

    def forward(self, x):
        out, h = self.gru(torch.tanh(self.proj(x)))
        return self.cell(out[:, -1], h[0]).square().sum()


def _compiled_matches_eager(model, x, **compile_kwargs):
    eager = model(x)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(model, backend="aot_eager", **compile_kwargs)(x)
    grads = torch.autograd.grad(compiled, list(model.parameters()))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_patched_model_under_torch_compile():
    """What the README says: dynamo breaks the graph at a patched nn.GRU/nn.LSTM, as at any
    nn.RNNBase (not at the cells), unless torch._dynamo.config.allow_rnn is set; then the whole
    model compiles with fullgraph=True. Either way, the results are eager's."""
    torch.manual_seed(0)
    model = _Tagger()
    patch(model, backend="cpp" if "cpp" in REQUIRED else "torch")
    x = torch.randn(2, 6, 3)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="RNN"):
        torch.compile(model, fullgraph=True, backend="eager")(x)
    torch._dynamo.reset()
    _compiled_matches_eager(model, x)
    cell_only = nn.Sequential(nn.Linear(3, 3), nn.GRUCell(3, 4))
    patch(cell_only)
    torch.compile(cell_only, fullgraph=True, backend="eager")(x[:, 0])  # cells: no break
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):
        _compiled_matches_eager(model, x, fullgraph=True)
    torch._dynamo.reset()


def test_patched_projected_lstm_reads_as_nn():
    """What LSTMP clients read: proj_size, h of size P, weight_hr in all_weights and _flat_weights."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, proj_size=2, bidirectional=True)
    reference = copy.deepcopy(lstm)
    patch(lstm, backend="torch")
    assert lstm.proj_size == 2 and [len(ws) for ws in lstm.all_weights] == [5, 5]
    assert lstm.all_weights[1][4] is lstm.weight_hr_l0_reverse and lstm._flat_weights[-1] is lstm.weight_hr_l0_reverse
    x = torch.randn(4, 2, 3)
    out, (h, c) = lstm(x)
    assert h.shape == (2, 2, 2) and c.shape == (2, 2, 5)
    for ours, theirs in zip((out, h, c), (reference(x)[0], *reference(x)[1])):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_patched_layer_on_native_runs_nns_own_forward(monkeypatch, mode):
    """Where native runs a padded call, a patched layer runs nn's forward itself (nothing of ours
    per call); a kernel backend asked for by name, or lengths=, takes our path."""
    nn_cls = getattr(nn, mode)
    module = nn_cls(5, 7, batch_first=True)
    fused_s2s.patch(module)
    calls = []
    real = nn_cls.forward
    monkeypatch.setattr(nn_cls, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    x = torch.randn(3, 4, 5)
    module.backend = "native"
    out = module(x)[0]
    assert calls == [1]
    module.backend = "torch"
    torch.testing.assert_close(module(x)[0], out)
    module(x, lengths=torch.tensor([4, 2, 1]))
    assert calls == [1]
