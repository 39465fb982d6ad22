// CPU kernels of the LSTM cell: BLAS computes gx + h @ w_hh.T, the row kernels of
// cell_rows.h the gate math, forward and backward.
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <tuple>

#include "cell_rows.h"
#include "common.h"
#include "kernels.h"

namespace fused_s2s {
namespace cpu {

std::tuple<Tensor, Tensor, Tensor> lstm_cell_fwd(const Tensor& gx, const Tensor& h, const Tensor& c,
                                                 const Tensor& w_hh, const OptTensor& b_hh) {
  const int64_t B = h.size(0), H = c.size(1);      // h is (B, P) when the LSTM projects
  const Tensor pre = at::addmm(gx, h, w_hh.t());  // gx + h @ w_hh.T in one BLAS call
  Tensor h_new = at::empty({B, H}, h.options());
  Tensor c_new = at::empty({B, H}, c.options());
  Tensor saved = at::empty({B, 4 * H}, h.options());
  dispatch_float(h, [&](auto zero) {
    using S = decltype(zero);
    const LstmFwdArgs<S> args{ptr<S>(pre), b_hh ? ptr<S>(*b_hh) : nullptr, ptr<S>(c),
                              mut_ptr<S>(h_new), mut_ptr<S>(c_new), mut_ptr<S>(saved), H};
    at::parallel_for(0, B, grain_for(5 * H), [&](int64_t b0, int64_t b1) { lstm_fwd_rows(args, b0, b1); });
  });
  return {h_new, c_new, saved};
}

std::tuple<Tensor, Tensor> lstm_cell_bwd(const Tensor& grad_h_new, const Tensor& grad_c_new,
                                         const Tensor& c, const Tensor& c_new, const Tensor& saved) {
  const int64_t B = c.size(0), H = c.size(1);
  Tensor grad_gates = at::empty({B, 4 * H}, c.options());
  Tensor grad_c = at::empty({B, H}, c.options());
  dispatch_float(c, [&](auto zero) {
    using S = decltype(zero);
    const LstmBwdArgs<S> args{ptr<S>(grad_h_new), ptr<S>(grad_c_new), ptr<S>(c), ptr<S>(c_new),
                              ptr<S>(saved), mut_ptr<S>(grad_gates), mut_ptr<S>(grad_c), H};
    at::parallel_for(0, B, grain_for(2 * H), [&](int64_t b0, int64_t b1) { lstm_bwd_rows(args, b0, b1); });
  });
  return {grad_gates, grad_c};
}

}  // namespace cpu
}  // namespace fused_s2s
