// CPU kernels of the eight primitives, float32 and float64 (the number type T is also the
// accumulation type). BLAS does the linear algebra (the recurrent GEMM of the cells; the dot
// products of dot attention; dW = dC @ V.T and dV = W.T @ dC of the attention backward); our
// row kernels do the rest in one pass each, on SIMD packs:
// - cells: the gate math of gates.h (shared with the CUDA kernels), forward and backward;
// - additive attention: per query row, the scores of its valid keys (tanh on the fly: the
//   (B, Tq, Tk, A) tensor never exists), the softmax in place, the context; the backward
//   recomputes tanh. Keys at or past a row's length are never read.
// - softmax forward (scale, mask, normalise, lse) and backward, fused.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/index_select.h>
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

// Calls f(T{}) with T the C++ type of a float32/float64 tensor (the bindings allow no other).
template <typename F>
void dispatch_float(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kDouble) {
    f(double{});
  } else {
    TORCH_INTERNAL_ASSERT(t.scalar_type() == at::kFloat, "CPU kernels take float32 or float64");
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

// Softmax in place over w[0, end), where -inf marks an invalid position; w[end, tk) is set to 0.
// Returns the log-sum-exp. A row with no valid position becomes all zeros with lse = -inf.
// (The weights are an output, so the scores are stored first and normalised in a second,
// vectorised pass: cheaper on a CPU than rescaling a running sum with a scalar exp per key.)
template <typename T>
inline T softmax_in_place(T* w, int64_t end, int64_t tk) {
  using V = Vec<T>;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  V vmax(kNegInf);
  for_each_pack<T>(end, [&](int64_t j, int n) { vmax = max_nan(V::load(w + j, n, kNegInf), vmax); });
  const T m = vmax.max();
  std::fill(w + end, w + tk, T(0));
  if (m == kNegInf) {
    std::fill(w, w + end, T(0));
    return kNegInf;
  }
  V vsum(T(0));
  for_each_pack<T>(end, [&](int64_t j, int n) {
    const V e = exp(V::load(w + j, n, kNegInf) - V(m));  // exp(-inf) = 0 at invalid positions
    e.store(w + j, n);
    vsum += e;
  });
  const T sum = vsum.sum();
  scale_row(w, T(1) / sum, end);
  return m + std::log(sum);
}

template <typename T>
struct AttentionArgs {
  Sources src;
  int64_t tq, d, dv;  // d: the query/key feature size (A for additive attention)
  T scale;            // dot attention's score scale (1 for additive)
  const T *q, *k, *v, *values;  // v: additive attention's score vector (A,)
  T *weights, *lse, *context;   // forward outputs (weights: the raw scores on entry, for dot)
  const T* saved_weights;       // backward: the forward's weights
  T* d_scores;                  // backward: dW = dC @ V.T + grad_weights on entry, dS on exit
  T *dq, *dk, *dv_rows;         // dv_rows: (Bq, A) per-row partial sums of dv
};

// Additive attention forward, query rows [begin, end): per row, the scores of its valid keys,
// the softmax in place, then the context. Reads the key/value rows in place (no gather).
template <typename T>
FS2S_ROW_KERNEL void additive_fwd_rows(const AttentionArgs<T>& a, int64_t begin, int64_t end) {
  using V = Vec<T>;
  const int64_t tk = a.src.tk, A = a.d, dv = a.dv;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = a.src.key_row(r / a.tq);
    const int64_t n_keys = a.src.end(b);
    const T* q = a.q + r * A;
    const T* k = a.k + b * tk * A;
    const T* values = a.values + b * tk * dv;
    T* w = a.weights + r * tk;
    for (int64_t s = 0; s < n_keys; ++s) {
      if (!a.src.valid(b, s)) {
        w[s] = -std::numeric_limits<T>::infinity();
        continue;
      }
      V acc(T(0));
      for_each_pack<T>(A, [&](int64_t j, int n) {
        acc += V::load(a.v + j, n) * tanh(V::load(q + j, n) + V::load(k + s * A + j, n));
      });
      w[s] = acc.sum();
    }
    a.lse[r] = softmax_in_place(w, n_keys, tk);
    T* context = a.context + r * dv;
    std::fill(context, context + dv, T(0));
    for (int64_t s = 0; s < n_keys; ++s) {
      if (w[s] != T(0)) axpy_row(context, w[s], values + s * dv, dv);
    }
  }
}

