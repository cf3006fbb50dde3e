#pragma once
// Shared by device code and its CPU twins: plain C++ with no ATen, compiled
// by nvcc for the GPU and by the host compiler for the CPU kernels and tests.

#include <cstdint>

#if defined(__CUDACC__)
#define MOEYARD_HD __host__ __device__ __forceinline__
#else
#define MOEYARD_HD inline
#endif

namespace moeyard::kernels {

// Higher value first; ties go to the lower index. The one ordering every
// top-k in moeyard uses (router_topk, group selection, expert choice).
template <typename T>
MOEYARD_HD bool ranks_before(T a, int64_t ia, T b, int64_t ib) {
  return a > b || (a == b && ia < ib);
}

MOEYARD_HD int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

}  // namespace moeyard::kernels
