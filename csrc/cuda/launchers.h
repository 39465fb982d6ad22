// Launchers of the CUDA kernels of the `cpp` backend: one per primitive of the kernel
// contract (fused_s2s/backends/torch_backend.py), on raw device pointers, so that this header and
// the .cu files need no torch headers.
//
// Conventions for every launcher:
// - all tensors are row-major contiguous device memory with exactly the contract's shapes;
//   every floating tensor has the element type `dtype`, except `lse` (always float32);
// - `mask` is bool (1 byte) (batch_k, len_k), `lengths` and `kv_batch_idx` are int64;
//   nullptr means "absent" for every optional argument (b_hh, mask, lengths, kv_batch_idx,
//   and the incoming gradients documented as optional, which then count as zeros);
// - a length is clamped to [0, len_k]; kv_batch_idx entries must lie in [0, batch_k)
//   (the caller checks; a kernel that meets one outside traps rather than read out of bounds);
// - the caller allocates every output; each output element is written (no pre-zeroing needed);
//   outputs must not overlap inputs or each other;
// - math and accumulation in float32; the result is the launch status
//   (cudaGetLastError() after the last launch), cudaErrorInvalidValue for bad sizes or a
//   too-small workspace. Zero-sized problems launch nothing and return cudaSuccess;
// - the attention launchers need a scratch buffer: `..._workspace_bytes` gives its size for
//   the current device (call it under the same current device as the launch); pass the
//   buffer (256-byte aligned, as any CUDA allocation is) and its size.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "dtype.h"

