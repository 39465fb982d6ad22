// CPU kernels of the eight primitives, for float32, float64, bfloat16 and float16 tensors. The
// math runs in the accumulation type (float32, or float64 for float64 tensors): 16-bit values
// widen as they are loaded and round once as they are stored. BLAS does the linear algebra (the recurrent GEMM of the cells; the dot
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
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
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

// ------------------------------------------------------------- storage and accumulation types
// A tensor's elements have a storage type S; the kernels compute in acc_t<S>: float for
// bfloat16, float16 and float32, double for float64 (the contract's accumulation dtype).

template <typename S>
struct AccType {
  using type = S;
};
template <>
struct AccType<c10::BFloat16> {
  using type = float;
};
template <>
struct AccType<c10::Half> {
  using type = float;
};
template <typename S>
using acc_t = typename AccType<S>::type;
template <typename S>
constexpr bool kNarrow = !std::is_same_v<S, acc_t<S>>;  // a 16-bit storage type

at::ScalarType acc_dtype(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The first n lanes of a pack from p, widened to acc_t<S>; the other lanes `fill` (which must
// be exact in S: 0 or -inf).
template <typename S>
inline Vec<acc_t<S>> load(const S* p, int n, acc_t<S> fill = 0) {
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    return load_bf16(reinterpret_cast<const uint16_t*>(p), n, fill);
  } else if constexpr (std::is_same_v<S, c10::Half>) {
    return load_f16(reinterpret_cast<const uint16_t*>(p), n, fill);
  } else {
    return Vec<S>::load(p, n, fill);
  }
}

// The first n lanes of x into p, rounded to S (to nearest even).
template <typename S>
inline void store(Vec<acc_t<S>> x, S* p, int n) {
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    store_bf16(x, reinterpret_cast<uint16_t*>(p), n);
  } else if constexpr (std::is_same_v<S, c10::Half>) {
    store_f16(x, reinterpret_cast<uint16_t*>(p), n);
  } else {
    x.store(p, n);
  }
}

template <typename T>
inline void scale_row(T* x, T alpha, int64_t n) {
  using V = Vec<T>;
  for_each_pack<T>(n, [&](int64_t j, int w) { (V(alpha) * V::load(x + j, w)).store(x + j, w); });
}

// y += alpha * x, with y in the accumulation type of x
template <typename S>
inline void axpy_row(acc_t<S>* y, acc_t<S> alpha, const S* x, int64_t n) {
  using V = Vec<acc_t<S>>;
  for_each_pack<acc_t<S>>(n, [&](int64_t j, int w) {
    (V::load(y + j, w) + V(alpha) * load(x + j, w)).store(y + j, w);
  });
}

// A working row in acc_t<S> for a row of S: the row itself when S is the accumulation type,
// else a buffer (one per parallel task, reused row after row) that `done` rounds into an
// output row (sums over keys or rows thus round to 16 bits once) or `widen` fills from an
// input row.
template <typename S>
class AccRow {
 public:
  using T = acc_t<S>;
  // The working row for out[0, n), its contents undefined.
  T* begin(S* out, int64_t n) {
    if constexpr (kNarrow<S>) {
      buffer_.resize(static_cast<size_t>(n));
      return buffer_.data();
    } else {
      return out;
    }
  }
  // in[0, n) in acc_t<S>: `in` itself when S is the accumulation type, else widened into the
  // buffer (for a row read many times).
  const T* widen(const S* in, int64_t n) {
    if constexpr (kNarrow<S>) {
      T* row = begin(nullptr, n);
      for_each_pack<T>(n, [&](int64_t j, int w) { load(in + j, w).store(row + j, w); });
      return row;
    } else {
      return in;
    }
  }
  void done(const T* row, S* out, int64_t n) const {
    if constexpr (kNarrow<S>) {
      for_each_pack<T>(n, [&](int64_t j, int w) { store(Vec<T>::load(row + j, w), out + j, w); });
    }
  }

 private:
  std::vector<T> buffer_;
};

// Calls f(S{}) with S the C++ type of the tensor's elements (the bindings allow no others).
template <typename F>
void dispatch_float(const at::Tensor& t, F&& f) {
  switch (t.scalar_type()) {
    case at::kDouble: return f(double{});
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_INTERNAL_ASSERT(false, "CPU kernels take float32, float64, bfloat16 or float16");
  }
}

// ------------------------------------------------------------------------------------ cells

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

