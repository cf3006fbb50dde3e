// router_topk against the naive loop reference: forward in float32 / float64
// / bfloat16, selection bias, group-limited selection, ties, backward through
// C++ autograd against finite differences of the reference, edge shapes and
// bad input.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "ops/ops.h"
#include "reference/routing.h"

namespace {

using namespace moeyard_test;
namespace ops = moeyard::ops;

TEST(RouterTopkOp, ForwardMatchesLoopReference) {
  at::manual_seed(1);
  for (auto dtype : {at::kFloat, at::kDouble}) {
    const double tol = dtype == at::kDouble ? 1e-12 : 2e-6;
    for (const char* fn : {"softmax", "sigmoid"}) {
      for (bool renorm : {true, false}) {
        for (double scale : {1.0, 2.5}) {
          const auto logits = at::randn({7, 8}, dtype) * 2;
          auto [w, idx, s] = ops::router_topk(logits, 3, fn, renorm, scale);
          const auto ref = ref_router_topk(
              logits, 3, std::string(fn) == "sigmoid", renorm, scale);
          SCOPED_TRACE(
              std::string(fn) + " renorm=" + std::to_string(renorm) +
              " scale=" + std::to_string(scale) + " " +
              std::string(c10::toString(dtype)));
          EXPECT_EQ(w.scalar_type(), dtype);
          EXPECT_EQ(s.scalar_type(), dtype);
          EXPECT_EQ(idx.scalar_type(), at::kLong);
          EXPECT_TRUE(all_equal(idx, ref.indices));
          EXPECT_TRUE(all_close(w, ref.weights, tol, tol));
          EXPECT_TRUE(all_close(s, ref.scores, tol, tol));
          if (renorm) {
            EXPECT_TRUE(all_close(w.sum(1), at::full({7}, scale), 1e-5));
          }
        }
      }
    }
  }
}

TEST(RouterTopkOp, Bfloat16ForwardCloseToReference) {
  at::manual_seed(2);
  for (const char* fn : {"softmax", "sigmoid"}) {
    const auto logits = (at::randn({16, 8}) * 2).to(at::kBFloat16);
    auto [w, idx, s] = ops::router_topk(logits, 2, fn, true, 1.0);
    EXPECT_EQ(w.scalar_type(), at::kBFloat16);
    EXPECT_EQ(s.scalar_type(), at::kBFloat16);
    // The reference sees the same bfloat16 logits, so the choice agrees.
    const auto ref =
        ref_router_topk(logits, 2, std::string(fn) == "sigmoid", true, 1.0);
    EXPECT_TRUE(all_equal(idx, ref.indices)) << fn;
    EXPECT_TRUE(all_close(w, ref.weights, 1e-2, 1e-2)) << fn;
    EXPECT_TRUE(all_close(s, ref.scores, 1e-2, 1e-2)) << fn;
  }
}

TEST(RouterTopkOp, SelectionBiasShiftsChoiceNotWeights) {
  at::manual_seed(3);
  const auto logits = at::randn({10, 6}, at::kDouble);
  // A large bias on expert 4 forces it into every token's top-2.
  const auto bias = make_double({0, 0, 0, 0, 5.0, -5.0}, {6});
  for (const char* fn : {"sigmoid", "softmax"}) {
    const bool sig = std::string(fn) == "sigmoid";
    auto [w, idx, s] = ops::router_topk(logits, 2, fn, true, 1.5, bias);
    const auto ref = ref_router_topk(logits, 2, sig, true, 1.5, bias);
    EXPECT_TRUE(all_equal(idx, ref.indices)) << fn;
    EXPECT_TRUE(all_close(w, ref.weights, 1e-12, 1e-12)) << fn;
    // Scores stay unbiased.
    EXPECT_TRUE(
        all_close(s, ref_router_topk(logits, 2, sig, true, 1.5).scores, 1e-12))
        << fn;
    for (int64_t t = 0; t < 10; ++t) {
      EXPECT_EQ(idx[t][0].item<int64_t>(), 4);
      EXPECT_NE(idx[t][1].item<int64_t>(), 5);
    }
  }
  // A float32 bias with float64 logits works as well.
  auto [w32, i32, s32] =
      ops::router_topk(logits, 2, "sigmoid", false, 1.0, bias.to(at::kFloat));
  EXPECT_TRUE(all_equal(
      i32, ref_router_topk(logits, 2, true, false, 1.0, bias).indices));
}

TEST(RouterTopkOp, GroupLimitedSelectionMatchesLoop) {
  at::manual_seed(4);
  for (auto [G, TG, K] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {4, 2, 3}, {4, 1, 2}, {2, 1, 4}, {8, 3, 3}, {4, 4, 4}}) {
    const auto logits = at::randn({12, 8}, at::kDouble);
    const auto bias = at::randn({8}, at::kDouble) * 0.1;
    auto [w, idx, s] =
        ops::router_topk(logits, K, "sigmoid", true, 2.5, bias, G, TG);
    const auto ref = ref_router_topk(logits, K, true, true, 2.5, bias, G, TG);
    SCOPED_TRACE(
        "G=" + std::to_string(G) + " TG=" + std::to_string(TG) +
        " K=" + std::to_string(K));
    EXPECT_TRUE(all_equal(idx, ref.indices));
    EXPECT_TRUE(all_close(w, ref.weights, 1e-12, 1e-12));
    // Every chosen expert lies in one of at most TG groups.
    for (int64_t t = 0; t < 12; ++t) {
      std::vector<bool> used(G, false);
      int64_t n = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t g = idx[t][k].item<int64_t>() / (8 / G);
        n += used[g] ? 0 : 1;
        used[g] = true;
      }
      EXPECT_LE(n, TG);
    }
  }
}

