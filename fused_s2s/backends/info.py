"""The report of `python -m fused_s2s info` (and `fused_s2s.info()`): which backends load here
and why not, the dispatch table in force, and the persistent kernels built."""
from __future__ import annotations

import torch

from . import dispatch, persistent_autograd, registry


def describe() -> str:
    """Human-readable report for `python -m fused_s2s info`."""
    gpu = torch.cuda.is_available()
    lines = [f"torch {torch.__version__}, CUDA device: {torch.cuda.get_device_name() if gpu else 'none visible'}",
             f"default backend: {registry.get_backend()}",
             "cpu/cuda below: whether the backend has kernels for that device's tensors"
             + ("" if gpu else " (with no device here, nothing runs on CUDA)")]
    for name, reason in registry.available().items():
        if reason is not None:
            lines.append(f"  {name:7s} unavailable: {reason}")
            continue
        details = []
        if name == "cpp":
            details.append("CUDA kernels built" if getattr(registry.load(name), "has_cuda", False)
                           else "CPU kernels only")
        for dev in ("cpu", "cuda"):
            why = registry.unsupported_reason(name, "gru_cell", torch.device(dev), torch.float32)
            details.append(f"{dev}: {'yes' if why is None else 'no (' + why + ')'}")
        lines.append(f"  {name:7s} available; " + "; ".join(details))
    for dev, order in registry.AUTO_ORDER.items():
        lines += dispatch.describe(torch.device(dev))
        lines.append(f"  per-step kernels under auto on {dev}: tries {', '.join(order)}")
    built = {n: persistent_autograd._kernels(n)[0] for n in persistent_autograd.KERNEL_BACKENDS}
    on_cuda = [n for n, m in built.items() if m is not None and (n != "cpp" or m.has_cuda)]
    lines.append("whole-sequence GRU/LSTM layers: on CPU " + ("cpp (its C++ time loop)" if built["cpp"] else "none built")
                 + "; on CUDA " + (", ".join(on_cuda) or "none built")
                 + ("" if persistent_autograd.enabled else " (switched off: FUSED_S2S_PERSISTENT=0)"))
    return "\n".join(lines)
