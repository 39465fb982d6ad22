"""Backend selection, bad input, and the custom-op layer (opcheck, torch.compile)."""
import subprocess
import sys

import pytest
import torch

import fused_s2s
from fused_s2s import functional as FS
from fused_s2s.backends import reference, registry

from conftest import parity_cases

# ---------------------------------------------------------------------------- selection


def test_selection_order(monkeypatch):
    monkeypatch.setattr(registry, "_process_backend", None)
    monkeypatch.delenv("FUSED_S2S_BACKEND", raising=False)
    assert fused_s2s.get_backend() == "auto"
    monkeypatch.setenv("FUSED_S2S_BACKEND", "torch")
    assert fused_s2s.get_backend() == "torch"
    fused_s2s.set_backend("auto")
    assert fused_s2s.get_backend() == "auto"  # set_backend wins over the environment
    fused_s2s.set_backend(None)
    assert fused_s2s.get_backend() == "torch"
    monkeypatch.setenv("FUSED_S2S_BACKEND", "fast")
    with pytest.raises(ValueError, match="FUSED_S2S_BACKEND"):
        fused_s2s.get_backend()
    with pytest.raises(ValueError, match="backend"):
        fused_s2s.set_backend("cuda")
    with pytest.raises(ValueError, match="backend"):
        fused_s2s.GRU(3, 4, backend="nope")


def test_named_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setitem(registry._load_errors, "triton", "ImportError: pretend it is missing")
    monkeypatch.delitem(registry._loaded, "triton", raising=False)
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    w_ih, w_hh = torch.randn(12, 3), torch.randn(12, 4)
    with pytest.raises(fused_s2s.BackendUnavailable, match="pretend it is missing"):
        FS.gru_cell(x, h, w_ih, w_hh, backend="triton")


