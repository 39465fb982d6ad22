// Dot (Luong) attention: e = scale * q . k, on the shared kernels of attention.cuh.
#include "attention.cuh"

namespace fused_s2s {
namespace cuda {

using DotAttention = Attention<DotScore>;

size_t dot_attention_fwd_workspace_bytes(DType dtype, int64_t batch_q, int64_t len_q, int64_t len_k, int64_t dim,
                                         int64_t dim_v) {
  return DotAttention::fwd_workspace_bytes(dtype, batch_q, len_q, len_k, dim, dim_v);
}

cudaError_t dot_attention_fwd(DType dtype, const void* q, const void* k, const void* values, const bool* mask,
                              const int64_t* lengths, const int64_t* kv_batch_idx, float scale, void* context,
                              void* weights, float* lse, int64_t batch_q, int64_t batch_k, int64_t len_q,
                              int64_t len_k, int64_t dim, int64_t dim_v, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream) {
  AttnFwdParams p{};
  p.q = q;
  p.k = k;
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
  p.scale = scale;
  return DotAttention::fwd(dtype, p, workspace, workspace_bytes, stream);
}

size_t dot_attention_bwd_workspace_bytes(DType /*dtype*/, int64_t batch_q, int64_t len_q, int64_t len_k,
                                         int64_t dim, int64_t dim_v) {
  return DotAttention::bwd_workspace_bytes(batch_q, len_q, len_k, dim, dim_v);
}

cudaError_t dot_attention_bwd(DType dtype, const void* grad_context, const void* grad_weights, const void* q,
                              const void* k, const void* values, const bool* mask, const int64_t* lengths,
                              const int64_t* kv_batch_idx, float scale, const void* weights, const float* lse,
                              void* grad_q, void* grad_k, void* grad_values, int64_t batch_q, int64_t batch_k,
                              int64_t len_q, int64_t len_k, int64_t dim, int64_t dim_v, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream) {
  AttnBwdParams p{};
  p.grad_context = grad_context;
  p.grad_weights = grad_weights;
  p.q = q;
  p.k = k;
  p.values = values;
  p.mask = mask;
  p.lengths = lengths;
  p.kv_batch_idx = kv_batch_idx;
  p.weights = weights;
  p.lse = lse;
  p.grad_q = grad_q;
  p.grad_k = grad_k;
  p.grad_values = grad_values;
  p.batch_q = batch_q;
  p.batch_k = batch_k;
  p.len_q = len_q;
  p.len_k = len_k;
  p.dim = dim;
  p.dim_v = dim_v;
  p.scale = scale;
  return DotAttention::bwd(dtype, p, workspace, workspace_bytes, stream);
}

}  // namespace cuda
}  // namespace fused_s2s
