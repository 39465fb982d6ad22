// Masked attention with an online softmax, shared by the additive (Bahdanau) and dot (Luong)
// ops, which differ only in their Score type (the score of one query/key pair and its
// derivatives). Shapes and rules: see launchers.h.
//
// Forward, per block: QT query steps of one query row x one range ("split") of key positions.
//   Chunks of kKeyChunk keys: each warp scores kKeysPerWarp keys (lanes across the feature
//   dim), the raw scores go to a float32 buffer, warp t updates query t's running max/sum,
//   and the threads (across Dv) rescale and accumulate the context in shared memory.
//   One split: the block finishes the row itself (context, lse, weights = exp(score - lse)).
//   Several splits (few rows, long Tk, as in a decoder step): each writes (max, sum, context)
//   partials, and attention_combine_kernel merges them, flash-decoding style.
// Backward (no atomics, fixed summation orders, so results are deterministic):
//   1. dscores kernel: dW = grad_context . values_s + grad_weights, and the partial row sums
//      delta = sum_s W dW; with one split it finishes dS = W (dW - delta) in place,
//      otherwise attention_softmax_bwd_kernel does;
//   2. dq kernel, parallel over (query step, key split, feature chunk), also the grad_v partials
//      (additive); splits merged by attention_dq_combine_kernel, grad_v by column sums;
//   3. dk/dvalues kernel, parallel over (query row, key block, feature chunk), looping over Tq.
// The additive backward recomputes tanh(q + k) in steps 2 and 3; nothing of size
// (B, Tq, Tk, A) is ever stored.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common.cuh"

