"""LSTM with projections (nn.LSTM's proj_size, LSTMP): nn's parameters, state shapes and results
on every backend, forward and backward, against nn.LSTM in float64."""
import copy
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_s2s
from fused_s2s.backends import layers, registry

from conftest import assert_close_to_reference, parity_cases

CPU64 = [p for p in parity_cases("lstm_cell", dtypes=[torch.float64]) if p.values[1] == "cpu"]
# backends.layers.lstm_layer is one direction of our kernels: native runs whole modules instead
KERNELS64 = [p for p in CPU64 if p.values[0] != "native"]


def _tensors(result):
    """(output, (h_n, c_n)) -> [output, h_n, c_n], a packed output as its data."""
    out, (h, c) = result
    return [out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out, h, c]


def _loss(tensors, seed=3):
    """A loss whose gradient is random in every output (a plain sum would hide sign errors)."""
    gen = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t)).sum() for t in tensors)


def _assert_same(ref, ours, *args, **kwargs):
    """Same outputs and gradients (of the inputs that require them and of every parameter)."""
    ref_out, our_out = _tensors(ref(*args)), _tensors(ours(*args, **kwargs))
    for name, a, b in zip(("output", "h_n", "c_n"), ref_out, our_out):
        torch.testing.assert_close(b, a, msg=lambda m: f"{name}: {m}")
    names = [n for n, _ in ref.named_parameters()]
    g_ref = torch.autograd.grad(_loss(ref_out), list(ref.parameters()))
    g_ours = torch.autograd.grad(_loss(our_out), list(ours.parameters()))
    for name, a, b in zip(names, g_ref, g_ours):
        torch.testing.assert_close(b, a, msg=lambda m: f"grad of {name}: {m}")


CONFIGS = list(itertools.product([1, 2], [False, True], [False, True], [True, False]))


@pytest.mark.parametrize("backend,device,dtype", CPU64)
@pytest.mark.parametrize("num_layers,bidirectional,batch_first,bias", CONFIGS, ids=str)
def test_proj_drop_in(backend, device, dtype, num_layers, bidirectional, batch_first, bias):
    torch.manual_seed(1)
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias, proj_size=2)
    ref = nn.LSTM(4, 5, **kw).double()
    ours = fused_s2s.LSTM(4, 5, backend=backend, **kw).double()
    assert ours._flat_weights_names == ref._flat_weights_names
    assert [(n, p.shape) for n, p in ours.state_dict().items()] == [(n, p.shape) for n, p in ref.state_dict().items()]
    shapes = lambda m: [[p.shape for p in layer] for layer in m.all_weights]  # noqa: E731
    assert shapes(ours) == shapes(ref)
    ref.load_state_dict(ours.state_dict())  # both ways
    ours.load_state_dict(ref.state_dict())
    T, B, D = 5, 3, 2 if bidirectional else 1
    x = torch.randn((B, T, 4) if batch_first else (T, B, 4), dtype=torch.float64)
    _assert_same(ref, ours, x)
    state = tuple(torch.randn(num_layers * D, B, size, dtype=torch.float64) for size in (2, 5))
    _assert_same(ref, ours, x, state)
    lengths = torch.tensor([2, 5, 1])
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    _assert_same(ref, ours, packed, state)
    unbatched = x[0] if batch_first else x[:, 0]
    _assert_same(ref, ours, unbatched, (state[0][:, 0], state[1][:, 0]))
    # lengths=: padded input, packing's results
    out, (h_n, c_n) = ours(x, state, lengths=lengths)
    ref_out, (ref_h, ref_c) = ref(packed, state)
    ref_out = pad_packed_sequence(ref_out, batch_first=batch_first, total_length=T)[0]
    assert out.shape[-1] == D * 2 and h_n.shape[-1] == 2 and c_n.shape[-1] == 5
    for name, a, b in (("output", ref_out, out), ("h_n", ref_h, h_n), ("c_n", ref_c, c_n)):
        torch.testing.assert_close(b, a, msg=lambda m: f"lengths=, {name}: {m}")


SHAPES = [(1, 3, 33, 1), (5, 2, 33, 17), (3, 4, 7, 6)]  # (B, I, H, P): odd sizes, P = 1 and P = H - 1


