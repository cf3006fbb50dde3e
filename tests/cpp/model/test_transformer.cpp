// The C++ Transformer used from C++ alone: config from YAML, placement,
// causality, training step, errors.

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/optim/adamw.h>

#include "config/model_yaml.h"
#include "model/transformer.h"

namespace {

using namespace moeyard;

ModelConfig tiny(const std::string& extra = "") {
  return config::model_config_from_yaml_string(
      "vocab_size: 32\nhidden_size: 32\nnum_layers: 4\nnum_heads: 4\n"
      "ffn_size: 48\nmax_seq_len: 64\n" +
      extra);
}

TEST(Transformer, PlacementFromYaml) {
  auto c = tiny("moe:\n  num_experts: 4\n  moe_every_n: 2\n");
  Transformer m(c);
  std::vector<int64_t> moe;
  for (int64_t i = 0; i < 4; ++i) {
    if (m->layers[i]->as<BlockImpl>()->moe) {
      moe.push_back(i);
    }
  }
  EXPECT_EQ(moe, (std::vector<int64_t>{1, 3}));
  auto c2 = tiny("moe:\n  num_experts: 4\n  layers: [0, 2]\n");
  EXPECT_TRUE(c2.is_moe_layer(0) && c2.is_moe_layer(2) && !c2.is_moe_layer(1));
}

TEST(Transformer, CausalInCpp) {
  at::manual_seed(0);
  Transformer m(tiny("moe:\n  num_experts: 4\n  top_k: 2\n"));
  m->eval();
  auto t = at::randint(0, 32, {2, 10}, at::kLong);
  auto base = m->forward(t).logits;
  auto t2 = t.clone();
  t2.select(1, 6).fill_(3);
  auto out = m->forward(t2).logits;
  EXPECT_TRUE(at::allclose(out.narrow(1, 0, 6), base.narrow(1, 0, 6)));
}

TEST(Transformer, TrainStepLowersLoss) {
  at::manual_seed(1);
  Transformer m(tiny("moe:\n  num_experts: 4\n  top_k: 2\n"));
  torch::optim::AdamW opt(m->parameters(), torch::optim::AdamWOptions(1e-2));
  auto t = at::randint(0, 32, {4, 12}, at::kLong);
  const double first = m->loss(t).loss.item<double>();
  for (int i = 0; i < 20; ++i) {
    opt.zero_grad();
    auto r = m->loss(t);
    r.loss.backward();
    opt.step();
  }
  EXPECT_LT(m->loss(t).loss.item<double>(), 0.5 * first);
}

TEST(Transformer, BadConfigNamesField) {
  try {
    tiny("moe:\n  num_experts: 4\n  top_k: 9\n");
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(
        std::string(e.what()).find("moe.top_k (line 9) = 9 is outside [1, "
                                   "moe.num_experts (line 8) = 4]"),
        std::string::npos)
        << e.what();
  }
  try {
    config::model_config_from_yaml_string("hidden_size: 32\nnum_headz: 4\n");
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(
        std::string(e.what()).find("num_headz (line 2): unknown key"),
        std::string::npos)
        << e.what();
  }
  EXPECT_THROW(tiny("num_kv_heads: 3\n"), c10::Error);
  EXPECT_NO_THROW(tiny("num_kv_heads: 2\n"));
}

} // namespace
