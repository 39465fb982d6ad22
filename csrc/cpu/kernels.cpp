// CPU kernels of the eight primitives, float32 and float64 (the number type T is also the
// accumulation type). Cells: BLAS for the recurrent GEMM, then one fused pass over the gates
// using the scalar math of gates.h on SIMD packs. Attention: one pass over the keys per query
// row with a running-max (online) softmax; the (B, Tq, Tk, A) tanh tensor never exists, and
// the backward recomputes tanh instead of saving it.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "fused_s2s/gates.h"
#include "vec_math.h"

// The row kernels are compiled for AVX2 and for baseline x86-64, and the loader picks one for
// the machine (function multiversioning); `flatten` inlines the gate math and the packs into
// each version so that all of it is compiled for that version's instruction set.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define FS2S_ROW_KERNEL __attribute__((target_clones("avx2", "default"), flatten))
#else
#define FS2S_ROW_KERNEL __attribute__((flatten))
#endif

namespace fused_s2s {
namespace cpu {
namespace {

// Work (elements through exp/tanh) that makes one parallel task worth its scheduling cost.
constexpr int64_t kTaskWork = 8192;

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kTaskWork / std::max<int64_t>(1, work_per_item));
}

// Calls f(j, n) on the packs [j, j + n) covering `cols` columns: full packs first (n is then
// the constant kLanes, so loads and stores become plain vector moves), then the tail.
template <typename T, typename F>
inline void for_each_pack(int64_t cols, F&& f) {
  constexpr int kLanes = Vec<T>::kLanes;
  int64_t j = 0;
  for (; j + kLanes <= cols; j += kLanes) f(j, kLanes);
  if (j < cols) f(j, static_cast<int>(cols - j));
}

template <typename T>
inline void scale_row(T* x, T alpha, int64_t n) {
  using V = Vec<T>;
  for_each_pack<T>(n, [&](int64_t j, int w) { (V(alpha) * V::load(x + j, w)).store(x + j, w); });
}

// y += alpha * x
template <typename T>
inline void axpy_row(T* y, T alpha, const T* x, int64_t n) {
  using V = Vec<T>;
  for_each_pack<T>(n, [&](int64_t j, int w) {
    (V::load(y + j, w) + V(alpha) * V::load(x + j, w)).store(y + j, w);
  });
}

template <typename T>
inline T dot_row(const T* x, const T* y, int64_t n) {
  using V = Vec<T>;
  V acc(T(0));
  for_each_pack<T>(n, [&](int64_t j, int w) { acc += V::load(x + j, w) * V::load(y + j, w); });
  return acc.sum();
}

// Calls f(T{}) with T the C++ type of a float32/float64 tensor (the bindings allow no other).
template <typename F>
void dispatch_float(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

// ------------------------------------------------------------------------------------ cells

template <typename T>
struct GruFwdArgs {
  const T *gx, *gh, *h;  // gh = h @ w_hh.T + b_hh
  T *h_new, *saved;
  int64_t hidden;
};

template <typename T>
FS2S_ROW_KERNEL void gru_fwd_rows(const GruFwdArgs<T>& a, int64_t begin, int64_t end) {
  using V = Vec<T>;
  const int64_t H = a.hidden;
  for (int64_t b = begin; b < end; ++b) {
    const T* gx = a.gx + b * 3 * H;
    const T* gh = a.gh + b * 3 * H;
    const T* h = a.h + b * H;
    T* h_new = a.h_new + b * H;
    T* saved = a.saved + b * 4 * H;
    for_each_pack<T>(H, [&](int64_t j, int n) {
      const GruFwd<V> o = gru_fwd<V>(V::load(gx + j, n), V::load(gx + H + j, n),
                                     V::load(gx + 2 * H + j, n), V::load(gh + j, n),
                                     V::load(gh + H + j, n), V::load(gh + 2 * H + j, n),
                                     V::load(h + j, n));
      o.h_new.store(h_new + j, n);
      o.r.store(saved + j, n);
      o.z.store(saved + H + j, n);
      o.n.store(saved + 2 * H + j, n);
      o.gh_n.store(saved + 3 * H + j, n);
    });
  }
}

template <typename T>
struct GruBwdArgs {
  const T *grad_h_new, *h, *saved;
  T *grad_gx, *grad_gh, *grad_h_direct;
  int64_t hidden;
};

template <typename T>
FS2S_ROW_KERNEL void gru_bwd_rows(const GruBwdArgs<T>& a, int64_t begin, int64_t end) {
  using V = Vec<T>;
  const int64_t H = a.hidden;
  for (int64_t b = begin; b < end; ++b) {
    const T* g = a.grad_h_new + b * H;
    const T* h = a.h + b * H;
    const T* saved = a.saved + b * 4 * H;
    T* grad_gx = a.grad_gx + b * 3 * H;
    T* grad_gh = a.grad_gh + b * 3 * H;
    T* grad_h = a.grad_h_direct + b * H;
    for_each_pack<T>(H, [&](int64_t j, int n) {
      const GruBwd<V> o = gru_bwd<V>(V::load(g + j, n), V::load(h + j, n), V::load(saved + j, n),
                                     V::load(saved + H + j, n), V::load(saved + 2 * H + j, n),
                                     V::load(saved + 3 * H + j, n));
      o.d_r.store(grad_gx + j, n);
      o.d_z.store(grad_gx + H + j, n);
      o.d_n.store(grad_gx + 2 * H + j, n);
      o.d_r.store(grad_gh + j, n);
      o.d_z.store(grad_gh + H + j, n);
      o.d_gh_n.store(grad_gh + 2 * H + j, n);
      o.d_h.store(grad_h + j, n);
    });
  }
}

template <typename T>
struct LstmFwdArgs {
  const T *pre, *b_hh, *c;  // pre = gx + h @ w_hh.T; b_hh may be null
  T *h_new, *c_new, *saved;
  int64_t hidden;
};

template <typename T>
FS2S_ROW_KERNEL void lstm_fwd_rows(const LstmFwdArgs<T>& a, int64_t begin, int64_t end) {
  using V = Vec<T>;
  const int64_t H = a.hidden;
  for (int64_t b = begin; b < end; ++b) {
    const T* pre = a.pre + b * 4 * H;
    const T* c = a.c + b * H;
    T* h_new = a.h_new + b * H;
    T* c_new = a.c_new + b * H;
    T* saved = a.saved + b * 4 * H;
    for_each_pack<T>(H, [&](int64_t j, int n) {
      auto gate = [&](int64_t g) {
        const V x = V::load(pre + g * H + j, n);
        return a.b_hh ? x + V::load(a.b_hh + g * H + j, n) : x;
      };
      const LstmFwd<V> s = lstm_fwd<V>(gate(0), gate(1), gate(2), gate(3), V::load(c + j, n));
      s.h_new.store(h_new + j, n);
      s.c_new.store(c_new + j, n);
      s.i.store(saved + j, n);
      s.f.store(saved + H + j, n);
      s.g.store(saved + 2 * H + j, n);
      s.o.store(saved + 3 * H + j, n);
    });
  }
}

template <typename T>
struct LstmBwdArgs {
  const T *grad_h_new, *grad_c_new, *c, *c_new, *saved;
  T *grad_gates, *grad_c;
  int64_t hidden;
};

template <typename T>
FS2S_ROW_KERNEL void lstm_bwd_rows(const LstmBwdArgs<T>& a, int64_t begin, int64_t end) {
  using V = Vec<T>;
  const int64_t H = a.hidden;
  for (int64_t b = begin; b < end; ++b) {
    const T* gh = a.grad_h_new + b * H;
    const T* gc = a.grad_c_new + b * H;
    const T* c = a.c + b * H;
    const T* c_new = a.c_new + b * H;
    const T* saved = a.saved + b * 4 * H;
    T* grad_gates = a.grad_gates + b * 4 * H;
    T* grad_c = a.grad_c + b * H;
    for_each_pack<T>(H, [&](int64_t j, int n) {
      const LstmBwd<V> s = lstm_bwd<V>(
          V::load(gh + j, n), V::load(gc + j, n), V::load(c + j, n), V::load(c_new + j, n),
          V::load(saved + j, n), V::load(saved + H + j, n), V::load(saved + 2 * H + j, n),
          V::load(saved + 3 * H + j, n));
      s.d_i.store(grad_gates + j, n);
      s.d_f.store(grad_gates + H + j, n);
      s.d_g.store(grad_gates + 2 * H + j, n);
      s.d_o.store(grad_gates + 3 * H + j, n);
      s.d_c.store(grad_c + j, n);
    });
  }
}

// -------------------------------------------------------------------------------- attention

// Which source positions a query row attends to: mask, lengths and kv_batch_idx as in the
// contract. Positions at or beyond a row's length are skipped, not just masked.
struct Sources {
  const bool* mask;              // (Bk, Tk) or null
  const int64_t* lengths;        // (Bk,) or null
  const int64_t* kv_batch_idx;   // (Bq,) or null
  int64_t tk;

  int64_t key_row(int64_t i) const { return kv_batch_idx ? kv_batch_idx[i] : i; }
  int64_t end(int64_t b) const { return lengths ? std::clamp<int64_t>(lengths[b], 0, tk) : tk; }
  bool valid(int64_t b, int64_t s) const { return mask == nullptr || mask[b * tk + s]; }
};

Sources sources_of(const OptTensor& mask, const OptTensor& lengths, const OptTensor& kv_batch_idx,
                   int64_t tk) {
  return Sources{mask ? mask->data_ptr<bool>() : nullptr,
                 lengths ? lengths->data_ptr<int64_t>() : nullptr,
                 kv_batch_idx ? kv_batch_idx->data_ptr<int64_t>() : nullptr, tk};
}

// One query row: weights[s] = softmax over the valid s of score(s), context = sum_s
// weights[s] * values[s], lse = log-sum-exp of the valid scores (-inf when there are none).
// Online softmax: the running max m and sum l rescale the context accumulated so far when a
// larger score arrives; the raw scores wait in `weights` until lse is known.
template <typename T, typename Score>
inline void attend_row(const Sources& src, int64_t b, const T* values, int64_t dv, T* context,
                       T* weights, T* lse, Score&& score) {
  T m = -std::numeric_limits<T>::infinity();
  T l = T(0);
  std::fill(context, context + dv, T(0));
  const int64_t end = src.end(b);
  for (int64_t s = 0; s < end; ++s) {
    if (!src.valid(b, s)) continue;
    const T e = score(s);
    weights[s] = e;
    if (e > m) {
      const T rescale = std::exp(m - e);  // 0 for the first valid position (m = -inf)
      l *= rescale;
      scale_row(context, rescale, dv);
      m = e;
    }
    const T p = std::exp(e - m);
    l += p;
    axpy_row(context, p, values + s * dv, dv);
  }
  if (l == T(0)) {  // no valid position: weights 0, context 0, lse -inf
    std::fill(weights, weights + src.tk, T(0));
    *lse = -std::numeric_limits<T>::infinity();
    return;
  }
  const T log_sum = m + std::log(l);
  *lse = log_sum;
  scale_row(context, T(1) / l, dv);
  for (int64_t s = 0; s < end; ++s) {
    weights[s] = src.valid(b, s) ? std::exp(weights[s] - log_sum) : T(0);
  }
  std::fill(weights + end, weights + src.tk, T(0));
}

// Backward of one query batch row i (all its Tq queries, so that dk[i] and dvalues[i] have a
// single writer): dS = W * (dW - rowsum(W * dW)) with dW = dC @ V.T + grad_weights, then
// score_grad(t, s, dS) adds the score's own gradient (dq, dk, ...). dvalues_i (Tk, Dv) must be
// zero on entry; `scratch` holds Tk elements.
template <typename T, typename ScoreGrad>
inline void attend_bwd_batch_row(const Sources& src, int64_t b, int64_t tq, const T* grad_context,
                                 const T* grad_weights, const T* weights, const T* values,
                                 int64_t dv, T* dvalues_i, T* scratch, ScoreGrad&& score_grad) {
  const int64_t tk = src.tk;
  const int64_t end = src.end(b);
  for (int64_t t = 0; t < tq; ++t) {
    const T* gc = grad_context + t * dv;
    const T* gw = grad_weights + t * tk;
    const T* w = weights + t * tk;
    T w_dot_dw = T(0);
    for (int64_t s = 0; s < end; ++s) {
      if (!src.valid(b, s)) continue;
      const T dw = gw[s] + dot_row(gc, values + s * dv, dv);
      scratch[s] = dw;
      w_dot_dw += w[s] * dw;
      axpy_row(dvalues_i + s * dv, w[s], gc, dv);
    }
    for (int64_t s = 0; s < end; ++s) {
      if (!src.valid(b, s)) continue;
      const T ds = w[s] * (scratch[s] - w_dot_dw);
      if (ds != T(0)) score_grad(t, s, ds);
    }
  }
}

template <typename T>
struct AttentionArgs {
  Sources src;
  const T *q, *k, *v, *values;  // v: additive attention's score vector (A,), else null
  int64_t tq, d, dv;            // d: the query/key feature size (A for additive)
  T scale;                      // dot attention's score scale
  // forward outputs
  T *context, *weights, *lse;
  // backward inputs and outputs
  const T *grad_context, *grad_weights;
  T *dq, *dk, *dv_rows, *dvalues;  // dv_rows: (Bq, A) per-row partial sums of dv
};

template <typename T>
FS2S_ROW_KERNEL void additive_fwd_rows(const AttentionArgs<T>& a, int64_t begin, int64_t end) {
  using V = Vec<T>;
  const int64_t tk = a.src.tk, A = a.d;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = a.src.key_row(r / a.tq);
    const T* q = a.q + r * A;
    const T* k = a.k + b * tk * A;
    attend_row(a.src, b, a.values + b * tk * a.dv, a.dv, a.context + r * a.dv, a.weights + r * tk,
               a.lse + r, [&](int64_t s) {
                 V acc(T(0));
                 for_each_pack<T>(A, [&](int64_t j, int n) {
                   acc += V::load(a.v + j, n) * tanh(V::load(q + j, n) + V::load(k + s * A + j, n));
                 });
                 return acc.sum();
               });
  }
}

template <typename T>
FS2S_ROW_KERNEL void additive_bwd_rows(const AttentionArgs<T>& a, int64_t begin, int64_t end) {
  using V = Vec<T>;
  const int64_t tk = a.src.tk, A = a.d, tq = a.tq, dvs = a.dv;
  std::vector<T> scratch(tk);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = a.src.key_row(i);
    const T* k = a.k + b * tk * A;
    T* dq = a.dq + i * tq * A;
    T* dk = a.dk + i * tk * A;
    T* dv = a.dv_rows + i * A;
    T* dvalues = a.dvalues + i * tk * dvs;
    std::fill(dq, dq + tq * A, T(0));
    std::fill(dk, dk + tk * A, T(0));
    std::fill(dv, dv + A, T(0));
    std::fill(dvalues, dvalues + tk * dvs, T(0));
    attend_bwd_batch_row(
        a.src, b, tq, a.grad_context + i * tq * dvs, a.grad_weights + i * tq * tk,
        a.weights + i * tq * tk, a.values + b * tk * dvs, dvs, dvalues, scratch.data(),
        [&](int64_t t, int64_t s, T ds) {
          const T* q = a.q + (i * tq + t) * A;
          T* dq_t = dq + t * A;
          T* dk_s = dk + s * A;
          for_each_pack<T>(A, [&](int64_t j, int n) {
            const V th = tanh(V::load(q + j, n) + V::load(k + s * A + j, n));  // recomputed
            const V d_pre = V(ds) * V::load(a.v + j, n) * (V(T(1)) - th * th);
            (V::load(dq_t + j, n) + d_pre).store(dq_t + j, n);
            (V::load(dk_s + j, n) + d_pre).store(dk_s + j, n);
            (V::load(dv + j, n) + V(ds) * th).store(dv + j, n);
          });
        });
  }
}