template <typename S>
struct AttentionArgs {
  using T = acc_t<S>;
  Sources src;
  int64_t tq, d, dv;  // d: the query/key feature size (A for additive attention)
  T scale;            // dot attention's score scale (1 for additive)
  const S *q, *k, *v, *values;  // v: additive attention's score vector (A,)
  S *weights, *context;         // additive forward outputs
  T* scores;                    // dot forward: the raw scores q @ k.T on entry, the weights on exit
  T* lse;                       // forward output
  const S* saved_weights;       // backward: the forward's weights
  T* d_scores;                  // backward: dW = dC @ V.T + grad_weights on entry, dS on exit
  S *dq, *dk;
  T* dv_rows;                   // (Bq, A) per-row partial sums of dv
};

// Additive attention forward, query rows [begin, end): per row, the scores of its valid keys,
// the softmax in place, then the context. Reads the key/value rows in place (no gather).
template <typename S>
FS2S_ROW_KERNEL void additive_fwd_rows(const AttentionArgs<S>& a, int64_t begin, int64_t end) {
  using T = acc_t<S>;
  using V = Vec<T>;
  const int64_t tk = a.src.tk, A = a.d, dv = a.dv;
  AccRow<S> weights_row, context_row, q_row, v_row;
  const T* v = v_row.widen(a.v, A);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = a.src.key_row(r / a.tq);
    const int64_t n_keys = a.src.end(b);
    const T* q = q_row.widen(a.q + r * A, A);
    const S* k = a.k + b * tk * A;
    const S* values = a.values + b * tk * dv;
    T* w = weights_row.begin(a.weights + r * tk, tk);
    for (int64_t s = 0; s < n_keys; ++s) {
      if (!a.src.valid(b, s)) {
        w[s] = -std::numeric_limits<T>::infinity();
        continue;
      }
      V acc(T(0));
      for_each_pack<T>(A, [&](int64_t j, int n) {
        acc += V::load(v + j, n) * tanh(V::load(q + j, n) + load(k + s * A + j, n));
      });
      w[s] = acc.sum();
    }
    a.lse[r] = softmax_in_place(w, n_keys, tk);
    T* context = context_row.begin(a.context + r * dv, dv);
    std::fill(context, context + dv, T(0));
    for (int64_t s = 0; s < n_keys; ++s) {
      if (w[s] != T(0)) axpy_row(context, w[s], values + s * dv, dv);
    }
    weights_row.done(w, a.weights + r * tk, tk);
    context_row.done(context, a.context + r * dv, dv);
  }
}

// Dot attention forward, query rows [begin, end): the raw scores q @ k.T (from BLAS) become
// the weights: scaled, masked, normalised in place.
template <typename S>
FS2S_ROW_KERNEL void scores_to_weights_rows(const AttentionArgs<S>& a, int64_t begin, int64_t end) {
  using T = acc_t<S>;
  const int64_t tk = a.src.tk;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = a.src.key_row(r / a.tq);
    const int64_t n_keys = a.src.end(b);
    T* w = a.scores + r * tk;
    for (int64_t s = 0; s < n_keys; ++s) {
      w[s] = a.src.valid(b, s) ? a.scale * w[s] : -std::numeric_limits<T>::infinity();
    }
    a.lse[r] = softmax_in_place(w, n_keys, tk);
  }
}

// Softmax backward, query rows [begin, end), in place: dW = dC @ V.T + grad_weights becomes
// dS = scale * W * (dW - rowsum(W * dW)) over the valid positions, and 0 elsewhere.
template <typename S>
FS2S_ROW_KERNEL void softmax_bwd_rows(const AttentionArgs<S>& a, int64_t begin, int64_t end) {
  using T = acc_t<S>;
  using V = Vec<T>;
  const int64_t tk = a.src.tk;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = a.src.key_row(r / a.tq);
    const int64_t n_keys = a.src.end(b);
    const S* w = a.saved_weights + r * tk;
    T* d = a.d_scores + r * tk;
    for (int64_t s = 0; s < n_keys; ++s) {
      if (!a.src.valid(b, s)) d[s] = T(0);  // whatever the padding held
    }
    std::fill(d + n_keys, d + tk, T(0));
    V w_dot_dw(T(0));
    for_each_pack<T>(n_keys, [&](int64_t j, int n) { w_dot_dw += load(w + j, n) * V::load(d + j, n); });
    const V total(w_dot_dw.sum()), scale(a.scale);
    for_each_pack<T>(n_keys, [&](int64_t j, int n) {
      (scale * load(w + j, n) * (V::load(d + j, n) - total)).store(d + j, n);
    });
  }
}

