// Persistent whole-sequence GRU/LSTM layers, one direction per launch: the time loop runs
// inside one cooperative kernel, each thread block keeps its slice of W_hh (forward) or W_hh^T
// (backward) in shared memory for the whole sequence, and the blocks exchange the per-step
// state through global memory (L2) behind a grid barrier.
//
// Layout (padded, time-major): gx (T,B,G*H) = x @ W_ih^T + b_ih for all steps (one GEMM by
// the caller), h0/c0 (B,H), w_hh (G*H,H), b_hh (G*H) or null, lengths (B,) int64 or null.
// G = 3 (GRU, gates r,z,n) or 4 (LSTM, gates i,f,g,o). With `reverse` the layer runs from the
// last step to the first. A row b is active at step t iff t < lengths[b]; an inactive row keeps
// its state and writes zeros to `out` and the saved tensors, so padded rows need no re-sorting
// (reverse rows start at their own last step, as in a PackedSequence).
//
// Saved for backward, per step (same layout as the per-step kernel contract's `saved`):
//   GRU  saved (T,B,4H) = [r, z, n, gh_n];   LSTM saved (T,B,4H) = activated [i, f, g, o],
//   LSTM c_seq (T,B,H) = the cell state after each step.
// The state before step t (h_prev, c_prev) is not saved: it is `out`/`c_seq` at the previous
// processed step, or h0/c0 at a row's first step (t == 0, or t == len-1 when reversed).
//
// Backward writes the pre-activation gradients of every step; the caller finishes with
// whole-sequence GEMMs: dW_hh = grad_gh^T @ h_prev, db_hh = sum grad_gh, dW_ih = grad_gx^T @ x,
// db_ih = sum grad_gx, dx = grad_gx @ W_ih (LSTM: grad_gh == grad_gx == grad_gates).
//
// Every tensor is contiguous and of the plan's dtype; math and carried state are float32.
// Needs sm_80 or newer (mma.sync bf16/f16, release/acquire atomics) and cooperative launch.
// This header is torch-free and CUDA-kernel-free: plan_layer() is plain C++.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <numeric>

#include "dtype.h"

