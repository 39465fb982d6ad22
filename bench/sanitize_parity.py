"""A small parity script for compute-sanitizer (memcheck, racecheck): one small call of each
op, forward and backward, on every backend present, checked against fused_s2s.backends.reference in
float64.

    compute-sanitizer --tool memcheck python bench/sanitize_parity.py
    python bench/sanitize_parity.py --device cpu

Shapes are odd on purpose (H=33, A=33, Dv=17, B=3) and the calls cover a fully masked row,
`lengths`, `kv_batch_idx` (beams sharing a source) and a packed sequence whose batch shrinks
step by step (through the persistent whole-sequence kernels and the per-step ones), so a kernel
that reads or writes past a row, a mask or a tile shows up. The
tolerances are loose: the parity tests hold the precise ones; this script exists to run every
kernel under the sanitizer. Exit status 1 on a mismatch or an error.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import fused_s2s  # noqa: E402
import fused_s2s.functional as F  # noqa: E402
from fused_s2s.backends import persistent_autograd, reference, registry  # noqa: E402

TOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float64: 1e-7}

# (name, the op it needs from a backend, make(generator) -> float64 inputs,
#  run(inputs, backend or None for the reference) -> (outputs, parameters to differentiate too))
Run = Callable[[Dict[str, Tensor], Optional[str]], Tuple[Sequence[Tensor], Sequence[Tensor]]]
Check = Tuple[str, str, Callable[[torch.Generator], Dict[str, Tensor]], Run]


def _rand(gen: torch.Generator, *shape: int, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def _cell_inputs(gates: int, lstm: bool):
    def make(gen):
        B, I, H = 3, 20, 33
        d = dict(x=_rand(gen, B, I), h=_rand(gen, B, H), w_ih=_rand(gen, gates * H, I, scale=H ** -0.5),
                 w_hh=_rand(gen, gates * H, H, scale=H ** -0.5), b_ih=_rand(gen, gates * H, scale=0.1),
                 b_hh=_rand(gen, gates * H, scale=0.1))
        if lstm:
            d["c"] = _rand(gen, B, H)
        return d
    return make


def _gru_cell(d, backend):
    args = (d["x"], d["h"], d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"])
    return (reference.gru_cell(*args) if backend is None else F.gru_cell(*args, backend=backend),), ()


def _lstm_cell(d, backend):
    args = (d["x"], (d["h"], d["c"]), d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"])
    return (reference.lstm_cell(*args) if backend is None else F.lstm_cell(*args, backend=backend)), ()


def _attention_inputs(additive: bool, step: bool):
    def make(gen):
        B, Bk, Tq, Tk, A, Dv = (4, 2, 1, 6, 33, 17) if step else (3, 3, 2, 5, 33, 17)
        d = dict(q=_rand(gen, B, A) if step else _rand(gen, B, Tq, A), k=_rand(gen, Bk, Tk, A),
                 values=_rand(gen, Bk, Tk, Dv))
        if additive:
            d["v"] = _rand(gen, A, scale=A ** -0.5)
        return d
    return make


def _masking(d, step: bool):
    """Step calls: lengths and kv_batch_idx (beams); others: a mask with one empty row."""
    dev = d["q"].device
    if step:
        return dict(lengths=torch.tensor([6, 3], device=dev), kv_batch_idx=torch.tensor([0, 0, 1, 1], device=dev))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool, device=dev)
    return dict(mask=mask)


def _additive(step: bool):
    def run(d, backend):
        args = (d["q"], d["k"], d["v"], d["values"])
        kw = _masking(d, step)
        return (reference.additive_attention(*args, **kw) if backend is None else
                F.additive_attention(*args, **kw, backend=backend)), ()
    return run


def _dot(step: bool):
    def run(d, backend):
        args = (d["q"], d["k"], d["values"])
        kw = dict(_masking(d, step), scale=0.3)
        return (reference.dot_attention(*args, **kw) if backend is None else
                F.dot_attention(*args, **kw, backend=backend)), ()
    return run


def _layer_inputs(gen):
    return dict(x=_rand(gen, 3, 4, 20))  # (B, T, I), batch_first


def _layer(cls_name: str, layout: str):
    """A bidirectional layer over a packed batch that shrinks from 3 rows to 1 ("packed"; on
    CUDA with cpp: the persistent kernels), the same forced onto the per-step kernels
    ("per-step"), or padded input with lengths= ("lengths"; the reference packs it)."""
    def run(d, backend):
        x = d["x"]
        torch.manual_seed(0)  # the same float64 weights for the reference and every backend
        m = getattr(torch.nn, cls_name)(20, 33, batch_first=True, bidirectional=True, dtype=torch.float64)
        if backend is not None:
            ours = getattr(fused_s2s, cls_name)(20, 33, batch_first=True, bidirectional=True, backend=backend)
            ours.load_state_dict(m.state_dict())
            m = ours
        m = m.to(x.device, x.dtype)
        lengths = torch.tensor([4, 2, 1])
        if layout == "lengths" and backend is not None:
            out, _ = m(x, lengths=lengths)
            return (out,), tuple(m.parameters())
        previous, persistent_autograd.enabled = persistent_autograd.enabled, layout != "per-step"
        try:
            out, _ = m(pack_padded_sequence(x, lengths, batch_first=True))
        finally:
            persistent_autograd.enabled = previous
        if layout == "lengths":  # the reference: padded back, zeros past each length
            return (pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0],), tuple(m.parameters())
        return (out.data,), tuple(m.parameters())
    return run


CHECKS: List[Check] = [
    ("gru_cell", "gru_cell", _cell_inputs(3, False), _gru_cell),
    ("lstm_cell", "lstm_cell", _cell_inputs(4, True), _lstm_cell),
    ("additive_attention", "additive_attention", _attention_inputs(True, False), _additive(False)),
    ("additive_attention step+beams", "additive_attention", _attention_inputs(True, True), _additive(True)),
    ("dot_attention", "dot_attention", _attention_inputs(False, False), _dot(False)),
    ("dot_attention step+beams", "dot_attention", _attention_inputs(False, True), _dot(True)),
] + [(f"{cls} {layout} bidirectional", f"{cls.lower()}_cell", _layer_inputs, _layer(cls, layout))
     for cls in ("GRU", "LSTM") for layout in ("packed", "per-step", "lengths")]


def _fwd_bwd(run: Run, d: Dict[str, Tensor], backend: Optional[str]) -> List[Tensor]:
    """Outputs, then the gradients of every input and parameter for fixed random output grads."""
    outs, params = run(d, backend)
    gen = torch.Generator().manual_seed(1)
    grads_out = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outs]
    wrt = [t for t in d.values() if t.requires_grad] + list(params)
    grads = torch.autograd.grad(outs, wrt, grads_out, allow_unused=True)
    return [o.detach() for o in outs] + [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default=",".join(registry.NAMES), help="comma-separated (default: all present)")
    p.add_argument("--dtypes", default=None, help="comma-separated (default: float32,bfloat16 on CUDA; float32 on CPU)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    names = args.dtypes.split(",") if args.dtypes else (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    dtypes = [getattr(torch, n) for n in names]

    failures, checks, skipped = 0, 0, 0
    for backend in args.backends.split(","):
        try:
            registry.load(backend)
        except Exception as e:
            print(f"SKIP {backend}: {e}")
            continue
        for dtype in dtypes:
            for name, op, make, run in CHECKS:
                reason = registry.unsupported_reason(backend, op, device, dtype)
                label = f"{backend:6s} {str(dtype).replace('torch.', ''):8s} {name}"
                if reason is not None:
                    skipped += 1
                    print(f"SKIP {label}: {reason}")
                    continue
                checks += 1
                gen = torch.Generator().manual_seed(0)
                base = make(gen)
                try:
                    ours = _fwd_bwd(run, {k: v.to(device, dtype).requires_grad_() for k, v in base.items()}, backend)
                    want = _fwd_bwd(run, {k: v.to(device).requires_grad_() for k, v in base.items()}, None)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    worst = 0.0
                    for got, ref in zip(ours, want):
                        err = (got.double() - ref).abs() / (1 + ref.abs())
                        worst = max(worst, float(err.max()) if err.numel() else 0.0)
                    ok = len(ours) == len(want) and worst <= TOL[dtype]
                    print(f"{'ok  ' if ok else 'FAIL'} {label}: max error {worst:.2e} (tolerance {TOL[dtype]:.0e})")
                except Exception as e:
                    ok = False
                    print(f"FAIL {label}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
                failures += not ok
    print(f"sanitize_parity: {checks} checks, {failures} failed, {skipped} skipped on {device}")
    return 1 if failures or not checks else 0


if __name__ == "__main__":
    sys.exit(main())
