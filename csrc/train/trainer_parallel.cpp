// Multi-process training: the parallel layout and its groups from the
// config and the launch, gradient reduction over data-, expert-data- and
// tensor-parallel groups, this rank's piece of a checkpoint's tensor;
// docs/distributed.md.

#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "train/trainer_impl.h"

namespace moeyard::train::detail {

void Trainer::setup_parallel() {
  const auto env = parallel::LaunchEnv::from_env();
  log::set_rank(static_cast<int>(env.rank));
  layout_ = parallel::Layout::build(
      cfg_.layout_sizes(), env.world_size, env.rank, env.source);
  if (!layout_.distributed()) {
    return;
  }
  const bool gpu = device_.is_cuda();
  TORCH_CHECK(
      !gpu || !device_.has_index(),
      "config: train.device '",
      cfg_.train.device,
      "' names one GPU for ",
      env.world_size,
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
        c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(env.local_rank));
    c10::impl::getDeviceGuardImpl(c10::kCUDA)->setDevice(device_);
  }
  layout_.connect(
      env,
      device_,
      std::chrono::milliseconds(
          static_cast<int64_t>(cfg_.parallel.timeout_s * 1000)));
  const auto ptr = [](const std::optional<parallel::Group>& g) {
    return g ? &*g : nullptr;
  };
  world_ = ptr(layout_.groups.world);
  dp_ = ptr(layout_.groups.dp);
  tp_ = ptr(layout_.groups.tp);
  ep_ = ptr(layout_.groups.ep);
  edp_ = ptr(layout_.groups.edp);
  log::info(log::format(
      "data parallel: %ld processes (%s), expert parallel %ld, tensor "
      "parallel %ld%s",
      layout_.dp,
      layout_.source.c_str(),
      layout_.ep,
      layout_.tp,
      gpu ? ", NCCL" : ""));
}

double Trainer::dp_mean(double v) const {
  if (!distributed() || layout_.dp == 1) {
    return v;
  }
  auto t = at::full({1}, v, at::kDouble);
  dp_->all_reduce_sum(t);
  return t.item<double>() / static_cast<double>(layout_.dp);
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
    buf.div_(static_cast<double>(layout_.dp));
    int64_t off = 0;
    for (auto* d : dst) {
      const int64_t n = d->numel();
      d->copy_(buf.narrow(0, off, n).view(d->sizes()));
      off += n;
    }
  }
}

} // namespace moeyard::train::detail
