"""The `native` backend gives nn's results exactly (the same PyTorch kernel runs on the same
weights), and `auto` does what the committed dispatch table says."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_s2s
from fused_s2s import functional as FS
from fused_s2s.backends import dispatch, layers, registry


def _pair(mode, **kw):
    torch.manual_seed(0)
    ref = getattr(nn, mode)(5, 7, **kw)
    ours = getattr(fused_s2s, mode)(5, 7, backend="native", **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _run(module, seed, *args, **kw):
    """Outputs and every gradient (input, states, parameters), flattened."""
    torch.manual_seed(seed)  # dropout draws from the same generator in both
    out, final = module(*args, **kw)
    data = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    finals = list(final) if isinstance(final, tuple) else [final]
    loss = sum((t * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() for t in [data] + finals)
    wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad] + list(module.parameters())
    return [data] + finals + list(torch.autograd.grad(loss, wrt))


def _assert_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
@pytest.mark.parametrize("layers,bidirectional,batch_first,bias,dropout", [
    (1, False, False, True, 0.0), (2, True, False, True, 0.4), (3, True, True, False, 0.0), (2, False, True, True, 0.5)])
def test_layers_equal_nn_bitwise(mode, layers, bidirectional, batch_first, bias, dropout):
    ref, ours = _pair(mode, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias,
                      dropout=dropout)
    d = 2 if bidirectional else 1
    x = torch.randn(4, 6, 5) if batch_first else torch.randn(6, 4, 5)
    h0 = torch.randn(layers * d, 4, 7)
    state = h0 if mode == "GRU" else (h0, torch.randn_like(h0))
    _assert_equal(_run(ours, 1, x.requires_grad_()), _run(ref, 1, x))  # dropout in training mode
    _assert_equal(_run(ours, 2, x, state), _run(ref, 2, x, state))
    lengths = torch.tensor([6, 2, 5, 1])
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    _assert_equal(_run(ours, 3, packed, state), _run(ref, 3, packed, state))
    ref.eval(), ours.eval()
    with torch.no_grad():
        _assert_equal(ours(x, state)[0:1], ref(x, state)[0:1])


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_unbatched_and_empty_batch(mode):
    ref, ours = _pair(mode, num_layers=2, bidirectional=True)
    x = torch.randn(6, 5, requires_grad=True)
    _assert_equal(_run(ours, 0, x), _run(ref, 0, x))
    h0 = torch.randn(4, 7)
    state = h0 if mode == "GRU" else (h0, torch.randn_like(h0))
    _assert_equal(_run(ours, 0, x, state), _run(ref, 0, x, state))
    empty = torch.randn(6, 0, 5)
    for a, b in zip(ours(empty), ref(empty)):
        a, b = (a, b) if isinstance(a, torch.Tensor) else (a[0], b[0])
        assert a.shape == b.shape
    # no time steps: PyTorch's kernel refuses, so native by name says why and auto runs ours
    with pytest.raises(fused_s2s.BackendUnavailable, match="at least one time step"):
        ours(torch.randn(0, 3, 5))
    ours.backend = "auto"
    assert ours(torch.randn(0, 3, 5))[0].shape == (0, 3, 14)


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_lengths_run_by_packing(mode, batch_first):
    """lengths= on native: the results of packing (what the kernel backends give too), rows
    of length 0 keeping their state and giving zero outputs."""
    ref, ours = _pair(mode, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn(4, 6, 5) if batch_first else torch.randn(6, 4, 5)
    h0 = torch.randn(4, 4, 7)
    state = h0 if mode == "GRU" else (h0, torch.randn_like(h0))
    for lengths in (torch.tensor([6, 2, 5, 1]), torch.tensor([6, 6, 6, 6])):
        out, final = ours(x, state, lengths=lengths)
        expected, expected_final = ref(pack_padded_sequence(x, lengths, batch_first=batch_first,
                                                            enforce_sorted=False), state)
        expected = pad_packed_sequence(expected, batch_first=batch_first, total_length=6)[0]
        assert torch.equal(out, expected)
        for a, b in zip(final if mode == "LSTM" else [final], expected_final if mode == "LSTM" else [expected_final]):
            assert torch.equal(a, b)
    cpp = getattr(fused_s2s, mode)(5, 7, num_layers=2, bidirectional=True, batch_first=batch_first, backend="torch")
    cpp.load_state_dict(ref.state_dict())
    lengths = torch.tensor([6, 0, 5, 1])
    for a, b in zip(_flat(ours(x, state, lengths=lengths)), _flat(cpp(x, state, lengths=lengths))):
        torch.testing.assert_close(a, b)


def _flat(result):
    out, final = result
    return [out] + (list(final) if isinstance(final, tuple) else [final])


@pytest.mark.parametrize("mode", ["GRUCell", "LSTMCell"])
@pytest.mark.parametrize("batched", [True, False])
def test_cells_equal_nn_bitwise(mode, batched):
    torch.manual_seed(0)
    ref = getattr(nn, mode)(5, 7)
    ours = getattr(fused_s2s, mode)(5, 7, backend="native")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5) if batched else torch.randn(5)
    h = torch.randn(*x.shape[:-1], 7)
    state = h if mode == "GRUCell" else (h, torch.randn_like(h))
    for args in ((x,), (x, state)):
        a, b = ours(*args), ref(*args)
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(u, v)
    a, b = ours(torch.randn(0, 5)), ref(torch.randn(0, 5))
    assert (a[0] if isinstance(a, tuple) else a).shape == (b[0] if isinstance(b, tuple) else b).shape == (0, 7)


def test_native_refuses_what_it_cannot_run():
    q, k, v = torch.randn(2, 4), torch.randn(2, 5, 4), torch.randn(4)
    with pytest.raises(fused_s2s.BackendUnavailable, match="native"):
        FS.additive_attention(q, k, v, k, backend="native")
    x, h, w_ih, w_hh = torch.randn(2, 3), torch.randn(2, 4), torch.randn(12, 3), torch.randn(12, 4)
    with pytest.raises(fused_s2s.BackendUnavailable, match="whole"):
        layers.gru_layer(x, h, w_ih, w_hh, None, None, (2,), False, backend="native")


def test_compile_traces_native_padded_and_falls_back_for_lengths():
    """torch.compile traces PyTorch's padded RNN (fullgraph); packed input and lengths= need
    host values, so under compile `auto` runs our per-step kernels there instead."""
    torch.manual_seed(0)
    gru = fused_s2s.GRU(4, 5, num_layers=2, bidirectional=True, backend="native")
    x, lengths = torch.randn(6, 3, 4), torch.tensor([6, 2, 4])
    compiled = torch.compile(lambda x: gru(x)[0], fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), gru(x)[0])
    gru.backend = "auto"
    compiled = torch.compile(lambda x, n: gru(x, lengths=n)[0], fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, lengths), gru(x, lengths=lengths)[0])


# ------------------------------------------------------------------------------- auto


SAMPLE = {"B=1": 1, "B<=16": 8, "B>16": 64, "H<=256": 64, "H>256": 512, "Tq=1": 1, "Tq>1": 8, "T=1": 1, "T>1": 30}


def _representative(cls: str):
    """(batch, hidden or Tq, training, steps) of a call inside a shape class (steps None where
    the class has no time steps: cells and attention)."""
    parts = cls.split(",")
    steps = SAMPLE[parts.pop(0)] if parts[0].startswith("T=") or parts[0].startswith("T>") else None
    batch = SAMPLE[parts[0]] if parts[0].startswith("B") else 4
    return batch, SAMPLE[parts[-2]], parts[-1] == "fwd+bwd", steps


def test_shape_classes_cover_their_names():
    for op in dispatch.OPS:
        for cls in dispatch.classes(op):
            batch, size, training, steps = _representative(cls)
            assert dispatch.shape_class(op, batch, size, training, steps) == cls
            assert (steps is not None) == (op in dispatch.LAYER_OPS)


def test_committed_table_is_what_auto_does():
    """Every entry of the table in force on CPU is what `auto` resolves for a call of its class
    (where the named backend can run here), and calls of unlisted classes get the default."""
    cpu = torch.device("cpu")
    table = dispatch.table_for(cpu)
    assert table is not None, "no committed CPU dispatch table (fused_s2s/backends/dispatch_cpu.py)"
    checked = 0
    for op in dispatch.OPS:
        for dtype_name, per_class in table["entries"].get(op, {}).items():
            dtype = getattr(torch, dtype_name)
            for cls in dispatch.classes(op):
                batch, size, training, steps = _representative(cls)
                entry = per_class.get(cls)
                want = entry["backend"] if entry else dispatch.default(op, cpu)
                if registry.unsupported_reason(want, dispatch.KERNEL_OP[op], cpu, dtype) is not None:
                    continue
                assert dispatch.choose("auto", op, cpu, dtype, batch, size, training, steps=steps) == want, (op, cls)
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_auto_module_runs_the_table_choice(monkeypatch, mode):
    """The module under auto runs PyTorch's kernel where the table says native, ours elsewhere."""
    cpu = torch.device("cpu")
    ref, ours = _pair(mode, num_layers=1)
    ours.backend = "auto"
    x = torch.randn(6, 4, 5)
    with torch.no_grad():
        for choice in ("native", "cpp"):
            monkeypatch.setattr(dispatch, "table_choice", lambda *a, c=choice: c)
            dispatch.reset()  # choose() remembers the table's earlier answers
            calls = []
            real = getattr(torch._VF, mode.lower())
            monkeypatch.setattr(torch._VF, mode.lower(), lambda *a, **k: calls.append(1) or real(*a, **k),
                                raising=False)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the normal choices never warn
                out = ours(x)[0]
            monkeypatch.undo()
            assert bool(calls) == (choice == "native")
            torch.testing.assert_close(out, ref(x)[0])
    assert dispatch.choose("auto", mode, cpu, torch.float32, 4, 7, False) in registry.NAMES


