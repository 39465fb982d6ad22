// The Python module fused_s2s._C: the eight primitives of the kernel contract
// (fused_s2s/backends/torch_backend.py), their argument checks, and dispatch to the CPU kernels
// (csrc/cpu) or the CUDA launchers (csrc/cuda, when compiled WITH_CUDA).
//
// Every check names the primitive and the argument; a failure is a Python ValueError (shape,
// device, layout, index range) or TypeError (dtype), never a crash.
#include <torch/csrc/utils/pybind.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/kernels.h"

#ifdef WITH_CUDA
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "cuda/launchers.h"
#include "cuda/persistent_rnn.h"
#endif


namespace fused_s2s {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr bool kHasCuda =
#ifdef WITH_CUDA
    true;
#else
    false;
#endif

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kBool: return "bool";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    default: return c10::toString(t);
  }
}

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < sizes.size(); ++i) s << (i ? ", " : "") << sizes[i];
  s << (sizes.size() == 1 ? ",)" : ")");
  return s.str();
}

bool dtype_supported(const at::Device& device, at::ScalarType t) {
  const bool half_types = t == at::kHalf || t == at::kBFloat16;  // computed in float32 on both
  if (device.is_cpu()) return t == at::kFloat || t == at::kDouble || half_types;
  if (device.is_cuda()) return t == at::kFloat || half_types;
  return false;
}

bool stream_is_capturing([[maybe_unused]] const Tensor& t) {
#ifdef WITH_CUDA
  if (t.is_cuda()) {
    const c10::cuda::CUDAGuard guard(t.device());
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    const cudaError_t err = cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream().stream(), &status);
    TORCH_CHECK(err == cudaSuccess, "cudaStreamIsCapturing: ", cudaGetErrorString(err));
    return status != cudaStreamCaptureStatusNone;
  }
#endif
  return false;
}

// The checks of one call. The first floating tensor fixes the device and dtype of the call;
// every other tensor must be on that device, with the dtype its role requires.
class Args {
 public:
  Args(const char* op, const Tensor& first, const char* first_name) : op_(op), first_name_(first_name) {
    device_ = first.device();
    dtype_ = first.scalar_type();
    TORCH_CHECK_VALUE(device_.is_cpu() || device_.is_cuda(), op_, ": ", first_name_,
                      " must be a CPU or CUDA tensor, got device ", device_.str());
    TORCH_CHECK_VALUE(!device_.is_cuda() || kHasCuda, op_, ": ", first_name_,
                      " is a CUDA tensor but fused_s2s._C was built without CUDA kernels");
    TORCH_CHECK_TYPE(dtype_supported(device_, dtype_), op_, ": ", first_name_, " has dtype ",
                     dtype_name(dtype_), ", not supported on ", device_.type() == at::kCPU ? "CPU" : "CUDA",
                     device_.is_cpu() ? " (float32, float64, float16, bfloat16)" : " (float32, float16, bfloat16)");
  }

  // A floating tensor of the call's dtype with exactly this shape.
  void floating(const Tensor& t, const char* name, at::IntArrayRef shape) const {
    common(t, name);
    TORCH_CHECK_TYPE(t.scalar_type() == dtype_, op_, ": ", name, " must have dtype ", dtype_name(dtype_),
                     " like ", first_name_, ", got ", dtype_name(t.scalar_type()));
    this->shape(t, name, shape);
  }

  // A tensor of a fixed dtype (the lse's accumulation dtype, bool mask, int64 indices).
  void fixed(const Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) const {
    common(t, name);
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, op_, ": ", name, " must have dtype ", dtype_name(dtype),
                     ", got ", dtype_name(t.scalar_type()));
    this->shape(t, name, shape);
  }

  void dim(const Tensor& t, const char* name, int64_t rank) const {
    TORCH_CHECK_VALUE(t.dim() == rank, op_, ": ", name, " must be ", rank, "-D, got shape ",
                      shape_str(t.sizes()));
  }

  // kv_batch_idx must index key rows: [0, bk). On CUDA this costs a copy to the host and a
  // sync, and is skipped while a CUDA graph is being captured (no host copy is allowed then;
  // the kernels trap on an index out of range rather than read out of bounds).
  void index_range(const Tensor& idx, const char* name, int64_t bk) const {
    if (idx.numel() == 0 || stream_is_capturing(idx)) return;
    const Tensor cpu_idx = idx.is_cpu() ? idx : idx.to(at::kCPU);
    const int64_t* p = cpu_idx.data_ptr<int64_t>();
    for (int64_t i = 0; i < cpu_idx.numel(); ++i) {
      TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < bk, op_, ": ", name, "[", i, "] = ", p[i],
                        " is not a key row index in [0, ", bk, ")");
    }
  }

  const char* op() const { return op_; }
  at::ScalarType dtype() const { return dtype_; }
  at::Device device() const { return device_; }
  // float32 for float32/float16/bfloat16, float64 for float64 (the contract's lse dtype)
  at::ScalarType acc_dtype() const { return dtype_ == at::kDouble ? at::kDouble : at::kFloat; }

 private:
  void common(const Tensor& t, const char* name) const {
    TORCH_CHECK_VALUE(t.defined(), op_, ": ", name, " is undefined");
    TORCH_CHECK_VALUE(t.device() == device_, op_, ": ", name, " must be on ", device_.str(), " like ",
                      first_name_, ", got ", t.device().str());
    TORCH_CHECK_VALUE(t.is_contiguous(), op_, ": ", name, " must be contiguous");
  }

  void shape(const Tensor& t, const char* name, at::IntArrayRef shape) const {
    TORCH_CHECK_VALUE(t.sizes() == shape, op_, ": ", name, " must have shape ", shape_str(shape),
                      ", got ", shape_str(t.sizes()));
  }

  const char* op_;
  const char* first_name_;
  at::Device device_ = at::kCPU;
  at::ScalarType dtype_;
};

// ------------------------------------------------------------------------ attention shapes