template <typename T>
FS2S_ROW_KERNEL void dot_fwd_rows(const AttentionArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t tk = a.src.tk, D = a.d;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = a.src.key_row(r / a.tq);
    const T* q = a.q + r * D;
    const T* k = a.k + b * tk * D;
    attend_row(a.src, b, a.values + b * tk * a.dv, a.dv, a.context + r * a.dv, a.weights + r * tk,
               a.lse + r, [&](int64_t s) { return a.scale * dot_row(q, k + s * D, D); });
  }
}

template <typename T>
FS2S_ROW_KERNEL void dot_bwd_rows(const AttentionArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t tk = a.src.tk, D = a.d, tq = a.tq, dvs = a.dv;
  std::vector<T> scratch(tk);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = a.src.key_row(i);
    const T* k = a.k + b * tk * D;
    T* dq = a.dq + i * tq * D;
    T* dk = a.dk + i * tk * D;
    T* dvalues = a.dvalues + i * tk * dvs;
    std::fill(dq, dq + tq * D, T(0));
    std::fill(dk, dk + tk * D, T(0));
    std::fill(dvalues, dvalues + tk * dvs, T(0));
    attend_bwd_batch_row(a.src, b, tq, a.grad_context + i * tq * dvs, a.grad_weights + i * tq * tk,
                         a.weights + i * tq * tk, a.values + b * tk * dvs, dvs, dvalues,
                         scratch.data(), [&](int64_t t, int64_t s, T ds) {
                           const T d_score = ds * a.scale;
                           axpy_row(dq + t * D, d_score, k + s * D, D);
                           axpy_row(dk + s * D, d_score, a.q + (i * tq + t) * D, D);
                         });
  }
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.data_ptr<T>();
}
template <typename T>
T* mut_ptr(at::Tensor& t) {
  return t.data_ptr<T>();
}

}  // namespace

