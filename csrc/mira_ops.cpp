// Op schemas of mira_kernels, declared once. Backends register kernels per dispatch key:
//   public ops (mira_linear, mira_linear_backward, mira_adapter_): one routing kernel per key,
//     registered from Python (mira_kernels/ops.py), which picks a backend by the `backend` name;
//   private backend ops (_cpu_*, _cuda_*): the C++ kernels in csrc/cpu/ and csrc/cuda/, with the
//     same arguments minus `backend`, called by that router.
// The contract (shapes, dtypes, semantics) is docs/contract.md.
#include <Python.h>
#include <torch/library.h>

#include <string>

// `import mira_kernels._C` loads this library, whose static initialisers register the ops.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
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
  // Private backend ops.
  for (const char* prefix : {"_cpu_", "_cuda_"}) {
    const std::string p(prefix);
    m.def(schema((p + "mira_linear").c_str(), kLinearArgs, "", "Tensor").c_str());
    m.def(schema((p + "mira_linear_backward").c_str(), kLinearBackwardArgs, "", kGrads).c_str());
    m.def(schema((p + "mira_adapter_").c_str(), kAdapterArgs, "", "()").c_str());
  }
}
