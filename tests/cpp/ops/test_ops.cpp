// Every op from C++ (through the dispatcher, with C++ autograd) against
// naive loop references, forward and backward, on edge shapes and bad input.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "ops/ops.h"

namespace {

using namespace moeyard;

// ---- naive references -------------------------------------------------------

// Top-k of one row: (value desc, index asc).
std::vector<int64_t> ref_topk(const std::vector<double>& v, int64_t k) {
  std::vector<int64_t> idx(v.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) {
    return v[a] > v[b];
  });
  idx.resize(k);
  return idx;
}

struct RefRouting {
  std::vector<std::vector<int64_t>> idx;
  std::vector<std::vector<double>> w;
};

RefRouting ref_router(
    const at::Tensor& logits,
    int64_t K,
    bool sigmoid,
    bool renorm,
    double scale) {
  RefRouting r;
  auto l = logits.to(at::kDouble).contiguous();
  const int64_t T = l.size(0), E = l.size(1);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> s(E);
    double mx = -INFINITY, sum = 0;
    for (int64_t e = 0; e < E; ++e) {
      mx = std::max(mx, l[t][e].item<double>());
    }
    for (int64_t e = 0; e < E; ++e) {
      const double x = l[t][e].item<double>();
      s[e] = sigmoid ? 1 / (1 + std::exp(-x)) : std::exp(x - mx);
      sum += s[e];
    }
    if (!sigmoid) {
      for (auto& v : s) {
        v /= sum;
      }
    }
    auto idx = ref_topk(s, K);
    std::vector<double> w;
    double ws = 0;
    for (auto i : idx) {
      w.push_back(s[i]);
      ws += s[i];
    }
    for (auto& v : w) {
      v = (renorm ? v / ws : v) * scale;
    }
    r.idx.push_back(idx);
    r.w.push_back(w);
  }
  return r;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

// ---- router_topk ------------------------------------------------------------

TEST(RouterTopk, MatchesLoopForwardAndBackward) {
  at::manual_seed(0);
  for (bool sigmoid : {false, true}) {
    for (bool renorm : {true, false}) {
      auto logits = at::randn({9, 6}, at::kDouble).requires_grad_(true);
      auto [w, idx, s] = ops::router_topk(
          logits, 3, sigmoid ? "sigmoid" : "softmax", renorm, 1.5);
      auto ref = ref_router(logits.detach(), 3, sigmoid, renorm, 1.5);
      for (int64_t t = 0; t < 9; ++t) {
        for (int64_t k = 0; k < 3; ++k) {
          EXPECT_EQ(idx[t][k].item<int64_t>(), ref.idx[t][k]);
          EXPECT_NEAR(w[t][k].item<double>(), ref.w[t][k], 1e-12);
        }
      }
      // Backward against central differences of sum(w * c).
      auto c = at::randn({9, 3}, at::kDouble);
      (w * c).sum().backward();
      auto g = logits.grad().clone();
      const double eps = 1e-6;
      for (int64_t t = 0; t < 9; t += 4) {
        for (int64_t e = 0; e < 6; ++e) {
          auto lp = logits.detach().clone(), lm = logits.detach().clone();
          lp[t][e] += eps;
          lm[t][e] -= eps;
          auto fp = (std::get<0>(ops::router_topk(
                         lp, 3, sigmoid ? "sigmoid" : "softmax", renorm, 1.5)) *
                     c)
                        .sum();
          auto fm = (std::get<0>(ops::router_topk(
                         lm, 3, sigmoid ? "sigmoid" : "softmax", renorm, 1.5)) *
                     c)
                        .sum();
          EXPECT_NEAR(
              g[t][e].item<double>(),
              (fp - fm).item<double>() / (2 * eps),
              1e-6);
        }
      }
    }
  }
}

TEST(RouterTopk, EdgeShapesAndTies) {
  auto [w0, i0, s0] = ops::router_topk(at::randn({0, 4}), 2);
  EXPECT_EQ(w0.sizes(), (at::IntArrayRef{0, 2}));
  auto [w1, i1, s1] = ops::router_topk(at::randn({5, 1}), 1); // E = 1
  EXPECT_TRUE(at::equal(i1, at::zeros({5, 1}, at::kLong)));
  EXPECT_TRUE(at::allclose(w1, at::ones({5, 1})));
  auto [w2, i2, s2] = ops::router_topk(at::randn({4, 5}), 5); // K = E
  EXPECT_TRUE(at::allclose(w2.sum(1), at::ones({4})));
  auto [w3, i3, s3] = ops::router_topk(at::zeros({2, 4}), 2); // all tied
  EXPECT_EQ(i3[0][0].item<int64_t>(), 0);
  EXPECT_EQ(i3[0][1].item<int64_t>(), 1);
}

