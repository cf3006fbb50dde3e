// grouped_mm against loop references: forward in float32 / float64 /
// bfloat16 with empty experts and rows outside every expert range, backward
// to input and weight through autograd, edge shapes and bad input.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>

#include "ops/ops.h"
#include "reference/gemm.h"

namespace {

using namespace moeyard_test;
namespace ops = moeyard::ops;

TEST(GroupedMmOp, ForwardMatchesLoop) {
  at::manual_seed(40);
  // N = 9 rows, E = 4: expert 1 empty, row 0 and rows 8 outside every range.
  const auto off = make_long({1, 4, 4, 6, 8}, {5});
  for (auto dt : {at::kFloat, at::kDouble, at::kBFloat16}) {
    const auto in = at::randn({9, 5}).to(dt);
    const auto w = at::randn({4, 3, 5}).to(dt);
    const auto out = ops::grouped_mm(in, w, off);
    EXPECT_EQ(out.scalar_type(), dt);
    const double tol =
        dt == at::kDouble ? 1e-12 : (dt == at::kFloat ? 1e-5 : 5e-2);
    EXPECT_TRUE(all_close(out, ref_grouped_mm(in, w, off), tol, tol))
        << c10::toString(dt);
    EXPECT_EQ(out[0].abs().sum().item<double>(), 0.0);
    EXPECT_EQ(out[8].abs().sum().item<double>(), 0.0);
  }
  // Offsets covering all rows (the usual dropless case).
  const auto off2 = make_long({0, 3, 3, 7, 9}, {5});
  const auto in = at::randn({9, 5}, at::kDouble);
  const auto w = at::randn({4, 3, 5}, at::kDouble);
  EXPECT_TRUE(all_close(
      ops::grouped_mm(in, w, off2), ref_grouped_mm(in, w, off2), 1e-12));
}

TEST(GroupedMmOp, BackwardMatchesLoop) {
  at::manual_seed(41);
  const auto off = make_long({1, 4, 4, 6, 8}, {5});
  for (auto dt : {at::kDouble, at::kFloat, at::kBFloat16}) {
    auto in = at::randn({9, 5}).to(dt).requires_grad_(true);
    auto w = at::randn({4, 3, 5}).to(dt).requires_grad_(true);
    const auto g = at::randn({9, 3}).to(dt);
    (ops::grouped_mm(in, w, off) * g).sum().backward();
    ASSERT_TRUE(in.grad().defined());
    ASSERT_TRUE(w.grad().defined());
    const auto [gi, gw] = ref_grouped_mm_grad(g, in, w, off);
    const double tol =
        dt == at::kDouble ? 1e-12 : (dt == at::kFloat ? 1e-5 : 1e-1);
    SCOPED_TRACE(std::string(c10::toString(dt)));
    EXPECT_TRUE(all_close(in.grad(), gi, tol, 2e-2));
    EXPECT_TRUE(all_close(w.grad(), gw, tol, 2e-2));
    // Rows outside every range and the empty expert get zero gradient.
    EXPECT_EQ(in.grad()[0].abs().sum().item<double>(), 0.0);
    EXPECT_EQ(in.grad()[8].abs().sum().item<double>(), 0.0);
    EXPECT_EQ(w.grad()[1].abs().sum().item<double>(), 0.0);
  }
}

TEST(GroupedMmOp, BackwardMatchesFiniteDifferences) {
  at::manual_seed(42);
  const auto off = make_long({0, 2, 2, 5}, {4});
  const auto in0 = at::randn({6, 3}, at::kDouble);
  const auto w0 = at::randn({3, 2, 3}, at::kDouble);
  const auto g = at::randn({6, 2}, at::kDouble);
  auto in = in0.clone().requires_grad_(true);
  auto w = w0.clone().requires_grad_(true);
  (ops::grouped_mm(in, w, off) * g).sum().backward();
  EXPECT_TRUE(all_close(
      in.grad(),
      numeric_grad(
          [&](const at::Tensor& v) {
            return dot_all(ref_grouped_mm(v, w0, off), g);
          },
          in0),
      1e-8));
  EXPECT_TRUE(all_close(
      w.grad(),
      numeric_grad(
          [&](const at::Tensor& v) {
            return dot_all(ref_grouped_mm(in0, v, off), g);
          },
          w0),
      1e-8));
}

TEST(GroupedMmOp, EdgeShapes) {
  // N = 0.
  {
    auto in = at::randn({0, 4}).requires_grad_(true);
    auto w = at::randn({3, 2, 4}).requires_grad_(true);
    auto out = ops::grouped_mm(in, w, at::zeros({4}, at::kLong));
    EXPECT_EQ(out.sizes(), (at::IntArrayRef{0, 2}));
    out.sum().backward();
    EXPECT_EQ(in.grad().sizes(), (at::IntArrayRef{0, 4}));
    EXPECT_TRUE(all_close(w.grad(), at::zeros({3, 2, 4}), 0.0));
  }
  // E = 1.
  {
    const auto in = at::randn({4, 3}, at::kDouble);
    const auto w = at::randn({1, 5, 3}, at::kDouble);
    const auto off = make_long({0, 4}, {2});
    EXPECT_TRUE(all_close(
        ops::grouped_mm(in, w, off), ref_grouped_mm(in, w, off), 1e-12));
  }
  // All rows to one expert, every other expert empty.
  {
    auto in = at::randn({5, 3}, at::kDouble).requires_grad_(true);
    auto w = at::randn({4, 2, 3}, at::kDouble).requires_grad_(true);
    const auto off = make_long({0, 0, 0, 5, 5}, {5});
    const auto g = at::randn({5, 2}, at::kDouble);
    auto out = ops::grouped_mm(in, w, off);
    EXPECT_TRUE(all_close(out, ref_grouped_mm(in, w, off), 1e-12));
    (out * g).sum().backward();
    const auto [gi, gw] = ref_grouped_mm_grad(g, in, w, off);
    EXPECT_TRUE(all_close(in.grad(), gi, 1e-12));
    EXPECT_TRUE(all_close(w.grad(), gw, 1e-12));
  }
  // Capacity layout with one row per expert and padding rows after it.
  {
    const auto in = at::randn({6, 3}, at::kDouble);
    const auto w = at::randn({3, 2, 3}, at::kDouble);
    const auto off = make_long({0, 1, 1, 6}, {4});
    EXPECT_TRUE(all_close(
        ops::grouped_mm(in, w, off), ref_grouped_mm(in, w, off), 1e-12));
  }
  // Non-contiguous input and weight.
  {
    const auto in = at::randn({3, 6});
    const auto w = at::randn({2, 3, 4}).transpose(1, 2); // [2, 4, 3]
    const auto off = make_long({0, 2, 6}, {3});
    EXPECT_TRUE(all_close(
        ops::grouped_mm(in.t(), w, off),
        ref_grouped_mm(in.t(), w, off),
        1e-5,
        1e-5));
  }
}

TEST(GroupedMmOp, BadInputNamesOpAndArgument) {
  const auto in = at::randn({3, 2});
  const auto w = at::randn({2, 4, 2});
  const auto off = make_long({0, 1, 3}, {3});
  MOEYARD_EXPECT_ERROR(
      "grouped_mm: input must be float32",
      ops::grouped_mm(at::ones({3, 2}, at::kLong), w, off));
  MOEYARD_EXPECT_ERROR(
      "grouped_mm: input must be 2-D", ops::grouped_mm(at::randn({3}), w, off));
  MOEYARD_EXPECT_ERROR(
      "grouped_mm: weight must be 3-D",
      ops::grouped_mm(in, at::randn({4, 2}), off));
  MOEYARD_EXPECT_ERROR(
      "grouped_mm: input and weight must have the same dtype",
      ops::grouped_mm(in, w.to(at::kDouble), off));
  MOEYARD_EXPECT_ERROR(
      "grouped_mm: expert_offsets must be int64",
      ops::grouped_mm(in, w, off.to(at::kFloat)));
  MOEYARD_EXPECT_ERROR(
      "grouped_mm: expert_offsets must have num_experts + 1 = 3 entries, got 2",
      ops::grouped_mm(in, w, make_long({0, 3}, {2})));
  MOEYARD_EXPECT_ERROR(
      "grouped_mm: input has 2 features but weight expects 3",
      ops::grouped_mm(in, at::randn({2, 4, 3}), off));
  MOEYARD_EXPECT_ERROR(
      "grouped_mm: expert_offsets must be non-decreasing within [0, "
      "num_rows=3]",
      ops::grouped_mm(in, w, make_long({0, 2, 1}, {3})));
  MOEYARD_EXPECT_ERROR(
      "grouped_mm: expert_offsets must be non-decreasing",
      ops::grouped_mm(in, w, make_long({0, 1, 4}, {3})));
  MOEYARD_EXPECT_ERROR(
      "grouped_mm: expert_offsets must be non-decreasing",
      ops::grouped_mm(in, w, make_long({-1, 1, 3}, {3})));
}

} // namespace