namespace fused_s2s {
namespace cuda {

constexpr int kAttnThreads = 256;
constexpr int kAttnWarps = kAttnThreads / 32;
constexpr int kKeyChunk = 32;                             // one key per lane in the softmax update
constexpr int kKeysPerWarp = kKeyChunk / kAttnWarps;
constexpr int kMaxQueriesPerBlock = 8;                    // warp t owns query t's running max/sum
constexpr int64_t kMinKeysPerSplit = 128;
constexpr int kMaxSplits = 128;
constexpr int kFeatureThreads = 128;                      // dq, dk/dvalues: threads across features
constexpr int kKeyBlock = 8;                              // dk/dvalues: keys per block
constexpr int64_t kColumnRows = 1024;                     // rows one column-sum block adds
constexpr size_t kDefaultSharedBytes = 48 * 1024;
static_assert(kKeyChunk == 32 && kKeyChunk % kAttnWarps == 0, "chunk layout");
static_assert(kMaxQueriesPerBlock <= kAttnWarps, "one warp per query in the softmax update");

// --------------------------------------------------------------------------- scores

// e = v . tanh(q + k); d e / d q_a = d e / d k_a = v_a (1 - tanh^2), d e / d v_a = tanh.
template <bool Approx>
struct AdditiveScore {
  static constexpr bool kAdditive = true;
  __device__ static float act(float x) { return tanh_f<Approx>(x); }
  __device__ static float term(float q, float k, float v) { return v * act(q + k); }
  __device__ static float finish(float sum, float /*scale*/) { return sum; }
};

// e = scale * q . k
struct DotScore {
  static constexpr bool kAdditive = false;
  __device__ static float term(float q, float k, float /*v*/) { return q * k; }
  __device__ static float finish(float sum, float scale) { return sum * scale; }
};

// sc[j][t] = sum_a Score::term(q_s[t*dim + a], keys[s_j*dim + a], v_s[a]) for the warp's keys
// s_j = c0 + warp + kAttnWarps * j where key_ok[j] (0 for the others), in every lane.
template <class Score, int QT, typename T>
__device__ __forceinline__ void score_keys(const float* q_s, const float* v_s, const T* __restrict__ keys,
                                           int64_t dim, int64_t c0, const bool (&key_ok)[kKeysPerWarp],
                                           float (&sc)[kKeysPerWarp][QT]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < kKeysPerWarp; ++j)
#pragma unroll
    for (int t = 0; t < QT; ++t) sc[j][t] = 0.f;
  for (int64_t a = lane; a < dim; a += 32) {
    float kv[kKeysPerWarp];
#pragma unroll
    for (int j = 0; j < kKeysPerWarp; ++j)
      kv[j] = key_ok[j] ? to_float(keys[(c0 + warp + kAttnWarps * j) * dim + a]) : 0.f;
    const float va = Score::kAdditive ? v_s[a] : 0.f;
#pragma unroll
    for (int t = 0; t < QT; ++t) {
      const float qa = q_s[t * dim + a];
#pragma unroll
      for (int j = 0; j < kKeysPerWarp; ++j)
        if (key_ok[j]) sc[j][t] += Score::term(qa, kv[j], va);  // key_ok is warp-uniform
    }
  }
#pragma unroll
  for (int j = 0; j < kKeysPerWarp; ++j)
#pragma unroll
    for (int t = 0; t < QT; ++t) sc[j][t] = warp_sum(sc[j][t]);
}

// The running max while it is finite, else 0: the online softmax shifts by it, so that a NaN
// or +inf score (which fmaxf and warp_max drop) still reaches the row sum as NaN or inf.
__device__ __forceinline__ float finite_or_zero(float m) { return fabsf(m) < INFINITY ? m : 0.f; }

// A row's lse and 1 / sum from its max m and l = sum exp(s - m): a row without a valid position
// (l == 0) gets lse = -inf and weights 0; a NaN or +inf score (l NaN or inf) makes the whole row
// NaN, as torch.softmax does.
__device__ __forceinline__ void softmax_finish(float m, float l, float& lse, float& inv_l) {
  if (l == 0.f) {
    lse = -INFINITY, inv_l = 0.f;
  } else if (!(l < INFINITY)) {
    lse = NAN, inv_l = NAN;
  } else {
    lse = m + logf(l), inv_l = 1.f / l;
  }
}

// weights[s] = exp(scores[s] - lse) for s < len, 0 elsewhere and for a row without valid
// positions (lse = -inf), NaN throughout for a NaN row (lse NaN). scores and weights may be the
// same buffer (float32 weights).
template <typename T>
__device__ void write_weights(const float* scores, T* weights, int64_t len_k, int64_t len, float lse) {
  const bool any = lse != -INFINITY;
  const float past = lse == lse ? 0.f : lse;  // past the length: 0, or NaN in a NaN row
  for (int64_t s = threadIdx.x; s < len_k; s += blockDim.x)
    weights[s] = from_float<T>(!any ? 0.f : s < len ? expf(scores[s] - lse) : past);
}

// ---------------------------------------------------------------------------- forward

struct AttnFwdParams {
  const void* q;
  const void* k;
  const void* v;  // additive only
  const void* values;
  const bool* mask;
  const int64_t* lengths;
  const int64_t* kv_batch_idx;
  void* context;
  void* weights;
  float* lse;
  float* scores;    // (Bq*Tq, Tk) raw scores; the weights buffer itself for float32
  float* part_m;    // (Bq*Tq, splits) running max of each split
  float* part_l;    // (Bq*Tq, splits) sum of exp(score - max)
  float* part_acc;  // (Bq*Tq, splits, Dv) unnormalised context
  int64_t batch_q, batch_k, len_q, len_k, dim, dim_v;
  int64_t q_tiles;  // ceil(Tq / QT)
  int64_t keys_per_split;
  int splits;
  float scale;
};

// Dynamic shared memory of the forward kernel, in floats.
struct FwdSmem {
  int64_t q, v, acc, p, alpha, lse, total;
  __host__ __device__ FwdSmem(int qt, bool additive, int64_t dim, int64_t dim_v) {
    q = 0;                               // [QT][dim] queries
    v = q + qt * dim;                    // [dim] the additive score vector
    acc = v + (additive ? dim : 0);      // [QT][dim_v] running context
    p = acc + qt * dim_v;                // [QT][kKeyChunk] chunk scores, then probabilities
    alpha = p + qt * kKeyChunk;          // [QT] rescale factor of the chunk (then 1 / sum)
    lse = alpha + qt;                    // [QT]
    total = lse + qt;
  }
};

template <typename T, class Score, int QT>
__global__ void __launch_bounds__(kAttnThreads, 2) attention_fwd_kernel(const AttnFwdParams p) {
  extern __shared__ float smem[];
  const FwdSmem L(QT, Score::kAdditive, p.dim, p.dim_v);
  float* q_s = smem + L.q;
  float* v_s = smem + L.v;
  float* acc_s = smem + L.acc;
  float* p_s = smem + L.p;
  float* alpha_s = smem + L.alpha;
  float* lse_s = smem + L.lse;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t dim = p.dim, dim_v = p.dim_v, len_k = p.len_k;
  const int64_t i = blockIdx.x / p.q_tiles;
  const int64_t t0 = (blockIdx.x % p.q_tiles) * QT;
  const int nq = static_cast<int>(min(static_cast<int64_t>(QT), p.len_q - t0));
  const int64_t row0 = i * p.len_q + t0;  // first query step of the block in (Bq*Tq)
  const int64_t kb = key_row(p.kv_batch_idx, i, p.batch_k);
  const int64_t len = valid_length(p.lengths, kb, len_k);
  const int64_t s_begin = blockIdx.y * p.keys_per_split;
  const int64_t s_end = min(s_begin + p.keys_per_split, len);
  const T* keys = static_cast<const T*>(p.k) + kb * len_k * dim;
  const T* values = static_cast<const T*>(p.values) + kb * len_k * dim_v;
  const bool* mask = p.mask != nullptr ? p.mask + kb * len_k : nullptr;
  float* scores = p.scores + row0 * len_k;

  const T* q = static_cast<const T*>(p.q) + row0 * dim;
  for (int64_t x = tid; x < QT * dim; x += kAttnThreads) q_s[x] = x / dim < nq ? to_float(q[x]) : 0.f;
  if constexpr (Score::kAdditive) {
    for (int64_t a = tid; a < dim; a += kAttnThreads) v_s[a] = to_float(static_cast<const T*>(p.v)[a]);
  }
  for (int64_t x = tid; x < QT * dim_v; x += kAttnThreads) acc_s[x] = 0.f;
  float m = -INFINITY, l = 0.f;  // running max and sum of query `warp` (warps < QT)
  __syncthreads();

  for (int64_t c0 = s_begin; c0 < s_end; c0 += kKeyChunk) {
    bool key_ok[kKeysPerWarp];
#pragma unroll
    for (int j = 0; j < kKeysPerWarp; ++j) {
      const int64_t s = c0 + warp + kAttnWarps * j;
      key_ok[j] = s < s_end && (mask == nullptr || mask[s]);
    }
    float sc[kKeysPerWarp][QT];
    score_keys<Score, QT>(q_s, v_s, keys, dim, c0, key_ok, sc);
    if (lane == 0) {
#pragma unroll
      for (int j = 0; j < kKeysPerWarp; ++j) {
        const int kk = warp + kAttnWarps * j;
        const int64_t s = c0 + kk;
#pragma unroll
        for (int t = 0; t < QT; ++t) {
          const float e = key_ok[j] ? Score::finish(sc[j][t], p.scale) : -INFINITY;
          p_s[t * kKeyChunk + kk] = e;
          if (t < nq && s < s_end) scores[t * len_k + s] = e;
        }
      }
    }
    __syncthreads();
    if (warp < QT) {  // online softmax update of query `warp`, one key per lane
      const int t = warp;
      const float e = p_s[t * kKeyChunk + lane];
      const float m_new = fmaxf(m, warp_max(e));
      const float shift = finite_or_zero(m_new);
      const float prob = expf(e - shift);  // 0 at a masked key (-inf), NaN/inf for a NaN/+inf score
      const float alpha = m == -INFINITY ? 1.f : expf(finite_or_zero(m) - shift);  // l, acc are 0 until then
      l = l * alpha + warp_sum(prob);
      m = m_new;
      p_s[t * kKeyChunk + lane] = prob;
      if (lane == 0) alpha_s[t] = alpha;
    }
    __syncthreads();
    const int n_keys = static_cast<int>(min(static_cast<int64_t>(kKeyChunk), s_end - c0));
    for (int64_t d = tid; d < dim_v; d += kAttnThreads) {
      float acc[QT];
#pragma unroll
      for (int t = 0; t < QT; ++t) acc[t] = acc_s[t * dim_v + d] * alpha_s[t];
      for (int kk = 0; kk < n_keys; ++kk) {
        if (mask != nullptr && !mask[c0 + kk]) continue;  // weight 0: its values are never read
        const float val = to_float(values[(c0 + kk) * dim_v + d]);
#pragma unroll
        for (int t = 0; t < QT; ++t) acc[t] = fmaf(p_s[t * kKeyChunk + kk], val, acc[t]);
      }
#pragma unroll
      for (int t = 0; t < QT; ++t) acc_s[t * dim_v + d] = acc[t];
    }
    __syncthreads();  // p_s and alpha_s are rewritten by the next chunk
  }

  if (p.splits == 1) {  // the block saw every key: finish the rows
    if (warp < QT && lane == 0) softmax_finish(m, l, lse_s[warp], alpha_s[warp]);
    __syncthreads();
    T* context = static_cast<T*>(p.context) + row0 * dim_v;
    T* weights = static_cast<T*>(p.weights) + row0 * len_k;
    for (int t = 0; t < nq; ++t) {
      for (int64_t d = tid; d < dim_v; d += kAttnThreads)
        context[t * dim_v + d] = from_float<T>(acc_s[t * dim_v + d] * alpha_s[t]);
      write_weights<T>(scores + t * len_k, weights + t * len_k, len_k, len, lse_s[t]);
    }
    if (tid < nq) p.lse[row0 + tid] = lse_s[tid];
  } else {
    for (int t = 0; t < nq; ++t) {
      const int64_t part = (row0 + t) * p.splits + blockIdx.y;
      for (int64_t d = tid; d < dim_v; d += kAttnThreads) p.part_acc[part * dim_v + d] = acc_s[t * dim_v + d];
      if (warp == t && lane == 0) {
        p.part_m[part] = m;
        p.part_l[part] = l;
      }
    }
  }
}

// One block per query step: merges the splits' partials, writes context, lse and weights.
template <typename T>
__global__ void __launch_bounds__(kAttnThreads) attention_combine_kernel(const AttnFwdParams p) {
  __shared__ float factor_s[kMaxSplits];
  const int64_t row = blockIdx.x, i = row / p.len_q;
  const int splits = p.splits;
  const int64_t kb = key_row(p.kv_batch_idx, i, p.batch_k);
  const int64_t len = valid_length(p.lengths, kb, p.len_k);
  const float* part_m = p.part_m + row * splits;
  const float* part_l = p.part_l + row * splits;

  float m = -INFINITY;
  for (int j = 0; j < splits; ++j) m = fmaxf(m, part_m[j]);
  const float shift = finite_or_zero(m);  // each split shifted by its own finite max, or 0
  for (int j = threadIdx.x; j < splits; j += blockDim.x)
    factor_s[j] = part_l[j] == 0.f ? 0.f : expf(finite_or_zero(part_m[j]) - shift);  // an empty split adds nothing
  __syncthreads();
  float l = 0.f;
  for (int j = 0; j < splits; ++j) l += part_l[j] * factor_s[j];
  float lse, inv_l;
  softmax_finish(m, l, lse, inv_l);

  T* context = static_cast<T*>(p.context) + row * p.dim_v;
  const float* part_acc = p.part_acc + row * splits * p.dim_v;
  for (int64_t d = threadIdx.x; d < p.dim_v; d += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < splits; ++j)
      if (factor_s[j] != 0.f) acc = fmaf(factor_s[j], part_acc[j * p.dim_v + d], acc);
    context[d] = from_float<T>(acc * inv_l);
  }
  write_weights<T>(p.scores + row * p.len_k, static_cast<T*>(p.weights) + row * p.len_k, p.len_k, len, lse);
  if (threadIdx.x == 0) p.lse[row] = lse;
}

