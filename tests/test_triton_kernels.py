"""The Triton kernels, primitive by primitive, against the kernel contract's reference
(fused_s2s.backends.torch_backend) computed in float64 from the same inputs.

Without a GPU the kernels run on CPU tensors through Triton's interpreter; the same cases run
on CUDA (marker `gpu`) in float32, float16 and bfloat16. Tolerances: conftest's rule
(assert_close defaults for float32, else at most twice the error of the plain PyTorch
computation in the same dtype, the rule for half types). Every float tensor the launchers
allocate is filled with NaN first, so an element a kernel never writes fails the comparison.
"""
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fused_s2s.backends import registry, torch_backend as ref  # noqa: E402

registry.load("triton")  # fused_s2s.triton_kernels, from the source folder in an uninstalled checkout
from fused_s2s import triton_kernels as tk  # noqa: E402
from fused_s2s.triton_kernels import _attention, _common  # noqa: E402
from fused_s2s.triton_kernels import additive_attention as additive_module  # noqa: E402
from fused_s2s.triton_kernels import dot_attention as dot_module  # noqa: E402

from conftest import assert_close_to_reference  # noqa: E402

NAN = float("nan")


def _device_dtypes():
    params = [pytest.param("cpu", torch.float32, id="cpu-float32"),
              pytest.param("cpu", torch.float16, id="cpu-float16")]
    params += [pytest.param("cuda", t, marks=pytest.mark.gpu, id=f"cuda-{str(t)[6:]}")
               for t in (torch.float32, torch.float16, torch.bfloat16)]
    return params


DEVICE_DTYPES = _device_dtypes()
FLOAT32_ONLY = [p for p in DEVICE_DTYPES if p.values[1] == torch.float32]


def _require(op, device, dtype):
    reason = tk.unsupported_reason(op, torch.device(device), dtype)
    if reason is not None:
        pytest.skip(reason)


class _Poisoned:
    """Within the block, new float tensors from torch.empty/empty_like/new_empty are NaN."""

    def __enter__(self):
        self.saved = torch.empty, torch.empty_like, torch.Tensor.new_empty

        def poison(alloc):
            def allocate(*args, **kwargs):
                t = alloc(*args, **kwargs)
                return t.fill_(NAN) if t.is_floating_point() else t
            return allocate
        torch.empty, torch.empty_like, torch.Tensor.new_empty = (poison(a) for a in self.saved)

    def __exit__(self, *exc):
        torch.empty, torch.empty_like, torch.Tensor.new_empty = self.saved


def _run(fn, *args, **kwargs):
    with _Poisoned():
        return fn(*args, **kwargs)


