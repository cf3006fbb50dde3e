#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace moeyard::ops {

// On the CPU, a group of at most this many rows streams its weights through
// a register-tiled kernel instead of a BLAS GEMM (which packs the weights
// first): measured faster up to ~64 rows at H=1024..2048.
constexpr int64_t kStreamingRows = 32;

// Per-expert matmul over expert-contiguous rows:
// out[offsets[e]:offsets[e+1]] = input[offsets[e]:offsets[e+1]] @ weight[e]^T.
// input [N, Din], weight [E, Dout, Din] (nn.Linear layout, same dtype as
// input), expert_offsets [E+1] int64, non-decreasing, offsets[0] >= 0 and
// offsets[E] <= N. Rows outside every expert range get zeros.
at::Tensor grouped_mm(
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& expert_offsets);

// Gradients of grouped_mm: grad_input [N, Din] and grad_weight [E, Dout, Din]
// (zero for experts without rows).
std::tuple<at::Tensor, at::Tensor> grouped_mm_backward(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& expert_offsets);

} // namespace moeyard::ops
