// Device helpers shared by the CUDA kernels: element types, dtype dispatch, warp reductions,
// the source-position rules of the attention ops, and workspace carving.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <set>
#include <utility>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fused_s2s/gates.h"
#include "launchers.h"

namespace fused_s2s {
namespace cuda {

// ------------------------------------------------------------------ element conversions

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Runs f(TypeTag<T>{}) with T the element type named by dtype.
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: return f(TypeTag<float>{});
    case DType::f16: return f(TypeTag<__half>{});
    case DType::bf16: return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// ------------------------------------------------------------------------------- math

__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <bool Approx>
__device__ __forceinline__ float tanh_f(float x) {
  if constexpr (Approx) {
    return tanh_approx(x);
  } else {
    return tanhf(x);
  }
}

// Butterfly reductions: every lane of the (fully active) warp gets the result.
__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset >>= 1)
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// ------------------------------------------------------------ source-position rules

// The key row that query row i reads. The caller validates kv_batch_idx; an index outside
// [0, batch_k) still never reads out of bounds here: it aborts the kernel with an error.
__device__ __forceinline__ int64_t key_row(const int64_t* kv_batch_idx, int64_t i, int64_t batch_k) {
  if (kv_batch_idx == nullptr) return i;
  const int64_t b = kv_batch_idx[i];
  if (b < 0 || b >= batch_k) __trap();
  return b;
}

// Number of leading positions of key row kb that may be valid (lengths clamped to [0, len_k]).
__device__ __forceinline__ int64_t valid_length(const int64_t* lengths, int64_t kb, int64_t len_k) {
  if (lengths == nullptr) return len_k;
  const int64_t n = lengths[kb];
  return n < 0 ? 0 : (n > len_k ? len_k : n);
}

// --------------------------------------------------------------------------- host side

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

// Streaming multiprocessors of the current device, cached per device.
inline int num_sms() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) {
    cudaGetLastError();  // leave no stale error for the launch status
    return 1;
  }
  int n = cache[device].load(std::memory_order_relaxed);
  if (n > 0) return n;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
    cudaGetLastError();
    return 1;
  }
  cache[device].store(n, std::memory_order_relaxed);
  return n;
}

// Largest dynamic shared memory a block may opt in to on the current device.
inline size_t max_shared_bytes_optin() {
  int device = 0, n = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();
    return 48 * 1024;
  }
  return static_cast<size_t>(n);
}

// Lets `kernel` take up to the current device's opt-in maximum of dynamic shared memory, set
// once per kernel and device. Setting the attribute per launch to that launch's own size would
// race: two host threads (the bindings release the GIL) launching the same kernel with different
// sizes could each launch after the other's smaller setting and fail.
inline cudaError_t allow_max_dynamic_shared(const void* kernel) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> done;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const std::lock_guard<std::mutex> lock(mutex);
  if (done.count({kernel, device})) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(max_shared_bytes_optin()));
  if (err == cudaSuccess) done.insert({kernel, device});
  return err;
}

// Lays float buffers out one after another in one workspace, each 256-byte aligned.
// Used twice with the same sequence of take() calls: once without a base pointer to size
// the workspace, once with the caller's buffer to hand the pieces out.
class WorkspaceCarver {
 public:
  explicit WorkspaceCarver(void* base = nullptr) : base_(static_cast<char*>(base)) {}
  float* take(int64_t n_floats) {
    if (n_floats <= 0) return nullptr;
    float* p = base_ ? reinterpret_cast<float*>(base_ + used_) : nullptr;
    used_ += (static_cast<size_t>(n_floats) * sizeof(float) + 255) / 256 * 256;
    return p;
  }
  size_t bytes() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

}  // namespace cuda
}  // namespace fused_s2s
