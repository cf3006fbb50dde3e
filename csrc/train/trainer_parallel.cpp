// Multi-process training: process groups from the launch, gradient
// reduction over data- and expert-data-parallel groups, expert sharding and
// gathering; docs/distributed.md.

#include "train/trainer_impl.h"

namespace moeyard::train::detail {

void Trainer::setup_parallel() {
  env_ = parallel::LaunchEnv::from_env();
  log::set_rank(static_cast<int>(env_.rank));
  const auto& p = cfg_.parallel;
  dp_size_ = p.data_parallel > 0 ? p.data_parallel
                                 : env_.world_size / p.tensor_parallel;
  TORCH_CHECK(
      dp_size_ * p.tensor_parallel == env_.world_size,
      "config: parallel.data_parallel (",
      dp_size_,
      ") x parallel.tensor_parallel (",
      p.tensor_parallel,
      ") must equal the number of processes (WORLD_SIZE ",
      env_.world_size,
      ", from ",
      env_.source,
      ")");
  TORCH_CHECK(
      dp_size_ % p.expert_parallel == 0,
      "config: parallel.expert_parallel (",
      p.expert_parallel,
      ") must divide the data-parallel size (",
      dp_size_,
      ")");
  if (env_.world_size == 1) {
    return;
  }
  TORCH_CHECK(
      cfg_.train.device == "cpu",
      "config: train.device '",
      cfg_.train.device,
      "' with several processes needs NCCL groups, which are not "
      "implemented yet (issue 7); multi-process runs are CPU (Gloo) only");
  const auto timeout = std::chrono::milliseconds(
      static_cast<int64_t>(cfg_.parallel.timeout_s * 1000));
  auto store = parallel::make_store(env_, timeout);
  std::vector<int64_t> ranks(env_.world_size);
  std::iota(ranks.begin(), ranks.end(), 0);
  dp_ = parallel::make_gloo_group(store, env_, "data_parallel", ranks, timeout);
  dp_rank_ = dp_->rank;
  ep_size_ = p.expert_parallel;
  if (ep_size_ > 1) {
    // Rank order: expert-parallel ranks are consecutive, expert-data-parallel
    // ranks stride by ep (DESIGN).
    ep_rank_ = env_.rank % ep_size_;
    const int64_t edp_rank = env_.rank / ep_size_;
    std::vector<int64_t> ep_ranks, edp_ranks;
    for (int64_t i = 0; i < ep_size_; ++i) {
      ep_ranks.push_back(edp_rank * ep_size_ + i);
    }
    for (int64_t j = 0; j < dp_size_ / ep_size_; ++j) {
      edp_ranks.push_back(j * ep_size_ + ep_rank_);
    }
    ep_ = parallel::make_gloo_group(
        store,
        env_,
        "expert_parallel_" + std::to_string(edp_rank),
        ep_ranks,
        timeout);
    edp_ = parallel::make_gloo_group(
        store,
        env_,
        "expert_data_parallel_" + std::to_string(ep_rank_),
        edp_ranks,
        timeout);
  }
  log::info(log::format(
      "data parallel: %ld processes (%s), expert parallel %ld",
      dp_size_,
      env_.source.c_str(),
      ep_size_));
}

void Trainer::shard_experts() {
  if (!ep_) {
    return;
  }
  for (const auto& m : model_->layers->children()) {
    auto block = std::dynamic_pointer_cast<BlockImpl>(m);
    if (block && block->moe) {
      block->moe->shard_experts(ep_rank_, ep_size_, &*ep_);
    }
  }
}

at::Tensor Trainer::gather_experts(
    const std::string& name, const at::Tensor& t) const {
  if (!is_expert(name) || t.dim() == 0) {
    return t;
  }
  // Zeros except this rank's slice, summed over the expert-parallel group.
  auto sizes = t.sizes().vec();
  const int64_t El = sizes[0];
  sizes[0] = El * ep_size_;
  // float64 stays float64; anything narrower is exact in float32.
  auto full = at::zeros(
      sizes,
      t.options().dtype(
          t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  full.narrow(0, ep_rank_ * El, El).copy_(t.detach());
  ep_->all_reduce_sum(full);
  return full.to(t.scalar_type());
}

at::Tensor Trainer::expert_slice(
    const std::string& name, const at::Tensor& t) const {
  if (!is_expert(name) || t.dim() == 0) {
    return t;
  }
  TORCH_CHECK(
      t.size(0) % ep_size_ == 0,
      "checkpoint: expert tensor '",
      name,
      "' has ",
      t.size(0),
      " experts, not divisible by expert_parallel ",
      ep_size_);
  const int64_t El = t.size(0) / ep_size_;
  return t.narrow(0, ep_rank_ * El, El);
}

double Trainer::dp_mean(double v) const {
  if (!distributed()) {
    return v;
  }
  auto t = at::full({1}, v, at::kDouble);
  dp_->all_reduce_sum(t);
  return t.item<double>() / static_cast<double>(dp_size_);
}

void Trainer::all_reduce_grads() {
  if (!distributed()) {
    return;
  }
  at::NoGradGuard g;
  // Dense gradients are summed over the data-parallel ranks; an expert
  // slice's gradient already holds its whole expert-parallel group's tokens
  // (the dispatcher's backward), so it is summed over expert-data-parallel
  // ranks only. Both are then divided by the replicas: the gradient of the
  // mean loss.
  for (const bool expert : {false, true}) {
    const auto& group = expert ? edp_ : dp_;
    std::vector<at::Tensor> flat;
    std::vector<at::Tensor*> dst;
    for (size_t i = 0; i < params_.size(); ++i) {
      auto& p = params_[i];
      if (p.grad().defined() && is_expert(param_names_[i]) == expert) {
        flat.push_back(p.grad().to(at::kFloat).reshape(-1));
        dst.push_back(&p.mutable_grad());
      }
    }
    if (flat.empty()) {
      continue;
    }
    auto buf = at::cat(flat);
    if (group && group->size() > 1) {
      group->all_reduce_sum(buf);
    }
    buf.div_(static_cast<double>(dp_size_));
    int64_t off = 0;
    for (auto* d : dst) {
      const int64_t n = d->numel();
      d->copy_(buf.narrow(0, off, n).view(d->sizes()));
      off += n;
    }
  }
}

} // namespace moeyard::train::detail
