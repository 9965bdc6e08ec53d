// The eval fast path's CPython methods (fast_path.cpp), added to the _C module (mira_ops.cpp).
#pragma once

#include <Python.h>

#include "cpu/mira_linear_cpu.h"

#include <optional>
#include <string>
#include <vector>

namespace mira_cpu {

PyMethodDef* fast_path_methods();

// Whether reading t's version counter works. Not for an inference tensor, nor for a parameter made
// under torch.inference_mode whose data was later swapped (`.data =`) for an ordinary tensor: it
// then reports is_inference() false but still has no version counter, and reading it throws (from a
// CPython method, with nothing to catch it: the process aborted). The caches' keys treat both as
// not cacheable.
inline bool tracks_version(const at::Tensor& t) {
  return !t.is_inference() && t.unsafeGetTensorImpl()->version_counter().enabled();
}

// The arguments of an eval call but x and the query, parsed: every tensor a plain CPU one.
struct EvalArgs {
  std::optional<at::Tensor> weight, bias, keys, bank_a, bank_b;
  std::vector<int64_t> offsets;
  std::string sep;
  double scale = 0, eps = 0;
};

// The query argument: a token index (query = x[:, token]) or a plain CPU tensor.
struct Query {
  int64_t token = -1;  // >= 0: x[:, token]
  std::optional<at::Tensor> tensor;
};

// An _EvalPlan's arguments to _cpu_eval_linear, parsed once when the plan is made (csrc/eval_plan.cpp):
// in a network every argument parsed per call is a handful of cache misses (~7 us per call parsing
// them all, Zen 5, B = 1). The plan's guards keep them current: each is held by the very Python
// object the plan guards, and a `.data` swap changes that tensor in place.
struct PreparedEval {
  EvalArgs args;
  bool with_query = false;  // the query is fixed (else the plan makes it per call)
  Query query;
};

// Whether fn is _cpu_eval_linear.
bool is_eval_linear(PyObject* fn);
// args: _cpu_eval_linear's 11 (x's slot unused; the query's too unless with_query); nullptr (no
// exception set) where a call with them would need the op anyway.
PreparedEval* prepare_eval(PyObject* const* args, bool with_query);
void free_prepared_eval(PreparedEval* p);
// _cpu_eval_linear(x, *prepared) with query_obj as the query unless it is prepared: a new reference
// to the output, or to None where the call needs the op.
PyObject* eval_prepared(const PreparedEval& p, PyObject* x, PyObject* query_obj);

}  // namespace mira_cpu
