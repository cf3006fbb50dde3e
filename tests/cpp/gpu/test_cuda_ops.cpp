// Every op on CUDA against the CPU kernel. Skipped without a GPU.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "model/moe_forward.h"
#include "ops/ops.h"

namespace {

using namespace moeyard;

#define SKIP_WITHOUT_CUDA()           \
  if (!at::hasCUDA()) {               \
    GTEST_SKIP() << "no CUDA device"; \
  }

at::Tensor cuda(const at::Tensor& t) {
  return t.to(at::kCUDA);
}

void expect_close(const at::Tensor& gpu, const at::Tensor& cpu, double tol) {
  EXPECT_TRUE(
      at::allclose(gpu.cpu().to(at::kDouble), cpu.to(at::kDouble), tol, tol))
      << "max abs diff "
      << (gpu.cpu().to(at::kDouble) - cpu.to(at::kDouble)).abs().max();
}

class CudaOps : public ::testing::TestWithParam<at::ScalarType> {};

TEST_P(CudaOps, RouterTopkAndBackward) {
  SKIP_WITHOUT_CUDA();
  const auto dt = GetParam();
  const double tol = dt == at::kFloat || dt == at::kDouble ? 1e-5 : 2e-2;
  at::manual_seed(0);
  for (const char* fn : {"softmax", "sigmoid"}) {
    auto logits = at::randn({300, 64}).to(dt);
    auto bias = at::randn({64}) * 0.1;
    auto c = ops::router_topk(logits, 6, fn, true, 2.0, bias, 8, 3);
    auto g = ops::router_topk(cuda(logits), 6, fn, true, 2.0, cuda(bias), 8, 3);
    if (dt == at::kFloat || dt == at::kDouble) {
      EXPECT_TRUE(at::equal(std::get<1>(g).cpu(), std::get<1>(c)));
    }
    expect_close(std::get<0>(g), std::get<0>(c), tol);
    expect_close(std::get<2>(g), std::get<2>(c), tol);
    auto gw = at::randn({300, 6}).to(dt), gs = at::randn({300, 64}).to(dt);
    auto bc = ops::router_topk_backward(
        gw, gs, std::get<1>(c), std::get<2>(c), fn, true, 2.0);
    auto bg = ops::router_topk_backward(
        cuda(gw),
        cuda(gs),
        cuda(std::get<1>(c)),
        cuda(std::get<2>(c)),
        fn,
        true,
        2.0);
    expect_close(bg, bc, tol);
  }
}

TEST_P(CudaOps, RoutePlanIsIdentical) {
  SKIP_WITHOUT_CUDA();
  at::manual_seed(1);
  auto [w, idx, s] = ops::router_topk(at::randn({1000, 16}), 4);
  w = w.to(GetParam());
  idx.index_put_({at::indexing::Slice(0, 5)}, -1);
  for (int64_t C : {-1, 1, 100, 5000}) {
    for (const char* pol : {"position", "probs"}) {
      auto c = ops::route_plan(idx, w, 16, C, pol);
      auto g = ops::route_plan(cuda(idx), cuda(w), 16, C, pol);
      EXPECT_TRUE(at::equal(std::get<0>(g).cpu(), std::get<0>(c))) << C << pol;
      EXPECT_TRUE(at::equal(std::get<1>(g).cpu(), std::get<1>(c))) << C << pol;
      EXPECT_TRUE(at::equal(std::get<2>(g).cpu(), std::get<2>(c))) << C << pol;
      EXPECT_TRUE(at::equal(std::get<3>(g).cpu(), std::get<3>(c))) << C << pol;
    }
  }
}

TEST_P(CudaOps, PermuteUnpermuteGroupedMmSwiglu) {
  SKIP_WITHOUT_CUDA();
  const auto dt = GetParam();
  const double tol = dt == at::kFloat || dt == at::kDouble ? 1e-4 : 3e-2;
  at::manual_seed(2);
  const int64_t T = 200, E = 8, K = 2, H = 64, F = 48;
  auto [w, idx, s] = ops::router_topk(at::randn({T, E}), K);
  for (int64_t C : {-1, 30}) {
    auto [rt, slot, off, cnt] = ops::route_plan(idx, w, E, C);
    auto x = at::randn({T, H}).to(dt);
    auto rows = ops::permute(x, rt);
    expect_close(ops::permute(cuda(x), cuda(rt)), rows, 0);
    auto grows = at::randn_like(rows);
    expect_close(
        ops::permute_backward(cuda(grows), cuda(rt), T),
        ops::permute_backward(grows, rt, T),
        tol);
    auto wgu = (at::randn({E, 2 * F, H}) * 0.1).to(dt);
    auto h = ops::grouped_mm(rows, wgu, off);
    expect_close(ops::grouped_mm(cuda(rows), cuda(wgu), cuda(off)), h, tol);
    auto gh = at::randn_like(h);
    auto bc = ops::grouped_mm_backward(gh, rows, wgu, off);
    auto bg =
        ops::grouped_mm_backward(cuda(gh), cuda(rows), cuda(wgu), cuda(off));
    expect_close(std::get<0>(bg), std::get<0>(bc), tol * 10);
    expect_close(std::get<1>(bg), std::get<1>(bc), tol * 10);
    auto a = ops::swiglu(h);
    expect_close(ops::swiglu(cuda(h)), a, tol);
    auto ga = at::randn_like(a);
    expect_close(
        ops::swiglu_backward(cuda(ga), cuda(h)),
        ops::swiglu_backward(ga, h),
        tol);
    // Only the rows the offsets span (the others zero, as on the CPU).
    expect_close(ops::swiglu(cuda(h), cuda(off)), ops::swiglu(h, off), tol);
    expect_close(
        ops::swiglu_backward(cuda(ga), cuda(h), cuda(off)),
        ops::swiglu_backward(ga, h, off),
        tol);
    auto y = ops::unpermute(rows, slot, w);
    expect_close(ops::unpermute(cuda(rows), cuda(slot), cuda(w)), y, tol);
    auto gy = at::randn_like(y);
    auto uc = ops::unpermute_backward(gy, rows, slot, w);
    auto ug =
        ops::unpermute_backward(cuda(gy), cuda(rows), cuda(slot), cuda(w));
    expect_close(std::get<0>(ug), std::get<0>(uc), tol);
    expect_close(std::get<1>(ug), std::get<1>(uc), tol * 10);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Gpu,
    CudaOps,
    ::testing::Values(at::kFloat, at::kDouble, at::kBFloat16, at::kHalf));

TEST(CudaMoE, MoeForwardMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  at::manual_seed(3);
  MoEWeights w;
  w.router_weight = at::randn({8, 32}) * 0.2;
  w.w_gate_up = at::randn({8, 32, 32}) * 0.1;
  w.w_down = at::randn({8, 32, 16}) * 0.1;
  MoEOptions o;
  o.top_k = 2;
  o.capacity_factor = 1.0;
  auto x = at::randn({64, 32});
  auto c = moe_forward(x, w, o);
  MoEWeights wg{cuda(w.router_weight), {}, cuda(w.w_gate_up), cuda(w.w_down)};
  auto g = moe_forward(cuda(x), wg, o);
  expect_close(g.y, c.y, 1e-4);
  expect_close(g.switch_loss, c.switch_loss, 1e-5);
  expect_close(g.tokens_per_expert, c.tokens_per_expert, 0);
}

} // namespace
