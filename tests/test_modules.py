"""Drop-in: torch.nn state_dicts load into our modules and give the same outputs and gradients;
the attention layers match naive attention written independently."""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_s2s

from conftest import parity_cases

CPU64 = [p for p in parity_cases("gru_cell", dtypes=[torch.float64]) if p.values[1] == "cpu"]


def _grads(outputs, params):
    loss = sum((o.data if hasattr(o, "batch_sizes") else o).square().sum() for o in outputs)
    return torch.autograd.grad(loss, params, allow_unused=True)


def _flatten(out):
    """Tensors of an RNN result ((output, h_n) or (output, (h_n, c_n)), packed or not)."""
    o, state = out
    o = o.data if hasattr(o, "batch_sizes") else o
    return [o] + (list(state) if isinstance(state, tuple) else [state])


def _assert_same(ref_module, ours, *args):
    ref_out, our_out = _flatten(ref_module(*args)), _flatten(ours(*args))
    for a, b in zip(ref_out, our_out):
        torch.testing.assert_close(b, a)
    for (name, p_ref), g_ref, g in zip(ref_module.named_parameters(), _grads(ref_out, list(ref_module.parameters())),
                                       _grads(our_out, list(ours.parameters()))):
        torch.testing.assert_close(g, g_ref, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend,device,dtype", CPU64)
@pytest.mark.parametrize("mode", ["GRUCell", "LSTMCell"])
def test_cells_drop_in(backend, device, dtype, mode):
    torch.manual_seed(0)
    ref = getattr(nn, mode)(5, 7).double()
    ours = getattr(fused_s2s, mode)(5, 7, backend=backend).double()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, dtype=torch.float64)
    h = torch.randn(3, 7, dtype=torch.float64)
    state = h if mode == "GRUCell" else (h, torch.randn(3, 7, dtype=torch.float64))
    for args in [(x,), (x, state), (x[0],), (x[0], state[0] if mode == "GRUCell" else (h[0], state[1][0]))]:
        r, o = ref(*args), ours(*args)
        for a, b in zip(r if isinstance(r, tuple) else (r,), o if isinstance(o, tuple) else (o,)):
            torch.testing.assert_close(b, a)
    no_bias_ref = getattr(nn, mode)(5, 7, bias=False).double()
    no_bias = getattr(fused_s2s, mode)(5, 7, bias=False, backend=backend).double()
    no_bias.load_state_dict(no_bias_ref.state_dict())
    r, o = no_bias_ref(x), no_bias(x)
    torch.testing.assert_close(o, r)


CONFIGS = list(itertools.product([1, 2], [False, True], [False, True], [True, False]))


@pytest.mark.parametrize("backend,device,dtype", CPU64)
@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
@pytest.mark.parametrize("num_layers,bidirectional,batch_first,bias", CONFIGS,
                         ids=lambda v: str(v))
def test_layers_drop_in(backend, device, dtype, mode, num_layers, bidirectional, batch_first, bias):
    torch.manual_seed(1)
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    ref = getattr(nn, mode)(4, 6, **kw).double()
    ours = getattr(fused_s2s, mode)(4, 6, backend=backend, **kw).double()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    T, B = 5, 3
    x = torch.randn((B, T, 4) if batch_first else (T, B, 4), dtype=torch.float64)
    _assert_same(ref, ours, x)  # zero initial state
    h0 = torch.randn(num_layers * (2 if bidirectional else 1), B, 6, dtype=torch.float64)
    state = h0 if mode == "GRU" else (h0, torch.randn_like(h0))
    _assert_same(ref, ours, x, state)
    lengths = torch.tensor([2, 5, 1])
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    _assert_same(ref, ours, packed, state)
    unbatched = x[0] if batch_first else x[:, 0]
    state0 = h0[:, 0] if mode == "GRU" else (h0[:, 0], state[1][:, 0])
    _assert_same(ref, ours, unbatched, state0)


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_packed_output_round_trips(mode):
    ref = getattr(nn, mode)(3, 4, bidirectional=True).double()
    ours = getattr(fused_s2s, mode)(3, 4, bidirectional=True).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([6, 2, 4, 1]), enforce_sorted=False)
    out, _ = ours(packed)
    assert isinstance(out, nn.utils.rnn.PackedSequence)
    padded, lengths = pad_packed_sequence(out)
    ref_padded, _ = pad_packed_sequence(ref(packed)[0])
    torch.testing.assert_close(padded, ref_padded)
    assert lengths.tolist() == [6, 2, 4, 1]


