// Standalone check of the CUDA launchers against a float64 host reference, without torch
// (the real parity suite is the Python one; this one also runs under compute-sanitizer).
// It lives in a subfolder so that the extension build, which compiles csrc/cuda/*.cu, skips it.
//
//   nvcc -std=c++17 -O2 -arch=sm_90 -I csrc/include -I csrc/cuda -o fused_s2s_selftest
//        csrc/cuda/selftest/selftest.cu csrc/cuda/gru_cell.cu csrc/cuda/lstm_cell.cu
//        csrc/cuda/additive_attention.cu csrc/cuda/dot_attention.cu
//   ./fused_s2s_selftest            # exit status 0 when every case passes
//   compute-sanitizer --tool memcheck ./fused_s2s_selftest --quick
//
// Inputs are rounded to the tested dtype before the reference sees them, and every output
// is filled with NaN before the launch, so an element a kernel never writes fails the check.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

using fused_s2s::cuda::DType;
using fused_s2s::cuda::element_size;
namespace k = fused_s2s::cuda;

namespace {

int g_failures = 0;

#define CUDA_OK(expr)                                                                     \
  do {                                                                                    \
    const cudaError_t err_ = (expr);                                                      \
    if (err_ != cudaSuccess) {                                                            \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorString(err_), __FILE__,     \
                  __LINE__, #expr);                                                       \
      std::exit(2);                                                                       \
    }                                                                                     \
  } while (0)

const char* dtype_name(DType d) { return d == DType::f32 ? "f32" : d == DType::f16 ? "f16" : "bf16"; }

float round_to(DType d, float x) {
  if (d == DType::f16) return __half2float(__float2half(x));
  if (d == DType::bf16) return __bfloat162float(__float2bfloat16(x));
  return x;
}

struct Rng {
  uint64_t state;
  float uniform(float lo, float hi) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return lo + (hi - lo) * static_cast<float>((state >> 40) * (1.0 / 16777216.0));
  }
};

std::vector<float> random_values(Rng& rng, DType d, size_t n, float lo, float hi) {
  std::vector<float> x(n);
  for (auto& v : x) v = round_to(d, rng.uniform(lo, hi));
  return x;
}

// Device buffer; freed on scope exit.
struct Buf {
  void* p = nullptr;
  size_t bytes = 0;
  explicit Buf(size_t n_bytes) : bytes(n_bytes) {
    if (bytes) CUDA_OK(cudaMalloc(&p, bytes));
  }
  ~Buf() {
    if (p) cudaFree(p);
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

Buf* upload(DType d, const std::vector<float>& x) {
  Buf* b = new Buf(x.size() * element_size(d));
  std::vector<unsigned char> host(b->bytes);
  for (size_t i = 0; i < x.size(); ++i) {
    if (d == DType::f32) {
      std::memcpy(&host[4 * i], &x[i], 4);
    } else if (d == DType::f16) {
      const __half h = __float2half(x[i]);
      std::memcpy(&host[2 * i], &h, 2);
    } else {
      const __nv_bfloat16 h = __float2bfloat16(x[i]);
      std::memcpy(&host[2 * i], &h, 2);
    }
  }
  if (b->bytes) CUDA_OK(cudaMemcpy(b->p, host.data(), b->bytes, cudaMemcpyHostToDevice));
  return b;
}

template <typename T>
Buf* upload_raw(const std::vector<T>& x) {
  Buf* b = new Buf(x.size() * sizeof(T));
  if (b->bytes) CUDA_OK(cudaMemcpy(b->p, x.data(), b->bytes, cudaMemcpyHostToDevice));
  return b;
}

// An output buffer filled with NaN (all-ones bits are NaN in float32, float16 and bfloat16).
Buf* poisoned(size_t n_bytes) {
  Buf* b = new Buf(n_bytes);
  if (b->bytes) CUDA_OK(cudaMemset(b->p, 0xFF, b->bytes));
  return b;
}

std::vector<float> download(DType d, const Buf& b, size_t n) {
  std::vector<unsigned char> host(n * element_size(d));
  if (!host.empty()) CUDA_OK(cudaMemcpy(host.data(), b.p, host.size(), cudaMemcpyDeviceToHost));
  std::vector<float> x(n);
  for (size_t i = 0; i < n; ++i) {
    if (d == DType::f32) {
      std::memcpy(&x[i], &host[4 * i], 4);
    } else if (d == DType::f16) {
      __half h;
      std::memcpy(&h, &host[2 * i], 2);
      x[i] = __half2float(h);
    } else {
      __nv_bfloat16 h;
      std::memcpy(&h, &host[2 * i], 2);
      x[i] = __bfloat162float(h);
    }
  }
  return x;
}

struct Tol {
  double atol, rtol;
};

Tol tol_for(DType d, bool approx_tanh = false) {
  if (approx_tanh) return {5e-3, 2e-2};
  if (d == DType::f32) return {2e-5, 1e-4};
  if (d == DType::f16) return {1e-3, 4e-3};
  return {8e-3, 1.6e-2};
}

void check(const std::string& what, const std::vector<float>& got, const std::vector<double>& ref, Tol tol) {
  double worst = 0.0;
  size_t bad = got.size();
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], r = ref[i];
    bool ok;
    if (std::isnan(r)) {
      ok = std::isnan(g);  // a NaN the reference propagates must come out NaN
    } else if (std::isinf(r) || std::isinf(g)) {
      ok = g == r;
    } else {
      const double err = std::fabs(g - r);
      ok = err <= tol.atol + tol.rtol * std::fabs(r);  // NaN fails here
      if (err > worst || std::isnan(err)) worst = std::isnan(err) ? INFINITY : err;
    }
    if (!ok && bad == got.size()) bad = i;
  }
  if (got.size() != ref.size() || bad != got.size()) {
    ++g_failures;
    std::printf("FAIL %s: %zu elements, first bad [%zu] got %g want %g, max err %g\n", what.c_str(), got.size(),
                bad, bad < got.size() ? got[bad] : 0.0, bad < ref.size() ? ref[bad] : 0.0, worst);
  } else {
    std::printf("ok   %s: %zu elements, max err %.3g\n", what.c_str(), got.size(), worst);
  }
}

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// ------------------------------------------------------------------------------- cells

