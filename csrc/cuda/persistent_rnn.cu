// Persistent whole-sequence GRU/LSTM kernels; the contract is in persistent_rnn.h.
//
// One block owns `units` hidden units and up to 16 batch rows; its weight slice stays in
// shared memory for the whole sequence. Forward, per step s (t = s, or T-1-s reversed):
//   stage h_{s-1} (16 rows x H) from global: h0 at s = 0, else the ping-pong state buffer
//   partial = h_{s-1} @ W_slice^T        (mma.sync m16n8k16 for fp16/bf16, FMA for fp32)
//   epilogue per (row, unit): gates.h, write out/saved, write h_s to state[(s+1) & 1]
//   arrive at the group barrier; prefetch gx of the next step; wait at the barrier
// Backward, per step (t in the opposite order):
//   epilogue per (row, unit): gate gradients from the carried dh (+ grad_out), write grad_gx/grad_gh[t]
//   arrive; prefetch the next step's saved tensors; wait
//   stage grad_gh[t] (16 rows x G*H); partial = grad_gh[t] @ W_hh[:, units]; dh = direct + partial
//
// Grid barrier: a hand-rolled counter per batch group (red.release / ld.acquire at gpu scope),
// under a cooperative launch. The cooperative launch is kept for its guarantee that every block
// is resident at once (a spin barrier waiting on an unscheduled block would hang) and for its
// clean error when the grid is too large. The barrier itself is ours rather than
// cooperative_groups' grid.sync() because (1) it splits into arrive and wait, so the next
// step's gx/saved loads are issued in between and their latency hides behind the barrier,
// and (2) blocks owning different batch rows never exchange data, so each group of blocks
// waits only for its own members. The counter only grows (barrier k waits for k * blocks
// arrivals), so it needs no reset between steps; the launcher zeroes it before each launch.
//
// Memory ordering: a block's threads issue their state stores, __syncthreads(), then thread 0
// releases (cumulative over the block's stores); a waiting block's thread 0 acquires, then
// __syncthreads() orders its other threads' loads after the acquire. Data written by other
// blocks is read with ld.global.cg (L2, never a stale L1 line from two steps earlier).
#include "persistent_rnn.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "common.cuh"
#include "fused_s2s/gates.h"

namespace fused_s2s {
namespace persistent {
namespace {

constexpr int kLoadBatch = 8;  // global loads each thread keeps in flight while staging

// The kernels need sm_80 (mma.sync bf16/f16 m16n8k16, release/acquire at gpu scope). Built for
// an older architecture (a multi-arch build), they compile but trap; query_plan() refuses them.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define FS2S_PERSISTENT_ARCH_OK 1
#else
#define FS2S_PERSISTENT_ARCH_OK 0
#endif

// ----------------------------------------------------------------------------- element types

using cuda::from_float;  // element conversions shared with the per-step kernels (common.cuh)
using cuda::to_float;

// Data written by other blocks of this kernel: through L2 only.
__device__ __forceinline__ float load_cg(const float* p) { return __ldcg(p); }
__device__ __forceinline__ __half load_cg(const __half* p) {
  return __ushort_as_half(__ldcg(reinterpret_cast<const unsigned short*>(p)));
}
__device__ __forceinline__ __nv_bfloat16 load_cg(const __nv_bfloat16* p) {
  return __ushort_as_bfloat16(__ldcg(reinterpret_cast<const unsigned short*>(p)));
}
__device__ __forceinline__ void store_cg(float* p, float v) { __stcg(p, v); }
__device__ __forceinline__ void store_cg(__half* p, __half v) {
  __stcg(reinterpret_cast<unsigned short*>(p), __half_as_ushort(v));
}
__device__ __forceinline__ void store_cg(__nv_bfloat16* p, __nv_bfloat16 v) {
  __stcg(reinterpret_cast<unsigned short*>(p), __bfloat16_as_ushort(v));
}

__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// ------------------------------------------------------------------------------- grid barrier

class GroupBarrier {
 public:
  __device__ GroupBarrier(unsigned* counter, unsigned blocks) : counter_(counter), blocks_(blocks) {}

  // Every thread calls it after issuing this step's stores of exchanged data.
  __device__ void arrive() const {
    __syncthreads();
    if (threadIdx.x == 0) {
#if FS2S_PERSISTENT_ARCH_OK
      asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(counter_), "r"(1u) : "memory");
#else
      __trap();
#endif
    }
  }

  // Returns when every block of the group has arrived `epoch` times.
  __device__ void wait(unsigned epoch) const {
    if (threadIdx.x == 0) {
      const unsigned target = epoch * blocks_;
      unsigned seen = 0;
      do {
#if FS2S_PERSISTENT_ARCH_OK
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter_) : "memory");
#else
        __trap();
#endif
      } while (static_cast<int>(seen - target) < 0);  // wrap-safe comparison
    }
    __syncthreads();
  }

 private:
  unsigned* counter_;
  unsigned blocks_;
};

// ------------------------------------------------------------------------------- block GEMM

// The plan as the kernels use it: element counts and shared-memory offsets.
struct Geometry {
  int units;         // hidden units per block
  int rows;          // batch rows per block (<= 16)
  int weight_rows;   // smem weight rows (padded to 8)
  int tiles;         // 16x8 output tiles = weight_rows / 8
  int tile_groups;   // groups of up to kMaxTilesPerWarp tiles
  int k_split;       // warps sharing a group's reduction
  int k, k_pad, k_chunk;
  int w_pitch, x_pitch;  // smem row pitches, in elements
  int partial_offset, x_offset;  // smem byte offsets of the partial tiles and the staged chunk
};

