// CPU whole-sequence GRU/LSTM layer directions: the contract and layout of the persistent CUDA
// kernels (cuda/persistent_rnn.h), as one C++ time loop. Each step is one BLAS call for the
// recurrent GEMM into a buffer reused across steps and one pass of the cell's row kernels
// (cell_rows.h) over the batch: the per-step cell primitives' arithmetic in the same order, with
// no Python, no autograd node and no allocation per step.
//
// Rows are masked by lengths as the CUDA kernels do: row b runs the steps t < len(b) (len
// clamped to [0, T]); an inactive row keeps its state and writes zeros to out and the saved
// tensors; reversed, a row starts from h0/c0 at its own last step.
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "cell_rows.h"
#include "common.h"
#include "kernels.h"

namespace fused_s2s {
namespace cpu {
namespace {

// The processing order of one layer direction and which rows each step runs.
struct Steps {
  int64_t T;
  bool reverse;
  const int64_t* lengths;  // null: every row runs every step

  int64_t at(int64_t s) const { return reverse ? T - 1 - s : s; }  // the s-th step processed
  int64_t before(int64_t t) const { return reverse ? t + 1 : t - 1; }  // the step processed before t
  int64_t len(int64_t b) const { return lengths ? std::clamp<int64_t>(lengths[b], 0, T) : T; }
  bool active(int64_t b, int64_t t) const { return t < len(b); }
  bool first(int64_t b, int64_t t) const { return t == (reverse ? len(b) - 1 : 0); }
};

Steps steps_of(int64_t T, bool reverse, const OptTensor& lengths) {
  return {T, reverse, lengths ? lengths->data_ptr<int64_t>() : nullptr};
}

template <typename S>
void zero_row(S* p, int64_t n) {
  std::fill_n(p, n, static_cast<S>(0.0f));
}

// Row b of the state before step t: h0[b] at the row's first step, else the row's state after
// the step processed before t (active too: a row's active steps are contiguous).
template <typename S>
const S* state_before(const Steps& steps, int64_t b, int64_t t, const S* initial, const S* seq, int64_t B,
                      int64_t H) {
  return steps.first(b, t) ? initial + b * H : seq + (steps.before(t) * B + b) * H;
}

// Row b of the gradient reaching the output h of step t: dh (through the state) + grad_out[t]
// (or dh alone when the output took no gradient), rounded to S as a tensor sum would be.
template <typename S>
void step_gradient(S* g, const S* dh, const OptTensor& grad_out, int64_t t, int64_t b, int64_t B, int64_t H) {
  if (!grad_out) {
    std::copy_n(dh, H, g);
    return;
  }
  const S* go = ptr<S>(*grad_out) + (t * B + b) * H;
  for (int64_t j = 0; j < H; ++j) g[j] = static_cast<S>(acc_t<S>(dh[j]) + acc_t<S>(go[j]));
}

}  // namespace

std::tuple<Tensor, Tensor, OptTensor> persistent_gru_fwd(const Tensor& gx, const Tensor& h0, const Tensor& w_hh,
                                                         const OptTensor& b_hh, const OptTensor& lengths,
                                                         bool reverse, bool save) {
  const int64_t T = gx.size(0), B = h0.size(0), H = h0.size(1);
  const Steps steps = steps_of(T, reverse, lengths);
  Tensor out = at::empty({T, B, H}, h0.options());
  Tensor h = h0.clone();  // the state carried from step to step: h_n at the end
  Tensor gh = at::empty({B, 3 * H}, h0.options());
  // without `save` the gates of a step go to a scratch row block that the next step overwrites
  Tensor gates = save ? at::empty({T, B, 4 * H}, h0.options()) : at::empty({B, 4 * H}, h0.options());
  const Tensor w_t = w_hh.t();
  dispatch_float(h0, [&](auto zero) {
    using S = decltype(zero);
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = steps.at(s);
      if (b_hh) {
        at::addmm_out(gh, *b_hh, h, w_t);
      } else {
        at::mm_out(gh, h, w_t);
      }
      S* out_t = mut_ptr<S>(out) + t * B * H;
      S* saved_t = mut_ptr<S>(gates) + (save ? t * B * 4 * H : 0);
      S* state = mut_ptr<S>(h);
      const GruFwdArgs<S> args{ptr<S>(gx) + t * B * 3 * H, ptr<S>(gh), state, out_t, saved_t, H};
      at::parallel_for(0, B, grain_for(3 * H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          if (steps.active(b, t)) {
            gru_fwd_rows(args, b, b + 1);
            std::copy_n(out_t + b * H, H, state + b * H);
          } else {
            zero_row(out_t + b * H, H);
            zero_row(saved_t + b * 4 * H, 4 * H);
          }
        }
      });
    }
  });
  return {out, h, save ? OptTensor(gates) : OptTensor()};
}

