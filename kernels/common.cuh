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

// First position in sorted a[0:n) whose value is >= v.
MOEYARD_HD int64_t lower_bound(const int64_t* a, int64_t n, int64_t v) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (a[mid] < v) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

#if defined(__CUDACC__)
// A device-side check that stays on in release builds (like assert, it
// stops the kernel with the condition, file and line).
#define MOEYARD_KERNEL_ASSERT(cond)                       \
  do {                                                    \
    if (!(cond)) {                                        \
      __assert_fail(#cond, __FILE__, __LINE__, __func__); \
    }                                                     \
  } while (0)

constexpr int kWarpSize = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    const T other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  return v;
}

// Grid size for a grid-stride loop over n items of `per_block` each.
inline unsigned grid_for(
    int64_t n, int64_t per_block, int64_t max_blocks = 65535) {
  const int64_t b = ceil_div(n, per_block);
  return static_cast<unsigned>(b < 1 ? 1 : (b > max_blocks ? max_blocks : b));
}
#endif

} // namespace moeyard::kernels
