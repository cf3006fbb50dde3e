#pragma once
// Naive loop reference of the whole MoE layer (routing, experts, combine,
// aux losses), built from the routing references.
// Every reference works in float64 with plain loops through tensor
// accessors; none reuses the ATen formulas or the kernels it checks.

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "reference/routing.h"

namespace moeyard_test {

// ---- the MoE layer
// ---------------------------------------------------------------

// out[o] = sum_d W[o][d] * v[d]
inline std::vector<double> matvec(
    const at::TensorAccessor<double, 2>& W, const std::vector<double>& v) {
  std::vector<double> out(W.size(0), 0.0);
  for (int64_t o = 0; o < W.size(0); ++o) {
    for (int64_t d = 0; d < W.size(1); ++d) {
      out[o] += W[o][d] * v[d];
    }
  }
  return out;
}

// SwiGLU MLP on one vector: down @ (silu(gate @ v) * (up @ v)).
inline std::vector<double> mlp(
    const at::TensorAccessor<double, 2>& gate_up,
    const at::TensorAccessor<double, 2>& down,
    const std::vector<double>& v) {
  const auto h = matvec(gate_up, v);
  const int64_t F = static_cast<int64_t>(h.size()) / 2;
  std::vector<double> a(F);
  for (int64_t j = 0; j < F; ++j) {
    a[j] = silu(h[j]) * h[F + j];
  }
  return matvec(down, a);
}

struct MoeRefOptions {
  int64_t top_k = 2;
  bool sigmoid = false;
  bool renormalize = true;
  double scale = 1.0;
  int64_t num_groups = 1;
  int64_t topk_groups = 1;
  bool expert_choice = false;
  bool weight_on_input = false;
  int64_t capacity = -1; // token choice: -1 dropless; expert choice: C
  bool drop_by_probs = false;
};

struct MoeRefWeights {
  at::Tensor router_weight, router_bias, w_gate_up, w_down, shared_gate_up,
      shared_down, shared_gate, selection_bias;
};

struct MoeRef {
  at::Tensor y; // [T, H]
  at::Tensor assigned; // [E] assignments before drops
  at::Tensor kept; // [E] kept assignments
  at::Tensor indices; // token choice [T, K]; expert choice [E, C]
  double switch_loss = 0;
};

// One MoE layer, token by token, on x [T, H] (all tokens real).
inline MoeRef ref_moe(
    const at::Tensor& x_in, const MoeRefWeights& mw, const MoeRefOptions& o) {
  const auto x = f64(x_in);
  const int64_t T = x.size(0), H = x.size(1);
  const auto rw = f64(mw.router_weight);
  const int64_t E = rw.size(0);
  const auto X = x.accessor<double, 2>();
  const auto RW = rw.accessor<double, 2>();
  // Router logits by loops.
  auto logits = at::zeros({T, E}, at::kDouble);
  {
    auto L = logits.accessor<double, 2>();
    at::Tensor rb =
        mw.router_bias.defined() ? f64(mw.router_bias) : at::Tensor();
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t e = 0; e < E; ++e) {
        double acc = rb.defined() ? rb.accessor<double, 1>()[e] : 0.0;
        for (int64_t h = 0; h < H; ++h) {
          acc += X[t][h] * RW[e][h];
        }
        L[t][e] = acc;
      }
    }
  }
  const auto wgu = f64(mw.w_gate_up);
  const auto wd = f64(mw.w_down);
  const auto WGU = wgu.accessor<double, 3>();
  const auto WD = wd.accessor<double, 3>();
  auto token = [&](int64_t t) {
    std::vector<double> v(H);
    for (int64_t h = 0; h < H; ++h) {
      v[h] = X[t][h];
    }
    return v;
  };

  MoeRef r;
  r.y = at::zeros({T, H}, at::kDouble);
  r.assigned = at::zeros({E}, at::kDouble);
  r.kept = at::zeros({E}, at::kDouble);
  auto Y = r.y.accessor<double, 2>();
  auto A = r.assigned.accessor<double, 1>();
  auto KP = r.kept.accessor<double, 1>();
  std::vector<std::vector<double>> probs(T, std::vector<double>(E));

  if (!o.expert_choice) {
    const int64_t K = o.top_k;
    const auto topk = ref_router_topk(
        logits,
        K,
        o.sigmoid,
        o.renormalize,
        o.scale,
        mw.selection_bias,
        o.num_groups,
        o.topk_groups);
    const auto plan = ref_route_plan(
        topk.indices, topk.weights, E, o.capacity, o.drop_by_probs);
    const auto I = topk.indices.accessor<int64_t, 2>();
    const auto Wt = topk.weights.accessor<double, 2>();
    const auto SL = plan.slot.accessor<int64_t, 2>();
    const auto S = topk.scores.accessor<double, 2>();
    for (int64_t t = 0; t < T; ++t) {
      double ssum = 0;
      for (int64_t e = 0; e < E; ++e) {
        ssum += S[t][e];
      }
      for (int64_t e = 0; e < E; ++e) {
        probs[t][e] = o.sigmoid ? S[t][e] / (ssum + 1e-20) : S[t][e];
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = I[t][k];
        A[e] += 1;
        if (SL[t][k] < 0) {
          continue; // dropped by capacity
        }
        KP[e] += 1;
        auto v = token(t);
        if (o.weight_on_input) {
          for (auto& q : v) {
            q *= Wt[t][k];
          }
        }
        const auto out = mlp(WGU[e], WD[e], v);
        const double c = o.weight_on_input ? 1.0 : Wt[t][k];
        for (int64_t h = 0; h < H; ++h) {
          Y[t][h] += c * out[h];
        }
      }
    }
    r.indices = topk.indices;
  } else {
    // Expert choice: expert e takes the C tokens with the highest scores
    // (ties: earlier token), weight = that token's score for e.
    const int64_t C = o.capacity;
    const auto S = ref_router_topk(logits, 1, o.sigmoid, false, 1.0).scores;
    const auto SA = S.accessor<double, 2>();
    r.indices = at::zeros({E, C}, at::kLong);
    auto RI = r.indices.accessor<int64_t, 2>();
    for (int64_t t = 0; t < T; ++t) {
      double ssum = 0;
      for (int64_t e = 0; e < E; ++e) {
        ssum += SA[t][e];
      }
      for (int64_t e = 0; e < E; ++e) {
        probs[t][e] = o.sigmoid ? SA[t][e] / (ssum + 1e-20) : SA[t][e];
      }
    }
    for (int64_t e = 0; e < E; ++e) {
      std::vector<bool> taken(T, false);
      std::vector<int64_t> chosen;
      for (int64_t c = 0; c < C; ++c) {
        int64_t best = -1;
        for (int64_t t = 0; t < T; ++t) {
          if (!taken[t] && (best < 0 || SA[t][e] > SA[best][e])) {
            best = t;
          }
        }
        taken[best] = true;
        chosen.push_back(best);
      }
      std::sort(chosen.begin(), chosen.end());
      for (int64_t c = 0; c < C; ++c) {
        const int64_t t = chosen[c];
        RI[e][c] = t;
        A[e] += 1;
        KP[e] += 1;
        const auto out = mlp(WGU[e], WD[e], token(t));
        for (int64_t h = 0; h < H; ++h) {
          Y[t][h] += SA[t][e] * out[h];
        }
      }
    }
  }

  if (mw.shared_gate_up.defined()) {
    const auto sgu = f64(mw.shared_gate_up);
    const auto sd = f64(mw.shared_down);
    at::Tensor sg =
        mw.shared_gate.defined() ? f64(mw.shared_gate) : at::Tensor();
    for (int64_t t = 0; t < T; ++t) {
      const auto v = token(t);
      const auto out =
          mlp(sgu.accessor<double, 2>(), sd.accessor<double, 2>(), v);
      double gate = 1.0;
      if (sg.defined()) {
        const auto G = sg.accessor<double, 2>();
        double acc = 0;
        for (int64_t h = 0; h < H; ++h) {
          acc += G[0][h] * v[h];
        }
        gate = sigmoid(acc);
      }
      for (int64_t h = 0; h < H; ++h) {
        Y[t][h] += gate * out[h];
      }
    }
  }

  // Switch loss: E * sum_e f_e * P_e, f_e = assigned_e / (T*top_k),
  // P_e = mean over tokens of the (normalized) probability of e.
  const double K_eff = static_cast<double>(o.top_k);
  double sw = 0;
  for (int64_t e = 0; e < E; ++e) {
    double P = 0;
    for (int64_t t = 0; t < T; ++t) {
      P += probs[t][e];
    }
    const double n = std::max<double>(T, 1);
    sw += (A[e] / (n * K_eff)) * (P / n);
  }
  r.switch_loss = E * sw;
  return r;
}

} // namespace moeyard_test