TEST(RouterTopkOp, GroupScoreIsSumOfTopTwo) {
  // Sigmoid scores [0.9, 0.05 | 0.6, 0.55]: by max the first group wins, by
  // the sum of its top two (0.95 vs 1.15) the second does.
  auto logit = [](double p) { return std::log(p / (1 - p)); };
  const auto logits =
      make_double({logit(0.9), logit(0.05), logit(0.6), logit(0.55)}, {1, 4});
  auto [w, idx, s] =
      ops::router_topk(logits, 2, "sigmoid", true, 1.0, std::nullopt, 2, 1);
  EXPECT_TRUE(all_equal(idx, make_long({2, 3}, {1, 2})));
  EXPECT_TRUE(
      all_close(w, make_double({0.6 / 1.15, 0.55 / 1.15}, {1, 2}), 1e-12));
  // The bias enters the group score: +0.3 on expert 1 tips it to group 0.
  const auto bias = make_double({0, 0.3, 0, 0}, {4});
  auto [wb, ib, sb] =
      ops::router_topk(logits, 2, "sigmoid", true, 1.0, bias, 2, 1);
  EXPECT_TRUE(all_equal(ib, make_long({0, 1}, {1, 2})));
  // Weights stay the unbiased scores, renormalized.
  EXPECT_TRUE(
      all_close(wb, make_double({0.9 / 0.95, 0.05 / 0.95}, {1, 2}), 1e-12));
}

// Rows wider than a vector register with a ragged tail, and enough tokens
// for several parallel chunks.
TEST(RouterTopkOp, WideRowsManyTokensMatchLoop) {
  at::manual_seed(7);
  for (auto [E, K, G, TG] :
       std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>{
           {67, 5, 1, 1}, {64, 6, 8, 3}, {33, 33, 1, 1}, {3, 2, 1, 1}}) {
    for (const char* fn : {"softmax", "sigmoid"}) {
      const bool sig = std::string(fn) == "sigmoid";
      const auto logits = at::randn({50, E}) * 3;
      const auto bias = at::randn({E}) * 0.05;
      auto [w, idx, s] =
          ops::router_topk(logits, K, fn, true, 1.0, bias, G, TG);
      const auto ref = ref_router_topk(logits, K, sig, true, 1.0, bias, G, TG);
      SCOPED_TRACE(std::string(fn) + " E=" + std::to_string(E));
      EXPECT_TRUE(all_equal(idx, ref.indices));
      EXPECT_TRUE(all_close(w, ref.weights, 1e-6, 1e-5));
      EXPECT_TRUE(all_close(s, ref.scores, 1e-6, 1e-5));
    }
  }
}

