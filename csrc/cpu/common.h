// What the CPU kernel files share: the SIMD row-kernel attribute, parallel grain, storage and
// accumulation types, widening loads and rounding stores, the dtype dispatch. The math runs in
// the accumulation type (float32, or float64 for float64 tensors): 16-bit values widen as they
// are loaded and round once as they are stored. BLAS does the linear algebra; the row kernels of
// each op do the rest in one pass each, on SIMD packs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels.h"
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
// Internal linkage, as when all kernels were one file: each kernel file compiles its own copy
// of what it uses.
namespace {

// Work (elements through exp/tanh) that makes one parallel task worth its scheduling cost.
constexpr int64_t kTaskWork = 8192;

inline int64_t grain_for(int64_t work_per_item) {
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

inline at::ScalarType acc_dtype(const Tensor& t) {
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

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.data_ptr<T>();
}
template <typename T>
T* mut_ptr(at::Tensor& t) {
  return t.data_ptr<T>();
}

}  // namespace
}  // namespace cpu
}  // namespace fused_s2s
