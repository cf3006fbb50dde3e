// swiglu against loop references: forward in float32 / float64 / bfloat16
// (widths that exercise both the vectorized body and the scalar tail, large
// magnitudes), backward through autograd against the hand-written derivative
// and finite differences, edge shapes and bad input.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>

#include "ops/ops.h"
#include "reference/gemm.h"

namespace {

using namespace moeyard_test;
namespace ops = moeyard::ops;

TEST(SwigluOp, ForwardMatchesLoop) {
  at::manual_seed(50);
  for (int64_t F : {1, 3, 8, 13, 37}) {
    for (auto dt : {at::kFloat, at::kDouble, at::kBFloat16}) {
      auto gu = at::randn({4, 2 * F}) * 3;
      gu[0].fill_(-30.0); // silu saturates to 0 without NaN
      gu[1].narrow(0, 0, F).fill_(30.0); // silu(g) = g
      gu = gu.to(dt);
      const auto y = ops::swiglu(gu);
      EXPECT_EQ(y.sizes(), (at::IntArrayRef{4, F}));
      EXPECT_EQ(y.scalar_type(), dt);
      const double tol =
          dt == at::kDouble ? 1e-13 : (dt == at::kFloat ? 1e-5 : 2e-2);
      EXPECT_TRUE(all_close(y, ref_swiglu(gu), tol, tol))
          << "F=" << F << " " << c10::toString(dt);
      EXPECT_FALSE(at::isnan(y).any().item<bool>());
    }
  }
}

TEST(SwigluOp, BackwardMatchesLoop) {
  at::manual_seed(51);
  for (int64_t F : {3, 16, 21}) {
    for (auto dt : {at::kDouble, at::kFloat, at::kBFloat16}) {
      auto gu = (at::randn({5, 2 * F}) * 3).to(dt).requires_grad_(true);
      const auto g = at::randn({5, F}).to(dt);
      (ops::swiglu(gu) * g).sum().backward();
      ASSERT_TRUE(gu.grad().defined());
      EXPECT_EQ(gu.grad().scalar_type(), dt);
      const double tol =
          dt == at::kDouble ? 1e-12 : (dt == at::kFloat ? 1e-5 : 5e-2);
      EXPECT_TRUE(all_close(gu.grad(), ref_swiglu_grad(g, gu), tol, 2e-2))
          << "F=" << F << " " << c10::toString(dt);
    }
  }
}

TEST(SwigluOp, BackwardMatchesFiniteDifferences) {
  at::manual_seed(52);
  const auto gu0 = at::randn({3, 18}, at::kDouble) * 2; // F = 9: body + tail
  const auto g = at::randn({3, 9}, at::kDouble);
  auto gu = gu0.clone().requires_grad_(true);
  (ops::swiglu(gu) * g).sum().backward();
  const auto fd = numeric_grad(
      [&](const at::Tensor& v) { return dot_all(ref_swiglu(v), g); }, gu0);
  EXPECT_TRUE(all_close(gu.grad(), fd, 1e-8, 1e-7));
}

TEST(SwigluOp, EdgeShapes) {
  {
    auto gu = at::randn({0, 6}).requires_grad_(true);
    auto y = ops::swiglu(gu);
    EXPECT_EQ(y.sizes(), (at::IntArrayRef{0, 3}));
    y.sum().backward();
    EXPECT_EQ(gu.grad().sizes(), (at::IntArrayRef{0, 6}));
  }
  {
    auto y = ops::swiglu(at::randn({3, 0}));
    EXPECT_EQ(y.sizes(), (at::IntArrayRef{3, 0}));
  }
  {
    // Non-contiguous: a column slice of a wider tensor.
    const auto base = at::randn({4, 10}, at::kDouble);
    const auto gu = base.narrow(1, 1, 8);
    EXPECT_FALSE(gu.is_contiguous());
    EXPECT_TRUE(all_close(ops::swiglu(gu), ref_swiglu(gu), 1e-13));
  }
}

TEST(SwigluOp, BadInputNamesOpAndArgument) {
  MOEYARD_EXPECT_ERROR(
      "swiglu: gate_up must be float32",
      ops::swiglu(at::ones({2, 4}, at::kInt)));
  MOEYARD_EXPECT_ERROR(
      "swiglu: gate_up must be 2-D", ops::swiglu(at::randn({4})));
  MOEYARD_EXPECT_ERROR(
      "swiglu: gate_up must be 2-D", ops::swiglu(at::randn({2, 2, 4})));
  MOEYARD_EXPECT_ERROR(
      "swiglu: gate_up must have an even number of columns (gate then up), "
      "got 5",
      ops::swiglu(at::randn({2, 5})));
  MOEYARD_EXPECT_ERROR(
      "swiglu_backward: grad must have shape [2, 2]",
      ops::swiglu_backward(at::randn({2, 3}), at::randn({2, 4})));
}

} // namespace