// Shapes shared by the attention primitives, read from q (Bq, Tq, D) and k (Bk, Tk, Dk).
struct AttnShape {
  int64_t bq, tq, d, bk, tk, dv;
};

AttnShape check_attention(const Args& args, const Tensor& q, const Tensor& k, const Tensor& values,
                          const OptTensor& mask, const OptTensor& lengths,
                          const OptTensor& kv_batch_idx) {
  args.dim(q, "q", 3);
  args.dim(k, "k", 3);
  args.dim(values, "values", 3);
  AttnShape s{q.size(0), q.size(1), q.size(2), k.size(0), k.size(1), values.size(2)};
  args.floating(q, "q", {s.bq, s.tq, s.d});
  args.floating(k, "k", {s.bk, s.tk, s.d});
  args.floating(values, "values", {s.bk, s.tk, s.dv});
  if (mask) args.fixed(*mask, "mask", at::kBool, {s.bk, s.tk});
  if (lengths) args.fixed(*lengths, "lengths", at::kLong, {s.bk});
  if (kv_batch_idx) {
    args.fixed(*kv_batch_idx, "kv_batch_idx", at::kLong, {s.bq});
    args.index_range(*kv_batch_idx, "kv_batch_idx", s.bk);
  } else {
    TORCH_CHECK_VALUE(s.bq == s.bk, args.op(), ": q has ", s.bq, " rows and k has ", s.bk,
                      " rows: without kv_batch_idx they must be equal");
  }
  return s;
}

void check_attention_bwd(const Args& args, const AttnShape& s, const Tensor& grad_context,
                         const Tensor& grad_weights, const Tensor& weights, const Tensor& lse) {
  args.floating(grad_context, "grad_context", {s.bq, s.tq, s.dv});
  args.floating(grad_weights, "grad_weights", {s.bq, s.tq, s.tk});
  args.floating(weights, "weights", {s.bq, s.tq, s.tk});
  args.fixed(lse, "lse", args.acc_dtype(), {s.bq, s.tq});
}

#ifdef WITH_CUDA
// ------------------------------------------------------------------------- CUDA dispatch
// Outputs and workspace are allocated by torch (its caching allocator) on the tensors' device;
// the launch goes to the current stream of that device. Zero-sized problems launch nothing.
namespace cuda_impl {

// `refusal` leads the message for a dtype without kernels.
cuda::DType launcher_dtype(at::ScalarType t, const char* refusal = "no CUDA kernels for dtype ") {
  switch (t) {
    case at::kFloat: return cuda::DType::f32;
    case at::kHalf: return cuda::DType::f16;
    case at::kBFloat16: return cuda::DType::bf16;
    default: TORCH_CHECK_TYPE(false, refusal, dtype_name(t));
  }
}

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(status));
}

const void* opt_ptr(const OptTensor& t) { return t ? t->data_ptr() : nullptr; }
const bool* mask_ptr(const OptTensor& t) { return t ? t->data_ptr<bool>() : nullptr; }
const int64_t* index_ptr(const OptTensor& t) { return t ? t->data_ptr<int64_t>() : nullptr; }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

