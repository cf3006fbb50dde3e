#pragma once
// Argument validation of swiglu and swiglu_backward, shared by the CPU, CUDA
// and Meta kernels so that every device rejects the same inputs with the same
// words.

#include "ops/common.h"

namespace moeyard::ops::detail {

inline void check_swiglu_args(const at::Tensor& gate_up, const char* op) {
  check_float(gate_up, op, "gate_up");
  check_dim(gate_up, 2, op, "gate_up", "[rows, 2 * ffn]");
  TORCH_CHECK(
      gate_up.sym_size(1) % 2 == 0,
      op,
      ": gate_up must have an even number of columns (gate then up), got ",
      gate_up.sym_size(1));
}

inline void check_swiglu_backward_args(
    const at::Tensor& grad, const at::Tensor& gate_up) {
  constexpr const char* op = "swiglu_backward";
  check_swiglu_args(gate_up, op);
  check_float(grad, op, "grad");
  // gate_up has an even number of columns (checked above).
  check_shape_2d(
      grad, gate_up.sym_size(0), gate_up.sym_size(1) / 2, op, "grad");
  check_same_device(grad, gate_up, op, "grad", "gate_up");
}

} // namespace moeyard::ops::detail
