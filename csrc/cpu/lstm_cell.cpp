// CPU kernels of the LSTM cell: BLAS computes gx + h @ w_hh.T, one row kernel the gate math
// of gates.h (shared with the CUDA kernels), forward and backward.
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <tuple>

#include "common.h"
#include "fused_s2s/gates.h"
#include "kernels.h"

namespace fused_s2s {
namespace cpu {
namespace {

template <typename S>
struct LstmFwdArgs {
  const S *pre, *b_hh, *c;  // pre = gx + h @ w_hh.T; b_hh may be null
  S *h_new, *c_new, *saved;
  int64_t hidden;
};

template <typename S>
FS2S_ROW_KERNEL void lstm_fwd_rows(const LstmFwdArgs<S>& a, int64_t begin, int64_t end) {
  using V = Vec<acc_t<S>>;
  const int64_t H = a.hidden;
  for (int64_t b = begin; b < end; ++b) {
    const S* pre = a.pre + b * 4 * H;
    const S* c = a.c + b * H;
    S* h_new = a.h_new + b * H;
    S* c_new = a.c_new + b * H;
    S* saved = a.saved + b * 4 * H;
    for_each_pack<acc_t<S>>(H, [&](int64_t j, int n) {
      auto gate = [&](int64_t g) {
        const V x = load(pre + g * H + j, n);
        return a.b_hh ? x + load(a.b_hh + g * H + j, n) : x;
      };
      const LstmFwd<V> s = lstm_fwd<V>(gate(0), gate(1), gate(2), gate(3), load(c + j, n));
      store(s.h_new, h_new + j, n);
      store(s.c_new, c_new + j, n);
      store(s.i, saved + j, n);
      store(s.f, saved + H + j, n);
      store(s.g, saved + 2 * H + j, n);
      store(s.o, saved + 3 * H + j, n);
    });
  }
}

template <typename S>
struct LstmBwdArgs {
  const S *grad_h_new, *grad_c_new, *c, *c_new, *saved;
  S *grad_gates, *grad_c;
  int64_t hidden;
};

template <typename S>
FS2S_ROW_KERNEL void lstm_bwd_rows(const LstmBwdArgs<S>& a, int64_t begin, int64_t end) {
  using V = Vec<acc_t<S>>;
  const int64_t H = a.hidden;
  for (int64_t b = begin; b < end; ++b) {
    const S* gh = a.grad_h_new + b * H;
    const S* gc = a.grad_c_new + b * H;
    const S* c = a.c + b * H;
    const S* c_new = a.c_new + b * H;
    const S* saved = a.saved + b * 4 * H;
    S* grad_gates = a.grad_gates + b * 4 * H;
    S* grad_c = a.grad_c + b * H;
    for_each_pack<acc_t<S>>(H, [&](int64_t j, int n) {
      const LstmBwd<V> s = lstm_bwd<V>(
          load(gh + j, n), load(gc + j, n), load(c + j, n), load(c_new + j, n),
          load(saved + j, n), load(saved + H + j, n), load(saved + 2 * H + j, n),
          load(saved + 3 * H + j, n));
      store(s.d_i, grad_gates + j, n);
      store(s.d_f, grad_gates + H + j, n);
      store(s.d_g, grad_gates + 2 * H + j, n);
      store(s.d_o, grad_gates + 3 * H + j, n);
      store(s.d_c, grad_c + j, n);
    });
  }
}

}  // namespace

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
