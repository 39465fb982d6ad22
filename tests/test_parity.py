"""Every backend x device x dtype against the float64 reference: forward and every gradient."""
import pytest
import torch
from torch import nn

import fused_s2s
from fused_s2s import functional as FS
from fused_s2s.backends import reference

from conftest import assert_close_to_reference, parity_cases

pytestmark = pytest.mark.usefixtures("poison_uninitialized")


def _check(ours_fn, ref_fn, inputs64, device, dtype, grad_inputs):
    """Run ours on (device, dtype) copies and the reference on float64 copies; compare every
    output and the gradient of every input in `grad_inputs` (indices) under random upstream
    gradients. Non-float inputs (masks, indices) pass through unchanged."""
    def prepare(target_dtype, target_device):
        out = []
        for i, t in enumerate(inputs64):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t = t.detach().to(target_device, target_dtype).requires_grad_(i in grad_inputs)
            elif isinstance(t, torch.Tensor):
                t = t.to(target_device)
            out.append(t)
        return out

    ins64, ins = prepare(torch.float64, "cpu"), prepare(dtype, device)
    ref_out, ours_out = ref_fn(*ins64), ours_fn(*ins)
    ref_out = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    ours_out = ours_out if isinstance(ours_out, tuple) else (ours_out,)
    plain_out = None
    if dtype != torch.float64:  # the plain PyTorch computation in our precision (tolerance rule)
        plain_ins = prepare(dtype, device)
        plain_out = ref_fn(*plain_ins)
        plain_out = plain_out if isinstance(plain_out, tuple) else (plain_out,)
    for k, (o, r) in enumerate(zip(ours_out, ref_out)):
        assert o.dtype == dtype and o.device.type == device, f"output {k}: {o.dtype} on {o.device}"
        assert_close_to_reference(o.detach().cpu(), r.detach(), None if plain_out is None
                                  else plain_out[k].detach().cpu(), name=f"output {k}")

    g = torch.Generator().manual_seed(1234)
    upstream = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in ref_out]
    wrt64 = [ins64[i] for i in grad_inputs]
    grads64 = torch.autograd.grad(ref_out, wrt64, upstream)
    grads = torch.autograd.grad(ours_out, [ins[i] for i in grad_inputs],
                                [u.to(device, dtype) for u in upstream])
    plain_grads = [None] * len(grads)
    if plain_out is not None:
        plain_grads = torch.autograd.grad(plain_out, [plain_ins[i] for i in grad_inputs],
                                          [u.to(device, dtype) for u in upstream])
    for i, g, g64, gp in zip(grad_inputs, grads, grads64, plain_grads):
        assert_close_to_reference(g.cpu(), g64, None if gp is None else gp.cpu(), name=f"grad of input {i}")


# ----------------------------------------------------------------------------------- cells

CELL_SHAPES = [(1, 3, 1), (5, 7, 33), (2, 4, 257)]  # (B, I, H)


def _cell_inputs(B, I, H, gates, bias=True):
    g = torch.Generator().manual_seed(B * 1000 + H)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.5  # noqa: E731
    x, h = r(B, I), r(B, H)
    w_ih, w_hh = r(gates * H, I), r(gates * H, H)
    b_ih, b_hh = (r(gates * H), r(gates * H)) if bias else (None, None)
    return x, h, w_ih, w_hh, b_ih, b_hh


@pytest.mark.parametrize("backend,device,dtype", parity_cases("gru_cell"))
@pytest.mark.parametrize("B,I,H", CELL_SHAPES)
def test_gru_cell(backend, device, dtype, B, I, H):
    _check(lambda *a: FS.gru_cell(*a, backend=backend), reference.gru_cell,
           _cell_inputs(B, I, H, 3), device, dtype, grad_inputs=[0, 1, 2, 3, 4, 5])


@pytest.mark.parametrize("backend,device,dtype", parity_cases("lstm_cell"))
@pytest.mark.parametrize("B,I,H", CELL_SHAPES)
def test_lstm_cell(backend, device, dtype, B, I, H):
    x, h, w_ih, w_hh, b_ih, b_hh = _cell_inputs(B, I, H, 4)
    c = torch.randn(B, H, dtype=torch.float64)
    ours = lambda x, h, c, *w: FS.lstm_cell(x, (h, c), *w, backend=backend)  # noqa: E731
    ref = lambda x, h, c, *w: reference.lstm_cell(x, (h, c), *w)  # noqa: E731
    _check(ours, ref, (x, h, c, w_ih, w_hh, b_ih, b_hh), device, dtype, grad_inputs=[0, 1, 2, 3, 4, 5, 6])