// x_s[r][0:kc] = x[r][k0:k0+kc] for r < 16, zero outside `rows` x `k`.
template <typename T>
__device__ void stage_chunk(T* x_s, int x_pitch, const T* x, int64_t x_ld, int rows, int k0, int kc, int k) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vector = x_ld % kVec == 0 && k % kVec == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  if (vector) {  // whole 16-byte vectors are in or out of range, since k0 and k are multiples of kVec
    const int per_row = kc / kVec, total = kMaxRowsPerBlock * per_row;
    for (int base = threadIdx.x; base < total; base += kThreads * kLoadBatch) {
      int4 v[kLoadBatch];
#pragma unroll
      for (int q = 0; q < kLoadBatch; ++q) {
        const int i = base + q * kThreads, r = i / per_row, col = k0 + (i % per_row) * kVec;
        v[q] = make_int4(0, 0, 0, 0);
        if (i < total && r < rows && col < k) v[q] = __ldcg(reinterpret_cast<const int4*>(x + r * x_ld + col));
      }
#pragma unroll
      for (int q = 0; q < kLoadBatch; ++q) {
        const int i = base + q * kThreads;
        if (i < total) *reinterpret_cast<int4*>(x_s + (i / per_row) * x_pitch + (i % per_row) * kVec) = v[q];
      }
    }
  } else {
    const int total = kMaxRowsPerBlock * kc;
    for (int base = threadIdx.x; base < total; base += kThreads * kLoadBatch) {
      T v[kLoadBatch];
#pragma unroll
      for (int q = 0; q < kLoadBatch; ++q) {
        const int i = base + q * kThreads, r = i / kc, col = k0 + i % kc;
        v[q] = from_float<T>(0.f);
        if (i < total && r < rows && col < k) v[q] = load_cg(x + r * x_ld + col);
      }
#pragma unroll
      for (int q = 0; q < kLoadBatch; ++q) {
        const int i = base + q * kThreads;
        if (i < total) x_s[(i / kc) * x_pitch + i % kc] = v[q];
      }
    }
  }
}

__device__ __forceinline__ uint32_t lds32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Accumulator slots of a warp: slot i holds tile i of the warp's group; a group of at most 4
// tiles also uses slots 4..7, as a second accumulator per tile that takes every other k-tile
// (two independent MMA chains per tile hide the MMA latency). The slot sums are the product.
__device__ __forceinline__ bool slot_used(int i, int group_tiles, bool two_banks, bool odd) {
  return two_banks ? ((i >> 2) == int(odd) && (i & 3) < group_tiles) : i < group_tiles;
}

// acc[slot] (16x8 fp32, mma.sync C layout: lane l holds rows l/4 and l/4 + 8, cols 2(l%4) and
// +1) += x_s[0:16, 0:16] @ w_s[tile rows, 0:16]^T for the tiles of one group, one k-tile.
// x_s points at the k-tile's first column of the staged rows; w_s at the group's first row.
template <typename T>
__device__ __forceinline__ void mma_k_tile(float (&acc)[kMaxTilesPerWarp][4], const T* x_s, int x_pitch,
                                           const T* w_s, int w_pitch, int group_tiles, bool two_banks, bool odd) {
  const int lane = threadIdx.x & 31, g = lane >> 2, c = (lane & 3) * 2;
  if constexpr (std::is_same<T, float>::value) {
    // float32: plain FMA over the same fragment layout (exact fp32, no tf32)
#pragma unroll
    for (int kk = 0; kk < 16; kk += 4) {
      const float4 a0 = *reinterpret_cast<const float4*>(x_s + g * x_pitch + kk);
      const float4 a1 = *reinterpret_cast<const float4*>(x_s + (g + 8) * x_pitch + kk);
#pragma unroll
      for (int i = 0; i < kMaxTilesPerWarp; ++i) {
        if (!slot_used(i, group_tiles, two_banks, odd)) continue;
        const float* w = w_s + (two_banks ? (i & 3) : i) * 8 * w_pitch + kk;
        const float4 b0 = *reinterpret_cast<const float4*>(w + c * w_pitch);
        const float4 b1 = *reinterpret_cast<const float4*>(w + (c + 1) * w_pitch);
        float* d = acc[i];
        d[0] = fmaf(a0.w, b0.w, fmaf(a0.z, b0.z, fmaf(a0.y, b0.y, fmaf(a0.x, b0.x, d[0]))));
        d[1] = fmaf(a0.w, b1.w, fmaf(a0.z, b1.z, fmaf(a0.y, b1.y, fmaf(a0.x, b1.x, d[1]))));
        d[2] = fmaf(a1.w, b0.w, fmaf(a1.z, b0.z, fmaf(a1.y, b0.y, fmaf(a1.x, b0.x, d[2]))));
        d[3] = fmaf(a1.w, b1.w, fmaf(a1.z, b1.z, fmaf(a1.y, b1.y, fmaf(a1.x, b1.x, d[3]))));
      }
    }
  } else {
    // A (16x16, row-major): rows g and g+8, cols c, c+1 and c+8, c+9. B (16x8, "col"): weight
    // row g of the tile, k = c, c+1 and c+8, c+9. Each pair is contiguous in smem: one 32-bit load.
    const uint32_t a0 = lds32(x_s + g * x_pitch + c), a1 = lds32(x_s + (g + 8) * x_pitch + c);
    const uint32_t a2 = lds32(x_s + g * x_pitch + c + 8), a3 = lds32(x_s + (g + 8) * x_pitch + c + 8);
#pragma unroll
    for (int i = 0; i < kMaxTilesPerWarp; ++i) {
      if (!slot_used(i, group_tiles, two_banks, odd)) continue;
      const T* w = w_s + ((two_banks ? (i & 3) : i) * 8 + g) * w_pitch + c;
      const uint32_t b0 = lds32(w), b1 = lds32(w + 8);
#if !FS2S_PERSISTENT_ARCH_OK
      __trap();
#else
      float* d = acc[i];
      if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
      } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
      }
#endif
    }
  }
}

