"""The GPU suite's highest-risk checks, run first on a GPU (see bench/gpu_suite.sh): the CUDA
persistent kernels on chunked plans and under barrier stress, against nn.GRU/nn.LSTM, and the
Triton attention with values wider than its forward keeps on chip, in bfloat16 too (which no
CPU run can execute: Triton's interpreter refuses it). Each check prints one line that the
suite's verdict reads:

    CHECK <family> ok|FAIL|SKIP <case>[: detail]

    python bench/gpu_checks.py                # every check
    python bench/gpu_checks.py --list         # their names
    python bench/gpu_checks.py --only 'stress|chunked'  # the checks whose name matches

Exit status 1 when a check fails. Tolerances are the parity suite's rule (twice the error of
the same computation in plain PyTorch at the same precision, against float64).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
import traceback
from typing import Callable, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # conftest's tolerance rule

import torch  # noqa: E402

DEVICE = "cuda"


def _layer_run(cell: str, dtype, steps: int, batch: int, hidden: int, *, backward: bool, seed: int = 0,
               max_rows_per_block: int = 16, backend: str = "cpp", nn_module: bool = False):
    """One layer direction through the persistent layer function (or the nn module with the same
    weights): outputs and, with backward, the gradients of x, h0 (c0) and every parameter."""
    from fused_s2s.backends import persistent_autograd as PA

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    torch.manual_seed(seed)
    ref = (torch.nn.GRU if cell == "gru" else torch.nn.LSTM)(hidden, hidden).to(DEVICE, torch.float64)
    module = ref.to(dtype)
    x = (torch.randn(steps, batch, hidden, generator=g, device=DEVICE, dtype=torch.float64) * 0.5).to(dtype)
    states = [(torch.randn(batch, hidden, generator=g, device=DEVICE, dtype=torch.float64) * 0.5).to(dtype)
              for _ in range(1 if cell == "gru" else 2)]
    leaves = [x] + states + list(module.parameters())
    leaves = [t.detach().clone().requires_grad_(backward) for t in leaves]
    x, states, params = leaves[0], leaves[1:1 + len(states)], leaves[1 + len(states):]
    if nn_module:
        state = states[0][None] if cell == "gru" else tuple(s[None] for s in states)
        names = [n for n, _ in module.named_parameters()]
        out, final = torch.func.functional_call(module, dict(zip(names, params)), (x, state))
        finals = [final[0]] if cell == "gru" else [f[0] for f in final]
    else:
        w_ih, w_hh, b_ih, b_hh = params
        if cell == "gru":
            out, h_n = PA.persistent_gru_layer(x, states[0], w_ih, w_hh, b_ih, b_hh,
                                               max_rows_per_block=max_rows_per_block, backend=backend)
            finals = [h_n]
        else:
            out, h_n, c_n = PA.persistent_lstm_layer(x, states[0], states[1], w_ih, w_hh, b_ih, b_hh,
                                                     max_rows_per_block=max_rows_per_block, backend=backend)
            finals = [h_n, c_n]
    results = {"out": out, **{f"state{i}": f for i, f in enumerate(finals)}}
    if backward:
        grads = [torch.randn(t.shape, generator=g, device=DEVICE, dtype=torch.float64).to(dtype)
                 for t in results.values()]
        loss = sum((t * gt).sum() for t, gt in zip(results.values(), grads))
        wrt = [x] + states + params
        for name, grad in zip(["x"] + [f"state{i}" for i in range(len(states))] + ["w_ih", "w_hh", "b_ih", "b_hh"],
                              torch.autograd.grad(loss, wrt)):
            results[f"grad {name}"] = grad
    return {k: v.detach() for k, v in results.items()}


def _against_nn(cell: str, dtype, steps: int, batch: int, hidden: int, backward: bool, **knobs) -> str:
    """Persistent layer vs nn in float64 and nn in `dtype` (the tolerance's yardstick)."""
    from conftest import assert_close_to_reference
    from fused_s2s.backends import persistent_autograd as PA

    probe = torch.empty(steps, batch, hidden, device=DEVICE, dtype=dtype)
    reason = PA.persistent_layer_available(cell.upper(), probe, hidden, training=backward, **knobs)
    if reason is not None:
        raise RuntimeError(f"not on the persistent kernels: {reason}")
    ours = _layer_run(cell, dtype, steps, batch, hidden, backward=backward, **knobs)
    knobs.pop("max_rows_per_block", None)
    ref = _layer_run(cell, torch.float64, steps, batch, hidden, backward=backward, nn_module=True)
    plain = _layer_run(cell, dtype, steps, batch, hidden, backward=backward, nn_module=True)
    worst = 0.0
    for name in ref:
        assert_close_to_reference(ours[name], ref[name], plain[name], name)
        worst = max(worst, (ours[name].double() - ref[name]).abs().max().item())
    return f"max error {worst:.2e} over {len(ref)} outputs/gradients"


def _stress(rows_per_block: int) -> Callable[[], str]:
    def run() -> str:
        """GRU bf16 H=1024 B=64 T=2048 fwd+bwd three times: bitwise the same (a barrier that lets
        a block run ahead shows as a difference), and close to nn.GRU."""
        knobs = dict(max_rows_per_block=rows_per_block)
        first = _layer_run("gru", torch.bfloat16, 2048, 64, 1024, backward=True, **knobs)
        for repeat in range(2):
            again = _layer_run("gru", torch.bfloat16, 2048, 64, 1024, backward=True, **knobs)
            differ = [k for k in first if not torch.equal(first[k], again[k])]
            if differ:
                raise AssertionError(f"run {repeat + 2} differs bitwise from run 1 in {', '.join(differ)}")
        return "3 runs bitwise equal; " + _against_nn("gru", torch.bfloat16, 2048, 64, 1024, True, **knobs)
    return run


def _triton_attention(dtype, tq: int, dv: int) -> Callable[[], str]:
    def run() -> str:
        """Both Triton attention ops, forward and backward, against the contract's reference in
        float64 (tolerance: twice the reference's own error in `dtype`)."""
        from conftest import assert_close_to_reference
        from fused_s2s.backends import registry, torch_backend as ref

        tk = registry.load("triton")
        g = torch.Generator(device=DEVICE).manual_seed(0)
        r = lambda *shape: torch.randn(*shape, generator=g, device=DEVICE, dtype=torch.float64).to(dtype)  # noqa: E731
        q, k, v, values = r(3, tq, 64), r(3, 300, 64), r(64), r(3, 300, dv)
        mask = torch.rand(3, 300, generator=g, device=DEVICE) > 0.2
        lengths = torch.tensor([300, 7, 150], device=DEVICE)
        grad_context, grad_weights = r(3, tq, dv), r(3, tq, 300)
        up = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
        worst = 0.0
        for name, extra, scale in (("additive_attention", (v,), ()), ("dot_attention", (), (0.125,))):
            fwd_in = (q, k, *extra, values, mask, lengths, None, *scale)
            fwd = getattr(tk, f"{name}_fwd")(*fwd_in)
            fwd_ref = getattr(ref, f"{name}_fwd")(*map(up, fwd_in))
            fwd_plain = getattr(ref, f"{name}_fwd")(*fwd_in)
            bwd_in = (grad_context, grad_weights, *fwd_in, fwd[1], fwd[2])
            bwd = getattr(tk, f"{name}_bwd")(*bwd_in)
            bwd_ref = getattr(ref, f"{name}_bwd")(*map(up, bwd_in))
            bwd_plain = getattr(ref, f"{name}_bwd")(*bwd_in)
            for i, (o, r64, p) in enumerate(zip(fwd + bwd, fwd_ref + bwd_ref, fwd_plain + bwd_plain)):
                r64, p = r64.to(o.device), p.to(o.device)
                finite = torch.isfinite(r64)  # lse = -inf where a row has no valid position
                assert torch.equal(o[~finite].double(), r64[~finite]), f"{name} output {i}: non-finite entries differ"
                assert_close_to_reference(o[finite], r64[finite], p[finite], f"{name} output {i}")
                worst = max(worst, (o[finite].double() - r64[finite]).abs().max().item())
        return f"max error {worst:.2e}"
    return run


def _triton_persistent_shared_memory() -> str:
    """The Triton persistent route's shared-memory precheck compiles for this device and gets
    the numbers (it gives up silently where it cannot, so this is where a failure shows)."""
    from fused_s2s.backends import registry

    pr = registry.load("triton").persistent_rnn
    index = torch.cuda.current_device()
    need = pr._shared_memory(pr._backward_kernel, True, torch.float32, 64, index)
    limit = pr._shared_memory_limit(index)
    if not 0 < need < 256 * 1024 or not 48 * 1024 <= limit <= 256 * 1024:
        raise AssertionError(f"implausible: LSTM backward fp32 H=64 needs {need} bytes, the device allows {limit}")
    reason = pr.persistent_reason(torch.device("cuda", index), torch.float32, 64, "lstm", backward=True)
    if (need > limit) != (reason is not None):
        raise AssertionError(f"needs {need} of {limit} bytes, but the reason is {reason!r}")
    return f"LSTM backward fp32 H=64 needs {need} bytes of shared memory, the device allows {limit}"


# (family, name, check)
CHECKS: List[Tuple[str, str, Callable[[], str]]] = [
    ("cuda-persistent", "chunked LSTM bwd fp32 H=1024 B=32 T=64",
     lambda: _against_nn("lstm", torch.float32, 64, 32, 1024, True)),
    ("cuda-persistent", "chunked GRU bwd fp32 H=1024 B=16 T=64",
     lambda: _against_nn("gru", torch.float32, 64, 16, 1024, True)),
    ("cuda-persistent", "chunked GRU fwd fp16 H=2048 B=16 T=64",
     lambda: _against_nn("gru", torch.float16, 64, 16, 2048, False)),
    ("cuda-persistent", "barrier stress GRU bf16 H=1024 B=64 T=2048", _stress(16)),
    ("cuda-persistent", "barrier stress GRU bf16 H=1024 B=64 T=2048, one row per block", _stress(1)),
] + [("triton-attention", f"triton attention {str(dtype)[6:]} Tq={tq} Dv={dv}", _triton_attention(dtype, tq, dv))
     for dtype in (torch.bfloat16, torch.float32) for tq in (1, 20) for dv in (300, 4096)] + [
    ("triton-persistent", "triton persistent shared-memory precheck", _triton_persistent_shared_memory)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print the checks' names and exit")
    p.add_argument("--only", default="", help="run the checks whose name contains this text")
    args = p.parse_args(argv)
    checks = [c for c in CHECKS if re.search(args.only, c[1])]
    if args.list:
        print("\n".join(f"{family} {name}" for family, name, _ in checks))
        return 0
    failed = 0
    for family, name, fn in checks:
        if not torch.cuda.is_available():
            print(f"CHECK {family} SKIP {name}: no CUDA device", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            detail = fn()
            print(f"CHECK {family} ok {name}: {detail} ({time.perf_counter() - t0:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported, the next check still runs
            failed += 1
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(f"CHECK {family} FAIL {name}: {type(e).__name__}: {first}", flush=True)
            traceback.print_exc()
        finally:
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
