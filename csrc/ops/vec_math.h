#pragma once
// Small vectorized row routines shared by the CPU kernels. With the AVX2 build
// flags (CMake option MOEYARD_CPU_AVX2) at::vec maps onto AVX2 + Sleef; without
// them it falls back to ATen's portable implementation, same results to the
// rounding of exp.

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace moeyard::ops::detail {

// s[0:n) <- softmax(s[0:n)), numerically stable (max subtracted). Uses
// exp_u20, the exponential of ATen's own softmax kernel.
template <typename T>
void softmax_inplace(T* s, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t body = n - n % W;
  T mx = -std::numeric_limits<T>::infinity();
  if (body > 0) {
    Vec vm = Vec::loadu(s);
    for (int64_t i = W; i < body; i += W) {
      vm = at::vec::maximum(vm, Vec::loadu(s + i));
    }
    mx = at::vec::vec_reduce_all<T>(
        [](Vec a, Vec b) { return at::vec::maximum(a, b); }, vm);
  }
  for (int64_t i = body; i < n; ++i) {
    mx = std::max(mx, s[i]);
  }
  Vec vsum(T(0));
  const Vec vmx(mx);
  for (int64_t i = 0; i < body; i += W) {
    const Vec e = (Vec::loadu(s + i) - vmx).exp_u20();
    e.store(s + i);
    vsum = vsum + e;
  }
  T sum = body > 0 ? at::vec::vec_reduce_all<T>(
                         [](Vec a, Vec b) { return a + b; }, vsum)
                   : T(0);
  for (int64_t i = body; i < n; ++i) {
    s[i] = std::exp(s[i] - mx);
    sum += s[i];
  }
  const T inv = T(1) / sum;
  const Vec vinv(inv);
  for (int64_t i = 0; i < body; i += W) {
    (Vec::loadu(s + i) * vinv).store(s + i);
  }
  for (int64_t i = body; i < n; ++i) {
    s[i] *= inv;
  }
}

// s[0:n) <- 1 / (1 + exp(-s[0:n))).
template <typename T>
void sigmoid_inplace(T* s, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  at::vec::map(
      [](Vec v) { return Vec(T(1)) / (Vec(T(1)) + v.neg().exp()); }, s, s, n);
}

} // namespace moeyard::ops::detail
