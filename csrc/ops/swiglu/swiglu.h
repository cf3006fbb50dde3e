#pragma once

#include <ATen/core/Tensor.h>

namespace moeyard::ops {

// gate_up [N, 2F] -> silu(gate_up[:, :F]) * gate_up[:, F:], shape [N, F].
at::Tensor swiglu(const at::Tensor& gate_up);

// Gradient of swiglu with respect to gate_up, shape [N, 2F].
at::Tensor swiglu_backward(const at::Tensor& grad, const at::Tensor& gate_up);

} // namespace moeyard::ops
