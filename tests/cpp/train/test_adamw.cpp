// The trainer's AdamW (ATen's fused kernel, skip flag and gradient divisor
// on the device) against AdamW written out element by element in float64:
// two groups (one not clipped), float32 and float64 parameters, a
// parameter without a gradient, a skipped step in the middle.

#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <cmath>

#include "train/adamw.h"

namespace {

using moeyard::train::AdamW;
using moeyard::train::AdamWGroup;

struct Reference {
  std::vector<double> p, m, v;
  int64_t step = 0;
};

// One AdamW step of `r` with gradient g / divisor.
void reference_step(
    Reference& r,
    const std::vector<double>& g,
    double divisor,
    const AdamWGroup& o) {
  ++r.step;
  const double bc1 = 1 - std::pow(o.beta1, r.step);
  const double bc2 = 1 - std::pow(o.beta2, r.step);
  for (size_t i = 0; i < r.p.size(); ++i) {
    const double gi = g[i] / divisor;
    r.p[i] *= 1 - o.lr * o.weight_decay;
    r.m[i] = o.beta1 * r.m[i] + (1 - o.beta1) * gi;
    r.v[i] = o.beta2 * r.v[i] + (1 - o.beta2) * gi * gi;
    r.p[i] -= o.lr * (r.m[i] / bc1) / (std::sqrt(r.v[i] / bc2) + o.eps);
  }
}

std::vector<double> values(const at::Tensor& t) {
  const auto d = t.detach().to(at::kDouble).contiguous();
  return {d.const_data_ptr<double>(), d.const_data_ptr<double>() + d.numel()};
}

TEST(AdamW, MatchesTheFormulaWithSkipsAndClipping) {
  at::manual_seed(0);
  auto a = at::randn({5, 7}, at::kFloat).requires_grad_(true);
  auto b = at::randn({11}, at::kDouble).requires_grad_(true);
  auto frozen = at::randn({3}, at::kFloat); // never gets a gradient
  std::vector<AdamWGroup> groups = {
      {{a, frozen}, 1e-2, 0.1, 0.9, 0.95, 1e-8, /*clipped=*/true},
      {{b}, 3e-2, 0.0, 0.8, 0.99, 1e-6, /*clipped=*/false}};
  AdamW opt(groups);
  Reference ra{
      values(a),
      std::vector<double>(a.numel()),
      std::vector<double>(a.numel())};
  Reference rb{
      values(b),
      std::vector<double>(b.numel()),
      std::vector<double>(b.numel())};
  const auto frozen0 = frozen.clone();
  const double divisors[] = {1.0, 2.5, 1.7, 1.0};
  const bool skips[] = {false, true, false, false};
  for (int s = 0; s < 4; ++s) {
    a.mutable_grad() = at::randn_like(a);
    b.mutable_grad() = at::randn_like(b);
    const auto skip = at::full({}, skips[s] ? 1.0 : 0.0, at::kFloat);
    const auto divisor = at::full({}, divisors[s], at::kFloat);
    // (the kernel leaves the divided gradients in .grad)
    const auto ga = values(a.grad()), gb = values(b.grad());
    opt.step(skip, divisor);
    if (!skips[s]) {
      reference_step(ra, ga, divisors[s], groups[0]);
      reference_step(rb, gb, 1.0, groups[1]); // not clipped
    }
    const auto pa = values(a), pb = values(b);
    for (size_t i = 0; i < pa.size(); ++i) {
      EXPECT_NEAR(pa[i], ra.p[i], 1e-5 * (1 + std::abs(ra.p[i])))
          << "step " << s << " a[" << i << "]";
    }
    for (size_t i = 0; i < pb.size(); ++i) {
      EXPECT_NEAR(pb[i], rb.p[i], 1e-12 * (1 + std::abs(rb.p[i])))
          << "step " << s << " b[" << i << "]";
    }
    EXPECT_EQ(opt.state(a)->step.item<float>(), ra.step);
    EXPECT_EQ(opt.state(b)->step.item<float>(), rb.step);
  }
  EXPECT_TRUE(at::equal(frozen, frozen0));
  EXPECT_EQ(opt.state(frozen), nullptr);
  // The state a checkpoint restores continues the same run.
  AdamW again(groups);
  for (const auto* p : {&a, &b}) {
    auto& s = again.reset_state(*p, opt.state(*p)->step.item<float>());
    s.exp_avg.copy_(opt.state(*p)->exp_avg);
    s.exp_avg_sq.copy_(opt.state(*p)->exp_avg_sq);
  }
  auto a2 = a.clone();
  a.mutable_grad() = at::randn_like(a);
  b.mutable_grad() = at::randn_like(b);
  const auto keep = at::zeros({}, at::kFloat);
  opt.step(keep, at::ones({}, at::kFloat));
  const auto after_opt = a.clone();
  a.detach().copy_(a2);
  again.step(keep, at::ones({}, at::kFloat));
  EXPECT_TRUE(at::equal(a, after_opt));
}

} // namespace
