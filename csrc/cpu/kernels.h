// CPU kernels of the eight primitives (see the kernel contract in fused_s2s/backends/torch_backend.py).
// One file per op, named as in csrc/cuda: gru_cell.cpp, lstm_cell.cpp, additive_attention.cpp,
// dot_attention.cpp, persistent_rnn.cpp (what they share: common.h, cell_rows.h, attention.h).
// Arguments are already checked by the bindings: contiguous CPU tensors, one floating dtype
// (float32, float64, bfloat16 or float16; lse in float32 for the 16-bit ones), the contract's shapes, bool mask, int64 lengths/kv_batch_idx with
// indices in range.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fused_s2s {
namespace cpu {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::tuple<Tensor, Tensor> gru_cell_fwd(const Tensor& gx, const Tensor& h, const Tensor& w_hh,
                                        const OptTensor& b_hh);
std::tuple<Tensor, Tensor, Tensor> gru_cell_bwd(const Tensor& grad_h_new, const Tensor& h,
                                                const Tensor& saved);
std::tuple<Tensor, Tensor, Tensor> lstm_cell_fwd(const Tensor& gx, const Tensor& h, const Tensor& c,
                                                 const Tensor& w_hh, const OptTensor& b_hh);
std::tuple<Tensor, Tensor> lstm_cell_bwd(const Tensor& grad_h_new, const Tensor& grad_c_new,
                                         const Tensor& c, const Tensor& c_new, const Tensor& saved);

// Whole-sequence layer directions: the contract of cuda/persistent_rnn.h (padded time-major,
// lengths (B,) or none, saved/c_seq only when `save`).
std::tuple<Tensor, Tensor, OptTensor> persistent_gru_fwd(const Tensor& gx, const Tensor& h0, const Tensor& w_hh,
                                                         const OptTensor& b_hh, const OptTensor& lengths,
                                                         bool reverse, bool save);
std::tuple<Tensor, Tensor, Tensor, OptTensor, OptTensor> persistent_lstm_fwd(
    const Tensor& gx, const Tensor& h0, const Tensor& c0, const Tensor& w_hh, const OptTensor& b_hh,
    const OptTensor& lengths, bool reverse, bool save);
std::tuple<Tensor, Tensor, Tensor> persistent_gru_bwd(const OptTensor& grad_out, const OptTensor& grad_h_n,
                                                      const Tensor& out, const Tensor& h0, const Tensor& saved,
                                                      const Tensor& w_hh, const OptTensor& lengths, bool reverse);
std::tuple<Tensor, Tensor, Tensor> persistent_lstm_bwd(const OptTensor& grad_out, const OptTensor& grad_h_n,
                                                       const OptTensor& grad_c_n, const Tensor& c0,
                                                       const Tensor& c_seq, const Tensor& saved,
                                                       const Tensor& w_hh, const OptTensor& lengths, bool reverse);

std::tuple<Tensor, Tensor, Tensor> additive_attention_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& values, const OptTensor& mask,
    const OptTensor& lengths, const OptTensor& kv_batch_idx);
std::tuple<Tensor, Tensor, Tensor, Tensor> additive_attention_bwd(
    const Tensor& grad_context, const Tensor& grad_weights, const Tensor& q, const Tensor& k,
    const Tensor& v, const Tensor& values, const OptTensor& mask, const OptTensor& lengths,
    const OptTensor& kv_batch_idx, const Tensor& weights, const Tensor& lse);

std::tuple<Tensor, Tensor, Tensor> dot_attention_fwd(
    const Tensor& q, const Tensor& k, const Tensor& values, const OptTensor& mask,
    const OptTensor& lengths, const OptTensor& kv_batch_idx, double scale);
std::tuple<Tensor, Tensor, Tensor> dot_attention_bwd(
    const Tensor& grad_context, const Tensor& grad_weights, const Tensor& q, const Tensor& k,
    const Tensor& values, const OptTensor& mask, const OptTensor& lengths,
    const OptTensor& kv_batch_idx, double scale, const Tensor& weights, const Tensor& lse);

}  // namespace cpu
}  // namespace fused_s2s
