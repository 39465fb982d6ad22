"""Where users run models: autocast, determinism, NaN/Inf, huge sizes, and property-based
checks of every backend against the reference over shapes, masks, dtypes and strides."""
import warnings

import pytest
import torch
from torch import nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_s2s
from fused_s2s import functional as FS
from fused_s2s.backends import reference, registry

from conftest import DEVICES, parity_cases

CPU_BACKENDS = sorted({p.values[0] for p in parity_cases("gru_cell", [torch.float32])
                       if p.values[1] == "cpu" and not p.marks})


def _attention_backend(backend):
    """native has no attention kernel: there the attention runs on auto's choice."""
    return None if backend == "native" else backend


def _autocast_cases():
    cases = [pytest.param("cpu", torch.bfloat16, id="cpu-bf16")]
    if torch.cuda.is_available():
        cases += [pytest.param("cuda", t, marks=pytest.mark.gpu, id=f"cuda-{t}") for t in (torch.float16, torch.bfloat16)]
    return cases


@pytest.mark.parametrize("device,dtype", _autocast_cases())
def test_autocast_runs_in_low_precision(device, dtype):
    torch.manual_seed(0)
    gru = fused_s2s.LSTM(8, 16, num_layers=2, bidirectional=True).to(device)
    att = fused_s2s.BahdanauAttention(32, 32, 16).to(device)
    x = torch.randn(7, 3, 8, device=device)

    def run():
        out, (h, c) = gru(x)
        ctx, w = att(h[-2:].transpose(0, 1).reshape(3, 32), out.transpose(0, 1))
        return out, ctx

    ref_out, ref_ctx = run()
    with torch.autocast(device, dtype=dtype):
        out, ctx = run()
    assert out.dtype == dtype and ctx.dtype == dtype
    # a few bf16/fp16 roundings of O(1) values through two layers: well inside 5e-2
    torch.testing.assert_close(out.float(), ref_out, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(ctx.float(), ref_ctx, atol=5e-2, rtol=5e-2)
    (out.float().sum() + ctx.float().sum()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in gru.parameters())

    # a decoder step: float32 input (embedding, context) with a state made under autocast, as
    # nn.GRUCell/nn.LSTMCell accept it
    x, h = torch.randn(3, 8, device=device), torch.randn(3, 16, device=device).to(dtype)
    for ours, ref in ((fused_s2s.GRUCell(8, 16), torch.nn.GRUCell(8, 16)),
                      (fused_s2s.LSTMCell(8, 16), torch.nn.LSTMCell(8, 16))):
        ours.load_state_dict(ref.state_dict())
        state = h if isinstance(ref, torch.nn.GRUCell) else (h, h.float())
        with torch.autocast(device, dtype=dtype):
            got, expected = ours.to(device)(x, state), ref.to(device)(x, state)
        got, expected = (got, expected) if isinstance(got, tuple) else ((got,), (expected,))
        for a, b in zip(got, expected):
            # nn's answer, dtype included: nn.LSTMCell given a float32 c under CPU autocast answers
            # in float32, and `auto` runs PyTorch's own cell kernel there as nn does
            assert a.dtype == b.dtype and a.dtype in (dtype, torch.float32)
            torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)