@pytest.mark.parametrize("mode", ["GRU", "LSTM", "GRUCell", "LSTMCell"])
def test_empty_batch(mode):
    ref, ours = getattr(nn, mode)(3, 4), getattr(fused_s2s, mode)(3, 4)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(0, 3) if mode.endswith("Cell") else torch.randn(5, 0, 3, requires_grad=True)
    r, o = _flatten(ref(x)) if not mode.endswith("Cell") else ref(x), None
    o = ours(x)
    for a, b in zip(r if isinstance(r, (list, tuple)) else [r],
                    _flatten(o) if not mode.endswith("Cell") else (o if isinstance(o, tuple) else [o])):
        assert a.shape == b.shape
    if not mode.endswith("Cell"):
        _flatten(o)[0].sum().backward()
        assert x.grad.shape == x.shape


def test_dropout_between_layers():
    torch.manual_seed(0)
    gru = fused_s2s.GRU(3, 8, num_layers=2, dropout=0.5)
    x = torch.randn(4, 2, 3)
    gru.eval()
    a, b = gru(x)[0], gru(x)[0]
    assert torch.equal(a, b), "eval mode must be deterministic"
    gru.train()
    assert not torch.equal(gru(x)[0], a), "dropout must act between layers in training"


def test_module_api_matches_nn():
    ours, ref = fused_s2s.LSTM(3, 4, num_layers=2, bidirectional=True), nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    assert not isinstance(ours, nn.RNNBase)
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size", "_flat_weights_names"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert [[tuple(p.shape) for p in layer] for layer in ours.all_weights] == \
           [[tuple(p.shape) for p in layer] for layer in ref.all_weights]
    ours.flatten_parameters()
    with pytest.raises(ValueError, match="proj_size"):
        fused_s2s.LSTM(3, 4, proj_size=4)  # as nn: proj_size < hidden_size


# ------------------------------------------------------------------------------- attention

