#pragma once
// Naive loop references for the moeyard ops and the MoE layer, plus small
// test helpers. Every reference works in float64 with plain loops over
// tokens / experts / features through tensor accessors; none reuses the ATen
// formulas or the kernels it checks.

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

namespace moeyard_test {

// ---- helpers ----------------------------------------------------------------

// Message of the c10::Error that fn throws, "" if it throws nothing.
template <typename Fn>
std::string error_message(Fn&& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

// EXPECT_THROW(stmt, c10::Error) and the message contains `substr`.
#define MOEYARD_EXPECT_ERROR(substr, ...)                                      \
  do {                                                                         \
    EXPECT_THROW({ __VA_ARGS__; }, c10::Error);                                \
    const std::string moeyard_msg_ =                                           \
        ::moeyard_test::error_message([&] { __VA_ARGS__; });                   \
    EXPECT_NE(moeyard_msg_.find(substr), std::string::npos)                    \
        << "expected \"" << (substr) << "\" in the message: " << moeyard_msg_; \
  } while (0)

inline at::Tensor f64(const at::Tensor& t) {
  return t.detach().to(at::kDouble).contiguous();
}

inline at::Tensor i64(const at::Tensor& t) {
  return t.detach().to(at::kLong).contiguous();
}

// Element-wise |got - want| <= atol + rtol * |want|, same shape.
inline ::testing::AssertionResult all_close(
    const at::Tensor& got,
    const at::Tensor& want,
    double atol,
    double rtol = 0.0) {
  if (got.sizes() != want.sizes()) {
    return ::testing::AssertionFailure()
           << "shape " << got.sizes() << " != expected " << want.sizes();
  }
  const auto g = f64(got).flatten();
  const auto w = f64(want).flatten();
  const auto G = g.accessor<double, 1>();
  const auto W = w.accessor<double, 1>();
  int64_t bad = 0;
  std::ostringstream first;
  for (int64_t i = 0; i < g.size(0); ++i) {
    const double tol = atol + rtol * std::abs(W[i]);
    const bool ok =
        std::abs(G[i] - W[i]) <= tol || (std::isnan(G[i]) && std::isnan(W[i]));
    if (!ok) {
      if (bad < 5) {
        first << " [" << i << "] got " << G[i] << " want " << W[i] << ";";
      }
      ++bad;
    }
  }
  if (bad == 0) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure()
         << bad << " of " << g.size(0) << " elements differ (atol " << atol
         << ", rtol " << rtol << "):" << first.str();
}

// Exact equality of integer tensors, with the first differences printed.
inline ::testing::AssertionResult all_equal(
    const at::Tensor& got, const at::Tensor& want) {
  if (got.sizes() != want.sizes()) {
    return ::testing::AssertionFailure()
           << "shape " << got.sizes() << " != expected " << want.sizes();
  }
  const auto g = i64(got).flatten();
  const auto w = i64(want).flatten();
  const auto G = g.accessor<int64_t, 1>();
  const auto W = w.accessor<int64_t, 1>();
  std::ostringstream diff;
  int64_t bad = 0;
  for (int64_t i = 0; i < g.size(0); ++i) {
    if (G[i] != W[i]) {
      if (bad < 8) {
        diff << " [" << i << "] got " << G[i] << " want " << W[i] << ";";
      }
      ++bad;
    }
  }
  if (bad == 0) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure()
         << bad << " of " << g.size(0) << " entries differ:" << diff.str();
}

inline at::Tensor make_long(
    std::vector<int64_t> v, std::vector<int64_t> shape) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, at::kLong);
  auto A = t.accessor<int64_t, 1>();
  for (size_t i = 0; i < v.size(); ++i) {
    A[i] = v[i];
  }
  return t.view(shape).clone();
}

inline at::Tensor make_double(
    std::vector<double> v, std::vector<int64_t> shape) {
  auto t = at::empty({static_cast<int64_t>(v.size())}, at::kDouble);
  auto A = t.accessor<double, 1>();
  for (size_t i = 0; i < v.size(); ++i) {
    A[i] = v[i];
  }
  return t.view(shape).clone();
}