def test_cpu_autocast_bf16_runs_the_cpp_kernels():
    """torch.autocast("cpu", bfloat16) with backend="cpp" (which refuses what it cannot run):
    cells, layers, attention and the demo model run in bfloat16, near their float32 results,
    with float32 parameter gradients; "auto" takes bfloat16 on CPU without a fallback warning."""
    from fused_s2s.demo.models import Seq2Seq, sequence_loss
    torch.manual_seed(0)
    x, h, packed_lengths = torch.randn(7, 3, 8), torch.randn(3, 16), torch.tensor([7, 2, 5])
    modules = [fused_s2s.GRUCell(8, 16, backend="cpp"), fused_s2s.LSTMCell(8, 16, backend="cpp"),
               fused_s2s.GRU(8, 16, num_layers=2, bidirectional=True, backend="cpp"),
               fused_s2s.LSTM(8, 16, bidirectional=True, backend="cpp")]
    calls = [lambda m: m(x[0], h), lambda m: m(x[0], (h, h))[0],
             lambda m: m(nn.utils.rnn.pack_padded_sequence(x, packed_lengths, enforce_sorted=False))[0].data,
             lambda m: m(x)[0]]
    keys, query, mask = torch.randn(3, 9, 16, requires_grad=True), torch.randn(3, 16), torch.rand(3, 9) > 0.3
    mask[:, 0] = True
    for att in (fused_s2s.BahdanauAttention(16, 16, 12, backend="cpp"),
                fused_s2s.LuongAttention(16, 16, backend="cpp"),
                fused_s2s.LuongAttention(16, 16, score="general", backend="cpp")):
        modules.append(att)
        calls.append(lambda m: m(query, keys, mask=mask)[0])
    for cell, attention in (("gru", "bahdanau"), ("lstm", "dot")):
        model = Seq2Seq(20, 20, embedding_size=8, hidden_size=16, cell=cell, attention=attention, backend="cpp")
        src, tgt = torch.randint(3, 20, (4, 6)), torch.randint(3, 20, (4, 5))
        modules.append(model)
        calls.append(lambda m, src=src, tgt=tgt: m(src, torch.tensor([6, 3, 5, 1]), tgt))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning on the way
        for module, call in zip(modules, calls):
            want = call(module)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = call(module)
            assert got.dtype == torch.bfloat16, type(module).__name__
            torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)
            got.float().square().sum().backward()
            assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in module.parameters())
        for op in registry.OPS:
            registry.resolve("auto", op, torch.device("cpu"), torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sequence_loss(modules[-1](src, torch.tensor([6, 3, 5, 1]), tgt), tgt)
        loss.backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deterministic_forward_backward(backend):
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for _ in range(2):
            torch.manual_seed(0)
            gru = fused_s2s.GRU(5, 9, bidirectional=True, backend=backend)
            att = fused_s2s.LuongAttention(18, 18, score="general", backend=_attention_backend(backend))
            x = torch.randn(6, 4, 5)
            out, _ = gru(x)
            idx = torch.tensor([0, 0, 1, 2, 3, 3])
            ctx, w = att(torch.randn(6, 18), out.transpose(0, 1), kv_batch_idx=idx)
            (ctx.sum() + w.square().sum()).backward()
            results.append([out, ctx] + [p.grad for p in gru.parameters()])
        for a, b in zip(*results):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_and_inf_propagate_like_pytorch(backend):
    q, k, values = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 3)
    q[0, 1, 2] = float("nan")
    k[1, 2, 0] = float("inf")
    ours = FS.dot_attention(q, k, values, backend=_attention_backend(backend))
    ref = reference.dot_attention(q, k, values)
    for a, b in zip(ours, ref):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num())
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    x[1, 0] = float("nan")
    w_ih, w_hh = torch.randn(12, 3), torch.randn(12, 4)
    out = FS.gru_cell(x, h, w_ih, w_hh, backend=backend)
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()


def test_huge_sizes_refused_by_kernels_not_overflowed():
    """Tensors past 32-bit indexing: a kernel backend asked by name refuses with a clear
    error (checked before any copy is made); "auto" would route them to `torch`."""
    keys = torch.zeros(1, 1, 1).expand(1, 2**16, 2**15 + 1)  # 2^31 + 2^16 elements, no memory
    q, v, values = torch.zeros(1, 2**15 + 1), torch.zeros(2**15 + 1), torch.zeros(1, 2**16, 1)
    for name in ("cpp", "triton"):
        with pytest.raises(fused_s2s.BackendUnavailable, match="32-bit|cannot load"):
            FS.additive_attention(q, keys, v, values, backend=name)
    assert registry.resolve("auto", "additive_attention", q.device, q.dtype, keys.numel()) == "torch"


# ------------------------------------------------------------------ property-based tests

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@st.composite
def attention_problems(draw):
    B = draw(st.integers(0, 4))
    Tq = draw(st.integers(1, 3))
    Tk = draw(st.integers(1, 9))
    A = draw(st.integers(1, 20))
    Dv = draw(st.integers(1, 6))
    mask_kind = draw(st.sampled_from(["none", "mask", "lengths"]))
    single = draw(st.booleans())
    transposed_keys = draw(st.booleans())  # a non-contiguous layout
    seed = draw(st.integers(0, 2**16))
    return B, Tq, Tk, A, Dv, mask_kind, single, transposed_keys, seed


