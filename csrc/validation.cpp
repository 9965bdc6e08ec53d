// The checks of validation.h. They mirror mira_kernels/_validation.py condition for condition
// (same order, so a call with several faults fails on the same one); the wording there is the
// documented one, the messages here only need to make sense to someone calling torch.ops.mira.*.
#include "validation.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <string>
#include <string_view>
#include <vector>

namespace mira {
namespace {

bool is_half(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

void check_rank(const char* name, const at::Tensor& t, int64_t rank, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank, name, " must have shape ", layout, " (", rank, " dims), got ", t.sizes());
}

void check_dim(const char* name, const at::Tensor& t, int64_t dim, int64_t expected, const char* what,
               const char* layout) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, name, " must have shape ", layout, " with ", what, " = ", expected,
                    ", got ", t.sizes());
}

void check_device(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device(),
                    "; all inputs must share one device");
}

void check_x(const at::Tensor& x) {
  check_rank("x", x, 3, "(B, T, d_in)");
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || is_half(dt),
                   "x must be float32, float64, float16 or bfloat16, got ", dt);
}

// Frozen base projection: weight (d_out, d_in) and optional bias (d_out,), x's dtype and device.
void check_base(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias) {
  check_rank("weight", weight, 2, "(d_out, d_in)");
  check_dim("weight", weight, 1, x.size(2), "d_in (the width of x)", "(d_out, d_in)");
  for (auto [name, t] : {std::pair{"weight", &weight}, std::pair{"bias", bias}}) {
    if (t == nullptr) continue;
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), name, " has dtype ", t->scalar_type(), " but x has ",
                     x.scalar_type(), "; x, weight and bias share one dtype");
    check_device(name, *t, x);
  }
  if (bias != nullptr) {
    check_rank("bias", *bias, 1, "(d_out,)");
    check_dim("bias", *bias, 0, weight.size(0), "d_out (the rows of weight)", "(d_out,)");
  }
}

// Written so that no sum can overflow: an offset near 2^63 made `off + d_s` wrap negative (the
// extension builds with -fwrapv), pass the check, and send the kernels to write far out of bounds.
// d_s and d_out are sizes (>= 0), so d_out - d_s cannot overflow; once every offset lies in
// [0, d_out - d_s], differences of offsets cannot either.
void check_offsets(c10::IntArrayRef offsets, int64_t d_s, int64_t d_out) {
  for (int64_t off : offsets)
    TORCH_CHECK_VALUE(off >= 0 && off <= d_out - d_s, "slice_offsets: the slice at offset ", off, " of width d_s = ",
                      d_s, " must fit in d_out = ", d_out);
  std::vector<int64_t> ordered(offsets.begin(), offsets.end());
  std::sort(ordered.begin(), ordered.end());
  for (size_t i = 1; i < ordered.size(); ++i)
    TORCH_CHECK_VALUE(ordered[i] - ordered[i - 1] >= d_s, "slice_offsets ", offsets,
                      " give overlapping slices of width d_s = ", d_s);
}

// The memory side, shared by every op: _validation.check_memory.
void check_memory(const at::Tensor& x, int64_t d_out, const at::Tensor& query, const at::Tensor& keys,
                  const at::Tensor& bank_a, const at::Tensor& bank_b, c10::IntArrayRef offsets,
                  c10::string_view separation, double scale, double eps) {
  check_rank("query", query, 2, "(B, d_k)");
  check_rank("keys", keys, 2, "(N, d_k)");
  check_rank("bank_a", bank_a, 4, "(N, S, r, d_in)");
  check_rank("bank_b", bank_b, 4, "(N, S, d_s, r)");
  const int64_t n_slots = keys.size(0), d_k = keys.size(1), s = bank_a.size(1), r = bank_a.size(2);
  TORCH_CHECK_VALUE(r >= 1 && s >= 1, "bank_a must have S >= 1 slices and rank r >= 1, got shape ", bank_a.sizes());
  check_dim("query", query, 0, x.size(0), "B (the batch of x)", "(B, d_k)");
  check_dim("query", query, 1, d_k, "d_k (the width of keys)", "(B, d_k)");
  check_dim("bank_a", bank_a, 0, n_slots, "N (the number of keys)", "(N, S, r, d_in)");
  check_dim("bank_a", bank_a, 3, x.size(2), "d_in (the width of x)", "(N, S, r, d_in)");
  check_dim("bank_b", bank_b, 0, n_slots, "N (the number of keys)", "(N, S, d_s, r)");
  check_dim("bank_b", bank_b, 1, s, "S (as bank_a)", "(N, S, d_s, r)");
  check_dim("bank_b", bank_b, 3, r, "r (the rank of bank_a)", "(N, S, d_s, r)");

  const at::ScalarType dt = x.scalar_type();
  for (auto [name, t] : {std::pair{"query", &query}, std::pair{"keys", &keys}}) {
    check_device(name, *t, x);
    TORCH_CHECK_TYPE(t->scalar_type() == dt || (is_half(dt) && t->scalar_type() == at::kFloat), name,
                     " has dtype ", t->scalar_type(), "; with x of dtype ", dt, " it must be ", dt,
                     is_half(dt) ? " or float32" : "");
  }
  // The banks: float32, bfloat16 or float16 wherever the compute dtype is float32 (x float32 or
  // 16-bit; 16-bit banks are widened exactly and mixed in float32), float64 for float64 x.
  for (auto [name, t] : {std::pair{"bank_a", &bank_a}, std::pair{"bank_b", &bank_b}}) {
    check_device(name, *t, x);
    const at::ScalarType bt = t->scalar_type();
    const bool f64 = dt == at::kDouble;
    TORCH_CHECK_TYPE(f64 ? bt == at::kDouble : (bt == at::kFloat || is_half(bt)), name, " has dtype ", bt,
                     "; with x of dtype ", dt, " it must be ",
                     f64 ? "float64 (16-bit banks need float32 compute)" : "float32, bfloat16 or float16");
  }

  TORCH_CHECK_VALUE(static_cast<int64_t>(offsets.size()) == s, "slice_offsets has ", offsets.size(),
                    " entries but bank_a/bank_b have S = ", s, " slices");
  check_offsets(offsets, bank_b.size(2), d_out);

  constexpr std::string_view kSeparations[] = {"affine", "softmax", "relu", "tanh", "sigmoid", "identity"};
  const std::string_view sep(separation.data(), separation.size());
  TORCH_CHECK_VALUE(std::find(std::begin(kSeparations), std::end(kSeparations), sep) != std::end(kSeparations),
                    "unknown separation '", std::string(sep),
                    "'; expected one of affine, softmax, relu, tanh, sigmoid, identity");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "eps must be a finite number > 0, got ", eps);
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be a finite number, got ", scale);
}

