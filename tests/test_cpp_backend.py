"""The compiled extension fused_s2s._C itself: each of its eight primitives against the
contract's reference (fused_s2s.backends.torch_backend, computed in float64), its argument checks, and
its build (has_cuda, the first-use build and its failure reasons).

The end-to-end parity of the `cpp` backend (autograd Functions, modules, gradcheck) runs in
test_parity.py with the other backends; here the primitives are called directly, with the edge
cases of the contract: odd sizes, masks, lengths (0 and past Tk), fully masked rows,
kv_batch_idx, empty batches and Tk = 0.

Outputs are allocated inside the extension, so "poison" comes from torch: with deterministic
algorithms on, every uninitialised tensor torch allocates (ours included) is filled with NaN,
and an element a kernel never writes fails the comparison.
"""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from fused_s2s.backends import build, torch_backend as ref
from conftest import HALF_TYPES, assert_close_to_reference

HAVE_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None and not os.environ.get(
    "FUSED_S2S_NO_EXTENSION")
pytestmark = pytest.mark.skipif(not HAVE_COMPILER, reason="no C++ compiler, or FUSED_S2S_NO_EXTENSION set")

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def C():
    return build.load_extension()  # a build failure fails every test here, with its reason


@pytest.fixture(autouse=True)
def nan_filled_allocations():
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old)


def randn(*shape, dtype=torch.float64, scale=1.0, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else hash(shape) % 2**31)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def compare(ours, ref64, plain=None, names=None):
    """Each output against the float64 reference, with the parity suite's tolerance rule;
    `plain` is the torch backend run in our dtype (the yardstick for long float32 sums).
    Infinite reference entries (lse of a row with no valid position) must match exactly."""
    ours, ref64 = list(ours), list(ref64)
    assert len(ours) == len(ref64)
    for i, (o, r) in enumerate(zip(ours, ref64)):
        name = names[i] if names else f"output {i}"
        p = plain[i] if plain is not None else None
        assert p is None or o.dtype == p.dtype, f"{name}: dtype {o.dtype}, the contract's is {p.dtype}"
        inf = torch.isinf(r)
        if inf.any():
            assert torch.equal(o[inf], r[inf].to(o.dtype)), f"{name}: infinite entries differ"
            o, r, p = o[~inf], r[~inf], (p[~inf] if p is not None else None)
        assert_close_to_reference(o, r, p, name=name)


def cast(tensors, dtype):
    return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]


def acc(dtype):
    """The accumulation dtype, which lse has: float32 for the 16-bit types."""
    return torch.promote_types(dtype, torch.float32)


# ------------------------------------------------------------------------------------ cells