// ------------------------------------------------------------------------------ entry points

std::tuple<Tensor, Tensor> gru_cell_fwd(const Tensor& gx, const Tensor& h, const Tensor& w_hh,
                                        const OptTensor& b_hh) {
  const int64_t B = h.size(0), H = h.size(1);
  const Tensor gh = b_hh ? at::addmm(*b_hh, h, w_hh.t()) : at::mm(h, w_hh.t());
  Tensor h_new = at::empty({B, H}, h.options());
  Tensor saved = at::empty({B, 4 * H}, h.options());
  dispatch_float(h, [&](auto zero) {
    using T = decltype(zero);
    const GruFwdArgs<T> args{ptr<T>(gx), ptr<T>(gh), ptr<T>(h), mut_ptr<T>(h_new),
                             mut_ptr<T>(saved), H};
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
    using T = decltype(zero);
    const GruBwdArgs<T> args{ptr<T>(grad_h_new), ptr<T>(h), ptr<T>(saved), mut_ptr<T>(grad_gx),
                             mut_ptr<T>(grad_gh), mut_ptr<T>(grad_h_direct), H};
    at::parallel_for(0, B, grain_for(2 * H), [&](int64_t b0, int64_t b1) { gru_bwd_rows(args, b0, b1); });
  });
  return {grad_gx, grad_gh, grad_h_direct};
}