// --------------------------------------------------------------------------- backward

struct AttnBwdParams {
  const void* grad_context;  // may be nullptr (zeros)
  const void* grad_weights;  // may be nullptr (zeros)
  const void* q;
  const void* k;
  const void* v;  // additive only
  const void* values;
  const bool* mask;
  const int64_t* lengths;
  const int64_t* kv_batch_idx;
  const void* weights;
  const float* lse;
  void* grad_q;
  void* grad_k;
  void* grad_v;  // additive only
  void* grad_values;
  float* dscores;     // (Bq*Tq, Tk): dW, then dS = W (dW - delta)
  float* part_delta;  // (Bq*Tq, splits) when splits > 1
  float* part_dq;     // (Bq*Tq, dq_splits, dim) when dq_splits > 1
  float* part_dv;     // (Bq*Tq*dq_splits, dim), additive only
  float* dv_scratch;  // (ceil(Bq*Tq*dq_splits / kColumnRows), dim) when that is > 1
  int64_t batch_q, batch_k, len_q, len_k, dim, dim_v;
  int64_t q_tiles;  // dscores kernel: ceil(Tq / QT)
  int64_t keys_per_split;
  int splits;
  int64_t dq_keys_per_split;
  int dq_splits;
  int64_t key_blocks;  // ceil(Tk / kKeyBlock)
  float scale;
};