@pytest.mark.parametrize("mode", ["GRU", "LSTM"])
def test_one_step_layer_calls_run_native(monkeypatch, mode):
    """A layer call of one time step (a decoder stepping its nn.GRU) is a class the runner does
    not measure: under a table that picks ours for every sequence class, auto still runs
    PyTorch's kernel for it, and a patched module runs nn's own forward."""
    cpu = torch.device("cpu")
    per_class = {cls: {"backend": "cpp"} for cls in dispatch.classes(mode) if cls.startswith("T>1")}
    dispatch.reset()
    monkeypatch.setattr(dispatch, "_tables", [{"device_type": "cpu", "kind": "test",
                                               "entries": {mode: {"float32": per_class}}}])
    try:
        assert dispatch.choose("auto", mode, cpu, torch.float32, 32, 128, False, steps=30) == "cpp"
        assert dispatch.choose("auto", mode, cpu, torch.float32, 32, 128, False, steps=1) == "native"
        module = getattr(torch.nn, mode)(8, 8, batch_first=True)
        assert fused_s2s.patch(module) == [""]
        nn_forward, calls = module._nn_class.forward, []
        monkeypatch.setattr(module._nn_class, "forward", lambda *a: calls.append(1) or nn_forward(*a))
        with torch.no_grad():
            module(torch.randn(3, 1, 8))
            assert calls == [1], "a one-step call did not run nn's own forward"
            module(torch.randn(3, 5, 8))
            assert calls == [1], "a sequence call did not run the table's choice"
    finally:
        monkeypatch.undo()
        dispatch.reset()


