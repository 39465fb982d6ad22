// What the attention kernel files share: the source-position rules (mask, lengths,
// kv_batch_idx), the softmax forward (scale, mask, normalise, lse) and backward, fused, and the
// argument block of the row kernels.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/index_select.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common.h"

namespace fused_s2s {
namespace cpu {
// Internal linkage, as when all kernels were one file: each kernel file compiles its own copy
// of what it uses.
namespace {

// Which source positions a query row attends to: mask, lengths and kv_batch_idx as in the
// contract. Positions at or beyond a row's length are skipped, not just masked.
struct Sources {
  const bool* mask;              // (Bk, Tk) or null
  const int64_t* lengths;        // (Bk,) or null
  const int64_t* kv_batch_idx;   // (Bq,) or null
  int64_t tk;

  int64_t key_row(int64_t i) const { return kv_batch_idx ? kv_batch_idx[i] : i; }
  int64_t end(int64_t b) const { return lengths ? std::clamp<int64_t>(lengths[b], 0, tk) : tk; }
  bool valid(int64_t b, int64_t s) const { return mask == nullptr || mask[b * tk + s]; }
};

inline Sources sources_of(const OptTensor& mask, const OptTensor& lengths,
                          const OptTensor& kv_batch_idx, int64_t tk) {
  return Sources{mask ? mask->data_ptr<bool>() : nullptr,
                 lengths ? lengths->data_ptr<int64_t>() : nullptr,
                 kv_batch_idx ? kv_batch_idx->data_ptr<int64_t>() : nullptr, tk};
}

// Softmax in place over w[0, end), where -inf marks an invalid position; w[end, tk) is set to 0.
// Returns the log-sum-exp. A row with no valid position becomes all zeros with lse = -inf.
// (The weights are an output, so the scores are stored first and normalised in a second,
// vectorised pass: cheaper on a CPU than rescaling a running sum with a scalar exp per key.)
template <typename T>
inline T softmax_in_place(T* w, int64_t end, int64_t tk) {
  using V = Vec<T>;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  V vmax(kNegInf);
  for_each_pack<T>(end, [&](int64_t j, int n) { vmax = max_nan(V::load(w + j, n, kNegInf), vmax); });
  const T m = vmax.max();
  std::fill(w + end, w + tk, T(0));
  if (m == kNegInf) {
    std::fill(w, w + end, T(0));
    return kNegInf;
  }
  V vsum(T(0));
  for_each_pack<T>(end, [&](int64_t j, int n) {
    const V e = exp(V::load(w + j, n, kNegInf) - V(m));  // exp(-inf) = 0 at invalid positions
    e.store(w + j, n);
    vsum += e;
  });
  const T sum = vsum.sum();
  scale_row(w, T(1) / sum, end);
  return m + std::log(sum);
}

template <typename S>
struct AttentionArgs {
  using T = acc_t<S>;
  Sources src;
  int64_t tq, d, dv;  // d: the query/key feature size (A for additive attention)
  T scale;            // dot attention's score scale (1 for additive)
  const S *q, *k, *v, *values;  // v: additive attention's score vector (A,)
  S *weights, *context;         // additive forward outputs
  T* scores;                    // dot forward: the raw scores q @ k.T on entry, the weights on exit
  T* lse;                       // forward output
  const S* saved_weights;       // backward: the forward's weights
  T* d_scores;                  // backward: dW = dC @ V.T + grad_weights on entry, dS on exit
  S *dq, *dk;
  T* dv_rows;                   // (Bq, A) per-row partial sums of dv
};

// Softmax backward, query rows [begin, end), in place: dW = dC @ V.T + grad_weights becomes
// dS = scale * W * (dW - rowsum(W * dW)) over the valid positions, and 0 elsewhere.
template <typename S>
FS2S_ROW_KERNEL void softmax_bwd_rows(const AttentionArgs<S>& a, int64_t begin, int64_t end) {
  using T = acc_t<S>;
  using V = Vec<T>;
  const int64_t tk = a.src.tk;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = a.src.key_row(r / a.tq);
    const int64_t n_keys = a.src.end(b);
    const S* w = a.saved_weights + r * tk;
    T* d = a.d_scores + r * tk;
    for (int64_t s = 0; s < n_keys; ++s) {
      if (!a.src.valid(b, s)) d[s] = T(0);  // whatever the padding held
    }
    std::fill(d + n_keys, d + tk, T(0));
    V w_dot_dw(T(0));
    for_each_pack<T>(n_keys, [&](int64_t j, int n) { w_dot_dw += load(w + j, n) * V::load(d + j, n); });
    const V total(w_dot_dw.sum()), scale(a.scale);
    for_each_pack<T>(n_keys, [&](int64_t j, int n) {
      (scale * load(w + j, n) * (V::load(d + j, n) - total)).store(d + j, n);
    });
  }
}

// Key-side tensor seen from the query rows: BLAS needs one key row per query row, so with
// kv_batch_idx the rows are gathered (as the torch backend does).
inline Tensor key_side_rows(const Tensor& t, const OptTensor& kv_batch_idx) {
  return kv_batch_idx ? t.index_select(0, *kv_batch_idx) : t;
}

// The tensor in the accumulation dtype (itself for float32/float64). The attention GEMMs run
// on widened operands: BLAS on 16-bit operands would round the scores (and their gradients)
// to 16 bits before the softmax, which the contract computes in float32.
inline Tensor wide(const Tensor& t) {
  return t.to(acc_dtype(t));
}

template <typename S>
AttentionArgs<S> attention_args(const Tensor& q, const Tensor& k, const Tensor& values,
                                const OptTensor& mask, const OptTensor& lengths,
                                const OptTensor& kv_batch_idx, double scale) {
  AttentionArgs<S> a{};
  a.src = sources_of(mask, lengths, kv_batch_idx, k.size(1));
  a.tq = q.size(1);
  a.d = q.size(2);
  a.dv = values.size(2);
  a.scale = static_cast<acc_t<S>>(scale);
  a.q = ptr<S>(q);
  a.k = ptr<S>(k);
  a.values = ptr<S>(values);
  return a;
}

// dW = grad_context @ values.T + grad_weights, turned into dS in place (see softmax_bwd_rows),
// in the accumulation dtype.
template <typename S>
Tensor score_grads(AttentionArgs<S>& a, const Tensor& grad_context, const Tensor& grad_weights,
                   const Tensor& values_rows, const Tensor& weights) {
  Tensor d_scores = at::baddbmm(wide(grad_weights), wide(grad_context), values_rows.transpose(1, 2));
  a.saved_weights = ptr<S>(weights);
  a.d_scores = mut_ptr<acc_t<S>>(d_scores);
  const int64_t rows = weights.size(0) * weights.size(1);
  at::parallel_for(0, rows, grain_for(weights.size(2)),
                   [&](int64_t r0, int64_t r1) { softmax_bwd_rows(a, r0, r1); });
  return d_scores;
}

}  // namespace
}  // namespace cpu
}  // namespace fused_s2s
