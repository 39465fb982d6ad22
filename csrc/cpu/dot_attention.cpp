// CPU kernels of dot attention: BLAS does the dot products (scores, context, gradients), one
// row kernel the softmax between them.
#include <ATen/Parallel.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "attention.h"
#include "common.h"
#include "kernels.h"

namespace fused_s2s {
namespace cpu {
namespace {

// Dot attention forward, query rows [begin, end): the raw scores q @ k.T (from BLAS) become
// the weights: scaled, masked, normalised in place.
template <typename S>
FS2S_ROW_KERNEL void scores_to_weights_rows(const AttentionArgs<S>& a, int64_t begin, int64_t end) {
  using T = acc_t<S>;
  const int64_t tk = a.src.tk;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = a.src.key_row(r / a.tq);
    const int64_t n_keys = a.src.end(b);
    T* w = a.scores + r * tk;
    for (int64_t s = 0; s < n_keys; ++s) {
      w[s] = a.src.valid(b, s) ? a.scale * w[s] : -std::numeric_limits<T>::infinity();
    }
    a.lse[r] = softmax_in_place(w, n_keys, tk);
  }
}

}  // namespace

// Dot attention: the scores and the context are batched GEMMs (BLAS is the fast way on a CPU);
// between them one fused pass scales, masks and normalises the scores in place. Unlike the
// additive kernels (and the CUDA ones), the GEMMs read the keys/values past a row's length:
// they must be finite there, as for the torch backend (their weights are exactly 0).
std::tuple<Tensor, Tensor, Tensor> dot_attention_fwd(
    const Tensor& q, const Tensor& k, const Tensor& values, const OptTensor& mask,
    const OptTensor& lengths, const OptTensor& kv_batch_idx, double scale) {
  Tensor weights = at::bmm(wide(q), key_side_rows(wide(k), kv_batch_idx).transpose(1, 2));
  Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(acc_dtype(q)));
  dispatch_float(q, [&](auto zero) {
    using S = decltype(zero);
    AttentionArgs<S> a = attention_args<S>(q, k, values, mask, lengths, kv_batch_idx, scale);
    a.scores = mut_ptr<acc_t<S>>(weights);
    a.lse = mut_ptr<acc_t<S>>(lse);
    at::parallel_for(0, q.size(0) * q.size(1), grain_for(k.size(1)),
                     [&](int64_t r0, int64_t r1) { scores_to_weights_rows(a, r0, r1); });
  });
  const at::ScalarType dtype = q.scalar_type();
  Tensor context = at::bmm(weights, key_side_rows(wide(values), kv_batch_idx)).to(dtype);
  return {context, weights.to(dtype), lse};
}

std::tuple<Tensor, Tensor, Tensor> dot_attention_bwd(
    const Tensor& grad_context, const Tensor& grad_weights, const Tensor& q, const Tensor& k,
    const Tensor& values, const OptTensor& mask, const OptTensor& lengths,
    const OptTensor& kv_batch_idx, double scale, const Tensor& weights, const Tensor& /*lse*/) {
  Tensor d_scores;
  dispatch_float(q, [&](auto zero) {
    using S = decltype(zero);
    AttentionArgs<S> a = attention_args<S>(q, k, values, mask, lengths, kv_batch_idx, scale);
    d_scores = score_grads(a, grad_context, grad_weights, key_side_rows(wide(values), kv_batch_idx), weights);
  });
  const at::ScalarType dtype = q.scalar_type();
  Tensor dq = at::bmm(d_scores, key_side_rows(wide(k), kv_batch_idx)).to(dtype);
  Tensor dk = at::bmm(d_scores.transpose(1, 2), wide(q)).to(dtype);
  Tensor dvalues = at::bmm(wide(weights).transpose(1, 2), wide(grad_context)).to(dtype);
  return {dq, dk, dvalues};
}

}  // namespace cpu
}  // namespace fused_s2s