// partial[ks * tiles + tile] (16x8 fp32, row-major) = the ks-th share of the reduction
// x[0:rows, :] @ w_s[tile rows, :]^T. x (leading dim x_ld) is staged k_chunk columns at a time.
// Warp w computes every tile of group w % tile_groups over the k-tiles ks, ks + k_split, ...
// (ks = w / tile_groups) of each chunk, loading each x fragment once for all of them.
// Ends with a __syncthreads(): the partial tiles are readable by every thread.
template <typename T>
__device__ void block_gemm(const Geometry& geo, const T* x, int64_t x_ld, int rows, const T* w_s, T* x_s,
                           float* partial) {
  const int warp = threadIdx.x >> 5, group = warp % geo.tile_groups, ks = warp / geo.tile_groups;
  const bool active = ks < geo.k_split;
  const int first_tile = group * kMaxTilesPerWarp;
  const int group_tiles = min(kMaxTilesPerWarp, geo.tiles - first_tile);
  const bool two_banks = group_tiles <= kMaxTilesPerWarp / 2;
  const int stride = geo.k_split * 16;
  float acc[kMaxTilesPerWarp][4];
#pragma unroll
  for (int i = 0; i < kMaxTilesPerWarp; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  const T* w_group = w_s + first_tile * 8 * geo.w_pitch;
  for (int k0 = 0; k0 < geo.k_pad; k0 += geo.k_chunk) {
    const int kc = min(geo.k_chunk, geo.k_pad - k0);
    stage_chunk(x_s, geo.x_pitch, x, x_ld, rows, k0, kc, geo.k);
    __syncthreads();
    if (active) {
      bool odd = false;  // the k-tile's parity in this warp's sequence (restarts every chunk)
      for (int kt = ks * 16; kt < kc; kt += stride, odd = !odd) {
        mma_k_tile<T>(acc, x_s + kt, geo.x_pitch, w_group + k0 + kt, geo.w_pitch, group_tiles, two_banks, odd);
      }
    }
    __syncthreads();  // the next chunk overwrites x_s
  }
  if (active) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = (lane & 3) * 2;
#pragma unroll
    for (int i = 0; i < kMaxTilesPerWarp; ++i) {
      if (i >= group_tiles) continue;
      float* out = partial + (ks * geo.tiles + first_tile + i) * 128;
      const float* second = acc[(i + kMaxTilesPerWarp / 2) % kMaxTilesPerWarp];  // tile i's second bank
#pragma unroll
      for (int e = 0; e < 4; ++e) {  // e: (row g, col c), (g, c+1), (g+8, c), (g+8, c+1)
        out[(g + (e >> 1) * 8) * 8 + c + (e & 1)] = acc[i][e] + (two_banks ? second[e] : 0.f);
      }
    }
  }
  __syncthreads();
}

// Element (batch row n, weight row w) of the block's product: the k_split shares summed in order.
__device__ __forceinline__ float read_partial(const Geometry& geo, const float* partial, int n, int w) {
  const float* p = partial + (w >> 3) * 128 + n * 8 + (w & 7);
  float sum = 0.f;
  for (int ks = 0; ks < geo.k_split; ++ks) sum += p[ks * geo.tiles * 128];
  return sum;
}

// --------------------------------------------------------------------------- cell policies
// Per (row b, unit u) pair: Carry is the state a block keeps for the pairs it owns, Input the
// step's loads that do not depend on the recurrence (prefetched behind the barrier).

template <typename T>
struct ForwardParams {
  Geometry geo;
  int64_t steps, batch, hidden;
  bool reverse;
  const T* gx;
  const T* h0;
  const T* c0;
  const T* w_hh;
  const T* b_hh;
  const int64_t* lengths;
  T* out;
  T* h_n;
  T* c_n;
  T* saved;
  T* c_seq;
  T* state;  // two (B,H) buffers of h, alternating by step
  unsigned* counters;
};

template <typename T>
struct BackwardParams {
  Geometry geo;
  int64_t steps, batch, hidden;
  bool reverse;
  const T* grad_out;
  const T* grad_h_n;
  const T* grad_c_n;
  const T* out;    // GRU: h_prev comes from out / h0
  const T* h0;
  const T* c0;     // LSTM: c_prev, c_new come from c_seq / c0
  const T* c_seq;
  const T* saved;
  const T* w_hh;
  const int64_t* lengths;
  T* grad_gx;      // GRU only
  T* grad_gh;      // the exchanged gate gradients (LSTM: grad_gates)
  T* grad_h0;
  T* grad_c0;
  unsigned* counters;
};

// The step a row processes before step t, and whether t is the row's first step.
struct Previous {
  bool first;
  int64_t t;
};
__device__ __forceinline__ Previous previous_step(bool reverse, int64_t t, int64_t len) {
  return reverse ? Previous{t == len - 1, t + 1} : Previous{t == 0, t - 1};
}

template <typename T>
struct GruForward {
  static constexpr int kGates = 3;
  struct Carry { float h; };
  struct Input { float gx[3]; };
  using Params = ForwardParams<T>;

  static __device__ Carry init(const Params& p, int64_t b, int64_t u) { return Carry{to_float(p.h0[b * p.hidden + u])}; }
  static __device__ Input load(const Params& p, int64_t t, int64_t b, int64_t u) {
    const T* gx = p.gx + (t * p.batch + b) * 3 * p.hidden + u;
    return Input{{to_float(gx[0]), to_float(gx[p.hidden]), to_float(gx[2 * p.hidden])}};
  }
  // gh includes b_hh. Updates carry.h (rounded to T, as exchanged).
  static __device__ void step(const Params& p, const float (&gh)[3], const Input& in, Carry& carry, int64_t t,
                              int64_t b, int64_t u) {
    const GruFwd<float> o = gru_fwd(in.gx[0], in.gx[1], in.gx[2], gh[0], gh[1], gh[2], carry.h);
    const int64_t row = t * p.batch + b, H = p.hidden;
    const T h_new = from_float<T>(o.h_new);
    p.out[row * H + u] = h_new;
    if (p.saved) {
      T* s = p.saved + row * 4 * H + u;
      s[0] = from_float<T>(o.r);
      s[H] = from_float<T>(o.z);
      s[2 * H] = from_float<T>(o.n);
      s[3 * H] = from_float<T>(o.gh_n);
    }
    carry.h = to_float(h_new);
  }
  static __device__ void skip(const Params& p, int64_t t, int64_t b, int64_t u) {
    const int64_t row = t * p.batch + b, H = p.hidden;
    const T zero = from_float<T>(0.f);
    p.out[row * H + u] = zero;
    if (p.saved) {
      T* s = p.saved + row * 4 * H + u;
      s[0] = s[H] = s[2 * H] = s[3 * H] = zero;
    }
  }
  static __device__ void finish(const Params& p, const Carry& carry, int64_t b, int64_t u) {
    p.h_n[b * p.hidden + u] = from_float<T>(carry.h);
  }
};

