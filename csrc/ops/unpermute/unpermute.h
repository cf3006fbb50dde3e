#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace moeyard::ops {

// y[t] = sum_k weights[t, k] * rows[slot[t, k]], skipping slot == -1.
// rows [N, H] float, slot [T, K] int64 in [-1, N), weights [T, K] float
// (float32 or the dtype of rows). Gathers per token, accumulates in float32
// (float64 for float64 rows). Returns y [T, H] in the dtype of rows.
at::Tensor unpermute(
    const at::Tensor& rows, const at::Tensor& slot, const at::Tensor& weights);

// Gradients of unpermute: grad_rows [N, H] (zero on rows no slot points to)
// and grad_weights [T, K] (zero where slot == -1).
std::tuple<at::Tensor, at::Tensor> unpermute_backward(
    const at::Tensor& grad_y,
    const at::Tensor& rows,
    const at::Tensor& slot,
    const at::Tensor& weights);

} // namespace moeyard::ops
