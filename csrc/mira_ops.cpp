// Op schemas of mira_kernels, declared once, and the routing of the public ops.
//   public ops (mira_linear, mira_linear_backward, mira_adapter_): the wrappers in
//     mira_kernels/ops.py resolve a backend name and pass it as `backend`. The CPU and CUDA
//     kernels below send a call naming that key's native backend straight to its private op;
//     any other name ("auto", "reference", "triton") goes to the _routed_* op of the same
//     signature, whose kernels are the Python router in mira_kernels/ops.py.
//   private backend ops (_cpu_*, _cuda_*): the C++ kernels in csrc/cpu/ and csrc/cuda/, with the
//     same arguments minus `backend`.
//   Every eager call is checked once, in C++, with the checks of validation.h: by the native
//     private op itself, or by the public kernel before it hands the call to the Python router.
// Why the native call does not pass through the Python router: the round trip dispatcher ->
// Python -> dispatcher measured +0.3..0.6% of a ViT-B/16 qkv projection at B = 8 in interleaved
// runs (benchmarks/results/op_cpu.md), a third of the adapter's whole budget.
// The contract (shapes, dtypes, semantics) is docs/contract.md.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>

#include <string>

#include "cpu/fast_path.h"
#include "eval_plan.h"
#include "validation.h"

// `import mira_kernels._C` loads this library, whose static initialisers register the ops.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, mira_cpu::fast_path_methods()};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && mira::add_eval_plan_type(module) < 0) Py_CLEAR(module);
  return module;
}

namespace {
constexpr const char* kLinearArgs =
    "Tensor x, Tensor weight, Tensor? bias, Tensor query, Tensor keys, Tensor bank_a, Tensor bank_b, "
    "int[] slice_offsets, str separation, float scale, float eps";
constexpr const char* kLinearBackwardArgs =
    "Tensor grad_out, Tensor x, Tensor weight, Tensor query, Tensor keys, Tensor bank_a, Tensor bank_b, "
    "int[] slice_offsets, str separation, float scale, float eps, bool[5] output_mask";
constexpr const char* kAdapterArgs =
    "Tensor(a!) out, Tensor x, Tensor query, Tensor keys, Tensor bank_a, Tensor bank_b, "
    "int[] slice_offsets, str separation, float scale, float eps";
constexpr const char* kGrads = "(Tensor, Tensor, Tensor, Tensor, Tensor)";

std::string schema(const char* name, const char* args, const char* extra, const char* ret) {
  return std::string(name) + "(" + args + extra + ") -> " + ret;
}
}  // namespace

TORCH_LIBRARY(mira, m) {
  m.set_python_module("mira_kernels.ops");
  // Public ops. `backend` is resolved by the Python wrappers ("auto" resolves at call time).
  m.def(schema("mira_linear", kLinearArgs, ", str backend=\"auto\"", "Tensor").c_str());
  m.def(schema("mira_linear_backward", kLinearBackwardArgs, ", str backend=\"auto\"", kGrads).c_str());
  m.def(schema("mira_adapter_", kAdapterArgs, ", str backend=\"auto\"", "()").c_str());
  // The Python router, for every backend name the C++ routing below does not take itself.
  m.def(schema("_routed_mira_linear", kLinearArgs, ", str backend=\"auto\"", "Tensor").c_str());
  m.def(schema("_routed_mira_linear_backward", kLinearBackwardArgs, ", str backend=\"auto\"", kGrads).c_str());
  m.def(schema("_routed_mira_adapter_", kAdapterArgs, ", str backend=\"auto\"", "()").c_str());
  // Private backend ops.
  for (const char* prefix : {"_cpu_", "_cuda_"}) {
    const std::string p(prefix);
    m.def(schema((p + "mira_linear").c_str(), kLinearArgs, "", "Tensor").c_str());
    m.def(schema((p + "mira_linear_backward").c_str(), kLinearBackwardArgs, "", kGrads).c_str());
    m.def(schema((p + "mira_adapter_").c_str(), kAdapterArgs, "", "()").c_str());
  }
}

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using LinearFn = Tensor(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, c10::IntArrayRef, c10::string_view, double, double);
using LinearBackwardFn = Grads(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                               const Tensor&, const Tensor&, c10::IntArrayRef, c10::string_view, double, double,
                               std::array<bool, 5>);
