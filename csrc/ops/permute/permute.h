#pragma once

#include <ATen/core/Tensor.h>

namespace moeyard::ops {

// rows[i] = x[row_token[i]] (zeros where row_token[i] == -1).
// x [T, H] float, row_token [N] int64 in [-1, T). Returns rows [N, H].
at::Tensor permute(const at::Tensor& x, const at::Tensor& row_token);

// Gradient of permute: grad_x[t] = sum over rows i with row_token[i] == t of
// grad_rows[i], accumulated in row order (deterministic, no atomics).
at::Tensor permute_backward(
    const at::Tensor& grad_rows,
    const at::Tensor& row_token,
    c10::SymInt num_tokens);

} // namespace moeyard::ops
