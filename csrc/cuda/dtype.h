// The element type of the CUDA kernels' floating tensors, one name for the per-step launchers
// (launchers.h) and the persistent layers (persistent_rnn.h). Plain C++: no torch, no CUDA.
#pragma once

#include <cstdint>

namespace fused_s2s {
namespace cuda {

// The values are part of the interface: tests/test_persistent_plan.py passes them as integers.
enum class DType : int32_t { f32 = 0, f16 = 1, bf16 = 2 };

inline int element_size(DType dtype) { return dtype == DType::f32 ? 4 : 2; }

}  // namespace cuda
}  // namespace fused_s2s
