"""What every benchmark family shares: cases, timing, memory, the device's roofline, the environment.

A `Case` is one configuration of one op (shapes, dtype, fwd or fwd+bwd). It makes random
inputs and lists implementations: ours (one per fused_s2s backend) and the baselines. Every
implementation is bound to the same inputs and timed in the same run.

Timing
- CUDA: one pair of CUDA events around each call; warm-up, then the median of many calls
  (about `budget_ms` of them, at least `min_reps`). When one input set fits in L2, several
  independent random sets are made and the calls rotate over them, so the L2 does not hold
  the previous call's data. A median over back-to-back calls is the larger of the GPU time
  and the time the host needs to launch the work, which is what a training loop sees.
- CUDA graphs (per-step rows, `--graphs`): `graph_steps` calls captured in one graph,
  replayed and timed with events; the time per call is the GPU time without launch cost.
- CPU: time.perf_counter around each call, median.
- Every measurement has at least MIN_REPS timed calls, and keeps its spread (interquartile range
  / median): a row whose spread passes NOISY_SPREAD is flagged, its ratio not to be trusted (a
  busy machine). Quartiles use the inclusive method: always within the samples' range.

"fwd" runs under torch.no_grad() (inference: nothing saved for backward); "fwd+bwd" runs the
forward and then torch.autograd.grad of the outputs (random output gradients) with respect
to every input and parameter, so no .grad accumulation is timed.
"""
from __future__ import annotations

import ctypes
import datetime
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

# forward() -> tuple of output tensors the loss depends on; wrt: tensors to differentiate.
Bound = Tuple[Callable[[], Sequence[Tensor]], Sequence[Tensor]]


@dataclass
class Impl:
    name: str                                   # "ours:triton", "nn.GRUCell", "compile(naive)", ...
    bind: Callable[[Dict[str, Any]], Bound]     # inputs -> (forward, wrt)
    ours: bool = False
    skip: Optional[str] = None                  # why it cannot run, decided before timing


@dataclass
class Case:
    family: str                    # cells | layers | attention | end_to_end
    op: str                        # gru_cell, LSTM, additive_attention, ...
    config: Dict[str, Any]         # the shape parameters, as the issue names them
    dtype: torch.dtype
    passes: str                    # "fwd" | "fwd+bwd"
    make_inputs: Callable[[torch.device, torch.dtype, bool], Dict[str, Any]]  # (device, dtype, requires_grad)
    impls: List[Impl]
    step: bool = False             # a per-step row: also timed inside a CUDA graph
    flops: float = 0.0             # minimal useful FLOPs of one call
    bytes: float = 0.0             # minimal bytes one call must move to/from memory
    transcendentals: float = 0.0   # tanh/sigmoid/exp evaluations (the floor of additive attention)
    unit: Optional[Tuple[str, float]] = None  # ("tokens", n): also report n / time (end to end)
    rotate: bool = True            # rotate input sets when one fits in L2 (not for whole models)

    @property
    def id(self) -> str:
        cfg = ",".join(f"{k}={v}" for k, v in self.config.items())
        return f"{self.family}/{self.op}/{cfg}/{dtype_name(self.dtype)}/{self.passes}"


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def short_reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in first.lower():
        return "OOM"
    return f"{type(e).__name__}: {first[:160]}"


@dataclass
class Context:
    """What the families need to build their cases."""
    device: torch.device
    compiler: "Compiler"
    backends: Sequence[str]                       # our backends to measure
    dtypes: Optional[Sequence[torch.dtype]] = None  # overrides every config's own dtype
    quick: bool = False

    def dtypes_for(self, default: torch.dtype) -> Sequence[torch.dtype]:
        return self.dtypes or (default,)


def unsupported(ctx: Context, backend: str, ops: Sequence[str], dtype: torch.dtype) -> Optional[str]:
    """Why fused_s2s backend `backend` cannot run these ops on this device and dtype, or None."""
    from fused_s2s.backends import registry
    for op in ops:
        try:
            reason = registry.unsupported_reason(backend, op, ctx.device, dtype)
        except Exception as e:
            reason = short_reason(e)
        if reason is not None:
            return reason
    return None