def test_auto_falls_back_with_one_warning(monkeypatch):
    """A kernel "auto" would pick cannot load: attention falls back to `torch` with one warning;
    a cell (whose default is PyTorch's own kernel) runs native, with no warning at all."""
    import warnings
    monkeypatch.setitem(registry._load_errors, "cpp", "RuntimeError: no compiler")
    monkeypatch.delitem(registry._loaded, "cpp", raising=False)
    monkeypatch.setattr(registry, "_warned", set())
    # many queries per row: a class where the CPU table picks cpp (at Tq=1 it picks torch)
    q, k, v = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(4)
    with pytest.warns(RuntimeWarning, match="no compiler") as record:
        for _ in range(3):
            out = FS.additive_attention(q, k, v, k, backend="auto")
    assert len(record) == 1
    assert record[0].filename == __file__  # the caller's line, not a line inside fused_s2s
    torch.testing.assert_close(out, reference.additive_attention(q, k, v, k))
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    w_ih, w_hh = torch.randn(12, 3), torch.randn(12, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = FS.gru_cell(x, h, w_ih, w_hh, backend="auto")
    torch.testing.assert_close(out, reference.gru_cell(x, h, w_ih, w_hh))


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "fused_s2s", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for name in registry.NAMES:
        assert name in out.stdout


# ---------------------------------------------------------------------------- bad input

def _cell_args():
    return torch.randn(2, 3), torch.randn(2, 4), torch.randn(12, 3), torch.randn(12, 4)


@pytest.mark.parametrize("change,match", [
    (lambda a: (a[0].unsqueeze(0),) + a[1:], "input must have 1 or 2 dimensions"),
    (lambda a: (a[0], torch.randn(3, 4)) + a[2:], "hx must have shape"),
    (lambda a: a[:2] + (torch.randn(12, 5), a[3]), "w_ih must have shape"),
    (lambda a: a[:3] + (torch.randn(12, 5),), "w_hh must have shape"),
    (lambda a: (a[0].double(),) + a[1:], "dtype"),
    (lambda a: (a[0].long(),) + a[1:], "floating-point"),
    (lambda a: (a[0], a[1].double()) + a[2:], "hx has dtype"),
    (lambda a: a[:2] + ([[1.0]], a[3]), "w_ih must be a Tensor"),
])
def test_cell_bad_input(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        FS.gru_cell(*change(_cell_args()))


def test_cell_bad_bias():
    x, h, w_ih, w_hh = _cell_args()
    with pytest.raises(ValueError, match="b_hh must have shape"):
        FS.gru_cell(x, h, w_ih, w_hh, torch.randn(12), torch.randn(11))


@pytest.mark.parametrize("backend", ["native", "auto", "torch"])
def test_cell_bad_input_on_each_path(backend):
    """PyTorch's cell kernel, handed unchecked arguments on the native path, would run on some
    of these without complaint and give its own messages on the others: each still raises ours."""
    x, h, w_ih, w_hh = _cell_args()
    with pytest.raises(ValueError, match="b_ih must have shape"):  # (1,) broadcasts in the kernel
        FS.gru_cell(x, h, w_ih, w_hh, torch.randn(1), torch.randn(12), backend=backend)
    with pytest.raises(ValueError, match=r"w_hh must have shape \(9, 3\)"):  # 12 rows split into 3 gates
        FS.gru_cell(torch.randn(2, 3), torch.randn(2, 3), torch.randn(12, 3), torch.randn(12, 3), backend=backend)
    with pytest.raises(TypeError, match="b_hh has dtype"):
        FS.gru_cell(x, h, w_ih, w_hh, torch.randn(12), torch.randn(12, dtype=torch.float64), backend=backend)
    with pytest.raises(ValueError, match="cx must have shape"):
        FS.lstm_cell(x, (h, torch.randn(3, 4)), torch.randn(16, 3), torch.randn(16, 4), backend=backend)
    with pytest.raises(ValueError, match="cx must have 2 dimensions"):
        FS.lstm_cell(x, (h, torch.randn(2, 4, 1)), torch.randn(16, 3), torch.randn(16, 4), backend=backend)


def _attention_args():
    return torch.randn(3, 8), torch.randn(3, 5, 8), torch.randn(8), torch.randn(3, 5, 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mask=torch.ones(3, 5)), "mask must be a bool"),
    (dict(mask=torch.ones(3, 4, dtype=torch.bool)), "mask must have shape"),
    (dict(lengths=torch.tensor([1.0, 2.0, 3.0])), "lengths must be an integer"),
    (dict(lengths=torch.tensor([1, 2, 6])), r"lengths values must lie in \[0, 5\]"),
    (dict(kv_batch_idx=torch.tensor([0, 1, 3])), r"kv_batch_idx values must lie in \[0, 2\]"),
    (dict(kv_batch_idx=torch.tensor([0, 1])), "kv_batch_idx must have shape"),
])
def test_attention_bad_masks(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        FS.additive_attention(*_attention_args(), **kwargs)


def test_attention_bad_shapes():
    q, k, v, values = _attention_args()
    with pytest.raises(ValueError, match="share the attention size"):
        FS.additive_attention(q, k, torch.randn(7), values)
    with pytest.raises(ValueError, match="values must have shape"):
        FS.additive_attention(q, k, v, torch.randn(3, 4, 4))
    with pytest.raises(ValueError, match="kv_batch_idx"):
        FS.additive_attention(q[:2], k, v, values)
    with pytest.raises(ValueError, match="k_proj must have 3 dimensions"):
        FS.additive_attention(q, k[0], v, values)
    with pytest.raises(ValueError, match="share the feature size"):
        FS.dot_attention(torch.randn(3, 7), k, values)
    with pytest.raises(TypeError, match="keys has dtype"):
        FS.dot_attention(q, k.double(), values)


def test_module_bad_input():
    gru = fused_s2s.GRU(3, 4, num_layers=2)
    with pytest.raises(RuntimeError, match="input_size"):
        gru(torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match="2D or 3D"):
        gru(torch.randn(5))
    with pytest.raises(RuntimeError, match="Expected hx size"):
        gru(torch.randn(5, 2, 3), torch.randn(1, 2, 4))
    with pytest.raises(RuntimeError, match="same dtype"):
        gru(torch.randn(5, 2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="tuple"):
        fused_s2s.LSTM(3, 4)(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4),))
    with pytest.raises(ValueError, match="hidden_size"):
        fused_s2s.GRU(3, 0)
    with pytest.raises(ValueError, match="score"):
        fused_s2s.LuongAttention(3, 3, score="cosine")


