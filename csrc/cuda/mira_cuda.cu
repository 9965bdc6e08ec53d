// CUDA backend of the MIRA ops: mira::_cuda_mira_linear, _cuda_mira_linear_backward, _cuda_mira_adapter_.
//
// The kernels and the launch plan are in mira_kernels.cuh (also run on the CPU by the SIMT emulation in
// tests/cuda_emu). This file is the ATen glue: argument checks (the contract's, csrc/validation.h,
// and this backend's limits), device guard, current stream, dtype dispatch, allocation of
// outputs and one workspace, and the base GEMMs, which go through ATen
// (cuBLAS underneath; the toolkit on the build machines has no cuBLAS headers, and ATen picks the
// right GEMM per dtype and GPU anyway).
//
// Launches per call: mira_linear = GEMM + 2 kernels; mira_adapter_ = 2 kernels; the backward =
// GEMM (when dx is asked for) + 2 kernels, + 3 more when a memory gradient is asked for. No host
// synchronisation, no data-dependent grid, no host-to-device copy: CUDA-graph capturable.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <string>
#include <vector>

#define MIRA_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()
#include "mira_kernels.cuh"
#include "validation.h"

namespace {

using mira_cuda::CallBuffers;
using mira_cuda::Dims;
using mira_cuda::Workspace;

// ATen's 16-bit types and CUDA's share their bit layout; the kernels use CUDA's.
template <typename T>
struct DeviceType {
  using type = T;
};
template <>
struct DeviceType<at::Half> {
  using type = __half;
};
template <>
struct DeviceType<at::BFloat16> {
  using type = __nv_bfloat16;
};

int separation_code(const std::string& separation) {
  static const std::array<const char*, 6> names = {"affine", "softmax", "relu", "tanh", "sigmoid", "identity"};
  for (size_t i = 0; i < names.size(); ++i)
    if (separation == names[i]) return static_cast<int>(i);
  TORCH_CHECK(false, "mira (cuda): unknown separation '", separation,
              "'; expected affine, softmax, relu, tanh, sigmoid or identity");
}

bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

at::ScalarType compute_type(at::ScalarType x_type) { return is_half(x_type) ? at::kFloat : x_type; }

// Whether this build has machine code (or PTX the driver can compile) for the GPU `device` holds. Asked of
// the runtime for one kernel, so it follows whatever TORCH_CUDA_ARCH_LIST the extension was built with;
// cached per device. The capability is the tensor's device's own, not the current device's.
void check_kernel_image(const char* op, const at::Device& device) {
  static std::array<std::atomic<int>, 256> verdict{};  // 0 unknown, 1 runs, 2 no image
  const auto index = static_cast<size_t>(device.index());
  if (index < verdict.size() && verdict[index].load(std::memory_order_relaxed) == 1) return;
  const c10::cuda::CUDAGuard guard(device);
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, mira_cuda::mira_offsets_kernel);
  if (status == cudaSuccess) {
    if (index < verdict.size()) verdict[index].store(1, std::memory_order_relaxed);
    return;
  }
  (void)cudaGetLastError();  // clear this (non-sticky) error: the next launch check must not report it
  int major = 0, minor = 0;
  (void)cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index());
  (void)cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device.index());
  const std::string capability = std::to_string(major) + "." + std::to_string(minor);  // no ostream << int: below
  TORCH_CHECK(false, op, ": this build of the cuda backend has no kernel image for ", device, " (compute capability ",
              capability, "): ", cudaGetErrorString(status), ". Rebuild with TORCH_CUDA_ARCH_LIST including ",
              capability, ", or use another backend (mira_kernels.use_backend('triton' or 'reference')).");
}

// The problem's sizes, from the shapes alone: no device access, no allocation, no copy. The arguments have
// passed the op contract's checks (csrc/validation.h, run first by every op here; among them, that slices
// do not overlap, so no two threads read-modify-write one output element).
Dims dims_of(const at::Tensor& x, const at::Tensor& keys, const at::Tensor& bank_a, const at::Tensor& bank_b) {
  return Dims{x.size(0), x.size(1), x.size(2), keys.size(0), keys.size(1), bank_a.size(1), bank_a.size(2),
              bank_b.size(2)};
}

