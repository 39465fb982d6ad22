"""The persistent whole-sequence GRU/LSTM kernels, tested without a GPU: the tiling plan (the
Python mirror is checked against the C++ header when a compiler is present) and the CPU
emulation of the kernels' blocked schedule against the per-step layer Functions."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import assert_close_to_reference
from fused_s2s.backends import persistent as P
from fused_s2s.backends.autograd import GRUFunction, LSTMFunction

ROOT = Path(__file__).resolve().parents[1]
CELLS = ("gru", "lstm")
HALF = (torch.bfloat16, torch.float16)
# Five SMs: several unit blocks even at tiny hidden sizes.
FIVE_SMS = P.Device("five SMs", sm_count=5, smem_per_block=48 * 1024)


def tight_device(cell, dtype, batch, hidden, backward, sm_count):
    """The device with the least shared memory the layer fits in: it stages in k-chunks."""
    for smem in range(1024, 256 * 1024, P.SMEM_ALIGN):
        device = P.Device("tight", sm_count=sm_count, smem_per_block=smem)
        if P.plan(cell, dtype, batch, hidden, backward=backward, device=device).fits:
            return device
    raise AssertionError("no shared-memory size fits")


# ------------------------------------------------------------------------------------ planner


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch, hidden, dtype", [
    (16, 768, torch.bfloat16),   # the issue's long-sequence config
    (16, 1024, torch.bfloat16),  # H up to at least 1024 in bf16
    (16, 1024, torch.float16),
    (64, 512, torch.bfloat16),   # fastrnns config, half precision
    (64, 512, torch.float32),    # fastrnns config as the benchmark runs it
    (16, 256, torch.bfloat16),
    (1, 64, torch.float32),
])
def test_issue_configs_fit_on_an_h100(cell, batch, hidden, dtype):
    for backward in (False, True):
        p = P.plan(cell, dtype, batch, hidden, backward=backward, device=P.H100)
        assert p.fits, p.reason
        assert p.blocks <= P.H100.sm_count and p.smem_bytes <= P.H100.smem_per_block
        if dtype in HALF:
            phases = P.estimate_step_us(p)
            assert 0 < phases["total"] == pytest.approx(sum(v for k, v in phases.items() if k != "total"))
    assert P.fits(cell, dtype, batch, hidden, training=True, device=P.H100)


@pytest.mark.parametrize("cell", CELLS)
def test_absurd_sizes_do_not_fit(cell):
    bf16 = torch.bfloat16
    too_wide = P.plan(cell, bf16, 16, 16384, device=P.H100)
    assert not too_wide.fits and "hidden" in too_wide.reason
    too_many_rows = P.plan(cell, bf16, 16 * 133, 256, device=P.H100)  # 133 row groups > 132 SMs
    assert not too_many_rows.fits and "batch" in too_many_rows.reason
    assert not P.plan(cell, torch.float32, 16, 4096, device=P.H100).fits
    assert not P.plan(cell, bf16, 16, 3072, backward=True, device=P.A100).fits
    assert not P.plan(cell, bf16, 0, 64).fits and not P.plan(cell, bf16, 4, 0).fits
    assert not P.fits(cell, torch.float64, 4, 64, training=False)  # the kernels have no float64


def test_training_needs_the_backward_plan_too():
    # float32 LSTM, H=1280: W_hh^T slices of the backward no longer fit next to the staged rows
    assert P.plan("lstm", torch.float32, 16, 1280, device=P.H100).fits
    assert not P.plan("lstm", torch.float32, 16, 1280, backward=True, device=P.H100).fits
    assert P.fits("lstm", torch.float32, 16, 1280, training=False, device=P.H100)
    assert not P.fits("lstm", torch.float32, 16, 1280, training=True, device=P.H100)


def _plan_cases():
    devices = [P.H100, P.A100, FIVE_SMS, P.Device("tiny", sm_count=3, smem_per_block=12 * 1024)]
    for device in devices:
        for cell in CELLS:
            for dtype in (torch.float32, torch.bfloat16):
                for backward in (False, True):
                    for batch in (1, 3, 16, 17, 64, 100, 2200):
                        for hidden in (1, 5, 33, 64, 257, 768, 1024, 1500, 4096, 20000):
                            for rows in (16, 8):
                                yield device, cell, dtype, backward, batch, hidden, rows


def test_plan_invariants():
    fitted = 0
    for device, cell, dtype, backward, batch, hidden, rows in _plan_cases():
        p = P.plan(cell, dtype, batch, hidden, backward=backward, device=device, max_rows_per_block=rows)
        if not p.fits:
            assert p.reason
            continue
        fitted += 1
        es, gates = P.ELEMENT_SIZE[dtype], P.GATES[cell]
        assert p.blocks <= device.sm_count
        assert p.units_per_block * (p.unit_blocks - 1) < hidden <= p.units_per_block * p.unit_blocks
        assert p.rows_per_block * (p.batch_blocks - 1) < batch <= p.rows_per_block * p.batch_blocks
        assert p.rows_per_block <= rows
        assert p.weight_rows % 8 == 0 and p.weight_rows >= (1 if backward else gates) * p.units_per_block
        assert p.k == (gates * hidden if backward else hidden) and p.k_pad % 16 == 0
        assert p.k_chunk % 16 == 0 and (p.k_chunk == p.k_pad or P.MIN_K_CHUNK <= p.k_chunk < p.k_pad)
        assert p.tile_groups * p.k_split <= P.WARPS and p.tiles <= p.tile_groups * P.MAX_TILES_PER_WARP
        assert p.units_per_block * p.rows_per_block <= P.THREADS * P.MAX_PAIRS_PER_THREAD
        assert p.smem_bytes == (P.weight_smem_bytes(p.weight_rows, p.k_pad, es)
                                + P.partial_smem_bytes(p.k_split, p.tiles) + P.chunk_smem_bytes(p.k_chunk, es))
        assert p.smem_bytes <= device.smem_per_block
    assert fitted > 500


def _cuda_include():
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for root in filter(None, candidates):
        if (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return Path(root) / "include"
    return None


_DRIVER = r"""
#include <cstdio>
#include "persistent_rnn.h"
using namespace fused_s2s::persistent;
int main() {
  int cell, dtype, backward;
  long long batch, hidden, sms, smem, rows;
  while (std::scanf("%d %d %d %lld %lld %lld %lld %lld", &cell, &dtype, &backward, &batch, &hidden, &sms, &smem,
                    &rows) == 8) {
    const Plan p = plan_layer(Cell(cell), DType(dtype), backward != 0, batch, hidden, sms, smem, 65536, rows);
    std::printf("%d %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld|%s\n", int(p.fits),
                (long long)p.units_per_block, (long long)p.rows_per_block, (long long)p.unit_blocks,
                (long long)p.batch_blocks, (long long)p.k, (long long)p.k_pad, (long long)p.k_chunk,
                (long long)p.weight_rows, (long long)p.tiles, (long long)p.tile_groups, (long long)p.k_split,
                (long long)p.smem_bytes, (long long)p.workspace_bytes, p.reason);
  }
}
"""


def test_python_plan_matches_the_cpp_header(tmp_path):
    compiler = shutil.which("c++") or shutil.which("g++")
    include = _cuda_include()
    if compiler is None or include is None:
        pytest.skip("needs a C++ compiler and the CUDA runtime headers")
    (tmp_path / "driver.cpp").write_text(_DRIVER)
    exe = tmp_path / "driver"
    subprocess.run([compiler, "-std=c++17", "-O1", f"-I{ROOT / 'csrc' / 'cuda'}", f"-I{include}",
                    str(tmp_path / "driver.cpp"), "-o", str(exe)], check=True, capture_output=True)
    cases = list(_plan_cases())
    dtype_ids = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    stdin = "".join(f"{CELLS.index(c)} {dtype_ids[t]} {int(bw)} {b} {h} {d.sm_count} {d.smem_per_block} {r}\n"
                    for d, c, t, bw, b, h, r in cases)
    lines = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(lines) == len(cases)
    for (device, cell, dtype, backward, batch, hidden, rows), line in zip(cases, lines):
        p = P.plan(cell, dtype, batch, hidden, backward=backward, device=device, max_rows_per_block=rows)
        numbers, reason = line.split("|", 1)
        ours = (int(p.fits), p.units_per_block, p.rows_per_block, p.unit_blocks, p.batch_blocks, p.k, p.k_pad,
                p.k_chunk, p.weight_rows, p.tiles, p.tile_groups, p.k_split, p.smem_bytes, p.workspace_bytes)
        if p.fits:
            assert tuple(int(v) for v in numbers.split()) == ours, (device.name, cell, dtype, backward, batch, hidden)
        else:
            assert numbers.split()[0] == "0" and reason == p.reason, (device.name, cell, dtype, backward, batch, hidden)


# ---------------------------------------------------------------------------------- emulation


def reference_layer(cell, gx, h0, c0, w_hh, b_hh, lengths, reverse):
    """The per-step layer Functions (torch backend) over the packed layout, back to padded
    time-major (zeros past each row's length)."""
    steps, batch, hidden = gx.shape[0], gx.shape[1], h0.shape[1]
    lens = torch.full((batch,), steps) if lengths is None else lengths
    order = torch.argsort(lens, descending=True, stable=True)
    batch_sizes = tuple(int((lens > t).sum()) for t in range(steps))
    packed_rows = torch.cat([t * batch + order[:bs] for t, bs in enumerate(batch_sizes)])
    data = gx.reshape(steps * batch, -1).index_select(0, packed_rows)
    if cell == "gru":
        out, h_n = GRUFunction.apply(data, h0.index_select(0, order), w_hh, b_hh, batch_sizes, reverse, "torch")
        c_n = None
    else:
        out, h_n, c_n = LSTMFunction.apply(data, h0.index_select(0, order), c0.index_select(0, order), w_hh, b_hh,
                                           batch_sizes, reverse, "torch")
    padded = out.new_zeros(steps * batch, hidden).index_copy(0, packed_rows, out).view(steps, batch, hidden)
    unorder = torch.argsort(order)
    return padded, h_n.index_select(0, unorder), (None if c_n is None else c_n.index_select(0, unorder))


def make_layer(cell, steps, batch, hidden, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gates = P.GATES[cell]

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return dict(gx=rand(steps, batch, gates * hidden), h0=rand(batch, hidden, scale=0.5),
                c0=rand(batch, hidden, scale=0.5) if cell == "lstm" else None,
                w_hh=rand(gates * hidden, hidden, scale=hidden ** -0.5), b_hh=rand(gates * hidden, scale=0.1))


def run_reference(cell, layer, lengths, reverse, grads):
    """Reference outputs and the gradients of sum(out*go) + sum(h_n*gh) (+ sum(c_n*gc))."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in layer.items() if v is not None}
    out, h_n, c_n = reference_layer(cell, leaves["gx"], leaves["h0"], leaves.get("c0"), leaves["w_hh"],
                                    leaves["b_hh"], lengths, reverse)
    loss = (out * grads["out"]).sum() + (h_n * grads["h_n"]).sum()
    if c_n is not None:
        loss = loss + (c_n * grads["c_n"]).sum()
    loss.backward()
    return (out.detach(), h_n.detach(), None if c_n is None else c_n.detach()), {k: v.grad for k, v in leaves.items()}


def run_emulation(cell, layer, lengths, reverse, grads, fwd_device, bwd_device, block_order=None):
    """Forward and backward kernels' schedules, then the caller's whole-sequence GEMMs."""
    out, h_n, c_n, saved, c_seq = P.emulate_forward(cell, layer["gx"], layer["h0"], layer["w_hh"], layer["b_hh"],
                                                    layer["c0"], lengths, reverse, device=fwd_device,
                                                    block_order=block_order)
    for name, t in (("out", out), ("saved", saved), ("c_seq", c_seq)):
        assert t is None or not torch.isnan(t).any(), f"{name}: an element was never written"
    grad_gx, grad_gh, grad_h0, grad_c0 = P.emulate_backward(
        cell, grads["out"], grads["h_n"], saved, layer["w_hh"], out=out, h0=layer["h0"], c0=layer["c0"],
        c_seq=c_seq, grad_c_n=grads.get("c_n"), lengths=lengths, reverse=reverse, device=bwd_device,
        block_order=block_order[::-1] if block_order is not None else None)
    h_prev = P.previous_states(out, layer["h0"], lengths, reverse)
    grad_w_hh, grad_b_hh = P.recurrent_weight_gradients(grad_gh, h_prev)
    ours = dict(gx=grad_gx, h0=grad_h0, w_hh=grad_w_hh, b_hh=grad_b_hh)
    if cell == "lstm":
        ours["c0"] = grad_c0
    return (out, h_n, c_n), ours


def make_grads(cell, steps, batch, hidden, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    grads = dict(out=torch.randn(steps, batch, hidden, generator=g, dtype=torch.float64).to(dtype),
                 h_n=torch.randn(batch, hidden, generator=g, dtype=torch.float64).to(dtype))
    if cell == "lstm":
        grads["c_n"] = torch.randn(batch, hidden, generator=g, dtype=torch.float64).to(dtype)
    return grads


def check_against_reference(cell, steps, batch, hidden, dtype, lengths, reverse, fwd_device, bwd_device,
                            block_order=None):
    """Emulated forward and backward vs the per-step Functions; returns the emulation's results."""
    layer, grads = make_layer(cell, steps, batch, hidden, dtype), make_grads(cell, steps, batch, hidden, dtype)
    (out, h_n, c_n), ours = run_emulation(cell, layer, lengths, reverse, grads, fwd_device, bwd_device, block_order)
    (r_out, r_h_n, r_c_n), ref = run_reference(cell, layer, lengths, reverse, grads)
    torch.testing.assert_close(out, r_out)
    torch.testing.assert_close(h_n, r_h_n)
    if cell == "lstm":
        torch.testing.assert_close(c_n, r_c_n)
    for name, grad in ref.items():
        torch.testing.assert_close(ours[name], grad, msg=lambda m, name=name: f"grad {name}: {m}")
    if lengths is not None:  # past its length a row outputs zeros and takes no gradient
        past = torch.arange(steps)[:, None] >= lengths[None, :]
        assert (out[past] == 0).all() and (ours["gx"][past] == 0).all()
    return (out, h_n, c_n), ours


LENGTHS = {"full": None, "ragged": torch.tensor([6, 0, 3, 6, 1])}


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_emulation_matches_the_layer_functions(cell, reverse, lengths, dtype):
    """Odd sizes (B=5, H=33: partial last unit block, padded rows and k) over five blocks."""
    check_against_reference(cell, 6, 5, 33, dtype, lengths, reverse, FIVE_SMS, FIVE_SMS)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_emulation_with_row_groups_and_chunked_staging(cell, reverse):
    """37 rows (groups of 16, 16, 5) on six SMs, with so little shared memory that the exchanged
    operand is staged in several k-chunks; the result must not depend on the blocks' order."""
    steps, batch, hidden = 4, 37, 70
    lengths = torch.randint(0, steps + 1, (batch,), generator=torch.Generator().manual_seed(3))
    fwd = tight_device(cell, torch.float32, batch, hidden, False, 6)
    bwd = tight_device(cell, torch.float32, batch, hidden, True, 6)
    for device, backward in ((fwd, False), (bwd, True)):
        p = P.plan(cell, torch.float32, batch, hidden, backward=backward, device=device)
        assert p.batch_blocks == 3 and p.unit_blocks == 2 and p.chunks > 1
    in_order = check_against_reference(cell, steps, batch, hidden, torch.float64, lengths, reverse, fwd, bwd)
    layer, grads = make_layer(cell, steps, batch, hidden, torch.float64), make_grads(cell, steps, batch, hidden,
                                                                                     torch.float64)
    shuffled = run_emulation(cell, layer, lengths, reverse, grads, fwd, bwd, block_order=[4, 1, 5, 0, 3, 2])
    for a, b in zip(in_order[0] + tuple(in_order[1].values()), shuffled[0] + tuple(shuffled[1].values())):
        assert a is None and b is None or torch.equal(a, b)


@pytest.mark.parametrize("cell", CELLS)
def test_emulation_in_bfloat16_meets_the_tolerance_rule(cell):
    """The half-precision schedule (state exchanged in bf16, c and gradients carried in fp32) is
    within the design's rule of the per-step layer computed in bf16."""
    steps, batch, hidden = 8, 5, 33
    lengths = torch.tensor([8, 3, 0, 8, 5])
    layer64 = make_layer(cell, steps, batch, hidden, torch.float64)
    grads64 = make_grads(cell, steps, batch, hidden, torch.float64)
    layer = {k: None if v is None else v.to(torch.bfloat16) for k, v in layer64.items()}
    grads = {k: v.to(torch.bfloat16) for k, v in grads64.items()}
    (out, h_n, c_n), ours = run_emulation(cell, layer, lengths, False, grads, FIVE_SMS, FIVE_SMS)
    layer_up = {k: None if v is None else v.double() for k, v in layer.items()}
    (r_out, r_h_n, r_c_n), ref = run_reference(cell, layer_up, lengths, False, {k: v.double() for k, v in grads.items()})
    (p_out, p_h_n, p_c_n), plain = run_reference(cell, layer, lengths, False, grads)
    assert_close_to_reference(out, r_out, p_out, "out")
    assert_close_to_reference(h_n, r_h_n, p_h_n, "h_n")
    if cell == "lstm":
        assert_close_to_reference(c_n, r_c_n, p_c_n, "c_n")
    for name in ("gx", "h0"):
        assert_close_to_reference(ours[name], ref[name], plain[name], f"grad {name}")


def test_previous_states_start_each_row_at_its_first_step():
    seq = torch.arange(1.0, 13.0).view(4, 3, 1)   # state after step t of row b: 3t + b + 1
    init = torch.tensor([[-1.0], [-2.0], [-3.0]])
    lengths = torch.tensor([4, 2, 0])
    fwd = P.previous_states(seq, init, lengths, reverse=False)
    assert fwd[0].flatten().tolist() == [-1, -2, -3] and torch.equal(fwd[1:], seq[:-1])
    rev = P.previous_states(seq, init, lengths, reverse=True)
    # row 0 runs t = 3, 2, 1, 0; row 1 runs t = 1, 0; row 2 never runs
    assert rev[:, 0, 0].tolist() == [4, 7, 10, -1]
    assert rev[:2, 1, 0].tolist() == [5, -2]