// gh = h @ w.T + b for G gates
std::vector<double> recurrent(const std::vector<float>& h, const std::vector<float>& w, const std::vector<float>& b,
                              int64_t B, int64_t H, int G) {
  std::vector<double> gh(B * G * H);
  for (int64_t r = 0; r < B; ++r)
    for (int64_t n = 0; n < G * H; ++n) {
      double s = b.empty() ? 0.0 : b[n];
      for (int64_t kk = 0; kk < H; ++kk) s += static_cast<double>(h[r * H + kk]) * w[n * H + kk];
      gh[r * G * H + n] = s;
    }
  return gh;
}

void test_gru(DType d, int64_t B, int64_t H, bool bias, Rng& rng) {
  const std::string name = std::string("gru ") + dtype_name(d) + " B=" + std::to_string(B) + " H=" + std::to_string(H);
  const float ws = 1.f / std::sqrt(static_cast<float>(H));
  auto gx = random_values(rng, d, B * 3 * H, -1.f, 1.f);
  auto h = random_values(rng, d, B * H, -1.f, 1.f);
  auto w = random_values(rng, d, 3 * H * H, -ws, ws);
  std::vector<float> b = bias ? random_values(rng, d, 3 * H, -0.5f, 0.5f) : std::vector<float>();
  Buf *gx_d = upload(d, gx), *h_d = upload(d, h), *w_d = upload(d, w), *b_d = upload(d, b);
  Buf *h_new = poisoned(B * H * element_size(d)), *saved = poisoned(B * 4 * H * element_size(d));
  CUDA_OK(k::gru_cell_fwd(d, gx_d->p, h_d->p, w_d->p, bias ? b_d->p : nullptr, h_new->p, saved->p, B, H, 0));
  CUDA_OK(cudaDeviceSynchronize());

  const auto gh = recurrent(h, w, b, B, H, 3);
  std::vector<double> ref_h(B * H), ref_saved(B * 4 * H);
  for (int64_t r = 0; r < B; ++r)
    for (int64_t j = 0; j < H; ++j) {
      const float* x = &gx[r * 3 * H];
      const double* g = &gh[r * 3 * H];
      const double rr = sigmoid(x[j] + g[j]), z = sigmoid(x[H + j] + g[H + j]);
      const double n = std::tanh(x[2 * H + j] + rr * g[2 * H + j]);
      ref_h[r * H + j] = (1 - z) * n + z * h[r * H + j];
      double* s = &ref_saved[r * 4 * H];
      s[j] = rr, s[H + j] = z, s[2 * H + j] = n, s[3 * H + j] = g[2 * H + j];
    }
  check(name + " fwd h_new", download(d, *h_new, B * H), ref_h, tol_for(d));
  check(name + " fwd saved", download(d, *saved, B * 4 * H), ref_saved, tol_for(d));

  // backward from the kernel's own saved gates
  const auto sv = download(d, *saved, B * 4 * H);
  auto grad = random_values(rng, d, B * H, -1.f, 1.f);
  Buf* grad_d = upload(d, grad);
  Buf *ggx = poisoned(B * 3 * H * element_size(d)), *ggh = poisoned(B * 3 * H * element_size(d)),
      *gh_direct = poisoned(B * H * element_size(d));
  CUDA_OK(k::gru_cell_bwd(d, grad_d->p, h_d->p, saved->p, ggx->p, ggh->p, gh_direct->p, B, H, 0));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<double> ref_gx(B * 3 * H), ref_gh(B * 3 * H), ref_direct(B * H);
  for (int64_t r = 0; r < B; ++r)
    for (int64_t j = 0; j < H; ++j) {
      const float* s = &sv[r * 4 * H];
      const double g = grad[r * H + j], rr = s[j], z = s[H + j], n = s[2 * H + j], ghn = s[3 * H + j];
      const double dn = g * (1 - z) * (1 - n * n), dz = g * (h[r * H + j] - n) * z * (1 - z);
      const double dr = dn * ghn * rr * (1 - rr);
      ref_gx[r * 3 * H + j] = dr, ref_gx[r * 3 * H + H + j] = dz, ref_gx[r * 3 * H + 2 * H + j] = dn;
      ref_gh[r * 3 * H + j] = dr, ref_gh[r * 3 * H + H + j] = dz, ref_gh[r * 3 * H + 2 * H + j] = dn * rr;
      ref_direct[r * H + j] = g * z;
    }
  check(name + " bwd grad_gx", download(d, *ggx, B * 3 * H), ref_gx, tol_for(d));
  check(name + " bwd grad_gh", download(d, *ggh, B * 3 * H), ref_gh, tol_for(d));
  check(name + " bwd grad_h_direct", download(d, *gh_direct, B * H), ref_direct, tol_for(d));
  for (Buf* x : {gx_d, h_d, w_d, b_d, h_new, saved, grad_d, ggx, ggh, gh_direct}) delete x;
}

