#pragma once
// Naive loop references of permute and unpermute (forward and gradients).
// Every reference works in float64 with plain loops through tensor
// accessors; none reuses the ATen formulas or the kernels it checks.

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "reference/helpers.h"

namespace moeyard_test {

// ---- permute / unpermute
// ---------------------------------------------------------

inline at::Tensor ref_permute(const at::Tensor& x_in, const at::Tensor& rt_in) {
  const auto x = f64(x_in);
  const auto rt = i64(rt_in);
  const int64_t N = rt.size(0), H = x.size(1);
  auto out = at::zeros({N, H}, at::kDouble);
  auto O = out.accessor<double, 2>();
  const auto X = x.accessor<double, 2>();
  const auto R = rt.accessor<int64_t, 1>();
  for (int64_t i = 0; i < N; ++i) {
    if (R[i] < 0) {
      continue;
    }
    for (int64_t h = 0; h < H; ++h) {
      O[i][h] = X[R[i]][h];
    }
  }
  return out;
}

inline at::Tensor ref_permute_grad(
    const at::Tensor& g_in, const at::Tensor& rt_in, int64_t T) {
  const auto g = f64(g_in);
  const auto rt = i64(rt_in);
  const int64_t N = rt.size(0), H = g.size(1);
  auto out = at::zeros({T, H}, at::kDouble);
  auto O = out.accessor<double, 2>();
  const auto G = g.accessor<double, 2>();
  const auto R = rt.accessor<int64_t, 1>();
  for (int64_t i = 0; i < N; ++i) {
    if (R[i] < 0) {
      continue;
    }
    for (int64_t h = 0; h < H; ++h) {
      O[R[i]][h] += G[i][h];
    }
  }
  return out;
}

inline at::Tensor ref_unpermute(
    const at::Tensor& rows_in,
    const at::Tensor& slot_in,
    const at::Tensor& w_in) {
  const auto rows = f64(rows_in);
  const auto slot = i64(slot_in);
  const auto w = f64(w_in);
  const int64_t T = slot.size(0), K = slot.size(1), H = rows.size(1);
  auto y = at::zeros({T, H}, at::kDouble);
  auto Y = y.accessor<double, 2>();
  const auto Rw = rows.accessor<double, 2>();
  const auto S = slot.accessor<int64_t, 2>();
  const auto Wt = w.accessor<double, 2>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      if (S[t][k] < 0) {
        continue;
      }
      for (int64_t h = 0; h < H; ++h) {
        Y[t][h] += Wt[t][k] * Rw[S[t][k]][h];
      }
    }
  }
  return y;
}

// Gradients of sum(grad_y * unpermute(rows, slot, weights)).
inline std::pair<at::Tensor, at::Tensor> ref_unpermute_grad(
    const at::Tensor& gy_in,
    const at::Tensor& rows_in,
    const at::Tensor& slot_in,
    const at::Tensor& w_in) {
  const auto gy = f64(gy_in);
  const auto rows = f64(rows_in);
  const auto slot = i64(slot_in);
  const auto w = f64(w_in);
  const int64_t T = slot.size(0), K = slot.size(1), H = rows.size(1);
  auto grows = at::zeros_like(rows);
  auto gw = at::zeros({T, K}, at::kDouble);
  auto GR = grows.accessor<double, 2>();
  auto GW = gw.accessor<double, 2>();
  const auto GY = gy.accessor<double, 2>();
  const auto Rw = rows.accessor<double, 2>();
  const auto S = slot.accessor<int64_t, 2>();
  const auto Wt = w.accessor<double, 2>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = S[t][k];
      if (r < 0) {
        continue;
      }
      for (int64_t h = 0; h < H; ++h) {
        GR[r][h] += Wt[t][k] * GY[t][h];
        GW[t][k] += GY[t][h] * Rw[r][h];
      }
    }
  }
  return {grows, gw};
}

} // namespace moeyard_test
