#pragma once
// Argument validation of route_plan, shared by the CPU, CUDA and Meta
// kernels so that every device rejects the same inputs with the same words.

#include "ops/common.h"

namespace moeyard::ops::detail {

inline void check_route_plan_args(
    const at::Tensor& indices,
    const at::Tensor& weights,
    int64_t num_experts,
    int64_t capacity,
    c10::string_view drop_policy) {
  constexpr const char* op = "route_plan";
  check_index(indices, op, "indices");
  check_dim(indices, 2, op, "indices", "[tokens, k]");
  check_float(weights, op, "weights");
  TORCH_CHECK(
      weights.sym_sizes() == indices.sym_sizes(),
      op,
      ": weights must have the shape of indices ",
      indices.sym_sizes(),
      ", got ",
      weights.sym_sizes());
  check_same_device(indices, weights, op, "indices", "weights");
  TORCH_CHECK(
      num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(
      capacity == -1 || capacity >= 1,
      op,
      ": capacity must be >= 1 (or -1 for dropless), got ",
      capacity);
  parse_drop_policy(drop_policy, op);
}

} // namespace moeyard::ops::detail