def _up(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _compare(ours, ref_fn, inputs, names):
    """Our outputs against ref_fn on the same inputs in float64, and in the inputs' dtype: the
    plain computation that conftest's tolerance rule scales by."""
    dtype = next(x.dtype for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point())
    ref64 = ref_fn(*[_up(x) for x in inputs])
    plain = ref_fn(*inputs)
    assert len(ours) == len(ref64) == len(names)
    for name, o, r, p in zip(names, ours, ref64, plain):
        want = torch.float32 if name == "lse" else dtype
        assert o.dtype == want, f"{name}: dtype {o.dtype}, expected {want}"
        assert o.device == inputs[0].device, f"{name}: on {o.device}"
        assert_close_to_reference(o.cpu(), r.cpu(), None if p is None else p.cpu(), name=name)


def _randn(*shape, device, dtype, scale=1.0, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)


# ------------------------------------------------------------------------------ math helpers

@triton.jit
def _tanh_sigmoid_kernel(x_ptr, tanh_ptr, sigmoid_ptr, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + idx, mask=idx < n)
    tl.store(tanh_ptr + idx, _common.tanh(x), mask=idx < n)
    tl.store(sigmoid_ptr + idx, _common.sigmoid(x), mask=idx < n)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_tanh_and_sigmoid_are_accurate(device):
    _require("gru_cell", device, torch.float32)
    special = [0.0, -0.0, 1e-30, 1e-8, 1e-4, 0.1, 0.2499999, 0.25, 0.2500001, 0.5, 1.0, 3.0,
               9.0, 10.0, 20.0, 88.0, 1e4, float("inf")]
    x = torch.tensor(special + [-s for s in special] + torch.linspace(-12, 12, 4801).tolist()
                     + torch.logspace(-12, 0, 200).tolist() + [NAN], dtype=torch.float32, device=device)
    tanh, sigmoid = torch.empty_like(x), torch.empty_like(x)
    _tanh_sigmoid_kernel[(triton.cdiv(x.numel(), 1024),)](x, tanh, sigmoid, x.numel(), BLOCK=1024)
    exact_tanh, exact_sigmoid = torch.tanh(x.double()).cpu(), torch.sigmoid(x.double()).cpu()
    tanh, sigmoid = tanh.double().cpu(), sigmoid.double().cpu()
    finite = ~torch.isnan(exact_tanh)
    assert torch.isnan(tanh[~finite]).all() and torch.isnan(sigmoid[~finite]).all()
    # relative accuracy of a few float32 ulps (a GPU's exp is itself approximate to ~2 ulp),
    # down to the tiniest inputs, where a naive (1 - e) / (1 + e) would lose every digit
    rel = ((tanh - exact_tanh).abs() / exact_tanh.abs().clamp_min(1e-38))[finite]
    assert rel.max() < 1e-6, f"tanh: worst relative error {rel.max():.3g} at x = {x.cpu()[finite][rel.argmax()]}"
    assert torch.equal(tanh[x.cpu() == float("inf")], torch.tensor([1.0], dtype=torch.float64))
    assert torch.equal(tanh[x.cpu() == float("-inf")], torch.tensor([-1.0], dtype=torch.float64))
    torch.testing.assert_close(sigmoid[finite], exact_sigmoid[finite].float().double(), atol=1e-7, rtol=1e-6)
    assert sigmoid[x.cpu() == -88.0].item() < 1e-37 and sigmoid[x.cpu() == float("-inf")].item() == 0.0


# ------------------------------------------------------------------------------------ cells

CELL_SHAPES = [(1, 1, True), (5, 33, True), (3, 16, False), (17, 20, True)]  # (B, H, bias): 17 rows = 2 blocks


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("B,H,bias", CELL_SHAPES, ids=lambda v: str(v))
def test_gru_cell(device, dtype, B, H, bias):
    _require("gru_cell", device, dtype)
    r = lambda *s, scale=1.0, seed: _randn(*s, device=device, dtype=dtype, scale=scale, seed=seed)  # noqa: E731
    gx, h, w_hh = r(B, 3 * H, seed=1), r(B, H, seed=2), r(3 * H, H, scale=H ** -0.5, seed=3)
    b_hh = r(3 * H, seed=4) if bias else None
    h_new, saved = _run(tk.gru_cell_fwd, gx, h, w_hh, b_hh)
    _compare((h_new, saved), ref.gru_cell_fwd, (gx, h, w_hh, b_hh), ["h_new", "saved"])
    grad_h_new = r(B, H, seed=5)
    grads = _run(tk.gru_cell_bwd, grad_h_new, h, saved)
    _compare(grads, ref.gru_cell_bwd, (grad_h_new, h, saved), ["grad_gx", "grad_gh", "grad_h_direct"])


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("B,H,bias", CELL_SHAPES, ids=lambda v: str(v))
def test_lstm_cell(device, dtype, B, H, bias):
    _require("lstm_cell", device, dtype)
    r = lambda *s, scale=1.0, seed: _randn(*s, device=device, dtype=dtype, scale=scale, seed=seed)  # noqa: E731
    gx, h, c, w_hh = r(B, 4 * H, seed=1), r(B, H, seed=2), r(B, H, seed=3), r(4 * H, H, scale=H ** -0.5, seed=4)
    b_hh = r(4 * H, seed=5) if bias else None
    h_new, c_new, saved = _run(tk.lstm_cell_fwd, gx, h, c, w_hh, b_hh)
    _compare((h_new, c_new, saved), ref.lstm_cell_fwd, (gx, h, c, w_hh, b_hh), ["h_new", "c_new", "saved"])
    grad_h_new, grad_c_new = r(B, H, seed=6), r(B, H, seed=7)
    grads = _run(tk.lstm_cell_bwd, grad_h_new, grad_c_new, c, c_new, saved)
    _compare(grads, ref.lstm_cell_bwd, (grad_h_new, grad_c_new, c, c_new, saved), ["grad_gates", "grad_c"])


# -------------------------------------------------------------------------------- attention

# (Bq, Tq, Tk, F, Dv, masking, key rows (kv_batch_idx when set), key splits (None: the default))
ATTENTION_CASES = [
    (1, 1, 1, 1, 1, "none", None, None),                 # every size 1
    (3, 1, 20, 17, 5, "mask_fully_masked", 2, 2),        # decoder step over shared keys (beams)
    (2, 3, 9, 33, 4, "lengths_with_zero", None, 3),      # Tq = 3; splits past the length are empty
    (2, 17, 21, 16, 3, "mask", None, 2),                 # Tq >= 16: tl.dot query blocks, 2 of them
    (4, 2, 37, 8, 1, "mask_and_lengths", 3, 1),          # 3 key blocks in one split
    (2, 1, 70, 5, 2, "lengths", None, None),             # default split choice for a decoder step
]
CASE_IDS = ["x".join(map(str, c)) for c in ATTENTION_CASES]


def _attention_inputs(case, device, dtype):
    Bq, Tq, Tk, F, Dv, masking, key_rows, splits = case
    Bk = key_rows or Bq
    r = lambda *s, seed: _randn(*s, device=device, dtype=dtype, seed=seed)  # noqa: E731
    q, k, values = r(Bq, Tq, F, seed=1), r(Bk, Tk, F, seed=2), r(Bk, Tk, Dv, seed=3)
    g = torch.Generator().manual_seed(4)
    mask = lengths = kv_batch_idx = None
    if "mask" in masking:
        mask = torch.rand(Bk, Tk, generator=g) > 0.3
        mask[:, 0] = True
        if "fully_masked" in masking:
            mask[1] = False
    if "lengths" in masking:
        lengths = torch.randint(1, Tk + 1, (Bk,), generator=g)
        if "zero" in masking:
            lengths[0] = 0
    if key_rows:
        kv_batch_idx = torch.randint(0, Bk, (Bq,), generator=g)
        kv_batch_idx[0] = 1  # a query row on the fully masked key row, where there is one
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return q, k, values, to(mask), to(lengths), to(kv_batch_idx), splits


def _attention_upstream(q, Tk, Dv, seed=7):
    Bq, Tq = q.shape[:2]
    return (_randn(Bq, Tq, Dv, device=q.device, dtype=q.dtype, seed=seed),
            _randn(Bq, Tq, Tk, device=q.device, dtype=q.dtype, seed=seed + 1))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=CASE_IDS)
