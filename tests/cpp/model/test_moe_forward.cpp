// moeyard::moe_forward against a naive per-token loop reference (router
// logits, scores, top-k, per-expert SwiGLU MLP on each token, weighted sum):
// dropless token choice, capacity with drops (both policies), shared experts
// with a gate, sigmoid + selection bias + groups, expert choice, weight on
// input, the padding mask, gradients against finite differences, bfloat16,
// edge shapes and bad options.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "model/moe_forward.h"
#include "reference/moe.h"

namespace {

using namespace moeyard_test;
using moeyard::MoEOptions;
using moeyard::MoEOutput;
using moeyard::MoEWeights;

struct LayerSpec {
  int64_t T = 7, H = 6, E = 4, F = 5, Fs = 3;
  at::ScalarType dtype = at::kFloat;
  bool shared = false, shared_gate = false, router_bias = false,
       selection_bias = false;
};

struct Layer {
  at::Tensor x;
  MoEWeights w;
};

Layer make_layer(const LayerSpec& s) {
  const auto dt = s.dtype;
  const auto rdt = dt == at::kDouble ? at::kDouble : at::kFloat;
  Layer l;
  l.x = at::randn({s.T, s.H}).to(dt);
  l.w.router_weight = (at::randn({s.E, s.H}) * 0.8).to(rdt);
  l.w.w_gate_up = (at::randn({s.E, 2 * s.F, s.H}) * 0.5).to(dt);
  l.w.w_down = (at::randn({s.E, s.H, s.F}) * 0.5).to(dt);
  if (s.router_bias) {
    l.w.router_bias = (at::randn({s.E}) * 0.5).to(rdt);
  }
  if (s.selection_bias) {
    l.w.selection_bias = (at::randn({s.E}) * 0.1).to(rdt);
  }
  if (s.shared) {
    l.w.shared_gate_up = (at::randn({2 * s.Fs, s.H}) * 0.5).to(dt);
    l.w.shared_down = (at::randn({s.H, s.Fs}) * 0.5).to(dt);
    if (s.shared_gate) {
      l.w.shared_gate = (at::randn({1, s.H}) * 0.5).to(dt);
    }
  }
  return l;
}

MoeRefWeights ref_weights(const MoEWeights& w) {
  return {
      w.router_weight,
      w.router_bias,
      w.w_gate_up,
      w.w_down,
      w.shared_gate_up,
      w.shared_down,
      w.shared_gate,
      w.selection_bias};
}

// The reference's options for moe_forward's, the capacity computed by hand:
// C = max(min_capacity, ceil(factor * T * K / E)); expert choice uses
// factor 1 when none is set and at most T.
MoeRefOptions ref_options(const MoEOptions& o, int64_t T, int64_t E) {
  MoeRefOptions r;
  r.top_k = o.top_k;
  r.sigmoid = o.score_fn == "sigmoid";
  r.renormalize = o.renormalize;
  r.scale = o.scale;
  r.num_groups = o.num_groups;
  r.topk_groups = o.topk_groups;
  r.expert_choice = o.routing == "expert_choice";
  r.weight_on_input = o.weight_on_input;
  r.drop_by_probs = o.drop_policy == "probs";
  auto cap = [&](double f) {
    return std::max<int64_t>(
        o.min_capacity,
        static_cast<int64_t>(
            std::ceil(f * T * o.top_k / static_cast<double>(E))));
  };
  if (r.expert_choice) {
    r.capacity = std::min<int64_t>(
        T, cap(o.capacity_factor > 0 ? o.capacity_factor : 1.0));
  } else {
    r.capacity = o.capacity_factor > 0 ? cap(o.capacity_factor) : -1;
  }
  return r;
}

double tol_for(at::ScalarType dt) {
  return dt == at::kDouble ? 1e-11 : (dt == at::kFloat ? 2e-5 : 6e-2);
}

// Runs moe_forward and the reference on the same layer and compares y, the
// routing and the switch loss. Returns both for further checks.
std::pair<MoEOutput, MoeRef> check_against_reference(
    const Layer& l, const MoEOptions& o) {
  const int64_t T = l.x.size(0), E = l.w.router_weight.size(0);
  const auto out = moeyard::moe_forward(l.x, l.w, o);
  const auto ro = ref_options(o, T, E);
  const auto ref = ref_moe(l.x, ref_weights(l.w), ro);
  const double tol = tol_for(l.x.scalar_type());
  EXPECT_EQ(out.y.sizes(), l.x.sizes());
  EXPECT_EQ(out.y.scalar_type(), l.x.scalar_type());
  EXPECT_TRUE(all_close(out.y, ref.y, tol, 2 * tol)) << "y";
  EXPECT_TRUE(all_equal(out.indices, ref.indices)) << "indices";
  EXPECT_TRUE(all_close(out.tokens_per_expert, ref.assigned, 0.0))
      << "tokens_per_expert";
  EXPECT_NEAR(out.switch_loss.item<double>(), ref.switch_loss, 1e-5)
      << "switch_loss";
  return {out, ref};
}

double sum_of(const at::Tensor& t) {
  return f64(t).sum().item<double>();
}

TEST(MoeForwardOp, DroplessTokenChoiceMatchesLoop) {
  at::manual_seed(60);
  for (auto dt : {at::kFloat, at::kDouble}) {
    for (int64_t k : {1, 2, 4}) {
      for (bool renorm : {true, false}) {
        LayerSpec s;
        s.dtype = dt;
        const auto l = make_layer(s);
        MoEOptions o;
        o.top_k = k;
        o.renormalize = renorm;
        o.scale = renorm ? 1.0 : 1.7;
        SCOPED_TRACE(
            std::string(c10::toString(dt)) + " k=" + std::to_string(k) +
            " renorm=" + std::to_string(renorm));
        auto [out, ref] = check_against_reference(l, o);
        EXPECT_EQ(out.indices.sizes(), (at::IntArrayRef{s.T, k}));
        EXPECT_EQ(sum_of(out.tokens_per_expert), static_cast<double>(s.T * k));
        EXPECT_NEAR(out.dropped_fraction.item<double>(), 0.0, 1e-12);
        EXPECT_NEAR(out.capacity_utilization.item<double>(), 1.0, 1e-12);
        EXPECT_TRUE(std::isfinite(out.z_loss.item<double>()));
        EXPECT_GT(out.router_entropy.item<double>(), 0.0);
      }
    }
  }
}

TEST(MoeForwardOp, CapacityWithDropsMatchesLoop) {
  at::manual_seed(61);
  LayerSpec s;
  s.T = 8;
  s.dtype = at::kDouble;
  for (const char* policy : {"position", "probs"}) {
    for (double factor : {0.5, 0.25, 1.0}) {
      const auto l = make_layer(s);
      MoEOptions o;
      o.top_k = 2;
      o.capacity_factor = factor;
      o.drop_policy = policy;
      SCOPED_TRACE(std::string(policy) + " factor=" + std::to_string(factor));
      auto [out, ref] = check_against_reference(l, o);
      const int64_t C = ref_options(o, s.T, s.E).capacity;
      EXPECT_EQ(C, static_cast<int64_t>(std::ceil(factor * 16 / 4)));
      const double kept = sum_of(ref.kept);
      EXPECT_NEAR(
          out.dropped_fraction.item<double>(), 1.0 - kept / (s.T * 2), 1e-12);
      EXPECT_NEAR(
          out.capacity_utilization.item<double>(), kept / (s.E * C), 1e-12);
      if (factor < 1.0) {
        EXPECT_GT(out.dropped_fraction.item<double>(), 0.0); // drops happened
      }
      // tokens_per_expert counts assignments before drops.
      EXPECT_EQ(sum_of(out.tokens_per_expert), 16.0);
    }
  }
  // min_capacity raises C above ceil(factor * T * K / E).
  const auto l = make_layer(s);
  MoEOptions o;
  o.capacity_factor = 0.1;
  o.min_capacity = 3;
  auto [out, ref] = check_against_reference(l, o);
  EXPECT_NEAR(
      out.capacity_utilization.item<double>(),
      sum_of(ref.kept) / (s.E * 3),
      1e-12);
}

TEST(MoeForwardOp, SharedExpertsWithGateMatchLoop) {
  at::manual_seed(62);
  for (bool gate : {false, true}) {
    for (auto dt : {at::kFloat, at::kDouble}) {
      LayerSpec s;
      s.dtype = dt;
      s.shared = true;
      s.shared_gate = gate;
      const auto l = make_layer(s);
      MoEOptions o;
      SCOPED_TRACE("gate=" + std::to_string(gate));
      check_against_reference(l, o);
      // The shared part is really there: dropping it changes y.
      auto w2 = l.w;
      w2.shared_gate_up = at::Tensor();
      w2.shared_down = at::Tensor();
      w2.shared_gate = at::Tensor();
      const auto y_routed = moeyard::moe_forward(l.x, w2, o).y;
      const auto y_all = moeyard::moe_forward(l.x, l.w, o).y;
      EXPECT_GT((y_all - y_routed).abs().max().item<double>(), 1e-3);
    }
  }
}

TEST(MoeForwardOp, SigmoidSelectionBiasAndGroupsMatchLoop) {
  at::manual_seed(63);
  for (auto dt : {at::kFloat, at::kDouble}) {
    LayerSpec s;
    s.T = 9;
    s.E = 8;
    s.dtype = dt;
    s.selection_bias = true;
    s.router_bias = true;
    const auto l = make_layer(s);
    MoEOptions o;
    o.top_k = 3;
    o.score_fn = "sigmoid";
    o.renormalize = true;
    o.scale = 2.5;
    o.num_groups = 4;
    o.topk_groups = 2;
    check_against_reference(l, o);
    // Plain sigmoid without renormalization, no groups.
    o.renormalize = false;
    o.num_groups = 1;
    o.topk_groups = 1;
    o.scale = 1.0;
    check_against_reference(l, o);
  }
}

TEST(MoeForwardOp, ExpertChoiceGivesEachExpertExactlyC) {
  at::manual_seed(64);
  LayerSpec s;
  s.T = 8;
  s.dtype = at::kDouble;
  for (double factor : {0.0, 0.5, 10.0}) {
    for (const char* fn : {"softmax", "sigmoid"}) {
      const auto l = make_layer(s);
      MoEOptions o;
      o.routing = "expert_choice";
      o.top_k = 2;
      o.capacity_factor = factor;
      o.score_fn = fn;
      SCOPED_TRACE(std::string(fn) + " factor=" + std::to_string(factor));
      auto [out, ref] = check_against_reference(l, o);
      const int64_t C = ref_options(o, s.T, s.E).capacity;
      EXPECT_EQ(C, factor == 0.0 ? 4 : (factor == 0.5 ? 2 : 8));
      EXPECT_EQ(out.indices.sizes(), (at::IntArrayRef{s.E, C}));
      EXPECT_TRUE(
          all_close(out.tokens_per_expert, at::full({s.E}, double(C)), 0.0));
      // Each expert's tokens are distinct and in token order.
      const auto idx = i64(out.indices);
      const auto I = idx.accessor<int64_t, 2>();
      for (int64_t e = 0; e < s.E; ++e) {
        for (int64_t c = 1; c < C; ++c) {
          EXPECT_LT(I[e][c - 1], I[e][c]);
        }
      }
      // dropped_fraction: share of tokens no expert took.
      std::vector<bool> taken(s.T, false);
      for (int64_t e = 0; e < s.E; ++e) {
        for (int64_t c = 0; c < C; ++c) {
          taken[I[e][c]] = true;
        }
      }
      double n_taken = 0;
      for (bool b : taken) {
        n_taken += b ? 1 : 0;
      }
      EXPECT_NEAR(
          out.dropped_fraction.item<double>(), 1.0 - n_taken / s.T, 1e-12);
      EXPECT_NEAR(out.capacity_utilization.item<double>(), 1.0, 1e-12);
    }
  }
}

TEST(MoeForwardOp, WeightOnInputMatchesLoop) {
  at::manual_seed(65);
  for (auto dt : {at::kFloat, at::kDouble}) {
    LayerSpec s;
    s.dtype = dt;
    const auto l = make_layer(s);
    MoEOptions o; // Llama-4: sigmoid, k = 1, no renormalization.
    o.top_k = 1;
    o.score_fn = "sigmoid";
    o.renormalize = false;
    o.weight_on_input = true;
    check_against_reference(l, o);
    // The result differs from weighting the output (SwiGLU is not linear).
    auto o2 = o;
    o2.weight_on_input = false;
    const auto y1 = moeyard::moe_forward(l.x, l.w, o).y;
    const auto y2 = moeyard::moe_forward(l.x, l.w, o2).y;
    EXPECT_GT((y1 - y2).abs().max().item<double>(), 1e-3);
    // k = 2 softmax with capacity drops.
    MoEOptions o3;
    o3.top_k = 2;
    o3.weight_on_input = true;
    o3.capacity_factor = 0.5;
    check_against_reference(l, o3);
  }
}

TEST(MoeForwardOp, MaskExcludesPaddingTokens) {
  at::manual_seed(66);
  LayerSpec s;
  s.T = 10;
  s.dtype = at::kDouble;
  const auto l = make_layer(s);
  // Two sequences of 5 tokens, the last tokens of each are padding.
  const auto mask = make_long({1, 1, 1, 0, 0, 1, 1, 1, 1, 0}, {2, 5});
  const std::vector<int64_t> real = {0, 1, 2, 5, 6, 7, 8};
  const auto real_idx = make_long(real, {7});
  for (const char* fn : {"softmax", "sigmoid"}) {
    MoEOptions o;
    o.top_k = 2;
    o.score_fn = fn;
    SCOPED_TRACE(fn);
    const auto x3 = l.x.view({2, 5, s.H});
    const auto masked = moeyard::moe_forward(x3, l.w, o, mask);
    const auto only_real =
        moeyard::moe_forward(l.x.index_select(0, real_idx), l.w, o);
    EXPECT_EQ(masked.y.sizes(), x3.sizes());
    EXPECT_TRUE(
        all_close(masked.tokens_per_expert, only_real.tokens_per_expert, 0.0));
    EXPECT_EQ(sum_of(masked.tokens_per_expert), 14.0);
    for (const char* name :
         {"switch_loss",
          "importance_loss",
          "load_loss",
          "z_loss",
          "router_entropy",
          "dropped_fraction"}) {
      auto get = [&](const MoEOutput& m) {
        const std::string n = name;
        return (n == "switch_loss"       ? m.switch_loss
                : n == "importance_loss" ? m.importance_loss
                : n == "load_loss"       ? m.load_loss
                : n == "z_loss"          ? m.z_loss
                : n == "router_entropy"  ? m.router_entropy
                                         : m.dropped_fraction)
            .item<double>();
      };
      EXPECT_NEAR(get(masked), get(only_real), 1e-10) << name;
    }
    // Real tokens get the same output; padding tokens get nothing routed.
    const auto y2 = masked.y.reshape({10, s.H});
    EXPECT_TRUE(all_close(y2.index_select(0, real_idx), only_real.y, 1e-12));
    for (int64_t t : {3, 4, 9}) {
      EXPECT_EQ(y2[t].abs().sum().item<double>(), 0.0) << "token " << t;
      EXPECT_TRUE(all_equal(masked.indices[t], at::full({2}, -1, at::kLong)));
    }
    // A float or bool mask means the same.
    const auto masked_b = moeyard::moe_forward(x3, l.w, o, mask.to(at::kBool));
    EXPECT_TRUE(all_close(masked_b.y, masked.y, 0.0));
    // Per-sequence switch loss: mean over sequences of each sequence's loss
    // on its real tokens.
    auto os = o;
    os.switch_per_sequence = true; // sequences: x3's rows of 5 tokens
    const auto per_seq = moeyard::moe_forward(x3, l.w, os, mask);
    const auto ro = ref_options(o, 3, s.E);
    const double s0 = ref_moe(
                          l.x.index_select(0, make_long({0, 1, 2}, {3})),
                          ref_weights(l.w),
                          ro)
                          .switch_loss;
    const double s1 = ref_moe(
                          l.x.index_select(0, make_long({5, 6, 7, 8}, {4})),
                          ref_weights(l.w),
                          ro)
                          .switch_loss;
    EXPECT_NEAR(per_seq.switch_loss.item<double>(), (s0 + s1) / 2, 1e-10);
  }
}

// Expert choice with a mask: padding tokens are taken by no expert (while
// real tokens are left) and add nothing to the statistics.
TEST(MoeForwardOp, ExpertChoiceMaskSkipsPadding) {
  at::manual_seed(71);
  LayerSpec s;
  s.T = 8;
  s.dtype = at::kDouble;
  const auto l = make_layer(s);
  const auto mask = make_long({1, 0, 1, 1, 0, 1, 1, 1}, {8});
  MoEOptions o;
  o.routing = "expert_choice";
  o.top_k = 1; // C = ceil(8 * 1 / 4) = 2 <= 6 real tokens
  const auto out = moeyard::moe_forward(l.x, l.w, o, mask);
  const auto idx = i64(out.indices);
  const auto I = idx.accessor<int64_t, 2>();
  for (int64_t e = 0; e < s.E; ++e) {
    for (int64_t c = 0; c < idx.size(1); ++c) {
      EXPECT_NE(I[e][c], 1);
      EXPECT_NE(I[e][c], 4);
    }
  }
  EXPECT_TRUE(all_close(out.tokens_per_expert, at::full({s.E}, 2.0), 0.0));
  EXPECT_EQ(out.y[1].abs().sum().item<double>(), 0.0);
  EXPECT_EQ(out.y[4].abs().sum().item<double>(), 0.0);
}

// Gradients of sum(y * R) + 0.7 * switch_loss through moe_forward (C++
// autograd through every op) against central differences of the reference.
TEST(MoeForwardOp, BackwardMatchesFiniteDifferences) {
  at::manual_seed(67);
  struct Case {
    const char* name;
    MoEOptions o;
    LayerSpec s;
  };
  std::vector<Case> cases;
  {
    Case c{"dropless softmax shared+gate", {}, {}};
    c.o.top_k = 2;
    c.s.shared = c.s.shared_gate = true;
    cases.push_back(c);
  }
  {
    Case c{"sigmoid bias groups weight_on_input", {}, {}};
    c.o.top_k = 2;
    c.o.score_fn = "sigmoid";
    c.o.scale = 1.5;
    c.o.num_groups = 2;
    c.o.topk_groups = 1;
    c.o.weight_on_input = true;
    c.s.selection_bias = c.s.router_bias = true;
    cases.push_back(c);
  }
  {
    Case c{"capacity probs", {}, {}};
    c.o.top_k = 2;
    c.o.capacity_factor = 0.5;
    c.o.drop_policy = "probs";
    c.o.renormalize = false;
    cases.push_back(c);
  }
  {
    Case c{"expert choice", {}, {}};
    c.o.routing = "expert_choice";
    c.o.top_k = 1;
    cases.push_back(c);
  }
  for (auto& c : cases) {
    SCOPED_TRACE(c.name);
    c.s.T = 5;
    c.s.H = 3;
    c.s.E = 4;
    c.s.F = 2;
    c.s.Fs = 2;
    c.s.dtype = at::kDouble;
    const Layer l0 = make_layer(c.s);
    const auto R = at::randn({5, 3}, at::kDouble);
    const auto ro = ref_options(c.o, 5, 4);
    auto ref_loss = [&](const Layer& l) {
      const auto r = ref_moe(l.x, ref_weights(l.w), ro);
      return dot_all(r.y, R) + 0.7 * r.switch_loss;
    };
    // Every differentiable input, by pointer into a Layer.
    using Field = at::Tensor Layer::*;
    using WField = at::Tensor MoEWeights::*;
    std::vector<std::pair<std::string, WField>> wfields = {
        {"router_weight", &MoEWeights::router_weight},
        {"router_bias", &MoEWeights::router_bias},
        {"w_gate_up", &MoEWeights::w_gate_up},
        {"w_down", &MoEWeights::w_down},
        {"shared_gate_up", &MoEWeights::shared_gate_up},
        {"shared_down", &MoEWeights::shared_down},
        {"shared_gate", &MoEWeights::shared_gate}};
    Layer l = l0;
    l.x = l0.x.clone().requires_grad_(true);
    for (auto& [n, f] : wfields) {
      if ((l.w.*f).defined()) {
        l.w.*f = (l0.w.*f).clone().requires_grad_(true);
      }
    }
    const auto out = moeyard::moe_forward(l.x, l.w, c.o);
    ((out.y * R).sum() + 0.7 * out.switch_loss).backward();
    Field xf = &Layer::x;
    {
      const auto fd = numeric_grad(
          [&](const at::Tensor& v) {
            Layer p = l0;
            p.*xf = v;
            return ref_loss(p);
          },
          l0.x);
      ASSERT_TRUE(l.x.grad().defined());
      EXPECT_TRUE(all_close(l.x.grad(), fd, 1e-6, 1e-5)) << "x";
    }
    for (auto& [n, f] : wfields) {
      if (!(l0.w.*f).defined()) {
        continue;
      }
      const auto fd = numeric_grad(
          [&](const at::Tensor& v) {
            Layer p = l0;
            p.w.*f = v;
            return ref_loss(p);
          },
          l0.w.*f);
      ASSERT_TRUE((l.w.*f).grad().defined()) << n;
      EXPECT_TRUE(all_close((l.w.*f).grad(), fd, 1e-6, 1e-5)) << n;
    }
  }
}

TEST(MoeForwardOp, Bfloat16CloseToReference) {
  at::manual_seed(68);
  LayerSpec s;
  s.dtype = at::kBFloat16;
  s.shared = s.shared_gate = true;
  const auto l = make_layer(s);
  EXPECT_EQ(l.w.router_weight.scalar_type(), at::kFloat);
  MoEOptions o;
  o.top_k = 2;
  auto [out, ref] = check_against_reference(l, o);
  EXPECT_EQ(out.switch_loss.scalar_type(), at::kFloat);
  EXPECT_EQ(out.tokens_per_expert.scalar_type(), at::kFloat);
  // With capacity drops as well.
  o.capacity_factor = 0.5;
  check_against_reference(l, o);
}

TEST(MoeForwardOp, EdgeShapes) {
  at::manual_seed(69);
  // T = 0.
  {
    LayerSpec s;
    s.T = 0;
    auto l = make_layer(s);
    MoEOptions o;
    const auto out = moeyard::moe_forward(l.x, l.w, o);
    EXPECT_EQ(out.y.sizes(), (at::IntArrayRef{0, s.H}));
    EXPECT_TRUE(all_close(out.tokens_per_expert, at::zeros({s.E}), 0.0));
    EXPECT_FALSE(std::isnan(out.switch_loss.item<double>()));
  }
  // E = 1, k = 1: every token goes through the one expert with weight 1.
  {
    LayerSpec s;
    s.E = 1;
    s.dtype = at::kDouble;
    const auto l = make_layer(s);
    MoEOptions o;
    o.top_k = 1;
    auto [out, ref] = check_against_reference(l, o);
    EXPECT_TRUE(
        all_close(out.tokens_per_expert, at::full({1}, double(s.T)), 0.0));
  }
  // K = E.
  {
    LayerSpec s;
    s.dtype = at::kDouble;
    const auto l = make_layer(s);
    MoEOptions o;
    o.top_k = s.E;
    check_against_reference(l, o);
  }
  // All tokens to one expert, capacity 1: only the first token is served.
  {
    LayerSpec s;
    s.T = 4;
    s.dtype = at::kDouble;
    s.router_bias = true;
    auto l = make_layer(s);
    l.w.router_bias = make_double({100.0, 0, 0, 0}, {4});
    MoEOptions o;
    o.top_k = 1;
    o.capacity_factor = 1.0; // C = ceil(4 * 1 / 4) = 1
    auto [out, ref] = check_against_reference(l, o);
    EXPECT_TRUE(all_equal(out.indices, at::zeros({4, 1}, at::kLong)));
    EXPECT_TRUE(
        all_close(out.tokens_per_expert, make_double({4, 0, 0, 0}, {4}), 0.0));
    EXPECT_NEAR(out.dropped_fraction.item<double>(), 0.75, 1e-12);
    EXPECT_GT(out.y[0].abs().sum().item<double>(), 0.0);
    for (int64_t t = 1; t < 4; ++t) {
      EXPECT_EQ(out.y[t].abs().sum().item<double>(), 0.0);
    }
  }
  // Inference with noise configured but training off: no noise.
  {
    LayerSpec s;
    s.dtype = at::kDouble;
    const auto l = make_layer(s);
    MoEOptions o;
    o.noise = "gumbel";
    o.training = false;
    check_against_reference(l, o);
  }
}

TEST(MoeForwardOp, BadOptionsNameField) {
  at::manual_seed(70);
  const auto l = make_layer(LayerSpec{});
  auto run = [&](const MoEOptions& o) { moeyard::moe_forward(l.x, l.w, o); };
  {
    MoEOptions o;
    o.routing = "random";
    MOEYARD_EXPECT_ERROR("moe_forward: routing must be", run(o));
  }
  {
    MoEOptions o;
    o.top_k = 5;
    MOEYARD_EXPECT_ERROR(
        "moe_forward: top_k must be in [1, num_experts=4], got 5", run(o));
    o.top_k = 0;
    MOEYARD_EXPECT_ERROR("moe_forward: top_k", run(o));
  }
  {
    MoEOptions o;
    o.noise = "pink";
    MOEYARD_EXPECT_ERROR("moe_forward: noise must be", run(o));
  }
  {
    MoEOptions o;
    o.min_capacity = 0;
    MOEYARD_EXPECT_ERROR("moe_forward: min_capacity", run(o));
  }
  {
    MoEOptions o;
    o.score_fn = "tanh";
    MOEYARD_EXPECT_ERROR(
        "moe_forward: score_fn must be one of softmax, sigmoid, got 'tanh'",
        run(o));
  }
  {
    MoEOptions o;
    o.drop_policy = "newest";
    o.capacity_factor = 1.0;
    MOEYARD_EXPECT_ERROR(
        "moe_forward: drop_policy must be one of position, probs, got 'newest'",
        run(o));
  }
  // Every option of the table outside its range or list names itself.
  const MoEOptions defaults;
  moeyard::for_each_moe_option(
      defaults, [&](const char* name, const auto& v, const auto& allowed) {
        using T = std::decay_t<decltype(v)>;
        MoEOptions o;
        bool bad = true;
        moeyard::for_each_moe_option(
            o, [&](const char* n, auto& field, const auto&) {
              using F = std::decay_t<decltype(field)>;
              if constexpr (std::is_same_v<F, T>) {
                if (std::string(n) != name) {
                  return;
                }
                if constexpr (std::is_same_v<F, std::string>) {
                  field = "no_such_value";
                } else if constexpr (std::is_same_v<F, bool>) {
                  bad = false; // every flag value is valid
                } else {
                  field = static_cast<F>(-1000000);
                }
              }
            });
        if (bad && (std::is_same_v<T, std::string> ||
                    !allowed.range.contains(-1000000.0))) {
          MOEYARD_EXPECT_ERROR(std::string("moe_forward: ") + name, run(o));
        }
      });
  {
    MoEOptions o;
    MOEYARD_EXPECT_ERROR(
        "moe_forward: mask must have one entry per token (7)",
        moeyard::moe_forward(l.x, l.w, o, at::ones({6})));
    auto w = l.w;
    w.w_down = at::randn({4, 6, 3});
    MOEYARD_EXPECT_ERROR(
        "moe_forward: w_down must be [4, 6, 5]",
        moeyard::moe_forward(l.x, w, o));
    auto w2 = l.w;
    w2.router_weight = at::randn({4, 5});
    MOEYARD_EXPECT_ERROR(
        "moe_forward: router_weight must be [4, 6]",
        moeyard::moe_forward(l.x, w2, o));
  }
}

} // namespace
