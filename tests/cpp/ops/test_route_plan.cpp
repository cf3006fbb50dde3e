// route_plan against the naive loop reference: dropless, capacity with both
// drop policies (ties to the earliest pair), unassigned (-1) pairs, the plan
// invariants, edge shapes and bad input. route_plan has no gradient (integer
// outputs) but must accept weights that require grad.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <string>

#include "ops/ops.h"
#include "reference/routing.h"

namespace {

using namespace moeyard_test;
namespace ops = moeyard::ops;

// Random top-k style indices: K distinct experts per token, some tokens
// (every `unassigned_every`-th, 0 = none) fully unassigned.
at::Tensor random_indices(
    int64_t T, int64_t K, int64_t E, int64_t unassigned_every = 0) {
  auto idx = std::get<1>(at::rand({T, E}).topk(K, 1)).contiguous();
  if (unassigned_every > 0) {
    for (int64_t t = 0; t < T; t += unassigned_every) {
      idx[t].fill_(-1);
    }
  }
  return idx;
}

void expect_plan_eq(
    const std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>& got,
    const PlanRef& want) {
  const auto& [row_token, slot, offsets, counts] = got;
  EXPECT_EQ(row_token.scalar_type(), at::kLong);
  EXPECT_EQ(slot.scalar_type(), at::kLong);
  EXPECT_EQ(offsets.scalar_type(), at::kLong);
  EXPECT_EQ(counts.scalar_type(), at::kLong);
  EXPECT_TRUE(all_equal(row_token, want.row_token)) << "row_token";
  EXPECT_TRUE(all_equal(slot, want.slot)) << "slot";
  EXPECT_TRUE(all_equal(offsets, want.offsets)) << "expert_offsets";
  EXPECT_TRUE(all_equal(counts, want.counts)) << "counts";
}

// Invariants every plan satisfies, checked by loops.
void expect_plan_consistent(
    const std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>& plan,
    const at::Tensor& indices,
    int64_t E,
    int64_t C) {
  const auto rt = i64(std::get<0>(plan));
  const auto sl = i64(std::get<1>(plan));
  const auto of = i64(std::get<2>(plan));
  const auto cn = i64(std::get<3>(plan));
  const auto idx = i64(indices);
  const auto RT = rt.accessor<int64_t, 1>();
  const auto SL = sl.accessor<int64_t, 2>();
  const auto OF = of.accessor<int64_t, 1>();
  const auto CN = cn.accessor<int64_t, 1>();
  const auto I = idx.accessor<int64_t, 2>();
  const int64_t T = idx.size(0), K = idx.size(1);
  int64_t pointed = 0;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = SL[t][k];
      if (I[t][k] < 0) {
        EXPECT_EQ(r, -1) << "unassigned pair got a row";
      }
      if (r < 0) {
        continue;
      }
      ++pointed;
      const int64_t e = I[t][k];
      EXPECT_EQ(RT[r], t);
      EXPECT_GE(r, OF[e]);
      EXPECT_LT(r, OF[e] + CN[e]);
    }
  }
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) {
    total += CN[e];
    if (C > 0) {
      EXPECT_EQ(OF[e], e * C);
      EXPECT_LE(CN[e], C);
    } else {
      EXPECT_EQ(OF[e + 1], OF[e] + CN[e]);
    }
    // Rows of one expert keep token order.
    for (int64_t r = OF[e] + 1; r < OF[e] + CN[e]; ++r) {
      EXPECT_LE(RT[r - 1], RT[r]);
    }
  }
  EXPECT_EQ(total, pointed);
  int64_t non_padding = 0;
  for (int64_t r = 0; r < rt.size(0); ++r) {
    non_padding += RT[r] >= 0 ? 1 : 0;
  }
  EXPECT_EQ(non_padding, pointed);
}

