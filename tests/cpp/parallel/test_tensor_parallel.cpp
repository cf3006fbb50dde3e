// Tensor-parallel building blocks against their unsplit references: piece
// cutting and joining, and the vocabulary-parallel embedding and
// cross-entropy run by two ranks (threads of this process, Gloo over
// loopback on an in-process store) against ATen's embedding and
// cross_entropy, forward and backward.

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <exception>
#include <functional>
#include <thread>

#include "parallel/tensor_parallel.h"

namespace {

using namespace moeyard::parallel;

TEST(TensorParallel, SliceThenJoinIsTheIdentity) {
  const auto full = at::randn({8, 12}, at::kDouble);
  for (const TpSplit s : {TpSplit{0, 1}, TpSplit{1, 1}, TpSplit{0, 2}}) {
    for (int64_t tp : {2, 4}) {
      std::vector<at::Tensor> pieces;
      for (int64_t r = 0; r < tp; ++r) {
        pieces.push_back(tp_slice(full, s, r, tp));
      }
      EXPECT_TRUE(at::equal(tp_join(pieces, s), full))
          << "dim " << s.dim << " parts " << s.parts << " tp " << tp;
    }
  }
}

TEST(TensorParallel, FusedGateUpKeepsGateAndUpHalves) {
  // Rows 0..3 gate, 4..7 up: rank 1 of 2 holds gate rows 2, 3 and up rows
  // 6, 7 (so its local [gate; up] split stays a SwiGLU input).
  const auto full = at::arange(8, at::kLong).view({8, 1});
  const auto piece = tp_slice(full, {0, 2}, 1, 2);
  EXPECT_TRUE(at::equal(piece.view({4}), at::tensor({2, 3, 6, 7}, at::kLong)));
}

TEST(TensorParallel, SliceRejectsSizesThatDoNotSplit) {
  const auto full = at::zeros({6, 2});
  EXPECT_THROW(tp_slice(full, {0, 2}, 0, 2), c10::Error);
}

// fn(rank, group) on two ranks at once.
void two_ranks(const std::function<void(int64_t, const Group&)>& fn) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::exception_ptr error[2];
  std::vector<std::thread> threads;
  for (int64_t r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      try {
        LaunchEnv env;
        env.rank = r;
        env.world_size = 2;
        const auto g = make_gloo_group(
            store, env, "tp", {0, 1}, std::chrono::milliseconds(30000));
        fn(r, g);
      } catch (...) {
        error[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  for (auto& e : error) {
    if (e) {
      std::rethrow_exception(e);
    }
  }
}

TEST(TensorParallel, VocabParallelCrossEntropyMatchesATen) {
  at::manual_seed(0);
  const int64_t N = 9, V = 10;
  const auto logits = at::randn({N, V}, at::kFloat) * 3;
  auto target = at::randint(V, {N}, at::kLong);
  target[2] = -100; // ignored rows give 0 and no gradient
  target[5] = -100;
  const auto g = at::rand({N}, at::kFloat);
  auto full = logits.clone().requires_grad_(true);
  const auto want =
      at::cross_entropy_loss(full, target, {}, at::Reduction::None, -100);
  (want * g).sum().backward();
  at::Tensor got[2], grads[2];
  two_ranks([&](int64_t r, const Group& group) {
    auto piece = logits.narrow(1, r * V / 2, V / 2).clone().requires_grad_();
    auto loss =
        vocab_parallel_cross_entropy(piece, target, r * V / 2, -100, group);
    (loss * g).sum().backward();
    got[r] = loss.detach();
    grads[r] = piece.grad();
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_TRUE(at::allclose(got[r], want.detach(), 1e-5, 1e-6)) << r;
    EXPECT_TRUE(at::allclose(
        grads[r], full.grad().narrow(1, r * V / 2, V / 2), 1e-5, 1e-6))
        << r;
  }
  EXPECT_EQ(got[0][2].item<float>(), 0.0f);
}

// KL(teacher || student) per row against ATen's kl_div and its autograd,
// whole and split over two ranks; dropped rows give 0 and no gradient.
TEST(TensorParallel, VocabParallelKLMatchesATen) {
  at::manual_seed(3);
  const int64_t N = 7, V = 12;
  const auto student = at::randn({N, V}, at::kDouble) * 2;
  const auto teacher = at::randn({N, V}, at::kDouble) * 2;
  auto keep = at::ones({N}, at::kBool);
  keep[1] = false;
  keep[4] = false;
  const auto g = at::rand({N}, at::kDouble);
  auto full = student.clone().requires_grad_(true);
  const auto want = at::kl_div(
                        at::log_softmax(full, 1),
                        at::log_softmax(teacher, 1),
                        at::Reduction::None,
                        /*log_target=*/true)
                        .sum(1) *
                    keep.to(at::kDouble);
  (want * g).sum().backward();
  auto whole = student.clone().requires_grad_(true);
  const auto one = vocab_parallel_kl(whole, teacher, keep, nullptr);
  (one * g).sum().backward();
  EXPECT_TRUE(at::allclose(one.detach(), want.detach(), 1e-12, 1e-12));
  EXPECT_TRUE(at::allclose(whole.grad(), full.grad(), 1e-12, 1e-12));
  EXPECT_EQ(one[1].item<double>(), 0.0);
  EXPECT_EQ(whole.grad()[4].abs().sum().item<double>(), 0.0);
  at::Tensor got[2], grads[2];
  two_ranks([&](int64_t r, const Group& group) {
    auto piece = student.narrow(1, r * V / 2, V / 2).clone().requires_grad_();
    auto kl = vocab_parallel_kl(
        piece, teacher.narrow(1, r * V / 2, V / 2), keep, &group);
    (kl * g).sum().backward();
    got[r] = kl.detach();
    grads[r] = piece.grad();
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_TRUE(at::allclose(got[r], want.detach(), 1e-12, 1e-12)) << r;
    EXPECT_TRUE(at::allclose(
        grads[r], full.grad().narrow(1, r * V / 2, V / 2), 1e-12, 1e-12))
        << r;
  }
  // Equal distributions: 0 (up to rounding), whatever the logits' shift.
  const auto same = vocab_parallel_kl(student, student + 3.0, keep, nullptr);
  EXPECT_LT(same.abs().max().item<double>(), 1e-12);
}

TEST(TensorParallel, VocabParallelEmbeddingMatchesATen) {
  at::manual_seed(1);
  const int64_t V = 8, H = 3;
  const auto weight = at::randn({V, H}, at::kDouble);
  const auto tokens = at::tensor({0, 7, 3, 4, 4, 1}, at::kLong).view({2, 3});
  const auto g = at::randn({2, 3, H}, at::kDouble);
  auto full = weight.clone().requires_grad_(true);
  const auto want = at::embedding(full, tokens);
  (want * g).sum().backward();
  at::Tensor got[2], grads[2];
  two_ranks([&](int64_t r, const Group& group) {
    auto piece = weight.narrow(0, r * V / 2, V / 2).clone().requires_grad_();
    auto out = vocab_parallel_embedding(tokens, piece, r * V / 2, group);
    (out * g).sum().backward();
    got[r] = out.detach();
    grads[r] = piece.grad();
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_TRUE(at::allclose(got[r], want.detach())) << r;
    EXPECT_TRUE(at::allclose(grads[r], full.grad().narrow(0, r * V / 2, V / 2)))
        << r;
  }
}

TEST(TensorParallel, CopyAndReduceAreEachOthersTranspose) {
  // y = reduce(copy(x) * w_r): forward sums the ranks' products, backward
  // gives x the sum of both ranks' gradients.
  const auto x0 = at::tensor({1.0, 2.0}, at::kDouble);
  at::Tensor y[2], gx[2];
  two_ranks([&](int64_t r, const Group& group) {
    auto x = x0.clone().requires_grad_();
    auto out = reduce_from_tp(copy_to_tp(x, group) * double(r + 2), group);
    out.sum().backward();
    y[r] = out.detach();
    gx[r] = x.grad();
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_TRUE(at::allclose(y[r], x0 * 5.0));
    EXPECT_TRUE(at::allclose(gx[r], at::full({2}, 5.0, at::kDouble)));
  }
}

} // namespace
