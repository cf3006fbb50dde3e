#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace moeyard::ops {

// gate_up [N, 2F] -> silu(gate_up[:, :F]) * gate_up[:, F:], shape [N, F].
// With expert_offsets (grouped_mm's [E + 1]), only the rows
// [offsets[0], offsets[E]) are computed: the others (null picks, unfilled
// capacity) are zero and their inputs are not read.
at::Tensor swiglu(
    const at::Tensor& gate_up,
    const std::optional<at::Tensor>& expert_offsets = std::nullopt);

// Gradient of swiglu with respect to gate_up, shape [N, 2F] (zero outside
// the offsets' rows).
at::Tensor swiglu_backward(
    const at::Tensor& grad,
    const at::Tensor& gate_up,
    const std::optional<at::Tensor>& expert_offsets = std::nullopt);

} // namespace moeyard::ops
