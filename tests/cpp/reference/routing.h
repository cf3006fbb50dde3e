#pragma once
// Naive loop references of router_topk and route_plan.
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

// ---- router_topk
// --------------------------------------------------------------

struct TopkRef {
  at::Tensor weights; // [T, K] double
  at::Tensor indices; // [T, K] long
  at::Tensor scores; // [T, E] double
};

// Scores (softmax with the max subtracted, or sigmoid); selection on
// scores + bias, restricted to the best `topk_groups` of `num_groups` groups
// (group score = sum of the group's two best biased scores); ties to the
// lower index. weights = unbiased scores of the chosen experts, divided by
// (their sum + 1e-20) when renormalizing, times scale.
inline TopkRef ref_router_topk(
    const at::Tensor& logits_in,
    int64_t K,
    bool sigmoid_scores,
    bool renormalize,
    double scale,
    const at::Tensor& bias_in = {},
    int64_t num_groups = 1,
    int64_t topk_groups = 1) {
  const auto logits = f64(logits_in);
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto L = logits.accessor<double, 2>();
  std::vector<double> bias(E, 0.0);
  if (bias_in.defined()) {
    const auto b = f64(bias_in);
    const auto Bv = b.accessor<double, 1>();
    for (int64_t e = 0; e < E; ++e) {
      bias[e] = Bv[e];
    }
  }
  TopkRef r{
      at::zeros({T, K}, at::kDouble),
      at::zeros({T, K}, at::kLong),
      at::zeros({T, E}, at::kDouble)};
  auto W = r.weights.accessor<double, 2>();
  auto I = r.indices.accessor<int64_t, 2>();
  auto S = r.scores.accessor<double, 2>();
  const int64_t gsize = E / num_groups;
  const double neg_inf = -std::numeric_limits<double>::infinity();
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> s(E);
    if (sigmoid_scores) {
      for (int64_t e = 0; e < E; ++e) {
        s[e] = sigmoid(L[t][e]);
      }
    } else {
      double mx = neg_inf;
      for (int64_t e = 0; e < E; ++e) {
        mx = std::max(mx, L[t][e]);
      }
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) {
        s[e] = std::exp(L[t][e] - mx);
        sum += s[e];
      }
      for (int64_t e = 0; e < E; ++e) {
        s[e] /= sum;
      }
    }
    for (int64_t e = 0; e < E; ++e) {
      S[t][e] = s[e];
    }
    std::vector<double> sel(E);
    for (int64_t e = 0; e < E; ++e) {
      sel[e] = s[e] + bias[e];
    }
    if (num_groups > 1 && topk_groups < num_groups) {
      std::vector<double> gscore(num_groups);
      for (int64_t g = 0; g < num_groups; ++g) {
        std::vector<double> v(
            sel.begin() + g * gsize, sel.begin() + (g + 1) * gsize);
        std::sort(v.begin(), v.end(), std::greater<double>());
        gscore[g] = v[0] + (gsize >= 2 ? v[1] : 0.0);
      }
      std::vector<bool> keep(num_groups, false);
      for (int64_t n = 0; n < topk_groups; ++n) {
        int64_t best = -1;
        for (int64_t g = 0; g < num_groups; ++g) {
          if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) {
            best = g;
          }
        }
        keep[best] = true;
      }
      for (int64_t e = 0; e < E; ++e) {
        if (!keep[e / gsize]) {
          sel[e] = neg_inf;
        }
      }
    }
    std::vector<bool> taken(E, false);
    double denom = 0;
    for (int64_t k = 0; k < K; ++k) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e) {
        if (!taken[e] && (best < 0 || sel[e] > sel[best])) {
          best = e;
        }
      }
      taken[best] = true;
      I[t][k] = best;
      denom += s[best];
    }
    for (int64_t k = 0; k < K; ++k) {
      const double v = s[I[t][k]];
      W[t][k] = renormalize ? scale * v / (denom + 1e-20) : scale * v;
    }
  }
  return r;
}

// ---- route_plan
// -----------------------------------------------------------------

struct PlanRef {
  at::Tensor row_token, slot, offsets, counts; // all long
};

// For every expert: its (token, slot) pairs in flat order t*K+k; dropless
// keeps all, capacity C keeps the first C ("position") or the C highest
// weights, ties to the earlier pair ("probs"), placed in pair order.
inline PlanRef ref_route_plan(
    const at::Tensor& indices_in,
    const at::Tensor& weights_in,
    int64_t E,
    int64_t C,
    bool by_probs) {
  const auto indices = i64(indices_in);
  const auto weights = weights_in.detach().to(at::kFloat).to(at::kDouble);
  const int64_t T = indices.size(0), K = indices.size(1);
  const auto I = indices.accessor<int64_t, 2>();
  const auto Wt = weights.accessor<double, 2>();
  const bool dropless = C < 0;
  const int64_t N = dropless ? T * K : E * C;
  PlanRef r{
      at::full({N}, -1, at::kLong),
      at::full({T, K}, -1, at::kLong),
      at::zeros({E + 1}, at::kLong),
      at::zeros({E}, at::kLong)};
  auto RT = r.row_token.accessor<int64_t, 1>();
  auto SL = r.slot.accessor<int64_t, 2>();
  auto OF = r.offsets.accessor<int64_t, 1>();
  auto CN = r.counts.accessor<int64_t, 1>();
  int64_t next_row = 0;
  for (int64_t e = 0; e < E; ++e) {
    std::vector<int64_t> pairs;
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t k = 0; k < K; ++k) {
        if (I[t][k] == e) {
          pairs.push_back(t * K + k);
        }
      }
    }
    std::vector<int64_t> kept = pairs;
    if (!dropless && static_cast<int64_t>(kept.size()) > C) {
      if (by_probs) {
        std::vector<int64_t> order = pairs;
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
          return Wt[a / K][a % K] > Wt[b / K][b % K];
        });
        order.resize(C);
        std::sort(order.begin(), order.end());
        kept = order;
      } else {
        kept.resize(C);
      }
    }
    const int64_t base = dropless ? next_row : e * C;
    OF[e] = base;
    for (size_t j = 0; j < kept.size(); ++j) {
      const int64_t p = kept[j];
      RT[base + static_cast<int64_t>(j)] = p / K;
      SL[p / K][p % K] = base + static_cast<int64_t>(j);
    }
    CN[e] = static_cast<int64_t>(kept.size());
    next_row += static_cast<int64_t>(kept.size());
  }
  OF[E] = dropless ? next_row : E * C;
  return r;
}

} // namespace moeyard_test
