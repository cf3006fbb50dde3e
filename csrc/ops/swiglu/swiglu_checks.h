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

// expert_offsets (as grouped_mm's, [E + 1] int64): only the rows
// [offsets[0], offsets[E]) are computed, the others are zero.
inline void check_swiglu_offsets(
    const std::optional<at::Tensor>& offsets,
    const at::Tensor& gate_up,
    const char* op) {
  if (!offsets) {
    return;
  }
  TORCH_CHECK(
      offsets->scalar_type() == at::kLong && offsets->dim() == 1 &&
          offsets->sym_numel() >= 1,
      op,
      ": expert_offsets must be a 1-D int64 tensor of E + 1 >= 1 entries, "
      "got ",
      offsets->scalar_type(),
      " ",
      offsets->sym_sizes());
  check_same_device(*offsets, gate_up, op, "expert_offsets", "gate_up");
}

// The rows [begin, end) that offsets on the host span, checked against the
// N rows; all of them without offsets.
inline std::pair<int64_t, int64_t> swiglu_span(
    const std::optional<at::Tensor>& offsets, int64_t N, const char* op) {
  if (!offsets) {
    return {0, N};
  }
  const auto o = offsets->contiguous();
  const int64_t* p = o.const_data_ptr<int64_t>();
  const int64_t begin = p[0], end = p[o.numel() - 1];
  TORCH_CHECK(
      0 <= begin && begin <= end && end <= N,
      op,
      ": expert_offsets must span rows within [0, ",
      N,
      "], got [",
      begin,
      ", ",
      end,
      ")");
  return {begin, end};
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
