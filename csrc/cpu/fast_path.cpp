// The eval fast path of the CPU forward: mira_kernels._C._cpu_eval_linear, a direct CPython binding
// of the same kernel the dispatcher calls (mira_linear_cpu), for the calls where the dispatcher has
// nothing to add: plain CPU tensors, no autograd graph to record, no autocast, no Python dispatch or
// torch-function mode, no dispatch keys beyond the dense CPU ones. Anything else gets None back and
// the caller takes the op (mira_kernels/ops.py, eval_linear_cpu).
//
// Why: a MIRA projection inside a network runs right after large GEMMs that have evicted the
// interpreter's caches, and there the boxed custom-op call (torch.ops -> IValue stack -> dispatcher)
// measured ~80 us more than F.linear at a tiny shape, on a 2-core Zen 3 (benchmarks/budget.py): as
// much as the whole 0.4% budget of a ViT-B/16 qkv projection at batch 1. This binding parses its
// arguments as F.linear's does and calls the kernel, which checks them (csrc/validation.h). An
// _EvalPlan (csrc/eval_plan.cpp) has the arguments other than x parsed once (eval_prepared).
//
// The query may be given as a token index i instead of a tensor: query = x[:, i], the CLS-token
// query of an identity query module, taken here so that it costs no Python-level op either.
#include <Python.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/csrc/autograd/python_variable.h>

#include <exception>
#include <optional>
#include <string_view>
#include <vector>

#include "cpu/fast_path.h"

namespace mira_cpu {
namespace {

// A tensor argument the kernel may take directly: an exact Tensor or Parameter (no
// __torch_function__), on the CPU, whose dispatch keys are only the dense CPU ones.
std::optional<at::Tensor> plain_cpu(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return std::nullopt;  // Tensor or Parameter, not a subclass
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || !t.device().is_cpu() || t.layout() != c10::kStrided) return std::nullopt;
  for (const c10::DispatchKey k : t.key_set()) {
    if (k != c10::DispatchKey::CPU && k != c10::DispatchKey::AutogradCPU && k != c10::DispatchKey::ADInplaceOrView &&
        k != c10::DispatchKey::AutocastCPU)
      return std::nullopt;  // Python, functorch, conjugate/negative views, sparse, ...
  }
  return t;
}

// x[:, token] as a plain strided alias of x's storage, made without the dispatcher. Why: select()
// is a dispatched view op (with autograd's view metadata), and cold, as a projection runs in a
// network, it took 6.2-7.1 us of the ~15 us this function spends before the kernel (Zen 4, B = 1,
// timestamps here, benchmarks.budget's cold caches); this takes 1.1. The alias has no autograd or
// view metadata, which is right here: this path runs only where no graph is recorded, and the
// kernel only reads the query.
at::Tensor token_rows(const at::Tensor& x, int64_t token) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(x.storage()), x.key_set(), x.dtype());
  const int64_t sizes[2] = {x.size(0), x.size(2)}, strides[2] = {x.stride(0), x.stride(2)};
  impl->set_sizes_and_strides(c10::IntArrayRef(sizes), c10::IntArrayRef(strides),
                              std::optional<int64_t>(x.storage_offset() + token * x.stride(1)));
  return at::Tensor(std::move(impl));
}

// No thread-local state that would route the op elsewhere: torch-function and dispatch modes,
// TLS-included keys (functorch transforms, the Python dispatcher), CPU autocast.
bool plain_context() {
  if (at::impl::torch_function_mode_enabled() || c10::impl::TorchDispatchModeTLS::any_modes_set()) return false;
  for (const c10::DispatchKey k : c10::impl::tls_local_dispatch_key_set().included_)
    if (k != c10::DispatchKey::BackendSelect && k != c10::DispatchKey::ADInplaceOrView) return false;
  return !at::autocast::is_autocast_enabled(at::kCPU);
}

