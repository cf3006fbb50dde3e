#pragma once
// Argument validation of unpermute and unpermute_backward, shared by the CPU,
// CUDA and Meta kernels so that every device rejects the same inputs with the
// same words. Checks that read index values (slot in range) need the data and
// live in the device kernels.

#include "ops/common.h"

namespace moeyard::ops::detail {

inline void check_unpermute_args(
    const at::Tensor& rows,
    const at::Tensor& slot,
    const at::Tensor& weights,
    const char* op) {
  check_float(rows, op, "rows");
  check_dim(rows, 2, op, "rows", "[rows, hidden]");
  check_index(slot, op, "slot");
  check_dim(slot, 2, op, "slot", "[tokens, k]");
  check_float(weights, op, "weights");
  TORCH_CHECK(
      weights.sym_sizes() == slot.sym_sizes(),
      op,
      ": weights must have the shape of slot ",
      slot.sym_sizes(),
      ", got ",
      weights.sym_sizes());
  TORCH_CHECK(
      weights.scalar_type() == rows.scalar_type() ||
          weights.scalar_type() == at::kFloat,
      op,
      ": weights must be float32 or the dtype of rows (",
      rows.scalar_type(),
      "), got ",
      weights.scalar_type());
  check_same_device(rows, slot, op, "rows", "slot");
  check_same_device(rows, weights, op, "rows", "weights");
}

inline void check_unpermute_backward_args(
    const at::Tensor& grad_y,
    const at::Tensor& rows,
    const at::Tensor& slot,
    const at::Tensor& weights) {
  constexpr const char* op = "unpermute_backward";
  check_unpermute_args(rows, slot, weights, op);
  check_float(grad_y, op, "grad_y");
  check_shape_2d(grad_y, slot.sym_size(0), rows.sym_size(1), op, "grad_y");
}

} // namespace moeyard::ops::detail