template <typename T>
struct LstmForward {
  static constexpr int kGates = 4;
  struct Carry { float h, c; };  // c stays float32 between steps; c_seq saves it rounded
  struct Input { float gx[4]; };
  using Params = ForwardParams<T>;

  static __device__ Carry init(const Params& p, int64_t b, int64_t u) {
    return Carry{to_float(p.h0[b * p.hidden + u]), to_float(p.c0[b * p.hidden + u])};
  }
  static __device__ Input load(const Params& p, int64_t t, int64_t b, int64_t u) {
    const T* gx = p.gx + (t * p.batch + b) * 4 * p.hidden + u;
    const int64_t H = p.hidden;
    return Input{{to_float(gx[0]), to_float(gx[H]), to_float(gx[2 * H]), to_float(gx[3 * H])}};
  }
  static __device__ void step(const Params& p, const float (&gh)[4], const Input& in, Carry& carry, int64_t t,
                              int64_t b, int64_t u) {
    const LstmFwd<float> s =
        lstm_fwd(in.gx[0] + gh[0], in.gx[1] + gh[1], in.gx[2] + gh[2], in.gx[3] + gh[3], carry.c);
    const int64_t row = t * p.batch + b, H = p.hidden;
    const T h_new = from_float<T>(s.h_new);
    p.out[row * H + u] = h_new;
    if (p.saved) {
      T* sv = p.saved + row * 4 * H + u;
      sv[0] = from_float<T>(s.i);
      sv[H] = from_float<T>(s.f);
      sv[2 * H] = from_float<T>(s.g);
      sv[3 * H] = from_float<T>(s.o);
    }
    if (p.c_seq) p.c_seq[row * H + u] = from_float<T>(s.c_new);
    carry.h = to_float(h_new);
    carry.c = s.c_new;
  }
  static __device__ void skip(const Params& p, int64_t t, int64_t b, int64_t u) {
    const int64_t row = t * p.batch + b, H = p.hidden;
    const T zero = from_float<T>(0.f);
    p.out[row * H + u] = zero;
    if (p.saved) {
      T* sv = p.saved + row * 4 * H + u;
      sv[0] = sv[H] = sv[2 * H] = sv[3 * H] = zero;
    }
    if (p.c_seq) p.c_seq[row * H + u] = zero;
  }
  static __device__ void finish(const Params& p, const Carry& carry, int64_t b, int64_t u) {
    p.h_n[b * p.hidden + u] = from_float<T>(carry.h);
    p.c_n[b * p.hidden + u] = from_float<T>(carry.c);
  }
};

template <typename T>
struct GruBackward {
  static constexpr int kGates = 3;
  struct Carry { float dh, direct; };  // direct: the part of dh_prev not through W_hh
  struct Input { float grad_out, r, z, n, gh_n, h_prev; };
  using Params = BackwardParams<T>;

  static __device__ Carry init(const Params& p, int64_t b, int64_t u) {
    return Carry{p.grad_h_n ? to_float(p.grad_h_n[b * p.hidden + u]) : 0.f, 0.f};
  }
  static __device__ Input load(const Params& p, int64_t t, int64_t b, int64_t u, int64_t len) {
    const int64_t row = t * p.batch + b, H = p.hidden;
    const T* s = p.saved + row * 4 * H + u;
    const Previous prev = previous_step(p.reverse, t, len);
    const T h_prev = prev.first ? p.h0[b * H + u] : p.out[(prev.t * p.batch + b) * H + u];
    return Input{p.grad_out ? to_float(p.grad_out[row * H + u]) : 0.f,
                 to_float(s[0]), to_float(s[H]), to_float(s[2 * H]), to_float(s[3 * H]), to_float(h_prev)};
  }
  static __device__ void step(const Params& p, const Input& in, Carry& carry, int64_t t, int64_t b, int64_t u) {
    const GruBwd<float> o = gru_bwd(carry.dh + in.grad_out, in.h_prev, in.r, in.z, in.n, in.gh_n);
    const int64_t H = p.hidden, at = (t * p.batch + b) * 3 * H + u;
    const T d_r = from_float<T>(o.d_r), d_z = from_float<T>(o.d_z);
    p.grad_gx[at] = d_r;
    p.grad_gx[at + H] = d_z;
    p.grad_gx[at + 2 * H] = from_float<T>(o.d_n);
    p.grad_gh[at] = d_r;
    p.grad_gh[at + H] = d_z;
    p.grad_gh[at + 2 * H] = from_float<T>(o.d_gh_n);
    carry.direct = o.d_h;
  }
  // An inactive row: its state passed through unchanged, so its gradient does too.
  static __device__ void skip(const Params& p, Carry& carry, int64_t t, int64_t b, int64_t u) {
    const int64_t H = p.hidden, at = (t * p.batch + b) * 3 * H + u;
    const T zero = from_float<T>(0.f);
    p.grad_gx[at] = p.grad_gx[at + H] = p.grad_gx[at + 2 * H] = zero;
    p.grad_gh[at] = p.grad_gh[at + H] = p.grad_gh[at + 2 * H] = zero;
    carry.direct = carry.dh;
  }
  static __device__ void finish(const Params& p, const Carry& carry, int64_t b, int64_t u) {
    p.grad_h0[b * p.hidden + u] = from_float<T>(carry.dh);
  }
};

template <typename T>
struct LstmBackward {
  static constexpr int kGates = 4;
  struct Carry { float dh, dc, direct; };
  struct Input { float grad_out, i, f, g, o, c_prev, c_new; };
  using Params = BackwardParams<T>;