def test_additive_attention(device, dtype, case):
    _require("additive_attention", device, dtype)
    q, k, values, mask, lengths, kv_idx, splits = _attention_inputs(case, device, dtype)
    v = _randn(q.shape[2], device=device, dtype=dtype, seed=5)
    context, weights, lse = _run(additive_module._forward, q, k, v, values, mask, lengths, kv_idx, splits)
    _compare((context, weights, lse), ref.additive_attention_fwd, (q, k, v, values, mask, lengths, kv_idx),
             ["context", "weights", "lse"])
    grad_context, grad_weights = _attention_upstream(q, k.shape[1], values.shape[2])
    args = (grad_context, grad_weights, q, k, v, values, mask, lengths, kv_idx, weights, lse)
    _compare(_run(tk.additive_attention_bwd, *args), ref.additive_attention_bwd, args, ["dq", "dk", "dv", "dvalues"])


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_dot_attention(device, dtype, case, scale):
    _require("dot_attention", device, dtype)
    q, k, values, mask, lengths, kv_idx, splits = _attention_inputs(case, device, dtype)
    context, weights, lse = _run(dot_module._forward, q, k, values, mask, lengths, kv_idx, scale, splits)
    _compare((context, weights, lse), ref.dot_attention_fwd, (q, k, values, mask, lengths, kv_idx, scale),
             ["context", "weights", "lse"])
    grad_context, grad_weights = _attention_upstream(q, k.shape[1], values.shape[2])
    args = (grad_context, grad_weights, q, k, values, mask, lengths, kv_idx, scale, weights, lse)
    _compare(_run(tk.dot_attention_bwd, *args), ref.dot_attention_bwd, args, ["dq", "dk", "dvalues"])


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("case", [(2, 1, 40, 7, 37, "mask_and_lengths", 3, 2), (2, 17, 21, 16, 37, "mask", None, 1)],
                         ids=["decoder-step", "tl.dot-blocks"])
