// GRU cell step (gates r, z, n): fused recurrent GEMM + gate math forward, pointwise backward.
#include "cell_gemm.cuh"

namespace fused_s2s {
namespace cuda {
namespace {

struct GruCell {
  static constexpr int kGates = 3;

  // gh = (h @ w_hh.T + b_hh)[b, {j, H+j, 2H+j}]
  template <typename T>
  __device__ static void epilogue(const CellFwdParams& p, int64_t b, int64_t j, const float (&gh)[3]) {
    const int64_t H = p.hidden;
    const T* gx = static_cast<const T*>(p.gx) + b * 3 * H;
    const float h = to_float(static_cast<const T*>(p.h)[b * H + j]);
    const GruFwd<float> o = gru_fwd<float>(to_float(gx[j]), to_float(gx[H + j]), to_float(gx[2 * H + j]),
                                           gh[0], gh[1], gh[2], h);
    static_cast<T*>(p.h_new)[b * H + j] = from_float<T>(o.h_new);
    T* saved = static_cast<T*>(p.saved) + b * 4 * H;
    saved[j] = from_float<T>(o.r);
    saved[H + j] = from_float<T>(o.z);
    saved[2 * H + j] = from_float<T>(o.n);
    saved[3 * H + j] = from_float<T>(o.gh_n);
  }
};

template <typename T>
__global__ void gru_cell_bwd_kernel(const T* __restrict__ grad_h_new, const T* __restrict__ h,
                                    const T* __restrict__ saved, T* __restrict__ grad_gx,
                                    T* __restrict__ grad_gh, T* __restrict__ grad_h_direct,
                                    int64_t batch, int64_t hidden) {
  const int64_t n = batch * hidden;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / hidden, j = idx % hidden, H = hidden;
    const T* s = saved + b * 4 * H;
    const GruBwd<float> o = gru_bwd<float>(to_float(grad_h_new[idx]), to_float(h[idx]), to_float(s[j]),
                                           to_float(s[H + j]), to_float(s[2 * H + j]), to_float(s[3 * H + j]));
    T* gx = grad_gx + b * 3 * H;
    T* gh = grad_gh + b * 3 * H;
    gx[j] = from_float<T>(o.d_r);
    gx[H + j] = from_float<T>(o.d_z);
    gx[2 * H + j] = from_float<T>(o.d_n);
    gh[j] = from_float<T>(o.d_r);
    gh[H + j] = from_float<T>(o.d_z);
    gh[2 * H + j] = from_float<T>(o.d_gh_n);
    grad_h_direct[idx] = from_float<T>(o.d_h);
  }
}

}  // namespace

cudaError_t gru_cell_fwd(DType dtype, const void* gx, const void* h, const void* w_hh,
                         const void* b_hh, void* h_new, void* saved, int64_t batch,
                         int64_t hidden, cudaStream_t stream) {
  CellFwdParams p{gx, h, nullptr, w_hh, b_hh, h_new, nullptr, saved, batch, hidden, hidden};
  return launch_cell_fwd<GruCell>(dtype, p, stream);
}

cudaError_t gru_cell_bwd(DType dtype, const void* grad_h_new, const void* h, const void* saved,
                         void* grad_gx, void* grad_gh, void* grad_h_direct, int64_t batch,
                         int64_t hidden, cudaStream_t stream) {
  if (batch < 0 || hidden < 0) return cudaErrorInvalidValue;
  if (batch == 0 || hidden == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned blocks = pointwise_blocks(batch * hidden, kThreads);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    gru_cell_bwd_kernel<T><<<blocks, kThreads, 0, stream>>>(
        static_cast<const T*>(grad_h_new), static_cast<const T*>(h), static_cast<const T*>(saved),
        static_cast<T*>(grad_gx), static_cast<T*>(grad_gh), static_cast<T*>(grad_h_direct), batch, hidden);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace fused_s2s
