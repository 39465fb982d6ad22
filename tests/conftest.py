"""Shared test setup: Triton's interpreter on machines without a GPU, the parametrisation over
backend x device x dtype, and the tolerance rule, declared once.

FUSED_S2S_REQUIRE_BACKENDS (comma-separated, e.g. "torch,cpp,triton"; CI sets it) turns a
backend that cannot load into a failing test instead of a skipped one, so a broken build can
never hide behind a green run.
"""
import os

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # must happen before triton is imported anywhere
    os.environ.setdefault("TRITON_INTERPRET", "1")
# cuBLAS refuses deterministic mode (used by the poison fixture) without a fixed workspace
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402

from fused_s2s.backends import registry  # noqa: E402

# The test problems are tiny: intra-op threads only add contention on a small, busy CPU.
torch.set_num_threads(1)

# float32 means IEEE float32 in every comparison, ours and the plain-PyTorch yardstick alike
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# float64 only where a backend supports it.
DTYPES = {"cpu": [torch.float64, torch.float32, torch.bfloat16, torch.float16],
          "cuda": [torch.float32, torch.float16, torch.bfloat16]}
HALF_TYPES = (torch.float16, torch.bfloat16)
# Triton on CPU is its interpreter, a test vehicle for the GPU kernels: by default it runs the
# parity suite in float32/float64 (its bfloat16 is wrong, its float16 slow); the GPU runs
# Triton's 16-bit cases.
NOT_BY_DEFAULT = {("triton", "cpu", t) for t in HALF_TYPES}
REQUIRED = {n for n in os.environ.get("FUSED_S2S_REQUIRE_BACKENDS", "torch").split(",") if n}


def _case(backend: str, device: str, dtype: torch.dtype, op: str):
    marks = [pytest.mark.gpu] if device == "cuda" else []
    reason = registry.unsupported_reason(backend, op, torch.device(device), dtype)
    # A required backend that cannot load is not skipped: its tests run and fail with the reason.
    if reason is not None and not (backend in REQUIRED and registry.available()[backend] is not None):
        marks.append(pytest.mark.skip(reason=f"{backend} on {device}/{dtype}: {reason}"))
    return pytest.param(backend, device, dtype, marks=marks,
                        id=f"{backend}-{device}-{str(dtype).replace('torch.', '')}")


def parity_cases(op: str, dtypes=None):
    """pytest params (backend, device, dtype) for every backend x device x dtype (`dtypes`, or
    the device's DTYPES less NOT_BY_DEFAULT)."""
    return [_case(b, d, t, op) for d in DEVICES for t in (dtypes or DTYPES[d]) for b in registry.NAMES
            if dtypes is not None or (b, d, t) not in NOT_BY_DEFAULT]


@pytest.fixture
def poison_uninitialized():
    """Fresh allocations (torch.empty and friends, which the kernel backends use for their
    outputs) come filled with NaN, so an element a kernel never writes fails the comparison
    instead of passing on a lucky zero. PyTorch does this in deterministic mode."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0])
    torch.utils.deterministic.fill_uninitialized_memory = previous[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_close_to_reference(ours: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor = None,
                              name: str = "output") -> None:
    """The tolerance rule, by dtype:
    - float64: torch.testing.assert_close defaults;
    - float16/bfloat16 (FlashAttention's rule): our max error against the float64 reference is
      at most twice that of the plain PyTorch computation done in the same precision (`plain`),
      plus a floor of one unit in the last place at the output's scale, for outputs the plain
      computation happens to get exactly right;
    - float32: assert_close's defaults, or else the rule above: long float32 reductions (a
      gradient summed over Tk x A terms) miss the defaults' 1.3e-6 relative bound in plain
      PyTorch too, and then only "no worse than twice PyTorch's own float32 error" is fair.
    """
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(ours).any() or torch.isnan(ref64).any(), f"{name}: NaN where the reference has none"
    if ours.dtype in (torch.float32, torch.float64):
        try:
            torch.testing.assert_close(ours, ref64.to(ours.dtype), msg=lambda m: f"{name}: {m}")
            return
        except AssertionError:
            if ours.dtype == torch.float64 or plain is None:
                raise
    assert plain is not None, "low-precision comparisons need the plain computation"
    err = (ours.double() - ref64).abs().max().item() if ours.numel() else 0.0
    plain_err = (plain.double() - ref64).abs().max().item() if ours.numel() else 0.0
    ulp = torch.finfo(ours.dtype).eps * max(ref64.abs().max().item() if ours.numel() else 0.0, 1.0)
    assert err <= 2 * plain_err + ulp, f"{name}: error {err:.3g} > 2 x plain {ours.dtype} error {plain_err:.3g} + {ulp:.3g}"


def masked_layer_reference(cell, gx, h0, c0, w_hh, b_hh, lengths, reverse):
    """The design's per-step math over the padded layout: a row runs its steps t < lengths[b]
    (from its last one when reversed), outputs zero past its length and keeps its state."""
    steps, hidden = gx.shape[0], h0.shape[1]
    lens = (torch.full((h0.shape[0],), steps, device=gx.device) if lengths is None
            else lengths.to(gx.device).clamp(0, steps))
    h, c, outs = h0, c0, [None] * steps
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        active = (t < lens)[:, None]
        gh = F.linear(h, w_hh, b_hh)
        if cell == "gru":
            x_r, x_z, x_n = gx[t].split(hidden, 1)
            h_r, h_z, h_n = gh.split(hidden, 1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            h_new = (1 - z) * n + z * h
        else:
            i, f, g, o = (gx[t] + gh).split(hidden, 1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            c = torch.where(active, c_new, c)
        h = torch.where(active, h_new, h)
        outs[t] = torch.where(active, h_new, torch.zeros_like(h_new))
    out = torch.stack(outs) if steps else gx.new_zeros(0, h0.shape[0], hidden)
    return out, h, c