TEST(RoutePlanOp, DroplessMatchesLoop) {
  at::manual_seed(10);
  for (int64_t unassigned : {0, 3}) {
    const auto idx = random_indices(9, 2, 4, unassigned);
    const auto w = at::rand({9, 2});
    const auto plan = ops::route_plan(idx, w, 4);
    EXPECT_EQ(std::get<0>(plan).size(0), 18); // N = T*K
    expect_plan_eq(plan, ref_route_plan(idx, w, 4, -1, false));
    expect_plan_consistent(plan, idx, 4, -1);
    // The policy does not matter without a capacity.
    expect_plan_eq(
        ops::route_plan(idx, w, 4, -1, "probs"),
        ref_route_plan(idx, w, 4, -1, false));
  }
}

TEST(RoutePlanOp, CapacityPositionKeepsEarliest) {
  at::manual_seed(11);
  for (int64_t C : {1, 2, 3, 5, 40}) {
    const auto idx = random_indices(11, 3, 5, 4);
    const auto w = at::rand({11, 3});
    const auto plan = ops::route_plan(idx, w, 5, C, "position");
    EXPECT_EQ(std::get<0>(plan).size(0), 5 * C); // N = E*C
    SCOPED_TRACE("C=" + std::to_string(C));
    expect_plan_eq(plan, ref_route_plan(idx, w, 5, C, false));
    expect_plan_consistent(plan, idx, 5, C);
  }
}

TEST(RoutePlanOp, CapacityProbsKeepsHighestWeights) {
  at::manual_seed(12);
  for (int64_t C : {1, 2, 4}) {
    for (auto wdt : {at::kFloat, at::kDouble, at::kBFloat16}) {
      const auto idx = random_indices(13, 2, 4, 5);
      // Quantized weights force many ties, which go to the earliest pair.
      const auto w = (at::randint(0, 4, {13, 2}) / 4.0).to(wdt);
      const auto plan = ops::route_plan(idx, w, 4, C, "probs");
      SCOPED_TRACE(
          "C=" + std::to_string(C) + " " + std::string(c10::toString(wdt)));
      expect_plan_eq(plan, ref_route_plan(idx, w, 4, C, true));
      expect_plan_consistent(plan, idx, 4, C);
    }
  }
}

TEST(RoutePlanOp, HandWrittenCapacityExample) {
  // T=4, K=2, E=3, C=2. Expert 0 is chosen by pairs (0,0) (1,1) (2,0) (3,0).
  const auto idx = make_long({0, 1, 2, 0, 0, 1, 0, 2}, {4, 2});
  const auto w = make_double({0.1, 0.9, 0.5, 0.7, 0.7, 0.3, 0.2, 0.8}, {4, 2})
                     .to(at::kFloat);
  {
    auto [rt, sl, of, cn] = ops::route_plan(idx, w, 3, 2, "position");
    EXPECT_TRUE(all_equal(rt, make_long({0, 1, 0, 2, 1, 3}, {6})));
    EXPECT_TRUE(all_equal(sl, make_long({0, 2, 4, 1, -1, 3, -1, 5}, {4, 2})));
    EXPECT_TRUE(all_equal(of, make_long({0, 2, 4, 6}, {4})));
    EXPECT_TRUE(all_equal(cn, make_long({2, 2, 2}, {3})));
  }
  {
    // Expert 0 weights: 0.1, 0.7, 0.7, 0.2 -> keeps pairs (1,1), (2,0)
    // (0.7 tie, both kept); expert 1: 0.9, 0.3 -> both.
    auto [rt, sl, of, cn] = ops::route_plan(idx, w, 3, 2, "probs");
    EXPECT_TRUE(all_equal(sl, make_long({-1, 2, 4, 0, 1, 3, -1, 5}, {4, 2})));
    EXPECT_TRUE(all_equal(rt, make_long({1, 2, 0, 2, 1, 3}, {6})));
  }
  {
    // C=1 and a tie at the top: the earlier pair (1,1) wins over (2,0).
    auto [rt, sl, of, cn] = ops::route_plan(idx, w, 3, 1, "probs");
    EXPECT_EQ(sl[1][1].item<int64_t>(), 0);
    EXPECT_EQ(sl[2][0].item<int64_t>(), -1);
    EXPECT_TRUE(all_equal(rt, make_long({1, 0, 3}, {3})));
    EXPECT_TRUE(all_equal(cn, make_long({1, 1, 1}, {3})));
  }
  {
    // Dropless: offsets are the running sum of counts.
    auto [rt, sl, of, cn] = ops::route_plan(idx, w, 3);
    EXPECT_TRUE(all_equal(cn, make_long({4, 2, 2}, {3})));
    EXPECT_TRUE(all_equal(of, make_long({0, 4, 6, 8}, {4})));
    EXPECT_TRUE(all_equal(rt, make_long({0, 1, 2, 3, 0, 2, 1, 3}, {8})));
  }
}

