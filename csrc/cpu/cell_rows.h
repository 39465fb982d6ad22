// The row kernels of the GRU and LSTM cells: the gate math of gates.h (shared with the CUDA
// kernels) over rows [begin, end) of a batch, forward and backward, on SIMD packs. The cell
// primitives (gru_cell.cpp, lstm_cell.cpp) run them once per call, the whole-sequence layers
// (persistent_rnn.cpp) once per step; BLAS does the recurrent GEMM around them.
#pragma once

#include <cstdint>

#include "common.h"
#include "fused_s2s/gates.h"

namespace fused_s2s {
namespace cpu {
namespace {  // internal linkage, as common.h

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
}  // namespace cpu
}  // namespace fused_s2s