  static __device__ Carry init(const Params& p, int64_t b, int64_t u) {
    const int64_t at = b * p.hidden + u;
    return Carry{p.grad_h_n ? to_float(p.grad_h_n[at]) : 0.f, p.grad_c_n ? to_float(p.grad_c_n[at]) : 0.f, 0.f};
  }
  static __device__ Input load(const Params& p, int64_t t, int64_t b, int64_t u, int64_t len) {
    const int64_t row = t * p.batch + b, H = p.hidden;
    const T* s = p.saved + row * 4 * H + u;
    const Previous prev = previous_step(p.reverse, t, len);
    const T c_prev = prev.first ? p.c0[b * H + u] : p.c_seq[(prev.t * p.batch + b) * H + u];
    return Input{p.grad_out ? to_float(p.grad_out[row * H + u]) : 0.f,
                 to_float(s[0]), to_float(s[H]), to_float(s[2 * H]), to_float(s[3 * H]),
                 to_float(c_prev), to_float(p.c_seq[row * H + u])};
  }
  static __device__ void step(const Params& p, const Input& in, Carry& carry, int64_t t, int64_t b, int64_t u) {
    const LstmBwd<float> s =
        lstm_bwd(carry.dh + in.grad_out, carry.dc, in.c_prev, in.c_new, in.i, in.f, in.g, in.o);
    const int64_t H = p.hidden, at = (t * p.batch + b) * 4 * H + u;
    p.grad_gh[at] = from_float<T>(s.d_i);
    p.grad_gh[at + H] = from_float<T>(s.d_f);
    p.grad_gh[at + 2 * H] = from_float<T>(s.d_g);
    p.grad_gh[at + 3 * H] = from_float<T>(s.d_o);
    carry.dc = s.d_c;
    carry.direct = 0.f;  // an LSTM's h reaches h' only through the gates
  }
  static __device__ void skip(const Params& p, Carry& carry, int64_t t, int64_t b, int64_t u) {
    const int64_t H = p.hidden, at = (t * p.batch + b) * 4 * H + u;
    const T zero = from_float<T>(0.f);
    p.grad_gh[at] = p.grad_gh[at + H] = p.grad_gh[at + 2 * H] = p.grad_gh[at + 3 * H] = zero;
    carry.direct = carry.dh;  // dc passes through unchanged as well
  }
  static __device__ void finish(const Params& p, const Carry& carry, int64_t b, int64_t u) {
    p.grad_h0[b * p.hidden + u] = from_float<T>(carry.dh);
    p.grad_c0[b * p.hidden + u] = from_float<T>(carry.dc);
  }
};

// ------------------------------------------------------------------------------------ kernels

// The (row, unit) pairs of a block a thread owns: pair q is element threadIdx.x + q * kThreads
// of the block's rows x units, units fastest (consecutive threads write consecutive units).
struct Pairs {
  bool on[kMaxPairsPerThread];
  int n[kMaxPairsPerThread], j[kMaxPairsPerThread];
  int64_t b[kMaxPairsPerThread], u[kMaxPairsPerThread], len[kMaxPairsPerThread];

  __device__ Pairs(const Geometry& geo, int64_t b0, int64_t u0, int rows, int units, const int64_t* lengths,
                   int64_t steps) {
#pragma unroll
    for (int q = 0; q < kMaxPairsPerThread; ++q) {
      const int e = threadIdx.x + q * kThreads;
      n[q] = e / geo.units;
      j[q] = e % geo.units;
      on[q] = n[q] < rows && j[q] < units;
      b[q] = b0 + n[q];
      u[q] = u0 + j[q];
      // a length past the sequence means the whole sequence; a negative one, no step at all
      len[q] = on[q] ? (lengths ? clamp64(lengths[b[q]], 0, steps) : steps) : 0;
    }
  }
};

struct BlockSlice {
  int64_t u0, b0;
  int units, rows;  // valid units and rows of this block (the last ones may be partial)
};

__device__ __forceinline__ BlockSlice block_slice(const Geometry& geo, int64_t batch, int64_t hidden) {
  BlockSlice s;
  s.u0 = int64_t(blockIdx.x) * geo.units;
  s.b0 = int64_t(blockIdx.y) * geo.rows;
  s.units = int(hidden - s.u0 < geo.units ? hidden - s.u0 : geo.units);
  s.rows = int(batch - s.b0 < geo.rows ? batch - s.b0 : geo.rows);
  return s;
}

__device__ __forceinline__ unsigned* group_counter(unsigned* counters) {
  return counters + blockIdx.y * (kCounterBytes / sizeof(unsigned));
}

template <class Cell, typename T>
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(const ForwardParams<T> p) {
  constexpr int G = Cell::kGates;
  extern __shared__ __align__(128) unsigned char smem[];
  const Geometry& geo = p.geo;
  T* w_s = reinterpret_cast<T*>(smem);
  float* partial = reinterpret_cast<float*>(smem + geo.partial_offset);
  T* x_s = reinterpret_cast<T*>(smem + geo.x_offset);
  const int64_t H = p.hidden;
  const BlockSlice blk = block_slice(geo, p.batch, H);

  // W_hh rows of the block's units, gate-major: smem row g * units + j <- W_hh row g * H + u0 + j.
  for (int64_t i = threadIdx.x; i < int64_t(geo.weight_rows) * geo.k_pad; i += kThreads) {
    const int r = int(i / geo.k_pad), k = int(i % geo.k_pad), gate = r / geo.units, j = r % geo.units;
    T v = from_float<T>(0.f);
    if (gate < G && j < blk.units && k < H) v = p.w_hh[(gate * H + blk.u0 + j) * H + k];
    w_s[r * geo.w_pitch + k] = v;
  }

  const Pairs pairs(geo, blk.b0, blk.u0, blk.rows, blk.units, p.lengths, p.steps);
  typename Cell::Carry carry[kMaxPairsPerThread] = {};
  typename Cell::Input in[kMaxPairsPerThread] = {};
  float bias[kMaxPairsPerThread][G] = {};
  const int64_t t_first = p.reverse ? p.steps - 1 : 0;
#pragma unroll
  for (int q = 0; q < kMaxPairsPerThread; ++q) {
    if (!pairs.on[q]) continue;
    carry[q] = Cell::init(p, pairs.b[q], pairs.u[q]);
#pragma unroll
    for (int g = 0; g < G; ++g) bias[q][g] = p.b_hh ? to_float(p.b_hh[g * H + pairs.u[q]]) : 0.f;
    if (p.steps > 0 && t_first < pairs.len[q]) in[q] = Cell::load(p, t_first, pairs.b[q], pairs.u[q]);
  }

  const GroupBarrier barrier(group_counter(p.counters), gridDim.x);
  const int64_t state_size = p.batch * H;
  for (int64_t s = 0; s < p.steps; ++s) {
    const int64_t t = p.reverse ? p.steps - 1 - s : s;
    const T* h_prev = s == 0 ? p.h0 : p.state + (s & 1) * state_size;
    block_gemm<T>(geo, h_prev + blk.b0 * H, H, blk.rows, w_s, x_s, partial);  // syncs first: w_s is ready

    const bool last = s + 1 == p.steps;
    T* h_next = p.state + ((s + 1) & 1) * state_size;
#pragma unroll
    for (int q = 0; q < kMaxPairsPerThread; ++q) {
      if (!pairs.on[q]) continue;
      if (t < pairs.len[q]) {
        float gh[G];
#pragma unroll
        for (int g = 0; g < G; ++g) gh[g] = read_partial(geo, partial, pairs.n[q], g * geo.units + pairs.j[q]) + bias[q][g];
        Cell::step(p, gh, in[q], carry[q], t, pairs.b[q], pairs.u[q]);
      } else {
        Cell::skip(p, t, pairs.b[q], pairs.u[q]);
      }
      if (!last) store_cg(h_next + pairs.b[q] * H + pairs.u[q], from_float<T>(carry[q].h));
    }
    if (last) break;
    barrier.arrive();
    const int64_t t_next = p.reverse ? t - 1 : t + 1;
#pragma unroll
    for (int q = 0; q < kMaxPairsPerThread; ++q) {
      if (pairs.on[q] && t_next < pairs.len[q]) in[q] = Cell::load(p, t_next, pairs.b[q], pairs.u[q]);
    }
    barrier.wait(unsigned(s + 1));
  }
#pragma unroll
  for (int q = 0; q < kMaxPairsPerThread; ++q) {
    if (pairs.on[q]) Cell::finish(p, carry[q], pairs.b[q], pairs.u[q]);
  }
}

