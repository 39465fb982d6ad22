"""Persistent whole-sequence GRU/LSTM layers: the tiling plan, and a CPU emulation of the kernels.

The CUDA kernels (csrc/cuda/persistent_rnn.{h,cu}) run a whole layer direction in one
cooperative launch: each thread block owns a slice of hidden units and at most 16 batch rows,
keeps the matching rows of W_hh (forward) or W_hh^T (backward) in shared memory for the whole
sequence, and the blocks exchange the per-step state (h forward, grad_gh backward) through
global memory behind one grid barrier per step.

- `plan()` is `plan_layer()` of persistent_rnn.h, line for line (a test compiles the header and
  compares the two): whether a layer fits a device, and the grid and shared memory it would use.
  `fits()` answers it for a hypothetical device (the modules ask the compiled plan of the real
  one, through persistent_autograd.route()).
- `emulate_forward()` / `emulate_backward()` run the kernels' schedule in PyTorch: per step, per
  block (in any order), the weight slice laid out as in shared memory, the exchanged operand
  staged in k-chunks, the warps' k-tile split and accumulator banks, the gate epilogue, the
  ping-pong state buffer, masking by lengths, then the barrier. They test the tiling logic on a
  machine without a GPU.
- `previous_states()` and `recurrent_weight_gradients()` are what the caller does around the
  backward kernel (the state before each step; dW_hh and db_hh as whole-sequence GEMMs);
  fused_s2s/backends/persistent_autograd.py uses them around the bound kernels.
- `estimate_step_us()` is the first-principles time per step used in bench/NOTES.md.

Layout: padded and time-major, gx (T,B,G*H) = x @ W_ih^T + b_ih, h0/c0 (B,H), W_hh (G*H,H),
lengths (B,) or None; a row b is active at step t iff t < lengths[b]; an inactive row keeps
its state and gets zeros in `out` and the saved tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

# Kernel shape: the constants of persistent_rnn.h.
THREADS = 256
WARPS = THREADS // 32
MAX_TILES_PER_WARP = 8      # 16x8 output tiles a warp computes, sharing each x fragment
MAX_PAIRS_PER_THREAD = 4    # (row, unit) pairs a thread owns in the gate epilogue
MAX_ROWS_PER_BLOCK = 16     # batch rows per block: one MMA M tile
MIN_K_CHUNK = 64
ROW_PAD_BYTES = 16
SMEM_ALIGN = 128
COUNTER_BYTES = 128
MAX_REGS_PER_THREAD = 255

GATES = {"gru": 3, "lstm": 4}
ELEMENT_SIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


@dataclass(frozen=True)
class Device:
    """A GPU as the plan and the estimate see it. The throughput numbers only feed
    `estimate_step_us`; the defaults are an H100 SXM's (published or commonly measured)."""
    name: str
    sm_count: int
    smem_per_block: int              # opt-in maximum of dynamic shared memory per block, bytes
    regs_per_sm: int = 65536
    clock_ghz: float = 1.755         # sustained SM clock under load
    l2_bytes_per_us: float = 5.5e6   # aggregate L2 -> SM bandwidth (~5.5 TB/s measured)
    sm_l2_bytes_per_clk: float = 64  # one SM's L2 read bandwidth
    l2_latency_us: float = 0.3       # a dependent L2 round trip under load
    smem_bytes_per_clk: float = 128  # one SM's shared-memory bandwidth
    mma_latency_clk: float = 33      # mma.sync m16n8k16 issue-to-result
    mma_issue_clk: float = 8         # mma.sync m16n8k16 back-to-back on one SM sub-partition
    barrier_us: float = 1.0          # one grid barrier: release, L2 atomic, acquire polling

    @classmethod
    def from_torch(cls, index: Optional[int] = None) -> "Device":
        props = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
        return cls(props.name, props.multi_processor_count,
                   int(getattr(props, "shared_memory_per_block_optin", 0)) or 48 * 1024,
                   int(getattr(props, "regs_per_multiprocessor", 65536)))


H100 = Device("NVIDIA H100 SXM", sm_count=132, smem_per_block=227 * 1024)
A100 = Device("NVIDIA A100", sm_count=108, smem_per_block=163 * 1024, clock_ghz=1.41, l2_bytes_per_us=4.0e6)