// This backend's device: a CUDA tensor, on a GPU this build has code for.
void check_device(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  check_kernel_image(op, x.device());
}

// The sizes for an error message, formatted without `ostream << int64_t`. On the H200 image (torch 2.11,
// nvcc 13.0, 2026-12-04) a TORCH_CHECK message with integer arguments, built in this nvcc-compiled file,
// crashed the process (SIGSEGV in a std::ostream::_M_insert<long> instantiated inside _C.so, likely a
// local copy of the num_put facet's id), while messages of strings alone raised normally.
std::string sizes_text(const Dims& d) {
  const auto s = [](int64_t v) { return std::to_string(v); };
  return "(B = " + s(d.B) + ", T = " + s(d.T) + ", N = " + s(d.N) + ", d_k = " + s(d.d_k) + ", S = " + s(d.S) +
         ", r = " + s(d.r) + ", d_in = " + s(d.d_in) + ", d_s = " + s(d.d_s) + ")";
}

// Raises when a launch of the call would exceed a CUDA limit (a grid above 2^31 - 1 blocks). Size arithmetic
// only (int64; no product in the plan comes near 2^63 for tensors that exist), so every op runs it right
// after the contract's checks, before it touches the device: the base GEMM, `.contiguous()` of an expanded
// x and every allocation come after. Also what lets tests/test_cuda_glue.py check it on CPU tensors.
void check_launches(const char* op, const Dims& d, at::ScalarType x_type, bool backward,
                    const std::array<bool, 5>& mask) {
  const char* too_big = mira_cuda::size_error(d);  // first: plan_workspace multiplies these sizes
  TORCH_CHECK(too_big == nullptr, op, ": the problem is too large for the cuda backend: ", too_big, " ",
              sizes_text(d));
  const bool dbl = x_type == at::kDouble;
  const bool memory_grads = mask[1] || mask[2] || mask[3] || mask[4];
  const Workspace ws = dbl ? mira_cuda::plan_workspace<double>(d, backward, memory_grads, mira_cuda::kSmemBudget)
                           : mira_cuda::plan_workspace<float>(d, backward, memory_grads, mira_cuda::kSmemBudget);
  const int64_t acc = dbl ? 8 : 4;
  const auto list = backward ? mira_cuda::backward_launches(d, ws, acc, mask[0], mask[1], mask[2], mask[3], mask[4])
                             : mira_cuda::adapter_launches(d, ws, acc);
  const char* why = mira_cuda::grid_error(list);
  TORCH_CHECK(why == nullptr, op, ": the problem is too large for the cuda backend's launches: ", why, " ",
              sizes_text(d));
}

// The memory side in the compute dtype, contiguous (no copy in the usual case: already so).
at::Tensor memory_operand(const at::Tensor& t, at::ScalarType ct) { return t.to(ct).contiguous(); }

template <typename acc_t>
Workspace workspace_for(const Dims& d, bool backward, bool memory_grads) {
  return mira_cuda::plan_workspace<acc_t>(d, backward, memory_grads, mira_cuda::kSmemBudget);
}