template <class Cell, typename T>
__global__ void __launch_bounds__(kThreads, 1) backward_kernel(const BackwardParams<T> p) {
  constexpr int G = Cell::kGates;
  extern __shared__ __align__(128) unsigned char smem[];
  const Geometry& geo = p.geo;
  T* w_s = reinterpret_cast<T*>(smem);
  float* partial = reinterpret_cast<float*>(smem + geo.partial_offset);
  T* x_s = reinterpret_cast<T*>(smem + geo.x_offset);
  const int64_t H = p.hidden, GH = G * H;
  const BlockSlice blk = block_slice(geo, p.batch, H);

  // W_hh^T rows of the block's units: smem row j <- column u0 + j of W_hh (all G*H rows).
  // j runs fastest so that consecutive threads read consecutive columns of one W_hh row.
  for (int64_t i = threadIdx.x; i < int64_t(geo.weight_rows) * geo.k_pad; i += kThreads) {
    const int j = int(i % geo.weight_rows), m = int(i / geo.weight_rows);
    T v = from_float<T>(0.f);
    if (j < blk.units && m < GH) v = p.w_hh[m * H + blk.u0 + j];
    w_s[j * geo.w_pitch + m] = v;
  }

  const Pairs pairs(geo, blk.b0, blk.u0, blk.rows, blk.units, p.lengths, p.steps);
  typename Cell::Carry carry[kMaxPairsPerThread] = {};
  typename Cell::Input in[kMaxPairsPerThread] = {};
  const int64_t t_first = p.reverse ? 0 : p.steps - 1;  // backward visits the steps in the opposite order
#pragma unroll
  for (int q = 0; q < kMaxPairsPerThread; ++q) {
    if (!pairs.on[q]) continue;
    carry[q] = Cell::init(p, pairs.b[q], pairs.u[q]);
    if (p.steps > 0 && t_first < pairs.len[q]) in[q] = Cell::load(p, t_first, pairs.b[q], pairs.u[q], pairs.len[q]);
  }

  const GroupBarrier barrier(group_counter(p.counters), gridDim.x);
  for (int64_t s = 0; s < p.steps; ++s) {
    const int64_t t = p.reverse ? s : p.steps - 1 - s;
#pragma unroll
    for (int q = 0; q < kMaxPairsPerThread; ++q) {
      if (!pairs.on[q]) continue;
      if (t < pairs.len[q]) {
        Cell::step(p, in[q], carry[q], t, pairs.b[q], pairs.u[q]);
      } else {
        Cell::skip(p, carry[q], t, pairs.b[q], pairs.u[q]);
      }
    }
    barrier.arrive();
    if (s + 1 < p.steps) {
      const int64_t t_next = p.reverse ? t + 1 : t - 1;
#pragma unroll
      for (int q = 0; q < kMaxPairsPerThread; ++q) {
        if (pairs.on[q] && t_next < pairs.len[q]) in[q] = Cell::load(p, t_next, pairs.b[q], pairs.u[q], pairs.len[q]);
      }
    }
    barrier.wait(unsigned(s + 1));

    // dh_prev[:, units] = grad_gh[t] @ W_hh[:, units] (+ the direct part)
    block_gemm<T>(geo, p.grad_gh + (t * p.batch + blk.b0) * GH, GH, blk.rows, w_s, x_s, partial);
#pragma unroll
    for (int q = 0; q < kMaxPairsPerThread; ++q) {
      if (pairs.on[q]) carry[q].dh = carry[q].direct + read_partial(geo, partial, pairs.n[q], pairs.j[q]);
    }
  }
#pragma unroll
  for (int q = 0; q < kMaxPairsPerThread; ++q) {
    if (pairs.on[q]) Cell::finish(p, carry[q], pairs.b[q], pairs.u[q]);
  }
}

// ------------------------------------------------------------------------------------- host

template <typename T>
const void* kernel_of(Cell cell, bool backward) {
  if (backward) {
    return cell == Cell::kGru ? reinterpret_cast<const void*>(&backward_kernel<GruBackward<T>, T>)
                              : reinterpret_cast<const void*>(&backward_kernel<LstmBackward<T>, T>);
  }
  return cell == Cell::kGru ? reinterpret_cast<const void*>(&forward_kernel<GruForward<T>, T>)
                            : reinterpret_cast<const void*>(&forward_kernel<LstmForward<T>, T>);
}