// Additive attention backward through the scores, query batch rows [begin, end) (all Tq
// queries of a row together, so dk[i] has a single writer): from dS, with tanh recomputed,
// dq = sum_s dS * v * (1 - t^2), dk[s] = sum_t (same), dv = sum dS * t.
template <typename S>
FS2S_ROW_KERNEL void additive_scores_bwd_rows(const AttentionArgs<S>& a, int64_t begin, int64_t end) {
  using T = acc_t<S>;
  using V = Vec<T>;
  const int64_t tk = a.src.tk, A = a.d, tq = a.tq;
  AccRow<S> dq_rows, dk_rows, q_row, v_row;
  const T* v = v_row.widen(a.v, A);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = a.src.key_row(i);
    const int64_t n_keys = a.src.end(b);
    const S* k = a.k + b * tk * A;
    T* dq = dq_rows.begin(a.dq + i * tq * A, tq * A);
    T* dk = dk_rows.begin(a.dk + i * tk * A, tk * A);
    T* dv = a.dv_rows + i * A;
    std::fill(dq, dq + tq * A, T(0));
    std::fill(dk, dk + tk * A, T(0));
    std::fill(dv, dv + A, T(0));
    for (int64_t t = 0; t < tq; ++t) {
      const T* q = q_row.widen(a.q + (i * tq + t) * A, A);
      const T* ds_row = a.d_scores + (i * tq + t) * tk;
      T* dq_t = dq + t * A;
      for (int64_t s = 0; s < n_keys; ++s) {
        const T ds = ds_row[s];
        if (ds == T(0)) continue;  // masked, or no gradient
        T* dk_s = dk + s * A;
        for_each_pack<T>(A, [&](int64_t j, int n) {
          const V th = tanh(V::load(q + j, n) + load(k + s * A + j, n));  // recomputed
          const V d_pre = V(ds) * V::load(v + j, n) * (V(T(1)) - th * th);
          (V::load(dq_t + j, n) + d_pre).store(dq_t + j, n);
          (V::load(dk_s + j, n) + d_pre).store(dk_s + j, n);
          (V::load(dv + j, n) + V(ds) * th).store(dv + j, n);
        });
      }
    }
    dq_rows.done(dq, a.dq + i * tq * A, tq * A);
    dk_rows.done(dk, a.dk + i * tk * A, tk * A);
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

// The tensor in the accumulation dtype (itself for float32/float64). The attention GEMMs run
// on widened operands: BLAS on 16-bit operands would round the scores (and their gradients)
// to 16 bits before the softmax, which the contract computes in float32.
Tensor wide(const Tensor& t) {
  return t.to(acc_dtype(t));
}

template <typename S>
AttentionArgs<S> attention_args(const Tensor& q, const Tensor& k, const Tensor& values,
                                const OptTensor& mask, const OptTensor& lengths,
                                const OptTensor& kv_batch_idx, double scale) {
  AttentionArgs<S> a{};
  a.src = sources_of(mask, lengths, kv_batch_idx, k.size(1));
  a.tq = q.size(1);
  a.d = q.size(2);
  a.dv = values.size(2);
  a.scale = static_cast<acc_t<S>>(scale);
  a.q = ptr<S>(q);
  a.k = ptr<S>(k);
  a.values = ptr<S>(values);
  return a;
}

// Work per item for parallel_for over query rows of attention.
int64_t attention_row_work(const Tensor& q, const Tensor& k, const Tensor& values) {
  return k.size(1) * (q.size(2) + values.size(2));
}

// dW = grad_context @ values.T + grad_weights, turned into dS in place (see softmax_bwd_rows),
// in the accumulation dtype.
template <typename S>
Tensor score_grads(AttentionArgs<S>& a, const Tensor& grad_context, const Tensor& grad_weights,
                   const Tensor& values_rows, const Tensor& weights) {
  Tensor d_scores = at::baddbmm(wide(grad_weights), wide(grad_context), values_rows.transpose(1, 2));
  a.saved_weights = ptr<S>(weights);
  a.d_scores = mut_ptr<acc_t<S>>(d_scores);
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

std::tuple<Tensor, Tensor, Tensor> additive_attention_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& values, const OptTensor& mask,
    const OptTensor& lengths, const OptTensor& kv_batch_idx) {
  const int64_t bq = q.size(0), tq = q.size(1), tk = k.size(1), dv = values.size(2);
  Tensor context = at::empty({bq, tq, dv}, q.options());
  Tensor weights = at::empty({bq, tq, tk}, q.options());
  Tensor lse = at::empty({bq, tq}, q.options().dtype(acc_dtype(q)));
  dispatch_float(q, [&](auto zero) {
    using S = decltype(zero);
    AttentionArgs<S> a = attention_args<S>(q, k, values, mask, lengths, kv_batch_idx, 1.0);
    a.v = ptr<S>(v);
    a.weights = mut_ptr<S>(weights);
    a.lse = mut_ptr<acc_t<S>>(lse);
    a.context = mut_ptr<S>(context);
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
  const Tensor values_rows = key_side_rows(wide(values), kv_batch_idx);
  Tensor dq = at::empty_like(q);
  Tensor dk = at::empty({bq, tk, A}, q.options());
  Tensor dv = at::empty({A}, q.options());
  dispatch_float(q, [&](auto zero) {
    using S = decltype(zero);
    AttentionArgs<S> a = attention_args<S>(q, k, values, mask, lengths, kv_batch_idx, 1.0);
    a.v = ptr<S>(v);
    const Tensor d_scores = score_grads(a, grad_context, grad_weights, values_rows, weights);
    using T = acc_t<S>;
    std::vector<T> dv_rows(static_cast<size_t>(bq * A));
    a.dq = mut_ptr<S>(dq);
    a.dk = mut_ptr<S>(dk);
    a.dv_rows = dv_rows.data();
    at::parallel_for(0, bq, grain_for(q.size(1) * tk * A),
                     [&](int64_t i0, int64_t i1) { additive_scores_bwd_rows(a, i0, i1); });
    // dv is shared by every row: per-row partial sums, added in a fixed order (deterministic).
    AccRow<S> dv_row;
    T* dv_sum = dv_row.begin(mut_ptr<S>(dv), A);
    std::fill(dv_sum, dv_sum + A, T(0));
    for (int64_t i = 0; i < bq; ++i) axpy_row(dv_sum, T(1), dv_rows.data() + i * A, A);
    dv_row.done(dv_sum, mut_ptr<S>(dv), A);
  });
  Tensor dvalues = at::bmm(wide(weights).transpose(1, 2), wide(grad_context)).to(q.scalar_type());
  return {dq, dk, dv, dvalues};
}

// Dot attention: the scores and the context are batched GEMMs (BLAS is the fast way on a CPU);
// between them one fused pass scales, masks and normalises the scores in place. Unlike the
// additive kernels (and the CUDA ones), the GEMMs read the keys/values past a row's length:
// they must be finite there, as for the torch backend (their weights are exactly 0).
std::tuple<Tensor, Tensor, Tensor> dot_attention_fwd(
    const Tensor& q, const Tensor& k, const Tensor& values, const OptTensor& mask,
    const OptTensor& lengths, const OptTensor& kv_batch_idx, double scale) {
  Tensor weights = at::bmm(wide(q), key_side_rows(wide(k), kv_batch_idx).transpose(1, 2));
  Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(acc_dtype(q)));
  dispatch_float(q, [&](auto zero) {
    using S = decltype(zero);
    AttentionArgs<S> a = attention_args<S>(q, k, values, mask, lengths, kv_batch_idx, scale);
    a.scores = mut_ptr<acc_t<S>>(weights);
    a.lse = mut_ptr<acc_t<S>>(lse);
    at::parallel_for(0, q.size(0) * q.size(1), grain_for(k.size(1)),
                     [&](int64_t r0, int64_t r1) { scores_to_weights_rows(a, r0, r1); });
  });
  const at::ScalarType dtype = q.scalar_type();
  Tensor context = at::bmm(weights, key_side_rows(wide(values), kv_batch_idx)).to(dtype);
  return {context, weights.to(dtype), lse};
}

std::tuple<Tensor, Tensor, Tensor> dot_attention_bwd(
    const Tensor& grad_context, const Tensor& grad_weights, const Tensor& q, const Tensor& k,
    const Tensor& values, const OptTensor& mask, const OptTensor& lengths,
    const OptTensor& kv_batch_idx, double scale, const Tensor& weights, const Tensor& /*lse*/) {
  Tensor d_scores;
  dispatch_float(q, [&](auto zero) {
    using S = decltype(zero);
    AttentionArgs<S> a = attention_args<S>(q, k, values, mask, lengths, kv_batch_idx, scale);
    d_scores = score_grads(a, grad_context, grad_weights, key_side_rows(wide(values), kv_batch_idx), weights);
  });
  const at::ScalarType dtype = q.scalar_type();
  Tensor dq = at::bmm(d_scores, key_side_rows(wide(k), kv_batch_idx)).to(dtype);
  Tensor dk = at::bmm(d_scores.transpose(1, 2), wide(q)).to(dtype);
  Tensor dvalues = at::bmm(wide(weights).transpose(1, 2), wide(grad_context)).to(dtype);
  return {dq, dk, dvalues};
}

}  // namespace cpu
}  // namespace fused_s2s
