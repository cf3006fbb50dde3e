#pragma once
// Argument validation of permute and permute_backward, shared by the CPU,
// CUDA and Meta kernels so that every device rejects the same inputs with the
// same words. Checks that read index values (row_token in range) need the
// data and live in the device kernels.

#include "ops/common.h"

namespace moeyard::ops::detail {

inline void check_permute_args(
    const at::Tensor& x,
    const at::Tensor& row_token,
    const char* op,
    const char* x_name) {
  check_float(x, op, x_name);
  check_dim(x, 2, op, x_name, "[rows, hidden]");
  check_index(row_token, op, "row_token");
  check_dim(row_token, 1, op, "row_token", "[rows]");
  check_same_device(x, row_token, op, x_name, "row_token");
}

inline void check_permute_backward_args(
    const at::Tensor& grad_rows,
    const at::Tensor& row_token,
    const c10::SymInt& num_tokens) {
  constexpr const char* op = "permute_backward";
  check_permute_args(grad_rows, row_token, op, "grad_rows");
  TORCH_CHECK(
      num_tokens >= 0, op, ": num_tokens must be >= 0, got ", num_tokens);
  TORCH_CHECK(
      grad_rows.sym_size(0) == row_token.sym_size(0),
      op,
      ": grad_rows must have one row per row_token entry (",
      row_token.sym_size(0),
      "), got ",
      grad_rows.sym_size(0));
}

} // namespace moeyard::ops::detail
