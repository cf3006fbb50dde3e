#pragma once

// The vector kernels of the CPU weight-streaming path (grouped_mm with at
// most kStreamingRows rows per expert): AVX2 in grouped_mm_kernel.cpp, and
// AVX-512 in cpu_avx512/streaming.cpp, a file of its own built with the
// AVX-512 flags and entered only on CPUs that run it.

#include <cstdint>

namespace moeyard::ops::streaming {

// The instruction sets, lowest first.
enum class Isa { kDefault, kAvx2, kAvx512, kAvx512Bf16 };

// The best this build and this CPU run, capped by the environment variable
// MOEYARD_CPU_CAPABILITY (default, avx2, avx512, avx512_bf16), which is
// read once: a run can compare the kernels on one machine.
Isa cpu_isa();

// y[r, j] = dot(x[r, :K], w[j, :K]) for r < n, j in [j0, j1); y's rows are
// ldy apart. x, w float32; or w 16-bit (bf16 when `bf16`, else fp16)
// widened to float32; or x and w bfloat16 (VDPBF16PS, Isa::kAvx512Bf16).
void columns_avx512(
    const float* x,
    int64_t n,
    int64_t K,
    const float* w,
    float* y,
    int64_t ldy,
    int64_t j0,
    int64_t j1);
void columns_avx512_widen(
    const float* x,
    int64_t n,
    int64_t K,
    const uint16_t* w,
    bool bf16,
    float* y,
    int64_t ldy,
    int64_t j0,
    int64_t j1);
void columns_avx512_bf16(
    const uint16_t* x,
    int64_t n,
    int64_t K,
    const uint16_t* w,
    float* y,
    int64_t ldy,
    int64_t j0,
    int64_t j1);

} // namespace moeyard::ops::streaming