std::tuple<Tensor, Tensor, Tensor> lstm_cell_fwd(const Tensor& gx, const Tensor& h, const Tensor& c,
                                                 const Tensor& w_hh, const OptTensor& b_hh) {
  const int64_t B = h.size(0), H = h.size(1);
  const Tensor pre = at::addmm(gx, h, w_hh.t());  // gx + h @ w_hh.T in one BLAS call
  Tensor h_new = at::empty({B, H}, h.options());
  Tensor c_new = at::empty({B, H}, c.options());
  Tensor saved = at::empty({B, 4 * H}, h.options());
  dispatch_float(h, [&](auto zero) {
    using T = decltype(zero);
    const LstmFwdArgs<T> args{ptr<T>(pre), b_hh ? ptr<T>(*b_hh) : nullptr, ptr<T>(c),
                              mut_ptr<T>(h_new), mut_ptr<T>(c_new), mut_ptr<T>(saved), H};
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
    using T = decltype(zero);
    const LstmBwdArgs<T> args{ptr<T>(grad_h_new), ptr<T>(grad_c_new), ptr<T>(c), ptr<T>(c_new),
                              ptr<T>(saved), mut_ptr<T>(grad_gates), mut_ptr<T>(grad_c), H};
    at::parallel_for(0, B, grain_for(2 * H), [&](int64_t b0, int64_t b1) { lstm_bwd_rows(args, b0, b1); });
  });
  return {grad_gates, grad_c};
}

