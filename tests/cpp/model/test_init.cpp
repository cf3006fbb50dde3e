// The model's initialization by position: a piece cut by any layout gets
// exactly the values the whole tensor has there (so a run initializes the
// same model on 1 or N processes without any rank holding the whole), the
// values are N(0, std), differ per tensor and key, and a model built on
// meta holds no memory until materialized.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "model/init.h"
#include "model/transformer.h"

namespace {

using moeyard::fill_normal;
using moeyard::parallel::Piece;
using moeyard::parallel::tp_slice;
using moeyard::parallel::TpSplit;

at::Tensor whole(at::IntArrayRef shape, uint64_t key, const std::string& name) {
  auto t = at::empty(shape, at::kFloat);
  fill_normal(t, 0.02, key, name, {}, shape);
  return t;
}

TEST(Init, PiecesHoldTheWholeTensorsValues) {
  const std::vector<int64_t> shape = {4, 12, 6};
  const auto full = whole(shape, 7, "layers.1.moe.w_gate_up");
  for (const TpSplit split :
       {TpSplit{0, 1}, TpSplit{1, 1}, TpSplit{1, 2}, TpSplit{2, 1}}) {
    for (int64_t count : {2, 3}) {
      if (shape[split.dim] % (split.parts * count) != 0) {
        continue;
      }
      for (int64_t i = 0; i < count; ++i) {
        const auto expect = tp_slice(full, split, i, count).contiguous();
        auto piece = at::empty_like(expect);
        fill_normal(
            piece,
            0.02,
            7,
            "layers.1.moe.w_gate_up",
            Piece{split, i, count},
            shape);
        EXPECT_TRUE(at::equal(piece, expect))
            << split.dim << "/" << split.parts << " " << i;
      }
    }
  }
}

TEST(Init, ValuesAreNormalAndDependOnKeyAndName) {
  const auto a = whole({1000, 1000}, 1, "a");
  EXPECT_NEAR(a.mean().item<double>(), 0.0, 0.02 * 0.005);
  EXPECT_NEAR(a.std().item<double>(), 0.02, 0.02 * 0.005);
  // Tails: a standard normal exceeds 3 sigma with probability 0.0027.
  const double tail = (a.abs() > 0.06).to(at::kDouble).mean().item<double>();
  EXPECT_NEAR(tail, 0.0027, 0.0005);
  EXPECT_TRUE(at::equal(a, whole({1000, 1000}, 1, "a")));
  EXPECT_FALSE(at::equal(a, whole({1000, 1000}, 2, "a")));
  EXPECT_FALSE(at::equal(a, whole({1000, 1000}, 1, "b")));
  // Neighbouring values are uncorrelated.
  const auto x = a.flatten();
  const double corr =
      (x.narrow(0, 0, x.numel() - 1) * x.narrow(0, 1, x.numel() - 1))
          .mean()
          .item<double>() /
      (0.02 * 0.02);
  EXPECT_NEAR(corr, 0.0, 0.01);
}

TEST(Init, MetaModelMaterializesAndInitializesLikeAWholeOne) {
  moeyard::ModelConfig c;
  c.vocab_size = 64;
  c.hidden_size = 16;
  c.num_layers = 2;
  c.num_heads = 2;
  c.num_kv_heads = 2;
  c.ffn_size = 32;
  c.max_seq_len = 16;
  c.moe.num_experts = 4;
  c.moe.ffn_size = 8;
  moeyard::Transformer meta = [&] {
    moeyard::ParamDeviceGuard g(c10::kMeta);
    return moeyard::Transformer(c);
  }();
  for (const auto& p : meta->named_parameters()) {
    EXPECT_TRUE(p.value().is_meta()) << p.key();
  }
  moeyard::materialize(*meta, c10::kCPU);
  moeyard::init_parameters(*meta, 0.02, 11);
  moeyard::Transformer cpu(c);
  moeyard::init_parameters(*cpu, 0.02, 11);
  const auto a = meta->named_parameters(), b = cpu->named_parameters();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_FALSE(a[i].value().is_meta());
    EXPECT_TRUE(at::equal(a[i].value(), b[i].value())) << a[i].key();
  }
  EXPECT_TRUE(at::equal(meta->norm->weight, at::ones_like(meta->norm->weight)));
}

} // namespace
