// CPU kernels of the GRU cell: BLAS computes gh = h @ w_hh.T + b_hh, the row kernels of
// cell_rows.h the gate math, forward and backward.
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <cstdint>
#include <tuple>

#include "cell_rows.h"
#include "common.h"
#include "kernels.h"

namespace fused_s2s {
namespace cpu {

std::tuple<Tensor, Tensor> gru_cell_fwd(const Tensor& gx, const Tensor& h, const Tensor& w_hh,
                                        const OptTensor& b_hh) {
  const int64_t B = h.size(0), H = h.size(1);
  const Tensor gh = b_hh ? at::addmm(*b_hh, h, w_hh.t()) : at::mm(h, w_hh.t());
  Tensor h_new = at::empty({B, H}, h.options());
  Tensor saved = at::empty({B, 4 * H}, h.options());
  dispatch_float(h, [&](auto zero) {
    using S = decltype(zero);
    const GruFwdArgs<S> args{ptr<S>(gx), ptr<S>(gh), ptr<S>(h), mut_ptr<S>(h_new),
                             mut_ptr<S>(saved), H};
    at::parallel_for(0, B, grain_for(3 * H), [&](int64_t b0, int64_t b1) { gru_fwd_rows(args, b0, b1); });
  });
  return {h_new, saved};
}

std::tuple<Tensor, Tensor, Tensor> gru_cell_bwd(const Tensor& grad_h_new, const Tensor& h,
                                                const Tensor& saved) {
  const int64_t B = h.size(0), H = h.size(1);
  Tensor grad_gx = at::empty({B, 3 * H}, h.options());
  Tensor grad_gh = at::empty({B, 3 * H}, h.options());
  Tensor grad_h_direct = at::empty({B, H}, h.options());
  dispatch_float(h, [&](auto zero) {
    using S = decltype(zero);
    const GruBwdArgs<S> args{ptr<S>(grad_h_new), ptr<S>(h), ptr<S>(saved), mut_ptr<S>(grad_gx),
                             mut_ptr<S>(grad_gh), mut_ptr<S>(grad_h_direct), H};
    at::parallel_for(0, B, grain_for(2 * H), [&](int64_t b0, int64_t b1) { gru_bwd_rows(args, b0, b1); });
  });
  return {grad_gx, grad_gh, grad_h_direct};
}

}  // namespace cpu
}  // namespace fused_s2s