def _naive_additive(q_lin, k_lin, v, query, keys, values, mask):
    """The additive attention of the PyTorch tutorial / OpenNMT, written independently."""
    q = q_lin(query).unsqueeze(-2) if query.dim() == 2 else q_lin(query).unsqueeze(2)
    k = k_lin(keys) if query.dim() == 2 else k_lin(keys).unsqueeze(1)
    scores = torch.tanh(q + k) @ v
    if mask is not None:
        m = mask if query.dim() == 2 else mask.unsqueeze(1)
        scores = scores.masked_fill(~m, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ values if query.dim() == 3 else (weights.unsqueeze(1) @ values).squeeze(1), weights


@pytest.mark.parametrize("backend,device,dtype", [p for p in parity_cases("additive_attention", [torch.float64])
                                                  if p.values[1] == "cpu"])
@pytest.mark.parametrize("query_dims", [2, 3])
def test_bahdanau_matches_naive(backend, device, dtype, query_dims):
    torch.manual_seed(0)
    att = fused_s2s.BahdanauAttention(6, 5, 7, backend=backend).double()
    query = torch.randn(3, 6, dtype=torch.float64) if query_dims == 2 else torch.randn(3, 2, 6, dtype=torch.float64)
    keys = torch.randn(3, 4, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    ctx, w = att(query, keys, mask=mask)
    ref_ctx, ref_w = _naive_additive(att.score.query_proj, att.score.key_proj, att.score.energy, query, keys, keys, mask)
    torch.testing.assert_close(ctx, ref_ctx)
    torch.testing.assert_close(w, ref_w)
    proj = att.project_keys(keys)  # computed once, reused at every step
    ctx2, _ = att(query, keys, mask=mask, proj_keys=proj)
    torch.testing.assert_close(ctx2, ctx)


def test_bahdanau_normalized_energy():
    att = fused_s2s.BahdanauAttention(4, 4, 8, normalize=True).double()
    v = att.score.energy_vector()
    torch.testing.assert_close(v.norm(), att.score.energy_gain.abs())


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_luong_matches_naive(score):
    torch.manual_seed(0)
    att = fused_s2s.LuongAttention(5, 5, score=score, scale=0.5 if score == "dot" else None).double()
    query, keys = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    values = torch.randn(2, 4, 3, dtype=torch.float64)
    ctx, w = att(query, keys, values)
    if score == "concat":
        ref_ctx, ref_w = _naive_additive(att.score.query_proj, att.score.key_proj, att.score.energy,
                                         query, keys, values, None)
    else:
        target = keys if score == "dot" else keys @ att.weight.t()  # e = q . W k
        scores = query @ target.transpose(1, 2) * (0.5 if score == "dot" else 1.0)
        ref_w = torch.softmax(scores, -1)
        ref_ctx = ref_w @ values
    torch.testing.assert_close(ctx, ref_ctx)
    torch.testing.assert_close(w, ref_w)


def test_attention_kv_batch_idx_shares_keys():
    """Beams that read their source through kv_batch_idx equal beams with copied keys."""
    torch.manual_seed(0)
    att = fused_s2s.BahdanauAttention(4, 6, 8).double()
    keys = torch.randn(2, 5, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    idx = torch.tensor([0, 0, 0, 1, 1, 1])
    query = torch.randn(6, 4, dtype=torch.float64)
    ctx, w = att(query, keys, mask=mask, kv_batch_idx=idx)
    ref_ctx, ref_w = att(query, keys[idx], mask=mask[idx])
    torch.testing.assert_close(ctx, ref_ctx)
    torch.testing.assert_close(w, ref_w)


def _padded_with_lengths(module, x, state, lengths):
    """Our module on padded input with `lengths=`, its loss-ready tensors."""
    return _flatten(module(x, state, lengths=lengths))


def _packed_then_padded(module, x, state, lengths, batch_first):
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    out, final = module(packed, state)
    out = pad_packed_sequence(out, batch_first=batch_first, total_length=x.shape[1 if batch_first else 0])[0]
    return _flatten((out, final))


@pytest.mark.parametrize("backend,device,dtype", CPU64)
@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_lengths_give_the_results_of_packing(backend, device, dtype, mode, batch_first):
    """Padded input with lengths= equals nn's packed run (outputs, final states, every
    gradient); padding holding NaN changes nothing; a zero length keeps the initial state."""
    torch.manual_seed(2)
    kw = dict(num_layers=2, bidirectional=True, batch_first=batch_first)
    ref = getattr(nn, mode)(4, 5, **kw).double()
    ours = getattr(fused_s2s, mode)(4, 5, backend=backend, **kw).double()
    ours.load_state_dict(ref.state_dict())
    T, B = 6, 4
    lengths = torch.tensor([3, 6, 1, 4])
    x = torch.randn((B, T, 4) if batch_first else (T, B, 4), dtype=torch.float64)
    past = torch.arange(T)[None, :] >= lengths[:, None]  # (B, T)
    x_nan = x.masked_fill((past if batch_first else past.t())[..., None], float("nan"))
    h0 = torch.randn(4, B, 5, dtype=torch.float64)
    state = h0 if mode == "GRU" else (h0, torch.randn_like(h0))
    expected = _packed_then_padded(ref, x, state, lengths, batch_first)
    got = _padded_with_lengths(ours, x_nan.requires_grad_(), state, lengths)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a)
    params = list(ref.parameters())
    for (name, _), g_ref, g in zip(ref.named_parameters(), _grads(expected, params),
                                   _grads(got, list(ours.parameters()))):
        torch.testing.assert_close(g, g_ref, msg=lambda m: f"grad of {name}: {m}")

    zero = torch.tensor([0, 6, 1, 4])  # nn cannot pack a zero length; the row must stay put
    one_layer = getattr(fused_s2s, mode)(4, 5, batch_first=batch_first, backend=backend).double()
    s0 = h0[:1].clone().requires_grad_()
    out, final = one_layer(x, s0 if mode == "GRU" else (s0, state[1][:1]), lengths=zero)
    final = final if mode == "GRU" else final[0]
    row0 = out[0] if batch_first else out[:, 0]
    assert torch.equal(row0, torch.zeros_like(row0)) and torch.equal(final[0, 0], s0[0, 0].detach())
    final.sum().backward()
    assert torch.equal(s0.grad[0, 0], torch.ones(5, dtype=torch.float64))


def test_lengths_bad_input():
    gru = fused_s2s.GRU(3, 4)
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match=r"lengths values must lie in \[0, 5\]"):
        gru(x, lengths=torch.tensor([6, 1]))
    with pytest.raises(ValueError, match="lengths must have shape"):
        gru(x, lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        gru(x, lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="batched"):
        gru(x[:, 0], lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match="PackedSequence carries its own"):
        gru(pack_padded_sequence(x, torch.tensor([5, 2])), lengths=torch.tensor([5, 2]))


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
@pytest.mark.parametrize("layout", ["padded", "lengths", "packed"])
def test_route_to_whole_sequence_kernels(monkeypatch, mode, layout):
    """The modules' route to the persistent kernels (padded (T, B, I) input, lengths on the
    device, packed input padded and packed again, layers, directions, dropout's place), run on
    CPU with an independent float64 stand-in for the kernels: it must equal nn."""
    from conftest import masked_layer_reference
    from fused_s2s.backends import persistent_autograd as PA
    calls = []

    def stand_in(cell):
        def layer(x, *args, **kw):
            h0, c0 = (args[0], None) if cell == "gru" else args[:2]
            w_ih, w_hh, b_ih, b_hh, lengths, reverse = args[-6:]
            assert kw == {"backend": "cpp"}
            assert x.dim() == 3 and (lengths is None or lengths.dtype == torch.int64)
            calls.append(None if lengths is None else lengths.tolist())
            out, h, c = masked_layer_reference(cell, F.linear(x, w_ih, b_ih), h0, c0, w_hh, b_hh, lengths, reverse)
            return (out, h) if cell == "gru" else (out, h, c)
        return layer

    monkeypatch.setattr(PA, "route", lambda *args: ("cpp", ""))
    monkeypatch.setattr(PA, "persistent_gru_layer", stand_in("gru"))
    monkeypatch.setattr(PA, "persistent_lstm_layer", stand_in("lstm"))
    torch.manual_seed(3)
    ref = getattr(nn, mode)(4, 5, num_layers=2, bidirectional=True).double()
    # the persistent route belongs to the kernel backends ("auto" on CPU may run native instead)
    ours = getattr(fused_s2s, mode)(4, 5, num_layers=2, bidirectional=True, backend="cpp").double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    h0 = torch.randn(4, 3, 5, dtype=torch.float64)
    state = h0 if mode == "GRU" else (h0, torch.randn_like(h0))
    lengths = torch.tensor([2, 6, 5])
    if layout == "padded":
        _assert_same(ref, ours, x, state)
        assert calls == [None] * 4  # 2 layers x 2 directions
    elif layout == "lengths":
        expected = _packed_then_padded(ref, x, state, lengths, False)
        for a, b in zip(expected, _padded_with_lengths(ours, x, state, lengths)):
            torch.testing.assert_close(b, a)
        assert calls == [[2, 6, 5]] * 4
    else:
        _assert_same(ref, ours, pack_padded_sequence(x, lengths, enforce_sorted=False), state)
        assert calls == [[6, 5, 2]] * 4  # in the sorted order of the packed batch


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("layout", ["padded", "lengths", "packed"])
def test_route_to_triton_persistent_kernels(monkeypatch, mode, bidirectional, layout):
    """The whole route with the real Triton persistent kernels, run on CPU by Triton's
    interpreter (a bidirectional layer's two directions in one launch), two layers, against nn
    in float64 by the float32 tolerance rule: outputs, final states, every gradient."""
    from conftest import REQUIRED, assert_close_to_reference
    from fused_s2s.backends import registry
    from fused_s2s.backends import persistent_autograd as PA
    reason = registry.unsupported_reason("triton", "gru_cell", torch.device("cpu"), torch.float32)
    if reason is not None and "triton" not in REQUIRED:
        pytest.skip(f"triton on cpu: {reason}")
    torch.manual_seed(4)
    kw = dict(num_layers=2, bidirectional=bidirectional)
    ref = getattr(nn, mode)(6, 20, **kw).double()
    ours = getattr(fused_s2s, mode)(6, 20, backend="triton", **kw)
    ours.load_state_dict(ref.state_dict())
    T, B, D = 7, 18, 2 if bidirectional else 1  # 18 rows: two programs of 16
    x = torch.randn(T, B, 6, dtype=torch.float64)
    h0 = torch.randn(2 * D, B, 20, dtype=torch.float64)
    states = [h0] if mode == "GRU" else [h0, torch.randn_like(h0)]
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T

    def results(module, dtype, routed):
        module = module if dtype == torch.float64 else copy.deepcopy(module).to(dtype)
        xs = x.to(dtype).requires_grad_()
        ss = [s.to(dtype).requires_grad_() for s in states]
        state = ss[0] if mode == "GRU" else tuple(ss)
        calls = []
        if routed:
            layer_fn = f"persistent_{mode.lower()}_layer"
            original = getattr(PA, layer_fn)
            monkeypatch.setattr(PA, layer_fn, lambda *a, **k: calls.append(a[1].dim()) or original(*a, **k))
            monkeypatch.setattr(PA, "route", lambda *a: ("triton", ""))
        try:
            if layout == "padded":
                out, final = module(xs, state)
            elif layout == "lengths" and routed:
                out, final = module(xs, state, lengths=lengths)
            else:  # nn, and packed input for ours
                out, final = module(pack_padded_sequence(xs, lengths, enforce_sorted=False), state)
                out = pad_packed_sequence(out, total_length=T)[0]
        finally:
            monkeypatch.undo()
        if routed:  # one call per layer, with a stacked (2, B, H) state when bidirectional
            assert calls == [3 if bidirectional else 2] * 2
        finals = [final] if mode == "GRU" else list(final)
        tensors = [out] + finals
        loss = sum((t * torch.linspace(-1, 1, t.numel(), dtype=dtype).view_as(t)).sum() for t in tensors)
        grads = torch.autograd.grad(loss, [xs, *ss, *module.parameters()])
        return [t.detach() for t in tensors] + list(grads)

    ref64 = results(ref, torch.float64, False)
    plain = results(ref, torch.float32, False)
    got = results(ours, torch.float32, True)
    for i, (a, r, p) in enumerate(zip(got, ref64, plain)):
        assert_close_to_reference(a, r, p, f"result {i}")
