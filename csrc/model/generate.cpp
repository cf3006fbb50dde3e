// Text generation with the Transformer: a forward over the new tokens with
// per-layer key/value caches, then greedy or temperature/top-p sampling.

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>

#include "model/transformer.h"
#include "parallel/tensor_parallel.h"

namespace moeyard {

at::Tensor TransformerImpl::forward_cached(
    const at::Tensor& tokens, std::vector<KVCache>& caches) {
  caches.resize(layers->size());
  auto x = embed_tokens(tokens);
  for (size_t i = 0; i < layers->size(); ++i) {
    x = layers[i]->as<BlockImpl>()->forward_cached(
        x, tokens, caches[i], rotary);
  }
  const auto logits = local_logits(norm->forward(x)).to(at::kFloat);
  return tp ? parallel::gather_from_tp(logits, -1, *tp) : logits;
}

std::vector<int64_t> TransformerImpl::generate(
    const std::vector<int64_t>& prompt,
    int64_t max_new,
    double temperature,
    double top_p,
    uint64_t seed,
    bool use_cache,
    const std::vector<int64_t>& stop_tokens) {
  TORCH_CHECK(!prompt.empty(), "generate: the prompt must not be empty");
  TORCH_CHECK(
      temperature >= 0,
      "generate: temperature must be >= 0, got ",
      temperature);
  TORCH_CHECK(
      top_p > 0 && top_p <= 1,
      "generate: top_p must be in (0, 1], got ",
      top_p);
  for (auto t : prompt) {
    TORCH_CHECK(
        t >= 0 && t < config.vocab_size,
        "generate: prompt token ",
        t,
        " is outside the vocabulary (",
        config.vocab_size,
        ")");
  }
  at::NoGradGuard no_grad;
  const bool was_training = is_training();
  eval();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<int64_t> seq = prompt;
  std::vector<KVCache> caches;
  at::Tensor logits;
  for (int64_t step = 0; step < max_new; ++step) {
    if (static_cast<int64_t>(seq.size()) >= config.max_seq_len) {
      break;
    }
    if (use_cache) {
      const std::vector<int64_t> fresh(
          seq.begin() + (step == 0 ? 0 : seq.size() - 1), seq.end());
      auto t = at::tensor(fresh, at::kLong).view({1, -1});
      logits = forward_cached(t, caches).select(1, -1).squeeze(0);
    } else {
      auto t = at::tensor(seq, at::kLong).view({1, -1});
      logits = forward(t).logits.select(1, -1).squeeze(0).to(at::kFloat);
    }
    int64_t next;
    if (temperature == 0) {
      next = logits.argmax().item<int64_t>();
    } else {
      auto probs = (logits / temperature).softmax(-1);
      if (top_p < 1) {
        auto [sorted, order] = probs.sort(-1, true);
        auto keep =
            (sorted.cumsum(-1) - sorted) < top_p; // always keeps the top token
        probs = at::zeros_like(probs).scatter_(0, order, sorted * keep);
      }
      next = at::multinomial(probs, 1, false, gen).item<int64_t>();
    }
    seq.push_back(next);
    if (std::find(stop_tokens.begin(), stop_tokens.end(), next) !=
        stop_tokens.end()) {
      break;
    }
  }
  train(was_training);
  return std::vector<int64_t>(seq.begin() + prompt.size(), seq.end());
}

} // namespace moeyard
