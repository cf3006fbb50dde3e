#pragma once

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

} // namespace moeyard::ops::detail