using AdapterFn = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                       c10::IntArrayRef, c10::string_view, double, double);
// The public signatures: the same plus `backend`.
template <class Fn>
struct WithBackend;
template <class R, class... A>
struct WithBackend<R(A...)> {
  using type = R(A..., c10::string_view);
};

// The native backend of each dispatch key.
struct CpuKey {
  static constexpr const char* backend = "cpu";
  static constexpr const char* prefix = "_cpu_";
  static constexpr c10::DispatchKey key = c10::DispatchKey::CPU;
};
struct CudaKey {
  static constexpr const char* backend = "cuda";
  static constexpr const char* prefix = "_cuda_";
  static constexpr c10::DispatchKey key = c10::DispatchKey::CUDA;
};

// The typed handle of mira::<name>, looked up in the dispatcher.
template <class F>
c10::TypedOperatorHandle<F> op_handle(const std::string& name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(("mira::" + name).c_str(), "").template typed<F>();
}

// The routing of one public op on one dispatch key: its native private op (absent when this
// build has no kernel for it; the Python router then explains why) and its _routed_ twin, both
// looked up once. Fn is the private signature; the public one appends `backend`.
template <class Key, class Fn>
class Router {
 public:
  explicit Router(const char* op)
      : native_(native_handle(std::string(Key::prefix) + op)),
        routed_(op_handle<typename WithBackend<Fn>::type>(std::string("_routed_") + op)) {}

  // Whether `backend` goes to the native op, which checks its own arguments.
  bool native(c10::string_view backend) const { return native_ && backend == Key::backend; }

  template <class... Args>
  decltype(auto) operator()(c10::string_view backend, const Args&... args) const {
    if (native(backend)) return native_->call(args...);
    return routed_.call(args..., backend);
  }

 private:
  static std::optional<c10::TypedOperatorHandle<Fn>> native_handle(const std::string& name) {
    auto typed = op_handle<Fn>(name);
    if (!typed.hasKernelForDispatchKey(Key::key)) return std::nullopt;
    return typed;
  }
  std::optional<c10::TypedOperatorHandle<Fn>> native_;
  c10::TypedOperatorHandle<typename WithBackend<Fn>::type> routed_;
};

// The kernels. A call for the Python router is checked here first (validation.h); a native call
// is checked by the native op. Each op's Router is built on its first call, after every library
// has registered.
template <class Key>
Tensor linear(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& query, const Tensor& keys,
              const Tensor& bank_a, const Tensor& bank_b, c10::IntArrayRef offsets, c10::string_view separation,
              double scale, double eps, c10::string_view backend) {
  static const Router<Key, LinearFn> route("mira_linear");
  if (!route.native(backend))
    mira::check_linear_args(x, weight, bias, query, keys, bank_a, bank_b, offsets, separation, scale, eps);
  return route(backend, x, weight, bias, query, keys, bank_a, bank_b, offsets, separation, scale, eps);
}

template <class Key>
Grads linear_backward(const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& query,
                      const Tensor& keys, const Tensor& bank_a, const Tensor& bank_b, c10::IntArrayRef offsets,
                      c10::string_view separation, double scale, double eps, std::array<bool, 5> mask,
                      c10::string_view backend) {
  static const Router<Key, LinearBackwardFn> route("mira_linear_backward");
  if (!route.native(backend))
    mira::check_linear_backward_args(grad_out, x, weight, query, keys, bank_a, bank_b, offsets, separation, scale,
                                     eps);
  return route(backend, grad_out, x, weight, query, keys, bank_a, bank_b, offsets, separation, scale, eps, mask);
}

