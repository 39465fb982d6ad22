"""The persistent whole-sequence GRU/LSTM kernels through their autograd Functions: parity with
the float64 reference (the per-step math of the design, and nn.GRU/nn.LSTM), gradients, lengths,
reverse, the plan knobs and bad input. The CUDA kernels (backend "cpp") need a GPU; backend
"cpp" on CPU tensors is the C++ time loop; the Triton kernels (H <= 64) also run on CPU under
Triton's interpreter, which is how CI tests them."""
import copy
import types

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_s2s
from conftest import assert_close_to_reference, masked_layer_reference, parity_cases
from fused_s2s.backends import persistent as P
from fused_s2s.backends import persistent_autograd as PA
from fused_s2s.backends.persistent_autograd import (PersistentGRUFunction, PersistentLSTMFunction, persistent_gru_layer,
                                           persistent_layer_available, persistent_lstm_layer)

CELLS = ("gru", "lstm")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
gpu = pytest.mark.gpu
# where backend "cpp" has whole-sequence layers: the CUDA kernels, and the C++ loop on CPU
CPP_DEVICES = [pytest.param("cuda", marks=gpu), "cpu"]


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def poison_allocator(device):
    """Leave NaN-filled blocks in both pools of the caching allocator, so that outputs the kernels
    allocate next most likely start as NaN and an element never written shows up."""
    if torch.device(device).type != "cuda":
        return  # on CPU the tests that care use the poison_uninitialized fixture
    for numel in (1 << 24, *(1 << 17,) * 16):  # a large block, then small-pool blocks
        torch.full((numel,), float("nan"), device=device)


def ours_layer(cell, gx, h0, c0, w_hh, b_hh, lengths, reverse, **knobs):
    poison_allocator(gx.device)
    args = (lengths, reverse, knobs.get("max_blocks", 0), knobs.get("max_rows_per_block", 16),
            knobs.get("backend", "cpp"))
    if cell == "gru":
        out, h_n = PersistentGRUFunction.apply(gx, h0, w_hh, b_hh, *args)
        return out, h_n, None
    return PersistentLSTMFunction.apply(gx, h0, c0, w_hh, b_hh, *args)


def make_layer(cell, steps, batch, hidden, bias=True, seed=0, device="cuda"):
    """float64 tensors: gx, h0, c0, w_hh, b_hh, and the output gradients."""
    g = torch.Generator(device=device).manual_seed(seed)
    gates = P.GATES[cell]

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float64) * scale

    layer = dict(gx=rand(steps, batch, gates * hidden), h0=rand(batch, hidden, scale=0.5),
                 c0=rand(batch, hidden, scale=0.5) if cell == "lstm" else None,
                 w_hh=rand(gates * hidden, hidden, scale=hidden ** -0.5),
                 b_hh=rand(gates * hidden, scale=0.1) if bias else None)
    grads = dict(out=rand(steps, batch, hidden), h_n=rand(batch, hidden), c_n=rand(batch, hidden))
    return layer, grads


def run(fn, cell, layer, grads, dtype, lengths, reverse, used=("out", "h_n", "c_n"), **knobs):
    """Outputs and input gradients of sum(out*go) + sum(h_n*gh) (+ sum(c_n*gc)), in `dtype`;
    the loss takes only the outputs named in `used`."""
    leaves = {k: v.detach().to(dtype, copy=True).requires_grad_(True) for k, v in layer.items() if v is not None}
    out, h_n, c_n = fn(cell, leaves["gx"], leaves["h0"], leaves.get("c0"), leaves["w_hh"], leaves.get("b_hh"),
                       lengths, reverse, **knobs)
    outputs = dict(out=out, h_n=h_n) if c_n is None else dict(out=out, h_n=h_n, c_n=c_n)
    loss = sum((t * grads[k].to(dtype)).sum() for k, t in outputs.items() if k in used)
    loss.backward()
    return ({k: t.detach() for k, t in outputs.items()}, {k: t.grad for k, t in leaves.items()})


