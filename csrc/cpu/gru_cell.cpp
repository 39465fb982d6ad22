// CPU kernels of the GRU cell: BLAS computes gh = h @ w_hh.T + b_hh, one row kernel the gate
// math of gates.h (shared with the CUDA kernels), forward and backward.
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <cstdint>
#include <tuple>

#include "common.h"
#include "fused_s2s/gates.h"
#include "kernels.h"

namespace fused_s2s {
namespace cpu {
namespace {

template <typename S>
struct GruFwdArgs {
  const S *gx, *gh, *h;  // gh = h @ w_hh.T + b_hh
  S *h_new, *saved;
  int64_t hidden;
};

template <typename S>
FS2S_ROW_KERNEL void gru_fwd_rows(const GruFwdArgs<S>& a, int64_t begin, int64_t end) {
  using V = Vec<acc_t<S>>;
  const int64_t H = a.hidden;
  for (int64_t b = begin; b < end; ++b) {
    const S* gx = a.gx + b * 3 * H;
    const S* gh = a.gh + b * 3 * H;
    const S* h = a.h + b * H;
    S* h_new = a.h_new + b * H;
    S* saved = a.saved + b * 4 * H;
    for_each_pack<acc_t<S>>(H, [&](int64_t j, int n) {
      const GruFwd<V> o = gru_fwd<V>(load(gx + j, n), load(gx + H + j, n),
                                     load(gx + 2 * H + j, n), load(gh + j, n),
                                     load(gh + H + j, n), load(gh + 2 * H + j, n),
                                     load(h + j, n));
      store(o.h_new, h_new + j, n);
      store(o.r, saved + j, n);
      store(o.z, saved + H + j, n);
      store(o.n, saved + 2 * H + j, n);
      store(o.gh_n, saved + 3 * H + j, n);
    });
  }
}

template <typename S>
struct GruBwdArgs {
  const S *grad_h_new, *h, *saved;
  S *grad_gx, *grad_gh, *grad_h_direct;
  int64_t hidden;
};

template <typename S>
FS2S_ROW_KERNEL void gru_bwd_rows(const GruBwdArgs<S>& a, int64_t begin, int64_t end) {
  using V = Vec<acc_t<S>>;
  const int64_t H = a.hidden;
  for (int64_t b = begin; b < end; ++b) {
    const S* g = a.grad_h_new + b * H;
    const S* h = a.h + b * H;
    const S* saved = a.saved + b * 4 * H;
    S* grad_gx = a.grad_gx + b * 3 * H;
    S* grad_gh = a.grad_gh + b * 3 * H;
    S* grad_h = a.grad_h_direct + b * H;
    for_each_pack<acc_t<S>>(H, [&](int64_t j, int n) {
      const GruBwd<V> o = gru_bwd<V>(load(g + j, n), load(h + j, n), load(saved + j, n),
                                     load(saved + H + j, n), load(saved + 2 * H + j, n),
                                     load(saved + 3 * H + j, n));
      store(o.d_r, grad_gx + j, n);
      store(o.d_z, grad_gx + H + j, n);
      store(o.d_n, grad_gx + 2 * H + j, n);
      store(o.d_r, grad_gh + j, n);
      store(o.d_z, grad_gh + H + j, n);
      store(o.d_gh_n, grad_gh + 2 * H + j, n);
      store(o.d_h, grad_h + j, n);
    });
  }
}

}  // namespace

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