TEST(RouterTopk, GroupLimitedSelection) {
  // groups of 2: {0,1} {2,3} {4,5}; biased scores make group 2 the best
  // and group 0 second; expert 3 has the best single score but its group
  // (sum of its top-2) loses.
  auto logits = at::zeros({1, 6});
  auto bias = at::tensor({0.3, 0.3, 0.9, -0.5, 0.4, 0.4});
  auto [w, idx, s] =
      ops::router_topk(logits, 2, "sigmoid", true, 1.0, bias, 3, 2);
  std::vector<int64_t> got = {
      idx[0][0].item<int64_t>(), idx[0][1].item<int64_t>()};
  EXPECT_EQ(got, (std::vector<int64_t>{4, 5}));
  EXPECT_NEAR(
      w[0][0].item<float>(), 0.5, 1e-6); // unbiased sigmoid(0), renormalized
}

// ---- route_plan -------------------------------------------------------------

TEST(RoutePlan, DroplessCapacityAndPoliciesMatchLoop) {
  at::manual_seed(1);
  const int64_t T = 40, E = 5, K = 2;
  auto [w, idx, s] = ops::router_topk(at::randn({T, E}), K);
  for (int64_t C : {-1, 1, 4, 100}) {
    for (bool probs : {false, true}) {
      auto [rt, slot, off, cnt] =
          ops::route_plan(idx, w, E, C, probs ? "probs" : "position");
      // loop reference: per expert the pairs in flat order, then the kept ones
      for (int64_t e = 0; e < E; ++e) {
        std::vector<int64_t> pairs;
        for (int64_t p = 0; p < T * K; ++p) {
          if (idx.view(-1)[p].item<int64_t>() == e) {
            pairs.push_back(p);
          }
        }
        std::vector<int64_t> kept = pairs;
        if (C > 0 && static_cast<int64_t>(pairs.size()) > C) {
          if (probs) {
            std::stable_sort(
                kept.begin(), kept.end(), [&](int64_t a, int64_t b) {
                  return w.view(-1)[a].item<float>() >
                         w.view(-1)[b].item<float>();
                });
          }
          kept.resize(C);
          std::sort(kept.begin(), kept.end());
        }
        const int64_t base = off[e].item<int64_t>();
        ASSERT_EQ(cnt[e].item<int64_t>(), static_cast<int64_t>(kept.size()));
        if (C > 0) {
          EXPECT_EQ(base, e * C);
        }
        for (size_t j = 0; j < kept.size(); ++j) {
          EXPECT_EQ(
              slot.view(-1)[kept[j]].item<int64_t>(),
              base + static_cast<int64_t>(j));
          EXPECT_EQ(rt[base + j].item<int64_t>(), kept[j] / K);
        }
      }
      // dropped pairs have slot -1; padding rows row_token -1
      const int64_t kept_total = cnt.sum().item<int64_t>();
      EXPECT_EQ((slot >= 0).sum().item<int64_t>(), kept_total);
      EXPECT_EQ((rt >= 0).sum().item<int64_t>(), kept_total);
      EXPECT_EQ(rt.size(0), C < 0 ? T * K : E * C);
    }
  }
}

TEST(RoutePlan, AllTokensToOneExpertAndPaddingTokens) {
  auto idx = at::full({6, 1}, 2, at::kLong);
  idx[1][0] = -1; // a padding token takes no row
  auto w = at::ones({6, 1});
  auto [rt, slot, off, cnt] = ops::route_plan(idx, w, 3, 2);
  EXPECT_EQ(cnt[2].item<int64_t>(), 2);
  EXPECT_EQ(rt[4].item<int64_t>(), 0);
  EXPECT_EQ(rt[5].item<int64_t>(), 2); // token 1 skipped
  EXPECT_EQ(slot[1][0].item<int64_t>(), -1);
  EXPECT_EQ((rt.narrow(0, 0, 4) == -1).all().item<bool>(), true);
  auto [rt0, s0, o0, c0] =
      ops::route_plan(at::empty({0, 2}, at::kLong), at::empty({0, 2}), 3, 1);
  EXPECT_EQ(rt0.size(0), 3);
  EXPECT_TRUE((rt0 == -1).all().item<bool>());
}

// ---- permute / unpermute / grouped_mm / swiglu
// --------------------------------

