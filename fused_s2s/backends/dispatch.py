"""What "auto" runs: per (device kind, op, dtype, shape class) the fastest verified backend,
from a table the benchmark runner measured on that kind of device and wrote as a module
`fused_s2s/backends/dispatch_<kind>.py` (`python -m bench --dispatch-table PATH`, see bench/README.md).

Ops: "GRU", "LSTM" (a whole module call: every layer and direction), "gru_cell", "lstm_cell"
(one step), "additive_attention", "dot_attention". Shape classes, few on purpose (each one is
a row group the runner measures, and resolution runs on every call):

- layers and cells: batch "B=1" | "B<=16" | "B>16", hidden size "H<=256" | "H>256", and
  "fwd" (no gradient needed) | "fwd+bwd" (training); layers also by time steps, "T=1" (a
  decoder stepping its RNN: the call's fixed cost is never repaid, and the runner measures no
  such class, so it keeps the default) | "T>1";
- attention: queries "Tq=1" (a decoder step) | "Tq>1" (all queries at once), and fwd | fwd+bwd.

Where no table or no entry covers a call, layers and cells run on `native` (PyTorch's own
fused kernels: what nn.GRU/nn.LSTM and the nn cells run, never a per-step loop slower than the
module replaced) and attention on the first kernel backend of `registry.AUTO_ORDER`.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import ops, registry

LAYER_OPS = ("GRU", "LSTM")
CELL_OPS = ("gru_cell", "lstm_cell")
ATTENTION_OPS = ("additive_attention", "dot_attention")
OPS = LAYER_OPS + CELL_OPS + ATTENTION_OPS
# the per-step primitive that a layer or cell op runs on a kernel backend
KERNEL_OP = {"GRU": "gru_cell", "LSTM": "lstm_cell", "gru_cell": "gru_cell", "lstm_cell": "lstm_cell",
             "additive_attention": "additive_attention", "dot_attention": "dot_attention"}
PASSES = ("fwd", "fwd+bwd")


def batch_class(batch: int) -> str:
    return "B=1" if batch <= 1 else ("B<=16" if batch <= 16 else "B>16")


def size_class(op: str, size: int) -> str:
    """Hidden size for layers and cells, queries per row (Tq) for attention."""
    if op in ATTENTION_OPS:
        return "Tq=1" if size <= 1 else "Tq>1"
    return "H<=256" if size <= 256 else "H>256"


def _one_step(steps: Optional[int]) -> bool:
    """Whether a layer call runs one time step; None: a sequence (the callers that do not say)."""
    return steps is not None and steps <= 1


def steps_class(steps: Optional[int]) -> str:
    return "T=1" if _one_step(steps) else "T>1"


def shape_class(op: str, batch: int, size: int, training: bool, steps: Optional[int] = None) -> str:
    """The class a call belongs to, as the tables name it, e.g. "T>1,B<=16,H>256,fwd+bwd"."""
    parts = [size_class(op, size), PASSES[bool(training)]]
    if op not in ATTENTION_OPS:
        parts.insert(0, batch_class(batch))
    if op in LAYER_OPS:
        parts.insert(0, steps_class(steps))
    return ",".join(parts)


def classes(op: str) -> List[str]:
    """Every shape class of `op`, in table order."""
    if op in ATTENTION_OPS:
        return [f"{q},{p}" for q in ("Tq=1", "Tq>1") for p in PASSES]
    cells = [f"{b},{h},{p}" for b in ("B=1", "B<=16", "B>16") for h in ("H<=256", "H>256") for p in PASSES]
    return [f"{t},{c}" for t in ("T=1", "T>1") for c in cells] if op in LAYER_OPS else cells


# ------------------------------------------------------------------------------- tables


def _load_tables() -> List[Dict[str, Any]]:
    """Every committed table module (fused_s2s/backends/dispatch_*.py), each a dict TABLE."""
    out = []
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name.startswith("dispatch_"):
            out.append(importlib.import_module(f"{__package__}.{info.name}").TABLE)
    return out


_tables: Optional[List[Dict[str, Any]]] = None
_in_force: Dict[Tuple[str, Optional[int]], Optional[Dict[str, Any]]] = {}
_choices: Dict[Tuple, str] = {}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device) if torch.cuda.is_available() else "no CUDA device"
    return device.type


def table_for(device: torch.device) -> Optional[Dict[str, Any]]:
    """The table in force for this device: the first whose device type matches and whose
    `name_contains` (if any) occurs in the device's name (e.g. "H100" in "NVIDIA H100 80GB HBM3")."""
    global _tables
    key = (device.type, device.index)
    if key not in _in_force:
        if _tables is None:
            _tables = _load_tables()
        name = device_name(device).lower()
        _in_force[key] = next((t for t in _tables if t["device_type"] == device.type
                               and t.get("name_contains", "").lower() in name), None)
    return _in_force[key]


def reset() -> None:
    """Forget the loaded tables and cached choices (after writing a new table, in tests)."""
    global _tables
    _tables = None
    _in_force.clear()
    _choices.clear()