CELL_SHAPES = [(1, 1), (5, 33), (3, 257), (64, 40)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H", CELL_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_gru_cell(C, dtype, B, H, bias):
    gx, h = randn(B, 3 * H), randn(B, H)
    w_hh, b_hh = randn(3 * H, H, scale=H ** -0.5), (randn(3 * H) if bias else None)
    args64 = [gx, h, w_hh, b_hh]
    compare(C.gru_cell_fwd(*cast(args64, dtype)), ref.gru_cell_fwd(*args64),
            ref.gru_cell_fwd(*cast(args64, dtype)), ["h_new", "saved"])
    _, saved = ref.gru_cell_fwd(*args64)
    grad = randn(B, H, seed=1)
    bwd64 = [grad, h, saved]
    compare(C.gru_cell_bwd(*cast(bwd64, dtype)), ref.gru_cell_bwd(*bwd64),
            ref.gru_cell_bwd(*cast(bwd64, dtype)), ["grad_gx", "grad_gh", "grad_h_direct"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H", CELL_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_lstm_cell(C, dtype, B, H, bias):
    gx, h, c = randn(B, 4 * H), randn(B, H), randn(B, H, seed=2)
    w_hh, b_hh = randn(4 * H, H, scale=H ** -0.5), (randn(4 * H) if bias else None)
    args64 = [gx, h, c, w_hh, b_hh]
    compare(C.lstm_cell_fwd(*cast(args64, dtype)), ref.lstm_cell_fwd(*args64),
            ref.lstm_cell_fwd(*cast(args64, dtype)), ["h_new", "c_new", "saved"])
    _, c_new, saved = ref.lstm_cell_fwd(*args64)
    bwd64 = [randn(B, H, seed=3), randn(B, H, seed=4), c, c_new, saved]
    compare(C.lstm_cell_bwd(*cast(bwd64, dtype)), ref.lstm_cell_bwd(*bwd64),
            ref.lstm_cell_bwd(*cast(bwd64, dtype)), ["grad_gates", "grad_c"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cells_saturate_without_nan(C, dtype):
    """Pre-activations far outside the exp range: gates saturate to exactly 0/1, no NaN/inf."""
    B, H = 4, 9
    gx = torch.tensor([[-1e4, 1e4, -200.0, 200.0, 0.0, -0.0, 88.5, -88.5, 710.0]], dtype=dtype)
    gx = gx.repeat(B, 3)  # (B, 3H): every extreme in every gate
    h = randn(B, H, dtype=dtype)
    w = torch.zeros(3 * H, H, dtype=dtype)
    h_new, saved = C.gru_cell_fwd(gx, h, w, None)
    compare([h_new, saved], ref.gru_cell_fwd(gx.double(), h.double(), w.double(), None),
            ref.gru_cell_fwd(gx, h, w, None))
    gx4 = torch.cat([gx, gx[:, :H]], dim=1)
    w4 = torch.zeros(4 * H, H, dtype=dtype)
    outs = C.lstm_cell_fwd(gx4, h, h, w4, None)
    compare(outs, ref.lstm_cell_fwd(*cast([gx4, h, h, w4], torch.float64), None), ref.lstm_cell_fwd(gx4, h, h, w4, None))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cells_propagate_nan(C, dtype):
    gx = randn(2, 3 * 8, dtype=dtype)
    gx[1, 3] = float("nan")
    h_new, _ = C.gru_cell_fwd(gx, randn(2, 8, dtype=dtype), torch.zeros(24, 8, dtype=dtype), None)
    assert torch.isnan(h_new[1, 3]) and not torch.isnan(h_new[0]).any()


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_16bit_conversions_of_every_value(C, dtype):
    """Every 16-bit value widens exactly, and the float32 midpoint of any two rounds to nearest
    even as torch rounds it: additive attention with equal scores averages two value rows."""
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    neighbours = (every.view(torch.int16) + 1).view(dtype)  # midpoints: ties, inf, NaN, subnormals
    shuffled = every[torch.randperm(every.numel(), generator=torch.Generator().manual_seed(0))]
    zeros = torch.zeros(1, 2, 1, dtype=dtype)
    for other in (every, neighbours, shuffled):
        values = torch.stack([every, other])[None]  # (1, Tk=2, Dv=65536)
        context, weights, _ = C.additive_attention_fwd(zeros[:, :1], zeros, zeros[0, 0], values, None, None, None)
        assert torch.equal(weights, torch.full_like(weights, 0.5))
        want = (0.5 * every.float() + 0.5 * other.float()).to(dtype)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(context[0, 0]), nan)
        assert torch.equal(context[0, 0][~nan], want[~nan])  # (the sum starts at +0: -0 + -0 gives +0)


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_16bit_results_are_the_float32_results_rounded(C, dtype):
    """16-bit inputs widen exactly and the math runs in float32, so on the same values every
    output is the float32 kernel's, rounded to nearest even once (as torch's .to rounds). The
    cells' forward runs its recurrent GEMM in the input dtype: with w_hh = 0 it is exact."""
    def same(inputs, fn, lse=()):  # lse: float32 in both calls
        ours = fn(*cast(inputs, dtype), *lse)
        want = fn(*cast(cast(inputs, dtype), torch.float32), *lse)
        for i, (o, w) in enumerate(zip(ours, want)):
            expected = w if o.dtype == torch.float32 else w.to(dtype)  # lse stays float32
            assert o.dtype == expected.dtype and torch.equal(o, expected), f"{fn.__name__} output {i}"

    B, H = 5, 33  # a full pack and a tail of every row
    gx, h, c = randn(B, 4 * H, scale=3.0), randn(B, H), randn(B, H, seed=2)
    g1, g2 = randn(B, H, seed=3), randn(B, H, seed=4)
    _, saved = ref.gru_cell_fwd(gx[:, :3 * H], h, randn(3 * H, H), None)
    same([gx[:, :3 * H].contiguous(), h, torch.zeros(3 * H, H), randn(3 * H)], C.gru_cell_fwd)
    same([g1, h, saved], C.gru_cell_bwd)
    _, c_new, saved = ref.lstm_cell_fwd(gx, h, c, randn(4 * H, H), None)
    same([gx, h, c, torch.zeros(4 * H, H), randn(4 * H)], C.lstm_cell_fwd)
    same([g1, g2, c, c_new, saved], C.lstm_cell_bwd)
    q, k, v, values, mask, lengths, idx = attention_case("all")
    context, weights, lse = ref.additive_attention_fwd(q, k, v, values, mask, lengths, idx)
    same([q, k, v, values, mask, lengths, idx], C.additive_attention_fwd)
    grads = [randn(*context.shape, seed=20), randn(*weights.shape, seed=21)]
    same(grads + [q, k, v, values, mask, lengths, idx, weights], C.additive_attention_bwd, [lse.float()])
    same([q, k, values, mask, lengths, idx, 0.37], C.dot_attention_fwd)
    context, weights, lse = ref.dot_attention_fwd(q, k, values, mask, lengths, idx, 0.37)
    same(grads + [q, k, values, mask, lengths, idx, 0.37, weights], C.dot_attention_bwd, [lse.float()])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cells_empty_batch(C, dtype):
    h, w = torch.zeros(0, 7, dtype=dtype), randn(21, 7, dtype=dtype)
    h_new, saved = C.gru_cell_fwd(torch.zeros(0, 21, dtype=dtype), h, w, None)
    assert h_new.shape == (0, 7) and saved.shape == (0, 28)
    assert [t.shape for t in C.gru_cell_bwd(h, h, saved)] == [(0, 21), (0, 21), (0, 7)]
    outs = C.lstm_cell_fwd(torch.zeros(0, 28, dtype=dtype), h, h, randn(28, 7, dtype=dtype), None)
    assert [t.shape for t in outs] == [(0, 7), (0, 7), (0, 28)]
    assert [t.shape for t in C.lstm_cell_bwd(h, h, h, h, outs[2])] == [(0, 28), (0, 7)]


# -------------------------------------------------------------------------------- attention

def attention_case(name):
    """(q, k, v, values, mask, lengths, kv_batch_idx) in float64 for a named case."""
    cases = {
        # Bq, Bk, Tq, Tk, A, Dv
        "decoder_step": (4, 4, 1, 37, 33, 5),
        "tq_gt_1": (3, 3, 4, 9, 16, 8),
        "tk_1": (2, 2, 3, 1, 7, 3),
        "a_1": (2, 2, 2, 6, 1, 1),
        "beams": (6, 2, 2, 11, 12, 9),
        "masked": (5, 5, 3, 13, 10, 4),
        "lengths": (4, 4, 2, 10, 9, 6),
        "all": (6, 3, 3, 17, 8, 7),
    }
    bq, bk, tq, tk, a, dv = cases[name]
    q, k = randn(bq, tq, a, seed=10), randn(bk, tk, a, seed=11)
    v, values = randn(a, seed=12), randn(bk, tk, dv, seed=13)
    g = torch.Generator().manual_seed(14)
    mask = lengths = idx = None
    if name in ("masked", "all"):
        mask = torch.rand(bk, tk, generator=g) > 0.4
        mask[1] = False                    # a fully masked row
    if name in ("lengths", "all"):
        lengths = torch.tensor([tk, 0, tk + 5, 3][:bk] + [tk // 2] * max(0, bk - 4))
    if name in ("beams", "all"):
        idx = torch.randint(0, bk, (bq,), generator=g)
        idx[0] = bk - 1
    return q, k, v, values, mask, lengths, idx


ATTENTION_CASES = ["decoder_step", "tq_gt_1", "tk_1", "a_1", "beams", "masked", "lengths", "all"]


def check_masking(weights, context, lse, mask, lengths, idx, tk):
    """Invalid positions weigh exactly 0; a row with no valid position is 0 with lse = -inf."""
    bq = weights.shape[0]
    valid = torch.ones(bq, tk, dtype=torch.bool)
    rows = idx if idx is not None else torch.arange(bq)
    if mask is not None:
        valid &= mask[rows]
    if lengths is not None:
        valid &= torch.arange(tk) < lengths[rows][:, None]
    assert (weights.transpose(1, 2)[~valid] == 0).all()
    empty = ~valid.any(dim=1)
    assert (context[empty] == 0).all() and (lse[empty] == float("-inf")).all()
    assert torch.isfinite(lse[~empty]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_additive_attention(C, dtype, case):
    q, k, v, values, mask, lengths, idx = attention_case(case)
    fwd64 = [q, k, v, values, mask, lengths, idx]
    context, weights, lse = ref.additive_attention_fwd(*fwd64)
    ours = C.additive_attention_fwd(*cast(fwd64, dtype))
    compare(ours, (context, weights, lse), ref.additive_attention_fwd(*cast(fwd64, dtype)),
            ["context", "weights", "lse"])
    check_masking(ours[1], ours[0], ours[2], mask, lengths, idx, k.shape[1])

    bwd64 = [randn(*context.shape, seed=20), randn(*weights.shape, seed=21), q, k, v, values,
             mask, lengths, idx, weights, lse]
    ours = C.additive_attention_bwd(*cast(bwd64[:-1], dtype), lse.to(acc(dtype)))
    compare(ours, ref.additive_attention_bwd(*bwd64),
            ref.additive_attention_bwd(*cast(bwd64[:-1], dtype), lse.to(acc(dtype))),
            ["dq", "dk", "dv", "dvalues"])
    for grad in ours:
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTENTION_CASES)
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_dot_attention(C, dtype, case, scale):
    q, k, _, values, mask, lengths, idx = attention_case(case)
    fwd64 = [q, k, values, mask, lengths, idx, scale]
    context, weights, lse = ref.dot_attention_fwd(*fwd64)
    ours = C.dot_attention_fwd(*cast(fwd64, dtype))
    compare(ours, (context, weights, lse), ref.dot_attention_fwd(*cast(fwd64, dtype)),
            ["context", "weights", "lse"])
    check_masking(ours[1], ours[0], ours[2], mask, lengths, idx, k.shape[1])

    bwd64 = [randn(*context.shape, seed=22), randn(*weights.shape, seed=23), q, k, values, mask,
             lengths, idx, scale, weights, lse]
    ours = C.dot_attention_bwd(*cast(bwd64[:-1], dtype), lse.to(acc(dtype)))
    compare(ours, ref.dot_attention_bwd(*bwd64),
            ref.dot_attention_bwd(*cast(bwd64[:-1], dtype), lse.to(acc(dtype))), ["dq", "dk", "dvalues"])
    for grad in ours:
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("tk", [40, 300], ids=["one-split", "key-splits"])
def test_attention_nan_and_inf_follow_the_reference(C, device, tk):
    """A NaN or +inf score makes its whole row NaN (weights, context, lse, and the row's dq), as
    torch.softmax does, instead of being taken for a fully masked row (zeros, lse = -inf). On
    CUDA, 300 keys for 3 decoder steps are split over several blocks (the combine kernel)."""
    q, k, values, v = randn(3, 1, 4, seed=1), randn(3, tk, 4, seed=2), randn(3, tk, 2, seed=3), randn(4, seed=4)
    q[0, 0, 1] = float("nan")  # row 0: every score NaN
    k[1, 5] = float("inf")
    q[1, 0] = q[1, 0].abs()    # row 1: one +inf dot score (additive: tanh(inf) = 1, finite)
    mask = torch.ones(3, tk, dtype=torch.bool)
    mask[:, 7:9] = False
    for fwd, bwd, extra, scale in ((C.additive_attention_fwd, C.additive_attention_bwd, (v,), ()),
                                   (C.dot_attention_fwd, C.dot_attention_bwd, (), (1.0,))):
        reference = (ref.additive_attention_fwd if extra else ref.dot_attention_fwd)(
            q, k, *extra, values, mask, None, None, *scale)
        args = [t.to(device, torch.float32) for t in (q, k, *extra, values)]
        ours = fwd(*args, mask.to(device), None, None, *scale)
        for name, o, r in zip(("context", "weights", "lse"), ours, reference):
            o, r = o.cpu(), r.to(torch.float32)
            assert torch.equal(torch.isnan(o), torch.isnan(r)), f"{name}: NaN pattern differs"
            torch.testing.assert_close(o.nan_to_num(), r.nan_to_num(), msg=lambda m: f"{name}: {m}")
        grads = bwd(torch.ones_like(ours[0]), torch.zeros_like(ours[1]), *args, mask.to(device), None, None,
                    *scale, ours[1], ours[2])
        dq = grads[0].cpu()
        assert torch.isnan(dq[0]).all() and torch.isfinite(dq[2]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_padding_is_never_read(C, dtype):
    """Keys and values past a row's length may hold anything (here NaN): never read."""
    q, k, v, values, _, _, _ = attention_case("decoder_step")
    q, k, v, values = cast([q, k, v, values], dtype)
    lengths = torch.tensor([5, 37, 1, 20])
    for b, n in enumerate(lengths.tolist()):
        k[b, n:] = float("nan")
        values[b, n:] = float("nan")
    context, weights, lse = C.additive_attention_fwd(q, k, v, values, None, lengths, None)
    assert torch.isfinite(context).all() and torch.isfinite(weights).all()
    grads = C.additive_attention_bwd(torch.ones_like(context), torch.ones_like(weights), q, k, v,
                                     values, None, lengths, None, weights, lse)
    for grad in grads:
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_empty(C, dtype):
    """Bq = 0 gives empty outputs; Tk = 0 gives zero context, lse = -inf, zero gradients."""
    for bq, tk in [(0, 5), (3, 0)]:
        q, k = randn(bq, 2, 4, dtype=dtype), randn(bq, tk, 4, dtype=dtype)
        v, values = randn(4, dtype=dtype), randn(bq, tk, 3, dtype=dtype)
        for fwd, bwd, extra in [(C.additive_attention_fwd, C.additive_attention_bwd, (v,)),
                                (C.dot_attention_fwd, C.dot_attention_bwd, ())]:
            scale = () if extra else (1.0,)
            context, weights, lse = fwd(q, k, *extra, values, None, None, None, *scale)
            assert context.shape == (bq, 2, 3) and weights.shape == (bq, 2, tk) and lse.shape == (bq, 2)
            assert (context == 0).all() and (lse == float("-inf")).all()
            grads = bwd(torch.ones_like(context), torch.ones_like(weights), q, k, *extra, values,
                        None, None, None, *scale, weights, lse)
            expected = [(bq, 2, 4), (bq, tk, 4)] + ([(4,)] if extra else []) + [(bq, tk, 3)]
            assert [tuple(g.shape) for g in grads] == expected
            assert all((g == 0).all() for g in grads)


def test_approx_tanh_flag_is_accepted_on_cpu(C):
    q, k, v, values, mask, lengths, idx = attention_case("masked")
    exact = C.additive_attention_fwd(q, k, v, values, mask, lengths, idx)
    flagged = C.additive_attention_fwd(q, k, v, values, mask, lengths, idx, approx_tanh=True)
    for a, b in zip(exact, flagged):
        assert torch.equal(a, b)  # CPU kernels always compute tanh accurately


def test_large_rows_use_many_threads_consistently(C):
    """Rows split across threads give the same result as the reference (no shared state)."""
    q, k = randn(64, 2, 32, dtype=torch.float32), randn(16, 300, 32, dtype=torch.float32)
    v, values = randn(32, dtype=torch.float32), randn(16, 300, 24, dtype=torch.float32)
    idx = torch.arange(64) % 16
    got = C.additive_attention_fwd(q, k, v, values, None, None, idx)
    want = ref.additive_attention_fwd(*[t.double() for t in (q, k, v, values)], None, None, idx)
    compare(got, want, ref.additive_attention_fwd(q, k, v, values, None, None, idx))


# ------------------------------------------------------------------------------- bad input

def _gru_args(dtype=torch.float32):
    return dict(gx=randn(4, 15, dtype=dtype), h=randn(4, 5, dtype=dtype),
                w_hh=randn(15, 5, dtype=dtype), b_hh=randn(15, dtype=dtype))


def _attn_args(dtype=torch.float32):
    q, k, v, values, mask, lengths, idx = attention_case("all")
    return dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), values=values.to(dtype), mask=mask,
                lengths=lengths, kv_batch_idx=idx)


BAD_GRU = [
    ("h", dict(h=randn(4, 5, dtype=torch.int32)), TypeError),
    ("gx", dict(gx=randn(4, 15, dtype=torch.float64)), TypeError),
    ("w_hh", dict(w_hh=randn(15, 6, dtype=torch.float32)), ValueError),
    ("b_hh", dict(b_hh=randn(16, dtype=torch.float32)), ValueError),
    ("gx", dict(gx=randn(15, 4, dtype=torch.float32).t()), ValueError),  # right shape, not contiguous
    ("h", dict(h=randn(4, 5, 1, dtype=torch.float32)), ValueError),
    ("h", dict(h=torch.empty(4, 5, device="meta")), ValueError),
    ("gx", dict(gx=torch.empty(4, 15, device="meta")), ValueError),
]


@pytest.mark.parametrize("name,change,error", BAD_GRU, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_GRU)])
def test_gru_bad_input_names_argument(C, name, change, error):
    args = {**_gru_args(), **change}
    with pytest.raises(error, match=rf"gru_cell_fwd: {name}\b"):
        C.gru_cell_fwd(**args)


def test_gru_not_contiguous(C):
    args = _gru_args()
    args["gx"] = randn(4, 30, dtype=torch.float32)[:, ::2]
    with pytest.raises(ValueError, match="gx must be contiguous"):
        C.gru_cell_fwd(**args)


BAD_ATTN = [
    ("mask", dict(mask=torch.ones(3, 17, dtype=torch.uint8)), TypeError),
    ("mask", dict(mask=torch.ones(3, 16, dtype=torch.bool)), ValueError),
    ("lengths", dict(lengths=torch.ones(3, dtype=torch.int32)), TypeError),
    ("lengths", dict(lengths=torch.ones(6, dtype=torch.int64)), ValueError),
    ("kv_batch_idx", dict(kv_batch_idx=torch.zeros(6, dtype=torch.int32)), TypeError),
    ("kv_batch_idx", dict(kv_batch_idx=torch.tensor([0, 1, 2, 3, 0, 1])), ValueError),
    ("kv_batch_idx", dict(kv_batch_idx=torch.tensor([0, 1, 2, -1, 0, 1])), ValueError),
    ("kv_batch_idx", dict(kv_batch_idx=torch.zeros(5, dtype=torch.int64)), ValueError),
    ("q", dict(q=randn(6, 8, dtype=torch.float32)), ValueError),
    ("k", dict(k=randn(3, 17, 9, dtype=torch.float32)), ValueError),
    ("values", dict(values=randn(3, 16, 7, dtype=torch.float32)), ValueError),
    ("v", dict(v=randn(9, dtype=torch.float32)), ValueError),
    ("v", dict(v=randn(8, dtype=torch.float64)), TypeError),
    ("k", dict(kv_batch_idx=None), ValueError),          # Bq != Bk needs kv_batch_idx
]


@pytest.mark.parametrize("name,change,error", BAD_ATTN, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_ATTN)])
def test_attention_bad_input_names_argument(C, name, change, error):
    args = {**_attn_args(), **change}
    with pytest.raises(error, match=rf"additive_attention_fwd: .*\b{name}\b"):
        C.additive_attention_fwd(**args)
    dot_args = {key: val for key, val in args.items() if key != "v"}
    if name != "v":
        with pytest.raises(error, match=rf"dot_attention_fwd: .*\b{name}\b"):
            C.dot_attention_fwd(**dot_args, scale=1.0)


def test_attention_bwd_checks_saved_tensors(C):
    args = _attn_args()
    context, weights, lse = C.additive_attention_fwd(**args)
    grads = dict(grad_context=torch.ones_like(context), grad_weights=torch.ones_like(weights))
    with pytest.raises(TypeError, match="additive_attention_bwd: lse must have dtype float32"):
        C.additive_attention_bwd(**grads, **args, weights=weights, lse=lse.double())
    with pytest.raises(ValueError, match="additive_attention_bwd: weights must have shape"):
        C.additive_attention_bwd(**grads, **args, weights=weights[:, :1].contiguous(), lse=lse)
    with pytest.raises(ValueError, match="additive_attention_bwd: grad_context must have shape"):
        C.additive_attention_bwd(grad_context=context[..., :2].contiguous(),
                                 grad_weights=grads["grad_weights"], **args, weights=weights, lse=lse)


def test_missing_argument_is_a_type_error(C):
    with pytest.raises(TypeError):
        C.gru_cell_fwd(None, randn(2, 3, dtype=torch.float32), randn(9, 3, dtype=torch.float32), None)


# ---------------------------------------------------------------------------------- build

def test_module_reports_has_cuda_consistently(C):
    assert isinstance(C.has_cuda, bool)
    assert isinstance(C.source_hash, str) and C.source_hash == build.source_hash(build.source_dir())
    forced = os.environ.get("FUSED_S2S_CUDA")
    if forced == "1":  # CI compiles the CUDA kernels even without a GPU
        assert C.has_cuda, "FUSED_S2S_CUDA=1 but the extension has no CUDA kernels"
    if torch.cuda.is_available() and forced != "0" and build.cuda_home() is not None:
        assert C.has_cuda, "a GPU, CUDA torch and nvcc are here, but the extension has no CUDA kernels"
    from fused_s2s.backends import registry
    reason = registry.unsupported_reason("cpp", "gru_cell", torch.device("cuda"), torch.float32)
    if C.has_cuda:
        assert reason is None
    else:
        assert "without CUDA" in reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_tensor_runs_or_says_why(C):
    args = {k: v.cuda() for k, v in _gru_args().items()}
    if C.has_cuda:
        h_new, _ = C.gru_cell_fwd(**args)
        want, _ = ref.gru_cell_fwd(**{k: v.double() for k, v in args.items()})
        torch.testing.assert_close(h_new.double(), want, rtol=1e-5, atol=1e-5)
    else:
        with pytest.raises(ValueError, match="built without CUDA kernels"):
            C.gru_cell_fwd(**args)
    with pytest.raises(ValueError, match=r"gru_cell_fwd: gx must be on cuda:0 like h, got cpu"):
        C.gru_cell_fwd(**{**args, "gx": args["gx"].cpu()})


def test_first_error_line_of_a_build_log():
    log = textwrap.dedent("""\
        Error building extension 'fused_s2s_C_cpu': [1/3] c++ -MMD ...
        FAILED: gru_cell.o
        In file included from /src/csrc/cpu/gru_cell.cpp:12:
        /src/csrc/cpu/kernels.h:3:2: error: #error broken on purpose
        /src/csrc/cpu/kernels.h:9:1: error: something else
        ninja: build stopped: subcommand failed.
        """)
    assert build._first_error_line(log) == "/src/csrc/cpu/kernels.h:3:2: error: #error broken on purpose"
    assert build._first_error_line("no errors here\nsecond") == "no errors here"


def test_cuda_home_found_from_nvcc_when_env_is_wrong(monkeypatch):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    monkeypatch.setenv("CUDA_HOME", "/nonexistent/cuda")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(build, "_cuda_home_cache", {})
    home = build.cuda_home()
    assert home is not None and os.path.isfile(os.path.join(home, "bin", "nvcc"))
    assert os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def _run_python(code, env, timeout=600):
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_failed_first_use_build_raises_one_line_reason(tmp_path):
    """A compile error becomes RuntimeError('building fused_s2s._C failed: <first error>')."""
    csrc = tmp_path / "csrc"
    shutil.copytree(build.source_dir(), csrc)
    header = csrc / "cpu" / "kernels.h"
    header.write_text("#error broken on purpose\n" + header.read_text())
    code = textwrap.dedent(f"""
        import sys, fused_s2s.backends.build as b
        b.source_dir = lambda: {str(csrc)!r}
        b.EXTENSION_NAME = "fused_s2s._C_not_installed"  # force the first-use build
        try:
            b.load_extension()
        except RuntimeError as e:
            print("REASON:", e)
            try:
                b.load_extension()
            except RuntimeError as again:
                print("AGAIN:", again == e or str(again) == str(e))
        """)
    out = _run_python(code, {"FUSED_S2S_BUILD_DIR": str(tmp_path / "build"), "FUSED_S2S_CUDA": "0"})
    reason = [line for line in out.stdout.splitlines() if line.startswith("REASON:")]
    assert reason, out.stdout + out.stderr
    assert "building fused_s2s._C failed" in reason[0] and "broken on purpose" in reason[0]
    assert "AGAIN: True" in out.stdout  # remembered, not rebuilt


@pytest.mark.slow
def test_two_processes_build_at_once(tmp_path):
    """Two processes that both find no compiled module build into the same folder at once:
    torch's lock on the build folder makes one build and the other wait; both import it."""
    code = textwrap.dedent("""
        import fused_s2s.backends.build as b, torch
        b.EXTENSION_NAME = "fused_s2s._C_not_installed"  # force the first-use build
        m = b.load_extension()
        h, _ = m.gru_cell_fwd(torch.zeros(2, 6), torch.zeros(2, 2), torch.zeros(6, 2), None)
        print("OK", m.__file__, float(h.sum()))
        """)
    env = {**os.environ, "FUSED_S2S_BUILD_DIR": str(tmp_path), "FUSED_S2S_CUDA": "0"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and "OK" in out, out
    files = {line.split()[1] for out in outs for line in out.splitlines() if line.startswith("OK")}
    assert len(files) == 1  # one build, shared
