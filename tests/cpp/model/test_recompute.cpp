// Activation recompute: every mode gives the loss, the routing statistics
// and every parameter's gradient of a run without recompute, bit for bit,
// with the training randomness on (router jitter, Gumbel or noisy top-k
// noise, expert dropout), and really recomputes (one RecomputeBackward node
// per recomputed segment).

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/function.h>

#include <set>

#include "config/model_yaml.h"
#include "model/transformer.h"

namespace {

using namespace moeyard;

// 4 blocks: dense 0 and 2, MoE 1 and 3 (moe_every_n 2).
ModelConfig model(const std::string& moe) {
  return config::model_config_from_yaml_string(
      "vocab_size: 40\nhidden_size: 32\nnum_layers: 4\nnum_heads: 4\n"
      "num_kv_heads: 2\nffn_size: 48\nmax_seq_len: 32\nmoe:\n"
      "  num_experts: 4\n  top_k: 2\n  moe_every_n: 2\n"
      "  importance_coeff: 0.01\n  load_coeff: 0.01\n" +
      moe);
}

struct Step {
  std::vector<at::Tensor> values; // loss, ce, aux, then every statistic
  std::vector<std::pair<std::string, at::Tensor>> grads;
  at::Tensor next_draw; // the generator's next number after the step
  int64_t segments = 0; // RecomputeBackward nodes in the graph
};

int64_t count_recompute_nodes(const at::Tensor& loss) {
  std::set<torch::autograd::Node*> seen;
  std::vector<torch::autograd::Node*> todo{loss.grad_fn().get()};
  int64_t n = 0;
  while (!todo.empty()) {
    auto* node = todo.back();
    todo.pop_back();
    if (node == nullptr || !seen.insert(node).second) {
      continue;
    }
    n += node->name() == "RecomputeBackward";
    for (const auto& e : node->next_edges()) {
      todo.push_back(e.function.get());
    }
  }
  return n;
}

// Two micro-batches (gradients accumulate) of a freshly seeded model in
// training mode, recomputing `mode` in `layers`.
Step run(
    const ModelConfig& c,
    Recompute mode,
    const std::vector<int64_t>& layers = {}) {
  at::manual_seed(7);
  Transformer m(c);
  m->train();
  m->set_recompute(mode, layers);
  const auto tokens = at::randint(0, 40, {3, 16}, at::kLong);
  auto mask = at::ones({3, 16}, at::kLong);
  mask.select(0, 1).narrow(0, 11, 5).zero_(); // padding at the end of row 1
  Step s;
  for (int micro = 0; micro < 2; ++micro) {
    auto r = m->loss(tokens, mask);
    s.segments += count_recompute_nodes(r.loss);
    s.values.insert(s.values.end(), {r.loss, r.ce, r.aux});
    for (const auto& l : r.out.moe_layers) {
#define MOEYARD_KEEP(name, ...) s.values.push_back(l.moe.name);
      MOEYARD_MOE_AUX_LOSSES(MOEYARD_KEEP)
      MOEYARD_MOE_STATISTICS(MOEYARD_KEEP)
#undef MOEYARD_KEEP
      s.values.insert(
          s.values.end(),
          {l.moe.y, l.moe.indices, l.moe.importance, l.moe.valid_tokens});
    }
    (r.loss / 2).backward();
  }
  for (const auto& p : m->named_parameters()) {
    s.grads.emplace_back(p.key(), p.value().grad());
  }
  s.next_draw = at::rand({4});
  return s;
}

void expect_bitwise_equal(const Step& want, const Step& got) {
  ASSERT_EQ(want.values.size(), got.values.size());
  for (size_t i = 0; i < want.values.size(); ++i) {
    const auto &a = want.values[i], &b = got.values[i];
    ASSERT_EQ(a.defined(), b.defined()) << "value " << i;
    if (a.defined()) {
      EXPECT_TRUE(at::equal(a, b)) << "value " << i << ": " << a << " vs " << b;
    }
  }
  ASSERT_EQ(want.grads.size(), got.grads.size());
  for (size_t i = 0; i < want.grads.size(); ++i) {
    const auto& [name, a] = want.grads[i];
    const auto& b = got.grads[i].second;
    ASSERT_TRUE(a.defined() && b.defined()) << name;
    EXPECT_TRUE(at::equal(a, b))
        << name << ": max difference " << (a - b).abs().max().item<double>();
  }
  EXPECT_TRUE(at::equal(want.next_draw, got.next_draw));
}

struct Variant {
  const char* name;
  const char* moe; // extra `moe:` keys
};

const Variant kVariants[] = {
    {"JitterDropoutCapacity",
     "  noise: jitter\n  noise_eps: 0.2\n  expert_dropout: 0.3\n"
     "  capacity_factor: 1.0\n"},
    {"GumbelSharedExperts",
     "  noise: gumbel\n  temperature: 0.5\n  expert_dropout: 0.1\n"
     "  num_shared_experts: 1\n  shared_gate: true\n"},
    {"NoisyTopkExpertChoice",
     "  noise: noisy_topk\n  routing: expert_choice\n"
     "  expert_dropout: 0.2\n"},
};

class RecomputeVariant : public ::testing::TestWithParam<Variant> {};

TEST_P(RecomputeVariant, EveryModeMatchesNoRecomputeBitwise) {
  const auto c = model(GetParam().moe);
  const auto none = run(c, Recompute::none);
  EXPECT_EQ(none.segments, 0);
  // Per micro-batch: moe and attention one segment per block, full one.
  for (const auto mode :
       {Recompute::moe, Recompute::attention, Recompute::full}) {
    SCOPED_TRACE(recompute_name(mode));
    const auto got = run(c, mode);
    EXPECT_EQ(got.segments, 2 * 4);
    expect_bitwise_equal(none, got);
  }
  // Only the listed blocks: one dense and one MoE block.
  const auto some = run(c, Recompute::full, {2, 3});
  EXPECT_EQ(some.segments, 2 * 2);
  expect_bitwise_equal(none, some);
}

INSTANTIATE_TEST_SUITE_P(
    Routing,
    RecomputeVariant,
    ::testing::ValuesIn(kVariants),
    [](const auto& info) { return std::string(info.param.name); });

TEST(Recompute, FrozenParametersStayWithoutGradient) {
  at::manual_seed(3);
  Transformer m(model("  noise: jitter\n"));
  m->train();
  m->set_recompute(Recompute::full);
  for (auto& p : m->named_parameters()) {
    if (p.key().find(".moe.w_") != std::string::npos) {
      p.value().requires_grad_(false);
    }
  }
  m->loss(at::randint(0, 40, {2, 8}, at::kLong)).loss.backward();
  for (const auto& p : m->named_parameters()) {
    EXPECT_EQ(p.value().grad().defined(), p.value().requires_grad()) << p.key();
  }
}

TEST(Recompute, NoGradForwardRecordsNothing) {
  at::manual_seed(3);
  Transformer m(model(""));
  m->set_recompute(Recompute::full);
  at::NoGradGuard g;
  const auto t = at::randint(0, 40, {2, 8}, at::kLong);
  EXPECT_FALSE(m->loss(t).loss.requires_grad());
}

TEST(Recompute, ErrorsNameTheValue) {
  Transformer m(model(""));
  try {
    m->set_recompute(Recompute::moe, {1, 4});
    FAIL() << "layer 4 of 4 accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(
        std::string(e.what_without_backtrace())
            .find("set_recompute: layer 4 is not a layer index in [0, 4)"),
        std::string::npos)
        << e.what_without_backtrace();
  }
  try {
    parse_recompute("mlp", "train.recompute");
    FAIL() << "mode mlp accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(
        std::string(e.what_without_backtrace())
            .find("train.recompute must be one of none, moe, attention, "
                  "full, got 'mlp'"),
        std::string::npos)
        << e.what_without_backtrace();
  }
  for (const auto mode :
       {Recompute::none,
        Recompute::moe,
        Recompute::attention,
        Recompute::full}) {
    EXPECT_EQ(parse_recompute(recompute_name(mode), "x"), mode);
  }
}

} // namespace