def test_attention_values_wider_than_the_forward_keeps(device, dtype, case, monkeypatch):
    """Values wider than MAX_FUSED_DV take the second pass (context = weights @ values) and the
    softmax backward sums dC @ V.T over chunks of MAX_DV_CHUNK: here both limits are shrunk to
    16 so that 37 values need that pass and three chunks."""
    _require("dot_attention", device, dtype)
    monkeypatch.setattr(_attention, "MAX_FUSED_DV", 16)
    monkeypatch.setattr(_attention, "MAX_DV_CHUNK", 16)
    q, k, values, mask, lengths, kv_idx, splits = _attention_inputs(case, device, dtype)
    v = _randn(q.shape[2], device=device, dtype=dtype, seed=5)
    grad_context, grad_weights = _attention_upstream(q, k.shape[1], values.shape[2])
    fwd = _run(additive_module._forward, q, k, v, values, mask, lengths, kv_idx, splits)
    _compare(fwd, ref.additive_attention_fwd, (q, k, v, values, mask, lengths, kv_idx), ["context", "weights", "lse"])
    args = (grad_context, grad_weights, q, k, v, values, mask, lengths, kv_idx, fwd[1], fwd[2])
    _compare(_run(tk.additive_attention_bwd, *args), ref.additive_attention_bwd, args, ["dq", "dk", "dv", "dvalues"])
    fwd = _run(dot_module._forward, q, k, values, mask, lengths, kv_idx, 0.3, splits)
    _compare(fwd, ref.dot_attention_fwd, (q, k, values, mask, lengths, kv_idx, 0.3), ["context", "weights", "lse"])
    args = (grad_context, grad_weights, q, k, values, mask, lengths, kv_idx, 0.3, fwd[1], fwd[2])
    _compare(_run(tk.dot_attention_bwd, *args), ref.dot_attention_bwd, args, ["dq", "dk", "dvalues"])