// Experts masked with -inf logits are never picked while finite ones remain.
TEST(RouterTopkOp, MinusInfinityLogitsAreNeverPicked) {
  auto logits = at::randn({4, 6});
  logits.select(1, 0).fill_(-std::numeric_limits<float>::infinity());
  logits.select(1, 3).fill_(-std::numeric_limits<float>::infinity());
  auto [w, idx, s] = ops::router_topk(logits, 4);
  const auto ref = ref_router_topk(logits, 4, false, true, 1.0);
  EXPECT_TRUE(all_equal(idx, ref.indices));
  EXPECT_FALSE(at::isnan(w).any().item<bool>());
  EXPECT_TRUE(all_close(w, ref.weights, 1e-6));
  EXPECT_FALSE((idx == 0).any().item<bool>());
  EXPECT_FALSE((idx == 3).any().item<bool>());
}

TEST(RouterTopkOp, TiesGoToLowerIndex) {
  const auto zeros = at::zeros({3, 5});
  auto [w, idx, s] = ops::router_topk(zeros, 3);
  EXPECT_TRUE(all_equal(idx, make_long({0, 1, 2, 0, 1, 2, 0, 1, 2}, {3, 3})));
  EXPECT_TRUE(all_close(w, at::full({3, 3}, 1.0 / 3), 1e-6));
  const auto some = make_double({1, 3, 3, 0, 3}, {1, 5}).to(at::kFloat);
  auto [w2, i2, s2] = ops::router_topk(some, 2, "sigmoid", false);
  EXPECT_TRUE(all_equal(i2, make_long({1, 2}, {1, 2})));
  // Tied groups: the lower group wins.
  const auto flat = at::zeros({1, 6});
  auto [w3, i3, s3] =
      ops::router_topk(flat, 2, "softmax", true, 1.0, std::nullopt, 3, 1);
  EXPECT_TRUE(all_equal(i3, make_long({0, 1}, {1, 2})));
  auto [w4, i4, s4] =
      ops::router_topk(flat, 3, "softmax", true, 1.0, std::nullopt, 3, 2);
  EXPECT_TRUE(all_equal(i4, make_long({0, 1, 2}, {1, 3})));
}