@pytest.mark.parametrize("backend,device,dtype", parity_cases("gru_cell"))
def test_cell_without_bias(backend, device, dtype):
    x, h, w_ih, w_hh, _, _ = _cell_inputs(3, 4, 5, 3, bias=False)
    _check(lambda *a: FS.gru_cell(*a, backend=backend), reference.gru_cell,
           (x, h, w_ih, w_hh), device, dtype, grad_inputs=[0, 1, 2, 3])


# ---------------------------------------------------------------------------------- layers

@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
@pytest.mark.parametrize("backend,device,dtype", parity_cases("gru_cell"))
def test_layer_packed_bidirectional(mode, backend, device, dtype):
    """Two bidirectional layers over a packed batch of uneven lengths against nn.GRU/nn.LSTM
    in float64: outputs, final states and every parameter gradient."""
    torch.manual_seed(0)
    ref = getattr(nn, mode)(6, 33, num_layers=2, bidirectional=True).double()
    ours = getattr(fused_s2s, mode)(6, 33, num_layers=2, bidirectional=True, backend=backend)
    ours.load_state_dict(ref.state_dict())
    ours.to(device, dtype)
    lengths = torch.tensor([5, 1, 7, 3])
    x64 = torch.randn(7, 4, 6, dtype=torch.float64)

    def run(module, x):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, state = module(packed)
        h = state[0] if isinstance(state, tuple) else state
        padded, _ = nn.utils.rnn.pad_packed_sequence(out)
        return padded, h

    ref_out, ref_h = run(ref, x64)
    plain = None
    if dtype != torch.float64:  # the same module in our precision with plain PyTorch
        plain = getattr(nn, mode)(6, 33, num_layers=2, bidirectional=True).to(device, dtype)
        plain.load_state_dict(ref.state_dict())
    out, h = run(ours, x64.to(device, dtype))
    plain_out = run(plain, x64.to(device, dtype)) if plain is not None else (None, None)
    assert_close_to_reference(out.detach().cpu(), ref_out.detach(),
                              None if plain is None else plain_out[0].detach().cpu(), "output")
    assert_close_to_reference(h.detach().cpu(), ref_h.detach(),
                              None if plain is None else plain_out[1].detach().cpu(), "h_n")
    (ref_out.square().sum() + ref_h.sum()).backward()
    (out.float().square().sum() + h.float().sum()).backward()
    if plain is not None:
        (plain_out[0].float().square().sum() + plain_out[1].float().sum()).backward()
    for name, p_ref in ref.named_parameters():
        p = getattr(ours, name)
        assert_close_to_reference(p.grad.cpu(), p_ref.grad, None if plain is None
                                  else getattr(plain, name).grad.cpu(), f"grad {name}")


# ------------------------------------------------------------------------------- attention

# (B, Tq, Tk, A, Dv, mask kind, key rows for kv_batch_idx or None, 2-D query)
ATTENTION_CASES = [
    (1, 1, 1, 1, 1, None, None, True),
    (3, 1, 7, 33, 5, "random", None, True),
    (2, 3, 9, 16, 4, "lengths", None, False),
    (3, 2, 5, 8, 3, "fully_masked_row", None, False),
    (4, 2, 6, 8, 5, "random", 2, False),
    (2, 4, 40, 257, 7, "lengths", None, False),
]


def _attention_inputs(B, Tq, Tk, A, Dv, mask_kind, key_rows, single, seed=0):
    g = torch.Generator().manual_seed(seed + B * 100 + Tk)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    bk = key_rows or B
    q = r(B, A) if single else r(B, Tq, A)
    k, values = r(bk, Tk, A), r(bk, Tk, Dv)
    mask = lengths = kv_batch_idx = None
    if mask_kind == "random":
        mask = torch.rand(bk, Tk, generator=g) > 0.3
        mask[:, 0] = True
    elif mask_kind == "fully_masked_row":
        mask = torch.rand(bk, Tk, generator=g) > 0.3
        mask[:, 0] = True
        mask[1] = False
    elif mask_kind == "lengths":
        lengths = torch.randint(1, Tk + 1, (bk,), generator=g)
    if key_rows:
        kv_batch_idx = torch.randint(0, bk, (B,), generator=g)
    return q, k, values, mask, lengths, kv_batch_idx


