// SIMD packs for the CPU kernels: a fixed number of lanes with arithmetic, exp and tanh, so
// that the scalar gate math of gates.h (templated on its number type) runs on whole packs.
//
// The lanes are GCC/Clang vector-extension types, so every operator becomes SIMD instructions
// of whatever target the file is compiled for (32-byte packs: two SSE2 ops on baseline x86-64,
// one op with AVX). exp and tanh are written here, branch-free, because the C library's are
// scalar: calling them per lane made the gate pass slower than PyTorch's own vectorised ops.
//
// Accuracy: exp is within a few ulp over its range (|x| up to ~88 for float, ~708 for double;
// beyond, exactly 0 or +inf); tanh(x) = (1 - e)/(1 + e) with e = exp(-2|x|) has an absolute
// error of a few ulp of 1. NaN in, NaN out.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace fused_s2s {
namespace cpu {

template <typename T>
struct VecTraits;

template <>
struct VecTraits<float> {
  static constexpr int kLanes = 8;
  typedef float Raw __attribute__((vector_size(32)));
  typedef int32_t Bits __attribute__((vector_size(32)));
  // exp: e^x = 2^n e^r with n = round(x / ln 2) and |r| <= ln2 / 2; e^r by its Taylor series
  // to degree kExpTerms - 1 (a power of two terms, for Estrin's scheme).
  static constexpr float kExpHi = 88.37f;    // keeps n <= 127 (a finite power of two)
  static constexpr float kExpLo = -87.33f;   // keeps n >= -126 (a normal power of two)
  static constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to integer
  static constexpr float kLn2Hi = 0.693359375f;      // ln 2 split so that n * kLn2Hi is exact
  static constexpr float kLn2Lo = -2.12194440054690583e-4f;
  static constexpr int kExpTerms = 8;   // error r^8 / 8! < 6e-9
  static constexpr int kMantissaBits = 23;
  static constexpr int kExponentBias = 127;
};

template <>
struct VecTraits<double> {
  static constexpr int kLanes = 4;
  typedef double Raw __attribute__((vector_size(32)));
  typedef int64_t Bits __attribute__((vector_size(32)));
  static constexpr double kExpHi = 709.0;
  static constexpr double kExpLo = -708.0;
  static constexpr double kRoundMagic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLn2Hi = 6.93147180369123816490e-01;
  static constexpr double kLn2Lo = 1.90821492927058770002e-10;
  static constexpr int kExpTerms = 16;  // error r^16 / 16! < 1e-20
  static constexpr int kMantissaBits = 52;
  static constexpr int kExponentBias = 1023;
};

template <typename T>
struct Vec {
  using Traits = VecTraits<T>;
  using Raw = typename Traits::Raw;
  using Bits = typename Traits::Bits;
  static constexpr int kLanes = Traits::kLanes;

  Raw v;

  Vec() = default;
  Vec(T x) : v(x - Raw{}) {}  // broadcast (x - 0 keeps -0.0); implicit so gates.h's T(1) works
  explicit Vec(Raw r) : v(r) {}

  static Vec load(const T* p) {
    Vec r;
    std::memcpy(&r.v, p, sizeof(Raw));
    return r;
  }
  // The first n lanes from p, the others `fill` (the tail of a row).
  static Vec load(const T* p, int n, T fill = T(0)) {
    Vec r(fill);
    std::memcpy(&r.v, p, sizeof(T) * n);
    return r;
  }
  void store(T* p) const { std::memcpy(p, &v, sizeof(Raw)); }
  void store(T* p, int n) const { std::memcpy(p, &v, sizeof(T) * n); }

  T sum() const {
    T s = T(0);
    for (int i = 0; i < kLanes; ++i) s += v[i];
    return s;
  }
  T max() const {  // NaN if any lane is NaN
    T m = v[0];
    for (int i = 1; i < kLanes; ++i) m = (v[i] > m || v[i] != v[i]) ? v[i] : m;
    return m;
  }