namespace {

// The outputs of an attention forward and the common arguments of its kernel.
template <typename T>
AttentionArgs<T> attention_args(const Tensor& q, const Tensor& k, const Tensor& values,
                                const OptTensor& mask, const OptTensor& lengths,
                                const OptTensor& kv_batch_idx) {
  AttentionArgs<T> a{};
  a.src = sources_of(mask, lengths, kv_batch_idx, k.size(1));
  a.q = ptr<T>(q);
  a.k = ptr<T>(k);
  a.values = ptr<T>(values);
  a.tq = q.size(1);
  a.d = q.size(2);
  a.dv = values.size(2);
  return a;
}

struct FwdOutputs {
  Tensor context, weights, lse;
};

FwdOutputs attention_outputs(const Tensor& q, const Tensor& k, const Tensor& values) {
  const int64_t bq = q.size(0), tq = q.size(1), tk = k.size(1), dv = values.size(2);
  return {at::empty({bq, tq, dv}, q.options()), at::empty({bq, tq, tk}, q.options()),
          at::empty({bq, tq}, q.options())};  // CPU: the accumulation dtype is the input's
}

template <typename T>
void set_fwd_outputs(AttentionArgs<T>& a, FwdOutputs& out) {
  a.context = mut_ptr<T>(out.context);
  a.weights = mut_ptr<T>(out.weights);
  a.lse = mut_ptr<T>(out.lse);
}

template <typename T>
void set_bwd_inputs(AttentionArgs<T>& a, const Tensor& grad_context, const Tensor& grad_weights,
                    const Tensor& weights) {
  a.grad_context = ptr<T>(grad_context);
  a.grad_weights = ptr<T>(grad_weights);
  a.weights = const_cast<T*>(ptr<T>(weights));  // read only in the backward
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> additive_attention_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& values, const OptTensor& mask,
    const OptTensor& lengths, const OptTensor& kv_batch_idx) {
  FwdOutputs out = attention_outputs(q, k, values);
  dispatch_float(q, [&](auto zero) {
    using T = decltype(zero);
    AttentionArgs<T> a = attention_args<T>(q, k, values, mask, lengths, kv_batch_idx);
    a.v = ptr<T>(v);
    set_fwd_outputs(a, out);
    const int64_t rows = q.size(0) * q.size(1);
    at::parallel_for(0, rows, grain_for(k.size(1) * (a.d + a.dv)),
                     [&](int64_t r0, int64_t r1) { additive_fwd_rows(a, r0, r1); });
  });
  return {out.context, out.weights, out.lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> additive_attention_bwd(
    const Tensor& grad_context, const Tensor& grad_weights, const Tensor& q, const Tensor& k,
    const Tensor& v, const Tensor& values, const OptTensor& mask, const OptTensor& lengths,
    const OptTensor& kv_batch_idx, const Tensor& weights, const Tensor& /*lse*/) {
  const int64_t bq = q.size(0), tk = k.size(1), A = q.size(2), dvs = values.size(2);
  Tensor dq = at::empty_like(q);
  Tensor dk = at::empty({bq, tk, A}, q.options());
  Tensor dv = at::empty({A}, q.options());
  Tensor dvalues = at::empty({bq, tk, dvs}, q.options());
  dispatch_float(q, [&](auto zero) {
    using T = decltype(zero);
    AttentionArgs<T> a = attention_args<T>(q, k, values, mask, lengths, kv_batch_idx);
    a.v = ptr<T>(v);
    set_bwd_inputs(a, grad_context, grad_weights, weights);
    std::vector<T> dv_rows(static_cast<size_t>(bq * A));
    a.dq = mut_ptr<T>(dq);
    a.dk = mut_ptr<T>(dk);
    a.dv_rows = dv_rows.data();
    a.dvalues = mut_ptr<T>(dvalues);
    at::parallel_for(0, bq, grain_for(q.size(1) * tk * (A + dvs)),
                     [&](int64_t i0, int64_t i1) { additive_bwd_rows(a, i0, i1); });
    // dv is shared by every row: per-row partial sums, added in a fixed order (deterministic).
    T* dv_out = mut_ptr<T>(dv);
    std::fill(dv_out, dv_out + A, T(0));
    for (int64_t i = 0; i < bq; ++i) axpy_row(dv_out, T(1), dv_rows.data() + i * A, A);
  });
  return {dq, dk, dv, dvalues};
}

std::tuple<Tensor, Tensor, Tensor> dot_attention_fwd(
    const Tensor& q, const Tensor& k, const Tensor& values, const OptTensor& mask,
    const OptTensor& lengths, const OptTensor& kv_batch_idx, double scale) {
  FwdOutputs out = attention_outputs(q, k, values);
  dispatch_float(q, [&](auto zero) {
    using T = decltype(zero);
    AttentionArgs<T> a = attention_args<T>(q, k, values, mask, lengths, kv_batch_idx);
    a.scale = static_cast<T>(scale);
    set_fwd_outputs(a, out);
    const int64_t rows = q.size(0) * q.size(1);
    at::parallel_for(0, rows, grain_for(k.size(1) * (a.d + a.dv) / 8),
                     [&](int64_t r0, int64_t r1) { dot_fwd_rows(a, r0, r1); });
  });
  return {out.context, out.weights, out.lse};
}

std::tuple<Tensor, Tensor, Tensor> dot_attention_bwd(
    const Tensor& grad_context, const Tensor& grad_weights, const Tensor& q, const Tensor& k,
    const Tensor& values, const OptTensor& mask, const OptTensor& lengths,
    const OptTensor& kv_batch_idx, double scale, const Tensor& weights, const Tensor& /*lse*/) {
  const int64_t bq = q.size(0), tk = k.size(1), D = q.size(2), dvs = values.size(2);
  Tensor dq = at::empty_like(q);
  Tensor dk = at::empty({bq, tk, D}, q.options());
  Tensor dvalues = at::empty({bq, tk, dvs}, q.options());
  dispatch_float(q, [&](auto zero) {
    using T = decltype(zero);
    AttentionArgs<T> a = attention_args<T>(q, k, values, mask, lengths, kv_batch_idx);
    a.scale = static_cast<T>(scale);
    set_bwd_inputs(a, grad_context, grad_weights, weights);
    a.dq = mut_ptr<T>(dq);
    a.dk = mut_ptr<T>(dk);
    a.dvalues = mut_ptr<T>(dvalues);
    at::parallel_for(0, bq, grain_for(q.size(1) * tk * (D + dvs) / 8),
                     [&](int64_t i0, int64_t i1) { dot_bwd_rows(a, i0, i1); });
  });
  return {dq, dk, dvalues};
}

}  // namespace cpu
}  // namespace fused_s2s