namespace fused_s2s {
namespace cuda {

// ------------------------------------------------------------------------------- cells
// B = batch, H = hidden. One fused kernel computes gh = h @ w_hh.T + b_hh and the gates.

// gx (B,3H), h (B,H), w_hh (3H,H), b_hh (3H,)|nullptr -> h_new (B,H), saved (B,4H) = [r,z,n,gh_n]
cudaError_t gru_cell_fwd(DType dtype, const void* gx, const void* h, const void* w_hh,
                         const void* b_hh, void* h_new, void* saved, int64_t batch,
                         int64_t hidden, cudaStream_t stream);

// grad_h_new (B,H), h (B,H), saved (B,4H) -> grad_gx (B,3H), grad_gh (B,3H), grad_h_direct (B,H)
cudaError_t gru_cell_bwd(DType dtype, const void* grad_h_new, const void* h, const void* saved,
                         void* grad_gx, void* grad_gh, void* grad_h_direct, int64_t batch,
                         int64_t hidden, cudaStream_t stream);

// gx (B,4H), h (B,P), c (B,H), w_hh (4H,P), b_hh (4H,)|nullptr, P = h_size (H, or proj_size)
//   -> h_new (B,H) = o * tanh(c_new) (unprojected), c_new (B,H), saved (B,4H) = activated [i, f, g, o]
cudaError_t lstm_cell_fwd(DType dtype, const void* gx, const void* h, const void* c,
                          const void* w_hh, const void* b_hh, void* h_new, void* c_new,
                          void* saved, int64_t batch, int64_t hidden, int64_t h_size,
                          cudaStream_t stream);

// grad_h_new (B,H)|nullptr, grad_c_new (B,H)|nullptr, c (B,H), c_new (B,H), saved (B,4H)
//   -> grad_gates (B,4H), grad_c (B,H)
cudaError_t lstm_cell_bwd(DType dtype, const void* grad_h_new, const void* grad_c_new,
                          const void* c, const void* c_new, const void* saved, void* grad_gates,
                          void* grad_c, int64_t batch, int64_t hidden, cudaStream_t stream);

// ---------------------------------------------------------------------------- attention
// Bq = batch_q, Bk = batch_k, Tq = len_q, Tk = len_k, A/D = dim, Dv = dim_v.
// Query row i reads key/value/mask/length row kv_batch_idx[i] (identity when nullptr, then
// Bq == Bk). A position s of key row b is valid iff mask[b,s] (if given) and s < lengths[b]
// (if given); invalid positions get weight exactly 0, positions at/after lengths[b] are not
// even read; a row without valid positions gives weights 0, context 0, lse = -inf.
// approx_tanh (additive only): false = accurate tanhf (the contract); true = the hardware
// tanh.approx.f32 (error about 2^-11), forward and backward alike.

// q (Bq,Tq,A), k (Bk,Tk,A), v (A,), values (Bk,Tk,Dv)
//   -> context (Bq,Tq,Dv), weights (Bq,Tq,Tk), lse (Bq,Tq) float32
size_t additive_attention_fwd_workspace_bytes(DType dtype, int64_t batch_q, int64_t len_q,
                                              int64_t len_k, int64_t dim, int64_t dim_v);
cudaError_t additive_attention_fwd(DType dtype, const void* q, const void* k, const void* v,
                                   const void* values, const bool* mask, const int64_t* lengths,
                                   const int64_t* kv_batch_idx, void* context, void* weights,
                                   float* lse, int64_t batch_q, int64_t batch_k, int64_t len_q,
                                   int64_t len_k, int64_t dim, int64_t dim_v, bool approx_tanh,
                                   void* workspace, size_t workspace_bytes, cudaStream_t stream);

// grad_context (Bq,Tq,Dv)|nullptr, grad_weights (Bq,Tq,Tk)|nullptr, the forward's inputs,
// weights (Bq,Tq,Tk) and lse (Bq,Tq) float32 from the forward
//   -> grad_q (Bq,Tq,A), grad_k (Bq,Tk,A) per query row, grad_v (A,), grad_values (Bq,Tk,Dv)
//      per query row. Deterministic (no atomics).
size_t additive_attention_bwd_workspace_bytes(DType dtype, int64_t batch_q, int64_t len_q,
                                              int64_t len_k, int64_t dim, int64_t dim_v);
cudaError_t additive_attention_bwd(DType dtype, const void* grad_context, const void* grad_weights,
                                   const void* q, const void* k, const void* v,
                                   const void* values, const bool* mask, const int64_t* lengths,
                                   const int64_t* kv_batch_idx, const void* weights,
                                   const float* lse, void* grad_q, void* grad_k, void* grad_v,
                                   void* grad_values, int64_t batch_q, int64_t batch_k,
                                   int64_t len_q, int64_t len_k, int64_t dim, int64_t dim_v,
                                   bool approx_tanh, void* workspace, size_t workspace_bytes,
                                   cudaStream_t stream);

// scores = scale * q . k.  q (Bq,Tq,D), k (Bk,Tk,D), values (Bk,Tk,Dv)
//   -> context (Bq,Tq,Dv), weights (Bq,Tq,Tk), lse (Bq,Tq) float32
size_t dot_attention_fwd_workspace_bytes(DType dtype, int64_t batch_q, int64_t len_q,
                                         int64_t len_k, int64_t dim, int64_t dim_v);
cudaError_t dot_attention_fwd(DType dtype, const void* q, const void* k, const void* values,
                              const bool* mask, const int64_t* lengths,
                              const int64_t* kv_batch_idx, float scale, void* context,
                              void* weights, float* lse, int64_t batch_q, int64_t batch_k,
                              int64_t len_q, int64_t len_k, int64_t dim, int64_t dim_v,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream);

// -> grad_q (Bq,Tq,D), grad_k (Bq,Tk,D) per query row, grad_values (Bq,Tk,Dv) per query row.
size_t dot_attention_bwd_workspace_bytes(DType dtype, int64_t batch_q, int64_t len_q,
                                         int64_t len_k, int64_t dim, int64_t dim_v);
cudaError_t dot_attention_bwd(DType dtype, const void* grad_context, const void* grad_weights,
                              const void* q, const void* k, const void* values, const bool* mask,
                              const int64_t* lengths, const int64_t* kv_batch_idx, float scale,
                              const void* weights, const float* lse, void* grad_q, void* grad_k,
                              void* grad_values, int64_t batch_q, int64_t batch_k, int64_t len_q,
                              int64_t len_k, int64_t dim, int64_t dim_v, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_s2s