TEST(PermuteUnpermute, MatchLoopForwardAndBackward) {
  at::manual_seed(2);
  const int64_t T = 7, E = 3, K = 2, H = 5;
  auto [w, idx, s] = ops::router_topk(at::randn({T, E}), K);
  auto [rt, slot, off, cnt] = ops::route_plan(idx, w, E, 2);
  auto x = at::randn({T, H}, at::kDouble).requires_grad_(true);
  auto rows = ops::permute(x, rt);
  for (int64_t i = 0; i < rt.size(0); ++i) {
    const int64_t t = rt[i].item<int64_t>();
    EXPECT_TRUE(at::equal(
        rows[i], t < 0 ? at::zeros({H}, at::kDouble) : x[t].detach()));
  }
  auto gr = at::randn_like(rows);
  rows.backward(gr);
  auto ref_gx = at::zeros({T, H}, at::kDouble);
  for (int64_t i = 0; i < rt.size(0); ++i) {
    if (rt[i].item<int64_t>() >= 0) {
      ref_gx[rt[i].item<int64_t>()] += gr[i];
    }
  }
  EXPECT_TRUE(at::allclose(x.grad(), ref_gx));

  auto r2 = at::randn({rt.size(0), H}, at::kDouble).requires_grad_(true);
  auto wd = w.to(at::kDouble).requires_grad_(true);
  auto y = ops::unpermute(r2, slot, wd);
  auto gy = at::randn_like(y);
  y.backward(gy);
  auto ref_y = at::zeros({T, H}, at::kDouble);
  auto ref_gr = at::zeros_like(r2);
  auto ref_gw = at::zeros_like(wd);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t row = slot[t][k].item<int64_t>();
      if (row < 0) {
        continue;
      }
      ref_y[t] += wd[t][k].detach() * r2[row].detach();
      ref_gr[row] += wd[t][k].detach() * gy[t];
      ref_gw[t][k] = (gy[t] * r2[row].detach()).sum();
    }
  }
  EXPECT_TRUE(at::allclose(y, ref_y));
  EXPECT_TRUE(at::allclose(r2.grad(), ref_gr));
  EXPECT_TRUE(at::allclose(wd.grad(), ref_gw));
}

TEST(GroupedMmSwiglu, MatchLoopForwardAndBackward) {
  at::manual_seed(3);
  const int64_t E = 3, Din = 4, Dout = 6;
  auto off =
      at::tensor({0, 2, 2, 5}, at::kLong); // expert 1 empty; row 5 outside
  auto in = at::randn({6, Din}, at::kDouble).requires_grad_(true);
  auto wt = at::randn({E, Dout, Din}, at::kDouble).requires_grad_(true);
  auto out = ops::grouped_mm(in, wt, off);
  auto g = at::randn_like(out);
  out.backward(g);
  auto ref = at::zeros({6, Dout}, at::kDouble);
  auto ref_gi = at::zeros_like(in), ref_gw = at::zeros_like(wt);
  const std::vector<int64_t> o = {0, 2, 2, 5};
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t r = o[e]; r < o[e + 1]; ++r) {
      ref[r] = at::mv(wt[e].detach(), in[r].detach());
      ref_gi[r] = at::mv(wt[e].detach().t(), g[r]);
      ref_gw[e] += at::outer(g[r], in[r].detach());
    }
  }
  EXPECT_TRUE(at::allclose(out, ref));
  EXPECT_TRUE(at::allclose(in.grad(), ref_gi));
  EXPECT_TRUE(at::allclose(wt.grad(), ref_gw));
  EXPECT_TRUE(wt.grad()[1].abs().sum().item<double>() == 0);

  auto gu = at::randn({4, 6}, at::kDouble).requires_grad_(true);
  auto y = ops::swiglu(gu);
  auto gy = at::randn_like(y);
  y.backward(gy);
  for (int64_t r = 0; r < 4; ++r) {
    for (int64_t j = 0; j < 3; ++j) {
      const double a = gu[r][j].item<double>(), b = gu[r][3 + j].item<double>();
      const double sig = 1 / (1 + std::exp(-a));
      EXPECT_NEAR(y[r][j].item<double>(), a * sig * b, 1e-12);
      const double d = gy[r][j].item<double>();
      EXPECT_NEAR(
          gu.grad()[r][j].item<double>(),
          d * b * sig * (1 + a * (1 - sig)),
          1e-12);
      EXPECT_NEAR(gu.grad()[r][3 + j].item<double>(), d * a * sig, 1e-12);
    }
  }
}