// Dot attention forward, query rows [begin, end): the raw scores q @ k.T (from BLAS) in the
// weights rows become the weights: scaled, masked, normalised in place.
template <typename T>
FS2S_ROW_KERNEL void scores_to_weights_rows(const AttentionArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t tk = a.src.tk;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = a.src.key_row(r / a.tq);
    const int64_t n_keys = a.src.end(b);
    T* w = a.weights + r * tk;
    for (int64_t s = 0; s < n_keys; ++s) {
      w[s] = a.src.valid(b, s) ? a.scale * w[s] : -std::numeric_limits<T>::infinity();
    }
    a.lse[r] = softmax_in_place(w, n_keys, tk);
  }
}

// Softmax backward, query rows [begin, end), in place: dW = dC @ V.T + grad_weights becomes
// dS = scale * W * (dW - rowsum(W * dW)) over the valid positions, and 0 elsewhere.
template <typename T>
FS2S_ROW_KERNEL void softmax_bwd_rows(const AttentionArgs<T>& a, int64_t begin, int64_t end) {
  using V = Vec<T>;
  const int64_t tk = a.src.tk;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = a.src.key_row(r / a.tq);
    const int64_t n_keys = a.src.end(b);
    const T* w = a.saved_weights + r * tk;
    T* d = a.d_scores + r * tk;
    for (int64_t s = 0; s < n_keys; ++s) {
      if (!a.src.valid(b, s)) d[s] = T(0);  // whatever the padding held
    }
    std::fill(d + n_keys, d + tk, T(0));
    V w_dot_dw(T(0));
    for_each_pack<T>(n_keys, [&](int64_t j, int n) { w_dot_dw += V::load(w + j, n) * V::load(d + j, n); });
    const V total(w_dot_dw.sum()), scale(a.scale);
    for_each_pack<T>(n_keys, [&](int64_t j, int n) {
      (scale * V::load(w + j, n) * (V::load(d + j, n) - total)).store(d + j, n);
    });
  }
}

