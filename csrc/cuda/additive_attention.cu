// Additive (Bahdanau) attention: e = v . tanh(q + k), on the shared kernels of attention.cuh.
#include "attention.cuh"

namespace fused_s2s {
namespace cuda {

// The workspace does not depend on the tanh flavour.
using AdditiveAttention = Attention<AdditiveScore<false>>;

size_t additive_attention_fwd_workspace_bytes(DType dtype, int64_t batch_q, int64_t len_q, int64_t len_k,
                                              int64_t dim, int64_t dim_v) {
  return AdditiveAttention::fwd_workspace_bytes(dtype, batch_q, len_q, len_k, dim, dim_v);
}

cudaError_t additive_attention_fwd(DType dtype, const void* q, const void* k, const void* v, const void* values,
                                   const bool* mask, const int64_t* lengths, const int64_t* kv_batch_idx,
                                   void* context, void* weights, float* lse, int64_t batch_q, int64_t batch_k,
                                   int64_t len_q, int64_t len_k, int64_t dim, int64_t dim_v, bool approx_tanh,
                                   void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  AttnFwdParams p{};
  p.q = q;
  p.k = k;
  p.v = v;
  p.values = values;
  p.mask = mask;
  p.lengths = lengths;
  p.kv_batch_idx = kv_batch_idx;
  p.context = context;
  p.weights = weights;
  p.lse = lse;
  p.batch_q = batch_q;
  p.batch_k = batch_k;
  p.len_q = len_q;
  p.len_k = len_k;
  p.dim = dim;
  p.dim_v = dim_v;
  p.scale = 1.f;
  return approx_tanh ? Attention<AdditiveScore<true>>::fwd(dtype, p, workspace, workspace_bytes, stream)
                     : Attention<AdditiveScore<false>>::fwd(dtype, p, workspace, workspace_bytes, stream);
}

size_t additive_attention_bwd_workspace_bytes(DType /*dtype*/, int64_t batch_q, int64_t len_q, int64_t len_k,
                                              int64_t dim, int64_t dim_v) {
  return AdditiveAttention::bwd_workspace_bytes(batch_q, len_q, len_k, dim, dim_v);
}

cudaError_t additive_attention_bwd(DType dtype, const void* grad_context, const void* grad_weights, const void* q,
                                   const void* k, const void* v, const void* values, const bool* mask,
                                   const int64_t* lengths, const int64_t* kv_batch_idx, const void* weights,
                                   const float* lse, void* grad_q, void* grad_k, void* grad_v, void* grad_values,
                                   int64_t batch_q, int64_t batch_k, int64_t len_q, int64_t len_k, int64_t dim,
                                   int64_t dim_v, bool approx_tanh, void* workspace, size_t workspace_bytes,
                                   cudaStream_t stream) {
  AttnBwdParams p{};
  p.grad_context = grad_context;
  p.grad_weights = grad_weights;
  p.q = q;
  p.k = k;
  p.v = v;
  p.values = values;
  p.mask = mask;
  p.lengths = lengths;
  p.kv_batch_idx = kv_batch_idx;
  p.weights = weights;
  p.lse = lse;
  p.grad_q = grad_q;
  p.grad_k = grad_k;
  p.grad_v = grad_v;
  p.grad_values = grad_values;
  p.batch_q = batch_q;
  p.batch_k = batch_k;
  p.len_q = len_q;
  p.len_k = len_k;
  p.dim = dim;
  p.dim_v = dim_v;
  p.scale = 1.f;
  return approx_tanh ? Attention<AdditiveScore<true>>::bwd(dtype, p, workspace, workspace_bytes, stream)
                     : Attention<AdditiveScore<false>>::bwd(dtype, p, workspace, workspace_bytes, stream);
}

}  // namespace cuda
}  // namespace fused_s2s