// Central differences of a scalar function of one float64 tensor.
inline at::Tensor numeric_grad(
    const std::function<double(const at::Tensor&)>& f,
    const at::Tensor& x,
    double eps = 1e-6) {
  auto base = f64(x).clone();
  auto grad = at::zeros_like(base);
  auto flat = base.view({-1});
  auto gflat = grad.view({-1});
  auto B = flat.accessor<double, 1>();
  auto Gr = gflat.accessor<double, 1>();
  for (int64_t i = 0; i < flat.size(0); ++i) {
    const double v = B[i];
    B[i] = v + eps;
    const double fp = f(base);
    B[i] = v - eps;
    const double fm = f(base);
    B[i] = v;
    Gr[i] = (fp - fm) / (2 * eps);
  }
  return grad;
}

// sum(a * b) over all elements, in float64 loops.
inline double dot_all(const at::Tensor& a, const at::Tensor& b) {
  const auto x = f64(a).flatten();
  const auto y = f64(b).flatten();
  const auto X = x.accessor<double, 1>();
  const auto Y = y.accessor<double, 1>();
  double s = 0;
  for (int64_t i = 0; i < x.size(0); ++i) {
    s += X[i] * Y[i];
  }
  return s;
}

inline double sigmoid(double v) {
  return 1.0 / (1.0 + std::exp(-v));
}

inline double silu(double v) {
  return v * sigmoid(v);
}

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

// ---- permute / unpermute
// ---------------------------------------------------------

inline at::Tensor ref_permute(const at::Tensor& x_in, const at::Tensor& rt_in) {
  const auto x = f64(x_in);
  const auto rt = i64(rt_in);
  const int64_t N = rt.size(0), H = x.size(1);
  auto out = at::zeros({N, H}, at::kDouble);
  auto O = out.accessor<double, 2>();
  const auto X = x.accessor<double, 2>();
  const auto R = rt.accessor<int64_t, 1>();
  for (int64_t i = 0; i < N; ++i) {
    if (R[i] < 0) {
      continue;
    }
    for (int64_t h = 0; h < H; ++h) {
      O[i][h] = X[R[i]][h];
    }
  }
  return out;
}

inline at::Tensor ref_permute_grad(
    const at::Tensor& g_in, const at::Tensor& rt_in, int64_t T) {
  const auto g = f64(g_in);
  const auto rt = i64(rt_in);
  const int64_t N = rt.size(0), H = g.size(1);
  auto out = at::zeros({T, H}, at::kDouble);
  auto O = out.accessor<double, 2>();
  const auto G = g.accessor<double, 2>();
  const auto R = rt.accessor<int64_t, 1>();
  for (int64_t i = 0; i < N; ++i) {
    if (R[i] < 0) {
      continue;
    }
    for (int64_t h = 0; h < H; ++h) {
      O[R[i]][h] += G[i][h];
    }
  }
  return out;
}

inline at::Tensor ref_unpermute(
    const at::Tensor& rows_in,
    const at::Tensor& slot_in,
    const at::Tensor& w_in) {
  const auto rows = f64(rows_in);
  const auto slot = i64(slot_in);
  const auto w = f64(w_in);
  const int64_t T = slot.size(0), K = slot.size(1), H = rows.size(1);
  auto y = at::zeros({T, H}, at::kDouble);
  auto Y = y.accessor<double, 2>();
  const auto Rw = rows.accessor<double, 2>();
  const auto S = slot.accessor<int64_t, 2>();
  const auto Wt = w.accessor<double, 2>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      if (S[t][k] < 0) {
        continue;
      }
      for (int64_t h = 0; h < H; ++h) {
        Y[t][h] += Wt[t][k] * Rw[S[t][k]][h];
      }
    }
  }
  return y;
}

// Gradients of sum(grad_y * unpermute(rows, slot, weights)).
inline std::pair<at::Tensor, at::Tensor> ref_unpermute_grad(
    const at::Tensor& gy_in,
    const at::Tensor& rows_in,
    const at::Tensor& slot_in,
    const at::Tensor& w_in) {
  const auto gy = f64(gy_in);
  const auto rows = f64(rows_in);
  const auto slot = i64(slot_in);
  const auto w = f64(w_in);
  const int64_t T = slot.size(0), K = slot.size(1), H = rows.size(1);
  auto grows = at::zeros_like(rows);
  auto gw = at::zeros({T, K}, at::kDouble);
  auto GR = grows.accessor<double, 2>();
  auto GW = gw.accessor<double, 2>();
  const auto GY = gy.accessor<double, 2>();
  const auto Rw = rows.accessor<double, 2>();
  const auto S = slot.accessor<int64_t, 2>();
  const auto Wt = w.accessor<double, 2>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = S[t][k];
      if (r < 0) {
        continue;
      }
      for (int64_t h = 0; h < H; ++h) {
        GR[r][h] += Wt[t][k] * GY[t][h];
        GW[t][k] += GY[t][h] * Rw[r][h];
      }
    }
  }
  return {grows, gw};
}