// Enough pairs for the CPU kernel to split them into several chunks (one per
// thread, >= 4096 pairs each, the last one shorter): the plan must not
// depend on the chunking.
TEST(RoutePlanOp, ManyChunksMatchLoop) {
  at::manual_seed(15);
  const int old_threads = at::get_num_threads();
  at::set_num_threads(6);
  const int64_t T = (4096 * 5 + 123) / 2 + 1, K = 2, E = 8;
  const auto idx = random_indices(T, K, E, 7);
  const auto w = (at::randint(0, 16, {T, K}) / 16.0).to(at::kFloat);
  for (int64_t C : {-1, 100, 700, 2000}) {
    for (const char* policy : {"position", "probs"}) {
      SCOPED_TRACE("C=" + std::to_string(C) + " " + policy);
      const auto plan = ops::route_plan(idx, w, E, C, policy);
      expect_plan_eq(
          plan, ref_route_plan(idx, w, E, C, std::string(policy) == "probs"));
    }
  }
  at::set_num_threads(old_threads);
}

TEST(RoutePlanOp, EdgeShapes) {
  // T = 0.
  {
    const auto idx = at::zeros({0, 2}, at::kLong);
    const auto w = at::zeros({0, 2});
    auto [rt, sl, of, cn] = ops::route_plan(idx, w, 3);
    EXPECT_EQ(rt.numel(), 0);
    EXPECT_EQ(sl.sizes(), (at::IntArrayRef{0, 2}));
    EXPECT_TRUE(all_equal(of, at::zeros({4}, at::kLong)));
    EXPECT_TRUE(all_equal(cn, at::zeros({3}, at::kLong)));
    auto [rt2, sl2, of2, cn2] = ops::route_plan(idx, w, 3, 2, "probs");
    EXPECT_TRUE(all_equal(rt2, at::full({6}, -1, at::kLong)));
    EXPECT_TRUE(all_equal(of2, make_long({0, 2, 4, 6}, {4})));
  }
  // E = 1, K = 1.
  {
    const auto idx = at::zeros({5, 1}, at::kLong);
    const auto w = at::rand({5, 1});
    expect_plan_eq(
        ops::route_plan(idx, w, 1), ref_route_plan(idx, w, 1, -1, false));
    expect_plan_eq(
        ops::route_plan(idx, w, 1, 2, "probs"),
        ref_route_plan(idx, w, 1, 2, true));
  }
  // K = E.
  {
    at::manual_seed(13);
    const auto idx = random_indices(6, 4, 4);
    const auto w = at::rand({6, 4});
    auto plan = ops::route_plan(idx, w, 4);
    expect_plan_eq(plan, ref_route_plan(idx, w, 4, -1, false));
    EXPECT_TRUE(all_equal(std::get<3>(plan), at::full({4}, 6, at::kLong)));
  }
  // All tokens to one expert, capacity 1.
  {
    const auto idx = at::full({7, 1}, 2, at::kLong);
    const auto w =
        make_double({0.1, 0.2, 0.9, 0.3, 0.9, 0.0, 0.5}, {7, 1}).to(at::kFloat);
    auto [rt, sl, of, cn] = ops::route_plan(idx, w, 4, 1, "position");
    EXPECT_TRUE(all_equal(rt, make_long({-1, -1, 0, -1}, {4})));
    EXPECT_TRUE(all_equal(cn, make_long({0, 0, 1, 0}, {4})));
    EXPECT_EQ(sl[0][0].item<int64_t>(), 2);
    EXPECT_EQ((sl >= 0).sum().item<int64_t>(), 1);
    auto [rt2, sl2, of2, cn2] = ops::route_plan(idx, w, 4, 1, "probs");
    EXPECT_TRUE(all_equal(rt2, make_long({-1, -1, 2, -1}, {4})));
    EXPECT_EQ(sl2[2][0].item<int64_t>(), 2);
    EXPECT_EQ((sl2 >= 0).sum().item<int64_t>(), 1);
    auto [rt3, sl3, of3, cn3] = ops::route_plan(idx, w, 4);
    EXPECT_TRUE(all_equal(cn3, make_long({0, 0, 7, 0}, {4})));
    EXPECT_TRUE(all_equal(of3, make_long({0, 0, 0, 7, 7}, {5})));
    EXPECT_TRUE(all_equal(rt3, at::arange(7, at::kLong)));
  }
  // Every pair unassigned.
  {
    const auto idx = at::full({3, 2}, -1, at::kLong);
    auto [rt, sl, of, cn] = ops::route_plan(idx, at::rand({3, 2}), 2);
    EXPECT_TRUE(all_equal(rt, at::full({6}, -1, at::kLong)));
    EXPECT_TRUE(all_equal(sl, idx));
    EXPECT_TRUE(all_equal(cn, at::zeros({2}, at::kLong)));
  }
  // Capacity larger than the load: the windows are padded with -1.
  {
    const auto idx = make_long({1, 1, 0}, {3, 1});
    auto [rt, sl, of, cn] = ops::route_plan(idx, at::rand({3, 1}), 2, 3);
    EXPECT_TRUE(all_equal(rt, make_long({2, -1, -1, 0, 1, -1}, {6})));
    EXPECT_TRUE(all_equal(sl, make_long({3, 4, 0}, {3, 1})));
  }
  // Weights that require grad (as inside the MoE layer) are accepted.
  {
    at::manual_seed(14);
    const auto idx = random_indices(5, 2, 3);
    const auto w = at::rand({5, 2}).requires_grad_(true);
    expect_plan_eq(
        ops::route_plan(idx, w, 3, 2, "probs"),
        ref_route_plan(idx, w, 3, 2, true));
  }
}

