#pragma once
// Small vectorized row routines shared by the CPU kernels. With the AVX2 build
// flags (CMake option MOEYARD_CPU_AVX2) at::vec maps onto AVX2 + Sleef; without
// them it falls back to ATen's portable implementation, same results to the
// rounding of exp.

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace moeyard::ops::detail {

// s[0:n) <- softmax(s[0:n)), numerically stable (max subtracted).
template <typename T>
void softmax_inplace(T* s, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  const T mx = at::vec::reduce_all<T>(
      [](Vec a, Vec b) { return at::vec::maximum(a, b); }, s, n);
  at::vec::map([mx](Vec v) { return (v - Vec(mx)).exp(); }, s, s, n);
  const T sum =
      at::vec::reduce_all<T>([](Vec a, Vec b) { return a + b; }, s, n);
  const T inv = T(1) / sum;
  at::vec::map([inv](Vec v) { return v * Vec(inv); }, s, s, n);
}

// s[0:n) <- 1 / (1 + exp(-s[0:n))).
template <typename T>
void sigmoid_inplace(T* s, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  at::vec::map(
      [](Vec v) { return Vec(T(1)) / (Vec(T(1)) + v.neg().exp()); }, s, s, n);
}

} // namespace moeyard::ops::detail