// ---- grouped_mm / swiglu
// ----------------------------------------------------------

inline at::Tensor ref_grouped_mm(
    const at::Tensor& in_, const at::Tensor& w_, const at::Tensor& off_) {
  const auto in = f64(in_);
  const auto w = f64(w_);
  const auto off = i64(off_);
  const int64_t N = in.size(0), Din = in.size(1);
  const int64_t E = w.size(0), Dout = w.size(1);
  auto out = at::zeros({N, Dout}, at::kDouble);
  auto O = out.accessor<double, 2>();
  const auto X = in.accessor<double, 2>();
  const auto Wt = w.accessor<double, 3>();
  const auto OF = off.accessor<int64_t, 1>();
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t i = OF[e]; i < OF[e + 1]; ++i) {
      for (int64_t o = 0; o < Dout; ++o) {
        double acc = 0;
        for (int64_t d = 0; d < Din; ++d) {
          acc += X[i][d] * Wt[e][o][d];
        }
        O[i][o] = acc;
      }
    }
  }
  return out;
}

// Gradients of sum(g * grouped_mm(input, weight, offsets)).
inline std::pair<at::Tensor, at::Tensor> ref_grouped_mm_grad(
    const at::Tensor& g_,
    const at::Tensor& in_,
    const at::Tensor& w_,
    const at::Tensor& off_) {
  const auto g = f64(g_);
  const auto in = f64(in_);
  const auto w = f64(w_);
  const auto off = i64(off_);
  const int64_t Din = in.size(1);
  const int64_t E = w.size(0), Dout = w.size(1);
  auto gin = at::zeros_like(in);
  auto gw = at::zeros_like(w);
  auto GI = gin.accessor<double, 2>();
  auto GW = gw.accessor<double, 3>();
  const auto G = g.accessor<double, 2>();
  const auto X = in.accessor<double, 2>();
  const auto Wt = w.accessor<double, 3>();
  const auto OF = off.accessor<int64_t, 1>();
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t i = OF[e]; i < OF[e + 1]; ++i) {
      for (int64_t o = 0; o < Dout; ++o) {
        for (int64_t d = 0; d < Din; ++d) {
          GI[i][d] += G[i][o] * Wt[e][o][d];
          GW[e][o][d] += G[i][o] * X[i][d];
        }
      }
    }
  }
  return {gin, gw};
}

inline at::Tensor ref_swiglu(const at::Tensor& gu_) {
  const auto gu = f64(gu_);
  const int64_t N = gu.size(0), F = gu.size(1) / 2;
  auto out = at::zeros({N, F}, at::kDouble);
  auto O = out.accessor<double, 2>();
  const auto X = gu.accessor<double, 2>();
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t j = 0; j < F; ++j) {
      O[i][j] = silu(X[i][j]) * X[i][F + j];
    }
  }
  return out;
}

// Gradient of sum(g * swiglu(gate_up)): d/dg silu(g) = s + g s (1 - s).
inline at::Tensor ref_swiglu_grad(const at::Tensor& g_, const at::Tensor& gu_) {
  const auto g = f64(g_);
  const auto gu = f64(gu_);
  const int64_t N = gu.size(0), F = gu.size(1) / 2;
  auto out = at::zeros_like(gu);
  auto O = out.accessor<double, 2>();
  const auto X = gu.accessor<double, 2>();
  const auto G = g.accessor<double, 2>();
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t j = 0; j < F; ++j) {
      const double a = X[i][j], b = X[i][F + j], s = sigmoid(a);
      O[i][j] = G[i][j] * b * (s + a * s * (1 - s));
      O[i][F + j] = G[i][j] * silu(a);
    }
  }
  return out;
}

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