bool int_list(PyObject* obj, std::vector<int64_t>& out) {
  if (!PyTuple_Check(obj) && !PyList_Check(obj)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
  PyObject** items = PySequence_Fast_ITEMS(obj);
  out.resize(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!PyLong_Check(items[i]) || PyBool_Check(items[i])) return false;
    out[i] = PyLong_AsLongLong(items[i]);
    if (out[i] == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
  }
  return true;
}

bool as_double(PyObject* obj, double& out) {
  if (!PyFloat_Check(obj) && !(PyLong_Check(obj) && !PyBool_Check(obj))) return false;
  out = PyFloat_AsDouble(obj);
  if (out == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return true;
}

// args[1], args[2], args[4..10] of _cpu_eval_linear into a; false: the call needs the op.
bool parse_fixed(PyObject* const* args, EvalArgs& a) {
  a.weight = plain_cpu(args[1]);
  a.keys = plain_cpu(args[4]);
  a.bank_a = plain_cpu(args[5]);
  a.bank_b = plain_cpu(args[6]);
  if (args[2] != Py_None && !(a.bias = plain_cpu(args[2]))) return false;
  if (!a.weight || !a.keys || !a.bank_a || !a.bank_b) return false;
  if (!int_list(args[7], a.offsets) || !PyUnicode_Check(args[8]) || !as_double(args[9], a.scale) ||
      !as_double(args[10], a.eps))
    return false;
  Py_ssize_t len = 0;
  const char* sep = PyUnicode_AsUTF8AndSize(args[8], &len);
  if (sep == nullptr) {
    PyErr_Clear();
    return false;
  }
  a.sep.assign(sep, static_cast<size_t>(len));
  return true;
}

// The query argument into q: a token index or a plain CPU tensor; false: neither (the call needs the op).
bool parse_query(PyObject* obj, Query& q) {
  if (PyLong_Check(obj) && !PyBool_Check(obj)) {
    q.token = PyLong_AsLongLong(obj);
    if (q.token == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return q.token >= 0;
  }
  return static_cast<bool>(q.tensor = plain_cpu(obj));
}

// The eval call with x and parsed arguments: x's own checks (and the token's), the graph check,
// then the kernel; None (as a new reference) where the call needs the op.
PyObject* run(const at::Tensor& x, const EvalArgs& a, const Query& q) {
  const auto take_op = []() -> PyObject* { Py_RETURN_NONE; };
  std::optional<at::Tensor> token_query;
  if (q.token >= 0) {
    if (x.dim() != 3 || q.token >= x.size(1)) return take_op();
    token_query = token_rows(x, q.token);
  }
  const at::Tensor& query = token_query ? *token_query : *q.tensor;
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor* t : {&x, &*a.weight, &query, &*a.keys, &*a.bank_a, &*a.bank_b})
      if (t->requires_grad()) return take_op();
    if (a.bias && a.bias->requires_grad()) return take_op();
  }
  // A dual tensor (forward-mode AD, active under no_grad too) has a tangent but no requires_grad: here
  // the base GEMM, dispatched through ATen, carried its tangent W v and the adapter, computed on raw
  // pointers, none, a silently wrong tangent (found by probing). The op refuses forward AD (contract
  // section 5). Level 0: PyTorch's one dual level. The tensors are read only while that level is open
  // (one global look-up), not on every eval call: each tensor's autograd metadata is another cold line.
  if (torch::autograd::ForwardADLevel::try_get_by_idx(0)) {
    for (const at::Tensor* t : {&x, &*a.weight, &query, &*a.keys, &*a.bank_a, &*a.bank_b})
      if (t->_fw_grad(/*level=*/0).defined()) return take_op();
    if (a.bias && a.bias->_fw_grad(/*level=*/0).defined()) return take_op();
  }
  try {
    at::Tensor y;
    {
      RECORD_FUNCTION("mira::mira_linear", std::vector<c10::IValue>());
      // The kernel is pure C++ and never calls back into Python: release the GIL, as F.linear does.
      PyThreadState* state = PyEval_SaveThread();
      try {
        y = mira_linear_cpu(x, *a.weight, a.bias, query, *a.keys, *a.bank_a, *a.bank_b, a.offsets, a.sep, a.scale,
                            a.eps);
      } catch (...) {
        PyEval_RestoreThread(state);
        throw;
      }
      PyEval_RestoreThread(state);
    }
    return THPVariable_Wrap(std::move(y));
  } catch (const std::exception&) {
    // A rejected argument: the op's path raises the documented error for it.
    return take_op();
  }
}

// _cpu_eval_linear(x, weight, bias | None, query | token index, keys, bank_a, bank_b, slice_offsets,
//                  separation, scale, eps) -> Tensor, or None when the call needs the op.
PyObject* eval_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 11) {
    PyErr_SetString(PyExc_TypeError, "_cpu_eval_linear takes 11 positional arguments");
    return nullptr;
  }
  EvalArgs a;
  Query q;
  std::optional<at::Tensor> x;
  if (!plain_context() || !(x = plain_cpu(args[0])) || !parse_fixed(args, a) || !parse_query(args[3], q))
    Py_RETURN_NONE;
  return run(*x, a, q);
}

