// unpermute against loop references: forward (per-token weighted gather,
// slot -1 skipped) in float32 / float64 / bfloat16 (with float32 or bfloat16
// weights), backward to rows and weights through autograd, edge shapes and
// bad input.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>

#include "ops/ops.h"
#include "reference/movement.h"

namespace {

using namespace moeyard_test;
namespace ops = moeyard::ops;

// T=5, K=2 over N=8 rows: dropped pairs (-1), rows 3 and 7 unused.
at::Tensor sample_slot() {
  return make_long({0, 4, 1, -1, 5, 2, -1, -1, 6, -1}, {5, 2});
}

TEST(UnpermuteOp, ForwardMatchesLoop) {
  at::manual_seed(30);
  const auto slot = sample_slot();
  struct Case {
    at::ScalarType rows, w;
    double tol;
  };
  for (const Case& c : std::vector<Case>{
           {at::kFloat, at::kFloat, 1e-6},
           {at::kDouble, at::kDouble, 1e-13},
           {at::kDouble, at::kFloat, 1e-6},
           {at::kBFloat16, at::kFloat, 2e-2},
           {at::kBFloat16, at::kBFloat16, 3e-2}}) {
    const auto rows = at::randn({8, 6}).to(c.rows);
    const auto w = at::rand({5, 2}).to(c.w);
    const auto y = ops::unpermute(rows, slot, w);
    EXPECT_EQ(y.scalar_type(), c.rows);
    EXPECT_TRUE(all_close(y, ref_unpermute(rows, slot, w), c.tol, c.tol))
        << c10::toString(c.rows) << " / " << c10::toString(c.w);
    // Token 3 has no kept pair.
    EXPECT_EQ(y[3].abs().sum().item<double>(), 0.0);
  }
}

TEST(UnpermuteOp, BackwardMatchesLoop) {
  at::manual_seed(31);
  const auto slot = sample_slot();
  for (auto [rdt, wdt] : std::vector<std::pair<at::ScalarType, at::ScalarType>>{
           {at::kDouble, at::kDouble},
           {at::kFloat, at::kFloat},
           {at::kBFloat16, at::kFloat}}) {
    auto rows = at::randn({8, 6}).to(rdt).requires_grad_(true);
    auto w = at::rand({5, 2}).to(wdt).requires_grad_(true);
    const auto g = at::randn({5, 6}).to(rdt);
    (ops::unpermute(rows, slot, w) * g).sum().backward();
    ASSERT_TRUE(rows.grad().defined());
    ASSERT_TRUE(w.grad().defined());
    EXPECT_EQ(rows.grad().scalar_type(), rdt);
    EXPECT_EQ(w.grad().scalar_type(), wdt);
    const auto [gr, gw] = ref_unpermute_grad(g, rows, slot, w);
    const double tol = rdt == at::kBFloat16 ? 3e-2 : 1e-5;
    SCOPED_TRACE(std::string(c10::toString(rdt)));
    EXPECT_TRUE(all_close(rows.grad(), gr, tol, tol));
    EXPECT_TRUE(all_close(w.grad(), gw, tol, tol));
    // Unused rows and dropped pairs get zero.
    EXPECT_EQ(rows.grad()[3].abs().sum().item<double>(), 0.0);
    EXPECT_EQ(rows.grad()[7].abs().sum().item<double>(), 0.0);
    EXPECT_EQ(w.grad()[1][1].item<double>(), 0.0);
    EXPECT_EQ(w.grad()[4][1].item<double>(), 0.0);
  }
}

TEST(UnpermuteOp, BackwardMatchesFiniteDifferences) {
  at::manual_seed(32);
  const auto slot = sample_slot();
  const auto rows0 = at::randn({8, 3}, at::kDouble);
  const auto w0 = at::rand({5, 2}, at::kDouble);
  const auto g = at::randn({5, 3}, at::kDouble);
  auto rows = rows0.clone().requires_grad_(true);
  auto w = w0.clone().requires_grad_(true);
  (ops::unpermute(rows, slot, w) * g).sum().backward();
  const auto fd_rows = numeric_grad(
      [&](const at::Tensor& r) {
        return dot_all(ref_unpermute(r, slot, w0), g);
      },
      rows0);
  const auto fd_w = numeric_grad(
      [&](const at::Tensor& v) {
        return dot_all(ref_unpermute(rows0, slot, v), g);
      },
      w0);
  EXPECT_TRUE(all_close(rows.grad(), fd_rows, 1e-8));
  EXPECT_TRUE(all_close(w.grad(), fd_w, 1e-8));
}

TEST(UnpermuteOp, EdgeShapes) {
  // T = 0 (and N = 0).
  {
    auto rows = at::randn({0, 4}).requires_grad_(true);
    auto w = at::rand({0, 2}).requires_grad_(true);
    auto y = ops::unpermute(rows, at::zeros({0, 2}, at::kLong), w);
    EXPECT_EQ(y.sizes(), (at::IntArrayRef{0, 4}));
    y.sum().backward();
    EXPECT_EQ(rows.grad().sizes(), (at::IntArrayRef{0, 4}));
    EXPECT_EQ(w.grad().sizes(), (at::IntArrayRef{0, 2}));
  }
  // Every pair dropped: y is zero, so are both gradients.
  {
    auto rows = at::randn({4, 3}).requires_grad_(true);
    auto w = at::rand({2, 2}).requires_grad_(true);
    auto y = ops::unpermute(rows, at::full({2, 2}, -1, at::kLong), w);
    EXPECT_TRUE(all_close(y, at::zeros({2, 3}), 0.0));
    (y * at::randn({2, 3})).sum().backward();
    EXPECT_TRUE(all_close(rows.grad(), at::zeros({4, 3}), 0.0));
    EXPECT_TRUE(all_close(w.grad(), at::zeros({2, 2}), 0.0));
  }
  // K = 1 and K = E (expert choice layout [T, E]).
  {
    at::manual_seed(33);
    const auto rows = at::randn({6, 2}, at::kDouble);
    const auto s1 = make_long({5, 0, 3}, {3, 1});
    const auto w1 = at::rand({3, 1}, at::kDouble);
    EXPECT_TRUE(all_close(
        ops::unpermute(rows, s1, w1), ref_unpermute(rows, s1, w1), 1e-14));
    const auto s2 = make_long({0, -1, 3, 1, 4, -1, 2, 5, -1}, {3, 3});
    const auto w2 = at::rand({3, 3}, at::kDouble);
    EXPECT_TRUE(all_close(
        ops::unpermute(rows, s2, w2), ref_unpermute(rows, s2, w2), 1e-14));
  }
  // Non-contiguous rows and weights.
  {
    at::manual_seed(34);
    const auto rows = at::randn({3, 8});
    const auto w = at::rand({2, 5});
    const auto slot = sample_slot();
    EXPECT_TRUE(all_close(
        ops::unpermute(rows.t(), slot, w.t()),
        ref_unpermute(rows.t(), slot, w.t()),
        1e-6));
  }
}

TEST(UnpermuteOp, BadInputNamesOpAndArgument) {
  const auto rows = at::randn({3, 2});
  const auto slot = make_long({0, 2}, {1, 2});
  const auto w = at::rand({1, 2});
  MOEYARD_EXPECT_ERROR(
      "unpermute: rows must be float32",
      ops::unpermute(at::ones({3, 2}, at::kLong), slot, w));
  MOEYARD_EXPECT_ERROR(
      "unpermute: rows must be 2-D", ops::unpermute(at::randn({3}), slot, w));
  MOEYARD_EXPECT_ERROR(
      "unpermute: slot must be int64",
      ops::unpermute(rows, slot.to(at::kFloat), w));
  MOEYARD_EXPECT_ERROR(
      "unpermute: slot must be 2-D", ops::unpermute(rows, slot.flatten(), w));
  MOEYARD_EXPECT_ERROR(
      "unpermute: weights must be float32",
      ops::unpermute(rows, slot, at::ones({1, 2}, at::kInt)));
  MOEYARD_EXPECT_ERROR(
      "unpermute: weights must have the shape of slot",
      ops::unpermute(rows, slot, at::rand({2, 1})));
  MOEYARD_EXPECT_ERROR(
      "unpermute: weights must be float32 or the dtype of rows",
      ops::unpermute(rows, slot, w.to(at::kDouble)));
  MOEYARD_EXPECT_ERROR(
      "unpermute: slot must be in [-1, num_rows=3), got 3 at token 0, slot 1",
      ops::unpermute(rows, make_long({0, 3}, {1, 2}), w));
  MOEYARD_EXPECT_ERROR(
      "unpermute: slot must be in [-1, num_rows=3), got -5",
      ops::unpermute(rows, make_long({-5, 0}, {1, 2}), w));
}

} // namespace