@pytest.mark.parametrize("backend,device,dtype", [p for p in parity_cases("additive_attention") if p.values[2] == torch.float32])
def test_non_contiguous_and_empty_inputs(backend, device, dtype):
    q = torch.randn(8, 3, device=device, dtype=dtype).t()           # (3, 8), non-contiguous
    k = torch.randn(5, 3, 8, device=device, dtype=dtype).transpose(0, 1)
    values = torch.randn(3, 5, 4, device=device, dtype=dtype)
    v = torch.randn(8, device=device, dtype=dtype)
    ctx, w = FS.additive_attention(q, k, v, values, backend=backend)
    ref_ctx, ref_w = reference.additive_attention(q, k, v, values)
    torch.testing.assert_close(ctx, ref_ctx)
    # empty batch and zero-length sources give empty/zero results, and gradients flow
    q0 = torch.randn(0, 8, device=device, dtype=dtype, requires_grad=True)
    ctx0, w0 = FS.additive_attention(q0, k[:0], v, values[:0], backend=backend)
    assert ctx0.shape == (0, 4) and w0.shape == (0, 5)
    k_empty = torch.randn(3, 0, 8, device=device, dtype=dtype, requires_grad=True)
    ctx1, w1 = FS.additive_attention(q, k_empty, v, values[:, :0], backend=backend)
    assert ctx1.shape == (3, 4) and torch.all(ctx1 == 0) and w1.shape == (3, 0)
    ctx1.sum().backward()
    assert k_empty.grad.shape == k_empty.shape


# ----------------------------------------------------------------------- custom ops

def _op_samples(backend):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B, H, Tq, Tk, A, Dv = 3, 5, 2, 4, 6, 3
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    lengths = torch.tensor([4, 2, 3])
    q, k, v, values = r(B, Tq, A), r(B, Tk, A), r(A), r(B, Tk, Dv)
    be = registry.load(backend)
    ctx, w, lse = be.additive_attention_fwd(q, k, v, values, mask, None, None)
    dctx, dw, dlse = be.dot_attention_fwd(q, k, values, None, lengths, None, 0.5)
    h_new, saved = be.gru_cell_fwd(r(B, 3 * H), r(B, H), r(3 * H, H), r(3 * H))
    c = r(B, H)
    lh, lc, lsaved = be.lstm_cell_fwd(r(B, 4 * H), r(B, H), c, r(4 * H, H), None)
    return {
        "gru_cell_fwd": (r(B, 3 * H), r(B, H), r(3 * H, H), r(3 * H)),
        "gru_cell_bwd": (r(B, H), r(B, H), saved),
        "lstm_cell_fwd": (r(B, 4 * H), r(B, H), r(B, H), r(4 * H, H), None),
        "lstm_cell_bwd": (r(B, H), r(B, H), c, lc, lsaved),
        "additive_attention_fwd": (q, k, v, values, mask, None, None),
        "additive_attention_bwd": (r(B, Tq, Dv), r(B, Tq, Tk), q, k, v, values, mask, None, None, w, lse),
        "dot_attention_fwd": (q, k, values, None, lengths, torch.tensor([2, 0, 0]), 0.5),
        "dot_attention_bwd": (r(B, Tq, Dv), r(B, Tq, Tk), q, k, values, None, lengths, None, 0.5, dw, dlse),
    }


@pytest.mark.parametrize("backend,device,dtype", [p for p in parity_cases("gru_cell", [torch.float32])
                                                  if p.values[1] == "cpu" and p.values[0] in registry.KERNEL_NAMES])
def test_opcheck(backend, device, dtype):
    for name, args in _op_samples(backend).items():
        torch.library.opcheck(getattr(torch.ops.fused_s2s, name).default, (backend,) + args)


def test_compile_fullgraph_module_with_backward():
    """No graph break at the RNN (nn.GRU breaks the graph here), same results as eager."""
    torch.manual_seed(0)
    gru = fused_s2s.GRU(4, 5, num_layers=2, bidirectional=True)
    att = fused_s2s.BahdanauAttention(10, 10, 6)

    def step(x):
        out, h = gru(x)
        keys = out.transpose(0, 1)
        ctx, w = att(h[-1].repeat(1, 2), keys)
        return ctx.sum() + w.square().sum()

    x = torch.randn(6, 3, 4)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_loss = step(x)
    eager_grads = torch.autograd.grad(eager_loss, list(gru.parameters()))
    loss = compiled(x)
    grads = torch.autograd.grad(loss, list(gru.parameters()))
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend,device,dtype", [p for p in parity_cases("additive_attention", [torch.float32])
                                                  if p.values[1] == "cpu"])
def test_zero_feature_sizes(backend, device, dtype):
    """A = 0 (every score 0: uniform weights over valid positions) and Dv = 0 (empty context)."""
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    ctx, w = FS.additive_attention(torch.randn(2, 0), torch.randn(2, 3, 0), torch.randn(0), torch.randn(2, 3, 4),
                                   mask, backend=backend)
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))
    ctx, w = FS.dot_attention(torch.randn(2, 5), torch.randn(2, 3, 5), torch.randn(2, 3, 0), mask, backend=backend)
    assert ctx.shape == (2, 0) and w.shape == (2, 3)
