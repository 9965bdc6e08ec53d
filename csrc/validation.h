// Argument checks of the public MIRA ops, in C++: the eager calls' only checks.
//
// Why a second copy of mira_kernels/_validation.py: on every eager call the Python checks cost
// ~0.3-0.5% of a ViT-B/16 qkv projection at B = 8 (measured, benchmarks/results/op_cpu.md),
// because the call follows a large GEMM that has evicted the interpreter's caches. So the ops
// check here, in C++ (the native private ops themselves, the public ops' kernels for calls they
// hand to the Python router), and the Python wrappers skip their own checks. When a check
// here fails, the wrapper re-runs the Python checks, which raise the documented error (type and
// wording): the Python file stays the one place of the messages, this file must reject exactly
// the same inputs (tests/test_validation.py checks both against one catalogue of bad inputs).
// Errors here are ValueError (shapes, values) or TypeError (dtypes), as in Python.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace mira {

void check_linear_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& query, const at::Tensor& keys, const at::Tensor& bank_a,
                       const at::Tensor& bank_b, c10::IntArrayRef slice_offsets, c10::string_view separation,
                       double scale, double eps);

void check_linear_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& query, const at::Tensor& keys, const at::Tensor& bank_a,
                                const at::Tensor& bank_b, c10::IntArrayRef slice_offsets,
                                c10::string_view separation, double scale, double eps);

void check_adapter_args(const at::Tensor& out, const at::Tensor& x, const at::Tensor& query, const at::Tensor& keys,
                        const at::Tensor& bank_a, const at::Tensor& bank_b, c10::IntArrayRef slice_offsets,
                        c10::string_view separation, double scale, double eps);

}  // namespace mira