// Overlapping memory (contract section 6; _validation.check_out_overlap, same rule and order).
// True when no two elements of a view with these sizes and strides share memory, proved by: with
// the dimensions of size > 1 sorted by stride, each stride exceeds the span of the smaller ones.
bool provably_no_internal_overlap(c10::IntArrayRef sizes, c10::IntArrayRef strides) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] == 0) return true;
    if (sizes[d] > 1) dims.emplace_back(strides[d], sizes[d]);
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;
  for (auto [stride, size] : dims) {
    if (stride <= span) return false;
    span += (size - 1) * stride;
  }
  return true;
}

// [first byte, one past the last byte] that t's elements can touch (t.numel() > 0).
std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  int64_t extent = 1;
  for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
  const auto start = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {start, start + uintptr_t(extent) * t.element_size()};
}

void check_out_overlap(const at::Tensor& out, std::initializer_list<std::pair<const char*, const at::Tensor*>> inputs) {
  TORCH_CHECK_VALUE(provably_no_internal_overlap(out.sizes(), out.strides()),
                    "out has elements that share memory (shape ", out.sizes(), ", strides ", out.strides(),
                    "); mira_adapter_ writes every element of out, so out must not overlap itself");
  if (out.numel() == 0) return;
  const auto [lo, hi] = byte_span(out);
  for (auto [name, t] : inputs) {
    if (t->numel() == 0) continue;
    if (t->const_data_ptr() == out.const_data_ptr() && t->scalar_type() == out.scalar_type() &&
        t->sizes() == out.sizes() && t->strides() == out.strides())
      continue;  // out is this very view (out = x): allowed
    const auto [t_lo, t_hi] = byte_span(*t);
    TORCH_CHECK_VALUE(!(t_lo < hi && lo < t_hi), "out overlaps ", name, " in memory; mira_adapter_ reads ", name,
                      " while it writes out, so out must not share memory with any input (it may be x itself)");
  }
}

}  // namespace

void check_linear_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& query, const at::Tensor& keys, const at::Tensor& bank_a,
                       const at::Tensor& bank_b, c10::IntArrayRef slice_offsets, c10::string_view separation,
                       double scale, double eps) {
  check_x(x);
  const bool has_bias = bias.has_value() && bias->defined();
  check_base(x, weight, has_bias ? &*bias : nullptr);
  check_memory(x, weight.size(0), query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps);
}

void check_linear_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& query, const at::Tensor& keys, const at::Tensor& bank_a,
                                const at::Tensor& bank_b, c10::IntArrayRef slice_offsets,
                                c10::string_view separation, double scale, double eps) {
  check_linear_args(x, weight, std::nullopt, query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps);
  check_rank("grad_out", grad_out, 3, "(B, T, d_out)");
  TORCH_CHECK_VALUE(grad_out.size(0) == x.size(0) && grad_out.size(1) == x.size(1) &&
                        grad_out.size(2) == weight.size(0),
                    "grad_out must have shape (B, T, d_out) = (", x.size(0), ", ", x.size(1), ", ", weight.size(0),
                    "), got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), "grad_out has dtype ", grad_out.scalar_type(),
                   " but x has ", x.scalar_type());
  check_device("grad_out", grad_out, x);
}

void check_adapter_args(const at::Tensor& out, const at::Tensor& x, const at::Tensor& query, const at::Tensor& keys,
                        const at::Tensor& bank_a, const at::Tensor& bank_b, c10::IntArrayRef slice_offsets,
                        c10::string_view separation, double scale, double eps) {
  check_x(x);
  check_rank("out", out, 3, "(B, T, d_out)");
  TORCH_CHECK_TYPE(out.scalar_type() == x.scalar_type(), "out has dtype ", out.scalar_type(), " but x has ",
                   x.scalar_type(), "; they must match");
  check_device("out", out, x);
  check_dim("out", out, 0, x.size(0), "B (the batch of x)", "(B, T, d_out)");
  check_dim("out", out, 1, x.size(1), "T (the tokens of x)", "(B, T, d_out)");
  check_memory(x, out.size(2), query, keys, bank_a, bank_b, slice_offsets, separation, scale, eps);
  check_out_overlap(out, {{"x", &x}, {"query", &query}, {"keys", &keys}, {"bank_a", &bank_a}, {"bank_b", &bank_b}});
}

}  // namespace mira
