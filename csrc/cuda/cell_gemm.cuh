// The fused cell step shared by the GRU and LSTM forward kernels: a shared-memory tiled GEMM
// gh = h @ w_hh.T whose block tile covers BM batch rows x BN hidden units *for every gate*
// (rows j, H+j, 2H+j(, 3H+j) of w_hh), so that each thread holds all gate pre-activations of
// its (b, j) outputs in registers and runs the gate math (gates.h) right after the K loop.
// The GEMM's depth K is the width of h: H, or P for an LSTM with projections (h (B,P),
// w_hh (G*H,P)); the projection of h_new itself is left to the caller (it needs whole rows).
#pragma once

#include "common.cuh"

namespace fused_s2s {
namespace cuda {

// Pointers of one cell step. c / c_new are used by the LSTM only.
struct CellFwdParams {
  const void* gx;    // (B, G*H)
  const void* h;     // (B, K)
  const void* c;     // (B, H)
  const void* w_hh;  // (G*H, K)
  const void* b_hh;  // (G*H,) or nullptr
  void* h_new;       // (B, H)
  void* c_new;       // (B, H)
  void* saved;       // (B, 4H)
  int64_t batch, hidden;
  int64_t depth;     // K: H, or the LSTM's proj_size P
};

// Block tile: BM batch rows x BN hidden units (x G gates), TM x TN outputs per thread and gate.
// Tile loads: thread t stages column k0 + t % kBK of rows t / kBK + r * kRowStep, r = 0, 1, ...
template <int G, int BM, int BN, int TM, int TN>
struct CellTile {
  static constexpr int kGates = G;
  static constexpr int kBM = BM, kBN = BN, kTM = TM, kTN = TN;
  static constexpr int kBK = 32;                       // K step
  static constexpr int kThreadsN = BN / TN;
  static constexpr int kThreads = (BM / TM) * (BN / TN);
  static constexpr int kRowStep = kThreads / kBK;      // rows staged per pass of the block
  static constexpr int kHLoads = BM / kRowStep;        // h rows each thread stages
  static constexpr int kWLoadsPerGate = BN / kRowStep; // w_hh rows each thread stages per gate
  static_assert(BM % TM == 0 && BN % TN == 0, "tile must divide into thread tiles");
  static_assert(kThreads % kBK == 0 && BM % kRowStep == 0 && BN % kRowStep == 0,
                "tile loads must divide evenly among the threads");
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps");
};

// Loads the K slice [k0, k0 + kBK) of the block's h rows and w_hh rows into registers (float,
// zero outside the matrices), so that the next slice is in flight while this one is used.
template <typename T, class Tile>
__device__ __forceinline__ void load_cell_tile(const T* __restrict__ h, const T* __restrict__ w_hh,
                                               int64_t batch, int64_t hidden, int64_t depth,
                                               int64_t b0, int64_t j0, int64_t k0,
                                               float (&h_reg)[Tile::kHLoads],
                                               float (&w_reg)[Tile::kGates][Tile::kWLoadsPerGate]) {
  constexpr int R = Tile::kRowStep;
  const int row0 = threadIdx.x / Tile::kBK;
  const int64_t k = k0 + threadIdx.x % Tile::kBK;
  const bool k_ok = k < depth;
#pragma unroll
  for (int r = 0; r < Tile::kHLoads; ++r) {
    const int64_t b = b0 + row0 + r * R;
    h_reg[r] = (k_ok && b < batch) ? to_float(h[b * depth + k]) : 0.f;
  }
#pragma unroll
  for (int g = 0; g < Tile::kGates; ++g)
#pragma unroll
    for (int r = 0; r < Tile::kWLoadsPerGate; ++r) {
      const int64_t j = j0 + row0 + r * R;
      w_reg[g][r] = (k_ok && j < hidden) ? to_float(w_hh[(g * hidden + j) * depth + k]) : 0.f;
    }
}

// acc[g][i][jj] = sum_k h[b0 + ty*TM + i, k] * w_hh[g*H + j0 + tx*TN + jj, k] for this thread.
template <typename T, class Tile>
__device__ __forceinline__ void recurrent_gemm(const T* __restrict__ h, const T* __restrict__ w_hh,
                                               int64_t batch, int64_t hidden, int64_t depth,
                                               int64_t b0, int64_t j0,
                                               float (&acc)[Tile::kGates][Tile::kTM][Tile::kTN]) {
  constexpr int G = Tile::kGates, BM = Tile::kBM, BN = Tile::kBN, TM = Tile::kTM,
                TN = Tile::kTN, BK = Tile::kBK;
  // k-major (transposed) tiles; the +1 padding keeps the transposing stores conflict-free
  __shared__ float h_s[BK][BM + 1];
  __shared__ float w_s[G][BK][BN + 1];

  const int tx = threadIdx.x % Tile::kThreadsN, ty = threadIdx.x / Tile::kThreadsN;
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int jj = 0; jj < TN; ++jj) acc[g][i][jj] = 0.f;

