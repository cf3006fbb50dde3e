// permute against loop references: forward (a gather, padding rows zero) in
// float32 / float64 / bfloat16, backward (scatter-add by row_token) through
// autograd, edge shapes and bad input.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>

#include "ops/ops.h"
#include "reference/movement.h"

namespace {

using namespace moeyard_test;
namespace ops = moeyard::ops;

// Rows with duplicates, padding (-1) and a token (4) that no row names.
at::Tensor sample_row_token() {
  return make_long({2, 0, -1, 2, 1, 3, -1, 0, 2, 5}, {10});
}

TEST(PermuteOp, ForwardMatchesLoop) {
  at::manual_seed(20);
  const auto rt = sample_row_token();
  for (auto dt : {at::kFloat, at::kDouble, at::kBFloat16}) {
    const auto x = at::randn({6, 5}).to(dt);
    const auto rows = ops::permute(x, rt);
    EXPECT_EQ(rows.scalar_type(), dt);
    // A copy: exact in every dtype, padding rows are zero.
    EXPECT_TRUE(all_close(rows, ref_permute(x, rt), 0.0)) << c10::toString(dt);
    EXPECT_EQ(rows[2].abs().sum().item<double>(), 0.0);
  }
}

TEST(PermuteOp, BackwardMatchesLoop) {
  at::manual_seed(21);
  const auto rt = sample_row_token();
  for (auto dt : {at::kDouble, at::kFloat, at::kBFloat16}) {
    auto x = at::randn({6, 5}).to(dt).requires_grad_(true);
    const auto g = at::randn({10, 5}).to(dt);
    (ops::permute(x, rt) * g).sum().backward();
    ASSERT_TRUE(x.grad().defined());
    EXPECT_EQ(x.grad().scalar_type(), dt);
    const double tol = dt == at::kBFloat16 ? 3e-2 : 1e-6;
    const auto ref = ref_permute_grad(g, rt, 6);
    EXPECT_TRUE(all_close(x.grad(), ref, tol, tol)) << c10::toString(dt);
    // Token 4 is in no row: zero gradient.
    EXPECT_EQ(x.grad()[4].abs().sum().item<double>(), 0.0);
  }
}

TEST(PermuteOp, BackwardMatchesFiniteDifferences) {
  at::manual_seed(22);
  const auto rt = sample_row_token();
  const auto x0 = at::randn({6, 3}, at::kDouble);
  const auto g = at::randn({10, 3}, at::kDouble);
  auto x = x0.clone().requires_grad_(true);
  (ops::permute(x, rt) * g).sum().backward();
  const auto fd = numeric_grad(
      [&](const at::Tensor& v) { return dot_all(ref_permute(v, rt), g); }, x0);
  EXPECT_TRUE(all_close(x.grad(), fd, 1e-8));
}

// Wide rows (several 256-column blocks in the backward) and many rows.
TEST(PermuteOp, WideRowsForwardAndBackward) {
  at::manual_seed(23);
  const int64_t T = 70, H = 600, N = 150;
  const auto rt = at::randint(-1, T, {N}, at::kLong);
  auto x = at::randn({T, H}, at::kDouble).requires_grad_(true);
  const auto g = at::randn({N, H}, at::kDouble);
  auto rows = ops::permute(x, rt);
  EXPECT_TRUE(all_close(rows, ref_permute(x, rt), 0.0));
  (rows * g).sum().backward();
  EXPECT_TRUE(all_close(x.grad(), ref_permute_grad(g, rt, T), 1e-12));
}

TEST(PermuteOp, EdgeShapes) {
  // T = 0, N = 0.
  {
    auto x = at::randn({0, 4}).requires_grad_(true);
    auto rows = ops::permute(x, at::zeros({0}, at::kLong));
    EXPECT_EQ(rows.sizes(), (at::IntArrayRef{0, 4}));
    rows.sum().backward();
    EXPECT_EQ(x.grad().sizes(), (at::IntArrayRef{0, 4}));
  }
  // T = 0 with padding rows only.
  {
    auto rows = ops::permute(at::randn({0, 4}), at::full({3}, -1, at::kLong));
    EXPECT_TRUE(all_close(rows, at::zeros({3, 4}), 0.0));
  }
  // N = 0 with tokens: gradient of every token is zero.
  {
    auto x = at::randn({3, 2}).requires_grad_(true);
    auto rows = ops::permute(x, at::zeros({0}, at::kLong));
    EXPECT_EQ(rows.sizes(), (at::IntArrayRef{0, 2}));
    rows.sum().backward();
    EXPECT_TRUE(all_close(x.grad(), at::zeros({3, 2}), 0.0));
  }
  // All rows from one token (all tokens to one expert, capacity 1 layout).
  {
    auto x = at::randn({4, 3}, at::kDouble).requires_grad_(true);
    const auto rt = make_long({1, 1, 1}, {3});
    const auto g = at::randn({3, 3}, at::kDouble);
    auto rows = ops::permute(x, rt);
    EXPECT_TRUE(all_close(rows, ref_permute(x, rt), 0.0));
    (rows * g).sum().backward();
    EXPECT_TRUE(all_close(x.grad(), ref_permute_grad(g, rt, 4), 1e-12));
  }
  // Non-contiguous x.
  {
    const auto base = at::randn({5, 6});
    const auto rt = make_long({4, 0, -1, 5}, {4});
    EXPECT_TRUE(
        all_close(ops::permute(base.t(), rt), ref_permute(base.t(), rt), 0.0));
  }
}

TEST(PermuteOp, BadInputNamesOpAndArgument) {
  const auto x = at::randn({3, 2});
  const auto rt = make_long({0, 2}, {2});
  MOEYARD_EXPECT_ERROR(
      "permute: x must be float32",
      ops::permute(at::ones({3, 2}, at::kInt), rt));
  MOEYARD_EXPECT_ERROR(
      "permute: x must be 2-D", ops::permute(at::randn({3}), rt));
  MOEYARD_EXPECT_ERROR(
      "permute: row_token must be int64", ops::permute(x, rt.to(at::kFloat)));
  MOEYARD_EXPECT_ERROR(
      "permute: row_token must be int64", ops::permute(x, rt.to(at::kInt)));
  MOEYARD_EXPECT_ERROR(
      "permute: row_token must be 1-D", ops::permute(x, rt.view({1, 2})));
  MOEYARD_EXPECT_ERROR(
      "permute: row_token must be in [-1, num_tokens=3), got 3 at row 1",
      ops::permute(x, make_long({0, 3}, {2})));
  MOEYARD_EXPECT_ERROR(
      "permute: row_token must be in [-1, num_tokens=3), got -2",
      ops::permute(x, make_long({-2}, {1})));
}

} // namespace
