"""What every Triton kernel here shares: the tf32 switch, a matmul helper that runs on
Triton 3.6 and later, an accurate tanh, interpreter detection and small launcher helpers."""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# ----------------------------------------------------------------------------- tf32 switch

_allow_tf32 = False


def set_allow_tf32(allow: bool) -> None:
    """Let float32 matmuls inside the kernels use TensorFloat-32 (faster on Ampere and later,
    ~1e-3 relative error). Off by default so that float32 results match PyTorch's float32."""
    global _allow_tf32
    if not isinstance(allow, bool):
        raise TypeError(f"allow must be a bool, got {type(allow).__name__}")
    _allow_tf32 = allow


def allow_tf32() -> bool:
    return _allow_tf32


def dot_precision() -> str:
    """The `PRECISION` constexpr the launchers pass: how tl.dot treats float32 operands."""
    return "tf32" if _allow_tf32 else "ieee"


# ------------------------------------------------------------------------ jit math helpers

@triton.jit
def _dot_input_precision(a, b, acc, PRECISION: tl.constexpr):
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _dot_allow_tf32(a, b, acc, PRECISION: tl.constexpr):
    return tl.dot(a, b, acc, allow_tf32=PRECISION == "tf32")


# `input_precision` replaced `allow_tf32` in Triton 3.0; the old keyword is deprecated.
_dot = _dot_input_precision if "input_precision" in inspect.signature(tl.dot).parameters else _dot_allow_tf32


@triton.jit
def mm(a, b, acc, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b, accumulated in float32. USE_DOT: tl.dot (every block dim >= 16 on a GPU);
    otherwise a broadcast product and a sum, for blocks of one query (a dimension of 1)."""
    if USE_DOT:
        # float32 weights or score gradients times half values/keys: the float32 operand is
        # rounded to the half type (as torch's half computation rounds the weights), so that
        # the product runs on tensor cores instead of as a float32 FMA loop
        if a.dtype != b.dtype and a.dtype == tl.float32:
            a = a.to(b.dtype)
        elif a.dtype != b.dtype and b.dtype == tl.float32:
            b = b.to(a.dtype)
        if a.dtype == tl.float32:
            acc = _dot(a, b, acc, PRECISION)
        else:  # half/bfloat16 products are exact in the float32 accumulator
            acc = tl.dot(a, b, acc)
    else:
        acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit
def tanh(x):
    """tanh in float32 from exp (not every Triton version has tl.tanh): an odd Taylor
    polynomial near 0, where (1 - e) / (1 + e) would cancel, and exp elsewhere.
    Relative error ~1e-7 on both sides of the switch; +-inf -> +-1, NaN -> NaN."""
    ax = tl.abs(x)
    x2 = x * x
    # terms through x^9; the first one left out, 1382 x^11 / 155925, is < 1e-8 |x| for |x| < 1/4
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    e = tl.exp(-2.0 * ax)  # in (0, 1]: never overflows
    large = (1.0 - e) / (1.0 + e)
    large = tl.where(x < 0, -large, large)
    return tl.where(ax < 0.25, small, large)


@triton.jit
def sigmoid(x):
    """1 / (1 + exp(-x)); exp overflow to inf gives exactly 0, as torch.sigmoid does."""
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def gate_matmul(acc, h_tile, w_ptr, gate, cols, ks, col_ok, k_ok, H, K, PRECISION: tl.constexpr):
    """acc + h_tile @ w_hh[gate*H + cols, ks].T: one gate's block of the recurrent GEMM, w_hh
    (G*H, K) with K the width of h (H, or an LSTM's proj_size)."""
    w = tl.load(w_ptr + (gate * H + cols)[:, None] * K + ks[None, :],
                mask=col_ok[:, None] & k_ok[None, :], other=0.0)
    return mm(h_tile, tl.trans(w), acc, True, PRECISION)


# ------------------------------------------------------------------------ launcher helpers

INTERPRETED = isinstance(_dot_input_precision, InterpretedFunction)
"""True when TRITON_INTERPRET=1 was set before triton was imported: kernels then run through
Triton's interpreter (numpy), on CPU tensors too. Fixed when the kernels are defined."""

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OPS = ("gru_cell", "lstm_cell", "additive_attention", "dot_attention")


def unsupported_reason(op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if the Triton kernels of `op` run on tensors of this device and dtype, else why not."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    device = torch.device(device)
    if device.type == "cpu" and not INTERPRETED:
        return ("Triton runs CPU tensors only through its interpreter (TRITON_INTERPRET=1 set before import), "
                "which is for tests: far too slow to train or run a model")
    if device.type not in ("cpu", "cuda"):
        return f"no Triton kernels for device type {device.type!r}"
    if dtype not in SUPPORTED_DTYPES:
        return f"the Triton kernels take float32/float16/bfloat16, not {dtype}"
    if dtype == torch.bfloat16 and INTERPRETED:
        # its float32 -> bfloat16 cast rounds toward zero and its tl.dot multiplies bfloat16 bit patterns
        return "Triton's interpreter does not compute bfloat16 correctly"
    return None


def check(name: str, t: torch.Tensor, shape, dtype: Optional[torch.dtype] = None,
          device: Optional[torch.device] = None) -> None:
    """The contract's preconditions for one tensor argument (None in `shape`: any size)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def nonempty(t: torch.Tensor) -> torch.Tensor:
    """A tensor safe to pass as a kernel pointer: an empty one is replaced by one element that
    the kernel never reads (masked), since an empty tensor may have a null data pointer."""
    return t if t.numel() else t.new_empty(1)


def block(n: int, least: int = 16) -> int:
    """The smallest power of two >= n and >= `least` (tl.dot needs block dims >= 16)."""
    return max(least, triton.next_power_of_2(max(n, 1)))


def num_programs_target(device: torch.device) -> int:
    """About how many programs fill the device: two per SM (the interpreter: a handful)."""
    if device.type != "cuda":
        return 2
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


_sm_counts: dict = {}


def _sm_count(index: int) -> int:
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def configs(gpu: list, interpreted: triton.Config) -> list:
    """Autotune candidates: the GPU list, or the one config the interpreter runs (tuning there
    would only measure numpy)."""
    return [interpreted] if INTERPRETED else gpu


# The recurrent step's (batch block, hidden block, reduction block): small batches (a decoder
# step) want narrow hidden blocks so that enough programs share the weight reads. Each of these
# compiles for sm_90 without register spills, for GRU and LSTM, float32 and bfloat16.
CELL_CONFIGS = configs(
    [triton.Config({"BLOCK_B": 16, "BLOCK_H": 16, "BLOCK_K": 32}, num_warps=4),
     triton.Config({"BLOCK_B": 16, "BLOCK_H": 32, "BLOCK_K": 32}, num_warps=4),
     triton.Config({"BLOCK_B": 16, "BLOCK_H": 64, "BLOCK_K": 32}, num_warps=8),
     triton.Config({"BLOCK_B": 32, "BLOCK_H": 32, "BLOCK_K": 32}, num_warps=8),
     triton.Config({"BLOCK_B": 64, "BLOCK_H": 32, "BLOCK_K": 16}, num_warps=8)],
    triton.Config({"BLOCK_B": 16, "BLOCK_H": 16, "BLOCK_K": 16}, num_warps=4))

POINTWISE_BLOCK = 1024  # elements per program of the cells' backward kernels
