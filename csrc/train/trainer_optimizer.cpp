// The optimizer: AdamW parameter groups (decay, no-decay, router, user
// overrides), frozen parameters, fp32 masters, and per-expert clipping.

#include "train/trainer_impl.h"

namespace moeyard::train::detail {

void Trainer::build_optimizer() {
  // Groups: decayed matrices, no-decay (norms, biases, embeddings), router,
  // one per optim.groups override (first matching pattern wins), then the
  // routing critics (no decay; outside the model's norm and clipping).
  const auto& o = cfg_.optim;
  const size_t n_groups = critic_group() + 1;
  std::vector<std::vector<at::Tensor>> members(n_groups);
  std::vector<std::vector<std::string>> member_names(n_groups);
  std::vector<std::vector<bool>> member_master(n_groups);
  int64_t frozen = 0, frozen_numel = 0;
  for (const auto& p : model_->named_parameters()) {
    const auto& n = p.key();
    at::Tensor t = p.value();
    const bool freeze = std::any_of(
        o.freeze.begin(), o.freeze.end(), [&](const std::string& pat) {
          return n.find(pat) != std::string::npos;
        });
    if (freeze || !t.requires_grad()) { // frozen here or by finetune.lora
      t.requires_grad_(false);
      frozen += freeze;
      frozen_numel += freeze ? t.numel() : 0;
      continue;
    }
    // fp32 masters of low-precision parameters (the sharded optimizer
    // keeps its own, one shard per rank).
    at::Tensor opt_t = t;
    if (!o.sharded() && t.scalar_type() != at::kFloat &&
        t.scalar_type() != at::kDouble) {
      opt_t = t.detach().to(at::kFloat).requires_grad_(true);
      masters_.push_back(opt_t);
    } else {
      masters_.push_back(at::Tensor());
    }
    params_.push_back(t);
    param_names_.push_back(n);
    size_t g = 0;
    if (n.find(".router.") != std::string::npos) {
      g = 2;
    } else if (
        n.find("norm") != std::string::npos || ends_with(n, ".bias") ||
        n.rfind("embed.", 0) == 0) {
      g = 1;
    }
    for (size_t k = 0; k < o.groups.size(); ++k) {
      if (n.find(o.groups[k].pattern) != std::string::npos) {
        g = 3 + k;
        break;
      }
    }
    if (n.find(".moe.critic_") != std::string::npos) {
      g = critic_group();
    }
    param_group_.push_back(g);
    if (o.sharded()) {
      continue; // the group's members are its buckets' shards (below)
    }
    members[g].push_back(opt_t);
    member_names[g].push_back(n);
    member_master[g].push_back(
        opt_t.unsafeGetTensorImpl() != t.unsafeGetTensorImpl());
  }
  build_buckets(n_groups);
  if (o.sharded()) {
    for (const auto& b : buckets_) {
      members[b.opt_group].push_back(b.master);
    }
  }
  std::vector<AdamWGroup> groups;
  for (size_t g = 0; g < n_groups; ++g) {
    double lr = o.lr, wd = g == 0 ? o.weight_decay : 0.0;
    if (g == 2) {
      lr = o.lr * o.router_lr_mult;
    } else if (g == critic_group()) {
      wd = 0.0;
    } else if (g >= 3) {
      lr = o.lr * o.groups[g - 3].lr_mult;
      wd = o.groups[g - 3].weight_decay;
    }
    // The critics are trained apart from the model: not clipped with it.
    groups.push_back(
        {members[g], lr, wd, o.beta1, o.beta2, o.eps, g != critic_group()});
    base_lr_.push_back(lr);
    names_.insert(names_.end(), member_names[g].begin(), member_names[g].end());
    opt_is_master_.insert(
        opt_is_master_.end(), member_master[g].begin(), member_master[g].end());
  }
  opt_ = std::make_unique<AdamW>(std::move(groups));
  if (!o.freeze.empty()) {
    TORCH_CHECK(
        frozen > 0,
        "config: optim.freeze matches no parameter name (see docs/model.md "
        "for the names)");
    TORCH_CHECK(
        !params_.empty(),
        "config: optim.freeze freezes all ",
        frozen,
        " parameter tensors; nothing would train");
    log::info(log::format(
        "frozen: %ld tensors, %ld parameters (optim.freeze)",
        frozen,
        frozen_numel));
  }
}

// Per-expert clipping: expert e's slices of a layer's expert weights
// (w_gate_up, w_down) are scaled together so that their joint gradient norm
// is at most `clip`.

void clip_experts(
    const std::vector<std::string>& names,
    const std::vector<at::Tensor>& params,
    double clip) {
  at::NoGradGuard g;
  std::map<std::string, std::vector<at::Tensor>> by_layer;
  for (size_t i = 0; i < names.size(); ++i) {
    if (is_expert_parameter(names[i], /*weights_only=*/true) &&
        params[i].grad().defined()) {
      by_layer[names[i].substr(0, names[i].rfind('.'))].push_back(
          params[i].mutable_grad());
    }
  }
  for (auto& [layer, grads] : by_layer) {
    at::Tensor sq;
    for (auto& gr : grads) {
      auto s = gr.to(at::kDouble).square().flatten(1).sum(1); // [E]
      sq = sq.defined() ? sq + s : s;
    }
    const auto scale = (clip / (sq.sqrt() + 1e-6)).clamp_max(1.0);
    for (auto& gr : grads) {
      gr.mul_(scale.to(gr.scalar_type()).view({-1, 1, 1}));
    }
  }
}

} // namespace moeyard::train::detail