@pytest.mark.parametrize("backend,device,dtype", parity_cases("lstm_cell"))
@pytest.mark.parametrize("B,I,H,P", SHAPES, ids=lambda v: str(v))
def test_proj_parity(backend, device, dtype, B, I, H, P, poison_uninitialized):
    """Two bidirectional layers over padded input with lengths=, every output and gradient,
    against nn.LSTM in float64 (plain PyTorch in `dtype` sets the low-precision yardstick)."""
    torch.manual_seed(0)
    T = 4
    ref64 = nn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=P).double().to(device)
    plain = copy.deepcopy(ref64).to(dtype)
    ours = fused_s2s.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=P, backend=backend).to(device, dtype)
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64, device=device)
    h0 = torch.randn(4, B, P, dtype=torch.float64, device=device)
    c0 = torch.randn(4, B, H, dtype=torch.float64, device=device)
    lengths = torch.arange(B, dtype=torch.int64) % T + 1  # 1, 2, .., T, 1, ..

    def run(module, dt, ours_call):
        inputs = [t.to(dt).requires_grad_() for t in (x, h0, c0)]
        if ours_call:
            out, (h, c) = module(inputs[0], tuple(inputs[1:]), lengths=lengths.to(device))
        else:
            packed = pack_padded_sequence(inputs[0], lengths, enforce_sorted=False)
            out, (h, c) = module(packed, tuple(inputs[1:]))
            out = pad_packed_sequence(out, total_length=T)[0]
        grads = torch.autograd.grad(_loss([out, h, c]), inputs + list(module.parameters()))
        return [out, h, c] + list(grads)

    names = ["output", "h_n", "c_n", "grad x", "grad h0", "grad c0"]
    names += [f"grad {n}" for n, _ in ref64.named_parameters()]
    ref_results = run(ref64, torch.float64, False)
    plain_results = run(plain, dtype, False)
    for name, a, b, p in zip(names, ref_results, run(ours, dtype, True), plain_results):
        assert b.dtype == dtype, name
        assert_close_to_reference(b, a, p, name)


@pytest.mark.parametrize("backend,device,dtype", [
    p for p in parity_cases("lstm_cell", dtypes=[torch.float64, torch.float32, torch.float16, torch.bfloat16])
    if p.values[1] == "cpu" and p.values[0] != "native"])  # native has no primitives
@pytest.mark.parametrize("B,H,P", [(1, 33, 1), (5, 33, 17), (3, 7, 6)], ids=str)
def test_projected_cell_primitive(backend, device, dtype, B, H, P, poison_uninitialized):
    """The cell primitive with a projected h (B, P), in every dtype the backend takes on CPU:
    h_new = o * tanh(c_new) unprojected (B, H), against the contract's float64 reference."""
    torch.manual_seed(0)
    args64 = (torch.randn(B, 4 * H), torch.randn(B, P), torch.randn(B, H), torch.randn(4 * H, P) / P ** 0.5,
              torch.randn(4 * H))
    args64 = tuple(a.double() for a in args64)
    cast = tuple(a.to(dtype) for a in args64)
    ours = registry.load(backend).lstm_cell_fwd(*cast)
    ref = registry.load("torch")
    for name, o, r, p in zip(("h_new", "c_new", "saved"), ours, ref.lstm_cell_fwd(*args64), ref.lstm_cell_fwd(*cast)):
        assert o.dtype == dtype and o.shape == r.shape, name
        assert_close_to_reference(o, r, p, name)


@pytest.mark.parametrize("backend,device,dtype", KERNELS64)
@pytest.mark.parametrize("reverse", [False, True])
def test_proj_gradcheck(backend, device, dtype, reverse):
    torch.manual_seed(0)
    T, B, I, H, P = 3, 3, 2, 5, 2
    r = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    args = (r(T * B, I), r(B, P), r(B, H), r(4 * H, I), r(4 * H, P), r(4 * H), r(4 * H), r(P, H))
    lengths = torch.tensor([3, 1, 2])

    def f(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        return layers.lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, (B,) * T, reverse, lengths=lengths,
                             backend=backend, w_hr=w_hr)
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("backend,device,dtype", CPU64)
def test_proj_dropout_matches_nn(backend, device, dtype):
    """Dropout between layers draws the same masks as nn.LSTM's from the same seed."""
    ref = nn.LSTM(3, 6, num_layers=3, dropout=0.5, proj_size=2).double()
    ours = fused_s2s.LSTM(3, 6, num_layers=3, dropout=0.5, proj_size=2, backend=backend).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    torch.manual_seed(5)
    expected = ref(x)[0]
    torch.manual_seed(5)
    torch.testing.assert_close(ours(x)[0], expected)
    torch.manual_seed(6)
    assert not torch.equal(ours(x)[0], expected)