const void* kernel_of(Cell cell, DType dtype, bool backward) {
  switch (dtype) {
    case DType::f32: return kernel_of<float>(cell, backward);
    case DType::f16: return kernel_of<__half>(cell, backward);
    case DType::bf16: return kernel_of<__nv_bfloat16>(cell, backward);
  }
  return nullptr;
}

Geometry geometry_of(const Plan& plan) {
  const int es = element_size(plan.dtype);
  Geometry g;
  g.units = int(plan.units_per_block);
  g.rows = int(plan.rows_per_block);
  g.weight_rows = int(plan.weight_rows);
  g.tiles = int(plan.tiles);
  g.tile_groups = int(plan.tile_groups);
  g.k_split = int(plan.k_split);
  g.k = int(plan.k);
  g.k_pad = int(plan.k_pad);
  g.k_chunk = int(plan.k_chunk);
  g.w_pitch = g.k_pad + kRowPadBytes / es;
  g.x_pitch = g.k_chunk + kRowPadBytes / es;
  g.partial_offset = int(weight_smem_bytes(plan.weight_rows, plan.k_pad, es));
  g.x_offset = g.partial_offset + int(partial_smem_bytes(plan.k_split, plan.tiles));
  return g;
}

bool plan_matches(const Plan& plan, Cell cell, bool backward) {
  return plan.fits && plan.cell == cell && plan.backward == backward;
}

template <typename Params>
cudaError_t launch(const Plan& plan, Params params, void* workspace, cudaStream_t stream) {
  const void* kernel = kernel_of(plan.cell, plan.dtype, plan.backward);
  cudaError_t err = cudaMemsetAsync(workspace, 0, size_t(plan.batch_blocks) * kCounterBytes, stream);
  if (err != cudaSuccess) return err;
  err = cuda::allow_max_dynamic_shared(kernel);
  if (err != cudaSuccess) return err;
  void* args[] = {&params};
  return cudaLaunchCooperativeKernel(kernel, dim3(unsigned(plan.unit_blocks), unsigned(plan.batch_blocks)),
                                     dim3(kThreads), args, size_t(plan.smem_bytes), stream);
}

template <typename T>
cudaError_t forward_typed(const Plan& plan, int64_t steps, bool reverse, const void* gx, const void* h0,
                          const void* c0, const void* w_hh, const void* b_hh, const int64_t* lengths, void* out,
                          void* h_n, void* c_n, void* saved, void* c_seq, void* workspace, cudaStream_t stream) {
  ForwardParams<T> p;
  p.geo = geometry_of(plan);
  p.steps = steps;
  p.batch = plan.batch;
  p.hidden = plan.hidden;
  p.reverse = reverse;
  p.gx = static_cast<const T*>(gx);
  p.h0 = static_cast<const T*>(h0);
  p.c0 = static_cast<const T*>(c0);
  p.w_hh = static_cast<const T*>(w_hh);
  p.b_hh = static_cast<const T*>(b_hh);
  p.lengths = lengths;
  p.out = static_cast<T*>(out);
  p.h_n = static_cast<T*>(h_n);
  p.c_n = static_cast<T*>(c_n);
  p.saved = static_cast<T*>(saved);
  p.c_seq = static_cast<T*>(c_seq);
  p.counters = static_cast<unsigned*>(workspace);
  p.state = reinterpret_cast<T*>(static_cast<char*>(workspace) + plan.batch_blocks * kCounterBytes);
  return launch(plan, p, workspace, stream);
}

template <typename T>
cudaError_t backward_typed(const Plan& plan, int64_t steps, bool reverse, const void* grad_out,
                           const void* grad_h_n, const void* grad_c_n, const void* out, const void* h0,
                           const void* c0, const void* c_seq, const void* saved, const void* w_hh,
                           const int64_t* lengths, void* grad_gx, void* grad_gh, void* grad_h0, void* grad_c0,
                           void* workspace, cudaStream_t stream) {
  BackwardParams<T> p;
  p.geo = geometry_of(plan);
  p.steps = steps;
  p.batch = plan.batch;
  p.hidden = plan.hidden;
  p.reverse = reverse;
  p.grad_out = static_cast<const T*>(grad_out);
  p.grad_h_n = static_cast<const T*>(grad_h_n);
  p.grad_c_n = static_cast<const T*>(grad_c_n);
  p.out = static_cast<const T*>(out);
  p.h0 = static_cast<const T*>(h0);
  p.c0 = static_cast<const T*>(c0);
  p.c_seq = static_cast<const T*>(c_seq);
  p.saved = static_cast<const T*>(saved);
  p.w_hh = static_cast<const T*>(w_hh);
  p.lengths = lengths;
  p.grad_gx = static_cast<T*>(grad_gx);
  p.grad_gh = static_cast<T*>(grad_gh);
  p.grad_h0 = static_cast<T*>(grad_h0);
  p.grad_c0 = static_cast<T*>(grad_c0);
  p.counters = static_cast<unsigned*>(workspace);
  return launch(plan, p, workspace, stream);
}

template <typename... Args>
cudaError_t forward_any(const Plan& plan, Args... args) {
  switch (plan.dtype) {
    case DType::f32: return forward_typed<float>(plan, args...);
    case DType::f16: return forward_typed<__half>(plan, args...);
    case DType::bf16: return forward_typed<__nv_bfloat16>(plan, args...);
  }
  return cudaErrorInvalidValue;
}

template <typename... Args>
cudaError_t backward_any(const Plan& plan, Args... args) {
  switch (plan.dtype) {
    case DType::f32: return backward_typed<float>(plan, args...);
    case DType::f16: return backward_typed<__half>(plan, args...);
    case DType::bf16: return backward_typed<__nv_bfloat16>(plan, args...);
  }
  return cudaErrorInvalidValue;
}

// Restores the caller's current device when it goes out of scope.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&previous_);
    if (device != previous_) cudaSetDevice(device);
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