TEST(Ops, ReducedPrecisionMatchesFloat) {
  at::manual_seed(4);
  auto [w, idx, s] = ops::router_topk(at::randn({30, 8}), 2);
  auto [rt, slot, off, cnt] = ops::route_plan(idx, w, 8, -1);
  for (auto dt : {at::kBFloat16, at::kHalf}) {
    auto x = at::randn({30, 16});
    auto wt = at::randn({8, 12, 16}) * 0.2;
    auto h = ops::grouped_mm(ops::permute(x, rt), wt, off);
    auto y = ops::unpermute(ops::swiglu(h), slot, w);
    auto hl = ops::grouped_mm(ops::permute(x.to(dt), rt), wt.to(dt), off);
    auto yl = ops::unpermute(
        ops::swiglu(hl), slot, w); // fp32 weights, low-precision rows
    EXPECT_EQ(yl.scalar_type(), dt);
    EXPECT_TRUE(at::allclose(yl.to(at::kFloat), y, 5e-2, 5e-2));
  }
}

// ---- bad input
// ----------------------------------------------------------------

TEST(Ops, BadInputNamesOpArgumentAndValue) {
  auto has = [](const std::string& msg, const std::string& part) {
    return msg.find(part) != std::string::npos;
  };
  EXPECT_TRUE(
      has(error_of([] {
            ops::router_topk(at::randn({3, 4}), 5);
          }),
          "router_topk: k must be in [1, num_experts=4], got 5"));
  EXPECT_TRUE(
      has(error_of([] {
            ops::router_topk(at::randn({3, 4}), 0);
          }),
          "got 0"));
  EXPECT_TRUE(
      has(error_of([] {
            ops::router_topk(at::randn({3, 4}), 1, "relu");
          }),
          "score_fn must be 'softmax' or 'sigmoid', got 'relu'"));
  EXPECT_TRUE(
      has(error_of([] {
            ops::router_topk(at::ones({3, 4}, at::kInt), 1);
          }),
          "logits must be float32"));
  EXPECT_TRUE(
      has(error_of([] {
            ops::router_topk(
                at::randn({3, 4}), 1, "softmax", true, 1.0, at::randn({3}));
          }),
          "selection_bias must have shape [4]"));
  EXPECT_TRUE(
      has(error_of([] {
            ops::route_plan(
                at::tensor({7}, at::kLong).view({1, 1}), at::ones({1, 1}), 3);
          }),
          "route_plan: indices must be in [0, num_experts=3) or -1 "
          "(unassigned), got 7"));
  EXPECT_TRUE(has(
      error_of([] {
        ops::route_plan(
            at::tensor({1}, at::kLong).view({1, 1}), at::ones({1, 1}), 3, 0);
      }),
      "capacity must be >= 1 (or -1 for dropless), got 0"));
  EXPECT_TRUE(
      has(error_of([] {
            ops::route_plan(
                at::tensor({1}, at::kLong).view({1, 1}),
                at::ones({1, 1}),
                3,
                -1,
                "oldest");
          }),
          "drop_policy must be 'position' or 'probs', got 'oldest'"));
  EXPECT_TRUE(
      has(error_of([] {
            ops::route_plan(
                at::tensor({1}, at::kLong).view({1, 1}), at::ones({1, 2}), 3);
          }),
          "weights must have the shape of indices"));
  EXPECT_TRUE(
      has(error_of([] {
            ops::permute(at::randn({3, 2}), at::tensor({5}, at::kLong));
          }),
          "permute: row_token must be in [-1, num_tokens=3), got 5"));
  EXPECT_TRUE(
      has(error_of([] {
            ops::unpermute(
                at::randn({3, 2}),
                at::tensor({3}, at::kLong).view({1, 1}),
                at::ones({1, 1}));
          }),
          "unpermute: slot must be in [-1, num_rows=3), got 3"));
  EXPECT_TRUE(
      has(error_of([] {
            ops::unpermute(
                at::randn({3, 2}),
                at::tensor({0}, at::kLong).view({1, 1}),
                at::ones({1, 1}, at::kDouble));
          }),
          "weights must be float32 or the dtype of rows"));
  EXPECT_TRUE(
      has(error_of([] {
            ops::grouped_mm(
                at::randn({3, 2}),
                at::randn({2, 4, 3}),
                at::tensor({0, 1, 3}, at::kLong));
          }),
          "grouped_mm: input has 2 features but weight expects 3"));
  EXPECT_TRUE(
      has(error_of([] {
            ops::grouped_mm(
                at::randn({3, 2}),
                at::randn({2, 4, 2}),
                at::tensor({0, 1}, at::kLong));
          }),
          "expert_offsets must have num_experts + 1 = 3 entries, got 2"));
  EXPECT_TRUE(
      has(error_of([] {
            ops::swiglu(at::randn({2, 3}));
          }),
          "swiglu: gate_up must have an even number of columns"));
}

} // namespace