  float h_reg[Tile::kHLoads], w_reg[G][Tile::kWLoadsPerGate];
  load_cell_tile<T, Tile>(h, w_hh, batch, hidden, depth, b0, j0, 0, h_reg, w_reg);
  const int kk_load = threadIdx.x % BK, row0 = threadIdx.x / BK;
  for (int64_t k0 = 0; k0 < depth; k0 += BK) {
#pragma unroll
    for (int r = 0; r < Tile::kHLoads; ++r) h_s[kk_load][row0 + r * Tile::kRowStep] = h_reg[r];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int r = 0; r < Tile::kWLoadsPerGate; ++r)
        w_s[g][kk_load][row0 + r * Tile::kRowStep] = w_reg[g][r];
    __syncthreads();
    if (k0 + BK < depth) load_cell_tile<T, Tile>(h, w_hh, batch, hidden, depth, b0, j0, k0 + BK, h_reg, w_reg);
#pragma unroll 8
    for (int kk = 0; kk < BK; ++kk) {
      float hv[TM];
#pragma unroll
      for (int i = 0; i < TM; ++i) hv[i] = h_s[kk][ty * TM + i];
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int jj = 0; jj < TN; ++jj) {
          const float wv = w_s[g][kk][tx * TN + jj];
#pragma unroll
          for (int i = 0; i < TM; ++i) acc[g][i][jj] = fmaf(hv[i], wv, acc[g][i][jj]);
        }
    }
    __syncthreads();  // the tiles are overwritten by the next step
  }
}

// One cell step: the GEMM, then Cell::epilogue(params, b, j, gh[G]) per output (b, j), where
// gh includes b_hh. Cell provides kGates and the epilogue.
template <typename T, class Cell, class Tile>
__global__ void __launch_bounds__(Tile::kThreads) cell_fwd_kernel(const CellFwdParams p) {
  constexpr int G = Tile::kGates, TM = Tile::kTM, TN = Tile::kTN;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * Tile::kBM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * Tile::kBN;
  float acc[G][TM][TN];
  recurrent_gemm<T, Tile>(static_cast<const T*>(p.h), static_cast<const T*>(p.w_hh), p.batch,
                          p.hidden, p.depth, b0, j0, acc);

  const T* b_hh = static_cast<const T*>(p.b_hh);
  const int tx = threadIdx.x % Tile::kThreadsN, ty = threadIdx.x / Tile::kThreadsN;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int jj = 0; jj < TN; ++jj) {
      const int64_t b = b0 + ty * TM + i, j = j0 + tx * TN + jj;
      if (b >= p.batch || j >= p.hidden) continue;
      float gh[G];
#pragma unroll
      for (int g = 0; g < G; ++g)
        gh[g] = acc[g][i][jj] + (b_hh != nullptr ? to_float(b_hh[g * p.hidden + j]) : 0.f);
      Cell::template epilogue<T>(p, b, j, gh);
    }
  }
}

template <typename T, class Cell, class Tile>
cudaError_t launch_cell_fwd_tile(const CellFwdParams& p, cudaStream_t stream) {
  const int64_t grid_x = ceil_div(p.batch, Tile::kBM), grid_y = ceil_div(p.hidden, Tile::kBN);
  if (grid_x > kMaxGridX || grid_y > kMaxGridYZ) return cudaErrorInvalidValue;
  cell_fwd_kernel<T, Cell, Tile><<<dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y)),
                                   Tile::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// Picks the tile: big tiles when they already give every SM a block, smaller ones otherwise
// (a single step is latency-bound, so more blocks beat more reuse there).
template <class Cell>
cudaError_t launch_cell_fwd(DType dtype, const CellFwdParams& p, cudaStream_t stream) {
  if (p.batch < 0 || p.hidden < 0 || p.depth < 0) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.hidden == 0) return cudaSuccess;
  constexpr int G = Cell::kGates;
  using Large = CellTile<G, 32, 32, 2, 2>;
  using Small = CellTile<G, 16, 16, 1, 1>;
  using Tiny = CellTile<G, 8, 16, 1, 1>;
  const int64_t large_blocks = ceil_div(p.batch, 32) * ceil_div(p.hidden, 32);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (p.batch <= 8) return launch_cell_fwd_tile<T, Cell, Tiny>(p, stream);
    if (large_blocks >= num_sms()) return launch_cell_fwd_tile<T, Cell, Large>(p, stream);
    return launch_cell_fwd_tile<T, Cell, Small>(p, stream);
  });
}

// Grid for a pointwise kernel over n elements, grid-stride loop inside.
inline unsigned pointwise_blocks(int64_t n, int threads) {
  const int64_t wanted = ceil_div(n, threads), cap = static_cast<int64_t>(num_sms()) * 16;
  return static_cast<unsigned>(wanted < cap ? wanted : cap);
}

}  // namespace cuda
}  // namespace fused_s2s
