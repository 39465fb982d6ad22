"""Deployment export: torch.onnx.export(dynamo=True) gives an ONNX graph of standard ops that
onnxruntime runs with eager's outputs, whichever backend the modules ask for; torch.export keeps
our custom ops; torch.jit.trace is refused with a message naming the way that works."""
import os

import pytest
import torch
from torch import nn

import fused_s2s


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:  # the `test` extra installs it (CI must have it); a bare machine may not
        if os.environ.get("CI"):
            raise
        pytest.skip("onnxruntime is not installed (pip install -e '.[test]')")
    return onnxruntime


class GRUAttention(nn.Module):
    """A bidirectional 2-layer GRU encoder over padded input with lengths=, and an additive
    attention read over it."""
    source = "lengths"

    def __init__(self, backend):
        super().__init__()
        self.gru = fused_s2s.GRU(4, 6, num_layers=2, bidirectional=True, batch_first=True, backend=backend)
        self.attention = fused_s2s.BahdanauAttention(12, 12, 5, backend=backend)

    def forward(self, x, lengths):
        out, h = self.gru(x, lengths=lengths)
        return self.attention(torch.cat([h[-2], h[-1]], dim=-1), out, lengths=lengths)


class LSTMDecoderStep(nn.Module):
    """An LSTM encoder, one decoder step through both cells (one of them a patched nn.GRUCell)
    and both Luong scores, with a mask."""
    source = "mask"

    def __init__(self, backend):
        super().__init__()
        self.lstm = fused_s2s.LSTM(4, 6, batch_first=True, backend=backend)
        self.gru_cell = nn.GRUCell(6, 6)
        fused_s2s.patch(self, backend=backend)
        self.lstm_cell = fused_s2s.LSTMCell(6, 6, backend=backend)
        self.general = fused_s2s.LuongAttention(6, 6, score="general", backend=backend)
        self.dot = fused_s2s.LuongAttention(6, 6, score="dot", scale=0.5, backend=backend)

    def forward(self, x, mask):
        out, (h, c) = self.lstm(x)
        q = self.gru_cell(out[:, -1], h[0])
        h2, c2 = self.lstm_cell(q, (h[0], c[0]))
        context, weights = self.general(h2, out, mask=mask)
        context2, _ = self.dot(context, out, mask=mask)
        return context2, weights, c2


def _inputs(model, batch):
    """(x (batch, 4, 4), the model's source lengths or mask), with ragged lengths."""
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 4, 4, generator=g)
    lengths = torch.randint(1, 5, (batch,), generator=g)
    lengths[0] = 4
    return x, lengths if model.source == "lengths" else torch.arange(4) < lengths[:, None]


@pytest.mark.parametrize("model_class,backend", [(GRUAttention, "cpp"), (LSTMDecoderStep, "triton")])
def test_onnx_export_runs_in_onnxruntime(model_class, backend):
    """Exported with a dynamic batch size: the graph runs at the example's and at another."""
    onnxruntime = _onnxruntime()
    torch.manual_seed(0)
    model = model_class(backend).eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    with torch.no_grad():
        # optimize=False: half the export time here; the default (True) gives the same results
        program = torch.onnx.export(model, _inputs(model, 3), dynamo=True, verbose=False, optimize=False,
                                    dynamic_shapes=({0: batch}, {0: batch}))
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for size in (3, 5):
        inputs = _inputs(model, size)
        with torch.no_grad():
            expected = model(*inputs)
        outputs = session.run(None, dict(zip(names, (t.numpy() for t in inputs))))
        assert len(outputs) == len(expected)
        for ours, theirs in zip(outputs, expected):
            torch.testing.assert_close(torch.from_numpy(ours), theirs)
    assert model(*inputs)[0].grad_fn is not None  # eager use after the export is untouched


def test_torch_export_keeps_the_custom_ops():
    torch.manual_seed(0)
    model = GRUAttention("cpp").eval()
    inputs = _inputs(model, 3)
    program = torch.export.export(model, inputs)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"fused_s2s.gru_cell_fwd.default", "fused_s2s.additive_attention_fwd.default"} <= targets
    for ours, theirs in zip(program.module()(*inputs), model(*inputs)):
        torch.testing.assert_close(ours, theirs)


def _patched_gru():
    model = nn.Sequential(nn.GRU(4, 6))
    fused_s2s.patch(model)
    return model


@pytest.mark.parametrize("make,args", [
    (lambda: fused_s2s.GRU(4, 6, backend="torch"), (torch.randn(5, 2, 4),)),
    (lambda: fused_s2s.LSTMCell(4, 6, backend="cpp"), (torch.randn(2, 4),)),
    (lambda: fused_s2s.BahdanauAttention(6, 6, 5), (torch.randn(2, 6), torch.randn(2, 3, 6))),
], ids=["gru", "lstm_cell", "attention"])
def test_jit_trace_is_refused_naming_torch_export(make, args):
    with pytest.raises(RuntimeError, match=r"torch\.jit\.trace cannot record fused_s2s.*torch\.export\.export"):
        torch.jit.trace(make(), args, check_trace=False)


@pytest.mark.parametrize("make,args", [
    (lambda: fused_s2s.LSTMCell(4, 6), (torch.randn(2, 4),)),
    (_patched_gru, (torch.randn(5, 2, 4),)),
], ids=["lstm_cell", "patched_gru"])
def test_jit_trace_records_pytorch_rnn_ops_under_auto(make, args):
    """Under "auto" a traced layer or cell runs PyTorch's own kernel (what nn's modules trace to)."""
    module = make()
    traced = torch.jit.trace(module, args, check_trace=False)
    new = tuple(torch.randn_like(a) for a in args)  # a trace that recorded constants would fail this
    for a, b in zip(torch.utils._pytree.tree_leaves(traced(*new)), torch.utils._pytree.tree_leaves(module(*new))):
        torch.testing.assert_close(a, b)