Tensor workspace(size_t bytes, const Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

std::tuple<Tensor, Tensor> gru_cell_fwd(const Tensor& gx, const Tensor& h, const Tensor& w_hh,
                                        const OptTensor& b_hh) {
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t B = h.size(0), H = h.size(1);
  Tensor h_new = at::empty({B, H}, h.options());
  Tensor saved = at::empty({B, 4 * H}, h.options());
  if (h_new.numel() == 0) return {h_new, saved};
  check_launch(cuda::gru_cell_fwd(launcher_dtype(h.scalar_type()), gx.data_ptr(), h.data_ptr(),
                                  w_hh.data_ptr(), opt_ptr(b_hh), h_new.data_ptr(), saved.data_ptr(),
                                  B, H, current_stream()),
               "gru_cell_fwd");
  return {h_new, saved};
}

std::tuple<Tensor, Tensor, Tensor> gru_cell_bwd(const Tensor& grad_h_new, const Tensor& h,
                                                const Tensor& saved) {
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t B = h.size(0), H = h.size(1);
  Tensor grad_gx = at::empty({B, 3 * H}, h.options());
  Tensor grad_gh = at::empty({B, 3 * H}, h.options());
  Tensor grad_h_direct = at::empty({B, H}, h.options());
  if (grad_h_direct.numel() == 0) return {grad_gx, grad_gh, grad_h_direct};
  check_launch(cuda::gru_cell_bwd(launcher_dtype(h.scalar_type()), grad_h_new.data_ptr(), h.data_ptr(),
                                  saved.data_ptr(), grad_gx.data_ptr(), grad_gh.data_ptr(),
                                  grad_h_direct.data_ptr(), B, H, current_stream()),
               "gru_cell_bwd");
  return {grad_gx, grad_gh, grad_h_direct};
}

std::tuple<Tensor, Tensor, Tensor> lstm_cell_fwd(const Tensor& gx, const Tensor& h, const Tensor& c,
                                                 const Tensor& w_hh, const OptTensor& b_hh) {
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t B = h.size(0), P = h.size(1), H = c.size(1);
  Tensor h_new = at::empty({B, H}, h.options());
  Tensor c_new = at::empty({B, H}, c.options());
  Tensor saved = at::empty({B, 4 * H}, h.options());
  if (h_new.numel() == 0) return {h_new, c_new, saved};
  check_launch(cuda::lstm_cell_fwd(launcher_dtype(h.scalar_type()), gx.data_ptr(), h.data_ptr(),
                                   c.data_ptr(), w_hh.data_ptr(), opt_ptr(b_hh), h_new.data_ptr(),
                                   c_new.data_ptr(), saved.data_ptr(), B, H, P, current_stream()),
               "lstm_cell_fwd");
  return {h_new, c_new, saved};
}

std::tuple<Tensor, Tensor> lstm_cell_bwd(const Tensor& grad_h_new, const Tensor& grad_c_new,
                                         const Tensor& c, const Tensor& c_new, const Tensor& saved) {
  const c10::cuda::CUDAGuard guard(c.device());
  const int64_t B = c.size(0), H = c.size(1);
  Tensor grad_gates = at::empty({B, 4 * H}, c.options());
  Tensor grad_c = at::empty({B, H}, c.options());
  if (grad_c.numel() == 0) return {grad_gates, grad_c};
  check_launch(cuda::lstm_cell_bwd(launcher_dtype(c.scalar_type()), grad_h_new.data_ptr(),
                                   grad_c_new.data_ptr(), c.data_ptr(), c_new.data_ptr(),
                                   saved.data_ptr(), grad_gates.data_ptr(), grad_c.data_ptr(), B, H,
                                   current_stream()),
               "lstm_cell_bwd");
  return {grad_gates, grad_c};
}

// Forward outputs; with no query row or no key position they are final as allocated here
// (context 0, lse -inf) and nothing is launched.
struct AttnFwdOut {
  Tensor context, weights, lse;
  bool empty;
};

AttnFwdOut attention_fwd_outputs(const Tensor& q, const AttnShape& s) {
  const bool empty = s.bq * s.tq == 0 || s.tk == 0;
  const auto opts = q.options();
  return {empty ? at::zeros({s.bq, s.tq, s.dv}, opts) : at::empty({s.bq, s.tq, s.dv}, opts),
          at::empty({s.bq, s.tq, s.tk}, opts),
          empty ? at::full({s.bq, s.tq}, -std::numeric_limits<float>::infinity(), opts.dtype(at::kFloat))
                : at::empty({s.bq, s.tq}, opts.dtype(at::kFloat)),
          empty};
}

// A backward gradient: zeros when nothing is launched (no query row or no key position).
Tensor grad_output(at::IntArrayRef shape, const Tensor& like, bool empty) {
  return empty ? at::zeros(shape, like.options()) : at::empty(shape, like.options());
}

std::tuple<Tensor, Tensor, Tensor> additive_attention_fwd(
    const AttnShape& s, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& values,
    const OptTensor& mask, const OptTensor& lengths, const OptTensor& kv_batch_idx, bool approx_tanh) {
  const c10::cuda::CUDAGuard guard(q.device());
  AttnFwdOut out = attention_fwd_outputs(q, s);
  if (out.empty) return {out.context, out.weights, out.lse};
  const cuda::DType dt = launcher_dtype(q.scalar_type());
  const size_t bytes = cuda::additive_attention_fwd_workspace_bytes(dt, s.bq, s.tq, s.tk, s.d, s.dv);
  Tensor ws = workspace(bytes, q);
  check_launch(cuda::additive_attention_fwd(
                   dt, q.data_ptr(), k.data_ptr(), v.data_ptr(), values.data_ptr(), mask_ptr(mask),
                   index_ptr(lengths), index_ptr(kv_batch_idx), out.context.data_ptr(),
                   out.weights.data_ptr(), out.lse.data_ptr<float>(), s.bq, s.bk, s.tq, s.tk, s.d,
                   s.dv, approx_tanh, ws.data_ptr(), bytes, current_stream()),
               "additive_attention_fwd");
  return {out.context, out.weights, out.lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> additive_attention_bwd(
    const AttnShape& s, const Tensor& grad_context, const Tensor& grad_weights, const Tensor& q,
    const Tensor& k, const Tensor& v, const Tensor& values, const OptTensor& mask,
    const OptTensor& lengths, const OptTensor& kv_batch_idx, const Tensor& weights,
    const Tensor& lse, bool approx_tanh) {
  const c10::cuda::CUDAGuard guard(q.device());
  const bool empty = s.bq * s.tq == 0 || s.tk == 0;
  Tensor dq = grad_output({s.bq, s.tq, s.d}, q, empty);
  Tensor dk = grad_output({s.bq, s.tk, s.d}, q, empty);
  Tensor dv = grad_output({s.d}, q, empty);
  Tensor dvalues = grad_output({s.bq, s.tk, s.dv}, q, empty);
  if (empty) return {dq, dk, dv, dvalues};
  const cuda::DType dt = launcher_dtype(q.scalar_type());
  const size_t bytes = cuda::additive_attention_bwd_workspace_bytes(dt, s.bq, s.tq, s.tk, s.d, s.dv);
  Tensor ws = workspace(bytes, q);
  check_launch(cuda::additive_attention_bwd(
                   dt, grad_context.data_ptr(), grad_weights.data_ptr(), q.data_ptr(), k.data_ptr(),
                   v.data_ptr(), values.data_ptr(), mask_ptr(mask), index_ptr(lengths),
                   index_ptr(kv_batch_idx), weights.data_ptr(), lse.data_ptr<float>(), dq.data_ptr(),
                   dk.data_ptr(), dv.data_ptr(), dvalues.data_ptr(), s.bq, s.bk, s.tq, s.tk, s.d, s.dv,
                   approx_tanh, ws.data_ptr(), bytes, current_stream()),
               "additive_attention_bwd");
  return {dq, dk, dv, dvalues};
}

std::tuple<Tensor, Tensor, Tensor> dot_attention_fwd(
    const AttnShape& s, const Tensor& q, const Tensor& k, const Tensor& values,
    const OptTensor& mask, const OptTensor& lengths, const OptTensor& kv_batch_idx, double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  AttnFwdOut out = attention_fwd_outputs(q, s);
  if (out.empty) return {out.context, out.weights, out.lse};
  const cuda::DType dt = launcher_dtype(q.scalar_type());
  const size_t bytes = cuda::dot_attention_fwd_workspace_bytes(dt, s.bq, s.tq, s.tk, s.d, s.dv);
  Tensor ws = workspace(bytes, q);
  check_launch(cuda::dot_attention_fwd(dt, q.data_ptr(), k.data_ptr(), values.data_ptr(),
                                       mask_ptr(mask), index_ptr(lengths), index_ptr(kv_batch_idx),
                                       static_cast<float>(scale), out.context.data_ptr(),
                                       out.weights.data_ptr(), out.lse.data_ptr<float>(), s.bq, s.bk,
                                       s.tq, s.tk, s.d, s.dv, ws.data_ptr(), bytes, current_stream()),
               "dot_attention_fwd");
  return {out.context, out.weights, out.lse};
}

std::tuple<Tensor, Tensor, Tensor> dot_attention_bwd(
    const AttnShape& s, const Tensor& grad_context, const Tensor& grad_weights, const Tensor& q,
    const Tensor& k, const Tensor& values, const OptTensor& mask, const OptTensor& lengths,
    const OptTensor& kv_batch_idx, double scale, const Tensor& weights, const Tensor& lse) {
  const c10::cuda::CUDAGuard guard(q.device());
  const bool empty = s.bq * s.tq == 0 || s.tk == 0;
  Tensor dq = grad_output({s.bq, s.tq, s.d}, q, empty);
  Tensor dk = grad_output({s.bq, s.tk, s.d}, q, empty);
  Tensor dvalues = grad_output({s.bq, s.tk, s.dv}, q, empty);
  if (empty) return {dq, dk, dvalues};
  const cuda::DType dt = launcher_dtype(q.scalar_type());
  const size_t bytes = cuda::dot_attention_bwd_workspace_bytes(dt, s.bq, s.tq, s.tk, s.d, s.dv);
  Tensor ws = workspace(bytes, q);
  check_launch(cuda::dot_attention_bwd(
                   dt, grad_context.data_ptr(), grad_weights.data_ptr(), q.data_ptr(), k.data_ptr(),
                   values.data_ptr(), mask_ptr(mask), index_ptr(lengths), index_ptr(kv_batch_idx),
                   static_cast<float>(scale), weights.data_ptr(), lse.data_ptr<float>(), dq.data_ptr(),
                   dk.data_ptr(), dvalues.data_ptr(), s.bq, s.bk, s.tq, s.tk, s.d, s.dv, ws.data_ptr(),
                   bytes, current_stream()),
               "dot_attention_bwd");
  return {dq, dk, dvalues};
}

}  // namespace cuda_impl
#endif  // WITH_CUDA

// ------------------------------------------------------------------------------------ cells

std::tuple<Tensor, Tensor> gru_cell_fwd(const Tensor& gx, const Tensor& h, const Tensor& w_hh,
                                        const OptTensor& b_hh) {
  const Args args("gru_cell_fwd", h, "h");
  args.dim(h, "h", 2);
  const int64_t B = h.size(0), H = h.size(1);
  args.floating(h, "h", {B, H});
  args.floating(gx, "gx", {B, 3 * H});
  args.floating(w_hh, "w_hh", {3 * H, H});
  if (b_hh) args.floating(*b_hh, "b_hh", {3 * H});
#ifdef WITH_CUDA
  if (args.device().is_cuda()) return cuda_impl::gru_cell_fwd(gx, h, w_hh, b_hh);
#endif
  return cpu::gru_cell_fwd(gx, h, w_hh, b_hh);
}

std::tuple<Tensor, Tensor, Tensor> gru_cell_bwd(const Tensor& grad_h_new, const Tensor& h,
                                                const Tensor& saved) {
  const Args args("gru_cell_bwd", h, "h");
  args.dim(h, "h", 2);
  const int64_t B = h.size(0), H = h.size(1);
  args.floating(h, "h", {B, H});
  args.floating(grad_h_new, "grad_h_new", {B, H});
  args.floating(saved, "saved", {B, 4 * H});
#ifdef WITH_CUDA
  if (args.device().is_cuda()) return cuda_impl::gru_cell_bwd(grad_h_new, h, saved);
#endif
  return cpu::gru_cell_bwd(grad_h_new, h, saved);
}

// h is (B, P): P = H, or proj_size for an LSTM with projections (the caller projects h_new).
std::tuple<Tensor, Tensor, Tensor> lstm_cell_fwd(const Tensor& gx, const Tensor& h, const Tensor& c,
                                                 const Tensor& w_hh, const OptTensor& b_hh) {
  const Args args("lstm_cell_fwd", h, "h");
  args.dim(h, "h", 2);
  args.dim(c, "c", 2);
  const int64_t B = h.size(0), P = h.size(1), H = c.size(1);
  args.floating(h, "h", {B, P});
  args.floating(gx, "gx", {B, 4 * H});
  args.floating(c, "c", {B, H});
  args.floating(w_hh, "w_hh", {4 * H, P});
  if (b_hh) args.floating(*b_hh, "b_hh", {4 * H});
#ifdef WITH_CUDA
  if (args.device().is_cuda()) return cuda_impl::lstm_cell_fwd(gx, h, c, w_hh, b_hh);
#endif
  return cpu::lstm_cell_fwd(gx, h, c, w_hh, b_hh);
}

std::tuple<Tensor, Tensor> lstm_cell_bwd(const Tensor& grad_h_new, const Tensor& grad_c_new,
                                         const Tensor& c, const Tensor& c_new, const Tensor& saved) {
  const Args args("lstm_cell_bwd", c, "c");
  args.dim(c, "c", 2);
  const int64_t B = c.size(0), H = c.size(1);
  args.floating(c, "c", {B, H});
  args.floating(grad_h_new, "grad_h_new", {B, H});
  args.floating(grad_c_new, "grad_c_new", {B, H});
  args.floating(c_new, "c_new", {B, H});
  args.floating(saved, "saved", {B, 4 * H});
#ifdef WITH_CUDA
  if (args.device().is_cuda()) return cuda_impl::lstm_cell_bwd(grad_h_new, grad_c_new, c, c_new, saved);
#endif
  return cpu::lstm_cell_bwd(grad_h_new, grad_c_new, c, c_new, saved);
}

// -------------------------------------------------------------------------------- attention


std::tuple<Tensor, Tensor, Tensor> additive_attention_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& values, const OptTensor& mask,
    const OptTensor& lengths, const OptTensor& kv_batch_idx, [[maybe_unused]] bool approx_tanh) {
  const Args args("additive_attention_fwd", q, "q");
  const AttnShape s = check_attention(args, q, k, values, mask, lengths, kv_batch_idx);
  args.floating(v, "v", {s.d});
#ifdef WITH_CUDA
  if (args.device().is_cuda())
    return cuda_impl::additive_attention_fwd(s, q, k, v, values, mask, lengths, kv_batch_idx,
                                             approx_tanh);
#endif
  return cpu::additive_attention_fwd(q, k, v, values, mask, lengths, kv_batch_idx);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> additive_attention_bwd(
    const Tensor& grad_context, const Tensor& grad_weights, const Tensor& q, const Tensor& k,
    const Tensor& v, const Tensor& values, const OptTensor& mask, const OptTensor& lengths,
    const OptTensor& kv_batch_idx, const Tensor& weights, const Tensor& lse,
    [[maybe_unused]] bool approx_tanh) {
  const Args args("additive_attention_bwd", q, "q");
  const AttnShape s = check_attention(args, q, k, values, mask, lengths, kv_batch_idx);
  args.floating(v, "v", {s.d});
  check_attention_bwd(args, s, grad_context, grad_weights, weights, lse);
#ifdef WITH_CUDA
  if (args.device().is_cuda())
    return cuda_impl::additive_attention_bwd(s, grad_context, grad_weights, q, k, v, values, mask,
                                             lengths, kv_batch_idx, weights, lse, approx_tanh);
#endif
  return cpu::additive_attention_bwd(grad_context, grad_weights, q, k, v, values, mask, lengths,
                                     kv_batch_idx, weights, lse);
}

std::tuple<Tensor, Tensor, Tensor> dot_attention_fwd(
    const Tensor& q, const Tensor& k, const Tensor& values, const OptTensor& mask,
    const OptTensor& lengths, const OptTensor& kv_batch_idx, double scale) {
  const Args args("dot_attention_fwd", q, "q");
  [[maybe_unused]] const AttnShape s = check_attention(args, q, k, values, mask, lengths, kv_batch_idx);
#ifdef WITH_CUDA
  if (args.device().is_cuda())
    return cuda_impl::dot_attention_fwd(s, q, k, values, mask, lengths, kv_batch_idx, scale);
#endif
  return cpu::dot_attention_fwd(q, k, values, mask, lengths, kv_batch_idx, scale);
}

std::tuple<Tensor, Tensor, Tensor> dot_attention_bwd(
    const Tensor& grad_context, const Tensor& grad_weights, const Tensor& q, const Tensor& k,
    const Tensor& values, const OptTensor& mask, const OptTensor& lengths,
    const OptTensor& kv_batch_idx, double scale, const Tensor& weights, const Tensor& lse) {
  const Args args("dot_attention_bwd", q, "q");
  const AttnShape s = check_attention(args, q, k, values, mask, lengths, kv_batch_idx);
  check_attention_bwd(args, s, grad_context, grad_weights, weights, lse);
#ifdef WITH_CUDA
  if (args.device().is_cuda())
    return cuda_impl::dot_attention_bwd(s, grad_context, grad_weights, q, k, values, mask, lengths,
                                        kv_batch_idx, scale, weights, lse);
#endif
  return cpu::dot_attention_bwd(grad_context, grad_weights, q, k, values, mask, lengths,
                                kv_batch_idx, scale, weights, lse);
}

// ------------------------------------------------------------------------ persistent layers
// Whole-sequence GRU/LSTM layer directions over the padded time-major layout (contract in
// cuda/persistent_rnn.h): on CPU the C++ time loop of cpu/persistent_rnn.cpp, on CUDA the
// persistent kernels. max_blocks and max_rows_per_block tune the CUDA plan (CPU has none).

// What every persistent call checks: one device, the dtype of the (B, H) state `first`,
// contiguous, shapes. `seq` is the (T, B, width) tensor that gives T.
struct SeqCall {
  Args args;
  int64_t T = 0, B = 0, H = 0;

  SeqCall(const char* op, int64_t gates, const Tensor& first, const char* first_name, const Tensor& seq,
          const char* seq_name, const Tensor& w_hh, const OptTensor& lengths)
      : args(op, first, first_name) {
    args.dim(first, first_name, 2);
    args.dim(seq, seq_name, 3);
    T = seq.size(0), B = first.size(0), H = first.size(1);
    args.floating(first, first_name, {B, H});
    args.floating(w_hh, "w_hh", {gates * H, H});
    if (lengths) args.fixed(*lengths, "lengths", at::kLong, {B});
  }
};

#ifdef WITH_CUDA
// On CUDA each call plans for the tensors' device, raises with the planner's reason when the
// layer does not fit, allocates its outputs and workspace through torch and launches on the
// current stream.
namespace pers = persistent;

pers::Cell pers_cell(const std::string& cell) {
  TORCH_CHECK_VALUE(cell == "gru" || cell == "lstm", "persistent kernels: cell must be 'gru' or 'lstm', got '",
                    cell, "'");
  return cell == "gru" ? pers::Cell::kGru : pers::Cell::kLstm;
}

pers::Plan pers_query(const char* op, pers::Cell cell, at::ScalarType dtype, bool backward, int64_t batch,
                      int64_t hidden, int device, int64_t max_blocks, int64_t max_rows_per_block) {
  pers::Plan plan;
  const cuda::DType dt = cuda_impl::launcher_dtype(dtype, "persistent kernels: no kernels for dtype ");
  cuda_impl::check_launch(pers::query_plan(cell, dt, backward, batch, hidden, device, &plan, max_blocks,
                                           max_rows_per_block),
                          op);
  return plan;
}

pybind11::dict persistent_rnn_plan(const std::string& cell, at::ScalarType dtype, int64_t batch, int64_t hidden,
                                   at::Device device, bool backward, int64_t max_blocks, int64_t max_rows_per_block) {
  TORCH_CHECK_VALUE(device.is_cuda(), "persistent_rnn_plan: device must be a CUDA device, got ", device.str());
  const int index = device.has_index() ? device.index() : c10::cuda::current_device();
  const pers::Plan p = pers_query("persistent_rnn_plan", pers_cell(cell), dtype, backward, batch, hidden, index,
                                  max_blocks, max_rows_per_block);
  pybind11::dict d;
  d["fits"] = p.fits;
  d["reason"] = std::string(p.reason);
  const std::pair<const char*, int64_t> fields[] = {
      {"units_per_block", p.units_per_block}, {"rows_per_block", p.rows_per_block}, {"unit_blocks", p.unit_blocks},
      {"batch_blocks", p.batch_blocks}, {"k", p.k}, {"k_pad", p.k_pad}, {"k_chunk", p.k_chunk},
      {"weight_rows", p.weight_rows}, {"tiles", p.tiles}, {"tile_groups", p.tile_groups}, {"k_split", p.k_split},
      {"smem_bytes", p.smem_bytes}, {"workspace_bytes", p.workspace_bytes}};
  for (const auto& f : fields) d[f.first] = f.second;
  return d;
}

// One checked call on CUDA: its device guard and plan.
struct PersCall {
  const SeqCall& s;
  pers::Plan plan;
  c10::cuda::OptionalCUDAGuard guard;
  Tensor ws;

  PersCall(const SeqCall& call, pers::Cell cell, bool backward, int64_t max_blocks, int64_t max_rows_per_block)
      : s(call) {
    guard.set_device(s.args.device());
    plan = pers_query(s.args.op(), cell, s.args.dtype(), backward, s.B, s.H, s.args.device().index(), max_blocks,
                      max_rows_per_block);
    TORCH_CHECK_VALUE(plan.fits, s.args.op(), ": the layer (batch ", s.B, ", hidden ", s.H,
                      ") does not fit the persistent kernels: ", plan.reason);
  }

  Tensor empty(at::IntArrayRef shape) const {
    return at::empty(shape, at::TensorOptions().dtype(s.args.dtype()).device(s.args.device()));
  }
  void* workspace() {  // from torch's caching allocator, freed (stream-ordered) after the launch
    ws = at::empty({plan.workspace_bytes}, at::TensorOptions().dtype(at::kByte).device(s.args.device()));
    return ws.data_ptr();
  }
  void launch(cudaError_t status) const { cuda_impl::check_launch(status, s.args.op()); }
};

void* opt_out(OptTensor& t) { return t ? t->data_ptr() : nullptr; }

namespace cuda_impl {

std::tuple<Tensor, Tensor, OptTensor> persistent_gru_fwd(const SeqCall& s, const Tensor& gx, const Tensor& h0,
                                                         const Tensor& w_hh, const OptTensor& b_hh,
                                                         const OptTensor& lengths, bool reverse, bool save,
                                                         int64_t max_blocks, int64_t max_rows_per_block) {
  PersCall c(s, pers::Cell::kGru, false, max_blocks, max_rows_per_block);
  Tensor out = c.empty({s.T, s.B, s.H}), h_n = c.empty({s.B, s.H});
  OptTensor saved;
  if (save) saved = c.empty({s.T, s.B, 4 * s.H});
  c.launch(pers::gru_forward(c.plan, s.T, reverse, gx.data_ptr(), h0.data_ptr(), w_hh.data_ptr(), opt_ptr(b_hh),
                             index_ptr(lengths), out.data_ptr(), h_n.data_ptr(), opt_out(saved), c.workspace(),
                             current_stream()));
  return {out, h_n, saved};
}

std::tuple<Tensor, Tensor, Tensor, OptTensor, OptTensor> persistent_lstm_fwd(
    const SeqCall& s, const Tensor& gx, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
    const OptTensor& b_hh, const OptTensor& lengths, bool reverse, bool save, int64_t max_blocks,
    int64_t max_rows_per_block) {
  PersCall c(s, pers::Cell::kLstm, false, max_blocks, max_rows_per_block);
  Tensor out = c.empty({s.T, s.B, s.H}), h_n = c.empty({s.B, s.H}), c_n = c.empty({s.B, s.H});
  OptTensor saved, c_seq;
  if (save) {
    saved = c.empty({s.T, s.B, 4 * s.H});
    c_seq = c.empty({s.T, s.B, s.H});
  }
  c.launch(pers::lstm_forward(c.plan, s.T, reverse, gx.data_ptr(), h0.data_ptr(), c0.data_ptr(), w_hh.data_ptr(),
                              opt_ptr(b_hh), index_ptr(lengths), out.data_ptr(), h_n.data_ptr(), c_n.data_ptr(),
                              opt_out(saved), opt_out(c_seq), c.workspace(), current_stream()));
  return {out, h_n, c_n, saved, c_seq};
}

std::tuple<Tensor, Tensor, Tensor> persistent_gru_bwd(const SeqCall& s, const OptTensor& grad_out,
                                                      const OptTensor& grad_h_n, const Tensor& out,
                                                      const Tensor& h0, const Tensor& saved, const Tensor& w_hh,
                                                      const OptTensor& lengths, bool reverse, int64_t max_blocks,
                                                      int64_t max_rows_per_block) {
  PersCall c(s, pers::Cell::kGru, true, max_blocks, max_rows_per_block);
  Tensor grad_gx = c.empty({s.T, s.B, 3 * s.H}), grad_gh = c.empty({s.T, s.B, 3 * s.H});
  Tensor grad_h0 = c.empty({s.B, s.H});
  c.launch(pers::gru_backward(c.plan, s.T, reverse, opt_ptr(grad_out), opt_ptr(grad_h_n), out.data_ptr(),
                              h0.data_ptr(), saved.data_ptr(), w_hh.data_ptr(), index_ptr(lengths),
                              grad_gx.data_ptr(), grad_gh.data_ptr(), grad_h0.data_ptr(), c.workspace(),
                              current_stream()));
  return {grad_gx, grad_gh, grad_h0};
}

std::tuple<Tensor, Tensor, Tensor> persistent_lstm_bwd(const SeqCall& s, const OptTensor& grad_out,
                                                       const OptTensor& grad_h_n, const OptTensor& grad_c_n,
                                                       const Tensor& c0, const Tensor& c_seq, const Tensor& saved,
                                                       const Tensor& w_hh, const OptTensor& lengths, bool reverse,
                                                       int64_t max_blocks, int64_t max_rows_per_block) {
  PersCall c(s, pers::Cell::kLstm, true, max_blocks, max_rows_per_block);
  Tensor grad_gates = c.empty({s.T, s.B, 4 * s.H}), grad_h0 = c.empty({s.B, s.H}), grad_c0 = c.empty({s.B, s.H});
  c.launch(pers::lstm_backward(c.plan, s.T, reverse, opt_ptr(grad_out), opt_ptr(grad_h_n), opt_ptr(grad_c_n),
                               c0.data_ptr(), c_seq.data_ptr(), saved.data_ptr(), w_hh.data_ptr(),
                               index_ptr(lengths), grad_gates.data_ptr(), grad_h0.data_ptr(), grad_c0.data_ptr(),
                               c.workspace(), current_stream()));
  return {grad_gates, grad_h0, grad_c0};
}

}  // namespace cuda_impl
#endif  // WITH_CUDA

std::tuple<Tensor, Tensor, OptTensor> persistent_gru_fwd(const Tensor& gx, const Tensor& h0, const Tensor& w_hh,
                                                         const OptTensor& b_hh, const OptTensor& lengths,
                                                         bool reverse, bool save,
                                                         [[maybe_unused]] int64_t max_blocks,
                                                         [[maybe_unused]] int64_t max_rows_per_block) {
  const SeqCall s("persistent_gru_fwd", 3, h0, "h0", gx, "gx", w_hh, lengths);
  s.args.floating(gx, "gx", {s.T, s.B, 3 * s.H});
  if (b_hh) s.args.floating(*b_hh, "b_hh", {3 * s.H});
#ifdef WITH_CUDA
  if (s.args.device().is_cuda())
    return cuda_impl::persistent_gru_fwd(s, gx, h0, w_hh, b_hh, lengths, reverse, save, max_blocks,
                                         max_rows_per_block);
#endif
  return cpu::persistent_gru_fwd(gx, h0, w_hh, b_hh, lengths, reverse, save);
}

std::tuple<Tensor, Tensor, Tensor, OptTensor, OptTensor> persistent_lstm_fwd(
    const Tensor& gx, const Tensor& h0, const Tensor& c0, const Tensor& w_hh, const OptTensor& b_hh,
    const OptTensor& lengths, bool reverse, bool save, [[maybe_unused]] int64_t max_blocks,
    [[maybe_unused]] int64_t max_rows_per_block) {
  const SeqCall s("persistent_lstm_fwd", 4, h0, "h0", gx, "gx", w_hh, lengths);
  s.args.floating(gx, "gx", {s.T, s.B, 4 * s.H});
  s.args.floating(c0, "c0", {s.B, s.H});
  if (b_hh) s.args.floating(*b_hh, "b_hh", {4 * s.H});
#ifdef WITH_CUDA
  if (s.args.device().is_cuda())
    return cuda_impl::persistent_lstm_fwd(s, gx, h0, c0, w_hh, b_hh, lengths, reverse, save, max_blocks,
                                          max_rows_per_block);
#endif
  return cpu::persistent_lstm_fwd(gx, h0, c0, w_hh, b_hh, lengths, reverse, save);
}

std::tuple<Tensor, Tensor, Tensor> persistent_gru_bwd(const OptTensor& grad_out, const OptTensor& grad_h_n,
                                                      const Tensor& out, const Tensor& h0, const Tensor& saved,
                                                      const Tensor& w_hh, const OptTensor& lengths, bool reverse,
                                                      [[maybe_unused]] int64_t max_blocks,
                                                      [[maybe_unused]] int64_t max_rows_per_block) {
  const SeqCall s("persistent_gru_bwd", 3, h0, "h0", out, "out", w_hh, lengths);
  s.args.floating(out, "out", {s.T, s.B, s.H});
  s.args.floating(saved, "saved", {s.T, s.B, 4 * s.H});
  if (grad_out) s.args.floating(*grad_out, "grad_out", {s.T, s.B, s.H});
  if (grad_h_n) s.args.floating(*grad_h_n, "grad_h_n", {s.B, s.H});
#ifdef WITH_CUDA
  if (s.args.device().is_cuda())
    return cuda_impl::persistent_gru_bwd(s, grad_out, grad_h_n, out, h0, saved, w_hh, lengths, reverse, max_blocks,
                                         max_rows_per_block);
#endif
  return cpu::persistent_gru_bwd(grad_out, grad_h_n, out, h0, saved, w_hh, lengths, reverse);
}

std::tuple<Tensor, Tensor, Tensor> persistent_lstm_bwd(const OptTensor& grad_out, const OptTensor& grad_h_n,
                                                       const OptTensor& grad_c_n, const Tensor& c0,
                                                       const Tensor& c_seq, const Tensor& saved,
                                                       const Tensor& w_hh, const OptTensor& lengths, bool reverse,
                                                       [[maybe_unused]] int64_t max_blocks,
                                                       [[maybe_unused]] int64_t max_rows_per_block) {
  const SeqCall s("persistent_lstm_bwd", 4, c0, "c0", c_seq, "c_seq", w_hh, lengths);
  s.args.floating(c_seq, "c_seq", {s.T, s.B, s.H});
  s.args.floating(saved, "saved", {s.T, s.B, 4 * s.H});
  if (grad_out) s.args.floating(*grad_out, "grad_out", {s.T, s.B, s.H});
  if (grad_h_n) s.args.floating(*grad_h_n, "grad_h_n", {s.B, s.H});
  if (grad_c_n) s.args.floating(*grad_c_n, "grad_c_n", {s.B, s.H});
#ifdef WITH_CUDA
  if (s.args.device().is_cuda())
    return cuda_impl::persistent_lstm_bwd(s, grad_out, grad_h_n, grad_c_n, c0, c_seq, saved, w_hh, lengths, reverse,
                                          max_blocks, max_rows_per_block);
#endif
  return cpu::persistent_lstm_bwd(grad_out, grad_h_n, grad_c_n, c0, c_seq, saved, w_hh, lengths, reverse);
}

}  // namespace
}  // namespace fused_s2s

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace fused_s2s;
  m.doc() = "fused_s2s kernels: the eight primitives of the kernel contract (see "
            "fused_s2s.backends.torch_backend), on CPU tensors and, when has_cuda, on CUDA tensors.";
  m.attr("has_cuda") = py::bool_(kHasCuda);