def _attention_tensors(B, Tq, Tk, A, Dv, mask_kind, single, transposed_keys, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    q = r(B, A) if single else r(B, Tq, A)
    k = r(Tk, B, A).transpose(0, 1) if transposed_keys else r(B, Tk, A)
    mask = (torch.rand(B, Tk, generator=g) > 0.4) if mask_kind == "mask" else None
    lengths = torch.randint(0, Tk + 1, (B,), generator=g) if mask_kind == "lengths" else None
    return q, k, r(A), r(B, Tk, Dv), mask, lengths


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@PROPERTY_SETTINGS
@given(problem=attention_problems(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_attention_properties(backend, problem, dtype):
    if registry.unsupported_reason(backend, "additive_attention", torch.device("cpu"), dtype):
        return  # this backend does not take this dtype; the others do
    q, k, v, values, mask, lengths = _attention_tensors(*problem, dtype=dtype)
    for fn, ref_fn, args in ((FS.additive_attention, reference.additive_attention, (q, k, v, values)),
                             (FS.dot_attention, reference.dot_attention, (q, k, values))):
        ins = [t.detach().requires_grad_() for t in args]
        ours = fn(*ins, mask, lengths=lengths, backend=backend)
        ref = ref_fn(*[t.detach().double().requires_grad_() for t in args], mask, lengths=lengths)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b.to(dtype))
        # weights are a distribution over valid positions (or all zero)
        w = ours[1].detach()
        sums = w.sum(-1)
        assert torch.all(((sums - 1).abs() < 1e-4) | (sums == 0))
        (ours[0].sum() + ours[1].sum()).backward()
        assert all(torch.isfinite(t.grad).all() for t in ins)


@st.composite
def rnn_problems(draw):
    return (draw(st.sampled_from(["GRU", "LSTM"])), draw(st.integers(0, 4)), draw(st.integers(1, 5)),
            draw(st.integers(1, 6)), draw(st.integers(1, 12)), draw(st.integers(1, 2)), draw(st.booleans()),
            draw(st.booleans()), draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@PROPERTY_SETTINGS
@given(problem=rnn_problems())
def test_rnn_properties(backend, problem):
    mode, B, T, I, H, layers, bidirectional, packed, seed = problem
    cpu = torch.device("cpu")
    dtype = torch.float64 if registry.unsupported_reason(backend, "gru_cell", cpu, torch.float64) is None \
        else torch.float32
    torch.manual_seed(seed)
    ref = getattr(torch.nn, mode)(I, H, num_layers=layers, bidirectional=bidirectional).to(dtype)
    ours = getattr(fused_s2s, mode)(I, H, num_layers=layers, bidirectional=bidirectional, backend=backend).to(dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, dtype=dtype)
    if packed and B > 0:
        lengths = torch.randint(1, T + 1, (B,))
        x = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    r, o = ref(x), ours(x)
    r_out, o_out = (r[0].data, o[0].data) if packed and B > 0 else (r[0], o[0])
    torch.testing.assert_close(o_out, r_out)
    r_h, o_h = (r[1][0], o[1][0]) if mode == "LSTM" else (r[1], o[1])
    torch.testing.assert_close(o_h, r_h)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_decoder_step_captures_in_cuda_graph(backend):
    """A decoder step (attention + cell) records into a CUDA graph (no host sync, no
    allocation that breaks capture) and replays with the same result as eager."""
    if registry.unsupported_reason(backend, "gru_cell", torch.device("cuda"), torch.float32):
        pytest.skip(f"{backend} cannot run on CUDA here")
    torch.manual_seed(0)
    att = fused_s2s.BahdanauAttention(32, 48, 24, backend=backend).cuda()
    cell = fused_s2s.GRUCell(48 + 16, 32, backend=backend).cuda()
    memory = torch.randn(8, 50, 48, device="cuda")
    mask = torch.rand(8, 50, device="cuda") > 0.2
    proj = att.project_keys(memory)
    h = torch.randn(8, 32, device="cuda")
    emb = torch.randn(8, 16, device="cuda")

    def step():
        ctx, _ = att(h, memory, mask=mask, proj_keys=proj)
        return cell(torch.cat([emb, ctx], dim=1), h)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up outside the capture (lazy init, autotuning)
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = step()
    h.copy_(torch.randn_like(h))
    with torch.no_grad():
        expected = step()
    graph.replay()
    torch.testing.assert_close(out, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_greedy_decode_loop_captures_in_cuda_graph(backend):
    """The greedy loop (GreedyState + greedy_step, no early stop) records into one CUDA graph
    and replays to greedy_decode's answer for new sources copied into the same buffers."""
    if registry.unsupported_reason(backend, "gru_cell", torch.device("cuda"), torch.float32):
        pytest.skip(f"{backend} cannot run on CUDA here")
    from fused_s2s.demo.data import PAD, date_task, date_vocabs, make_batch
    from fused_s2s.demo.decoding import GreedyState, greedy_decode, greedy_step
    from fused_s2s.demo.models import Seq2Seq
    src_vocab, tgt_vocab = date_vocabs()
    torch.manual_seed(0)
    model = Seq2Seq(len(src_vocab), len(tgt_vocab), 16, 32, backend=backend).cuda().eval()
    batches = [make_batch(date_task(8, 1, seed=s)[0], src_vocab, tgt_vocab) for s in (1, 2)]
    width = max(b.src.shape[1] for b in batches)
    srcs = [torch.nn.functional.pad(b.src, (0, width - b.src.shape[1])).cuda() for b in batches]
    src, src_lengths = srcs[0].clone(), batches[0].src_lengths.cuda()
    steps = 12

    def loop():
        memory, g = GreedyState.start(model, src, src_lengths, max_len=steps)
        out = []
        for step in range(steps):
            tokens, _, g = greedy_step(model, memory, g, step)
            out.append(tokens)
        return torch.stack(out, 1)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(2):
            loop()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        tokens = loop()
    for source, batch in zip(srcs, batches):
        src.copy_(source)
        src_lengths.copy_(batch.src_lengths)
        graph.replay()
        expected = greedy_decode(model, source, batch.src_lengths.cuda(), max_len=steps).tokens
        assert torch.equal(tokens[:, :expected.shape[1]], expected)
        assert bool((tokens[:, expected.shape[1]:] == PAD).all())  # after every row finished
