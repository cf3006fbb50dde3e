#pragma once
// Matrix products in reduced precision on CPUs without bf16/fp16 GEMM units.
// ATen's bfloat16 GEMM on such a CPU (AVX2 only) runs at ~0.4 GFLOP/s on 2
// cores against ~135 for float32 (docs/benchmarks.md): there the products
// are computed in float32 and rounded once, which is what a bf16 GEMM unit
// does too (float32 accumulation). CUDA tensors and CPUs with AVX512-BF16 /
// AMX (AVX512-FP16 / AMX-FP16 for float16) keep ATen's native path.

#include <ATen/core/Tensor.h>

#include <optional>

namespace moeyard::ops {

// Whether products of `dtype` should run in float32 on this device.
bool gemm_in_float32(at::ScalarType dtype, const at::Device& device);

// y = x W^T (+ b), as at::linear, through float32 when gemm_in_float32.
// Without autograd, on the CPU, at most kStreamingRows rows (decoding) go
// through grouped_mm's weight-streaming kernel as one group.
at::Tensor linear(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias = std::nullopt);

} // namespace moeyard::ops
