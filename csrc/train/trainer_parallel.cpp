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
  // mean loss. The sharded optimizer's buckets, so each element is summed
  // in the same order as there.
  for (const auto& b : buckets_) {
    auto flat = bucket_gradients(b, /*release=*/false);
    if (b.group) {
      b.group->all_reduce_sum(flat);
    }
    sum_tp_partial(b, flat, 0);
    flat.div_(static_cast<double>(layout_.dp));
    for (size_t m = 0; m < b.members.size(); ++m) {
      auto& p = params_[b.members[m]];
      if (p.grad().defined()) {
        p.mutable_grad().copy_(
            flat.narrow(0, b.offsets[m], p.numel()).view(p.grad().sizes()));
      }
    }
  }
}

} // namespace moeyard::train::detail