def test_cuda_defaults_to_native_for_layers_and_cells():
    """With no GPU table committed, auto on CUDA means native for layers and cells."""
    cuda = torch.device("cuda", 0)
    if dispatch.table_for(cuda) is not None:
        pytest.skip("a CUDA table is in force here")
    for op in dispatch.LAYER_OPS + dispatch.CELL_OPS:
        assert dispatch.table_choice(op, cuda, torch.float32, 16, 512, True) == "native"
    assert dispatch.table_choice("additive_attention", cuda, torch.float32, 16, 1, True) == "torch"


def test_info_prints_the_table():
    assert "auto on cpu" in fused_s2s.info()


def test_dispatch_run_writes_a_table_auto_can_use(tmp_path):
    """The runner's --dispatch-table mode (quick configs, two cases): a loadable table with
    an entry per measured class, and the interleaved rows of both phases with their spread."""
    import importlib.util
    import json
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import run
    path = tmp_path / "dispatch_test.py"
    try:
        run.run_suite(["--device", "cpu", "--quick", "--compile", "off", "--filter", "cells/gru_cell/B=1,",
                       "--dispatch-table", str(path), "--out", str(tmp_path), "--name", "d"])
    finally:
        dispatch.reset()
    spec = importlib.util.spec_from_file_location("dispatch_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    entries = module.TABLE["entries"]["gru_cell"]["float32"]
    assert set(entries) == {"B=1,H<=256,fwd", "B=1,H<=256,fwd+bwd"}
    assert all(e["backend"] in ("native", "cpp") for e in entries.values())
    data = json.loads((tmp_path / "d.json").read_text())
    backends_seen = {r["backend"] for r in data["rows"]}
    assert {"ours:native", "ours:cpp", "ours:auto"} <= backends_seen
    assert all(r["vs_baseline"]["p20"] <= r["vs_baseline"]["median"] <= r["vs_baseline"]["p80"] for r in data["rows"])
    assert "load" in (tmp_path / "d.md").read_text()


def test_dispatch_table_rule():
    """A candidate replaces the default only where it is faster in nearly every round; for layers
    and cells it must also beat nn (the default's own kernel), for attention only the default."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import dispatch as runner

    def record(family, op, config, times):
        return dict(id=f"{family}/{op}", family=family, op=op, config=config, dtype="float32", passes="fwd",
                    load="0 0 0", results={n: dict(ms=t[0]) for n, t in times.items()}, times=times)
    steady = [1.0] * 10
    recs = [
        # attention: torch twice as fast as cpp, both slower than the naive code -> torch
        record("attention", "additive_attention", dict(B=64, Tq=1, Tk=50, A=512),
               {"ours:cpp": [2.0] * 10, "ours:torch": steady, "naive": [0.9] * 10}),
        # cells: cpp faster than native but not than nn -> native stays
        record("cells", "gru_cell", dict(B=1, H=256), {"ours:native": [2.0] * 10, "ours:cpp": steady,
                                                       "nn.GRUCell": [1.02] * 10}),
        # cells: cpp faster than both -> cpp
        record("cells", "lstm_cell", dict(B=1, H=256), {"ours:native": [2.0] * 10, "ours:cpp": steady,
                                                        "nn.LSTMCell": [2.0] * 10}),
        # dot attention: torch only 3% faster than cpp (inside the margin) -> cpp stays
        record("attention", "dot_attention", dict(B=64, Tq=1, Tk=50, A=512),
               {"ours:cpp": [1.03] * 10, "ours:torch": steady, "naive": steady}),
    ]
    table = runner.build_table(recs, torch.device("cpu"), {}, "test")["entries"]
    assert table["additive_attention"]["float32"]["Tq=1,fwd"]["backend"] == "torch"
    assert table["gru_cell"]["float32"]["B=1,H<=256,fwd"]["backend"] == "native"
    assert table["lstm_cell"]["float32"]["B=1,H<=256,fwd"]["backend"] == "cpp"
    assert table["dot_attention"]["float32"]["Tq=1,fwd"]["backend"] == "cpp"