cudaError_t query_plan_uncached(Cell cell, DType dtype, bool backward, int64_t batch, int64_t hidden, int device,
                                Plan* plan, int64_t max_blocks, int64_t max_rows_per_block) {
  int sms = 0, smem = 0, regs = 0, major = 0, cooperative = 0;
  cudaError_t err;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess ||
      (err = cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device)) != cudaSuccess ||
      (err = cudaDeviceGetAttribute(&regs, cudaDevAttrMaxRegistersPerMultiprocessor, device)) != cudaSuccess ||
      (err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device)) != cudaSuccess ||
      (err = cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device)) != cudaSuccess) {
    return err;
  }
  const int64_t blocks = max_blocks > 0 && max_blocks < sms ? max_blocks : sms;
  *plan = plan_layer(cell, dtype, backward, batch, hidden, blocks, smem, regs, max_rows_per_block);
  if (!plan->fits) return cudaSuccess;
  if (major < 8) {
    plan->fits = false;
    plan->reason = "needs compute capability 8.0 or newer";
    return cudaSuccess;
  }
  if (!cooperative) {
    plan->fits = false;
    plan->reason = "the device does not support cooperative launch";
    return cudaSuccess;
  }
  const DeviceGuard guard(device);
  const void* kernel = kernel_of(cell, dtype, backward);
  if ((err = cuda::allow_max_dynamic_shared(kernel)) != cudaSuccess) return err;
  int per_sm = 0;
  if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, size_t(plan->smem_bytes))) !=
      cudaSuccess) {
    return err;
  }
  if (int64_t(per_sm) * sms < plan->unit_blocks * plan->batch_blocks) {
    plan->fits = false;
    plan->reason = "the compiled kernel's registers/shared memory allow fewer resident blocks than the grid";
  }
  return cudaSuccess;
}

}  // namespace

// The plan depends only on its arguments and the device: made once (device attribute and
// occupancy queries), then looked up on every call.
cudaError_t query_plan(Cell cell, DType dtype, bool backward, int64_t batch, int64_t hidden, int device,
                       Plan* plan, int64_t max_blocks, int64_t max_rows_per_block) {
  using Key = std::tuple<int, int, bool, int64_t, int64_t, int, int64_t, int64_t>;
  static std::mutex mutex;
  static std::map<Key, Plan> cache;
  const Key key{int(cell), int(dtype), backward, batch, hidden, device, max_blocks, max_rows_per_block};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) {
      *plan = it->second;
      return cudaSuccess;
    }
  }
  const cudaError_t err = query_plan_uncached(cell, dtype, backward, batch, hidden, device, plan, max_blocks,
                                              max_rows_per_block);
  if (err == cudaSuccess) {
    const std::lock_guard<std::mutex> lock(mutex);
    if (cache.size() < 4096) cache.emplace(key, *plan);  // bounded: a long run of new shapes stays cheap
  }
  return err;
}

cudaError_t gru_forward(const Plan& plan, int64_t steps, bool reverse, const void* gx, const void* h0,
                        const void* w_hh, const void* b_hh, const int64_t* lengths, void* out, void* h_n,
                        void* saved, void* workspace, cudaStream_t stream) {
  if (!plan_matches(plan, Cell::kGru, false) || steps < 0 || !gx || !h0 || !w_hh || !out || !h_n || !workspace) {
    return cudaErrorInvalidValue;
  }
  return forward_any(plan, steps, reverse, gx, h0, static_cast<const void*>(nullptr), w_hh, b_hh, lengths, out,
                     h_n, static_cast<void*>(nullptr), saved, static_cast<void*>(nullptr), workspace, stream);
}

cudaError_t lstm_forward(const Plan& plan, int64_t steps, bool reverse, const void* gx, const void* h0,
                         const void* c0, const void* w_hh, const void* b_hh, const int64_t* lengths, void* out,
                         void* h_n, void* c_n, void* saved, void* c_seq, void* workspace, cudaStream_t stream) {
  if (!plan_matches(plan, Cell::kLstm, false) || steps < 0 || !gx || !h0 || !c0 || !w_hh || !out || !h_n ||
      !c_n || !workspace) {
    return cudaErrorInvalidValue;
  }
  return forward_any(plan, steps, reverse, gx, h0, c0, w_hh, b_hh, lengths, out, h_n, c_n, saved, c_seq,
                     workspace, stream);
}

cudaError_t gru_backward(const Plan& plan, int64_t steps, bool reverse, const void* grad_out,
                         const void* grad_h_n, const void* out, const void* h0, const void* saved,
                         const void* w_hh, const int64_t* lengths, void* grad_gx, void* grad_gh, void* grad_h0,
                         void* workspace, cudaStream_t stream) {
  if (!plan_matches(plan, Cell::kGru, true) || steps < 0 || !out || !h0 || !saved || !w_hh || !grad_gx ||
      !grad_gh || !grad_h0 || !workspace) {
    return cudaErrorInvalidValue;
  }
  const void* none = nullptr;
  return backward_any(plan, steps, reverse, grad_out, grad_h_n, none, out, h0, none, none, saved, w_hh, lengths,
                      grad_gx, grad_gh, grad_h0, static_cast<void*>(nullptr), workspace, stream);
}

cudaError_t lstm_backward(const Plan& plan, int64_t steps, bool reverse, const void* grad_out,
                          const void* grad_h_n, const void* grad_c_n, const void* c0, const void* c_seq,
                          const void* saved, const void* w_hh, const int64_t* lengths, void* grad_gates,
                          void* grad_h0, void* grad_c0, void* workspace, cudaStream_t stream) {
  if (!plan_matches(plan, Cell::kLstm, true) || steps < 0 || !c0 || !c_seq || !saved || !w_hh || !grad_gates ||
      !grad_h0 || !grad_c0 || !workspace) {
    return cudaErrorInvalidValue;
  }
  const void* none = nullptr;
  return backward_any(plan, steps, reverse, grad_out, grad_h_n, grad_c_n, none, none, c0, c_seq, saved, w_hh,
                      lengths, static_cast<void*>(nullptr), grad_gates, grad_h0, grad_c0, workspace, stream);
}

}  // namespace persistent
}  // namespace fused_s2s