@pytest.mark.parametrize("device,dtype", FLOAT32_ONLY)
@pytest.mark.parametrize("splits", [1, 3])
def test_attention_nan_and_inf_follow_the_reference(device, dtype, splits):
    """A NaN or +inf score makes its whole row NaN (weights, context, lse), as torch.softmax
    does; a -inf score acts like a masked position."""
    _require("dot_attention", device, dtype)
    q = _randn(4, 2, 3, device=device, dtype=dtype, seed=1)
    k = _randn(4, 40, 3, device=device, dtype=dtype, seed=2)
    values = _randn(4, 40, 2, device=device, dtype=dtype, seed=3)
    q[0, 1, 2] = NAN
    k[1, 35, :] = float("inf")
    q[1, 0, :] = 1.0  # q . k = +inf at key 35
    q[1, 1, :] = -1.0  # q . k = -inf there
    v = _randn(3, device=device, dtype=dtype, seed=4)
    for ours, expected in ((_run(dot_module._forward, q, k, values, None, None, None, 1.0, splits),
                            ref.dot_attention_fwd(q.double(), k.double(), values.double(), None, None, None, 1.0)),
                           (_run(additive_module._forward, q, k, v, values, None, None, None, splits),
                            ref.additive_attention_fwd(q.double(), k.double(), v.double(), values.double(),
                                                       None, None, None))):
        for name, o, r in zip(["context", "weights", "lse"], ours, expected):
            r = r.to(o.dtype)
            assert torch.equal(torch.isnan(o), torch.isnan(r)), f"{name}: NaN pattern differs"
            torch.testing.assert_close(o.nan_to_num(), r.nan_to_num(), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device,dtype", FLOAT32_ONLY)
@pytest.mark.parametrize("sizes", [(0, 2, 5, 3, 2), (2, 2, 0, 3, 2), (2, 2, 5, 0, 2), (2, 2, 5, 3, 0), (2, 0, 5, 3, 2)],
                         ids=["no_rows", "no_keys", "no_features", "no_values", "no_queries"])
def test_attention_empty_sizes(device, dtype, sizes):
    _require("additive_attention", device, dtype)
    Bq, Tq, Tk, F, Dv = sizes
    r = lambda *s, seed: _randn(*s, device=device, dtype=dtype, seed=seed)  # noqa: E731
    q, k, values, v = r(Bq, Tq, F, seed=1), r(Bq, Tk, F, seed=2), r(Bq, Tk, Dv, seed=3), r(F, seed=4)
    lengths = torch.full((Bq,), Tk, dtype=torch.int64, device=device)
    grad_context, grad_weights = r(Bq, Tq, Dv, seed=5), r(Bq, Tq, Tk, seed=6)
    if Tk == 0:  # the contract's rule for a row with no valid position (the reference cannot take Tk = 0)
        for fwd in (_run(tk.additive_attention_fwd, q, k, v, values, None, lengths, None),
                    _run(tk.dot_attention_fwd, q, k, values, None, lengths, None, 0.5)):
            context, weights, lse = fwd
            assert torch.equal(context, torch.zeros_like(context)) and weights.shape == (Bq, Tq, 0)
            assert lse.dtype == torch.float32 and (lse == float("-inf")).all()
        grads = _run(tk.additive_attention_bwd, grad_context, grad_weights, q, k, v, values, None, lengths, None,
                     weights, lse)
        assert [tuple(g.shape) for g in grads] == [(Bq, Tq, F), (Bq, 0, F), (F,), (Bq, 0, Dv)]
        assert not grads[0].any() and not grads[2].any()
        return
    fwd = _run(tk.additive_attention_fwd, q, k, v, values, None, lengths, None)
    _compare(fwd, ref.additive_attention_fwd, (q, k, v, values, None, lengths, None), ["context", "weights", "lse"])
    args = (grad_context, grad_weights, q, k, v, values, None, lengths, None, fwd[1], fwd[2])
    _compare(_run(tk.additive_attention_bwd, *args), ref.additive_attention_bwd, args, ["dq", "dk", "dv", "dvalues"])
    fwd = _run(tk.dot_attention_fwd, q, k, values, None, lengths, None, 0.5)
    _compare(fwd, ref.dot_attention_fwd, (q, k, values, None, lengths, None, 0.5), ["context", "weights", "lse"])
    args = (grad_context, grad_weights, q, k, values, None, lengths, None, 0.5, fwd[1], fwd[2])
    _compare(_run(tk.dot_attention_bwd, *args), ref.dot_attention_bwd, args, ["dq", "dk", "dvalues"])


@pytest.mark.parametrize("device,dtype", FLOAT32_ONLY)
def test_cells_with_empty_batch(device, dtype):
    _require("gru_cell", device, dtype)
    h, c = torch.zeros(0, 4, device=device), torch.zeros(0, 4, device=device)
    h_new, saved = tk.gru_cell_fwd(torch.zeros(0, 12, device=device), h, torch.zeros(12, 4, device=device), None)
    assert h_new.shape == (0, 4) and saved.shape == (0, 16)
    h_new, c_new, saved = tk.lstm_cell_fwd(torch.zeros(0, 16, device=device), h, c,
                                           torch.zeros(16, 4, device=device), None)
    assert c_new.shape == (0, 4) and saved.shape == (0, 16)
    assert [t.shape for t in tk.lstm_cell_bwd(h, c, c, c_new, saved)] == [(0, 16), (0, 4)]


@pytest.mark.parametrize("device,dtype", FLOAT32_ONLY)
def test_deterministic(device, dtype):
    """No atomics: the same call twice gives bitwise the same results."""
    _require("additive_attention", device, dtype)
    case = (3, 2, 20, 17, 5, "mask", 2, 2)
    q, k, values, mask, lengths, kv_idx, splits = _attention_inputs(case, device, dtype)
    v = _randn(q.shape[2], device=device, dtype=dtype, seed=5)
    grad_context, grad_weights = _attention_upstream(q, k.shape[1], values.shape[2])

    def run():
        context, weights, lse = additive_module._forward(q, k, v, values, mask, lengths, kv_idx, splits)
        return (context, weights, lse) + tk.additive_attention_bwd(
            grad_context, grad_weights, q, k, v, values, mask, lengths, kv_idx, weights, lse)
    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_key_splits_cover_the_keys_in_whole_blocks():
    q = torch.zeros(1, 1, 4)
    for tk_, asked in ((1, None), (70, None), (1000, 7), (33, 3), (5, 9)):
        pb = _attention.problem(q, torch.zeros(1, tk_, 4), torch.zeros(1, tk_, 2), None, None, None, None)
        n, split_len = _attention.key_splits(pb, q.device, asked)
        assert split_len % 16 == 0 and (n - 1) * split_len < tk_ <= n * split_len
        if asked is None and tk_ > _attention.MIN_SPLIT_KEYS:
            assert n > 1  # one query row leaves the device idle: split its keys
    pb = _attention.problem(torch.zeros(1000, 1, 4), torch.zeros(1000, 500, 4), torch.zeros(1000, 500, 2),
                            None, None, None, None)
    assert _attention.key_splits(pb, q.device)[0] == 1  # enough rows already


# ---------------------------------------------------------------------------- the interface

def test_unsupported_reason():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for op in _common.OPS:
        assert tk.unsupported_reason(op, cuda, torch.float32) is None
        assert "float64" in tk.unsupported_reason(op, cuda, torch.float64)
        assert "meta" in tk.unsupported_reason(op, torch.device("meta"), torch.float32)
        on_cpu = tk.unsupported_reason(op, cpu, torch.float32)
        assert (on_cpu is None) == _common.INTERPRETED
        if _common.INTERPRETED:
            assert "bfloat16" in tk.unsupported_reason(op, cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="op must be one of"):
        tk.unsupported_reason("gru", cpu, torch.float32)


@pytest.mark.parametrize("device,dtype", FLOAT32_ONLY)
def test_bad_input_names_the_argument(device, dtype):
    _require("gru_cell", device, dtype)
    z = lambda *s, **kw: torch.zeros(*s, device=device, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="^h must be contiguous"):
        tk.gru_cell_fwd(z(2, 9), z(4, 2).t(), z(9, 3), None)
    with pytest.raises(ValueError, match=r"^w_hh must have shape \(9, 3\)"):
        tk.gru_cell_fwd(z(2, 9), z(2, 3), z(9, 4), None)
    with pytest.raises(ValueError, match="^b_hh must have dtype"):
        tk.gru_cell_fwd(z(2, 9), z(2, 3), z(9, 3), z(9, dtype=torch.float64))
    with pytest.raises(ValueError, match="^saved must have shape"):
        tk.lstm_cell_bwd(z(2, 3), z(2, 3), z(2, 3), z(2, 3), z(2, 9))
    q, k, values = z(2, 1, 4), z(2, 5, 4), z(2, 5, 3)
    with pytest.raises(ValueError, match="^mask must have dtype torch.bool"):
        tk.dot_attention_fwd(q, k, values, z(2, 5, dtype=torch.int64), None, None, 1.0)
    with pytest.raises(ValueError, match=r"^v must have shape \(4\)"):
        tk.additive_attention_fwd(q, k, z(3), values, None, None, None)
    with pytest.raises(ValueError, match="kv_batch_idx"):
        tk.dot_attention_fwd(z(3, 1, 4), k, values, None, None, None, 1.0)
    with pytest.raises(ValueError, match="^lse must have dtype torch.float32"):
        tk.dot_attention_bwd(z(2, 1, 3), z(2, 1, 5), q, k, values, None, None, None, 1.0, z(2, 1, 5),
                             z(2, 1, dtype=torch.float64))


@pytest.mark.parametrize("device,dtype", FLOAT32_ONLY)
def test_tf32_switch(device, dtype):
    """Off by default (float32 parity); when on, float32 matmuls may use TensorFloat-32."""
    _require("gru_cell", device, dtype)
    assert tk.allow_tf32() is False and _common.dot_precision() == "ieee"
    with pytest.raises(TypeError):
        tk.set_allow_tf32(1)
    gx, h = _randn(5, 99, device=device, dtype=dtype, seed=1), _randn(5, 33, device=device, dtype=dtype, seed=2)
    w_hh = _randn(99, 33, device=device, dtype=dtype, scale=33 ** -0.5, seed=3)
    tk.set_allow_tf32(True)
    try:
        assert _common.dot_precision() == "tf32"
        h_new, _ = tk.gru_cell_fwd(gx, h, w_hh, None)
    finally:
        tk.set_allow_tf32(False)
    expected, _ = ref.gru_cell_fwd(gx.double(), h.double(), w_hh.double(), None)
    # TensorFloat-32 keeps 10 mantissa bits: ~1e-3 relative error on each product
    torch.testing.assert_close(h_new.double(), expected, atol=5e-3, rtol=5e-3)


# --------------------------------------------------------------------- the real GPU compile

SM90_SHARED_BYTES = 227 * 1024  # the most shared memory a block of an H100/H200 may opt in to


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch, runs nothing."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def _record_every_launch():
    """The launches the launchers make (kernel, args, kwargs) for every op, forward and
    backward, in every dtype, for queries one at a time and in tl.dot blocks, values as wide as
    the forward keeps on chip (the largest tiles) and 4096 wide (the second pass), every
    persistent hidden block. Tensors are on the meta device: nothing is allocated or run."""
    from fused_s2s.triton_kernels import gru_cell, lstm_cell, persistent_rnn

    modules = (_attention, additive_module, dot_module, gru_cell, lstm_cell, persistent_rnn)
    kernels = {(m, n): getattr(m, n) for m in modules for n in dir(m) if n.endswith("_kernel")}
    launches = []
    for (m, n), k in kernels.items():
        setattr(m, n, _Recorder(k, launches))
    no_device_check = persistent_rnn.unsupported_reason
    persistent_rnn.unsupported_reason = lambda *args: None  # meta tensors
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            z = lambda *shape, dt=dtype: torch.zeros(*shape, dtype=dt, device="meta")  # noqa: E731
            index = lambda *shape: torch.zeros(*shape, dtype=torch.int64, device="meta")  # noqa: E731
            for B, H in ((5, 33),):  # every config: the shape does not choose
                tk.gru_cell_fwd(z(B, 3 * H), z(B, H), z(3 * H, H), z(3 * H))
                tk.gru_cell_bwd(z(B, H), z(B, H), z(B, 4 * H))
                tk.lstm_cell_fwd(z(B, 4 * H), z(B, H), z(B, H), z(4 * H, H), z(4 * H))
                tk.lstm_cell_bwd(z(B, H), z(B, H), z(B, H), z(B, H), z(B, 4 * H))
            for tq in (1, 20):
                for dv in (_attention.MAX_FUSED_DV, 4096):  # the widest on chip, and the second pass
                    q, k, v, values, lengths = z(2, tq, 64), z(2, 300, 64), z(64), z(2, 300, dv), index(2)
                    mask = torch.zeros(2, 300, dtype=torch.bool, device="meta")
                    upstream = (z(2, tq, dv), z(2, tq, 300), z(2, tq, 300), z(2, tq, dt=torch.float32))
                    tk.additive_attention_fwd(q, k, v, values, mask, lengths, index(2))
                    tk.dot_attention_fwd(q, k, values, mask, lengths, index(2), 1.0)
                    tk.additive_attention_bwd(*upstream[:2], q, k, v, values, mask, lengths, index(2), *upstream[2:])
                    tk.dot_attention_bwd(*upstream[:2], q, k, values, mask, lengths, index(2), 1.0, *upstream[2:])
            for H in (16, 32, 64):  # every hidden block
                T, B = 7, 20
                for cell, G in (("gru", 3), ("lstm", 4)):
                    h = z(B, H)
                    if cell == "gru":
                        tk.persistent_gru_fwd(z(T, B, G * H), h, z(G * H, H), z(G * H), index(B), True, True)
                        tk.persistent_gru_bwd(z(T, B, H), h, z(T, B, H), h, z(T, B, 4 * H), z(G * H, H), index(B),
                                              True)
                    else:
                        tk.persistent_lstm_fwd(z(T, B, G * H), h, h, z(G * H, H), z(G * H), index(B), True, True)
                        tk.persistent_lstm_bwd(z(T, B, H), h, h, h, z(T, B, H), z(T, B, 4 * H), z(G * H, H),
                                               index(B), True)
    finally:
        for (m, n), k in kernels.items():
            setattr(m, n, k)
        persistent_rnn.unsupported_reason = no_device_check
    return launches


def _variants(launches):
    """Every (kernel, signature, constexprs, num_warps) the recorded launches can compile to:
    each with every autotune config its pruning keeps (what the autotuner may pick)."""
    pointer = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
               torch.uint8: "*u8"}
    variants = {}
    for kernel, args, kwargs in launches:
        tuned = isinstance(kernel, triton.runtime.Autotuner)
        fn = kernel.fn if tuned else kernel
        named = dict(zip(fn.arg_names, args))
        configs = [None]
        if tuned:
            prune = getattr(kernel, "early_config_prune", None)
            configs = prune(kernel.configs, named, **kwargs) if prune else kernel.configs
        for config in configs:
            constexprs = {**kwargs, **(config.kwargs if config else {})}
            num_warps = config.num_warps if config else constexprs.get("num_warps", 4)
            signature, values = {}, {}
            for param in fn.params:
                name = param.name
                if param.is_constexpr:
                    signature[name], values[(fn.arg_names.index(name),)] = "constexpr", constexprs[name]
                elif isinstance(named[name], torch.Tensor):
                    signature[name] = pointer[named[name].dtype]
                else:
                    signature[name] = "fp32" if isinstance(named[name], float) else "i32"
            key = (fn.__name__, tuple(signature.values()), tuple(sorted(values.items())), num_warps)
            variants.setdefault(key, (fn, signature, values, num_warps))
    return list(variants.values())


