// Scalar gate math shared by the CPU and CUDA kernels: one element of one gate row.
// The formulas mirror fused_s2s/backends/torch_backend.py (the kernel contract); `T` is the
// accumulation type (float for fp32/fp16/bf16 inputs, double for float64).
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FS2S_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FS2S_HOST_DEVICE inline
#endif

namespace fused_s2s {

// std:: overloads keep float math in float on the host; CUDA provides them on the device.
using std::exp;
using std::tanh;

template <typename T>
FS2S_HOST_DEVICE T sigmoid(T x) {
  return T(1) / (T(1) + exp(-x));
}

// GRU forward, gates (r, z, n). gx_* include b_ih, gh_* include b_hh.
template <typename T>
struct GruFwd {
  T r, z, n, gh_n, h_new;
};

template <typename T>
FS2S_HOST_DEVICE GruFwd<T> gru_fwd(T gx_r, T gx_z, T gx_n, T gh_r, T gh_z, T gh_n, T h) {
  GruFwd<T> o;
  o.r = sigmoid(gx_r + gh_r);
  o.z = sigmoid(gx_z + gh_z);
  o.n = tanh(gx_n + o.r * gh_n);
  o.gh_n = gh_n;
  o.h_new = (T(1) - o.z) * o.n + o.z * h;
  return o;
}

// GRU backward from the saved (r, z, n, gh_n): gradients of the pre-activations.
template <typename T>
struct GruBwd {
  T d_r, d_z, d_n;   // grad of gx_r, gx_z, gx_n (= grad of gh_r, gh_z; grad of gh_n is d_n * r)
  T d_gh_n;
  T d_h;             // the direct part of grad h (the caller adds grad_gh @ w_hh)
};

template <typename T>
FS2S_HOST_DEVICE GruBwd<T> gru_bwd(T g, T h, T r, T z, T n, T gh_n) {
  GruBwd<T> o;
  o.d_n = g * (T(1) - z) * (T(1) - n * n);
  o.d_z = g * (h - n) * z * (T(1) - z);
  o.d_r = o.d_n * gh_n * r * (T(1) - r);
  o.d_gh_n = o.d_n * r;
  o.d_h = g * z;
  return o;
}

// LSTM forward, gates (i, f, g, o) as pre-activations gx + gh.
template <typename T>
struct LstmFwd {
  T i, f, g, o, c_new, h_new;
};

template <typename T>
FS2S_HOST_DEVICE LstmFwd<T> lstm_fwd(T a_i, T a_f, T a_g, T a_o, T c) {
  LstmFwd<T> s;
  s.i = sigmoid(a_i);
  s.f = sigmoid(a_f);
  s.g = tanh(a_g);
  s.o = sigmoid(a_o);
  s.c_new = s.f * c + s.i * s.g;
  s.h_new = s.o * tanh(s.c_new);
  return s;
}

// LSTM backward from the saved activated gates; tanh(c_new) is recomputed.
template <typename T>
struct LstmBwd {
  T d_i, d_f, d_g, d_o;  // grads of the pre-activations
  T d_c;                 // grad of the previous cell state
};

template <typename T>
FS2S_HOST_DEVICE LstmBwd<T> lstm_bwd(T grad_h, T grad_c, T c, T c_new, T i, T f, T g, T o) {
  LstmBwd<T> s;
  const T tc = tanh(c_new);
  const T dc = grad_c + grad_h * o * (T(1) - tc * tc);
  s.d_i = dc * g * i * (T(1) - i);
  s.d_f = dc * c * f * (T(1) - f);
  s.d_g = dc * i * (T(1) - g * g);
  s.d_o = grad_h * tc * o * (T(1) - o);
  s.d_c = dc * f;
  return s;
}

}  // namespace fused_s2s