  friend Vec operator+(Vec a, Vec b) { return Vec(a.v + b.v); }
  friend Vec operator-(Vec a, Vec b) { return Vec(a.v - b.v); }
  friend Vec operator*(Vec a, Vec b) { return Vec(a.v * b.v); }
  friend Vec operator/(Vec a, Vec b) { return Vec(a.v / b.v); }
  friend Vec operator-(Vec a) { return Vec(-a.v); }
  Vec& operator+=(Vec b) {
    v += b.v;
    return *this;
  }
};

// Lane-wise `cond ? a : b` for a comparison result `cond` (all bits set where true).
template <typename T>
inline Vec<T> select(typename Vec<T>::Bits cond, Vec<T> a, Vec<T> b) {
  using Bits = typename Vec<T>::Bits;
  using Raw = typename Vec<T>::Raw;
  return Vec<T>((Raw)((cond & (Bits)a.v) | (~cond & (Bits)b.v)));
}

// Lane-wise maximum; NaN wins, so that a NaN score is not silently dropped.
template <typename T>
inline Vec<T> max_nan(Vec<T> a, Vec<T> b) {
  return select<T>((a.v > b.v) | (a.v != a.v), a, b);
}

template <typename T>
inline Vec<T> exp(Vec<T> x) {
  using Tr = VecTraits<T>;
  using Bits = typename Vec<T>::Bits;
  using Raw = typename Vec<T>::Raw;
  const Vec<T> hi(Tr::kExpHi), lo(Tr::kExpLo);
  // Clamp into range first so the arithmetic below never overflows; fix the ends at the end.
  Vec<T> clamped = select<T>(x.v < hi.v, x, hi);
  clamped = select<T>(clamped.v > lo.v, clamped, lo);
  const Raw xc = clamped.v;
  // round(x / ln 2): adding the magic number leaves n in the low mantissa bits of `shifted`
  // (read as an integer, below) and n itself after subtracting it again.
  const Raw magic = Raw{} + Tr::kRoundMagic;
  const Raw shifted = xc * T(1.4426950408889634) + magic;
  const Raw n = shifted - magic;
  const Raw r = (xc - n * Tr::kLn2Hi) - n * Tr::kLn2Lo;
  // The Taylor series of e^r, sum r^i / i!, by Estrin's scheme: pairs of terms joined with
  // r, then pairs of those with r^2, r^4, ...: a dependency chain of log2(terms) steps instead
  // of Horner's one step per term (the gate math is latency-bound otherwise).
  constexpr int kTerms = Tr::kExpTerms;
  Raw terms[kTerms];
  T coefficient = T(1);
  for (int i = 0; i < kTerms; ++i) {
    terms[i] = Raw{} + coefficient;
    coefficient /= T(i + 1);
  }
  Raw power = r;
  for (int width = kTerms; width > 1; width /= 2) {
    for (int i = 0; i < width / 2; ++i) terms[i] = terms[2 * i] + terms[2 * i + 1] * power;
    power = power * power;
  }
  const Raw p = terms[0];
  const Bits n_int = (Bits)shifted - (Bits)magic;
  const Bits scale = (n_int + Tr::kExponentBias) << Tr::kMantissaBits;  // 2^n
  Vec<T> out(p * (Raw)scale);
  out = select<T>(x.v > hi.v, Vec<T>(std::numeric_limits<T>::infinity()), out);
  out = select<T>(x.v < lo.v, Vec<T>(T(0)), out);
  return select<T>(x.v != x.v, x, out);  // NaN stays NaN
}

template <typename T>
inline Vec<T> tanh(Vec<T> x) {
  using Bits = typename Vec<T>::Bits;
  using Raw = typename Vec<T>::Raw;
  const Bits sign_bit = (Bits)Vec<T>(T(-0.0)).v;
  const Raw a = (Raw)((Bits)x.v & ~sign_bit);  // |x|
  const Vec<T> e = exp(Vec<T>(T(-2) * a));
  const Raw t = (T(1) - e.v) / (T(1) + e.v);
  return Vec<T>((Raw)((Bits)t | ((Bits)x.v & sign_bit)));  // tanh is odd: copy x's sign
}

// bfloat16 packs: a bfloat16 is the upper half of a float's bits, so widening is a shift and
// narrowing rounds the lower half away, to nearest even (as c10::BFloat16 does; NaN becomes
// the quiet NaN 0x7FC0). Eight 16-bit lanes widen to one float pack.
typedef uint16_t Bf16Raw __attribute__((vector_size(16)));
typedef uint32_t U32Raw __attribute__((vector_size(32)));

// The first n lanes from p, the others `fill`, which must be exact in bfloat16 (0, -inf).
inline Vec<float> load_bf16(const uint16_t* p, int n, float fill) {
  uint32_t fill_bits;
  std::memcpy(&fill_bits, &fill, sizeof(fill));
  Bf16Raw raw = Bf16Raw{} + static_cast<uint16_t>(fill_bits >> 16);
  std::memcpy(&raw, p, sizeof(uint16_t) * n);
  const U32Raw wide = __builtin_convertvector(raw, U32Raw) << 16;
  return Vec<float>((Vec<float>::Raw)wide);
}

inline void store_bf16(Vec<float> x, uint16_t* p, int n) {
  const U32Raw bits = (U32Raw)x.v;
  const U32Raw rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const U32Raw nan = (U32Raw)(x.v != x.v);  // all bits set where x is NaN
  const Bf16Raw out = __builtin_convertvector((nan & 0x7FC0u) | (~nan & rounded), Bf16Raw);
  std::memcpy(p, &out, sizeof(uint16_t) * n);
}

// float16 packs, in integer and float arithmetic (F16C is not part of the AVX2 clone).
// Widening: a normal half is its exponent and mantissa bits moved into place and rescaled by
// 2^(127 - 15); a subnormal m * 2^-24 is (0.5 + m * 2^-24) - 0.5, built from its bits; inf and
// NaN keep their mantissa under an all-ones exponent. All exact.
inline Vec<float> load_f16(const uint16_t* p, int n, float fill) {
  using Raw = Vec<float>::Raw;
  const uint16_t fill_bits = fill == 0.0f ? 0 : 0xFC00;  // fill: 0 or -inf
  Bf16Raw raw = Bf16Raw{} + fill_bits;
  std::memcpy(&raw, p, sizeof(uint16_t) * n);
  const U32Raw h = __builtin_convertvector(raw, U32Raw);
  const U32Raw sign = (h & 0x8000u) << 16, em = h & 0x7FFFu;
  const U32Raw normal = (U32Raw)((Raw)(em << 13) * 0x1p112f);
  const U32Raw subnormal = (U32Raw)((Raw)(em | 0x3F000000u) - 0.5f);
  const U32Raw special = (em << 13) | 0x7F800000u;
  U32Raw bits = (U32Raw)(em < 0x400u) & subnormal;
  bits |= (U32Raw)((em >= 0x400u) & (em < 0x7C00u)) & normal;
  bits |= (U32Raw)(em >= 0x7C00u) & special;
  return Vec<float>((Raw)(bits | sign));
}

// Narrowing, to nearest even: normal halves round their mantissa in integer arithmetic (a
// carry moves into the exponent); subnormals round in the float adder (x + 0.5 has the ulp
// 2^-24 of half's subnormals); 65520 and above become inf; NaN becomes the quiet NaN 0x7E00.
inline void store_f16(Vec<float> x, uint16_t* p, int n) {
  using Raw = Vec<float>::Raw;
  const U32Raw bits = (U32Raw)x.v;
  const U32Raw sign = (bits >> 16) & 0x8000u, a = bits & 0x7FFFFFFFu;
  const U32Raw rebased = a - 0x38000000u;  // exponent 127 -> 15
  const U32Raw normal = (rebased + 0xFFFu + ((rebased >> 13) & 1u)) >> 13;
  const U32Raw subnormal = (U32Raw)((Raw)a + 0.5f) - 0x3F000000u;
  U32Raw h = (U32Raw)(a < 0x38800000u) & subnormal;
  h |= (U32Raw)((a >= 0x38800000u) & (a < 0x477FF000u)) & normal;
  h |= (U32Raw)((a >= 0x477FF000u) & (a <= 0x7F800000u)) & 0x7C00u;
  h |= (U32Raw)(a > 0x7F800000u) & 0x7E00u;
  const Bf16Raw out = __builtin_convertvector(h | sign, Bf16Raw);
  std::memcpy(p, &out, sizeof(uint16_t) * n);
}

}  // namespace cpu
}  // namespace fused_s2s