_VARIANTS = []  # what the forked compile workers read (kernels do not pickle)


def _compile(n):
    """-> (what, shared memory bytes) of _VARIANTS[n] compiled for sm_90 (Triton's compiler
    and ptxas: no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, values, num_warps = _VARIANTS[n]
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=values),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    dtypes = sorted({t for t in signature.values() if t.startswith("*") and t not in ("*i64", "*u8")})
    blocks = {fn.arg_names[k[0]]: v for k, v in values.items() if fn.arg_names[k[0]].startswith(("BLOCK", "IS_"))}
    return f"{fn.__name__} {'/'.join(dtypes)} {blocks} warps={num_warps}", compiled.metadata.shared


def _compile_every_kernel_for_sm90():
    """Compile every kernel variant the launchers can choose for sm_90: every op, dtype, query
    block, value width and hidden block, with every autotune config the pruning keeps. What the
    interpreter accepts but a GPU compile rejects (tl.dot blocks < 16, type mismatches,
    unsupported casts) fails here, and so does a variant needing more shared memory than an
    H100/H200 has (triton.compile itself does not check the device's limit: the launch would
    fail). Each kernel also compiles with all its sizes 1 (Triton specialises an integer
    argument equal to 1 into a constant, which the interpreter never does). Variants that a
    known-broken Triton aborts on (it kills the process) are refused by the launchers' checks
    first, and skipped here."""
    import multiprocessing

    from fused_s2s.triton_kernels import persistent_rnn

    variants, refused = [], 0
    for variant in _variants(_record_every_launch()):
        fn, signature, values, _ = variant
        if fn is persistent_rnn._backward_kernel:
            is_lstm = values[(fn.arg_names.index("IS_LSTM"),)]
            block_h = values[(fn.arg_names.index("BLOCK_H"),)]
            dtype = {"*fp32": torch.float32, "*fp16": torch.float16, "*bf16": torch.bfloat16}[signature["out_ptr"]]
            if persistent_rnn.broken_triton_reason("lstm" if is_lstm else "gru", True, dtype, block_h):
                refused += 1
                continue
        variants.append(variant)
    # all sizes 1, once per kernel
    for fn in {v[0] for v in variants}:
        fn_variant = next(v for v in variants if v[0] is fn)
        signature, values = dict(fn_variant[1]), dict(fn_variant[2])
        for name in fn.arg_names:
            if signature[name] in ("i32",):
                signature[name], values[(fn.arg_names.index(name),)] = "constexpr", 1
        variants.append((fn, signature, values, fn_variant[3]))
    _VARIANTS[:] = variants
    with multiprocessing.get_context("fork").Pool(min(4, os.cpu_count() or 1)) as pool:
        results = pool.map(_compile, range(len(variants)), chunksize=4)
    too_big = [(what, shared) for what, shared in results if shared > SM90_SHARED_BYTES]
    assert not too_big, f"more shared memory than an H100/H200 has: {too_big[:5]}"
    worst = max(results, key=lambda r: r[1])
    print(f"compiled {len(results)} kernel variants for sm_90 ({refused} refused on Triton {triton.__version__}); "
          f"the most shared memory: {worst[1]} bytes ({worst[0]})")


def test_every_kernel_compiles_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")  # real JIT functions, not the interpreter's
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "compile-sm90"], env=env, cwd=tests_dir,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "compiled" in result.stdout
    print(result.stdout.strip())


if __name__ == "__main__" and sys.argv[1:] == ["compile-sm90"]:
    _compile_every_kernel_for_sm90()
