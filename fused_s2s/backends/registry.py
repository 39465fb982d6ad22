"""Which backends exist here, and which one runs a given call.

A backend is a module exposing the eight primitives of the kernel contract
(see `fused_s2s.backends.torch_backend`):

| name     | module                        | runs on                                          |
|----------|-------------------------------|--------------------------------------------------|
| `torch`  | backends.torch_backend        | anywhere (plain PyTorch ops)                     |
| `cpp`    | fused_s2s._C (compiled)       | CPU (float32/64, bfloat16/float16) and, when built with CUDA, GPU |
| `triton` | fused_s2s.triton_kernels      | CUDA tensors; CPU tensors under TRITON_INTERPRET=1 |
| `native` | torch._VF (PyTorch's own)     | wherever nn.GRU/nn.LSTM/nn cells run; layers and cells only |

Selection, first match wins: the `backend=` argument of a function or module, then
`set_backend()`, then the FUSED_S2S_BACKEND environment variable, then "auto". A backend asked
for by name that cannot take a call raises `BackendUnavailable` saying why. "auto" runs what
the measured table of `fused_s2s.backends.dispatch` names for the call (layers and cells: `native` where
nothing is measured); for the per-step primitives it tries the verified kernel backends of
AUTO_ORDER and falls back to `torch` with one warning per reason.

`native` is not a kernel backend: it has none of the primitives. The modules and the cell
functions call PyTorch's fused RNN and cell kernels (torch._VF, as nn does) on our weights,
which are in nn's layout.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional, Tuple

import torch

NAMES = ("torch", "cpp", "triton", "native")
KERNEL_NAMES = NAMES[:3]  # the backends that implement the primitives
OPS = ("gru_cell", "lstm_cell", "additive_attention", "dot_attention")
PRIMITIVES = tuple(f"{op}_{part}" for op in OPS for part in ("fwd", "bwd"))

# What "auto" tries, per device type. A kernel backend joins a device's list only once the
# parity suite has passed for it on that device: the CUDA kernels have not yet been run on a
# GPU, so on CUDA "auto" means `torch` until they are.
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cpu": ("cpp", "torch"),
    "cuda": ("torch",),
}


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot run here, or cannot take this call."""


_process_backend: Optional[str] = None
_loaded: Dict[str, ModuleType] = {}
_load_errors: Dict[str, str] = {}
_warned: set = set()


