#pragma once
// Naive loop references of grouped_mm and swiglu (forward and gradients).
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

// ---- grouped_mm / swiglu
// ----------------------------------------------------------

inline at::Tensor ref_grouped_mm(
    const at::Tensor& in_, const at::Tensor& w_, const at::Tensor& off_) {
  const auto in = f64(in_);
  const auto w = f64(w_);
  const auto off = i64(off_);
  const int64_t N = in.size(0), Din = in.size(1);
  const int64_t E = w.size(0), Dout = w.size(1);
  auto out = at::zeros({N, Dout}, at::kDouble);
  auto O = out.accessor<double, 2>();
  const auto X = in.accessor<double, 2>();
  const auto Wt = w.accessor<double, 3>();
  const auto OF = off.accessor<int64_t, 1>();
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t i = OF[e]; i < OF[e + 1]; ++i) {
      for (int64_t o = 0; o < Dout; ++o) {
        double acc = 0;
        for (int64_t d = 0; d < Din; ++d) {
          acc += X[i][d] * Wt[e][o][d];
        }
        O[i][o] = acc;
      }
    }
  }
  return out;
}

// Gradients of sum(g * grouped_mm(input, weight, offsets)).
inline std::pair<at::Tensor, at::Tensor> ref_grouped_mm_grad(
    const at::Tensor& g_,
    const at::Tensor& in_,
    const at::Tensor& w_,
    const at::Tensor& off_) {
  const auto g = f64(g_);
  const auto in = f64(in_);
  const auto w = f64(w_);
  const auto off = i64(off_);
  const int64_t Din = in.size(1);
  const int64_t E = w.size(0), Dout = w.size(1);
  auto gin = at::zeros_like(in);
  auto gw = at::zeros_like(w);
  auto GI = gin.accessor<double, 2>();
  auto GW = gw.accessor<double, 3>();
  const auto G = g.accessor<double, 2>();
  const auto X = in.accessor<double, 2>();
  const auto Wt = w.accessor<double, 3>();
  const auto OF = off.accessor<int64_t, 1>();
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t i = OF[e]; i < OF[e + 1]; ++i) {
      for (int64_t o = 0; o < Dout; ++o) {
        for (int64_t d = 0; d < Din; ++d) {
          GI[i][d] += G[i][o] * Wt[e][o][d];
          GW[e][o][d] += G[i][o] * X[i][d];
        }
      }
    }
  }
  return {gin, gw};
}

inline at::Tensor ref_swiglu(const at::Tensor& gu_) {
  const auto gu = f64(gu_);
  const int64_t N = gu.size(0), F = gu.size(1) / 2;
  auto out = at::zeros({N, F}, at::kDouble);
  auto O = out.accessor<double, 2>();
  const auto X = gu.accessor<double, 2>();
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t j = 0; j < F; ++j) {
      O[i][j] = silu(X[i][j]) * X[i][F + j];
    }
  }
  return out;
}

// Gradient of sum(g * swiglu(gate_up)): d/dg silu(g) = s + g s (1 - s).
inline at::Tensor ref_swiglu_grad(const at::Tensor& g_, const at::Tensor& gu_) {
  const auto g = f64(g_);
  const auto gu = f64(gu_);
  const int64_t N = gu.size(0), F = gu.size(1) / 2;
  auto out = at::zeros_like(gu);
  auto O = out.accessor<double, 2>();
  const auto X = gu.accessor<double, 2>();
  const auto G = g.accessor<double, 2>();
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t j = 0; j < F; ++j) {
      const double a = X[i][j], b = X[i][F + j], s = sigmoid(a);
      O[i][j] = G[i][j] * b * (s + a * s * (1 - s));
      O[i][F + j] = G[i][j] * silu(a);
    }
  }
  return out;
}

} // namespace moeyard_test