std::tuple<Tensor, Tensor, Tensor> persistent_gru_bwd(const OptTensor& grad_out, const OptTensor& grad_h_n,
                                                      const Tensor& out, const Tensor& h0, const Tensor& saved,
                                                      const Tensor& w_hh, const OptTensor& lengths, bool reverse) {
  const int64_t T = out.size(0), B = h0.size(0), H = h0.size(1);
  const Steps steps = steps_of(T, reverse, lengths);
  Tensor grad_gx = at::empty({T, B, 3 * H}, h0.options());
  Tensor grad_gh = at::empty({T, B, 3 * H}, h0.options());
  // the gradient reaching the state, carried back from step to step: grad_h0 at the end
  Tensor dh = grad_h_n ? grad_h_n->clone() : at::zeros({B, H}, h0.options());
  Tensor g = at::empty({B, H}, h0.options());          // dh + grad_out of the step
  Tensor dh_direct = at::empty({B, H}, h0.options());  // dh's part that bypasses W_hh
  dispatch_float(h0, [&](auto zero) {
    using S = decltype(zero);
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = steps.at(s);
      S* grad_gx_t = mut_ptr<S>(grad_gx) + t * B * 3 * H;
      S* grad_gh_t = mut_ptr<S>(grad_gh) + t * B * 3 * H;
      at::parallel_for(0, B, grain_for(2 * H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const S* dh_b = ptr<S>(dh) + b * H;
          S* g_b = mut_ptr<S>(g) + b * H;
          S* direct_b = mut_ptr<S>(dh_direct) + b * H;
          if (steps.active(b, t)) {
            step_gradient(g_b, dh_b, grad_out, t, b, B, H);
            // one row's arguments: its h_prev is h0's row or out's row of the step before
            const GruBwdArgs<S> row{g_b, state_before(steps, b, t, ptr<S>(h0), ptr<S>(out), B, H),
                                    ptr<S>(saved) + (t * B + b) * 4 * H, grad_gx_t + b * 3 * H,
                                    grad_gh_t + b * 3 * H, direct_b, H};
            gru_bwd_rows(row, 0, 1);
          } else {  // the state passed through unchanged: so does its gradient
            zero_row(grad_gx_t + b * 3 * H, 3 * H);
            zero_row(grad_gh_t + b * 3 * H, 3 * H);
            std::copy_n(dh_b, H, direct_b);
          }
        }
      });
      at::addmm_out(dh, dh_direct, grad_gh[t], w_hh);  // dh = dh_direct + d_gh @ W_hh
    }
  });
  return {grad_gx, grad_gh, dh};
}