// out[..., slices] += adapter(x), in place; out (B, T, d_out) may be strided.
void adapter_inplace(at::Tensor& out, const at::Tensor& x_in, const at::Tensor& query, const at::Tensor& keys,
                     const at::Tensor& bank_a, const at::Tensor& bank_b, const Dims& d, at::IntArrayRef offsets,
                     int sep, double scale, double eps) {
  const auto ct = compute_type(x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor q = memory_operand(query, ct), k = memory_operand(keys, ct);
  const at::Tensor ba = memory_operand(bank_a, ct), bb = memory_operand(bank_b, ct);
  const auto stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mira_adapter_cuda", [&] {
    using dev_t = typename DeviceType<scalar_t>::type;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const Workspace ws = workspace_for<acc_t>(d, false, false);
    at::Tensor work = at::empty({ws.total}, x.options().dtype(ct));
    CallBuffers<dev_t, acc_t> cb{};
    cb.x = reinterpret_cast<const dev_t*>(x.const_data_ptr<scalar_t>());
    cb.out = reinterpret_cast<dev_t*>(out.mutable_data_ptr<scalar_t>());
    cb.out_sb = out.stride(0), cb.out_st = out.stride(1), cb.out_se = out.stride(2);
    cb.query = q.const_data_ptr<acc_t>(), cb.keys = k.const_data_ptr<acc_t>();
    cb.bank_a = ba.const_data_ptr<acc_t>(), cb.bank_b = bb.const_data_ptr<acc_t>();
    cb.ws = work.mutable_data_ptr<acc_t>();
    mira_cuda::launch_adapter<dev_t, acc_t>(d, offsets.data(), sep, scale, eps, cb, ws, stream.stream());
  });
}

at::Tensor mira_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& query, const at::Tensor& keys, const at::Tensor& bank_a,
                            const at::Tensor& bank_b, at::IntArrayRef slice_offsets, c10::string_view separation,
                            double scale, double eps) {
  mira::check_linear_args(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps);
  const Dims d = dims_of(x, keys, bank_a, bank_b);
  check_launches("mira_linear (cuda)", d, x.scalar_type(), false, {});
  check_device("mira_linear (cuda)", x);
  const int sep = separation_code(std::string(separation));
  const c10::cuda::CUDAGuard guard(x.device());
  // Base projection in x's dtype, as F.linear; the adapter then adds into its slices in place, in the
  // compute dtype, rounding each element once.
  at::Tensor y = at::linear(x, weight, bias).contiguous();
  adapter_inplace(y, x, query, keys, bank_a, bank_b, d, slice_offsets, sep, scale, eps);
  return y;
}