def check_name(name: str, what: str = "backend") -> str:
    if not isinstance(name, str) or name not in NAMES + ("auto",):
        raise ValueError(f"{what} must be one of {('auto',) + NAMES}, got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend ("auto", "torch", "cpp", "triton"); None resets."""
    global _process_backend
    _process_backend = None if name is None else check_name(name)


def get_backend() -> str:
    """The process-wide default: set_backend(), else $FUSED_S2S_BACKEND, else "auto"."""
    if _process_backend is not None:
        return _process_backend
    env = _backend_env()
    return check_name(env, "FUSED_S2S_BACKEND") if env else "auto"


_ENV_DATA = getattr(os.environ, "_data", None)  # CPython's dict under os.environ
_ENV_KEY = os.environ.encodekey("FUSED_S2S_BACKEND") if _ENV_DATA is not None else None


def _backend_env() -> Optional[str]:
    """$FUSED_S2S_BACKEND, read without os.environ.get's cost for a missing name (a KeyError
    raised and caught: ~3 us on a busy CPU, more than a cell step's whole dispatch), since
    this runs on every call; os.environ writes go to the same dict, so changes are seen."""
    if _ENV_DATA is None:
        return os.environ.get("FUSED_S2S_BACKEND")
    value = _ENV_DATA.get(_ENV_KEY)
    return None if value is None else os.environ.decodevalue(value)


def _import_triton_kernels() -> ModuleType:
    """`fused_s2s.triton_kernels`: installed from the top-level `triton_kernels/` folder, or,
    in a source checkout used without installing, loaded from that folder directly."""
    try:
        return importlib.import_module("fused_s2s.triton_kernels")
    except ModuleNotFoundError as e:
        if e.name != "fused_s2s.triton_kernels":
            raise
    source = Path(__file__).resolve().parents[2] / "triton_kernels"
    if not (source / "__init__.py").is_file():
        raise ModuleNotFoundError("fused_s2s.triton_kernels is not installed")
    spec = importlib.util.spec_from_file_location("fused_s2s.triton_kernels", source / "__init__.py",
                                                  submodule_search_locations=[str(source)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


def _import(name: str) -> ModuleType:
    if name == "native":
        return torch._VF
    if name == "torch":
        from . import torch_backend as module
    elif name == "cpp":
        from .build import load_extension
        module = load_extension()
    else:
        module = _import_triton_kernels()
    required = PRIMITIVES + (("unsupported_reason",) if name == "triton" else ())
    missing = [p for p in required if not hasattr(module, p)]
    if missing:
        raise ImportError(f"{module.__name__} lacks {', '.join(missing)}")
    return module


def load(name: str) -> ModuleType:
    """The backend's module; raises BackendUnavailable (with the reason) if it cannot load."""
    check_name(name)
    if name in _loaded:
        return _loaded[name]
    if name not in _load_errors:
        try:
            _loaded[name] = _import(name)
            return _loaded[name]
        except Exception as e:  # any failure to build/import means "not available", with why
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            _load_errors[name] = f"{type(e).__name__}: {first_line}"
    raise BackendUnavailable(f"backend {name!r} cannot load: {_load_errors[name]}")


def unsupported_reason(name: str, op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if backend `name` can run `op` on tensors of this device and dtype, else why not."""
    if name == "auto":
        return None  # a choice among the others, `torch` at worst
    try:
        module = load(name)
    except BackendUnavailable as e:
        return str(e)
    if name == "torch":
        return None
    if name == "native":
        if op not in ("gru_cell", "lstm_cell"):
            return "PyTorch has no fused kernel for this op (native runs GRU/LSTM layers and cells)"
        return None if dtype.is_floating_point else f"PyTorch's RNN kernels take floating-point input, not {dtype}"
    if name == "cpp":
        if device.type == "cpu":  # 16-bit types computed in float32
            ok = dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
            return None if ok else f"cpp on CPU supports float32/float64/bfloat16/float16, not {dtype}"
        if device.type == "cuda":
            if not getattr(module, "has_cuda", False):
                return "the cpp extension was built without CUDA kernels"
            ok = dtype in (torch.float32, torch.float16, torch.bfloat16)
            return None if ok else f"cpp on CUDA supports float32/float16/bfloat16, not {dtype}"
        return f"cpp has no kernels for device type {device.type!r}"
    return module.unsupported_reason(op, device, dtype)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """warnings.warn's stacklevel for the first caller outside fused_s2s and torch: the warning
    names the user's line that ran the op, not a line of ours."""
    inside = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1  # level 1: our caller, _warn_once
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


# The kernels index with 32-bit offsets inside a tensor (cheaper address arithmetic); a call
# with a larger tensor goes to `torch` under "auto" and is refused by name.
MAX_KERNEL_ELEMENTS = 2**31 - 1


def _call_reason(name: str, op: str, device: torch.device, dtype: torch.dtype, largest: int) -> Optional[str]:
    if name != "torch" and largest > MAX_KERNEL_ELEMENTS:
        return (f"a tensor of {largest} elements exceeds the {MAX_KERNEL_ELEMENTS} that the kernels "
                "index with 32-bit offsets")
    return unsupported_reason(name, op, device, dtype)


def resolve(requested: Optional[str], op: str, device: torch.device, dtype: torch.dtype,
            largest: int = 0) -> str:
    """The name of the backend that runs `op` for tensors of this device/dtype, the largest
    of which has `largest` elements."""
    name = check_name(requested) if requested is not None else get_backend()
    if name == "native":
        raise BackendUnavailable(f"backend 'native' cannot run {op} one layer direction at a time: it runs whole "
                                 "GRU/LSTM modules and cells (fused_s2s.GRU/LSTM, gru_cell/lstm_cell)")
    if name != "auto":
        reason = _call_reason(name, op, device, dtype, largest)
        if reason is not None:
            raise BackendUnavailable(f"backend {name!r} cannot run {op} on {device.type}/{dtype}: {reason}")
        return name
    for candidate in AUTO_ORDER.get(device.type, ("torch",)):
        reason = _call_reason(candidate, op, device, dtype, largest)
        if reason is None:
            return candidate
        _warn_once(f"fused_s2s: backend {candidate!r} not used ({reason}); "
                   f"'auto' falls back to {', '.join(AUTO_ORDER[device.type][1:]) or 'torch'}")
    return "torch"


def available() -> Dict[str, Optional[str]]:
    """{backend name: None if it loads here, else the reason it does not}."""
    out: Dict[str, Optional[str]] = {}
    for name in NAMES:
        try:
            load(name)
            out[name] = None
        except BackendUnavailable as e:
            out[name] = str(e)
    return out