// Additive attention backward through the scores, query batch rows [begin, end) (all Tq
// queries of a row together, so dk[i] has a single writer): from dS, with tanh recomputed,
// dq = sum_s dS * v * (1 - t^2), dk[s] = sum_t (same), dv = sum dS * t.
template <typename T>
FS2S_ROW_KERNEL void additive_scores_bwd_rows(const AttentionArgs<T>& a, int64_t begin, int64_t end) {
  using V = Vec<T>;
  const int64_t tk = a.src.tk, A = a.d, tq = a.tq;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = a.src.key_row(i);
    const int64_t n_keys = a.src.end(b);
    const T* k = a.k + b * tk * A;
    T* dq = a.dq + i * tq * A;
    T* dk = a.dk + i * tk * A;
    T* dv = a.dv_rows + i * A;
    std::fill(dq, dq + tq * A, T(0));
    std::fill(dk, dk + tk * A, T(0));
    std::fill(dv, dv + A, T(0));
    for (int64_t t = 0; t < tq; ++t) {
      const T* q = a.q + (i * tq + t) * A;
      const T* ds_row = a.d_scores + (i * tq + t) * tk;
      T* dq_t = dq + t * A;
      for (int64_t s = 0; s < n_keys; ++s) {
        const T ds = ds_row[s];
        if (ds == T(0)) continue;  // masked, or no gradient
        T* dk_s = dk + s * A;
        for_each_pack<T>(A, [&](int64_t j, int n) {
          const V th = tanh(V::load(q + j, n) + V::load(k + s * A + j, n));  // recomputed
          const V d_pre = V(ds) * V::load(a.v + j, n) * (V(T(1)) - th * th);
          (V::load(dq_t + j, n) + d_pre).store(dq_t + j, n);
          (V::load(dk_s + j, n) + d_pre).store(dk_s + j, n);
          (V::load(dv + j, n) + V(ds) * th).store(dv + j, n);
        });
      }
    }
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

// Key-side tensor seen from the query rows: BLAS needs one key row per query row, so with
// kv_batch_idx the rows are gathered (as the torch backend does).
Tensor key_side_rows(const Tensor& t, const OptTensor& kv_batch_idx) {
  return kv_batch_idx ? t.index_select(0, *kv_batch_idx) : t;
}

template <typename T>
AttentionArgs<T> attention_args(const Tensor& q, const Tensor& k, const Tensor& values,
                                const OptTensor& mask, const OptTensor& lengths,
                                const OptTensor& kv_batch_idx, double scale) {
  AttentionArgs<T> a{};
  a.src = sources_of(mask, lengths, kv_batch_idx, k.size(1));
  a.tq = q.size(1);
  a.d = q.size(2);
  a.dv = values.size(2);
  a.scale = static_cast<T>(scale);
  a.q = ptr<T>(q);
  a.k = ptr<T>(k);
  a.values = ptr<T>(values);
  return a;
}

// Work per item for parallel_for over query rows of attention.
int64_t attention_row_work(const Tensor& q, const Tensor& k, const Tensor& values) {
  return k.size(1) * (q.size(2) + values.size(2));
}

// dW = grad_context @ values.T + grad_weights, turned into dS in place (see softmax_bwd_rows).
template <typename T>
Tensor score_grads(AttentionArgs<T>& a, const Tensor& grad_context, const Tensor& grad_weights,
                   const Tensor& values_rows, const Tensor& weights) {
  Tensor d_scores = at::baddbmm(grad_weights, grad_context, values_rows.transpose(1, 2));
  a.saved_weights = ptr<T>(weights);
  a.d_scores = mut_ptr<T>(d_scores);
  const int64_t rows = weights.size(0) * weights.size(1);
  at::parallel_for(0, rows, grain_for(weights.size(2)),
                   [&](int64_t r0, int64_t r1) { softmax_bwd_rows(a, r0, r1); });
  return d_scores;
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
  const int64_t B = h.size(0), H = c.size(1);      // h is (B, P) when the LSTM projects
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

std::tuple<Tensor, Tensor, Tensor> additive_attention_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& values, const OptTensor& mask,
    const OptTensor& lengths, const OptTensor& kv_batch_idx) {
  const int64_t bq = q.size(0), tq = q.size(1), tk = k.size(1), dv = values.size(2);
  Tensor context = at::empty({bq, tq, dv}, q.options());
  Tensor weights = at::empty({bq, tq, tk}, q.options());
  Tensor lse = at::empty({bq, tq}, q.options());  // on CPU the accumulation dtype is the input's
  dispatch_float(q, [&](auto zero) {
    using T = decltype(zero);
    AttentionArgs<T> a = attention_args<T>(q, k, values, mask, lengths, kv_batch_idx, 1.0);
    a.v = ptr<T>(v);
    a.weights = mut_ptr<T>(weights);
    a.lse = mut_ptr<T>(lse);
    a.context = mut_ptr<T>(context);
    at::parallel_for(0, bq * tq, grain_for(attention_row_work(q, k, values)),
                     [&](int64_t r0, int64_t r1) { additive_fwd_rows(a, r0, r1); });
  });
  return {context, weights, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> additive_attention_bwd(
    const Tensor& grad_context, const Tensor& grad_weights, const Tensor& q, const Tensor& k,
    const Tensor& v, const Tensor& values, const OptTensor& mask, const OptTensor& lengths,
    const OptTensor& kv_batch_idx, const Tensor& weights, const Tensor& /*lse*/) {
  const int64_t bq = q.size(0), tk = k.size(1), A = q.size(2);
  const Tensor values_rows = key_side_rows(values, kv_batch_idx);
  Tensor dq = at::empty_like(q);
  Tensor dk = at::empty({bq, tk, A}, q.options());
  Tensor dv = at::empty({A}, q.options());
  dispatch_float(q, [&](auto zero) {
    using T = decltype(zero);
    AttentionArgs<T> a = attention_args<T>(q, k, values, mask, lengths, kv_batch_idx, 1.0);
    a.v = ptr<T>(v);
    const Tensor d_scores = score_grads(a, grad_context, grad_weights, values_rows, weights);
    std::vector<T> dv_rows(static_cast<size_t>(bq * A));
    a.dq = mut_ptr<T>(dq);
    a.dk = mut_ptr<T>(dk);
    a.dv_rows = dv_rows.data();
    at::parallel_for(0, bq, grain_for(q.size(1) * tk * A),
                     [&](int64_t i0, int64_t i1) { additive_scores_bwd_rows(a, i0, i1); });
    // dv is shared by every row: per-row partial sums, added in a fixed order (deterministic).
    T* dv_out = mut_ptr<T>(dv);
    std::fill(dv_out, dv_out + A, T(0));
    for (int64_t i = 0; i < bq; ++i) axpy_row(dv_out, T(1), dv_rows.data() + i * A, A);
  });
  Tensor dvalues = at::bmm(weights.transpose(1, 2), grad_context);
  return {dq, dk, dv, dvalues};
}

// Dot attention: the scores and the context are batched GEMMs (BLAS is the fast way on a CPU);
// between them one fused pass scales, masks and normalises the scores in place. Unlike the
// additive kernels (and the CUDA ones), the GEMMs read the keys/values past a row's length:
// they must be finite there, as for the torch backend (their weights are exactly 0).
std::tuple<Tensor, Tensor, Tensor> dot_attention_fwd(
    const Tensor& q, const Tensor& k, const Tensor& values, const OptTensor& mask,
    const OptTensor& lengths, const OptTensor& kv_batch_idx, double scale) {
  Tensor weights = at::bmm(q, key_side_rows(k, kv_batch_idx).transpose(1, 2));
  Tensor lse = at::empty({q.size(0), q.size(1)}, q.options());
  dispatch_float(q, [&](auto zero) {
    using T = decltype(zero);
    AttentionArgs<T> a = attention_args<T>(q, k, values, mask, lengths, kv_batch_idx, scale);
    a.weights = mut_ptr<T>(weights);
    a.lse = mut_ptr<T>(lse);
    at::parallel_for(0, q.size(0) * q.size(1), grain_for(k.size(1)),
                     [&](int64_t r0, int64_t r1) { scores_to_weights_rows(a, r0, r1); });
  });
  Tensor context = at::bmm(weights, key_side_rows(values, kv_batch_idx));
  return {context, weights, lse};
}

std::tuple<Tensor, Tensor, Tensor> dot_attention_bwd(
    const Tensor& grad_context, const Tensor& grad_weights, const Tensor& q, const Tensor& k,
    const Tensor& values, const OptTensor& mask, const OptTensor& lengths,
    const OptTensor& kv_batch_idx, double scale, const Tensor& weights, const Tensor& /*lse*/) {
  Tensor d_scores;
  dispatch_float(q, [&](auto zero) {
    using T = decltype(zero);
    AttentionArgs<T> a = attention_args<T>(q, k, values, mask, lengths, kv_batch_idx, scale);
    d_scores = score_grads(a, grad_context, grad_weights, key_side_rows(values, kv_batch_idx), weights);
  });
  Tensor dq = at::bmm(d_scores, key_side_rows(k, kv_batch_idx));
  Tensor dk = at::bmm(d_scores.transpose(1, 2), q);
  Tensor dvalues = at::bmm(weights.transpose(1, 2), grad_context);
  return {dq, dk, dvalues};
}

}  // namespace cpu
}  // namespace fused_s2s