def check_parity(cell, steps, batch, hidden, dtype, lengths, reverse, bias=True, used=("out", "h_n", "c_n"),
                 device="cuda", **knobs):
    layer, grads = make_layer(cell, steps, batch, hidden, bias, device=device)
    if device == "cuda":
        assert persistent_layer_available(cell, layer["gx"].to(dtype), hidden, **knobs) is None
    ours, ours_grad = run(ours_layer, cell, layer, grads, dtype, lengths, reverse, used, **knobs)
    ref, ref_grad = run(masked_layer_reference, cell, layer, grads, torch.float64, lengths, reverse, used)
    plain, plain_grad = run(masked_layer_reference, cell, layer, grads, dtype, lengths, reverse, used)
    for name in ref:
        assert_close_to_reference(ours[name], ref[name], plain[name], name)
    for name in ref_grad:
        assert_close_to_reference(ours_grad[name], ref_grad[name], plain_grad[name], f"grad {name}")
    if lengths is not None:  # past its length a row outputs zeros and takes no gradient
        past = torch.arange(steps, device=device)[:, None] >= lengths.to(device)[None, :]
        assert (ours["out"][past] == 0).all() and (ours_grad["gx"][past] == 0).all()
    return ours, ours_grad


def ragged(steps, batch, seed=0):
    """Lengths in [0, steps] with a zero-length and a full-length row where the batch allows."""
    lengths = torch.randint(0, steps + 1, (batch,), generator=torch.Generator().manual_seed(seed))
    lengths[0] = steps
    if batch > 1:
        lengths[1] = 0
    return lengths


# (steps, batch, hidden, knobs): odd sizes; H=1, B=1; several row groups (16, 16, 5 rows or 8
# per block) and few blocks; a wider hidden size; a longer sequence
SHAPES = [(6, 5, 33, {}), (3, 1, 1, {}), (9, 37, 70, dict(max_blocks=6)),
          (7, 37, 70, dict(max_blocks=6, max_rows_per_block=8)), (5, 3, 257, {}), (48, 16, 128, {})]


@gpu
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-H{}{}".format(*s[:3], "-knobs" if s[3] else ""))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("lengths", ["full", "ragged"])
def test_functions_match_the_reference(cell, dtype, shape, reverse, lengths):
    steps, batch, hidden, knobs = shape
    check_parity(cell, steps, batch, hidden, dtype, None if lengths == "full" else ragged(steps, batch), reverse,
                 **knobs)


@gpu
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_chunked_staging(cell, dtype):
    """Few blocks, so wide weight slices that the exchanged operand is staged in k-chunks."""
    steps, batch, hidden = 5, 7, 512 if dtype != torch.float32 else 256
    for max_blocks in range(1, 33):
        plan = PA._require_kernels().persistent_rnn_plan(cell, dtype, batch, hidden, torch.device("cuda"),
                                                         backward=True, max_blocks=max_blocks)
        if plan["fits"] and plan["k_chunk"] < plan["k_pad"]:
            break
    else:
        pytest.fail("no max_blocks gives a chunked backward plan")
    check_parity(cell, steps, batch, hidden, dtype, ragged(steps, batch), False, max_blocks=max_blocks)


@gpu
@pytest.mark.parametrize("cell", CELLS)
def test_without_bias_and_with_missing_output_gradients(cell):
    check_parity(cell, 6, 5, 33, torch.float32, ragged(6, 5), True, bias=False)
    for used in ("out", "h_n", "c_n")[:2 if cell == "gru" else 3]:  # the others' gradients reach backward as None
        check_parity(cell, 6, 5, 33, torch.bfloat16, ragged(6, 5), False, used=(used,))


def make_torch_module(cell, input_size, hidden, seed=0, device="cuda"):
    torch.manual_seed(seed)
    cls = torch.nn.GRU if cell == "gru" else torch.nn.LSTM
    return cls(input_size, hidden, bidirectional=True).to(device, torch.float64)


def run_torch(module, x, state, lengths):
    if lengths is None:
        out, state = module(x, state)
    else:
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, state = module(packed, state)
        out = pad_packed_sequence(out, total_length=x.shape[0])[0]
    return out, state


