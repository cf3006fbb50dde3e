// Multi-process training: process groups from the launch, gradient
// reduction over data-, expert-data- and tensor-parallel groups, model
// sharding and gathering; docs/distributed.md.

#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "train/trainer_impl.h"

namespace moeyard::train::detail {

void Trainer::setup_parallel() {
  env_ = parallel::LaunchEnv::from_env();
  log::set_rank(static_cast<int>(env_.rank));
  const auto& p = cfg_.parallel;
  tp_size_ = p.tensor_parallel;
  TORCH_CHECK(
      env_.world_size % tp_size_ == 0 || p.data_parallel > 0,
      "config: parallel.tensor_parallel (",
      tp_size_,
      ") must divide the number of processes (WORLD_SIZE ",
      env_.world_size,
      ", from ",
      env_.source,
      ")");
  dp_size_ = p.data_parallel > 0 ? p.data_parallel : env_.world_size / tp_size_;
  TORCH_CHECK(
      dp_size_ * tp_size_ == env_.world_size,
      "config: parallel.data_parallel (",
      dp_size_,
      ") x parallel.tensor_parallel (",
      tp_size_,
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
  const bool gpu = device_.is_cuda();
  TORCH_CHECK(
      !gpu || !device_.has_index() || env_.world_size == 1,
      "config: train.device '",
      cfg_.train.device,
      "' names one GPU for ",
      env_.world_size,
      " processes; use train.device: cuda (each process takes GPU "
      "LOCAL_RANK)");
  if (gpu) {
    TORCH_CHECK(
        parallel::nccl_available(),
        "config: train.device '",
        cfg_.train.device,
        "' with several processes needs NCCL process groups; this build of "
        "moeyard has no CUDA");
    // One GPU per process: LOCAL_RANK's.
    device_ =
        c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(env_.local_rank));
    c10::impl::getDeviceGuardImpl(c10::kCUDA)->setDevice(device_);
  }
  const auto timeout = std::chrono::milliseconds(
      static_cast<int64_t>(cfg_.parallel.timeout_s * 1000));
  auto store = parallel::make_store(env_, timeout);
  // Tensor traffic over NCCL on GPUs, Gloo on CPUs; the world group (stop
  // requests, step checks, checkpoint barriers) is always Gloo.
  auto group = [&](const std::string& name, const std::vector<int64_t>& r) {
    return gpu && name != "world"
               ? parallel::make_nccl_group(
                     store, env_, name, r, timeout, device_)
               : parallel::make_gloo_group(store, env_, name, r, timeout);
  };
  // Rank order (DESIGN): tensor-parallel ranks are consecutive; then
  // expert-parallel ranks (consecutive data-parallel indices), then
  // expert-data-parallel ranks (data-parallel indices strided by ep).
  tp_rank_ = env_.rank % tp_size_;
  const int64_t dp_index = env_.rank / tp_size_;
  auto global = [&](int64_t dp_i) { return dp_i * tp_size_ + tp_rank_; };
  std::vector<int64_t> all(env_.world_size), dp_ranks, tp_ranks;
  std::iota(all.begin(), all.end(), 0);
  for (int64_t d = 0; d < dp_size_; ++d) {
    dp_ranks.push_back(global(d));
  }
  for (int64_t t = 0; t < tp_size_; ++t) {
    tp_ranks.push_back(dp_index * tp_size_ + t);
  }
  world_ = group("world", all);
  dp_ = group("data_parallel_" + std::to_string(tp_rank_), dp_ranks);
  dp_rank_ = dp_->rank;
  if (tp_size_ > 1) {
    tp_ = group("tensor_parallel_" + std::to_string(dp_index), tp_ranks);
  }
  ep_size_ = p.expert_parallel;
  if (ep_size_ > 1) {
    ep_rank_ = dp_index % ep_size_;
    const int64_t edp_index = dp_index / ep_size_;
    std::vector<int64_t> ep_ranks, edp_ranks;
    for (int64_t i = 0; i < ep_size_; ++i) {
      ep_ranks.push_back(global(edp_index * ep_size_ + i));
    }
    for (int64_t j = 0; j < dp_size_ / ep_size_; ++j) {
      edp_ranks.push_back(global(j * ep_size_ + ep_rank_));
    }
    const auto tag = std::to_string(tp_rank_) + "_" + std::to_string(edp_index);
    ep_ = group("expert_parallel_" + tag, ep_ranks);
    edp_ = group(
        "expert_data_parallel_" + std::to_string(tp_rank_) + "_" +
            std::to_string(ep_rank_),
        edp_ranks);
  }
  log::info(log::format(
      "data parallel: %ld processes (%s), expert parallel %ld, tensor "
      "parallel %ld%s",
      dp_size_,
      env_.source.c_str(),
      ep_size_,
      tp_size_,
      gpu ? ", NCCL" : ""));
}

void Trainer::shard_model() {
  if (tp_) {
    model_->shard_tensor_parallel(tp_rank_, tp_size_, &*tp_);
  }
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

at::Tensor Trainer::local_piece(
    const std::string& name, const at::Tensor& t) const {
  if (is_tp_sharded(name)) {
    const auto split = model_->tp_split(name);
    TORCH_CHECK(
        split.dim < t.dim() &&
            t.size(split.dim) % (split.parts * tp_size_) == 0,
        "checkpoint: tensor '",
        name,
        "' of shape ",
        t.sizes(),
        " does not split over tensor_parallel ",
        tp_size_,
        " along dim ",
        split.dim);
    return parallel::tp_slice(t, split, tp_rank_, tp_size_);
  }
  return expert_slice(name, t);
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
  if (!distributed() || dp_size_ == 1) {
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
    if (!expert && tp_) {
      // Replicated parameters used inside the TP-split computation (per-head
      // q/k norms) hold each rank's share of their gradient: summed over TP
      // in one buffer.
      std::vector<std::pair<int64_t, int64_t>> spans; // (offset, numel)
      int64_t off = 0;
      for (size_t i = 0; i < params_.size(); ++i) {
        auto& p = params_[i];
        if (p.grad().defined() && !is_expert(param_names_[i])) {
          if (model_->tp_partial_grad(param_names_[i])) {
            spans.emplace_back(off, p.numel());
          }
          off += p.numel();
        }
      }
      if (!spans.empty()) {
        std::vector<at::Tensor> parts;
        for (auto [o, n] : spans) {
          parts.push_back(buf.narrow(0, o, n));
        }
        auto partial = at::cat(parts);
        tp_->all_reduce_sum(partial);
        int64_t at_ = 0;
        for (auto [o, n] : spans) {
          buf.narrow(0, o, n).copy_(partial.narrow(0, at_, n));
          at_ += n;
        }
      }
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
