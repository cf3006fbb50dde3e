#pragma once
// Argument validation of grouped_mm and grouped_mm_backward, shared by the
// CPU, CUDA and Meta kernels so that every device rejects the same inputs
// with the same words. The offsets' values are checked on a host copy
// (check_grouped_mm_offsets) by the device kernels, which read them anyway.

#include "ops/common.h"

namespace moeyard::ops::detail {

inline void check_grouped_mm_args(
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& offsets,
    const char* op) {
  check_float(input, op, "input");
  check_dim(input, 2, op, "input", "[rows, in_features]");
  check_float(weight, op, "weight");
  check_dim(weight, 3, op, "weight", "[experts, out_features, in_features]");
  check_same_dtype(input, weight, op, "input", "weight");
  check_index(offsets, op, "expert_offsets");
  check_dim(offsets, 1, op, "expert_offsets", "[experts + 1]");
  TORCH_CHECK(
      offsets.sym_size(0) == weight.sym_size(0) + 1,
      op,
      ": expert_offsets must have num_experts + 1 = ",
      weight.sym_size(0) + 1,
      " entries, got ",
      offsets.sym_size(0));
  TORCH_CHECK(
      input.sym_size(1) == weight.sym_size(2),
      op,
      ": input has ",
      input.sym_size(1),
      " features but weight expects ",
      weight.sym_size(2),
      " (weight shape ",
      weight.sym_sizes(),
      ")");
  check_same_device(input, weight, op, "input", "weight");
  check_same_device(input, offsets, op, "input", "expert_offsets");
}

inline void check_grouped_mm_backward_args(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& offsets) {
  constexpr const char* op = "grouped_mm_backward";
  check_grouped_mm_args(input, weight, offsets, op);
  check_shape_2d(
      grad_out, input.sym_size(0), weight.sym_size(1), op, "grad_out");
}

// Host copy of expert_offsets: non-decreasing within [0, N].
inline void check_grouped_mm_offsets(
    const int64_t* v, size_t n, int64_t N, const char* op) {
  for (size_t e = 0; e + 1 < n; ++e) {
    TORCH_CHECK(
        v[e] >= 0 && v[e] <= v[e + 1] && v[e + 1] <= N,
        op,
        ": expert_offsets must be non-decreasing within [0, num_rows=",
        N,
        "], got offsets[",
        e,
        "]=",
        v[e],
        ", offsets[",
        e + 1,
        "]=",
        v[e + 1]);
  }
}

} // namespace moeyard::ops::detail