def test_proj_size_validation():
    for bad in (5, 7, -1):
        with pytest.raises(ValueError, match="proj_size"):
            fused_s2s.LSTM(3, 5, proj_size=bad)
        with pytest.raises(ValueError):
            nn.LSTM(3, 5, proj_size=bad)  # nn refuses the same values
    with pytest.raises(ValueError, match="proj_size"):
        fused_s2s.LSTM(3, 5, proj_size=2.0)
    with pytest.raises(ValueError, match="proj_size.*LSTM"):
        fused_s2s.GRU(3, 5, proj_size=2)
    assert fused_s2s.GRU(3, 5).proj_size == 0
    lstm = fused_s2s.LSTM(3, 5, 1, True, False, 0.0, False, 2)  # nn.LSTM's positional order
    assert lstm.proj_size == 2 and repr(lstm) == repr(nn.LSTM(3, 5, proj_size=2))
    with pytest.raises(RuntimeError, match=r"h_0 size \(1, 2, 2\)"):
        lstm(torch.randn(4, 2, 3), (torch.zeros(1, 2, 5), torch.zeros(1, 2, 5)))  # h is (L*D, B, P)
    with pytest.raises(RuntimeError, match=r"c_0 size \(1, 2, 5\)"):
        lstm(torch.randn(4, 2, 3), (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)))  # c is (L*D, B, H)


def test_patch_swaps_projected_lstm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=4)).double()
    reference = copy.deepcopy(model)
    assert fused_s2s.patch(model) == ["0"]
    assert type(model[0]) is fused_s2s.PatchedLSTM and isinstance(model[0], nn.LSTM) and model[0].proj_size == 4
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    _assert_same(reference[0], model[0], x)


@pytest.mark.parametrize("backend,device,dtype", CPU64)
def test_pytorch_module_test_inputs(backend, device, dtype):
    """PyTorch's own module test inputs for nn.LSTM (half of them with proj_size), run through
    ours with nn.LSTM's weights: same outputs and gradients."""
    from torch.testing._internal.common_modules import module_db
    info = next(m for m in module_db if m.module_cls is nn.LSTM)
    inputs = info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=False, training=True)
    assert sum(i.constructor_input.kwargs.get("proj_size", 0) > 0 for i in inputs) >= 16
    for module_input in inputs:
        torch.manual_seed(0)
        ref = nn.LSTM(*module_input.constructor_input.args, **module_input.constructor_input.kwargs).to(dtype)
        ours = fused_s2s.LSTM(*module_input.constructor_input.args, **module_input.constructor_input.kwargs,
                              backend=backend).to(dtype)
        ours.load_state_dict(ref.state_dict())
        _assert_same(ref, ours, *module_input.forward_input.args, **module_input.forward_input.kwargs)


@pytest.mark.parametrize("backend,device,dtype", [p for p in parity_cases("lstm_cell", dtypes=[torch.float32])
                                                  if p.values[1] == "cpu" and p.values[0] != "native"])
def test_projected_cell_op_fake(backend, device, dtype):
    """The custom op's fake implementation gives what the kernel gives when h is (B, P)."""
    B, H, P = 3, 5, 2
    r = lambda *s: torch.randn(*s)  # noqa: E731
    args = (backend, r(B, 4 * H), r(B, P), r(B, H), r(4 * H, P), r(4 * H))
    torch.library.opcheck(torch.ops.fused_s2s.lstm_cell_fwd, args)


def test_proj_compiles_fullgraph():
    """No graph break at a projected LSTM either (lengths= on the device), same results as eager."""
    torch.manual_seed(0)
    lstm = fused_s2s.LSTM(3, 6, bidirectional=True, proj_size=2)

    def step(x, lengths):
        out, (h, c) = lstm(x, lengths=lengths)
        return out.square().sum() + h.sum() + c.sum()

    x, lengths = torch.randn(5, 2, 3), torch.tensor([5, 3])
    eager = step(x, lengths)
    eager_grads = torch.autograd.grad(eager, list(lstm.parameters()))
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x, lengths)
    torch.testing.assert_close(loss, eager)
    for a, b in zip(torch.autograd.grad(loss, list(lstm.parameters())), eager_grads):
        torch.testing.assert_close(a, b)


def test_proj_onnx_export_runs_in_onnxruntime():
    """ONNX export (dynamo) of a projected LSTM with lengths=: standard ops, eager's results."""
    from test_export import _onnxruntime
    onnxruntime = _onnxruntime()
    torch.manual_seed(0)
    lstm = fused_s2s.LSTM(4, 6, bidirectional=True, batch_first=True, proj_size=3, backend="cpp").eval()
    x, lengths = torch.randn(3, 5, 4), torch.tensor([5, 2, 4])
    with torch.no_grad():
        program = torch.onnx.export(lstm, (x, None), kwargs={"lengths": lengths}, dynamo=True, verbose=False,
                                    optimize=False)
        expected = _tensors(lstm(x, lengths=lengths))
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outputs = session.run(None, dict(zip(names, (x.numpy(), lengths.numpy()))))
    assert [o.shape for o in outputs] == [(3, 5, 6), (2, 3, 3), (2, 3, 6)]
    for ours, theirs in zip(outputs, expected):
        torch.testing.assert_close(torch.from_numpy(ours), theirs)