def ours(ctx: Context, ops: Sequence[str], dtype: torch.dtype, bind: Callable[[str], Callable]) -> List[Impl]:
    """One implementation per fused_s2s backend, skipped with the backend's own reason when it
    cannot run these ops on this device and dtype."""
    return [Impl(f"ours:{name}", bind(name), ours=True, skip=unsupported(ctx, name, ops, dtype))
            for name in ctx.backends]


def compiled(ctx: Context, name: str, fn: Callable, bind: Callable[[Callable], Callable]) -> Impl:
    """A baseline: `fn` under torch.compile, bound to the inputs by bind(compiled_fn)."""
    reason = ctx.compiler.skip_reason()
    return Impl(name, bind(ctx.compiler(fn)) if reason is None else bind(fn), skip=reason)


def traffic(inputs: float, outputs: float, passes: str) -> float:
    """Minimal element traffic: fwd reads each input and writes each output once; fwd+bwd
    also reads the inputs again and the output gradients, and writes the input gradients."""
    return inputs + outputs if passes == "fwd" else 3 * inputs + 2 * outputs


def elt_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------- random inputs


def randn(*shape: int, device: torch.device, dtype: torch.dtype, requires_grad: bool = False,
          scale: float = 1.0) -> Tensor:
    t = torch.randn(*shape, device=device, dtype=dtype) * scale
    return t.requires_grad_(requires_grad)


def tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors (and module parameters) in an input set."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, torch.nn.Module):
        return sum(tensor_bytes(p) for p in obj.parameters())
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# --------------------------------------------------------------------------- compile


class Compiler:
    """torch.compile for the baselines, one compiled function per (function, mode).

    mode "dynamic" compiles once with dynamic shapes and serves every configuration (the
    suite stays within its time budget); "static" specialises to every shape (slower to
    compile, sometimes faster to run); "off" skips these baselines with that reason.
    """

    def __init__(self, mode: str):
        self.mode = mode
        self._cache: Dict[Any, Callable] = {}

    def skip_reason(self) -> Optional[str]:
        if self.mode == "off":
            return "torch.compile disabled (--compile off)"
        if not hasattr(torch, "compile"):
            return "torch.compile unavailable in this torch"
        return None

    def __call__(self, fn: Callable) -> Callable:
        if fn not in self._cache:
            if self.mode == "static":
                import torch._dynamo as dynamo
                # one compile per shape: raise the recompile limit (renamed in torch 2.6)
                name = "recompile_limit" if hasattr(dynamo.config, "recompile_limit") else "cache_size_limit"
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), 256))
            self._cache[fn] = torch.compile(fn, dynamic=(self.mode == "dynamic"))
        return self._cache[fn]


# --------------------------------------------------------------------------- timing


MIN_REPS = 10          # timed calls per measurement, at least (also in --quick)
NOISY_SPREAD = 0.20    # interquartile range / median above which a measurement is flagged noisy


@dataclass
class Timing:
    median_ms: float
    q1_ms: float          # quartiles (inclusive method: never outside [min, max])
    q3_ms: float
    min_ms: float
    max_ms: float
    reps: int

    @property
    def spread(self) -> float:
        """Interquartile range / median: the run-to-run noise of this measurement."""
        return (self.q3_ms - self.q1_ms) / self.median_ms if self.median_ms > 0 else 0.0

    def scaled(self, k: float) -> "Timing":
        return Timing(self.median_ms * k, self.q1_ms * k, self.q3_ms * k, self.min_ms * k, self.max_ms * k,
                      self.reps)


@dataclass
class Settings:
    device: torch.device
    budget_ms: float = 100.0      # timed calls per measurement, in ms (do_bench's `rep`)
    warmup_ms: float = 25.0
    min_reps: int = MIN_REPS
    max_reps: int = 2000
    graph_steps: int = 10
    rotate: bool = True