void mira_adapter_cuda(const at::Tensor& out, const at::Tensor& x, const at::Tensor& query, const at::Tensor& keys,
                       const at::Tensor& bank_a, const at::Tensor& bank_b, at::IntArrayRef slice_offsets,
                       c10::string_view separation, double scale, double eps) {
  mira::check_adapter_args(out, x, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps);
  const Dims d = dims_of(x, keys, bank_a, bank_b);
  check_launches("mira_adapter_ (cuda)", d, x.scalar_type(), false, {});
  check_device("mira_adapter_ (cuda)", x);
  const int sep = separation_code(std::string(separation));
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor target = out;  // strided writes go straight into out's storage
  adapter_inplace(target, x, query, keys, bank_a, bank_b, d, slice_offsets, sep, scale, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mira_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& bank_a, const at::Tensor& bank_b, at::IntArrayRef slice_offsets,
    c10::string_view separation, double scale, double eps, std::array<bool, 5> output_mask) {
  mira::check_linear_backward_args(grad_out, x_in, weight, query, keys, bank_a, bank_b, slice_offsets, separation,
                                   scale, eps);
  const Dims d = dims_of(x_in, keys, bank_a, bank_b);
  check_launches("mira_linear_backward (cuda)", d, x_in.scalar_type(), true, output_mask);
  check_device("mira_linear_backward (cuda)", x_in);
  const int sep = separation_code(std::string(separation));
  const auto [need_x, need_q, need_k, need_a, need_b] = output_mask;
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto stream = c10::cuda::getCurrentCUDAStream(x_in.device().index());
  const auto ct = compute_type(x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor q = memory_operand(query, ct), k = memory_operand(keys, ct);
  const at::Tensor ba = memory_operand(bank_a, ct), bb = memory_operand(bank_b, ct);
  const auto acc_opts = x.options().dtype(ct);
  // A gradient not asked for is an empty tensor, a distinct one per output (outputs must not alias).
  const auto none = [&x] { return at::empty({0}, x.options()); };

  // dx starts as G W in x's dtype (as the reference's grad_out @ weight); the kernels add the adapter part.
  at::Tensor dx = need_x ? at::matmul(grad_out, weight).contiguous() : none();
  // The memory gradients: written in full by the launches, except over an empty batch or an empty memory, where
  // no memory kernel runs and they are zero (caller_zeroes_memory_grads); at::empty there returned whatever the
  // allocator's block held.
  const bool zeroed = mira_cuda::caller_zeroes_memory_grads(d);
  const auto grad = [&](at::IntArrayRef shape) {
    return zeroed ? at::zeros(shape, acc_opts) : at::empty(shape, acc_opts);
  };
  at::Tensor dq = need_q ? grad({d.B, d.d_k}) : none();
  at::Tensor dk = need_k ? grad({d.N, d.d_k}) : none();
  at::Tensor dba = need_a ? grad({d.N, d.S, d.r, d.d_in}) : none();
  at::Tensor dbb = need_b ? grad({d.N, d.S, d.d_s, d.r}) : none();
  const bool memory_grads = need_q || need_k || need_a || need_b;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mira_linear_backward_cuda", [&] {
    using dev_t = typename DeviceType<scalar_t>::type;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const Workspace ws = workspace_for<acc_t>(d, true, memory_grads);
    at::Tensor work = at::empty({ws.total}, acc_opts);
    CallBuffers<dev_t, acc_t> cb{};
    cb.x = reinterpret_cast<const dev_t*>(x.const_data_ptr<scalar_t>());
    cb.grad = reinterpret_cast<const dev_t*>(grad_out.const_data_ptr<scalar_t>());
    cb.g_sb = grad_out.stride(0), cb.g_st = grad_out.stride(1), cb.g_se = grad_out.stride(2);
    cb.dx = need_x ? reinterpret_cast<dev_t*>(dx.mutable_data_ptr<scalar_t>()) : nullptr;
    cb.query = q.const_data_ptr<acc_t>(), cb.keys = k.const_data_ptr<acc_t>();
    cb.bank_a = ba.const_data_ptr<acc_t>(), cb.bank_b = bb.const_data_ptr<acc_t>();
    cb.dq = need_q ? dq.mutable_data_ptr<acc_t>() : nullptr;
    cb.dk = need_k ? dk.mutable_data_ptr<acc_t>() : nullptr;
    cb.dbank_a = need_a ? dba.mutable_data_ptr<acc_t>() : nullptr;
    cb.dbank_b = need_b ? dbb.mutable_data_ptr<acc_t>() : nullptr;
    cb.ws = work.mutable_data_ptr<acc_t>();
    mira_cuda::launch_backward<dev_t, acc_t>(d, slice_offsets.data(), sep, scale, eps, cb, ws, need_q, need_k, need_a,
                                             need_b, stream.stream());
  });
  // Each gradient in its input's dtype (a no-op unless the memory side came in 16-bit).
  if (need_q) dq = dq.to(query.scalar_type());
  if (need_k) dk = dk.to(keys.scalar_type());
  if (need_a) dba = dba.to(bank_a.scalar_type());
  if (need_b) dbb = dbb.to(bank_b.scalar_type());
  return {dx, dq, dk, dba, dbb};
}

}  // namespace

// The virtual architectures this build carries code for (nvcc's __CUDA_ARCH_LIST__, e.g. {800, 900}): the
// router (mira_kernels/backends.py) compares a device's capability with it, without launching anything.
std::vector<int64_t> cuda_arch_list() { return {__CUDA_ARCH_LIST__}; }

TORCH_LIBRARY_FRAGMENT(mira, m) { m.def("_cuda_arch_list() -> int[]", &cuda_arch_list); }

TORCH_LIBRARY_IMPL(mira, CUDA, m) {
  m.impl("_cuda_mira_linear", &mira_linear_cuda);
  m.impl("_cuda_mira_linear_backward", &mira_linear_backward_cuda);
  m.impl("_cuda_mira_adapter_", &mira_adapter_cuda);
}