def default(op: str, device: torch.device) -> str:
    """What "auto" runs where no table entry covers a call."""
    if op in ATTENTION_OPS:
        return registry.AUTO_ORDER.get(device.type, ("torch",))[0]
    return "native"


def _class_key(op: str, device: torch.device, dtype: torch.dtype, batch: int, size: int, training: bool,
               steps: Optional[int]) -> Tuple:
    """shape_class's answer as a cheap key (it runs on every call): what _choices remembers."""
    return (op, device, dtype, 0 if batch <= 1 else (1 if batch <= 16 else 2),
            size <= (1 if op in ATTENTION_OPS else 256), training,
            op in LAYER_OPS and _one_step(steps))


def table_choice(op: str, device: torch.device, dtype: torch.dtype, batch: int, size: int,
                 training: bool, steps: Optional[int] = None) -> str:
    """The backend the table in force names for this call's class (or the default)."""
    key = _class_key(op, device, dtype, batch, size, training, steps)
    choice = _choices.get(key)
    if choice is None:
        table = table_for(device)
        entry = None
        if table is not None:
            entry = table["entries"].get(op, {}).get(str(dtype).replace("torch.", ""), {}).get(
                shape_class(op, batch, size, training, steps))
        choice = _choices[key] = entry["backend"] if entry else default(op, device)
    return choice


def choose(requested: Optional[str], op: str, device: torch.device, dtype: torch.dtype, batch: int, size: int,
           training: bool, native_reason: Optional[str] = None, steps: Optional[int] = None) -> str:
    """The backend that runs one layer, cell or attention call: "native", or a kernel backend
    name (or "auto" for the kernel-level choice of `registry.resolve`, which checks it and
    warns once when it falls back). `native_reason`: why PyTorch's kernel cannot take this
    particular call (packed input under torch.compile, ...), or None. `steps`: a layer call's
    time steps (None: several). A process-wide "native"
    (set_backend, $FUSED_S2S_BACKEND) leaves attention to auto; asked for by name on attention,
    it raises BackendUnavailable."""
    name = registry.check_name(requested) if requested is not None else registry.get_backend()
    if name == "auto" and native_reason is None and \
            _choices.get(_class_key(op, device, dtype, batch, size, training, steps)) == "native":
        return "native"  # the common call, one lookup when seen before
    if name == "native" and requested is None and op in ATTENTION_OPS:
        name = "auto"  # a process-wide native means PyTorch's kernels where it has them: not for attention
    if name == "native":
        reason = native_reason or registry.unsupported_reason("native", KERNEL_OP[op], device, dtype)
        if reason is not None:
            raise registry.BackendUnavailable(f"backend 'native' cannot run {op} on {device.type}/{dtype}: {reason}")
        return name
    if name != "auto":
        return name
    choice = table_choice(op, device, dtype, batch, size, training, steps)
    if choice == "native":
        return "native" if native_reason is None else "auto"
    if op not in ATTENTION_OPS and native_reason is None and torch.jit.is_tracing():
        return "native"  # torch.jit.trace records PyTorch's RNN ops as it does nn's, not our kernels
    if registry.unsupported_reason(choice, KERNEL_OP[op], device, dtype) is None:
        return choice
    return "native" if op not in ATTENTION_OPS and native_reason is None else "auto"


def kernel_backend(requested: Optional[str], op: str, t: torch.Tensor, largest: int) -> str:
    """The kernel backend that runs a per-step primitive of `op` on tensors like `t`, the
    largest of which has `largest` elements (see registry.resolve). While exporting to ONNX,
    the `torch` backend whatever was asked (the graph holds standard ops)."""
    if torch.jit.is_tracing():  # it would record a kernel's outputs as constants, or fail obscurely
        raise RuntimeError("torch.jit.trace cannot record fused_s2s's ops: use torch.export.export, or "
                           "torch.onnx.export(..., dynamo=True) for ONNX")
    if ops.exporting_onnx():
        return "torch"
    return registry.resolve(requested, op, t.device, t.dtype, largest)


def describe(device: torch.device) -> List[str]:
    """Lines for `python -m fused_s2s info`: the table in force on `device`, or the default."""
    table = table_for(device)
    if table is None:
        return [f"auto on {device.type}: no measured table for {device_name(device)!r}; layers and cells run "
                f"on native, attention on {default('additive_attention', device)}"]
    m = table.get("measured", {})
    lines = [f"auto on {device.type}: table {table['kind']!r} (measured {m.get('date', '?')} on "
             f"{m.get('device', '?')}, torch {m.get('torch', '?')}, {m.get('threads', '?')} threads)"]
    for op in OPS:
        for dtype, per_class in table["entries"].get(op, {}).items():
            cells = [f"{cls} {e['backend']}" + (f" ({e['speedup']:.2f}x {e['baseline']})" if e.get("speedup") else "")
                     for cls, e in per_class.items()]
            lines.append(f"  {op} {dtype}: " + "; ".join(cells))
    lines.append("  (x: the baseline's time / the chosen backend's, measured; classes not listed: layers and "
                 f"cells native, attention {default('additive_attention', device)})")
    return lines
