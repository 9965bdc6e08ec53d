// The eval fast path's CPython methods (fast_path.cpp), added to the _C module (mira_ops.cpp).
#pragma once

#include <Python.h>

#include "cpu/mira_linear_cpu.h"

namespace mira_cpu {

PyMethodDef* fast_path_methods();

}  // namespace mira_cpu
