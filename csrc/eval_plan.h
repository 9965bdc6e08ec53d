// The prepared eval call of a MIRA projection (eval_plan.cpp), added to the _C module (mira_ops.cpp).
#pragma once

#include <Python.h>

namespace mira {

// Adds the type mira_kernels._C._EvalPlan to `module`; -1 with an exception set on failure.
int add_eval_plan_type(PyObject* module);

}  // namespace mira
