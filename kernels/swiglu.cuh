#pragma once
// swiglu's element math, shared by the CPU kernel's scalar path and the CUDA
// kernels.

#include <cmath>

#include "common.cuh"

namespace moeyard::kernels::swiglu {

template <typename Acc>
MOEYARD_HD Acc sigmoid(Acc x) {
  return Acc(1) / (Acc(1) + exp(-x));
}

// silu(g) * u
template <typename Acc>
MOEYARD_HD Acc forward(Acc g, Acc u) {
  return g * sigmoid(g) * u;
}

// d gate and d up from d out.
template <typename Acc>
MOEYARD_HD void backward(Acc dy, Acc g, Acc u, Acc& dg, Acc& du) {
  const Acc sig = sigmoid(g);
  dg = dy * u * sig * (Acc(1) + g * (Acc(1) - sig));
  du = dy * g * sig;
}

// Whether row r of N lies in the rows the expert offsets span
// ([offsets[0], offsets[n_off - 1]), clamped to [0, N]; every row without
// offsets): rows outside are zero and their inputs are not read.
MOEYARD_HD bool in_span(
    int64_t r, int64_t N, const int64_t* offsets, int64_t n_off) {
  if (offsets == nullptr) {
    return true;
  }
  const int64_t lo = offsets[0] < 0 ? 0 : offsets[0];
  const int64_t hi = offsets[n_off - 1] > N ? N : offsets[n_off - 1];
  return r >= lo && r < hi;
}

#if defined(__CUDACC__)

template <typename scalar_t, typename Acc>
__global__ void forward_kernel(
    const scalar_t* __restrict__ gate_up,
    int64_t N,
    int64_t F,
    const int64_t* __restrict__ offsets,
    int64_t n_off,
    scalar_t* __restrict__ out) {
  const int64_t n = N * F;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / F, j = i % F;
    if (!in_span(r, N, offsets, n_off)) {
      out[i] = scalar_t(0);
      continue;
    }
    const scalar_t* row = gate_up + r * 2 * F;
    out[i] = static_cast<scalar_t>(
        forward(static_cast<Acc>(row[j]), static_cast<Acc>(row[F + j])));
  }
}

template <typename scalar_t, typename Acc>
__global__ void backward_kernel(
    const scalar_t* __restrict__ grad,
    const scalar_t* __restrict__ gate_up,
    int64_t N,
    int64_t F,
    const int64_t* __restrict__ offsets,
    int64_t n_off,
    scalar_t* __restrict__ grad_gate_up) {
  const int64_t n = N * F;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / F, j = i % F;
    if (!in_span(r, N, offsets, n_off)) {
      grad_gate_up[r * 2 * F + j] = scalar_t(0);
      grad_gate_up[r * 2 * F + F + j] = scalar_t(0);
      continue;
    }
    const scalar_t* row = gate_up + r * 2 * F;
    Acc dg, du;
    backward(
        static_cast<Acc>(grad[i]),
        static_cast<Acc>(row[j]),
        static_cast<Acc>(row[F + j]),
        dg,
        du);
    grad_gate_up[r * 2 * F + j] = static_cast<scalar_t>(dg);
    grad_gate_up[r * 2 * F + F + j] = static_cast<scalar_t>(du);
  }
}

#endif // __CUDACC__

} // namespace moeyard::kernels::swiglu