std::tuple<Tensor, Tensor, Tensor, OptTensor, OptTensor> persistent_lstm_fwd(
    const Tensor& gx, const Tensor& h0, const Tensor& c0, const Tensor& w_hh, const OptTensor& b_hh,
    const OptTensor& lengths, bool reverse, bool save) {
  const int64_t T = gx.size(0), B = h0.size(0), H = h0.size(1);
  const Steps steps = steps_of(T, reverse, lengths);
  Tensor out = at::empty({T, B, H}, h0.options());
  Tensor h = h0.clone(), c = c0.clone();  // the states carried from step to step: h_n, c_n at the end
  Tensor pre = at::empty({B, 4 * H}, h0.options());
  // without `save`, the gates and cell state of a step go to scratch that the next step overwrites
  Tensor gates = save ? at::empty({T, B, 4 * H}, h0.options()) : at::empty({B, 4 * H}, h0.options());
  Tensor c_seq = save ? at::empty({T, B, H}, h0.options()) : at::empty({B, H}, h0.options());
  const Tensor w_t = w_hh.t();
  dispatch_float(h0, [&](auto zero) {
    using S = decltype(zero);
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = steps.at(s);
      at::addmm_out(pre, gx[t], h, w_t);  // gx + h @ W_hh^T
      S* out_t = mut_ptr<S>(out) + t * B * H;
      S* saved_t = mut_ptr<S>(gates) + (save ? t * B * 4 * H : 0);
      S* c_t = mut_ptr<S>(c_seq) + (save ? t * B * H : 0);
      S* h_state = mut_ptr<S>(h);
      S* c_state = mut_ptr<S>(c);
      const LstmFwdArgs<S> args{ptr<S>(pre), b_hh ? ptr<S>(*b_hh) : nullptr, c_state, out_t, c_t, saved_t, H};
      at::parallel_for(0, B, grain_for(5 * H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          if (steps.active(b, t)) {
            lstm_fwd_rows(args, b, b + 1);
            std::copy_n(out_t + b * H, H, h_state + b * H);
            std::copy_n(c_t + b * H, H, c_state + b * H);
          } else {
            zero_row(out_t + b * H, H);
            zero_row(c_t + b * H, H);
            zero_row(saved_t + b * 4 * H, 4 * H);
          }
        }
      });
    }
  });
  return {out, h, c, save ? OptTensor(gates) : OptTensor(), save ? OptTensor(c_seq) : OptTensor()};
}

std::tuple<Tensor, Tensor, Tensor> persistent_lstm_bwd(const OptTensor& grad_out, const OptTensor& grad_h_n,
                                                       const OptTensor& grad_c_n, const Tensor& c0,
                                                       const Tensor& c_seq, const Tensor& saved,
                                                       const Tensor& w_hh, const OptTensor& lengths, bool reverse) {
  const int64_t T = c_seq.size(0), B = c0.size(0), H = c0.size(1);
  const Steps steps = steps_of(T, reverse, lengths);
  Tensor grad_gates = at::empty({T, B, 4 * H}, c0.options());
  // the gradients reaching the states, carried back from step to step: grad_h0, grad_c0 at the end
  Tensor dh = grad_h_n ? grad_h_n->clone() : at::zeros({B, H}, c0.options());
  Tensor dc = grad_c_n ? grad_c_n->clone() : at::zeros({B, H}, c0.options());
  Tensor g = at::empty({B, H}, c0.options());          // dh + grad_out of the step
  Tensor dh_direct = at::empty({B, H}, c0.options());  // 0 on the rows that ran the step, dh on the others
  dispatch_float(c0, [&](auto zero) {
    using S = decltype(zero);
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = steps.at(s);
      S* grad_gates_t = mut_ptr<S>(grad_gates) + t * B * 4 * H;
      at::parallel_for(0, B, grain_for(2 * H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const S* dh_b = ptr<S>(dh) + b * H;
          S* g_b = mut_ptr<S>(g) + b * H;
          S* dc_b = mut_ptr<S>(dc) + b * H;
          S* direct_b = mut_ptr<S>(dh_direct) + b * H;
          if (steps.active(b, t)) {
            step_gradient(g_b, dh_b, grad_out, t, b, B, H);
            // one row's arguments: its c_prev is c0's row or c_seq's row of the step before; grad_c
            // is dc's row itself (each element is read before it is overwritten)
            const LstmBwdArgs<S> row{g_b, dc_b, state_before(steps, b, t, ptr<S>(c0), ptr<S>(c_seq), B, H),
                                     ptr<S>(c_seq) + (t * B + b) * H, ptr<S>(saved) + (t * B + b) * 4 * H,
                                     grad_gates_t + b * 4 * H, dc_b, H};
            lstm_bwd_rows(row, 0, 1);
            zero_row(direct_b, H);
          } else {  // the states passed through unchanged: so do their gradients
            zero_row(grad_gates_t + b * 4 * H, 4 * H);
            std::copy_n(dh_b, H, direct_b);
          }
        }
      });
      at::addmm_out(dh, dh_direct, grad_gates[t], w_hh);  // dh = dh_direct + d_gates @ W_hh
    }
  });
  return {grad_gates, dh, dc};
}

}  // namespace cpu
}  // namespace fused_s2s
