#pragma once
// Test helpers shared by the op tests: error capture, float64/int64 views,
// closeness and equality assertions, finite-difference gradients.
// Every reference works in float64 with plain loops through tensor
// accessors; none reuses the ATen formulas or the kernels it checks.

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

namespace moeyard_test {

// ---- helpers ----------------------------------------------------------------

// Message of the c10::Error that fn throws, "" if it throws nothing.
template <typename Fn>
std::string error_message(Fn&& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

// EXPECT_THROW(stmt, c10::Error) and the message contains `substr`.
#define MOEYARD_EXPECT_ERROR(substr, ...)                                      \
  do {                                                                         \
    EXPECT_THROW({ __VA_ARGS__; }, c10::Error);                                \
    const std::string moeyard_msg_ =                                           \
        ::moeyard_test::error_message([&] { __VA_ARGS__; });                   \
    EXPECT_NE(moeyard_msg_.find(substr), std::string::npos)                    \
        << "expected \"" << (substr) << "\" in the message: " << moeyard_msg_; \
  } while (0)

inline at::Tensor f64(const at::Tensor& t) {
  return t.detach().to(at::kDouble).contiguous();
}

inline at::Tensor i64(const at::Tensor& t) {
  return t.detach().to(at::kLong).contiguous();
}

// Element-wise |got - want| <= atol + rtol * |want|, same shape.
inline ::testing::AssertionResult all_close(
    const at::Tensor& got,
    const at::Tensor& want,
    double atol,
    double rtol = 0.0) {
  if (got.sizes() != want.sizes()) {
    return ::testing::AssertionFailure()
           << "shape " << got.sizes() << " != expected " << want.sizes();
  }
  const auto g = f64(got).flatten();
  const auto w = f64(want).flatten();
  const auto G = g.accessor<double, 1>();
  const auto W = w.accessor<double, 1>();
  int64_t bad = 0;
  std::ostringstream first;
  for (int64_t i = 0; i < g.size(0); ++i) {
    const double tol = atol + rtol * std::abs(W[i]);
    const bool ok =
        std::abs(G[i] - W[i]) <= tol || (std::isnan(G[i]) && std::isnan(W[i]));
    if (!ok) {
      if (bad < 5) {
        first << " [" << i << "] got " << G[i] << " want " << W[i] << ";";
      }
      ++bad;
    }
  }
  if (bad == 0) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure()
         << bad << " of " << g.size(0) << " elements differ (atol " << atol
         << ", rtol " << rtol << "):" << first.str();
}

// Exact equality of integer tensors, with the first differences printed.
inline ::testing::AssertionResult all_equal(
    const at::Tensor& got, const at::Tensor& want) {
  if (got.sizes() != want.sizes()) {
    return ::testing::AssertionFailure()
           << "shape " << got.sizes() << " != expected " << want.sizes();
  }
  const auto g = i64(got).flatten();
  const auto w = i64(want).flatten();
  const auto G = g.accessor<int64_t, 1>();
  const auto W = w.accessor<int64_t, 1>();
  std::ostringstream diff;
  int64_t bad = 0;
  for (int64_t i = 0; i < g.size(0); ++i) {
    if (G[i] != W[i]) {
      if (bad < 8) {
        diff << " [" << i << "] got " << G[i] << " want " << W[i] << ";";
      }
      ++bad;
    }
  }
  if (bad == 0) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure()
         << bad << " of " << g.size(0) << " entries differ:" << diff.str();
}

inline at::Tensor make_long(
    std::vector<int64_t> v, std::vector<int64_t> shape) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, at::kLong);
  auto A = t.accessor<int64_t, 1>();
  for (size_t i = 0; i < v.size(); ++i) {
    A[i] = v[i];
  }
  return t.view(shape).clone();
}

inline at::Tensor make_double(
    std::vector<double> v, std::vector<int64_t> shape) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, at::kDouble);
  auto A = t.accessor<double, 1>();
  for (size_t i = 0; i < v.size(); ++i) {
    A[i] = v[i];
  }
  return t.view(shape).clone();
}

// Central differences of a scalar function of one float64 tensor.
inline at::Tensor numeric_grad(
    const std::function<double(const at::Tensor&)>& f,
    const at::Tensor& x,
    double eps = 1e-6) {
  auto base = f64(x).clone();
  auto grad = at::zeros_like(base);
  auto flat = base.view({-1});
  auto gflat = grad.view({-1});
  auto B = flat.accessor<double, 1>();
  auto Gr = gflat.accessor<double, 1>();
  for (int64_t i = 0; i < flat.size(0); ++i) {
    const double v = B[i];
    B[i] = v + eps;
    const double fp = f(base);
    B[i] = v - eps;
    const double fm = f(base);
    B[i] = v;
    Gr[i] = (fp - fm) / (2 * eps);
  }
  return grad;
}

// sum(a * b) over all elements, in float64 loops.
inline double dot_all(const at::Tensor& a, const at::Tensor& b) {
  const auto x = f64(a).flatten();
  const auto y = f64(b).flatten();
  const auto X = x.accessor<double, 1>();
  const auto Y = y.accessor<double, 1>();
  double s = 0;
  for (int64_t i = 0; i < x.size(0); ++i) {
    s += X[i] * Y[i];
  }
  return s;
}

inline double sigmoid(double v) {
  return 1.0 / (1.0 + std::exp(-v));
}

inline double silu(double v) {
  return v * sigmoid(v);
}

} // namespace moeyard_test