// Backward through autograd against central differences of the reference,
// for loss = sum(weights * a) + sum(scores * b).
TEST(RouterTopkOp, BackwardMatchesFiniteDifferences) {
  at::manual_seed(5);
  struct Case {
    const char* fn;
    bool renorm;
    double scale;
    bool bias;
    int64_t G, TG, K;
  };
  for (const Case& c : std::vector<Case>{
           {"softmax", true, 1.0, false, 1, 1, 2},
           {"softmax", false, 2.0, false, 1, 1, 3},
           {"sigmoid", true, 2.5, true, 2, 1, 2},
           {"sigmoid", false, 1.0, true, 1, 1, 2},
           {"softmax", true, 1.0, false, 1, 1, 6}, // K = E
       }) {
    const bool sig = std::string(c.fn) == "sigmoid";
    const auto logits0 = at::randn({5, 6}, at::kDouble);
    const auto bias = c.bias ? at::randn({6}, at::kDouble) * 0.2 : at::Tensor();
    const auto a = at::randn({5, c.K}, at::kDouble);
    const auto b = at::randn({5, 6}, at::kDouble);
    auto logits = logits0.clone().requires_grad_(true);
    std::optional<at::Tensor> ob;
    if (c.bias) {
      ob = bias;
    }
    auto [w, idx, s] =
        ops::router_topk(logits, c.K, c.fn, c.renorm, c.scale, ob, c.G, c.TG);
    ((w * a).sum() + (s * b).sum()).backward();
    ASSERT_TRUE(logits.grad().defined());
    const auto fd = numeric_grad(
        [&](const at::Tensor& l) {
          const auto r =
              ref_router_topk(l, c.K, sig, c.renorm, c.scale, bias, c.G, c.TG);
          return dot_all(r.weights, a) + dot_all(r.scores, b);
        },
        logits0);
    SCOPED_TRACE(std::string(c.fn) + " renorm=" + std::to_string(c.renorm));
    EXPECT_TRUE(all_close(logits.grad(), fd, 1e-7, 1e-6));
    // Only the weights term: a gradient that ignores the weights fails here.
    auto l2 = logits0.clone().requires_grad_(true);
    auto [w2, i2, s2] =
        ops::router_topk(l2, c.K, c.fn, c.renorm, c.scale, ob, c.G, c.TG);
    (w2 * a).sum().backward();
    const auto fd2 = numeric_grad(
        [&](const at::Tensor& l) {
          return dot_all(
              ref_router_topk(l, c.K, sig, c.renorm, c.scale, bias, c.G, c.TG)
                  .weights,
              a);
        },
        logits0);
    EXPECT_TRUE(all_close(l2.grad(), fd2, 1e-7, 1e-6));
  }
}

TEST(RouterTopkOp, Float32BackwardMatchesFloat64) {
  at::manual_seed(6);
  for (const char* fn : {"softmax", "sigmoid"}) {
    const auto l64 = at::randn({9, 8}, at::kDouble);
    const auto a = at::randn({9, 3}, at::kDouble);
    auto run = [&](at::ScalarType dt) {
      auto l = l64.to(dt).requires_grad_(true);
      auto [w, i, s] = ops::router_topk(l, 3, fn, true, 1.0);
      (w * a.to(dt)).sum().backward();
      return l.grad();
    };
    const auto g32 = run(at::kFloat);
    EXPECT_EQ(g32.scalar_type(), at::kFloat);
    EXPECT_TRUE(all_close(g32, run(at::kDouble), 1e-5, 1e-4)) << fn;
  }
}

TEST(RouterTopkOp, EdgeShapes) {
  // T = 0.
  {
    auto logits = at::randn({0, 4}).requires_grad_(true);
    auto [w, idx, s] = ops::router_topk(logits, 2);
    EXPECT_EQ(w.sizes(), (at::IntArrayRef{0, 2}));
    EXPECT_EQ(idx.sizes(), (at::IntArrayRef{0, 2}));
    EXPECT_EQ(s.sizes(), (at::IntArrayRef{0, 4}));
    (w.sum() + s.sum()).backward();
    EXPECT_EQ(logits.grad().sizes(), (at::IntArrayRef{0, 4}));
  }
  // E = 1, k = 1.
  {
    const auto logits = at::randn({5, 1}, at::kDouble);
    auto [w, idx, s] = ops::router_topk(logits, 1);
    EXPECT_TRUE(all_equal(idx, at::zeros({5, 1}, at::kLong)));
    EXPECT_TRUE(all_close(w, at::ones({5, 1}, at::kDouble), 1e-15));
    auto [ws, is, ss] = ops::router_topk(logits, 1, "sigmoid", false, 3.0);
    EXPECT_TRUE(all_close(
        ws, ref_router_topk(logits, 1, true, false, 3.0).weights, 1e-12));
  }
  // K = E: every expert appears once, in descending score order.
  {
    const auto logits = at::randn({6, 5}, at::kDouble);
    auto [w, idx, s] = ops::router_topk(logits, 5, "softmax", false);
    const auto ref = ref_router_topk(logits, 5, false, false, 1.0);
    EXPECT_TRUE(all_equal(idx, ref.indices));
    EXPECT_TRUE(all_equal(
        std::get<0>(idx.sort(1)), at::arange(5, at::kLong).expand({6, 5})));
    EXPECT_TRUE(all_close(w.sum(1), at::ones({6}, at::kDouble), 1e-12));
    EXPECT_TRUE(at::all(w.narrow(1, 0, 4) >= w.narrow(1, 1, 4)).item<bool>());
  }
  // Non-contiguous logits give the same result as contiguous ones.
  {
    const auto base = at::randn({8, 6}, at::kDouble);
    auto [w1, i1, s1] = ops::router_topk(base.t(), 2);
    auto [w2, i2, s2] = ops::router_topk(base.t().contiguous(), 2);
    EXPECT_TRUE(all_equal(i1, i2));
    EXPECT_TRUE(all_close(w1, w2, 0.0));
  }
}

