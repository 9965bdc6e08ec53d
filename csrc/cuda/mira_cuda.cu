// CUDA backend of the MIRA ops: mira::_cuda_mira_linear, _cuda_mira_linear_backward, _cuda_mira_adapter_.
//
// The kernels and the launch plan are in mira_kernels.cuh (also run on the CPU by the SIMT emulation in
// tests/cuda_emu). This file is the ATen glue: argument checks, device guard, current stream, dtype
// dispatch, allocation of outputs and one workspace, and the base GEMMs, which go through ATen
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
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <vector>

#define MIRA_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()
#include "mira_kernels.cuh"

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

// Checks the shared contract (docs/contract.md) on metadata, and returns the problem's sizes.
Dims check_inputs(const char* op, const at::Tensor& x, const at::Tensor& query, const at::Tensor& keys,
                  const at::Tensor& bank_a, const at::Tensor& bank_b, at::IntArrayRef offsets, int64_t d_out,
                  double eps, double scale) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, op, ": x must have shape (B, T, d_in), got ", x.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kDouble || is_half(xt), op,
              ": x must be float32, float64, float16 or bfloat16, got ", xt);
  TORCH_CHECK(query.dim() == 2 && keys.dim() == 2, op, ": query (B, d_k) and keys (N, d_k) must be 2-D, got ",
              query.sizes(), " and ", keys.sizes());
  TORCH_CHECK(bank_a.dim() == 4 && bank_b.dim() == 4, op, ": bank_a (N, S, r, d_in) and bank_b (N, S, d_s, r) must be 4-D");
  const Dims d{x.size(0), x.size(1), x.size(2), keys.size(0), keys.size(1), bank_a.size(1), bank_a.size(2),
               bank_b.size(2)};
  TORCH_CHECK(query.size(0) == d.B && query.size(1) == d.d_k, op, ": query must be (B, d_k) = (", d.B, ", ", d.d_k,
              "), got ", query.sizes());
  TORCH_CHECK(bank_a.size(0) == d.N && bank_a.size(3) == d.d_in, op, ": bank_a must be (N, S, r, d_in) with N = ",
              d.N, ", d_in = ", d.d_in, ", got ", bank_a.sizes());
  TORCH_CHECK(bank_b.size(0) == d.N && bank_b.size(1) == d.S && bank_b.size(3) == d.r, op,
              ": bank_b must be (N, S, d_s, r) = (", d.N, ", ", d.S, ", d_s, ", d.r, "), got ", bank_b.sizes());
  TORCH_CHECK(d.S >= 1 && d.r >= 1, op, ": bank_a must have S >= 1 and r >= 1, got ", bank_a.sizes());
  TORCH_CHECK(d.S <= mira_cuda::kMaxSlices, op, ": the cuda backend supports at most ", mira_cuda::kMaxSlices,
              " slices, got S = ", d.S);
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == d.S, op, ": slice_offsets has ", offsets.size(),
              " entries, S = ", d.S);
  for (int64_t off : offsets)
    TORCH_CHECK(off >= 0 && off + d.d_s <= d_out, op, ": slice [", off, ", ", off + d.d_s, ") must fit in d_out = ", d_out);
  // Overlapping slices would have two threads read-modify-write one output element.
  std::vector<int64_t> sorted(offsets.begin(), offsets.end());
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 1; i < sorted.size(); ++i)
    TORCH_CHECK(sorted[i] >= sorted[i - 1] + d.d_s, op, ": slice_offsets ", offsets, " overlap for d_s = ", d.d_s);
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  for (const at::Tensor* t : {&query, &keys, &bank_a, &bank_b}) {
    TORCH_CHECK(t->device() == x.device(), op, ": all inputs must be on ", x.device(), ", got one on ", t->device());
    const auto tt = t->scalar_type();
    TORCH_CHECK(tt == xt || (is_half(xt) && tt == at::kFloat), op, ": query/keys/banks must have x's dtype (", xt,
                ") or float32 for 16-bit x, got ", tt);
  }
  return d;
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
  TORCH_CHECK(weight.dim() == 2 && x.dim() == 3 && weight.size(1) == x.size(2),
              "mira_linear (cuda): weight must be (d_out, d_in) with d_in = x.size(2)");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(),
              "mira_linear (cuda): weight must share x's dtype and device");
  const Dims d = check_inputs("mira_linear (cuda)", x, query, keys, bank_a, bank_b, slice_offsets, weight.size(0),
                              eps, scale);
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
  TORCH_CHECK(out.dim() == 3 && x.dim() == 3 && out.size(0) == x.size(0) && out.size(1) == x.size(1),
              "mira_adapter_ (cuda): out must be (B, T, d_out) with x's B and T, got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.device() == x.device(),
              "mira_adapter_ (cuda): out must share x's dtype and device");
  const Dims d = check_inputs("mira_adapter_ (cuda)", x, query, keys, bank_a, bank_b, slice_offsets, out.size(2), eps,
                              scale);
  const int sep = separation_code(std::string(separation));
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor target = out;  // strided writes go straight into out's storage
  adapter_inplace(target, x, query, keys, bank_a, bank_b, d, slice_offsets, sep, scale, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mira_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& bank_a, const at::Tensor& bank_b, at::IntArrayRef slice_offsets,
    c10::string_view separation, double scale, double eps, std::array<bool, 5> output_mask) {
  TORCH_CHECK(weight.dim() == 2 && x_in.dim() == 3 && weight.size(1) == x_in.size(2),
              "mira_linear_backward (cuda): weight must be (d_out, d_in) with d_in = x.size(2)");
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == x_in.size(0) && grad_out.size(1) == x_in.size(1) &&
                  grad_out.size(2) == weight.size(0),
              "mira_linear_backward (cuda): grad_out must be (B, T, d_out), got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x_in.scalar_type() && weight.scalar_type() == x_in.scalar_type() &&
                  grad_out.device() == x_in.device() && weight.device() == x_in.device(),
              "mira_linear_backward (cuda): grad_out and weight must share x's dtype and device");
  const Dims d = check_inputs("mira_linear_backward (cuda)", x_in, query, keys, bank_a, bank_b, slice_offsets,
                              weight.size(0), eps, scale);
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
  at::Tensor dq = need_q ? at::empty({d.B, d.d_k}, acc_opts) : none();
  at::Tensor dk = need_k ? at::empty({d.N, d.d_k}, acc_opts) : none();
  at::Tensor dba = need_a ? at::empty({d.N, d.S, d.r, d.d_in}, acc_opts) : none();
  at::Tensor dbb = need_b ? at::empty({d.N, d.S, d.d_s, d.r}, acc_opts) : none();
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

TORCH_LIBRARY_IMPL(mira, CUDA, m) {
  m.impl("_cuda_mira_linear", &mira_linear_cuda);
  m.impl("_cuda_mira_linear_backward", &mira_linear_backward_cuda);
  m.impl("_cuda_mira_adapter_", &mira_adapter_cuda);
}