template <class Key>
void adapter(const Tensor& out, const Tensor& x, const Tensor& query, const Tensor& keys, const Tensor& bank_a,
             const Tensor& bank_b, c10::IntArrayRef offsets, c10::string_view separation, double scale, double eps,
             c10::string_view backend) {
  static const Router<Key, AdapterFn> route("mira_adapter_");
  if (!route.native(backend))
    mira::check_adapter_args(out, x, query, keys, bank_a, bank_b, offsets, separation, scale, eps);
  route(backend, out, x, query, keys, bank_a, bank_b, offsets, separation, scale, eps);
}

// ---------------------------------------------------------------------------------------------
// Autograd of mira_linear (contract section 5): one backward op returns every gradient. The
// forward saves only its inputs; the backward recomputes what it needs.
// In C++ rather than torch.library.register_autograd: that Python kernel runs on every call
// made with grad mode on (also under torch.no_grad(), where it only redispatches), ~35 us per
// call with the caches cold after a GEMM (benchmarks/results/op_cpu.md).
// ---------------------------------------------------------------------------------------------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class MiraLinearFunction : public torch::autograd::Function<MiraLinearFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                        const Tensor& query, const Tensor& keys, const Tensor& bank_a, const Tensor& bank_b,
                        c10::IntArrayRef offsets, c10::string_view separation, double scale, double eps,
                        c10::string_view backend) {
    ctx->save_for_backward({x, weight, query, keys, bank_a, bank_b});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["offsets"] = offsets.vec();
    ctx->saved_data["separation"] = std::string(separation);
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["backend"] = std::string(backend);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = op_handle<WithBackend<LinearFn>::type>("mira_linear");
    return op.call(x, weight, bias, query, keys, bank_a, bank_b, offsets, separation, scale, eps, backend);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto& d = ctx->saved_data;
    // needs_input_grad counts the tensor arguments that were given (its edges), so without a bias
    // every argument after it moves down by one; the gradients returned count every argument.
    const bool has_bias = d.at("has_bias").toBool();
    const auto needs = [&](size_t arg) { return ctx->needs_input_grad(has_bias || arg < 2 ? arg : arg - 1); };
    TORCH_CHECK(!needs(1) && !(has_bias && needs(2)),
                "mira_linear: weight and bias are the frozen base projection and get no gradient; "
                "call weight.requires_grad_(False) (and bias) or use a plain nn.Linear to train them");
    const variable_list saved = ctx->get_saved_variables();
    // Gradients of x, query, keys, bank_a, bank_b: forward arguments 0, 3, 4, 5, 6.
    constexpr std::array<size_t, 5> kArg = {0, 3, 4, 5, 6};
    std::array<bool, 5> mask{};
    for (size_t i = 0; i < kArg.size(); ++i) mask[i] = needs(kArg[i]);
    static const auto op = op_handle<WithBackend<LinearBackwardFn>::type>("mira_linear_backward");
    const std::vector<int64_t> offsets = d.at("offsets").toIntVector();
    const std::string separation = d.at("separation").toStringRef(), backend = d.at("backend").toStringRef();
    const auto grads = op.call(grad_outputs[0].contiguous(), saved[0], saved[1], saved[2], saved[3], saved[4],
                               saved[5], offsets, separation, d.at("scale").toDouble(), d.at("eps").toDouble(), mask,
                               backend);
    const std::array<Tensor, 5> g = {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads), std::get<3>(grads),
                                     std::get<4>(grads)};
    variable_list out(12);  // one entry per forward argument; undefined = no gradient
    for (size_t i = 0; i < kArg.size(); ++i)
      if (mask[i]) out[kArg[i]] = g[i];
    return out;
  }
};