namespace fused_s2s {
namespace persistent {

enum class Cell : int { kGru = 0, kLstm = 1 };
using cuda::DType;
using cuda::element_size;

// Kernel shape. fused_s2s/backends/persistent.py mirrors these constants and plan_layer().
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTilesPerWarp = 8;      // 16x8 output tiles a warp computes (sharing each x fragment)
constexpr int kMaxPairsPerThread = 4;    // (row, unit) pairs a thread owns in the gate epilogue
constexpr int kMaxRowsPerBlock = 16;     // batch rows per block: one MMA M tile
constexpr int kMinKChunk = 64;           // fewest columns of the exchanged operand staged per pass
constexpr int kRowPadBytes = 16;         // smem row skew: a row pitch of 4 (mod 8) words is conflict-free
constexpr int kSmemAlign = 128;
constexpr int kCounterBytes = 128;       // one barrier counter per batch group, each on its own line
constexpr int kMaxRegsPerThread = 255;

struct Plan {
  bool fits = false;
  const char* reason = "not planned";  // why not, when !fits (a static string)
  // the problem it was made for; launchers refuse a plan made for another one
  Cell cell = Cell::kGru;
  DType dtype = DType::f32;
  bool backward = false;
  int64_t batch = 0, hidden = 0;
  // grid: unit_blocks x batch_blocks blocks of kThreads threads, one block per SM
  int64_t units_per_block = 0, rows_per_block = 0, unit_blocks = 0, batch_blocks = 0;
  int64_t k = 0;            // reduction length: H (forward: h @ W_hh^T) or G*H (backward: dgh @ W_hh)
  int64_t k_pad = 0;        // k rounded up to the MMA K of 16
  int64_t k_chunk = 0;      // columns of the exchanged operand staged in smem per pass
  int64_t weight_rows = 0;  // W_hh rows (forward: G per unit) or W_hh^T rows (backward: 1 per unit), padded to 8
  int64_t tiles = 0;        // 16x8 output tiles per block (= weight_rows / 8)
  int64_t tile_groups = 0;  // groups of up to kMaxTilesPerWarp tiles, one warp each per k share
  int64_t k_split = 0;      // warps sharing one group's reduction (warp w: group w % tile_groups, share w / tile_groups)
  int64_t smem_bytes = 0, workspace_bytes = 0;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline int gates_of(Cell cell) { return cell == Cell::kGru ? 3 : 4; }

// Shared-memory bytes of a block: the weight slice, the fp32 partial tiles, one staged chunk.
inline int64_t weight_smem_bytes(int64_t weight_rows, int64_t k_pad, int es) {
  return round_up(weight_rows * (k_pad * es + kRowPadBytes), kSmemAlign);
}
inline int64_t partial_smem_bytes(int64_t k_split, int64_t tiles) {
  return round_up(k_split * tiles * 16 * 8 * 4, kSmemAlign);
}
inline int64_t chunk_smem_bytes(int64_t k_chunk, int es) {
  return round_up(kMaxRowsPerBlock * (k_chunk * es + kRowPadBytes), kSmemAlign);
}

// The tiling decision, from the device's numbers alone (no CUDA calls).
// Rows: blocks take up to 16 batch rows each (one MMA tile); groups of blocks that own different
// rows are independent and synchronise only among themselves. Units: the smallest slice that lets
// the grid use every SM (one block per SM), rounded up so the slice's weight rows fill whole
// 8-row MMA tiles (a rounding that costs no block any extra work and saves blocks).
// The exchanged operand (h or dgh, 16 rows x k) is staged whole when it fits next to the
// weights, else in chunks of k_chunk columns.
// `max_rows_per_block` (1..16) and a `sm_count` below the device's are tuning knobs: fewer rows
// or fewer blocks per group mean less L2 traffic per step but more weights per block.
inline Plan plan_layer(Cell cell, DType dtype, bool backward, int64_t batch, int64_t hidden, int64_t sm_count,
                       int64_t smem_per_block, int64_t regs_per_sm = 65536,
                       int64_t max_rows_per_block = kMaxRowsPerBlock) {
  Plan p;
  p.cell = cell;
  p.dtype = dtype;
  p.backward = backward;
  p.batch = batch;
  p.hidden = hidden;
  const int gates = gates_of(cell);
  const int es = element_size(dtype);
  if (batch < 1 || hidden < 1) { p.reason = "empty batch or hidden size (nothing to launch)"; return p; }
  if (static_cast<int64_t>(kThreads) * kMaxRegsPerThread > regs_per_sm) { p.reason = "too few registers per SM"; return p; }
  if (max_rows_per_block < 1 || max_rows_per_block > kMaxRowsPerBlock) { p.reason = "rows per block must be 1..16"; return p; }
  p.rows_per_block = batch < max_rows_per_block ? batch : max_rows_per_block;
  p.batch_blocks = ceil_div(batch, p.rows_per_block);
  if (p.batch_blocks > sm_count) { p.reason = "batch too large: more row groups than SMs"; return p; }
  const int64_t max_unit_blocks = sm_count / p.batch_blocks;
  const int64_t rows_per_unit = backward ? 1 : gates;
  const int64_t unit_quantum = 8 / std::gcd<int64_t>(8, rows_per_unit);  // units whose rows fill 8-row tiles
  const int64_t units = round_up(ceil_div(hidden, max_unit_blocks), unit_quantum);
  p.units_per_block = units < hidden ? units : hidden;
  p.unit_blocks = ceil_div(hidden, p.units_per_block);
  p.k = backward ? gates * hidden : hidden;
  p.k_pad = round_up(p.k, 16);
  p.weight_rows = round_up(rows_per_unit * p.units_per_block, 8);
  p.tiles = p.weight_rows / 8;
  if (p.tiles > kWarps * kMaxTilesPerWarp) { p.reason = "hidden size too large: too many weight rows per block"; return p; }
  if (p.units_per_block * p.rows_per_block > kThreads * kMaxPairsPerThread) {
    p.reason = "hidden size too large: too many units per block for the epilogue";
    return p;
  }
  p.tile_groups = ceil_div(p.tiles, kMaxTilesPerWarp);
  p.k_split = kWarps / p.tile_groups;
  const int64_t fixed = weight_smem_bytes(p.weight_rows, p.k_pad, es) + partial_smem_bytes(p.k_split, p.tiles);
  if (fixed + chunk_smem_bytes(p.k_pad, es) <= smem_per_block) {
    p.k_chunk = p.k_pad;
  } else {
    const int64_t avail = (smem_per_block - fixed) / kSmemAlign * kSmemAlign;  // may be negative
    const int64_t per_row = avail / kMaxRowsPerBlock - kRowPadBytes;
    p.k_chunk = per_row > 0 ? per_row / es / 16 * 16 : 0;
    if (p.k_chunk < kMinKChunk) { p.reason = "W_hh slice does not fit in shared memory"; return p; }
  }
  p.smem_bytes = fixed + chunk_smem_bytes(p.k_chunk, es);
  p.workspace_bytes = p.batch_blocks * kCounterBytes +
                      (backward ? 0 : round_up(2 * batch * hidden * es, kSmemAlign));
  p.fits = true;
  p.reason = "";
  return p;
}

// plan_layer() with the numbers of `device`, then checked against the compiled kernel
// (compute capability, cooperative launch, occupancy with its real register count).
// max_blocks (0: one per SM) and max_rows_per_block are plan_layer()'s tuning knobs.
cudaError_t query_plan(Cell cell, DType dtype, bool backward, int64_t batch, int64_t hidden, int device,
                       Plan* plan, int64_t max_blocks = 0, int64_t max_rows_per_block = kMaxRowsPerBlock);

// Launchers. `plan` comes from query_plan() for the same cell/dtype/direction/batch/hidden;
// `workspace` holds plan.workspace_bytes bytes (16-byte aligned, contents irrelevant: the
// launcher clears the barrier counters on `stream`). Optional pointers may be null: b_hh,
// lengths; saved and c_seq (inference: nothing is saved); grad_out, grad_h_n, grad_c_n (zero).
// Returns cudaErrorInvalidValue for a plan that does not fit or was made for another problem.
cudaError_t gru_forward(const Plan& plan, int64_t steps, bool reverse, const void* gx, const void* h0,
                        const void* w_hh, const void* b_hh, const int64_t* lengths, void* out, void* h_n,
                        void* saved, void* workspace, cudaStream_t stream);

cudaError_t lstm_forward(const Plan& plan, int64_t steps, bool reverse, const void* gx, const void* h0,
                         const void* c0, const void* w_hh, const void* b_hh, const int64_t* lengths, void* out,
                         void* h_n, void* c_n, void* saved, void* c_seq, void* workspace, cudaStream_t stream);

// GRU backward: grad_gx (T,B,3H) = [d_r, d_z, d_n], grad_gh (T,B,3H) = [d_r, d_z, d_n * r],
// grad_h0 (B,H). Reads h_prev from out/h0.
cudaError_t gru_backward(const Plan& plan, int64_t steps, bool reverse, const void* grad_out,
                         const void* grad_h_n, const void* out, const void* h0, const void* saved,
                         const void* w_hh, const int64_t* lengths, void* grad_gx, void* grad_gh, void* grad_h0,
                         void* workspace, cudaStream_t stream);

// LSTM backward: grad_gates (T,B,4H) (= grad_gx = grad_gh), grad_h0, grad_c0 (B,H).
// Reads c_prev/c_new from c_seq/c0.
cudaError_t lstm_backward(const Plan& plan, int64_t steps, bool reverse, const void* grad_out,
                          const void* grad_h_n, const void* grad_c_n, const void* c0, const void* c_seq,
                          const void* saved, const void* w_hh, const int64_t* lengths, void* grad_gates,
                          void* grad_h0, void* grad_c0, void* workspace, cudaStream_t stream);

}  // namespace persistent
}  // namespace fused_s2s
