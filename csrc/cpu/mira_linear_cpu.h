// The CPU forward of mira_linear (mira_linear_cpu.cpp), for the callers outside the dispatcher's
// registration: the eval fast path (fast_path.cpp). Checks its arguments (csrc/validation.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

namespace mira_cpu {

at::Tensor mira_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& query, const at::Tensor& keys, const at::Tensor& bank_a,
                           const at::Tensor& bank_b, at::IntArrayRef slice_offsets, c10::string_view separation,
                           double scale, double eps);

}  // namespace mira_cpu