def run_ours(cell, module, x, state, lengths):
    """Both directions of the module's layer through the persistent layer functions."""
    outs, h_ns, c_ns = [], [], []
    for d, suffix in enumerate(("_l0", "_l0_reverse")):
        w = [getattr(module, f"{name}{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        if cell == "gru":
            out, h_n = persistent_gru_layer(x, state[d], w[0], w[1], w[2], w[3], lengths, reverse=d == 1)
        else:
            out, h_n, c_n = persistent_lstm_layer(x, state[0][d], state[1][d], w[0], w[1], w[2], w[3], lengths,
                                                  reverse=d == 1)
            c_ns.append(c_n)
        outs.append(out)
        h_ns.append(h_n)
    h_n = torch.stack(h_ns)
    return torch.cat(outs, -1), (h_n if cell == "gru" else (h_n, torch.stack(c_ns)))


def run_module(cell, module, x, state, lengths, packed, backend):
    """fused_s2s.GRU/LSTM with `backend`, sharing `module`'s parameters; with lengths, the input
    goes in packed or as padded + lengths=. Checks that the persistent route was taken."""
    ours = (fused_s2s.GRU if cell == "gru" else fused_s2s.LSTM)(
        module.input_size, module.hidden_size, bidirectional=True, backend=backend, device=x.device, dtype=x.dtype)
    for name, p in module.named_parameters():
        setattr(ours, name, p)
    calls = []
    layer_fn = f"persistent_{cell}_layer"
    original = getattr(PA, layer_fn)
    setattr(PA, layer_fn, lambda *args, **kw: calls.append(kw) or original(*args, **kw))
    try:
        if lengths is None or packed:
            out, state = run_torch(ours, x, state, lengths)
        else:
            out, state = ours(x, state, lengths=lengths)
    finally:
        setattr(PA, layer_fn, original)
    launches = 1 if backend == "triton" else 2  # Triton runs both directions in one launch
    assert calls == [{"backend": backend}] * launches, "the module did not run on the persistent kernels"
    return out, state


# (device, how): Triton's CPU run is its interpreter, which modules do not route to
NN_PARITY_VIAS = [pytest.param("cuda", via, marks=gpu, id=f"cuda-{via}")
                  for via in ("layer-functions", "module-packed", "module-lengths", "triton-module-packed",
                              "triton-module-lengths")]
NN_PARITY_VIAS += [pytest.param("cpu", via, id=f"cpu-{via}") for via in ("layer-functions", "module-packed",
                                                                        "module-lengths")]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("lengths", [None, [7, 3, 1, 7, 5]], ids=["full", "varying"])
@pytest.mark.parametrize("device,via", NN_PARITY_VIAS)
def test_layer_functions_match_torch_nn(cell, dtype, lengths, device, via):
    """Both directions of a bidirectional nn.GRU/nn.LSTM (padded or packed input): outputs, final
    states and the gradients of the input, initial states and every parameter; through the
    layer functions, and through fused_s2s.GRU/LSTM's route to them (packed, or lengths=)."""
    steps, batch, input_size, hidden = 7, 5, 19, 33
    lengths = None if lengths is None else torch.tensor(lengths)
    ref_module = make_torch_module(cell, input_size, hidden, device=device)
    g = torch.Generator(device=device).manual_seed(1)
    x64 = torch.randn(steps, batch, input_size, generator=g, device=device, dtype=torch.float64)
    states64 = [torch.randn(2, batch, hidden, generator=g, device=device, dtype=torch.float64) * 0.5
                for _ in range(1 if cell == "gru" else 2)]
    grad_out = torch.randn(steps, batch, 2 * hidden, generator=g, device=device, dtype=torch.float64)
    grad_states = [torch.randn_like(s) for s in states64]

    def run_with(runner, module, dtype):
        module = copy.deepcopy(module).to(dtype)
        x = x64.to(dtype, copy=True).requires_grad_(True)
        states = [s.to(dtype, copy=True).requires_grad_(True) for s in states64]
        out, state = runner(module, x, states[0] if cell == "gru" else tuple(states), lengths)
        finals = [state] if cell == "gru" else list(state)
        if lengths is not None:
            past = torch.arange(steps, device=device)[:, None] >= lengths.to(device)[None, :]
            out = out.masked_fill(past[..., None], 0)  # both pad the same way; make it explicit
        loss = (out * grad_out.to(dtype)).sum() + sum((f * gs.to(dtype)).sum() for f, gs in zip(finals, grad_states))
        loss.backward()
        results = {"out": out.detach(), **{f"state{i}": f.detach() for i, f in enumerate(finals)},
                   "grad x": x.grad, **{f"grad state{i}": s.grad for i, s in enumerate(states)}}
        results.update({f"grad {n}": p.grad.clone() for n, p in module.named_parameters()})
        return results

    ref = run_with(run_torch, ref_module, torch.float64)
    plain = run_with(run_torch, ref_module, dtype)
    if via == "layer-functions":
        ours = run_with(lambda m, x, s, lens: run_ours(cell, m, x, s, lens), ref_module, dtype)
    else:
        backend = "triton" if via.startswith("triton") else "cpp"
        ours = run_with(lambda m, x, s, lens: run_module(cell, m, x, s, lens, via.endswith("packed"), backend),
                        ref_module, dtype)
    for name in ref:
        assert_close_to_reference(ours[name], ref[name], plain[name], name)


# ------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("device", CPP_DEVICES)
def test_repeatable_and_inference_without_saving(cell, device):
    """Bitwise the same twice (a fixed summation order), and the same under no_grad."""
    layer, grads = make_layer(cell, 10, 21, 70, device=device)
    lengths = ragged(10, 21)
    first = run(ours_layer, cell, layer, grads, torch.bfloat16, lengths, True)
    second = run(ours_layer, cell, layer, grads, torch.bfloat16, lengths, True)
    for a, b in zip(list(first[0].values()) + list(first[1].values()),
                    list(second[0].values()) + list(second[1].values())):
        assert torch.equal(a, b)
    with torch.no_grad():
        args = {k: None if v is None else v.to(torch.bfloat16) for k, v in layer.items()}
        out, h_n, c_n = ours_layer(cell, args["gx"], args["h0"], args["c0"], args["w_hh"], args["b_hh"], lengths,
                                   True)
    assert not out.requires_grad and torch.equal(out, first[0]["out"]) and torch.equal(h_n, first[0]["h_n"])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("device", CPP_DEVICES)
def test_empty_sequence_returns_fresh_initial_states(cell, device):
    layer, grads = make_layer(cell, 0, 3, 9, device=device)
    (outputs, grad) = run(ours_layer, cell, layer, grads, torch.float32, None, False)
    assert outputs["out"].shape == (0, 3, 9)
    torch.testing.assert_close(outputs["h_n"], layer["h0"].float())
    torch.testing.assert_close(grad["h0"], grads["h_n"].float())
    if cell == "lstm":
        torch.testing.assert_close(grad["c0"], grads["c_n"].float())
    h0 = layer["h0"].float()
    h_n = ours_layer(cell, layer["gx"].float(), h0, None if cell == "gru" else layer["c0"].float(),
                     layer["w_hh"].float(), None, None, False)[1]
    assert h_n.data_ptr() != h0.data_ptr()  # an output never aliases an input


@gpu
def test_plan_binding_matches_the_python_planner():
    device = P.Device.from_torch()
    kernels = PA._require_kernels()
    for cell in CELLS:
        for dtype in DTYPES:
            for backward in (False, True):
                for batch, hidden in ((1, 1), (5, 33), (16, 768), (37, 70), (64, 512), (16, 4096)):
                    ours = kernels.persistent_rnn_plan(cell, dtype, batch, hidden, torch.device("cuda"),
                                                       backward=backward)
                    mirror = P.plan(cell, dtype, batch, hidden, backward=backward, device=device)
                    if not mirror.fits:
                        assert not ours["fits"] and ours["reason"] == mirror.reason
                    elif ours["fits"]:  # the device may refuse a plan the arithmetic allows (occupancy)
                        assert ours == {k: getattr(mirror, k) for k in ours}


@gpu
def test_bad_input_raises_clear_errors():
    kernels = PA._require_kernels()
    T, B, H = 4, 3, 8
    cuda = dict(device="cuda", dtype=torch.float32)
    gx, h0, w_hh = torch.randn(T, B, 3 * H, **cuda), torch.randn(B, H, **cuda), torch.randn(3 * H, H, **cuda)
    fwd = kernels.persistent_gru_fwd
    assert fwd(gx.cpu(), h0.cpu(), w_hh.cpu(), None, None, False, True)[0].is_cpu  # CPU tensors: the CPU loop
    with pytest.raises(ValueError, match="gx must be on"):
        fwd(gx.cpu(), h0, w_hh, None, None, False, True)
    with pytest.raises(TypeError, match="w_hh must have dtype float32"):
        fwd(gx, h0, w_hh.half(), None, None, False, True)
    with pytest.raises(ValueError, match="gx must be contiguous"):
        fwd(gx.transpose(0, 1).contiguous().transpose(0, 1), h0, w_hh, None, None, False, True)
    with pytest.raises(ValueError, match="gx must have shape"):
        fwd(gx[..., :-1].contiguous(), h0, w_hh, None, None, False, True)
    with pytest.raises(TypeError, match="lengths must have dtype int64"):
        fwd(gx, h0, w_hh, None, torch.ones(B, device="cuda", dtype=torch.int32), False, True)
    with pytest.raises(ValueError, match="lengths must have shape"):
        fwd(gx, h0, w_hh, None, torch.ones(B + 1, device="cuda", dtype=torch.int64), False, True)
    with pytest.raises(TypeError, match="float64"):
        fwd(gx.double(), h0.double(), w_hh.double(), None, None, False, True)
    with pytest.raises(ValueError, match="does not fit the persistent kernels: rows per block"):
        fwd(gx, h0, w_hh, None, None, False, True, max_rows_per_block=17)
    wide = 4096  # float32: the W_hh slices do not fit in shared memory
    with pytest.raises(ValueError, match="does not fit the persistent kernels: W_hh slice"):
        kernels.persistent_lstm_fwd(torch.randn(1, 16, 4 * wide, **cuda), torch.zeros(16, wide, **cuda),
                                    torch.zeros(16, wide, **cuda), torch.zeros(4 * wide, wide, **cuda), None, None,
                                    False, False)
    reason = persistent_layer_available("LSTM", torch.randn(2, 16, 3, **cuda), wide)
    assert reason is not None and reason.startswith("forward plan: W_hh slice")
    assert persistent_layer_available("GRU", torch.randn(2, 1, 3, **cuda), 8) is None
    assert "float64" in persistent_layer_available("GRU", torch.randn(2, 1, 3, device="cuda").double(), 8)


# ------------------------------------------------------------------ the C++ time loop on CPU

CPU_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [s[:3] for s in SHAPES], ids=lambda s: "T{}-B{}-H{}".format(*s))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("lengths", ["full", "ragged"])
def test_cpu_loop_matches_the_reference(cell, dtype, shape, reverse, lengths, poison_uninitialized):
    steps, batch, hidden = shape
    assert persistent_layer_available(cell, torch.zeros(steps, batch, 1, dtype=dtype), hidden) is None
    check_parity(cell, steps, batch, hidden, dtype, None if lengths == "full" else ragged(steps, batch), reverse,
                 device="cpu")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_cpu_loop_is_the_per_step_kernels_arithmetic(cell, reverse):
    """The loop runs the per-step cell primitives' arithmetic in their order: bitwise the same
    outputs and gradients as backend "cpp"'s per-step Functions, in float32."""
    from fused_s2s.backends.autograd import GRUFunction, LSTMFunction
    layer, grads = make_layer(cell, 9, 6, 40, device="cpu")
    steps, batch = 9, 6

    def per_step(cell, gx, h0, c0, w_hh, b_hh, lengths, reverse):
        rows = gx.reshape(steps * batch, -1)
        if cell == "gru":
            out, h_n = GRUFunction.apply(rows, h0, w_hh, b_hh, (batch,) * steps, reverse, "cpp")
            return out.view(steps, batch, -1), h_n, None
        out, h_n, c_n = LSTMFunction.apply(rows, h0, c0, w_hh, b_hh, (batch,) * steps, reverse, "cpp")
        return out.view(steps, batch, -1), h_n, c_n

    ours = run(ours_layer, cell, layer, grads, torch.float32, None, reverse)
    theirs = run(per_step, cell, layer, grads, torch.float32, None, reverse)
    for part, other in zip(ours, theirs):
        for name in part:
            assert torch.equal(part[name], other[name]), name


def test_unavailable_paths_give_a_reason(monkeypatch):
    """Paths the persistent kernels do not cover say why, and the Functions raise with that
    reason instead of crashing: CUDA tensors without the CUDA kernels (a CPU-only build), a
    CPU call on another backend than cpp (Triton's interpreter is for tests), other devices."""
    x = torch.randn(3, 2, 4)
    module, _ = PA._kernels()
    if module is not None and not module.has_cuda:
        assert not hasattr(module, "persistent_rnn_plan")
    reason = PA.route("GRU", "torch", x, 6, 2, 8, True)[1]
    assert "only backend 'cpp'" in reason and "'torch'" in reason
    assert "got device meta" in PA.route("GRU", "cpp", x.to("meta"), 6, 2, 8, True)[1]

    monkeypatch.setattr(PA, "_extension", lambda: types.SimpleNamespace(has_cuda=False))
    reason = PA._fit_reason("GRU", torch.float32, torch.device("cuda", 0), 2, 8, True)
    assert "without CUDA kernels" in reason
    assert "float32" in PA._fit_reason("LSTM", torch.int64, torch.device("cpu"), 2, 8, True)


# ------------------------------------------------------------------- the Triton kernels (H <= 64)


TRITON_CASES = [p for p in parity_cases("gru_cell", [torch.float32, torch.float16, torch.bfloat16])
                if p.values[0] == "triton"]
# float32 cases of the whole-sequence kernels CI runs: Triton's (interpreted on CPU) and the C++ loop
FLOAT32_CASES = [p for p in TRITON_CASES if p.values[2] == torch.float32] + [
    pytest.param("cpp", "cpu", torch.float32, id="cpp-cpu-float32")]
# (steps, batch, hidden): odd sizes; two programs of 16 rows and the largest hidden size; H=1, B=1
TRITON_SHAPES = [(6, 5, 33), (4, 19, 64), (3, 1, 1)]
DIRECTIONS = [(False, "full"), (True, "ragged"), (False, "ragged")]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend,device,dtype", TRITON_CASES)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "T{}-B{}-H{}".format(*s))
@pytest.mark.parametrize("reverse,lengths", DIRECTIONS, ids=lambda v: str(v))
def test_triton_functions_match_the_reference(cell, backend, device, dtype, shape, reverse, lengths,
                                              poison_uninitialized):
    steps, batch, hidden = shape
    check_parity(cell, steps, batch, hidden, dtype, None if lengths == "full" else ragged(steps, batch), reverse,
                 device=device, backend=backend)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend,device,dtype", FLOAT32_CASES)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_lengths_outside_the_sequence_are_clamped(cell, backend, device, dtype, reverse, poison_uninitialized):
    """Lengths past T run the whole sequence and negative ones none, as in the CUDA kernels (the
    host range check is skipped under CUDA-graph capture, so the kernel itself must clamp): a
    reversed row with a length past T starts from h0/c0 at step T-1, never from step T."""
    check_parity(cell, 5, 4, 9, dtype, torch.tensor([5 + 3, -2, 1000, 2]), reverse, device=device, backend=backend)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend,device,dtype", FLOAT32_CASES)
def test_without_bias_missing_gradients_and_inference(cell, backend, device, dtype):
    check_parity(cell, 6, 5, 33, dtype, ragged(6, 5), True, bias=False, device=device, backend=backend)
    for used in ("out", "h_n", "c_n")[:2 if cell == "gru" else 3]:  # the others' gradients reach backward as None
        check_parity(cell, 6, 5, 33, dtype, ragged(6, 5), False, used=(used,), device=device, backend=backend)
    layer, _ = make_layer(cell, 5, 3, 9, device=device)
    args = [layer[k].float() if layer[k] is not None else None for k in ("gx", "h0", "c0", "w_hh", "b_hh")]
    with torch.no_grad():  # nothing saved for backward: the same outputs
        inference = ours_layer(cell, *args, ragged(5, 3), True, backend=backend)
    training = ours_layer(cell, *args, ragged(5, 3), True, backend=backend)
    for a, b in zip(inference, training):
        assert (a is None and b is None) or torch.equal(a, b.detach())


@pytest.mark.parametrize("backend,device,dtype", [p for p in TRITON_CASES if p.values[2] == torch.float32])
def test_triton_bad_input_and_empty_sequences(backend, device, dtype):
    from fused_s2s import triton_kernels as TK
    T, B, H = 4, 3, 8
    gx, h0, w_hh = torch.randn(T, B, 3 * H, device=device), torch.randn(B, H, device=device), torch.randn(3 * H, H, device=device)
    with pytest.raises(ValueError, match="hidden sizes up to 64, got 65"):
        TK.persistent_gru_fwd(torch.randn(T, B, 195, device=device), torch.randn(B, 65, device=device),
                              torch.randn(195, 65, device=device), None, None, False, True)
    with pytest.raises(ValueError, match="gx must have shape"):
        TK.persistent_gru_fwd(gx[..., :-1].contiguous(), h0, w_hh, None, None, False, True)
    with pytest.raises(ValueError, match="w_hh must have dtype"):
        TK.persistent_gru_fwd(gx, h0, w_hh.half(), None, None, False, True)
    with pytest.raises(ValueError, match="lengths must have dtype torch.int64"):
        TK.persistent_gru_fwd(gx, h0, w_hh, None, torch.ones(B, dtype=torch.int32, device=device), False, True)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        TK.persistent_gru_fwd(gx.double(), h0.double(), w_hh.double(), None, None, False, True)
    assert "up to 64" in PA.persistent_layer_available("LSTM", torch.randn(2, 3, 4, device=device), 65,
                                                       backend="triton")
    for cell in CELLS:  # an empty sequence: the initial states, fresh tensors, and their gradients
        layer, grads = make_layer(cell, 0, 3, 9, device=device)
        outputs, grad = run(ours_layer, cell, layer, grads, dtype, None, False, backend=backend)
        assert outputs["out"].shape == (0, 3, 9)
        torch.testing.assert_close(outputs["h_n"], layer["h0"].float())
        torch.testing.assert_close(grad["h0"], grads["h_n"].float())


def test_triton_persistent_reason_checks_the_device_and_the_triton_version(monkeypatch):
    """On CUDA the layer is refused, with the numbers, when a kernel needs more shared memory
    than the device allows (the float32 LSTM backward at H = 64 needs ~148 KiB; sm_86/89 allow
    99 KiB), and on a Triton version known to abort the process compiling it."""
    from fused_s2s import triton_kernels as TK
    from fused_s2s.triton_kernels import persistent_rnn as PR
    cuda = torch.device("cuda", 0)
    needs = {(PR._forward_kernel, True): 60_000, (PR._backward_kernel, True): 151_552}
    monkeypatch.setattr(PR, "unsupported_reason", lambda *args: None)
    monkeypatch.setattr(PR, "_shared_memory_limit", lambda index: 101_376)
    monkeypatch.setattr(PR, "_shared_memory", lambda kernel, is_lstm, dtype, block_h, index:
                        needs.get((kernel, is_lstm), 30_000) if dtype == torch.float32 and block_h == 64 else 30_000)
    assert TK.persistent_reason(cuda, torch.float32, 64, "lstm", backward=False) is None
    reason = TK.persistent_reason(cuda, torch.float32, 64, "lstm", backward=True)
    assert reason == ("the Triton persistent LSTM backward at hidden size 64 in torch.float32 needs 151552 bytes "
                      "of shared memory, the device allows 101376")
    assert TK.persistent_reason(cuda, torch.bfloat16, 64, "lstm", backward=True) is None
    assert PA._fit_reason("LSTM", torch.float32, cuda, 8, 64, True, backend="triton") == reason
    assert PA._fit_reason("LSTM", torch.float32, cuda, 8, 64, False, backend="triton") is None
    monkeypatch.setattr(PR.triton, "__version__", "3.9.0")
    assert "Triton 3.9.0 aborts the process" in TK.persistent_reason(cuda, torch.float32, 33, "lstm", backward=True)
    for args in ((torch.float32, 16, "lstm", True), (torch.float32, 33, "gru", True), (torch.float32, 33, "lstm", False),
                 (torch.float16, 33, "lstm", True)):
        assert TK.persistent_reason(cuda, *args) is None