TEST(RouterTopkOp, BadInputNamesOpAndArgument) {
  const auto logits = at::randn({3, 4});
  MOEYARD_EXPECT_ERROR(
      "router_topk: logits must be float32",
      ops::router_topk(at::ones({3, 4}, at::kInt), 1));
  MOEYARD_EXPECT_ERROR(
      "router_topk: logits must be 2-D", ops::router_topk(at::randn({4}), 1));
  MOEYARD_EXPECT_ERROR(
      "router_topk: logits must be 2-D",
      ops::router_topk(at::randn({2, 3, 4}), 1));
  MOEYARD_EXPECT_ERROR(
      "router_topk: k must be in [1, num_experts=4], got 5",
      ops::router_topk(logits, 5));
  MOEYARD_EXPECT_ERROR(
      "router_topk: k must be in [1, num_experts=4], got 0",
      ops::router_topk(logits, 0));
  MOEYARD_EXPECT_ERROR(
      "router_topk: k must be in", ops::router_topk(logits, -1));
  MOEYARD_EXPECT_ERROR(
      "router_topk: score_fn must be 'softmax' or 'sigmoid', got 'relu'",
      ops::router_topk(logits, 1, "relu"));
  MOEYARD_EXPECT_ERROR(
      "router_topk: selection_bias must have shape [4]",
      ops::router_topk(logits, 1, "softmax", true, 1.0, at::randn({3})));
  MOEYARD_EXPECT_ERROR(
      "router_topk: selection_bias must be float32",
      ops::router_topk(
          logits, 1, "softmax", true, 1.0, at::zeros({4}, at::kLong)));
  MOEYARD_EXPECT_ERROR(
      "router_topk: num_groups must be >= 1 and divide num_experts=4, got 3",
      ops::router_topk(logits, 1, "softmax", true, 1.0, std::nullopt, 3, 1));
  MOEYARD_EXPECT_ERROR(
      "router_topk: num_groups",
      ops::router_topk(logits, 1, "softmax", true, 1.0, std::nullopt, 0, 1));
  MOEYARD_EXPECT_ERROR(
      "router_topk: topk_groups must be in [1, num_groups=2], got 3",
      ops::router_topk(logits, 1, "softmax", true, 1.0, std::nullopt, 2, 3));
  MOEYARD_EXPECT_ERROR(
      "router_topk: topk_groups",
      ops::router_topk(logits, 1, "softmax", true, 1.0, std::nullopt, 2, 0));
  MOEYARD_EXPECT_ERROR(
      "router_topk: k=3 exceeds the experts reachable in topk_groups=1",
      ops::router_topk(logits, 3, "softmax", true, 1.0, std::nullopt, 2, 1));
  MOEYARD_EXPECT_ERROR(
      "router_topk: logits must have at least 1 expert column",
      ops::router_topk(at::randn({3, 0}), 1));
}

} // namespace