// Dynamic shared memory of the dscores kernel, in floats.
struct DscoresSmem {
  int64_t dc, delta_w, delta, total;
  __host__ __device__ DscoresSmem(int qt, int64_t dim_v) {
    dc = 0;                              // [QT][dim_v] grad_context rows
    delta_w = dc + qt * dim_v;           // [kAttnWarps][QT] per-warp partial delta
    delta = delta_w + kAttnWarps * qt;   // [QT]
    total = delta + qt;
  }
};

// dS[s] = W[s] (dS[s] - delta) for s < len, in place (dS holds dW on entry).
template <typename T>
__device__ void softmax_bwd_row(float* ds, const T* weights, int64_t len, float delta) {
  for (int64_t s = threadIdx.x; s < len; s += blockDim.x) ds[s] = to_float(weights[s]) * (ds[s] - delta);
}

template <typename T, int QT>
__global__ void __launch_bounds__(kAttnThreads, 2) attention_dscores_kernel(const AttnBwdParams p) {
  extern __shared__ float smem[];
  const DscoresSmem L(QT, p.dim_v);
  float* dc_s = smem + L.dc;
  float* delta_w = smem + L.delta_w;
  float* delta_s = smem + L.delta;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t dim_v = p.dim_v, len_k = p.len_k;
  const int64_t i = blockIdx.x / p.q_tiles;
  const int64_t t0 = (blockIdx.x % p.q_tiles) * QT;
  const int nq = static_cast<int>(min(static_cast<int64_t>(QT), p.len_q - t0));
  const int64_t row0 = i * p.len_q + t0;
  const int64_t kb = key_row(p.kv_batch_idx, i, p.batch_k);
  const int64_t len = valid_length(p.lengths, kb, len_k);
  const int64_t s_begin = blockIdx.y * p.keys_per_split;
  const int64_t s_end = min(s_begin + p.keys_per_split, len);
  const T* values = static_cast<const T*>(p.values) + kb * len_k * dim_v;
  const bool* mask = p.mask != nullptr ? p.mask + kb * len_k : nullptr;
  const T* weights = static_cast<const T*>(p.weights) + row0 * len_k;
  const T* grad_w = p.grad_weights != nullptr ? static_cast<const T*>(p.grad_weights) + row0 * len_k : nullptr;
  const bool has_dc = p.grad_context != nullptr;
  float* ds = p.dscores + row0 * len_k;

  if (has_dc) {
    const T* dc = static_cast<const T*>(p.grad_context) + row0 * dim_v;
    for (int64_t x = tid; x < QT * dim_v; x += kAttnThreads) dc_s[x] = x / dim_v < nq ? to_float(dc[x]) : 0.f;
  }
  __syncthreads();

  float delta[QT];  // lane 0: sum of W dW over this warp's keys
#pragma unroll
  for (int t = 0; t < QT; ++t) delta[t] = 0.f;
  for (int64_t c0 = s_begin; c0 < s_end; c0 += kKeyChunk) {
    bool key_ok[kKeysPerWarp];
#pragma unroll
    for (int j = 0; j < kKeysPerWarp; ++j) {
      const int64_t s = c0 + warp + kAttnWarps * j;
      key_ok[j] = s < s_end && (mask == nullptr || mask[s]);
    }
    float dw[kKeysPerWarp][QT];
    if (has_dc) {
      score_keys<DotScore, QT>(dc_s, nullptr, values, dim_v, c0, key_ok, dw);
    } else {
#pragma unroll
      for (int j = 0; j < kKeysPerWarp; ++j)
#pragma unroll
        for (int t = 0; t < QT; ++t) dw[j][t] = 0.f;
    }
    if (lane == 0) {
#pragma unroll
      for (int j = 0; j < kKeysPerWarp; ++j) {
        const int64_t s = c0 + warp + kAttnWarps * j;
        if (s >= s_end) continue;
#pragma unroll
        for (int t = 0; t < QT; ++t) {
          if (t >= nq) continue;
          float g = 0.f;  // masked: W = 0, so dS = 0 whatever dW is
          if (key_ok[j]) {
            g = dw[j][t] + (grad_w != nullptr ? to_float(grad_w[t * len_k + s]) : 0.f);
            delta[t] = fmaf(to_float(weights[t * len_k + s]), g, delta[t]);
          }
          ds[t * len_k + s] = g;
        }
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int t = 0; t < QT; ++t) delta_w[warp * QT + t] = delta[t];
  }
  __syncthreads();
  if (tid < QT) {
    float sum = 0.f;
    for (int w = 0; w < kAttnWarps; ++w) sum += delta_w[w * QT + tid];
    delta_s[tid] = sum;
  }
  __syncthreads();
  if (p.splits == 1) {  // the block saw the whole rows: finish dS in place
    for (int t = 0; t < nq; ++t) softmax_bwd_row<T>(ds + t * len_k, weights + t * len_k, len, delta_s[t]);
  } else if (tid < nq) {
    p.part_delta[(row0 + tid) * p.splits + blockIdx.y] = delta_s[tid];
  }
}

// One block per query step: delta from the splits' partials, then dS in place.
template <typename T>
__global__ void __launch_bounds__(kAttnThreads) attention_softmax_bwd_kernel(const AttnBwdParams p) {
  const int64_t row = blockIdx.x, i = row / p.len_q;
  const int64_t kb = key_row(p.kv_batch_idx, i, p.batch_k);
  const int64_t len = valid_length(p.lengths, kb, p.len_k);
  float delta = 0.f;
  for (int j = 0; j < p.splits; ++j) delta += p.part_delta[row * p.splits + j];
  softmax_bwd_row<T>(p.dscores + row * p.len_k, static_cast<const T*>(p.weights) + row * p.len_k, len, delta);
}

// The factor that turns a feature's summed score derivative into its gradient:
// v[a] (additive: d e / d pre-activation_a = v_a (1 - tanh^2)) or the scale (dot).
template <typename T, class Score>
__device__ __forceinline__ float feature_factor(const AttnBwdParams& p, int64_t a) {
  if constexpr (Score::kAdditive) {
    return to_float(static_cast<const T*>(p.v)[a]);
  } else {
    return p.scale;
  }
}

// grad_q[row, a] over the keys of one split; additive: also grad_v partials. A thread per feature.
template <typename T, class Score>
__global__ void __launch_bounds__(kFeatureThreads) attention_dq_kernel(const AttnBwdParams p) {
  const int64_t row = blockIdx.x, i = row / p.len_q;
  const int64_t a = static_cast<int64_t>(blockIdx.z) * kFeatureThreads + threadIdx.x;
  if (a >= p.dim) return;
  const int64_t dim = p.dim, len_k = p.len_k;
  const int64_t kb = key_row(p.kv_batch_idx, i, p.batch_k);
  const int64_t len = valid_length(p.lengths, kb, len_k);
  const int64_t s_begin = blockIdx.y * p.dq_keys_per_split;
  const int64_t s_end = min(s_begin + p.dq_keys_per_split, len);
  const T* keys = static_cast<const T*>(p.k) + kb * len_k * dim + a;  // column a
  const bool* mask = p.mask != nullptr ? p.mask + kb * len_k : nullptr;
  const float* ds = p.dscores + row * len_k;
  const float qa = to_float(static_cast<const T*>(p.q)[row * dim + a]);

  float gq = 0.f, gv = 0.f;
  if (p.lse == nullptr || p.lse[row] != -INFINITY) {  // a row without valid keys has dS = 0
    for (int64_t s = s_begin; s < s_end; ++s) {
      if (mask != nullptr && !mask[s]) continue;
      const float d = ds[s];
      const float ka = to_float(keys[s * dim]);
      if constexpr (Score::kAdditive) {
        const float th = Score::act(qa + ka);
        gq = fmaf(d, 1.f - th * th, gq);
        gv = fmaf(d, th, gv);
      } else {
        gq = fmaf(d, ka, gq);
      }
    }
  }
  const int64_t part = row * p.dq_splits + blockIdx.y;
  if (p.dq_splits == 1) {
    static_cast<T*>(p.grad_q)[row * dim + a] = from_float<T>(gq * feature_factor<T, Score>(p, a));
  } else {
    p.part_dq[part * dim + a] = gq;
  }
  if constexpr (Score::kAdditive) p.part_dv[part * dim + a] = gv;
}

template <typename T, class Score>
__global__ void __launch_bounds__(kFeatureThreads) attention_dq_combine_kernel(const AttnBwdParams p) {
  const int64_t row = blockIdx.x;
  const int64_t a = static_cast<int64_t>(blockIdx.y) * kFeatureThreads + threadIdx.x;
  if (a >= p.dim) return;
  float sum = 0.f;
  for (int j = 0; j < p.dq_splits; ++j) sum += p.part_dq[(row * p.dq_splits + j) * p.dim + a];
  static_cast<T*>(p.grad_q)[row * p.dim + a] = from_float<T>(sum * feature_factor<T, Score>(p, a));
}

// grad_k and grad_values of kKeyBlock keys of one query row, one thread per feature, summed
// over the query steps. blockIdx.y < ceil(dim / kFeatureThreads): grad_k, else grad_values.
template <typename T, class Score>
__global__ void __launch_bounds__(kFeatureThreads) attention_dk_dvalues_kernel(const AttnBwdParams p) {
  const int64_t i = blockIdx.x / p.key_blocks;
  const int64_t s0 = (blockIdx.x % p.key_blocks) * kKeyBlock;
  const int64_t dim = p.dim, dim_v = p.dim_v, len_k = p.len_k, len_q = p.len_q;
  const int64_t kb = key_row(p.kv_batch_idx, i, p.batch_k);
  const int64_t len = valid_length(p.lengths, kb, len_k);
  const bool* mask = p.mask != nullptr ? p.mask + kb * len_k : nullptr;
  bool ok[kKeyBlock];
  bool any_ok = false;
#pragma unroll
  for (int j = 0; j < kKeyBlock; ++j) {
    const int64_t s = s0 + j;
    ok[j] = s < len && (mask == nullptr || mask[s]);
    any_ok |= ok[j];
  }
  float acc[kKeyBlock];
#pragma unroll
  for (int j = 0; j < kKeyBlock; ++j) acc[j] = 0.f;

  const int64_t a_chunks = (dim + kFeatureThreads - 1) / kFeatureThreads;
  if (blockIdx.y < a_chunks) {
    const int64_t a = static_cast<int64_t>(blockIdx.y) * kFeatureThreads + threadIdx.x;
    if (a >= dim) return;
    const T* q = static_cast<const T*>(p.q) + i * len_q * dim + a;  // column a
    const T* keys = static_cast<const T*>(p.k) + (kb * len_k + s0) * dim + a;
    float kv[kKeyBlock];
#pragma unroll
    for (int j = 0; j < kKeyBlock; ++j) kv[j] = ok[j] ? to_float(keys[j * dim]) : 0.f;
    if (any_ok) {
      for (int64_t t = 0; t < len_q; ++t) {
        const float qa = to_float(q[t * dim]);
        const float* ds = p.dscores + (i * len_q + t) * len_k + s0;
#pragma unroll
        for (int j = 0; j < kKeyBlock; ++j) {
          if (!ok[j]) continue;
          if constexpr (Score::kAdditive) {
            const float th = Score::act(qa + kv[j]);
            acc[j] = fmaf(ds[j], 1.f - th * th, acc[j]);
          } else {
            acc[j] = fmaf(ds[j], qa, acc[j]);
          }
        }
      }
    }
    const float factor = feature_factor<T, Score>(p, a);
    T* grad_k = static_cast<T*>(p.grad_k) + (i * len_k + s0) * dim + a;
#pragma unroll
    for (int j = 0; j < kKeyBlock; ++j)
      if (s0 + j < len_k) grad_k[j * dim] = from_float<T>(acc[j] * factor);
  } else {
    const int64_t d = (static_cast<int64_t>(blockIdx.y) - a_chunks) * kFeatureThreads + threadIdx.x;
    if (d >= dim_v) return;
    if (any_ok && p.grad_context != nullptr) {
      const T* dc = static_cast<const T*>(p.grad_context) + i * len_q * dim_v + d;  // column d
      for (int64_t t = 0; t < len_q; ++t) {
        const float g = to_float(dc[t * dim_v]);
        const T* w = static_cast<const T*>(p.weights) + (i * len_q + t) * len_k + s0;
#pragma unroll
        for (int j = 0; j < kKeyBlock; ++j)
          if (ok[j]) acc[j] = fmaf(to_float(w[j]), g, acc[j]);
      }
    }
    T* grad_values = static_cast<T*>(p.grad_values) + (i * len_k + s0) * dim_v + d;
#pragma unroll
    for (int j = 0; j < kKeyBlock; ++j)
      if (s0 + j < len_k) grad_values[j * dim_v] = from_float<T>(acc[j]);
  }
}

// out[blockIdx.y, c] = sum of in[r, c] over the block's rows; lanes across columns, warps
// across rows, then a fixed-order sum of the warps. An empty row range writes zeros.
template <typename OutT>
__global__ void __launch_bounds__(kAttnThreads) column_sum_kernel(const float* __restrict__ in, int64_t rows,
                                                                  int64_t cols, int64_t rows_per_block,
                                                                  OutT* __restrict__ out) {
  __shared__ float part_s[kAttnWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r_end = min(r_begin + rows_per_block, rows);
  float acc = 0.f;
  if (c < cols)
    for (int64_t r = r_begin + warp; r < r_end; r += kAttnWarps) acc += in[r * cols + c];
  part_s[warp][lane] = acc;
  __syncthreads();
  if (warp == 0 && c < cols) {
    float sum = 0.f;
    for (int w = 0; w < kAttnWarps; ++w) sum += part_s[w][lane];
    out[static_cast<int64_t>(blockIdx.y) * cols + c] = from_float<OutT>(sum);
  }
}

// ------------------------------------------------------------------------- host side

struct SplitPlan {
  int splits;
  int64_t keys_per_split;
};

// Splits the key range when the other grid dimensions leave SMs idle (few rows, long Tk).
inline SplitPlan plan_key_splits(int64_t base_blocks, int64_t len_k) {
  SplitPlan plan{1, len_k > 0 ? len_k : 1};
  const int64_t target = 2 * static_cast<int64_t>(num_sms());
  if (base_blocks > 0 && base_blocks < target && len_k > kMinKeysPerSplit) {
    const int64_t n = std::min({ceil_div(target, base_blocks), ceil_div(len_k, kMinKeysPerSplit),
                                static_cast<int64_t>(kMaxSplits)});
    plan.keys_per_split = ceil_div(ceil_div(len_k, n), kKeyChunk) * kKeyChunk;
    plan.splits = static_cast<int>(ceil_div(len_k, plan.keys_per_split));
  }
  return plan;
}

// Query steps per block: enough to cover Tq (up to 8) while the shared memory stays within the
// default 48 KB; a single step may opt in to more.
template <class SmemFloats>
int plan_queries_per_block(int64_t len_q, SmemFloats smem_floats) {
  int qt = 1;
  while (qt < kMaxQueriesPerBlock && qt < len_q) qt *= 2;
  while (qt > 1 && static_cast<size_t>(smem_floats(qt)) * sizeof(float) > kDefaultSharedBytes) qt /= 2;
  return qt;
}

template <class F>
cudaError_t with_queries_per_block(int qt, F&& f) {
  switch (qt) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
  }
  return cudaErrorInvalidValue;
}

// Allows `kernel` the dynamic shared memory it needs beyond the default.
template <class Kernel>
cudaError_t allow_shared_bytes(Kernel kernel, size_t bytes) {
  if (bytes <= kDefaultSharedBytes) return cudaSuccess;
  if (bytes > max_shared_bytes_optin()) return cudaErrorInvalidValue;
  return allow_max_dynamic_shared(reinterpret_cast<const void*>(kernel));
}

inline bool valid_sizes(int64_t batch_q, int64_t batch_k, int64_t len_q, int64_t len_k, int64_t dim,
                        int64_t dim_v, bool has_kv_batch_idx) {
  return batch_q >= 0 && batch_k >= 0 && len_q >= 0 && len_k >= 0 && dim >= 0 && dim_v >= 0 &&
         (has_kv_batch_idx || batch_q == batch_k);
}

template <class Score>
struct Attention {
  // ------------------------------------------------------------------ forward
  struct FwdPlan {
    int qt;
    int64_t q_tiles;
    SplitPlan split;
    size_t smem_bytes;
  };

  static FwdPlan plan_fwd(int64_t batch_q, int64_t len_q, int64_t len_k, int64_t dim, int64_t dim_v) {
    FwdPlan plan;
    auto smem_floats = [&](int qt) { return FwdSmem(qt, Score::kAdditive, dim, dim_v).total; };
    plan.qt = plan_queries_per_block(len_q, smem_floats);
    plan.q_tiles = ceil_div(len_q, plan.qt);
    plan.split = plan_key_splits(batch_q * plan.q_tiles, len_k);
    plan.smem_bytes = static_cast<size_t>(smem_floats(plan.qt)) * sizeof(float);
    return plan;
  }

  // The same sequence of take() both sizes the workspace and hands it out.
  static void carve_fwd(WorkspaceCarver& ws, const FwdPlan& plan, DType dtype, int64_t batch_q, int64_t len_q,
                        int64_t len_k, int64_t dim_v, AttnFwdParams* p) {
    const int64_t rows = batch_q * len_q, splits = plan.split.splits;
    float* scores = dtype == DType::f32 ? nullptr : ws.take(rows * len_k);
    float* part_m = nullptr;
    float* part_l = nullptr;
    float* part_acc = nullptr;
    if (splits > 1) {
      part_m = ws.take(rows * splits);
      part_l = ws.take(rows * splits);
      part_acc = ws.take(rows * splits * dim_v);
    }
    if (p != nullptr) {
      p->scores = dtype == DType::f32 ? static_cast<float*>(p->weights) : scores;
      p->part_m = part_m;
      p->part_l = part_l;
      p->part_acc = part_acc;
    }
  }

  static size_t fwd_workspace_bytes(DType dtype, int64_t batch_q, int64_t len_q, int64_t len_k, int64_t dim,
                                    int64_t dim_v) {
    if (batch_q <= 0 || len_q <= 0 || len_k < 0 || dim < 0 || dim_v < 0) return 0;
    WorkspaceCarver ws;
    carve_fwd(ws, plan_fwd(batch_q, len_q, len_k, dim, dim_v), dtype, batch_q, len_q, len_k, dim_v, nullptr);
    return ws.bytes();
  }

  // p holds the inputs, outputs and sizes; the rest is filled in here.
  static cudaError_t fwd(DType dtype, AttnFwdParams p, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream) {
    if (!valid_sizes(p.batch_q, p.batch_k, p.len_q, p.len_k, p.dim, p.dim_v, p.kv_batch_idx != nullptr))
      return cudaErrorInvalidValue;
    if (p.batch_q == 0 || p.len_q == 0) return cudaSuccess;
    const FwdPlan plan = plan_fwd(p.batch_q, p.len_q, p.len_k, p.dim, p.dim_v);
    WorkspaceCarver ws(workspace);
    carve_fwd(ws, plan, dtype, p.batch_q, p.len_q, p.len_k, p.dim_v, &p);
    if (ws.bytes() > 0 && (workspace == nullptr || workspace_bytes < ws.bytes())) return cudaErrorInvalidValue;
    p.q_tiles = plan.q_tiles;
    p.keys_per_split = plan.split.keys_per_split;
    p.splits = plan.split.splits;
    const int64_t blocks = p.batch_q * plan.q_tiles, rows = p.batch_q * p.len_q;
    if (blocks > kMaxGridX || rows > kMaxGridX) return cudaErrorInvalidValue;

    return dispatch_dtype(dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      return with_queries_per_block(plan.qt, [&](auto qt_tag) {
        constexpr int QT = decltype(qt_tag)::value;
        auto kernel = attention_fwd_kernel<T, Score, QT>;
        cudaError_t err = allow_shared_bytes(kernel, plan.smem_bytes);
        if (err != cudaSuccess) return err;
        kernel<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(p.splits)), kAttnThreads,
                 plan.smem_bytes, stream>>>(p);
        if (p.splits > 1)
          attention_combine_kernel<T><<<static_cast<unsigned>(rows), kAttnThreads, 0, stream>>>(p);
        return cudaGetLastError();
      });
    });
  }

  // ----------------------------------------------------------------- backward
  struct BwdPlan {
    int qt;
    int64_t q_tiles;
    SplitPlan split;      // dscores kernel
    SplitPlan dq_split;   // dq kernel
    size_t smem_bytes;    // dscores kernel
    int64_t dv_rows;      // rows of grad_v partials
    int64_t dv_row_step;  // rows per column-sum block
  };

  static BwdPlan plan_bwd(int64_t batch_q, int64_t len_q, int64_t len_k, int64_t dim, int64_t dim_v) {
    BwdPlan plan;
    auto smem_floats = [&](int qt) { return DscoresSmem(qt, dim_v).total; };
    plan.qt = plan_queries_per_block(len_q, smem_floats);
    plan.q_tiles = ceil_div(len_q, plan.qt);
    plan.split = plan_key_splits(batch_q * plan.q_tiles, len_k);
    plan.smem_bytes = static_cast<size_t>(smem_floats(plan.qt)) * sizeof(float);
    plan.dq_split = plan_key_splits(batch_q * len_q * ceil_div(dim, kFeatureThreads), len_k);
    plan.dv_rows = batch_q * len_q * plan.dq_split.splits;
    // at most kMaxGridYZ row blocks
    plan.dv_row_step = std::max(kColumnRows, ceil_div(plan.dv_rows, kMaxGridYZ));
    return plan;
  }

  static void carve_bwd(WorkspaceCarver& ws, const BwdPlan& plan, int64_t batch_q, int64_t len_q, int64_t len_k,
                        int64_t dim, AttnBwdParams* p) {
    const int64_t rows = batch_q * len_q;
    float* dscores = ws.take(rows * len_k);
    float* part_delta = plan.split.splits > 1 ? ws.take(rows * plan.split.splits) : nullptr;
    float* part_dq = plan.dq_split.splits > 1 ? ws.take(rows * plan.dq_split.splits * dim) : nullptr;
    float* part_dv = nullptr;
    float* dv_scratch = nullptr;
    if (Score::kAdditive) {
      part_dv = ws.take(plan.dv_rows * dim);
      if (plan.dv_rows > plan.dv_row_step) dv_scratch = ws.take(ceil_div(plan.dv_rows, plan.dv_row_step) * dim);
    }
    if (p != nullptr) {
      p->dscores = dscores;
      p->part_delta = part_delta;
      p->part_dq = part_dq;
      p->part_dv = part_dv;
      p->dv_scratch = dv_scratch;
    }
  }

  static size_t bwd_workspace_bytes(int64_t batch_q, int64_t len_q, int64_t len_k, int64_t dim, int64_t dim_v) {
    if (batch_q < 0 || len_q < 0 || len_k < 0 || dim < 0 || dim_v < 0) return 0;
    WorkspaceCarver ws;
    carve_bwd(ws, plan_bwd(batch_q, len_q, len_k, dim, dim_v), batch_q, len_q, len_k, dim, nullptr);
    return ws.bytes();
  }

  // grad_v[c] = sum of the rows of part_dv, in one pass or two (through dv_scratch).
  template <typename T>
  static void launch_grad_v(const AttnBwdParams& p, const BwdPlan& plan, cudaStream_t stream) {
    const unsigned col_blocks = static_cast<unsigned>(ceil_div(p.dim, 32));
    T* grad_v = static_cast<T*>(p.grad_v);
    if (plan.dv_rows <= plan.dv_row_step) {  // also writes zeros when there are no rows
      column_sum_kernel<T><<<dim3(col_blocks, 1), kAttnThreads, 0, stream>>>(p.part_dv, plan.dv_rows, p.dim,
                                                                            plan.dv_row_step, grad_v);
      return;
    }
    const int64_t parts = ceil_div(plan.dv_rows, plan.dv_row_step);
    column_sum_kernel<float><<<dim3(col_blocks, static_cast<unsigned>(parts)), kAttnThreads, 0, stream>>>(
        p.part_dv, plan.dv_rows, p.dim, plan.dv_row_step, p.dv_scratch);
    column_sum_kernel<T><<<dim3(col_blocks, 1), kAttnThreads, 0, stream>>>(p.dv_scratch, parts, p.dim, parts,
                                                                          grad_v);
  }

  static cudaError_t bwd(DType dtype, AttnBwdParams p, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream) {
    if (!valid_sizes(p.batch_q, p.batch_k, p.len_q, p.len_k, p.dim, p.dim_v, p.kv_batch_idx != nullptr))
      return cudaErrorInvalidValue;
    const BwdPlan plan = plan_bwd(p.batch_q, p.len_q, p.len_k, p.dim, p.dim_v);
    WorkspaceCarver ws(workspace);
    carve_bwd(ws, plan, p.batch_q, p.len_q, p.len_k, p.dim, &p);
    if (ws.bytes() > 0 && (workspace == nullptr || workspace_bytes < ws.bytes())) return cudaErrorInvalidValue;
    p.q_tiles = plan.q_tiles;
    p.keys_per_split = plan.split.keys_per_split;
    p.splits = plan.split.splits;
    p.dq_keys_per_split = plan.dq_split.keys_per_split;
    p.dq_splits = plan.dq_split.splits;
    p.key_blocks = ceil_div(p.len_k, kKeyBlock);
    const int64_t rows = p.batch_q * p.len_q;
    const int64_t dscore_blocks = p.batch_q * plan.q_tiles;
    const int64_t a_chunks = ceil_div(p.dim, kFeatureThreads), d_chunks = ceil_div(p.dim_v, kFeatureThreads);
    const int64_t key_blocks = p.batch_q * p.key_blocks;
    if (dscore_blocks > kMaxGridX || rows > kMaxGridX || key_blocks > kMaxGridX || a_chunks > kMaxGridYZ ||
        a_chunks + d_chunks > kMaxGridYZ || ceil_div(p.dim, 32) > kMaxGridX)
      return cudaErrorInvalidValue;

    return dispatch_dtype(dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      if (rows > 0) {
        cudaError_t err = with_queries_per_block(plan.qt, [&](auto qt_tag) {
          constexpr int QT = decltype(qt_tag)::value;
          auto kernel = attention_dscores_kernel<T, QT>;
          cudaError_t e = allow_shared_bytes(kernel, plan.smem_bytes);
          if (e != cudaSuccess) return e;
          kernel<<<dim3(static_cast<unsigned>(dscore_blocks), static_cast<unsigned>(p.splits)), kAttnThreads,
                   plan.smem_bytes, stream>>>(p);
          return cudaSuccess;
        });
        if (err != cudaSuccess) return err;
        if (p.splits > 1)
          attention_softmax_bwd_kernel<T><<<static_cast<unsigned>(rows), kAttnThreads, 0, stream>>>(p);
        if (a_chunks > 0) {
          attention_dq_kernel<T, Score><<<dim3(static_cast<unsigned>(rows), static_cast<unsigned>(p.dq_splits),
                                               static_cast<unsigned>(a_chunks)),
                                          kFeatureThreads, 0, stream>>>(p);
          if (p.dq_splits > 1)
            attention_dq_combine_kernel<T, Score>
                <<<dim3(static_cast<unsigned>(rows), static_cast<unsigned>(a_chunks)), kFeatureThreads, 0,
                   stream>>>(p);
        }
      }
      if (key_blocks > 0 && a_chunks + d_chunks > 0)
        attention_dk_dvalues_kernel<T, Score>
            <<<dim3(static_cast<unsigned>(key_blocks), static_cast<unsigned>(a_chunks + d_chunks)),
               kFeatureThreads, 0, stream>>>(p);
      if constexpr (Score::kAdditive) {
        if (p.dim > 0) launch_grad_v<T>(p, plan, stream);
      }
      return cudaGetLastError();
    });
  }
};

}  // namespace cuda
}  // namespace fused_s2s