#define FS2S_STRINGIFY(x) #x
#define FS2S_STRING(x) FS2S_STRINGIFY(x)
#ifdef FS2S_SOURCE_HASH
  // digest of the csrc/ tree this module was built from (see fused_s2s/backends/build.py)
  m.attr("source_hash") = FS2S_STRING(FS2S_SOURCE_HASH);
#endif
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("gru_cell_fwd", &gru_cell_fwd, "-> (h_new, saved)", py::arg("gx"), py::arg("h"),
        py::arg("w_hh"), py::arg("b_hh"), nogil);
  m.def("gru_cell_bwd", &gru_cell_bwd, "-> (grad_gx, grad_gh, grad_h_direct)",
        py::arg("grad_h_new"), py::arg("h"), py::arg("saved"), nogil);
  m.def("lstm_cell_fwd", &lstm_cell_fwd, "-> (h_new, c_new, saved)", py::arg("gx"), py::arg("h"),
        py::arg("c"), py::arg("w_hh"), py::arg("b_hh"), nogil);
  m.def("lstm_cell_bwd", &lstm_cell_bwd, "-> (grad_gates, grad_c)", py::arg("grad_h_new"),
        py::arg("grad_c_new"), py::arg("c"), py::arg("c_new"), py::arg("saved"), nogil);
  m.def("additive_attention_fwd", &additive_attention_fwd,
        "-> (context, weights, lse). approx_tanh: use the GPU's hardware tanh approximation "
        "(CUDA only; CPU kernels always compute tanh accurately).",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("values"), py::arg("mask"),
        py::arg("lengths"), py::arg("kv_batch_idx"), py::arg("approx_tanh") = false, nogil);
  m.def("additive_attention_bwd", &additive_attention_bwd, "-> (dq, dk, dv, dvalues)",
        py::arg("grad_context"), py::arg("grad_weights"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("values"), py::arg("mask"), py::arg("lengths"), py::arg("kv_batch_idx"),
        py::arg("weights"), py::arg("lse"), py::arg("approx_tanh") = false, nogil);
  m.def("dot_attention_fwd", &dot_attention_fwd, "-> (context, weights, lse)", py::arg("q"),
        py::arg("k"), py::arg("values"), py::arg("mask"), py::arg("lengths"),
        py::arg("kv_batch_idx"), py::arg("scale"), nogil);
  m.def("dot_attention_bwd", &dot_attention_bwd, "-> (dq, dk, dvalues)", py::arg("grad_context"),
        py::arg("grad_weights"), py::arg("q"), py::arg("k"), py::arg("values"), py::arg("mask"),
        py::arg("lengths"), py::arg("kv_batch_idx"), py::arg("scale"), py::arg("weights"),
        py::arg("lse"), nogil);
  // Persistent whole-sequence layers (see cuda/persistent_rnn.h): on CPU tensors in every build,
  // on CUDA tensors in CUDA builds. Sequence tensors are padded time-major (T, B, ...); lengths
  // (B,) int64 on the same device or None. Tuning knobs of the CUDA plan (ignored on CPU):
  // max_blocks (0: one block per SM), max_rows_per_block (1..16).
  const py::arg_v max_blocks = py::arg("max_blocks") = 0, max_rows = py::arg("max_rows_per_block") = 16;
  m.def("persistent_gru_fwd", &persistent_gru_fwd, "-> (out, h_n, saved or None)", py::arg("gx"), py::arg("h0"),
        py::arg("w_hh"), py::arg("b_hh"), py::arg("lengths"), py::arg("reverse"), py::arg("save"),
        max_blocks, max_rows, nogil);
  m.def("persistent_lstm_fwd", &persistent_lstm_fwd, "-> (out, h_n, c_n, saved or None, c_seq or None)",
        py::arg("gx"), py::arg("h0"), py::arg("c0"), py::arg("w_hh"), py::arg("b_hh"), py::arg("lengths"),
        py::arg("reverse"), py::arg("save"), max_blocks, max_rows, nogil);
  m.def("persistent_gru_bwd", &persistent_gru_bwd, "-> (grad_gx, grad_gh, grad_h0)", py::arg("grad_out"),
        py::arg("grad_h_n"), py::arg("out"), py::arg("h0"), py::arg("saved"), py::arg("w_hh"), py::arg("lengths"),
        py::arg("reverse"), max_blocks, max_rows, nogil);
  m.def("persistent_lstm_bwd", &persistent_lstm_bwd, "-> (grad_gates, grad_h0, grad_c0)", py::arg("grad_out"),
        py::arg("grad_h_n"), py::arg("grad_c_n"), py::arg("c0"), py::arg("c_seq"), py::arg("saved"),
        py::arg("w_hh"), py::arg("lengths"), py::arg("reverse"), max_blocks, max_rows, nogil);
#ifdef WITH_CUDA
  m.def("persistent_rnn_plan", &persistent_rnn_plan,
        "-> dict: the tiling of one layer direction on `device` (fits, reason, grid, shared memory)",
        py::arg("cell"), py::arg("dtype"), py::arg("batch"), py::arg("hidden"), py::arg("device"),
        py::arg("backward") = false, max_blocks, max_rows);
#endif
}
