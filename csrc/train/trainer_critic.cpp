// The routing critic (moe.critic_hidden > 0, `critic:` in the config):
// its targets and training every critic.every steps, and the thresholds
// that meet critic.skip_budget, calibrated at each evaluation;
// docs/training.md.

#include "train/trainer_impl.h"

namespace moeyard::train::detail {
namespace {

// Spearman's rank correlation of two vectors (no tie correction).
double rank_correlation(const at::Tensor& a, const at::Tensor& b) {
  auto ranks = [](const at::Tensor& x) {
    const auto order = x.argsort();
    return at::empty_like(order, at::kDouble)
        .scatter_(0, order, at::arange(x.numel(), at::kDouble));
  };
  const auto ra = ranks(a.flatten().cpu()), rb = ranks(b.flatten().cpu());
  const auto da = ra - ra.mean(), db = rb - rb.mean();
  const double den = std::sqrt(
      (da * da).sum().item<double>() * (db * db).sum().item<double>());
  return den > 0 ? (da * db).sum().item<double>() / den : 0.0;
}

} // namespace

std::vector<MoELayerImpl*> Trainer::moe_layers() const {
  std::vector<MoELayerImpl*> out;
  for (const auto& m : model_->layers->children()) {
    const auto block = std::dynamic_pointer_cast<BlockImpl>(m);
    if (block && block->moe) {
      out.push_back(block->moe.get());
    }
  }
  return out;
}

bool Trainer::critic_due(int64_t step) const {
  return cfg_.model.moe.critic_hidden > 0 && cfg_.critic.every > 0 &&
         step % cfg_.critic.every == 0;
}

at::Tensor Trainer::per_token_ce(const at::Tensor& tokens) {
  const int64_t S = tokens.size(1);
  const auto logits = model_->forward(tokens).logits.narrow(1, 0, S - 1);
  return at::cross_entropy_loss(
             logits.reshape({-1, logits.size(-1)}).to(at::kFloat),
             tokens.narrow(1, 1, S - 1).reshape({-1}),
             {},
             at::Reduction::None)
      .view({tokens.size(0), S - 1});
}

json Trainer::train_critic(int64_t step) {
  // In eval mode (no noise or dropout in the differences), on the step's
  // first micro-batch: the per-token loss, then per MoE layer the loss with
  // that layer's lowest picks skipped. The critic learns the clipped
  // increase at each position from the layer's input there (detached, so
  // only the critic's parameters get gradients).
  const auto tokens = batch(*train_, step, 0, true).tokens;
  const int64_t S = tokens.size(1);
  const auto layers = moe_layers();
  model_->eval();
  at::Tensor base;
  {
    at::NoGradGuard g;
    for (auto* l : layers) {
      l->capture_input = true;
    }
    base = per_token_ce(tokens);
    for (auto* l : layers) {
      l->capture_input = false;
    }
  }
  json out = json::array();
  for (size_t i = 0; i < layers.size(); ++i) {
    auto* l = layers[i];
    at::Tensor skipped;
    {
      at::NoGradGuard g;
      l->drop_all_lowest = true;
      skipped = per_token_ce(tokens);
      l->drop_all_lowest = false;
    }
    const auto target =
        (skipped - base).clamp(-cfg_.critic.clip, cfg_.critic.clip);
    const auto input = l->captured_input.narrow(1, 0, S - 1);
    l->captured_input = at::Tensor();
    const auto pred = l->critic(input);
    const auto mse = (pred - target.to(pred.scalar_type())).square().mean();
    if (mse.requires_grad()) { // not frozen (optim.freeze, LoRA)
      mse.backward();
    }
    out.push_back(
        {{"mse", dp_mean(mse.item<double>())},
         {"rank_corr", dp_mean(rank_correlation(pred.detach(), target))},
         {"target_mean", dp_mean(target.mean().item<double>())}});
  }
  model_->train();
  return out;
}

json Trainer::calibrate_critic(const std::vector<at::Tensor>& predictions) {
  // Per layer, over every data-parallel rank's validation tokens: the
  // threshold below which critic.skip_budget of the predictions lie.
  json out = json::array();
  const auto layers = moe_layers();
  for (size_t i = 0; i < layers.size(); ++i) {
    auto all = predictions[i].flatten().contiguous();
    if (dp_ && dp_->size() > 1) {
      auto gathered = at::empty({all.numel() * dp_->size()}, all.options());
      dp_->all_gather_into(gathered, all);
      all = gathered;
    }
    const auto sorted = std::get<0>(all.sort());
    const int64_t n = sorted.numel();
    const int64_t k = std::min<int64_t>(
        n - 1, std::llround(cfg_.critic.skip_budget * static_cast<double>(n)));
    at::NoGradGuard g;
    layers[i]->critic_threshold.fill_(sorted[k].item<double>());
    out.push_back(sorted[k].item<double>());
  }
  return out;
}

} // namespace moeyard::train::detail