TEST(RoutePlanOp, BadInputNamesOpAndArgument) {
  const auto idx = make_long({0, 1, 2, 0}, {2, 2});
  const auto w = at::rand({2, 2});
  MOEYARD_EXPECT_ERROR(
      "route_plan: indices must be int64",
      ops::route_plan(idx.to(at::kInt), w, 3));
  MOEYARD_EXPECT_ERROR(
      "route_plan: indices must be int64",
      ops::route_plan(idx.to(at::kFloat), w, 3));
  MOEYARD_EXPECT_ERROR(
      "route_plan: indices must be 2-D",
      ops::route_plan(idx.flatten(), w.flatten(), 3));
  MOEYARD_EXPECT_ERROR(
      "route_plan: weights must be float32",
      ops::route_plan(idx, idx.clone(), 3));
  MOEYARD_EXPECT_ERROR(
      "route_plan: weights must have the shape of indices",
      ops::route_plan(idx, at::rand({2, 3}), 3));
  MOEYARD_EXPECT_ERROR(
      "route_plan: num_experts must be >= 1, got 0",
      ops::route_plan(idx, w, 0));
  MOEYARD_EXPECT_ERROR(
      "route_plan: capacity must be >= 1 (or -1 for dropless), got 0",
      ops::route_plan(idx, w, 3, 0));
  MOEYARD_EXPECT_ERROR(
      "route_plan: capacity must be >= 1 (or -1 for dropless), got -2",
      ops::route_plan(idx, w, 3, -2));
  MOEYARD_EXPECT_ERROR(
      "route_plan: drop_policy must be 'position' or 'probs', got 'random'",
      ops::route_plan(idx, w, 3, 1, "random"));
  MOEYARD_EXPECT_ERROR(
      "route_plan: indices must be in [0, num_experts=3) or -1 (unassigned), "
      "got 3 at token 1, slot 0",
      ops::route_plan(make_long({0, 1, 3, 0}, {2, 2}), w, 3));
  MOEYARD_EXPECT_ERROR(
      "route_plan: indices must be in [0, num_experts=3) or -1 (unassigned), "
      "got -2",
      ops::route_plan(make_long({0, -2, 1, 0}, {2, 2}), w, 3, 1));
}

} // namespace