void test_lstm(DType d, int64_t B, int64_t H, bool bias, bool with_grad_c, Rng& rng) {
  const std::string name = std::string("lstm ") + dtype_name(d) + " B=" + std::to_string(B) + " H=" + std::to_string(H);
  const float ws = 1.f / std::sqrt(static_cast<float>(H));
  auto gx = random_values(rng, d, B * 4 * H, -1.f, 1.f);
  auto h = random_values(rng, d, B * H, -1.f, 1.f);
  auto c = random_values(rng, d, B * H, -2.f, 2.f);
  auto w = random_values(rng, d, 4 * H * H, -ws, ws);
  std::vector<float> b = bias ? random_values(rng, d, 4 * H, -0.5f, 0.5f) : std::vector<float>();
  Buf *gx_d = upload(d, gx), *h_d = upload(d, h), *c_d = upload(d, c), *w_d = upload(d, w), *b_d = upload(d, b);
  Buf *h_new = poisoned(B * H * element_size(d)), *c_new = poisoned(B * H * element_size(d)),
      *saved = poisoned(B * 4 * H * element_size(d));
  CUDA_OK(k::lstm_cell_fwd(d, gx_d->p, h_d->p, c_d->p, w_d->p, bias ? b_d->p : nullptr, h_new->p, c_new->p,
                           saved->p, B, H, H, 0));
  CUDA_OK(cudaDeviceSynchronize());
  const auto gh = recurrent(h, w, b, B, H, 4);
  std::vector<double> ref_h(B * H), ref_c(B * H), ref_saved(B * 4 * H);
  for (int64_t r = 0; r < B; ++r)
    for (int64_t j = 0; j < H; ++j) {
      double a[4];
      for (int g = 0; g < 4; ++g) a[g] = gx[r * 4 * H + g * H + j] + gh[r * 4 * H + g * H + j];
      const double ii = sigmoid(a[0]), f = sigmoid(a[1]), gg = std::tanh(a[2]), o = sigmoid(a[3]);
      const double cn = f * c[r * H + j] + ii * gg;
      ref_c[r * H + j] = cn;
      ref_h[r * H + j] = o * std::tanh(cn);
      double* s = &ref_saved[r * 4 * H];
      s[j] = ii, s[H + j] = f, s[2 * H + j] = gg, s[3 * H + j] = o;
    }
  check(name + " fwd h_new", download(d, *h_new, B * H), ref_h, tol_for(d));
  check(name + " fwd c_new", download(d, *c_new, B * H), ref_c, tol_for(d));
  check(name + " fwd saved", download(d, *saved, B * 4 * H), ref_saved, tol_for(d));

  const auto sv = download(d, *saved, B * 4 * H);
  const auto cn = download(d, *c_new, B * H);
  auto grad_h = random_values(rng, d, B * H, -1.f, 1.f);
  auto grad_c = with_grad_c ? random_values(rng, d, B * H, -1.f, 1.f) : std::vector<float>(B * H, 0.f);
  Buf *gh_d = upload(d, grad_h), *gc_d = upload(d, grad_c);
  Buf *g_gates = poisoned(B * 4 * H * element_size(d)), *g_c = poisoned(B * H * element_size(d));
  CUDA_OK(k::lstm_cell_bwd(d, gh_d->p, with_grad_c ? gc_d->p : nullptr, c_d->p, c_new->p, saved->p, g_gates->p,
                           g_c->p, B, H, 0));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<double> ref_gates(B * 4 * H), ref_gc(B * H);
  for (int64_t r = 0; r < B; ++r)
    for (int64_t j = 0; j < H; ++j) {
      const float* s = &sv[r * 4 * H];
      const double ii = s[j], f = s[H + j], gg = s[2 * H + j], o = s[3 * H + j];
      const double tc = std::tanh(static_cast<double>(cn[r * H + j])), gh_ = grad_h[r * H + j];
      const double dc = grad_c[r * H + j] + gh_ * o * (1 - tc * tc);
      double* out = &ref_gates[r * 4 * H];
      out[j] = dc * gg * ii * (1 - ii);
      out[H + j] = dc * c[r * H + j] * f * (1 - f);
      out[2 * H + j] = dc * ii * (1 - gg * gg);
      out[3 * H + j] = gh_ * tc * o * (1 - o);
      ref_gc[r * H + j] = dc * f;
    }
  check(name + " bwd grad_gates", download(d, *g_gates, B * 4 * H), ref_gates, tol_for(d));
  check(name + " bwd grad_c", download(d, *g_c, B * H), ref_gc, tol_for(d));
  for (Buf* x : {gx_d, h_d, c_d, w_d, b_d, h_new, c_new, saved, gh_d, gc_d, g_gates, g_c}) delete x;
}

