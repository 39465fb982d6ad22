// LSTM cell step (gates i, f, g, o): fused recurrent GEMM + gate math forward, pointwise backward.
// With projections h is (B, P) and h_new = o * tanh(c_new) (B, H) stays unprojected: the
// projection reads whole rows of h_new, which one (batch, hidden) tile does not hold, so the
// caller runs it as a GEMM.
#include "cell_gemm.cuh"

namespace fused_s2s {
namespace cuda {
namespace {

struct LstmCell {
  static constexpr int kGates = 4;

  // gh = (h @ w_hh.T + b_hh)[b, {j, H+j, 2H+j, 3H+j}]
  template <typename T>
  __device__ static void epilogue(const CellFwdParams& p, int64_t b, int64_t j, const float (&gh)[4]) {
    const int64_t H = p.hidden;
    const T* gx = static_cast<const T*>(p.gx) + b * 4 * H;
    const float c = to_float(static_cast<const T*>(p.c)[b * H + j]);
    const LstmFwd<float> s = lstm_fwd<float>(to_float(gx[j]) + gh[0], to_float(gx[H + j]) + gh[1],
                                             to_float(gx[2 * H + j]) + gh[2],
                                             to_float(gx[3 * H + j]) + gh[3], c);
    static_cast<T*>(p.h_new)[b * H + j] = from_float<T>(s.h_new);
    static_cast<T*>(p.c_new)[b * H + j] = from_float<T>(s.c_new);
    T* saved = static_cast<T*>(p.saved) + b * 4 * H;
    saved[j] = from_float<T>(s.i);
    saved[H + j] = from_float<T>(s.f);
    saved[2 * H + j] = from_float<T>(s.g);
    saved[3 * H + j] = from_float<T>(s.o);
  }
};

// grad_h_new / grad_c_new may be nullptr (zeros).
template <typename T>
__global__ void lstm_cell_bwd_kernel(const T* __restrict__ grad_h_new, const T* __restrict__ grad_c_new,
                                     const T* __restrict__ c, const T* __restrict__ c_new,
                                     const T* __restrict__ saved, T* __restrict__ grad_gates,
                                     T* __restrict__ grad_c, int64_t batch, int64_t hidden) {
  const int64_t n = batch * hidden;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / hidden, j = idx % hidden, H = hidden;
    const T* s = saved + b * 4 * H;
    const float gh = grad_h_new != nullptr ? to_float(grad_h_new[idx]) : 0.f;
    const float gc = grad_c_new != nullptr ? to_float(grad_c_new[idx]) : 0.f;
    const LstmBwd<float> o = lstm_bwd<float>(gh, gc, to_float(c[idx]), to_float(c_new[idx]), to_float(s[j]),
                                             to_float(s[H + j]), to_float(s[2 * H + j]), to_float(s[3 * H + j]));
    T* gg = grad_gates + b * 4 * H;
    gg[j] = from_float<T>(o.d_i);
    gg[H + j] = from_float<T>(o.d_f);
    gg[2 * H + j] = from_float<T>(o.d_g);
    gg[3 * H + j] = from_float<T>(o.d_o);
    grad_c[idx] = from_float<T>(o.d_c);
  }
}

}  // namespace

cudaError_t lstm_cell_fwd(DType dtype, const void* gx, const void* h, const void* c,
                          const void* w_hh, const void* b_hh, void* h_new, void* c_new,
                          void* saved, int64_t batch, int64_t hidden, int64_t h_size,
                          cudaStream_t stream) {
  CellFwdParams p{gx, h, c, w_hh, b_hh, h_new, c_new, saved, batch, hidden, h_size};
  return launch_cell_fwd<LstmCell>(dtype, p, stream);
}

cudaError_t lstm_cell_bwd(DType dtype, const void* grad_h_new, const void* grad_c_new,
                          const void* c, const void* c_new, const void* saved, void* grad_gates,
                          void* grad_c, int64_t batch, int64_t hidden, cudaStream_t stream) {
  if (batch < 0 || hidden < 0) return cudaErrorInvalidValue;
  if (batch == 0 || hidden == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned blocks = pointwise_blocks(batch * hidden, kThreads);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    lstm_cell_bwd_kernel<T><<<blocks, kThreads, 0, stream>>>(
        static_cast<const T*>(grad_h_new), static_cast<const T*>(grad_c_new), static_cast<const T*>(c),
        static_cast<const T*>(c_new), static_cast<const T*>(saved), static_cast<T*>(grad_gates),
        static_cast<T*>(grad_c), batch, hidden);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fused_s2s