def summary(times: Sequence[float]) -> Timing:
    """Median, quartiles and range of per-call times (ms)."""
    if not times:
        raise ValueError("no times to summarise")
    times = sorted(times)
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) >= 2 else times * 3
    return Timing(statistics.median(times), q1, q3, times[0], times[-1], len(times))


def _times(calls: Sequence[Callable[[], Any]], n: int, device: torch.device) -> List[float]:
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            starts[i].record()
            calls[i % len(calls)]()
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        calls[i % len(calls)]()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def measure(calls: Sequence[Callable[[], Any]], s: Settings) -> Timing:
    """Median time of one call, rotating over `calls` (one per input set)."""
    calls[0]()                                   # first call: lazy init, compilation, autotuning
    est = statistics.median(_times(calls, 3, s.device))
    est = max(est, 1e-4)
    _times(calls, int(min(200, max(1, s.warmup_ms / est))), s.device)
    n = int(min(s.max_reps, max(s.min_reps, s.budget_ms / est)))
    return summary(_times(calls, n, s.device))


def measure_graph(call: Callable[[], Any], s: Settings) -> Timing:
    """Time per call of `graph_steps` calls captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(s.graph_steps):
            call()
    try:
        t = measure([graph.replay], s)
    finally:
        del graph
    return t.scaled(1 / s.graph_steps)


def peak_memory_bytes(call: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Memory allocated by one call above what was held before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def make_call(forward: Callable[[], Sequence[Tensor]], wrt: Sequence[Tensor], passes: str) -> Callable[[], Any]:
    """The closure that is timed: forward only (no_grad), or forward then autograd.grad."""
    if passes == "fwd":
        def fwd() -> None:
            with torch.no_grad():
                forward()
        return fwd
    outs = forward()
    grads_out = [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outs]
    wrt = [t for t in wrt if t.requires_grad]

    def fwd_bwd() -> None:
        torch.autograd.grad(forward(), wrt, grads_out, allow_unused=True)
    return fwd_bwd


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))


def input_sets(case: Case, s: Settings) -> List[Dict[str, Any]]:
    """One random input set, or several when one fits in L2 (rotated over while timing)."""
    torch.manual_seed(0)
    first = case.make_inputs(s.device, case.dtype, case.passes != "fwd")
    sets = [first]
    l2 = l2_bytes(s.device)
    size = max(1, tensor_bytes(first))
    if s.rotate and case.rotate and l2 and size < l2:
        n = min(32, math.ceil(2 * l2 / size))
        for i in range(1, n):
            torch.manual_seed(i)
            sets.append(case.make_inputs(s.device, case.dtype, case.passes != "fwd"))
    return sets


@dataclass
class Result:
    impl: str
    ours: bool
    ms: Optional[float] = None             # median
    q1_ms: Optional[float] = None
    q3_ms: Optional[float] = None
    min_ms: Optional[float] = None
    spread: Optional[float] = None         # (q3 - q1) / median
    reps: int = 0
    peak_bytes: Optional[int] = None
    max_abs_diff: Optional[float] = None   # outputs against the first implementation's
    skip: Optional[str] = None


def run_impl(case: Case, impl: Impl, sets: List[Dict[str, Any]], s: Settings, graph: bool,
             expected: Optional[List[Tensor]] = None) -> Result:
    """Time one implementation on the case's input sets. Its outputs on the first set are
    compared with `expected` (the first implementation's, stored there when it is empty), so
    a row never compares two different computations unnoticed."""
    res = Result(impl.name, impl.ours)
    if impl.skip:
        res.skip = impl.skip
        return res
    calls: List[Callable[[], Any]] = []
    try:
        bound = [impl.bind(inputs) for inputs in (sets[:1] if graph else sets)]
        if expected is not None:
            with torch.no_grad():
                outs = [o.detach().double() for o in bound[0][0]()]
            if not expected:
                expected.extend(outs)
            else:
                res.max_abs_diff = max(float((o - e).abs().max()) if o.numel() else 0.0
                                       for o, e in zip(outs, expected))
            del outs
        calls = [make_call(forward, wrt, case.passes) for forward, wrt in bound]
        t = measure_graph(calls[0], s) if graph else measure(calls, s)
        res.ms, res.q1_ms, res.q3_ms, res.min_ms, res.reps = t.median_ms, t.q1_ms, t.q3_ms, t.min_ms, t.reps
        res.spread = t.spread
        if not graph:
            res.peak_bytes = peak_memory_bytes(calls[0], s.device)
    except Exception as e:  # a failing implementation is a result ("skip: why"), not a crash
        res.skip = ("CUDA graph capture: " if graph else "") + short_reason(e)
    finally:
        calls.clear()
        if s.device.type == "cuda" and (res.skip or "").endswith("OOM"):
            torch.cuda.empty_cache()
    return res


# --------------------------------------------------------------------------- roofline


def copy_bandwidth(device: torch.device, quick: bool) -> float:
    """Measured device-memory copy bandwidth in bytes/s (read + write counted)."""
    n = (16 << 20) if (quick or device.type == "cpu") else (512 << 20)  # bytes per buffer
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    s = Settings(device, budget_ms=50 if quick else 200, warmup_ms=10 if quick else 50, min_reps=5)
    t = measure([lambda: dst.copy_(src)], s)
    return 2 * n / (t.median_ms * 1e-3)


def matmul_rate(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    """Measured dense matmul rate in FLOP/s for this dtype (torch's default TF32 settings)."""
    n = 512 if (quick or device.type == "cpu") else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = Settings(device, budget_ms=50 if quick else 200, warmup_ms=10 if quick else 50, min_reps=5)
    t = measure([lambda: a @ b], s)
    return 2 * n ** 3 / (t.median_ms * 1e-3)


# --------------------------------------------------------------------------- environment


def _cmd(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


ALLOCATOR = "as the process found it"


def steady_allocator() -> str:
    """Pin glibc's malloc where a long-running loop leaves it, for every implementation alike.

    glibc serves a large block by mmap (fresh pages, a page fault each: ~1 ms per call for a
    decoder step's 6 MiB intermediates) until a freed one raises its threshold, up to 32 MiB,
    and what ran just before decides which state the next call sees: the same naive attention
    step timed 0.9 or 3.6 ms. Fixing the thresholds at that ceiling times every call in the
    state a training or decoding loop reaches after its first steps."""
    global ALLOCATOR
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        if libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 64 << 20):
            ALLOCATOR = "glibc, mmap threshold pinned at 32 MiB and trim at 64 MiB (a long loop's steady state)"
    except OSError:  # not glibc: left as it is
        pass
    return ALLOCATOR


def environment(device: torch.device) -> Dict[str, Any]:
    env: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "allocator": ALLOCATOR,
        "device_type": device.type,
        "git_commit": _cmd("git", "rev-parse", "HEAD"),
        "git_dirty": bool(_cmd("git", "status", "--porcelain", "--untracked-files=no")),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as e:
        env["triton"] = f"unavailable ({short_reason(e)})"
    try:
        import fused_s2s
        env["fused_s2s"] = getattr(fused_s2s, "__version__", None)
    except Exception as e:
        env["fused_s2s"] = f"import failed ({short_reason(e)})"
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    env["cpu"] = cpu
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update({
            "device": torch.cuda.get_device_name(device),
            "capability": f"{p.major}.{p.minor}",
            "sm_count": p.multi_processor_count,
            "memory_GiB": round(p.total_memory / 2 ** 30, 1),
            "l2_MiB": round(l2_bytes(device) / 2 ** 20, 1),
            "driver": _cmd("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
            "cudnn": torch.backends.cudnn.version(),
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        })
        if env["driver"]:
            env["driver"] = env["driver"].splitlines()[0]
    else:
        env["device"] = f"CPU ({cpu})"
    return env


def device_slug(env: Dict[str, Any]) -> str:
    name = env.get("device", "cpu") if env.get("device_type") == "cuda" else "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug


def now_date() -> str:
    return datetime.date.today().isoformat()

