// CPU twins of the CUDA kernels: the host/device functions of kernels/ run
// here in the exact decomposition the CUDA kernels use (chunks of
// kCudaChunk pairs, a separate scan, warp lanes and butterfly merges,
// stable sorts where the GPU uses CUB), and must reproduce the CPU ops.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "kernels/permute.cuh"
#include "kernels/route_plan.cuh"
#include "kernels/router_topk.cuh"
#include "kernels/swiglu.cuh"
#include "ops/ops.h"

namespace {

using namespace moeyard;
namespace rp = kernels::route_plan;
namespace kr = kernels::router_topk;

struct Plan {
  std::vector<int64_t> row_token, slot, offsets, counts;
};

std::vector<int64_t> to_vec(const at::Tensor& t) {
  auto c = t.contiguous();
  return {c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel()};
}

// The CUDA route_plan's sequence of kernels, run on the host. Chunks are
// placed in reverse order: each owns its cursor column, so order is free.
Plan route_plan_gpu_twin(
    const at::Tensor& indices,
    const at::Tensor& weights,
    int64_t E,
    int64_t C,
    bool by_probs) {
  const auto idx = to_vec(indices);
  const int64_t K = indices.size(1), P = indices.numel();
  const int64_t B = std::max<int64_t>(1, kernels::ceil_div(P, rp::kCudaChunk));
  const int64_t N = C < 0 ? P : E * C;
  std::vector<int64_t> table(E * B + 1, 0), cursor(E * B + 1);
  auto end_of = [&](int64_t c) {
    return std::min(P, (c + 1) * rp::kCudaChunk);
  };
  for (int64_t c = 0; c < B; ++c) {
    rp::count_chunk(
        idx.data(), c * rp::kCudaChunk, end_of(c), E, table.data() + c, B);
  }
  std::exclusive_scan(table.begin(), table.end(), cursor.begin(), int64_t(0));
  std::vector<int64_t> offset(E + 1);
  for (int64_t e = 0; e <= E; ++e) {
    offset[e] = cursor[e * B];
  }
  Plan plan{
      std::vector<int64_t>(N, -1),
      std::vector<int64_t>(P),
      std::vector<int64_t>(E + 1),
      std::vector<int64_t>(E)};
  std::vector<int64_t> pair_at(P);
  for (int64_t c = B - 1; c >= 0; --c) {
    rp::place_chunk(
        idx.data(),
        c * rp::kCudaChunk,
        end_of(c),
        K,
        C,
        !by_probs,
        cursor.data() + c,
        B,
        offset.data(),
        plan.slot.data(),
        plan.row_token.data(),
        pair_at.data());
  }
  for (int64_t e = 0; e < E; ++e) {
    rp::finish_expert(
        e, offset.data(), C, plan.offsets.data(), plan.counts.data(), E);
  }
  if (C >= 1 && by_probs) {
    auto w = weights.to(at::kFloat).contiguous();
    const float* wp = w.data_ptr<float>();
    for (int64_t e = 0; e < E; ++e) {
      // cub::DeviceSegmentedSort::StableSortPairsDescending, then the first
      // C, then StableSortKeys by pair index.
      std::vector<int64_t> seg(
          pair_at.begin() + offset[e], pair_at.begin() + offset[e + 1]);
      std::stable_sort(seg.begin(), seg.end(), [&](int64_t a, int64_t b) {
        return wp[a] > wp[b];
      });
      seg.resize(std::min<int64_t>(seg.size(), C));
      std::stable_sort(seg.begin(), seg.end());
      rp::write_kept(
          e,
          seg.data(),
          seg.size(),
          K,
          C,
          plan.slot.data(),
          plan.row_token.data());
    }
  }
  return plan;
}

struct PlanCase {
  int64_t T, E, K, C;
  bool by_probs;
};

class RoutePlanTwin : public ::testing::TestWithParam<PlanCase> {};

TEST_P(RoutePlanTwin, MatchesCpuOpExactly) {
  const auto p = GetParam();
  at::manual_seed(p.T * 31 + p.E);
  auto logits = at::randn({p.T, p.E});
  auto [w, idx, s] = ops::router_topk(logits, p.K);
  if (p.T > 3) {
    idx.index_put_({at::indexing::Slice(1, 3)}, -1); // padding tokens
  }
  auto [rt, slot, off, cnt] =
      ops::route_plan(idx, w, p.E, p.C, p.by_probs ? "probs" : "position");
  const Plan twin = route_plan_gpu_twin(idx, w, p.E, p.C, p.by_probs);
  EXPECT_EQ(twin.row_token, to_vec(rt));
  EXPECT_EQ(twin.slot, to_vec(slot));
  EXPECT_EQ(twin.offsets, to_vec(off));
  EXPECT_EQ(twin.counts, to_vec(cnt));
}

INSTANTIATE_TEST_SUITE_P(
    Kernels,
    RoutePlanTwin,
    ::testing::Values(
        PlanCase{0, 4, 2, -1, false},
        PlanCase{1, 1, 1, 1, false},
        PlanCase{37, 5, 2, -1, false},
        PlanCase{300, 8, 2, -1, false},
        PlanCase{300, 8, 2, 40, false},
        PlanCase{300, 8, 2, 40, true},
        PlanCase{257, 16, 4, 1, true},
        PlanCase{500, 4, 4, 700, true},
        PlanCase{4096, 64, 8, 300, false},
        PlanCase{4096, 64, 8, 300, true}));

// The CUDA router_topk (one warp per token) on the host: 32 lanes each take
// their strided best, then the butterfly of warp_best merges them.
std::vector<int64_t> warp_topk_twin(
    std::vector<float> sel, int64_t K, int64_t G, int64_t TG) {
  const int64_t E = sel.size();
  const float neg_inf = -INFINITY;
  if (G > 1 && TG < G) {
    const int64_t size = E / G;
    std::vector<float> gs(G);
    for (int64_t g = 0; g < G; ++g) {
      gs[g] = kr::group_top2_sum(sel.data() + g * size, size, neg_inf);
    }
    for (int64_t g = 0; g < G; ++g) {
      if (!kr::group_is_kept(gs.data(), G, g, TG)) {
        std::fill(
            sel.begin() + g * size, sel.begin() + (g + 1) * size, neg_inf);
      }
    }
  }
  std::vector<int64_t> chosen;
  for (int64_t k = 0; k < K; ++k) {
    std::vector<float> v(32);
    std::vector<int64_t> i(32);
    for (int lane = 0; lane < 32; ++lane) {
      kr::lane_best(sel.data(), E, lane, 32, neg_inf, v[lane], i[lane]);
    }
    for (int o = 16; o > 0; o >>= 1) {
      auto v2 = v;
      auto i2 = i;
      for (int lane = 0; lane < 32; ++lane) {
        kr::merge_best(v2[lane], i2[lane], v[lane ^ o], i[lane ^ o]);
      }
      v = v2;
      i = i2;
    }
    for (int lane = 1; lane < 32; ++lane) {
      EXPECT_EQ(i[lane], i[0]) << "lanes disagree after the butterfly";
    }
    chosen.push_back(i[0]);
    sel[i[0]] = neg_inf;
  }
  return chosen;
}

struct TopkCase {
  int64_t T, E, K, G, TG;
  bool sigmoid, bias, ties;
};

class RouterTopkTwin : public ::testing::TestWithParam<TopkCase> {};

TEST_P(RouterTopkTwin, WarpAlgorithmMatchesCpuOp) {
  const auto p = GetParam();
  at::manual_seed(p.E * 7 + p.K);
  auto logits = at::randn({p.T, p.E});
  if (p.ties) {
    logits = (logits * 2).round() / 2; // many equal scores
  }
  std::optional<at::Tensor> bias;
  if (p.bias) {
    bias = at::randn({p.E}) * 0.1;
  }
  auto [w, idx, s] = ops::router_topk(
      logits,
      p.K,
      p.sigmoid ? "sigmoid" : "softmax",
      true,
      2.0,
      bias,
      p.G,
      p.TG);
  auto sel = bias ? s + *bias : s;
  for (int64_t t = 0; t < p.T; ++t) {
    auto row = sel[t].contiguous();
    std::vector<float> v(row.data_ptr<float>(), row.data_ptr<float>() + p.E);
    const auto chosen = warp_topk_twin(v, p.K, p.G, p.TG);
    auto expect = idx[t].contiguous();
    ASSERT_EQ(
        chosen,
        std::vector<int64_t>(
            expect.data_ptr<int64_t>(), expect.data_ptr<int64_t>() + p.K))
        << "token " << t;
    std::vector<float> weights(p.K);
    auto srow = s[t].contiguous();
    kr::finalize_weights(
        srow.data_ptr<float>(), chosen.data(), p.K, true, 2.0, weights.data());
    for (int64_t k = 0; k < p.K; ++k) {
      EXPECT_FLOAT_EQ(weights[k], w[t][k].item<float>());
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Kernels,
    RouterTopkTwin,
    ::testing::Values(
        TopkCase{16, 8, 2, 1, 1, false, false, false},
        TopkCase{16, 64, 8, 1, 1, false, false, true},
        TopkCase{16, 40, 40, 1, 1, false, false, false},
        TopkCase{16, 256, 8, 8, 4, true, true, false},
        TopkCase{16, 512, 16, 16, 3, true, true, true},
        TopkCase{16, 3, 1, 3, 1, true, true, false}));

TEST(GroupIsKept, AgreesWithSorting) {
  at::manual_seed(3);
  for (int trial = 0; trial < 20; ++trial) {
    auto sc = (at::randn({12}) * 2).round();
    std::vector<float> v(sc.data_ptr<float>(), sc.data_ptr<float>() + 12);
    std::vector<int64_t> order(12);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return v[a] > v[b];
    });
    for (int64_t keep = 1; keep <= 12; ++keep) {
      for (int64_t r = 0; r < 12; ++r) {
        EXPECT_EQ(kr::group_is_kept(v.data(), 12, order[r], keep), r < keep);
      }
    }
  }
}

TEST(PermuteBackwardTwin, SortAndGatherMatchesCpuOp) {
  at::manual_seed(4);
  const int64_t T = 50, E = 6, K = 3, H = 7;
  auto [w, idx, s] = ops::router_topk(at::randn({T, E}), K);
  for (int64_t C : {-1, 5}) {
    auto [rt, slot, off, cnt] = ops::route_plan(idx, w, E, C);
    const int64_t N = rt.size(0);
    auto g = at::randn({N, H});
    auto expect = ops::permute_backward(g, rt, T);
    // cub::DeviceRadixSort::SortPairs(row_token, iota): stable by token.
    auto tokens = to_vec(rt);
    std::vector<int64_t> rows(N);
    std::iota(rows.begin(), rows.end(), 0);
    std::stable_sort(rows.begin(), rows.end(), [&](int64_t a, int64_t b) {
      return tokens[a] < tokens[b];
    });
    std::vector<int64_t> sorted(N);
    for (int64_t j = 0; j < N; ++j) {
      sorted[j] = tokens[rows[j]];
    }
    for (int64_t t = 0; t < T; ++t) {
      int64_t b, e;
      kernels::permute::token_rows(sorted.data(), N, t, b, e);
      for (int64_t h = 0; h < H; ++h) {
        float acc = 0;
        for (int64_t j = b; j < e; ++j) {
          acc += g[rows[j]][h].item<float>();
        }
        EXPECT_EQ(acc, expect[t][h].item<float>()) << "t=" << t << " h=" << h;
      }
    }
  }
}

TEST(SwigluTwin, ElementFunctionsMatchCpuOp) {
  at::manual_seed(5);
  auto gu = at::randn({9, 10}, at::kDouble);
  auto dy = at::randn({9, 5}, at::kDouble);
  auto y = ops::swiglu(gu);
  auto dgu = ops::swiglu_backward(dy, gu);
  for (int64_t r = 0; r < 9; ++r) {
    for (int64_t j = 0; j < 5; ++j) {
      const double g = gu[r][j].item<double>(), u = gu[r][5 + j].item<double>();
      EXPECT_NEAR(
          kernels::swiglu::forward(g, u), y[r][j].item<double>(), 1e-12);
      double dg, du;
      kernels::swiglu::backward(dy[r][j].item<double>(), g, u, dg, du);
      EXPECT_NEAR(dg, dgu[r][j].item<double>(), 1e-12);
      EXPECT_NEAR(du, dgu[r][5 + j].item<double>(), 1e-12);
    }
  }
}

// The CUDA kernels' row test against the CPU op's span with expert offsets
// (clamped to the rows on the device, checked on the host).
TEST(SwigluTwin, SpanMatchesCpuOp) {
  auto gu = at::randn({9, 10}, at::kDouble);
  const int64_t off[] = {2, 4, 7};
  const auto y = ops::swiglu(gu, at::tensor({2, 4, 7}, at::kLong));
  for (int64_t r = 0; r < 9; ++r) {
    const bool computed = y[r].abs().sum().item<double>() > 0;
    EXPECT_EQ(kernels::swiglu::in_span(r, 9, off, 3), computed) << r;
  }
  EXPECT_TRUE(kernels::swiglu::in_span(8, 9, nullptr, 0));
  const int64_t wide[] = {-3, 20}; // clamped to [0, 9)
  EXPECT_TRUE(kernels::swiglu::in_span(0, 9, wide, 2));
  EXPECT_FALSE(kernels::swiglu::in_span(9, 9, wide, 2));
}

} // namespace