@pytest.mark.parametrize("backend,device,dtype", parity_cases("additive_attention"))
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "x".join(map(str, c)))
def test_additive_attention(backend, device, dtype, case):
    q, k, values, mask, lengths, kv_idx = _attention_inputs(*case)
    v = torch.randn(q.shape[-1], dtype=torch.float64)

    def ours(q, k, v, values, mask, lengths, kv_idx):
        return FS.additive_attention(q, k, v, values, mask, lengths=lengths, kv_batch_idx=kv_idx, backend=backend)

    def ref(q, k, v, values, mask, lengths, kv_idx):
        return reference.additive_attention(q, k, v, values, mask, lengths=lengths, kv_batch_idx=kv_idx)

    _check(ours, ref, (q, k, v, values, mask, lengths, kv_idx), device, dtype, grad_inputs=[0, 1, 2, 3])


@pytest.mark.parametrize("backend,device,dtype", parity_cases("dot_attention"))
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("scale", [None, 0.25])
def test_dot_attention(backend, device, dtype, case, scale):
    q, k, values, mask, lengths, kv_idx = _attention_inputs(*case)

    def ours(q, k, values, mask, lengths, kv_idx):
        return FS.dot_attention(q, k, values, mask, scale, lengths=lengths, kv_batch_idx=kv_idx, backend=backend)

    def ref(q, k, values, mask, lengths, kv_idx):
        return reference.dot_attention(q, k, values, mask, scale, lengths=lengths, kv_batch_idx=kv_idx)

    _check(ours, ref, (q, k, values, mask, lengths, kv_idx), device, dtype, grad_inputs=[0, 1, 2])


@pytest.mark.parametrize("backend,device,dtype", parity_cases("additive_attention"))
def test_fully_masked_row_is_zero_with_finite_grads(backend, device, dtype):
    q, k, values, mask, _, _ = _attention_inputs(3, 2, 5, 8, 3, "fully_masked_row", None, False)
    v = torch.randn(8, dtype=torch.float64)
    ins = [t.to(device, dtype).requires_grad_() for t in (q, k, v, values)]
    context, weights = FS.additive_attention(*ins, mask.to(device), backend=backend)
    assert torch.equal(weights[1], torch.zeros_like(weights[1]))
    assert torch.equal(context[1], torch.zeros_like(context[1]))
    assert torch.all(weights[~mask.to(device)[:, None, :].expand_as(weights)] == 0)
    (context.sum() + weights.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in ins)


# ------------------------------------------------------------------------------- gradcheck

def _float64_backends(op):
    return [p for p in parity_cases(op, dtypes=[torch.float64]) if p.values[1] == "cpu"]


@pytest.mark.parametrize("backend,device,dtype", _float64_backends("gru_cell"))
def test_gradcheck_cells(backend, device, dtype):
    x, h, w_ih, w_hh, b_ih, b_hh = (t.requires_grad_() for t in _cell_inputs(2, 3, 4, 3))
    assert torch.autograd.gradcheck(lambda *a: FS.gru_cell(*a, backend=backend), (x, h, w_ih, w_hh, b_ih, b_hh))
    x, h, w_ih, w_hh, b_ih, b_hh = (t.requires_grad_() for t in _cell_inputs(2, 3, 4, 4))
    c = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, h, c, *w: FS.lstm_cell(x, (h, c), *w, backend=backend),
                                    (x, h, c, w_ih, w_hh, b_ih, b_hh))


@pytest.mark.parametrize("backend,device,dtype", _float64_backends("additive_attention"))
def test_gradcheck_attention(backend, device, dtype):
    q, k, values, mask, _, kv_idx = _attention_inputs(3, 2, 5, 4, 3, "fully_masked_row", 3, False)
    v = torch.randn(4, dtype=torch.float64)
    args = [t.requires_grad_() for t in (q, k, v, values)]
    assert torch.autograd.gradcheck(
        lambda q, k, v, vals: FS.additive_attention(q, k, v, vals, mask, kv_batch_idx=kv_idx, backend=backend), args)
    args = [t.detach().requires_grad_() for t in (q, k, values)]
    assert torch.autograd.gradcheck(
        lambda q, k, vals: FS.dot_attention(q, k, vals, mask, 0.5, kv_batch_idx=kv_idx, backend=backend), args)