@dataclass(frozen=True)
class Plan:
    """The tiling of one layer direction (fields as in persistent_rnn.h's Plan)."""
    fits: bool
    reason: str
    cell: str
    dtype: torch.dtype
    backward: bool
    batch: int
    hidden: int
    units_per_block: int = 0
    rows_per_block: int = 0
    unit_blocks: int = 0
    batch_blocks: int = 0
    k: int = 0              # reduction length: H (forward) or G*H (backward)
    k_pad: int = 0
    k_chunk: int = 0        # columns of the exchanged operand staged in smem per pass
    weight_rows: int = 0    # smem weight rows per block, padded to 8
    tiles: int = 0          # 16x8 output tiles per block
    tile_groups: int = 0    # groups of up to MAX_TILES_PER_WARP tiles
    k_split: int = 0        # warps sharing one group's reduction
    smem_bytes: int = 0
    workspace_bytes: int = 0

    @property
    def blocks(self) -> int:
        return self.unit_blocks * self.batch_blocks

    @property
    def chunks(self) -> int:
        return -(-self.k_pad // self.k_chunk) if self.k_chunk else 0


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _ceil_div(a, b) * b


def weight_smem_bytes(weight_rows: int, k_pad: int, es: int) -> int:
    return _round_up(weight_rows * (k_pad * es + ROW_PAD_BYTES), SMEM_ALIGN)


def partial_smem_bytes(k_split: int, tiles: int) -> int:
    return _round_up(k_split * tiles * 16 * 8 * 4, SMEM_ALIGN)


def chunk_smem_bytes(k_chunk: int, es: int) -> int:
    return _round_up(MAX_ROWS_PER_BLOCK * (k_chunk * es + ROW_PAD_BYTES), SMEM_ALIGN)


def plan(cell: str, dtype: torch.dtype, batch: int, hidden: int, *, backward: bool = False,
         device: Device = H100, max_rows_per_block: int = MAX_ROWS_PER_BLOCK) -> Plan:
    """plan_layer() of persistent_rnn.h. Units per block: the smallest slice that lets the grid
    use every SM (one block per SM), rounded up so its weight rows fill whole 8-row MMA tiles;
    rows: groups of up to 16 batch rows, each group of blocks synchronising only itself."""
    gates, es = GATES[cell], ELEMENT_SIZE[dtype]
    bare = dict(cell=cell, dtype=dtype, backward=backward, batch=batch, hidden=hidden)

    def no(reason: str) -> Plan:
        return Plan(False, reason, **bare)

    if batch < 1 or hidden < 1:
        return no("empty batch or hidden size (nothing to launch)")
    if THREADS * MAX_REGS_PER_THREAD > device.regs_per_sm:
        return no("too few registers per SM")
    if not 1 <= max_rows_per_block <= MAX_ROWS_PER_BLOCK:
        return no("rows per block must be 1..16")
    rows_per_block = min(batch, max_rows_per_block)
    batch_blocks = _ceil_div(batch, rows_per_block)
    if batch_blocks > device.sm_count:
        return no("batch too large: more row groups than SMs")
    max_unit_blocks = device.sm_count // batch_blocks
    rows_per_unit = 1 if backward else gates
    unit_quantum = 8 // math.gcd(8, rows_per_unit)
    units = min(_round_up(_ceil_div(hidden, max_unit_blocks), unit_quantum), hidden)
    unit_blocks = _ceil_div(hidden, units)
    k = gates * hidden if backward else hidden
    k_pad = _round_up(k, 16)
    weight_rows = _round_up(rows_per_unit * units, 8)
    tiles = weight_rows // 8
    if tiles > WARPS * MAX_TILES_PER_WARP:
        return no("hidden size too large: too many weight rows per block")
    if units * rows_per_block > THREADS * MAX_PAIRS_PER_THREAD:
        return no("hidden size too large: too many units per block for the epilogue")
    tile_groups = _ceil_div(tiles, MAX_TILES_PER_WARP)
    k_split = WARPS // tile_groups
    fixed = weight_smem_bytes(weight_rows, k_pad, es) + partial_smem_bytes(k_split, tiles)
    if fixed + chunk_smem_bytes(k_pad, es) <= device.smem_per_block:
        k_chunk = k_pad
    else:
        avail = (device.smem_per_block - fixed) // SMEM_ALIGN * SMEM_ALIGN
        per_row = avail // MAX_ROWS_PER_BLOCK - ROW_PAD_BYTES
        k_chunk = per_row // es // 16 * 16 if per_row > 0 else 0
        if k_chunk < MIN_K_CHUNK:
            return no("W_hh slice does not fit in shared memory")
    workspace = batch_blocks * COUNTER_BYTES + (0 if backward else _round_up(2 * batch * hidden * es, SMEM_ALIGN))
    return Plan(True, "", **bare, units_per_block=units, rows_per_block=rows_per_block, unit_blocks=unit_blocks,
                batch_blocks=batch_blocks, k=k, k_pad=k_pad, k_chunk=k_chunk, weight_rows=weight_rows, tiles=tiles,
                tile_groups=tile_groups, k_split=k_split, smem_bytes=fixed + chunk_smem_bytes(k_chunk, es),
                workspace_bytes=workspace)


def fits(cell: str, dtype: torch.dtype, batch: int, hidden: int, *, training: bool, device: Device = H100) -> bool:
    """Whether a layer can take the persistent path: the forward plan fits, and the backward
    one too when gradients are needed."""
    if dtype not in ELEMENT_SIZE:
        return False
    return plan(cell, dtype, batch, hidden, device=device).fits and (
        not training or plan(cell, dtype, batch, hidden, backward=True, device=device).fits)


# ------------------------------------------------------------------------------- estimate


def estimate_step_us(p: Plan, device: Device = H100) -> Dict[str, float]:
    """Time of one step from first principles (microseconds), by phase, and their sum.
    stage: every block reads its rows of the exchanged operand from L2 (aggregate and per-SM
    bandwidth, plus one L2 round trip per chunk); gemm: the slowest of shared-memory traffic
    (staging writes, x fragments once per tile group, the weight slice), tensor-core issue (4
    sub-partitions) and one warp's MMA dependency chains; epilogue: gate math and partial reads
    (a fixed guess); barrier: the device's figure. Float32 (FMA) is not modelled."""
    assert p.fits, p.reason
    es = ELEMENT_SIZE[p.dtype]
    clk_us = 1.0 / (device.clock_ghz * 1e3)
    block_bytes = p.rows_per_block * p.k * es
    stage = p.chunks * device.l2_latency_us + max(p.blocks * block_bytes / device.l2_bytes_per_us,
                                                  block_bytes / device.sm_l2_bytes_per_clk * clk_us)
    smem_clk = (MAX_ROWS_PER_BLOCK * p.k_pad * (1 + p.tile_groups) + p.weight_rows * p.k_pad) * es \
        / device.smem_bytes_per_clk
    issue_clk = p.tiles * (p.k_pad // 16) * device.mma_issue_clk / 4
    group_tiles = min(p.tiles, MAX_TILES_PER_WARP)
    chains = group_tiles * (2 if group_tiles <= MAX_TILES_PER_WARP // 2 else 1)
    chain_clk = _ceil_div(p.k_pad // 16, p.k_split) * group_tiles * device.mma_latency_clk / chains
    gemm = max(smem_clk, issue_clk, chain_clk) * clk_us
    epilogue = 0.3
    phases = dict(stage=stage, gemm=gemm, epilogue=epilogue, barrier=device.barrier_us)
    phases["total"] = sum(phases.values())
    return phases


# ------------------------------------------------------------------------------ emulation


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _plan_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernel dtype whose tiling the emulation follows (float64 runs float32's)."""
    return torch.float32 if dtype == torch.float64 else dtype


def _lengths(lengths: Optional[Tensor], batch: int, steps: int, device: torch.device = torch.device("cpu")) -> Tensor:
    """Per-row step counts on `device`, clamped to [0, steps] as the kernel does."""
    if lengths is None:
        return torch.full((batch,), steps, dtype=torch.int64, device=device)
    return lengths.to(device=device, dtype=torch.int64).clamp(0, steps)


@dataclass
class _Block:
    u0: int
    units: int
    b0: int
    rows: int
    w_s: Tensor          # (weight_rows, k_pad) in the accumulation dtype, as laid out in smem
    carry: Dict[str, Tensor]


def _blocks(p: Plan, w_hh: Tensor, acc: torch.dtype, order: Optional[Sequence[int]]) -> List[_Block]:
    hidden, gates = p.hidden, GATES[p.cell]
    blocks = []
    for by in range(p.batch_blocks):
        for bx in range(p.unit_blocks):
            u0, b0 = bx * p.units_per_block, by * p.rows_per_block
            units, rows = min(p.units_per_block, hidden - u0), min(p.rows_per_block, p.batch - b0)
            w_s = torch.zeros(p.weight_rows, p.k_pad, dtype=acc)
            w = w_hh.to(acc)
            if p.backward:  # row j <- column u0 + j of W_hh
                w_s[:units, :gates * hidden] = w[:, u0:u0 + units].t()
            else:           # row g * units_per_block + j <- row g * H + u0 + j of W_hh
                for g in range(gates):
                    r = g * p.units_per_block
                    w_s[r:r + units, :hidden] = w[g * hidden + u0:g * hidden + u0 + units]
            blocks.append(_Block(u0, units, b0, rows, w_s, {}))
    if order is not None:
        assert sorted(order) == list(range(len(blocks))), "block_order must be a permutation of the blocks"
        blocks = [blocks[i] for i in order]
    return blocks


def _block_gemm(p: Plan, x_rows: Tensor, w_s: Tensor) -> Tensor:
    """(16, weight_rows): the block's product x_rows @ w_s^T as the kernel forms it. x_rows is
    (rows, k) in the accumulation dtype; staging zero-fills the rest of the 16 x k_pad operand."""
    x = torch.zeros(MAX_ROWS_PER_BLOCK, p.k_pad, dtype=w_s.dtype)
    x[:x_rows.shape[0], :x_rows.shape[1]] = x_rows
    stride = p.k_split * 16
    # acc[ks][tile][bank]: warp (group, ks) takes the k-tiles ks, ks + k_split, ... of each chunk,
    # alternating two banks when its group has at most half the warp's tiles
    acc = torch.zeros(p.k_split, p.tiles, 2, MAX_ROWS_PER_BLOCK, 8, dtype=w_s.dtype)
    assert p.tile_groups * p.k_split <= WARPS
    for k0 in range(0, p.k_pad, p.k_chunk):
        kc = min(p.k_chunk, p.k_pad - k0)
        for group in range(p.tile_groups):
            first = group * MAX_TILES_PER_WARP
            group_tiles = min(MAX_TILES_PER_WARP, p.tiles - first)
            two_banks = group_tiles <= MAX_TILES_PER_WARP // 2
            for ks in range(p.k_split):
                for index, kt in enumerate(range(ks * 16, kc, stride)):
                    a = x[:, k0 + kt:k0 + kt + 16]
                    bank = index % 2 if two_banks else 0
                    for tile in range(first, first + group_tiles):
                        acc[ks, tile, bank] += a @ w_s[tile * 8:tile * 8 + 8, k0 + kt:k0 + kt + 16].t()
    partial = acc[:, :, 0] + acc[:, :, 1]                      # what the warps store
    out = torch.zeros(MAX_ROWS_PER_BLOCK, p.tiles, 8, dtype=w_s.dtype)
    for ks in range(p.k_split):                                # read_partial: shares summed in order
        out = out + partial[ks].transpose(0, 1)
    return out.reshape(MAX_ROWS_PER_BLOCK, p.weight_rows)


# The gate math of csrc/include/fused_s2s/gates.h, on tensors.

def _gru_fwd(gx: Tensor, gh: Tensor, h: Tensor) -> Tuple[Tensor, ...]:
    r = torch.sigmoid(gx[0] + gh[0])
    z = torch.sigmoid(gx[1] + gh[1])
    n = torch.tanh(gx[2] + r * gh[2])
    return r, z, n, gh[2], (1 - z) * n + z * h


def _gru_bwd(g: Tensor, h: Tensor, r: Tensor, z: Tensor, n: Tensor, gh_n: Tensor) -> Tuple[Tensor, ...]:
    d_n = g * (1 - z) * (1 - n * n)
    d_z = g * (h - n) * z * (1 - z)
    d_r = d_n * gh_n * r * (1 - r)
    return d_r, d_z, d_n, d_n * r, g * z


def _lstm_fwd(a: Tensor, c: Tensor) -> Tuple[Tensor, ...]:
    i, f, g, o = torch.sigmoid(a[0]), torch.sigmoid(a[1]), torch.tanh(a[2]), torch.sigmoid(a[3])
    c_new = f * c + i * g
    return i, f, g, o, c_new, o * torch.tanh(c_new)


def _lstm_bwd(grad_h: Tensor, grad_c: Tensor, c: Tensor, c_new: Tensor, i: Tensor, f: Tensor, g: Tensor,
              o: Tensor) -> Tuple[Tensor, ...]:
    tc = torch.tanh(c_new)
    dc = grad_c + grad_h * o * (1 - tc * tc)
    return dc * g * i * (1 - i), dc * c * f * (1 - f), dc * i * (1 - g * g), grad_h * tc * o * (1 - o), dc * f


def _gate_slice(t: Tensor, b: _Block, hidden: int, parts: int) -> Tensor:
    """(parts, rows, units) view of a (rows, parts*H) tensor's columns for the block's units."""
    return t.reshape(t.shape[0], parts, hidden)[:, :, b.u0:b.u0 + b.units].permute(1, 0, 2)


def _set_gates(dst: Tensor, values: Sequence[Tensor], b: _Block, hidden: int) -> None:
    """dst (rows, len(values)*H): write values[k] (rows, units) into gate k's columns of the block's units."""
    for k, v in enumerate(values):
        dst[:, k * hidden + b.u0:k * hidden + b.u0 + b.units] = v.to(dst.dtype)


def _check_plan(p: Plan, cell: str, backward: bool, batch: int, hidden: int) -> None:
    assert p.fits, f"the layer does not fit the persistent kernels: {p.reason}"
    assert (p.cell, p.backward, p.batch, p.hidden) == (cell, backward, batch, hidden), "plan made for another layer"


def emulate_forward(cell: str, gx: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor] = None,
                    c0: Optional[Tensor] = None, lengths: Optional[Tensor] = None, reverse: bool = False, *,
                    device: Device = H100, tiling: Optional[Plan] = None,
                    block_order: Optional[Sequence[int]] = None):
    """The forward kernel's schedule on CPU tensors. Returns (out (T,B,H), h_n, c_n, saved
    (T,B,4H), c_seq (T,B,H)); c_n and c_seq are None for a GRU. Outputs start as NaN, as
    unwritten memory would, so an element the schedule never writes shows up."""
    steps, batch, hidden = gx.shape[0], gx.shape[1], h0.shape[1]
    gates, dt, acc = GATES[cell], gx.dtype, _acc_dtype(gx.dtype)
    p = tiling or plan(cell, _plan_dtype(dt), batch, hidden, device=device)
    _check_plan(p, cell, False, batch, hidden)
    lens = _lengths(lengths, batch, steps)
    nan = float("nan")
    out = torch.full((steps, batch, hidden), nan, dtype=dt)
    saved = torch.full((steps, batch, 4 * hidden), nan, dtype=dt)
    c_seq = torch.full((steps, batch, hidden), nan, dtype=dt) if cell == "lstm" else None
    h_n = torch.full((batch, hidden), nan, dtype=dt)
    c_n = torch.full((batch, hidden), nan, dtype=dt) if cell == "lstm" else None
    state = torch.full((2, batch, hidden), nan, dtype=dt)      # the ping-pong buffer of h
    bias = (b_hh if b_hh is not None else torch.zeros(gates * hidden, dtype=dt)).to(acc)

    blocks = _blocks(p, w_hh, acc, block_order)
    for b in blocks:
        rows, units = slice(b.b0, b.b0 + b.rows), slice(b.u0, b.u0 + b.units)
        b.carry["h"] = h0[rows, units].to(acc)
        if cell == "lstm":
            b.carry["c"] = c0[rows, units].to(acc)             # float32 between steps
        b.carry["bias"] = _gate_slice(bias[None], b, hidden, gates)[:, 0, :]
    for s in range(steps):
        t = steps - 1 - s if reverse else s
        h_src = h0 if s == 0 else state[s % 2]
        for b in blocks:
            rows, units = slice(b.b0, b.b0 + b.rows), slice(b.u0, b.u0 + b.units)
            prod = _block_gemm(p, h_src[rows].to(acc), b.w_s)[:b.rows]
            gh = torch.stack([prod[:, g * p.units_per_block:g * p.units_per_block + b.units] for g in range(gates)])
            gh = gh + b.carry["bias"][:, None, :]
            gx_b = _gate_slice(gx[t, rows].to(acc), b, hidden, gates)
            active = (t < lens[rows])[:, None]
            h = b.carry["h"]
            if cell == "gru":
                r, z, n, gh_n, h_new = _gru_fwd(gx_b, gh, h)
                kept = (r, z, n, gh_n)
            else:
                i, f, g, o, c_new, h_new = _lstm_fwd(gx_b + gh, b.carry["c"])
                kept = (i, f, g, o)
                c_seq[t, rows, units] = torch.where(active, c_new, 0).to(dt)
                b.carry["c"] = torch.where(active, c_new, b.carry["c"])
            h_new = h_new.to(dt).to(acc)                       # h is exchanged in the tensor dtype
            out[t, rows, units] = torch.where(active, h_new, 0).to(dt)
            _set_gates(saved[t, rows], [torch.where(active, v, 0) for v in kept], b, hidden)
            b.carry["h"] = torch.where(active, h_new, h)
            if s + 1 < steps:
                state[(s + 1) % 2, rows, units] = b.carry["h"].to(dt)
        # grid barrier: every block's h_s is in state[(s+1) % 2] before any block reads it
    for b in blocks:
        rows, units = slice(b.b0, b.b0 + b.rows), slice(b.u0, b.u0 + b.units)
        h_n[rows, units] = b.carry["h"].to(dt)
        if cell == "lstm":
            c_n[rows, units] = b.carry["c"].to(dt)
    return out, h_n, c_n, saved, c_seq


def previous_states(seq: Tensor, initial: Tensor, lengths: Optional[Tensor] = None, reverse: bool = False) -> Tensor:
    """(T,B,H): the state before each step, from the sequence of states after each step (`out`
    for h, `c_seq` for c) and the initial one. A row's first step (t = 0, or t = len-1 reversed)
    starts from `initial`; values at a row's inactive steps are unspecified (their gradients are 0)."""
    steps, batch = seq.shape[0], seq.shape[1]
    if steps == 0:
        return seq.clone()
    if not reverse:
        return torch.cat([initial[None], seq[:-1]])
    shifted = torch.cat([seq[1:], initial[None]])
    lens = _lengths(lengths, batch, steps, seq.device)
    first = torch.arange(steps, device=seq.device)[:, None] == (lens - 1)[None, :]
    return torch.where(first[..., None], initial[None].expand_as(seq), shifted)


def emulate_backward(cell: str, grad_out: Optional[Tensor], grad_h_n: Optional[Tensor], saved: Tensor,
                     w_hh: Tensor, *, out: Optional[Tensor] = None, h0: Optional[Tensor] = None,
                     c0: Optional[Tensor] = None, c_seq: Optional[Tensor] = None,
                     grad_c_n: Optional[Tensor] = None, lengths: Optional[Tensor] = None, reverse: bool = False,
                     device: Device = H100, tiling: Optional[Plan] = None,
                     block_order: Optional[Sequence[int]] = None):
    """The backward kernel's schedule on CPU tensors. GRU needs out and h0 (for h_prev), LSTM
    c0 and c_seq (for c_prev, c_new). Returns (grad_gx, grad_gh (T,B,G*H), grad_h0, grad_c0);
    for an LSTM grad_gx is grad_gh (the gate gradients) and for a GRU grad_c0 is None."""
    steps, batch, hidden = saved.shape[0], saved.shape[1], saved.shape[2] // 4
    gates, dt, acc = GATES[cell], saved.dtype, _acc_dtype(saved.dtype)
    p = tiling or plan(cell, _plan_dtype(dt), batch, hidden, backward=True, device=device)
    _check_plan(p, cell, True, batch, hidden)
    lens = _lengths(lengths, batch, steps)
    nan = float("nan")
    grad_gh = torch.full((steps, batch, gates * hidden), nan, dtype=dt)
    grad_gx = torch.full_like(grad_gh, nan) if cell == "gru" else grad_gh
    grad_h0 = torch.full((batch, hidden), nan, dtype=dt)
    grad_c0 = torch.full((batch, hidden), nan, dtype=dt) if cell == "lstm" else None
    prev = previous_states(out, h0, lengths, reverse) if cell == "gru" else previous_states(c_seq, c0, lengths, reverse)

    def zeros_or(t: Optional[Tensor], rows: slice, units: slice, b: _Block) -> Tensor:
        return t[rows, units].to(acc) if t is not None else torch.zeros(b.rows, b.units, dtype=acc)

    blocks = _blocks(p, w_hh, acc, block_order)
    for b in blocks:
        rows, units = slice(b.b0, b.b0 + b.rows), slice(b.u0, b.u0 + b.units)
        b.carry["dh"] = zeros_or(grad_h_n, rows, units, b)
        if cell == "lstm":
            b.carry["dc"] = zeros_or(grad_c_n, rows, units, b)
    for s in range(steps):
        t = s if reverse else steps - 1 - s
        for b in blocks:  # epilogue: this step's gate gradients of the block's units
            rows, units = slice(b.b0, b.b0 + b.rows), slice(b.u0, b.u0 + b.units)
            active = (t < lens[rows])[:, None]
            dh = b.carry["dh"]
            g_out = zeros_or(grad_out[t] if grad_out is not None else None, rows, units, b)
            sv = _gate_slice(saved[t, rows].to(acc), b, hidden, 4)
            zero = torch.zeros_like(dh)
            if cell == "gru":
                d_r, d_z, d_n, d_gh_n, d_h = _gru_bwd(dh + g_out, prev[t, rows, units].to(acc), *sv)
                _set_gates(grad_gx[t, rows], [torch.where(active, v, zero) for v in (d_r, d_z, d_n)], b, hidden)
                _set_gates(grad_gh[t, rows], [torch.where(active, v, zero) for v in (d_r, d_z, d_gh_n)], b, hidden)
                b.carry["direct"] = torch.where(active, d_h, dh)
            else:
                *d_gates, d_c = _lstm_bwd(dh + g_out, b.carry["dc"], prev[t, rows, units].to(acc),
                                          c_seq[t, rows, units].to(acc), *sv)
                _set_gates(grad_gh[t, rows], [torch.where(active, v, zero) for v in d_gates], b, hidden)
                b.carry["dc"] = torch.where(active, d_c, b.carry["dc"])
                b.carry["direct"] = torch.where(active, zero, dh)
        # grid barrier: grad_gh[t] is complete before any block reads it
        for b in blocks:  # dh_prev[:, units] = direct + grad_gh[t] @ W_hh[:, units]
            rows = slice(b.b0, b.b0 + b.rows)
            prod = _block_gemm(p, grad_gh[t, rows].to(acc), b.w_s)[:b.rows, :b.units]
            b.carry["dh"] = b.carry["direct"] + prod
    for b in blocks:
        rows, units = slice(b.b0, b.b0 + b.rows), slice(b.u0, b.u0 + b.units)
        grad_h0[rows, units] = b.carry["dh"].to(dt)
        if cell == "lstm":
            grad_c0[rows, units] = b.carry["dc"].to(dt)
    return grad_gx, grad_gh, grad_h0, grad_c0


def recurrent_weight_gradients(grad_gh: Tensor, h_prev: Tensor, has_bias: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """dW_hh = grad_gh^T @ h_prev and db_hh = sum of grad_gh, over all steps and rows at once
    (inactive steps have grad_gh = 0, so their h_prev does not matter)."""
    gh = grad_gh.reshape(-1, grad_gh.shape[-1])
    return gh.t() @ h_prev.reshape(-1, h_prev.shape[-1]), (gh.sum(0) if has_bias else None)