// _retrieval_stamp(mutations, *sources) -> bytes; False when the sources' derived tensors may not
// come from a cache; None when this cannot tell (the caller builds its Python key then). The key of mira.memory's retrieval cache (AdapterMemory.retrieval_tensors), in
// one call. Per source (a tensor or None): the Python object's identity, the data address, the
// version counter, dtype, device, sizes and strides; the same fields as the Python key it stands in
// for (mira/memory.py, _stamp), packed into one bytes object that compares with one memcmp. In a
// network the call follows large GEMMs that have evicted the interpreter's caches, and there the
// ~30 attribute reads and comparisons of the Python key cost ~70 us per call (measured, 2-core
// Zen 3, benchmarks/budget.py); this is one call. False (not cacheable) when a graph is needed (grad
// mode on and a source requires grad) or for an inference tensor (no version counter); None for a
// tensor subclass or a tensor off the CPU (the Python key handles those: it checks CUDA-graph capture).
PyObject* retrieval_stamp(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs < 1 || !PyLong_Check(args[0])) {
    PyErr_SetString(PyExc_TypeError, "_retrieval_stamp(mutations: int, *sources)");
    return nullptr;
  }
  const long long mutations = PyLong_AsLongLong(args[0]);
  if (mutations == -1 && PyErr_Occurred()) return nullptr;
  std::vector<int64_t> words{mutations};
  const bool grad = at::GradMode::is_enabled();
  for (Py_ssize_t i = 1; i < nargs; ++i) {
    PyObject* obj = args[i];
    if (obj == Py_None) {
      words.push_back(-1);  // a marker no tensor's entry starts with (its dimension count)
      continue;
    }
    if (!THPVariable_CheckExact(obj)) Py_RETURN_NONE;
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (!t.defined() || !t.device().is_cpu() || t.layout() != c10::kStrided) Py_RETURN_NONE;
    if (!tracks_version(t) || (grad && t.requires_grad())) Py_RETURN_FALSE;
    words.push_back(t.dim());
    words.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(obj)));
    words.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.const_data_ptr())));
    words.push_back(static_cast<int64_t>(t._version()));
    words.push_back(static_cast<int64_t>(t.scalar_type()));
    for (const int64_t v : t.sizes()) words.push_back(v);
    for (const int64_t v : t.strides()) words.push_back(v);
  }
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(words.data()),
                                   static_cast<Py_ssize_t>(words.size() * sizeof(int64_t)));
}

PyMethodDef kMethods[] = {
    {"_retrieval_stamp", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(retrieval_stamp)), METH_FASTCALL,
     "The key of mira.memory's retrieval cache for CPU tensors in one call; None when not cacheable there."},
    {"_cpu_eval_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(eval_linear)), METH_FASTCALL,
     "The CPU forward without the dispatcher, for plain eval calls; None when the call needs the op."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMethodDef* fast_path_methods() { return kMethods; }

bool is_eval_linear(PyObject* fn) {
  return PyCFunction_Check(fn) &&
         PyCFunction_GET_FUNCTION(fn) == reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(eval_linear));
}

PreparedEval* prepare_eval(PyObject* const* args, bool with_query) {
  auto* p = new PreparedEval();
  if (!parse_fixed(args, p->args) || (with_query && !parse_query(args[3], p->query))) {
    delete p;
    return nullptr;
  }
  p->with_query = with_query;
  return p;
}

void free_prepared_eval(PreparedEval* p) { delete p; }

PyObject* eval_prepared(const PreparedEval& p, PyObject* x_obj, PyObject* query_obj) {
  std::optional<at::Tensor> x;
  if (!plain_context() || !(x = plain_cpu(x_obj))) Py_RETURN_NONE;
  if (p.with_query) return run(*x, p.args, p.query);
  Query q;
  if (!parse_query(query_obj, q)) Py_RETURN_NONE;
  return run(*x, p.args, q);
}

}  // namespace mira_cpu