// --------------------------------------------------------------------------- attention

struct AttnCase {
  int64_t bq, bk, tq, tk, dim, dim_v;
  bool mask, lengths, kv_idx, additive, approx;
  bool grad_context = true, grad_weights = true;
  bool nan_query = false;  // a NaN in query step 0 of row 0: that row's scores are all NaN
};

void test_attention(DType d, const AttnCase& c, Rng& rng) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s %s Bq=%lld Bk=%lld Tq=%lld Tk=%lld D=%lld Dv=%lld%s%s%s%s",
                c.additive ? "additive" : "dot", dtype_name(d), (long long)c.bq, (long long)c.bk, (long long)c.tq,
                (long long)c.tk, (long long)c.dim, (long long)c.dim_v, c.mask ? " mask" : "",
                c.lengths ? " lengths" : "", c.kv_idx ? " kv_idx" : "", c.approx ? " approx" : "");
  if (c.nan_query) std::strncat(buf, " nan", sizeof buf - std::strlen(buf) - 1);
  const std::string name = buf;
  const int64_t bq = c.bq, bk = c.bk, tq = c.tq, tk = c.tk, D = c.dim, Dv = c.dim_v;
  const float scale = c.additive ? 1.f : 1.f / std::sqrt(static_cast<float>(D > 0 ? D : 1));
  const float qk_range = c.additive ? 1.5f : 1.f;
  auto q = random_values(rng, d, bq * tq * D, -qk_range, qk_range);
  if (c.nan_query && !q.empty()) q[0] = NAN;
  auto kk = random_values(rng, d, bk * tk * D, -qk_range, qk_range);
  auto v = random_values(rng, d, D, -1.f, 1.f);
  auto values = random_values(rng, d, bk * tk * Dv, -1.f, 1.f);
  std::vector<unsigned char> mask(bk * tk, 1);
  if (c.mask) {
    for (auto& m : mask) m = rng.uniform(0.f, 1.f) < 0.8f;
    if (bk >= 2)
      for (int64_t s = 0; s < tk; ++s) mask[(bk - 1) * tk + s] = 0;  // a fully masked row
  }
  std::vector<int64_t> lengths(bk, tk);
  if (c.lengths) {
    for (auto& n : lengths) n = static_cast<int64_t>(rng.uniform(0.f, static_cast<float>(tk) + 1.f));
    lengths[0] = tk + 3;                // clamped to Tk
    if (bk >= 3) lengths[1] = 0;        // no valid position
    if (bk >= 4) lengths[2] = -2;       // clamped to 0
  }
  std::vector<int64_t> kv_idx(bq);
  for (int64_t i = 0; i < bq; ++i) kv_idx[i] = c.kv_idx ? (i * 7 + 3) % bk : i;

  Buf *q_d = upload(d, q), *k_d = upload(d, kk), *v_d = upload(d, v), *values_d = upload(d, values);
  Buf *mask_d = upload_raw(mask), *len_d = upload_raw(lengths), *idx_d = upload_raw(kv_idx);
  const bool* mask_p = c.mask ? static_cast<const bool*>(mask_d->p) : nullptr;
  const int64_t* len_p = c.lengths ? static_cast<const int64_t*>(len_d->p) : nullptr;
  const int64_t* idx_p = c.kv_idx ? static_cast<const int64_t*>(idx_d->p) : nullptr;

  Buf *context = poisoned(bq * tq * Dv * element_size(d)), *weights = poisoned(bq * tq * tk * element_size(d)),
      *lse = poisoned(bq * tq * 4);
  {
    const size_t ws = c.additive ? k::additive_attention_fwd_workspace_bytes(d, bq, tq, tk, D, Dv)
                                 : k::dot_attention_fwd_workspace_bytes(d, bq, tq, tk, D, Dv);
    Buf work(ws);
    if (c.additive)
      CUDA_OK(k::additive_attention_fwd(d, q_d->p, k_d->p, v_d->p, values_d->p, mask_p, len_p, idx_p, context->p,
                                        weights->p, static_cast<float*>(lse->p), bq, bk, tq, tk, D, Dv, c.approx,
                                        work.p, ws, 0));
    else
      CUDA_OK(k::dot_attention_fwd(d, q_d->p, k_d->p, values_d->p, mask_p, len_p, idx_p, scale, context->p,
                                   weights->p, static_cast<float*>(lse->p), bq, bk, tq, tk, D, Dv, work.p, ws, 0));
    CUDA_OK(cudaDeviceSynchronize());
  }

  auto valid = [&](int64_t kb, int64_t s) {
    const int64_t n = std::min(std::max<int64_t>(lengths[kb], 0), tk);
    return s < n && mask[kb * tk + s];
  };
  std::vector<double> ref_ctx(bq * tq * Dv, 0.0), ref_w(bq * tq * tk, 0.0), ref_lse(bq * tq, -INFINITY);
  std::vector<double> sc(tk);
  for (int64_t i = 0; i < bq; ++i)
    for (int64_t t = 0; t < tq; ++t) {
      const int64_t kb = kv_idx[i], row = i * tq + t;
      double m = -INFINITY;
      bool nan_row = false;  // a valid NaN or +inf score: the whole row is NaN, as in torch.softmax
      for (int64_t s = 0; s < tk; ++s) {
        double e = 0.0;
        for (int64_t a = 0; a < D; ++a) {
          const double qa = q[row * D + a], ka = kk[(kb * tk + s) * D + a];
          e += c.additive ? v[a] * std::tanh(qa + ka) : qa * ka;
        }
        sc[s] = c.additive ? e : e * scale;
        if (valid(kb, s)) {
          m = std::max(m, sc[s]);
          nan_row |= std::isnan(sc[s]) || sc[s] == INFINITY;
        }
      }
      if (nan_row) {
        ref_lse[row] = NAN;
        for (int64_t s = 0; s < tk; ++s) ref_w[row * tk + s] = NAN;
        for (int64_t e = 0; e < Dv; ++e) ref_ctx[row * Dv + e] = NAN;
        continue;
      }
      if (m == -INFINITY) continue;
      double l = 0.0;
      for (int64_t s = 0; s < tk; ++s)
        if (valid(kb, s)) l += std::exp(sc[s] - m);
      ref_lse[row] = m + std::log(l);
      for (int64_t s = 0; s < tk; ++s) {
        if (!valid(kb, s)) continue;
        const double w = std::exp(sc[s] - ref_lse[row]);
        ref_w[row * tk + s] = w;
        for (int64_t e = 0; e < Dv; ++e) ref_ctx[row * Dv + e] += w * values[(kb * tk + s) * Dv + e];
      }
    }
  const Tol tol = tol_for(d, c.approx);
  check(name + " fwd context", download(d, *context, bq * tq * Dv), ref_ctx, tol);
  check(name + " fwd weights", download(d, *weights, bq * tq * tk), ref_w, tol);
  check(name + " fwd lse", download(DType::f32, *lse, bq * tq), ref_lse, tol);

  // backward, from the kernel's own weights and lse
  const auto W = download(d, *weights, bq * tq * tk);
  auto gC = c.grad_context ? random_values(rng, d, bq * tq * Dv, -1.f, 1.f) : std::vector<float>(bq * tq * Dv, 0.f);
  auto gW = c.grad_weights ? random_values(rng, d, bq * tq * tk, -1.f, 1.f) : std::vector<float>(bq * tq * tk, 0.f);
  Buf *gC_d = upload(d, gC), *gW_d = upload(d, gW);
  Buf *dq = poisoned(bq * tq * D * element_size(d)), *dk = poisoned(bq * tk * D * element_size(d)),
      *dv = poisoned(D * element_size(d)), *dvalues = poisoned(bq * tk * Dv * element_size(d));
  {
    const void* gc_p = c.grad_context ? gC_d->p : nullptr;
    const void* gw_p = c.grad_weights ? gW_d->p : nullptr;
    const size_t ws = c.additive ? k::additive_attention_bwd_workspace_bytes(d, bq, tq, tk, D, Dv)
                                 : k::dot_attention_bwd_workspace_bytes(d, bq, tq, tk, D, Dv);
    Buf work(ws);
    if (c.additive)
      CUDA_OK(k::additive_attention_bwd(d, gc_p, gw_p, q_d->p, k_d->p, v_d->p, values_d->p, mask_p, len_p, idx_p,
                                        weights->p, static_cast<const float*>(lse->p), dq->p, dk->p, dv->p,
                                        dvalues->p, bq, bk, tq, tk, D, Dv, c.approx, work.p, ws, 0));
    else
      CUDA_OK(k::dot_attention_bwd(d, gc_p, gw_p, q_d->p, k_d->p, values_d->p, mask_p, len_p, idx_p, scale,
                                   weights->p, static_cast<const float*>(lse->p), dq->p, dk->p, dvalues->p, bq, bk,
                                   tq, tk, D, Dv, work.p, ws, 0));
    CUDA_OK(cudaDeviceSynchronize());
  }
  std::vector<double> ref_dq(bq * tq * D, 0.0), ref_dk(bq * tk * D, 0.0), ref_dv(D, 0.0),
      ref_dvalues(bq * tk * Dv, 0.0), ds(tk);
  for (int64_t i = 0; i < bq; ++i)
    for (int64_t t = 0; t < tq; ++t) {
      const int64_t kb = kv_idx[i], row = i * tq + t;
      // over the valid positions: elsewhere W is 0 (NaN in a NaN row, whose gradients are NaN
      // there too, but the kernels never touch positions that are not valid)
      double delta = 0.0;
      for (int64_t s = 0; s < tk; ++s) {
        double dw = gW[row * tk + s];
        for (int64_t e = 0; e < Dv; ++e) dw += static_cast<double>(gC[row * Dv + e]) * values[(kb * tk + s) * Dv + e];
        ds[s] = dw;
        if (valid(kb, s)) delta += W[row * tk + s] * dw;
      }
      for (int64_t s = 0; s < tk; ++s) {
        if (!valid(kb, s)) continue;
        const double w = W[row * tk + s], dsc = w * (ds[s] - delta);
        for (int64_t e = 0; e < Dv; ++e) ref_dvalues[(i * tk + s) * Dv + e] += w * gC[row * Dv + e];
        if (w == 0.0) continue;
        for (int64_t a = 0; a < D; ++a) {
          const double qa = q[row * D + a], ka = kk[(kb * tk + s) * D + a];
          if (c.additive) {
            const double th = std::tanh(qa + ka), g = dsc * v[a] * (1 - th * th);
            ref_dq[row * D + a] += g;
            ref_dk[(i * tk + s) * D + a] += g;
            ref_dv[a] += dsc * th;
          } else {
            ref_dq[row * D + a] += scale * dsc * ka;
            ref_dk[(i * tk + s) * D + a] += scale * dsc * qa;
          }
        }
      }
    }
  check(name + " bwd grad_q", download(d, *dq, bq * tq * D), ref_dq, tol);
  check(name + " bwd grad_k", download(d, *dk, bq * tk * D), ref_dk, tol);
  if (c.additive) check(name + " bwd grad_v", download(d, *dv, D), ref_dv, tol);
  check(name + " bwd grad_values", download(d, *dvalues, bq * tk * Dv), ref_dvalues, tol);
  for (Buf* x : {q_d, k_d, v_d, values_d, mask_d, len_d, idx_d, context, weights, lse, gC_d, gW_d, dq, dk, dv,
                 dvalues})
    delete x;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;  // small shapes (for sanitizers)
  int device_count = 0;
  if (cudaGetDeviceCount(&device_count) != cudaSuccess || device_count == 0) {
    std::printf("no CUDA device\n");
    return 2;
  }
  Rng rng{12345};
  const DType dtypes[] = {DType::f32, DType::f16, DType::bf16};
  for (DType d : dtypes) {
    test_gru(d, 1, 1, true, rng);
    test_gru(d, 5, 33, false, rng);
    test_gru(d, 9, 64, true, rng);
    test_lstm(d, 1, 1, false, true, rng);
    test_lstm(d, 5, 33, true, false, rng);
    test_lstm(d, 17, 257, true, true, rng);
    if (!quick) {
      test_gru(d, 128, 1040, true, rng);   // the large tile
      test_lstm(d, 128, 1040, true, true, rng);
    }
    for (bool additive : {true, false}) {
      std::vector<AttnCase> cases = {
          {1, 1, 1, 1, 1, 1, false, false, false, additive, false},
          {3, 3, 1, 33, 33, 17, true, false, false, additive, false},
          {2, 2, 5, 70, 40, 300, false, true, false, additive, false},          // query tile with padding
          {6, 2, 3, 300, 16, 8, true, true, true, additive, false},             // beams, key splits
          {2, 2, 2, 0, 4, 4, false, false, false, additive, false},             // no keys
          {2, 2, 0, 5, 4, 4, false, false, false, additive, false},             // no queries
          {4, 4, 1, 40, 24, 24, true, true, false, additive, false, false, true},  // grad_context absent
          {4, 4, 2, 40, 24, 24, true, false, false, additive, false, true, false}, // grad_weights absent
          {3, 3, 2, 40, 16, 8, false, false, false, additive, false, true, true, true},  // NaN row
          {2, 2, 1, 300, 16, 8, true, true, false, additive, false, true, true, true},   // NaN row, key splits
      };
      if (!quick) {
        cases.push_back({2, 2, 1, 4100, 64, 48, true, true, false, additive, false});  // long Tk, many splits
        cases.push_back({64, 64, 20, 12, 8, 8, false, false, false, additive, false});  // two-pass grad_v
        cases.push_back({4, 4, 2, 5, 4000, 8000, false, false, false, additive, false}); // > 48 KB smem
      }
      if (additive) cases.push_back({3, 3, 2, 50, 32, 16, true, false, false, true, true});  // approx tanh
      for (const auto& c : cases) test_attention(d, c, rng);
    }
  }
  std::printf(g_failures ? "%d FAILED\n" : "all passed\n", g_failures);
  return g_failures ? 1 : 0;
}
