#pragma once

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

} // namespace moeyard::ops::detail