// The backward op's own autograd: double backward is not supported (contract section 5), so
// differentiating a gradient of mira_linear raises. Without this the dispatcher's fallback for
// ops without an autograd kernel warned and returned zeros. Only differentiating raises: a
// backward run with create_graph=True whose gradients are not differentiated again works.
class MiraLinearBackwardFunction : public torch::autograd::Function<MiraLinearBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                               const Tensor& query, const Tensor& keys, const Tensor& bank_a, const Tensor& bank_b,
                               c10::IntArrayRef offsets, c10::string_view separation, double scale, double eps,
                               std::array<bool, 5> mask, c10::string_view backend) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = op_handle<WithBackend<LinearBackwardFn>::type>("mira_linear_backward");
    const auto g = op.call(grad_out, x, weight, query, keys, bank_a, bank_b, offsets, separation, scale, eps, mask,
                           backend);
    return {std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g), std::get<4>(g)};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "mira_linear: double backward is not supported (a gradient of mira_linear was differentiated "
                "again, e.g. torch.autograd.grad(..., create_graph=True) followed by a second backward); use the "
                "reference backend's plain PyTorch functions (mira_kernels.reference) for higher derivatives");
  }
};

Grads linear_backward_autograd(const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& query,
                               const Tensor& keys, const Tensor& bank_a, const Tensor& bank_b,
                               c10::IntArrayRef offsets, c10::string_view separation, double scale, double eps,
                               std::array<bool, 5> mask, c10::string_view backend) {
  const variable_list g = MiraLinearBackwardFunction::apply(grad_out, x, weight, query, keys, bank_a, bank_b, offsets,
                                                            separation, scale, eps, mask, backend);
  return {g[0], g[1], g[2], g[3], g[4]};
}

Tensor linear_autograd(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& query,
                       const Tensor& keys, const Tensor& bank_a, const Tensor& bank_b, c10::IntArrayRef offsets,
                       c10::string_view separation, double scale, double eps, c10::string_view backend) {
  return MiraLinearFunction::apply(x, weight, bias, query, keys, bank_a, bank_b, offsets, separation, scale, eps,
                                   backend);
}

// mira_adapter_ writes into `out` (schema `Tensor(a!) out`): like every in-place op, bump its
// version counter, so that autograd refuses a backward that saved `out` before this call (PyTorch's
// "modified by an inplace operation"), and an inference tensor is refused outside inference mode.
// Without this kernel the CPU and CUDA kernels changed `out` silently and such a backward used the
// new values (the reference backend, made of ATen in-place ops, already bumped it).
void adapter_inplace_or_view(const Tensor& out, const Tensor& x, const Tensor& query, const Tensor& keys,
                             const Tensor& bank_a, const Tensor& bank_b, c10::IntArrayRef offsets,
                             c10::string_view separation, double scale, double eps, c10::string_view backend) {
  // bump_version below refuses an inference tensor outside inference mode, but only after the kernel
  // has written it: refused here first, for every caller (the Python wrapper checks eagerly; a
  // compiled graph or a direct torch.ops call reaches only this kernel).
  TORCH_CHECK(!out.is_inference() || c10::InferenceMode::is_enabled(),
              "mira_adapter_: out is an inference tensor (made under torch.inference_mode()), which cannot be "
              "updated in place outside inference mode; call it under torch.inference_mode(), or pass out.clone()");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = op_handle<WithBackend<AdapterFn>::type>("mira_adapter_");
    op.call(out, x, query, keys, bank_a, bank_b, offsets, separation, scale, eps, backend);
  }
  out.unsafeGetTensorImpl()->bump_version();  // what torch::autograd::increment_version does
}

}  // namespace

TORCH_LIBRARY_IMPL(mira, ADInplaceOrView, m) {
  m.impl("mira_adapter_", &adapter_inplace_or_view);
}

TORCH_LIBRARY_IMPL(mira, Autograd, m) {
  m.impl("mira_linear", &linear_autograd);
  m.impl("mira_linear_backward", &linear_backward_autograd);
}

TORCH_LIBRARY_IMPL(mira, CPU, m) {
  m.impl("mira_linear", &linear<CpuKey>);
  m.impl("mira_linear_backward", &linear_backward<CpuKey>);
  m.impl("mira_adapter_", &adapter<CpuKey>);
}

TORCH_LIBRARY_IMPL(mira, CUDA, m) {
  m.impl("mira_linear", &linear<CudaKey>);
  m.impl("mira_linear_backward", &linear_backward<CudaKey>);
  m.impl("mira_adapter_", &adapter<CudaKey>);
}
