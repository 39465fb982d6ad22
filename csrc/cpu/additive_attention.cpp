// CPU kernels of additive attention: per query row, the scores of its valid keys (tanh on the
// fly: the (B, Tq, Tk, A) tensor never exists), the softmax in place, the context; the
// backward recomputes tanh. Keys at or past a row's length are never read. BLAS does
// dW = dC @ V.T and dV = W.T @ dC of the backward.
#include <ATen/Parallel.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "attention.h"
#include "common.h"
#include "kernels.h"

namespace fused_s2s {
namespace cpu {
namespace {

// Additive attention forward, query rows [begin, end): per row, the scores of its valid keys,
// the softmax in place, then the context. Reads the key/value rows in place (no gather).
template <typename S>
FS2S_ROW_KERNEL void additive_fwd_rows(const AttentionArgs<S>& a, int64_t begin, int64_t end) {
  using T = acc_t<S>;
  using V = Vec<T>;
  const int64_t tk = a.src.tk, A = a.d, dv = a.dv;
  AccRow<S> weights_row, context_row, q_row, v_row;
  const T* v = v_row.widen(a.v, A);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = a.src.key_row(r / a.tq);
    const int64_t n_keys = a.src.end(b);
    const T* q = q_row.widen(a.q + r * A, A);
    const S* k = a.k + b * tk * A;
    const S* values = a.values + b * tk * dv;
    T* w = weights_row.begin(a.weights + r * tk, tk);
    for (int64_t s = 0; s < n_keys; ++s) {
      if (!a.src.valid(b, s)) {
        w[s] = -std::numeric_limits<T>::infinity();
        continue;
      }
      V acc(T(0));
      for_each_pack<T>(A, [&](int64_t j, int n) {
        acc += V::load(v + j, n) * tanh(V::load(q + j, n) + load(k + s * A + j, n));
      });
      w[s] = acc.sum();
    }
    a.lse[r] = softmax_in_place(w, n_keys, tk);
    T* context = context_row.begin(a.context + r * dv, dv);
    std::fill(context, context + dv, T(0));
    for (int64_t s = 0; s < n_keys; ++s) {
      if (w[s] != T(0)) axpy_row(context, w[s], values + s * dv, dv);
    }
    weights_row.done(w, a.weights + r * tk, tk);
    context_row.done(context, a.context + r * dv, dv);
  }
}

// Additive attention backward through the scores, query batch rows [begin, end) (all Tq
// queries of a row together, so dk[i] has a single writer): from dS, with tanh recomputed,
// dq = sum_s dS * v * (1 - t^2), dk[s] = sum_t (same), dv = sum dS * t.
template <typename S>
FS2S_ROW_KERNEL void additive_scores_bwd_rows(const AttentionArgs<S>& a, int64_t begin, int64_t end) {
  using T = acc_t<S>;
  using V = Vec<T>;
  const int64_t tk = a.src.tk, A = a.d, tq = a.tq;
  AccRow<S> dq_rows, dk_rows, q_row, v_row;
  const T* v = v_row.widen(a.v, A);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = a.src.key_row(i);
    const int64_t n_keys = a.src.end(b);
    const S* k = a.k + b * tk * A;
    T* dq = dq_rows.begin(a.dq + i * tq * A, tq * A);
    T* dk = dk_rows.begin(a.dk + i * tk * A, tk * A);
    T* dv = a.dv_rows + i * A;
    std::fill(dq, dq + tq * A, T(0));
    std::fill(dk, dk + tk * A, T(0));
    std::fill(dv, dv + A, T(0));
    for (int64_t t = 0; t < tq; ++t) {
      const T* q = q_row.widen(a.q + (i * tq + t) * A, A);
      const T* ds_row = a.d_scores + (i * tq + t) * tk;
      T* dq_t = dq + t * A;
      for (int64_t s = 0; s < n_keys; ++s) {
        const T ds = ds_row[s];
        if (ds == T(0)) continue;  // masked, or no gradient
        T* dk_s = dk + s * A;
        for_each_pack<T>(A, [&](int64_t j, int n) {
          const V th = tanh(V::load(q + j, n) + load(k + s * A + j, n));  // recomputed
          const V d_pre = V(ds) * V::load(v + j, n) * (V(T(1)) - th * th);
          (V::load(dq_t + j, n) + d_pre).store(dq_t + j, n);
          (V::load(dk_s + j, n) + d_pre).store(dk_s + j, n);
          (V::load(dv + j, n) + V(ds) * th).store(dv + j, n);
        });
      }
    }
    dq_rows.done(dq, a.dq + i * tq * A, tq * A);
    dk_rows.done(dk, a.dk + i * tk * A, tk * A);
  }
}

// Work per item for parallel_for over query rows of attention.
int64_t attention_row_work(const Tensor& q, const Tensor& k, const Tensor& values) {
  return k.size(1) * (q.size(2) + values.size(2));
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> additive_attention_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& values, const OptTensor& mask,
    const OptTensor& lengths, const OptTensor& kv_batch_idx) {
  const int64_t bq = q.size(0), tq = q.size(1), tk = k.size(1), dv = values.size(2);
  Tensor context = at::empty({bq, tq, dv}, q.options());
  Tensor weights = at::empty({bq, tq, tk}, q.options());
  Tensor lse = at::empty({bq, tq}, q.options().dtype(acc_dtype(q)));
  dispatch_float(q, [&](auto zero) {
    using S = decltype(zero);
    AttentionArgs<S> a = attention_args<S>(q, k, values, mask, lengths, kv_batch_idx, 1.0);
    a.v = ptr<S>(v);
    a.weights = mut_ptr<S>(weights);
    a.lse = mut_ptr<acc_t<S>>(lse);
    a.context = mut_ptr<S>(context);
    at::parallel_for(0, bq * tq, grain_for(attention_row_work(q, k, values)),
                     [&](int64_t r0, int64_t r1) { additive_fwd_rows(a, r0, r1); });
  });
  return {context, weights, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> additive_attention_bwd(
    const Tensor& grad_context, const Tensor& grad_weights, const Tensor& q, const Tensor& k,
    const Tensor& v, const Tensor& values, const OptTensor& mask, const OptTensor& lengths,
    const OptTensor& kv_batch_idx, const Tensor& weights, const Tensor& /*lse*/) {
  const int64_t bq = q.size(0), tk = k.size(1), A = q.size(2);
  const Tensor values_rows = key_side_rows(wide(values), kv_batch_idx);
  Tensor dq = at::empty_like(q);
  Tensor dk = at::empty({bq, tk, A}, q.options());
  Tensor dv = at::empty({A}, q.options());
  dispatch_float(q, [&](auto zero) {
    using S = decltype(zero);
    AttentionArgs<S> a = attention_args<S>(q, k, values, mask, lengths, kv_batch_idx, 1.0);
    a.v = ptr<S>(v);
    const Tensor d_scores = score_grads(a, grad_context, grad_weights, values_rows, weights);
    using T = acc_t<S>;
    std::vector<T> dv_rows(static_cast<size_t>(bq * A));
    a.dq = mut_ptr<S>(dq);
    a.dk = mut_ptr<S>(dk);
    a.dv_rows = dv_rows.data();
    at::parallel_for(0, bq, grain_for(q.size(1) * tk * A),
                     [&](int64_t i0, int64_t i1) { additive_scores_bwd_rows(a, i0, i1); });
    // dv is shared by every row: per-row partial sums, added in a fixed order (deterministic).
    AccRow<S> dv_row;
    T* dv_sum = dv_row.begin(mut_ptr<S>(dv), A);
    std::fill(dv_sum, dv_sum + A, T(0));
    for (int64_t i = 0; i < bq; ++i) axpy_row(dv_sum, T(1), dv_rows.data() + i * A, A);
    dv_row.done(dv_sum, mut_ptr<S>(dv), A);
  });
  Tensor dvalues = at::bmm(wide(weights).transpose(1, 2), wide(grad_context)).to(q.scalar_type());
  return {dq, dk, dv, dvalues};
}

}  // namespace cpu
}  // namespace fused_s2s
