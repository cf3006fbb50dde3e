// One optimizer step, top to bottom: learning rate, micro-batches (loss,
// backward), reduction over the ranks, clipping, the skip guard, AdamW and
// the selection-bias update (docs/training.md).

#include "train/trainer_impl.h"

namespace moeyard::train::detail {

Trainer::StepOutcome Trainer::train_step(int64_t step) {
  StepOutcome out;
  apply_moe_schedules(step);
  out.lr = set_learning_rate(step);
  // Micro-batches: forward, loss, backward of loss / grad_accum.
  auto sums = forward_backward(step);
  if (critic_due(step)) {
    out.critic = train_critic(step);
  }
  // Gradients across ranks (and per-expert clipping).
  reduce_gradients();
  // The step's one device-to-host copy: the logged losses, the routing
  // sums and the gradient norm's pieces. Then, on the host and across
  // ranks: the losses and a stop request, the routing statistics, the
  // global gradient norm, which decides whether the step is applied.
  const auto norms = grad_norm_pieces();
  const auto routing = sums.routing.empty()
                           ? at::zeros({0, 0}, sums.losses.options())
                           : at::stack(sums.routing);
  const auto host = one_host_copy({sums.losses, routing, norms.values});
  reduce_losses(host[0], out);
  std::vector<at::Tensor> layer_tokens(sums.routing.size());
  out.moe_layers = routing_stats(host[1], layer_tokens);
  const auto params = optimizer_params();
  out.grad_norm = global_grad_norm(host[2], norms.kind);
  out.skipped = skip_reason(out.loss, out.grad_norm);
  if (!out.skipped.empty()) {
    note_skipped(step, out);
    return out;
  }
  note_accepted(out.loss);
  // Clip, AdamW, then aux-loss-free balancing from this step's loads.
  optimizer_step(params, out.grad_norm);
  update_selection_bias(layer_tokens);
  update_relu_l1(out.moe_layers);
  return out;
}

std::vector<at::Tensor> Trainer::one_host_copy(
    const std::vector<at::Tensor>& parts) {
  std::vector<at::Tensor> flat;
  for (const auto& t : parts) {
    flat.push_back(t.to(at::kDouble).reshape(-1));
  }
  const auto all = at::cat(flat).cpu();
  std::vector<at::Tensor> out;
  int64_t at = 0;
  for (const auto& t : parts) {
    out.push_back(all.narrow(0, at, t.numel()).view(t.sizes()));
    at += t.numel();
  }
  return out;
}

double Trainer::set_learning_rate(int64_t step) {
  const double lr_f = cfg_.optim.lr_factor().value(step, cfg_.train.steps);
  auto& groups = opt_->param_groups();
  for (size_t g = 0; g < groups.size(); ++g) {
    static_cast<torch::optim::AdamWOptions&>(groups[g].options())
        .lr(base_lr_[g] * lr_f);
  }
  return base_lr_[0] * lr_f;
}

Trainer::MicroBatchSums Trainer::forward_backward(int64_t step) {
  // The last step's gradients, the fp32 masters' included, are released
  // before this step's exist.
  for (auto& p : params_) {
    p.mutable_grad() = at::Tensor();
  }
  for (auto& m : masters_) {
    if (m.defined()) {
      m.mutable_grad() = at::Tensor();
    }
  }
  for (auto& b : buckets_) {
    if (b.master.defined()) {
      b.master.mutable_grad() = at::Tensor();
    }
  }
  MicroBatchSums sums;
  for (int64_t micro = 0; micro < cfg_.train.grad_accum; ++micro) {
    const auto b = batch(*train_, step, micro, true);
    auto r = model_->loss(b.tokens, {}, b.loss_mask);
    at::Tensor kl;
    const auto loss = objective(b.tokens, r, kl);
    (loss / cfg_.train.grad_accum).backward();
    const auto l = at::stack({loss.detach(),
                              r.ce.detach(),
                              r.aux.detach(),
                              kl.detach().to(r.ce.scalar_type())})
                       .to(at::kDouble);
    sums.losses = sums.losses.defined() ? sums.losses + l : l;
    add_routing_sums(r.out, sums.routing);
  }
  return sums;
}

void Trainer::add_routing_sums(
    const TransformerOutput& out, std::vector<at::Tensor>& sums) {
  for (size_t k = 0; k < out.moe_layers.size(); ++k) {
    const auto row = routing_sums(out.moe_layers[k].moe);
    if (sums.size() <= k) {
      sums.push_back(row);
    } else {
      sums[k] += row;
    }
  }
}

void Trainer::reduce_losses(const at::Tensor& losses, StepOutcome& out) {
  // Tensor-parallel ranks hold the same values, so over every process.
  const int sig = received_signal();
  out.stop_here = sig != 0;
  auto v = losses.clone(); // on the host (one_host_copy)
  auto stop = at::tensor({double(sig)}, at::kDouble); // max over ranks
  if (distributed()) {
    world_->all_reduce_sum(v);
    v.div_(static_cast<double>(layout_.world));
    world_->all_reduce_max(stop);
  }
  const double* vp = v.const_data_ptr<double>();
  out.loss = vp[0] / cfg_.train.grad_accum;
  out.ce = vp[1] / cfg_.train.grad_accum;
  out.aux = vp[2] / cfg_.train.grad_accum;
  out.kl = vp[3] / cfg_.train.grad_accum;
  out.stop_signal = static_cast<int>(stop.item<double>());
}

void Trainer::reduce_gradients() {
  if (cfg_.optim.sharded()) {
    reduce_sharded_gradients();
    return;
  }
  if (distributed()) {
    all_reduce_grads();
  }
  if (cfg_.optim.expert_grad_clip > 0) {
    clip_experts(param_names_, params_, cfg_.optim.expert_grad_clip);
  }
  // fp32 masters take the gradients of their low-precision parameters.
  for (size_t i = 0; i < params_.size(); ++i) {
    if (masters_[i].defined() && params_[i].grad().defined()) {
      masters_[i].mutable_grad() = params_[i].grad().to(at::kFloat);
    }
  }
}

std::vector<at::Tensor> Trainer::optimizer_params() const {
  std::vector<at::Tensor> params;
  if (cfg_.optim.sharded()) {
    for (const auto& b : buckets_) {
      if (b.opt_group != critic_group()) {
        params.push_back(b.master);
      }
    }
    return params;
  }
  const auto& groups = opt_->param_groups();
  for (size_t g = 0; g < groups.size(); ++g) {
    for (const auto& p : groups[g].params()) {
      if (p.grad().defined() && g != critic_group()) {
        params.push_back(p);
      }
    }
  }
  return params;
}

Trainer::NormPieces Trainer::grad_norm_pieces() const {
  at::NoGradGuard g;
  // Each bucket's part that this rank counts (its shard where the bucket is
  // split over ranks), cut at the members: the same pieces of the same
  // values whether the optimizer is sharded or not, so both clip alike.
  // Norms per piece in the gradients' own dtype, combined in float64 by
  // kind: replicated and TP pieces summed over the data-parallel ranks,
  // expert slices over the expert-data-parallel ranks, then TP pieces over
  // TP and expert slices over EP, so every parameter counts once.
  const bool sharded = cfg_.optim.sharded();
  std::vector<at::Tensor> pieces;
  NormPieces out;
  for (const auto& b : buckets_) {
    if (b.opt_group == critic_group()) {
      continue; // trained apart from the model
    }
    b.for_each_overlap([&](size_t m, int64_t at_m, int64_t at_s, int64_t len) {
      at::Tensor piece;
      if (sharded) {
        piece = b.master.grad().narrow(0, at_s, len);
      } else if (params_[b.members[m]].grad().defined()) {
        piece = params_[b.members[m]].grad().reshape(-1).narrow(0, at_m, len);
      } else {
        return;
      }
      pieces.push_back(piece);
      out.kind.push_back(b.kind);
    });
  }
  out.values = pieces.empty()
                   ? at::zeros({0}, at::dtype(at::kDouble).device(device_))
                   : at::stack(at::_foreach_norm(pieces)).to(at::kDouble);
  return out;
}

double Trainer::global_grad_norm(
    const at::Tensor& norms, const std::vector<int>& kind) {
  const double* np = norms.const_data_ptr<double>();
  auto sums = at::zeros({3}, at::kDouble); // replicated, expert, TP piece
  double* sp = sums.data_ptr<double>();
  for (size_t k = 0; k < kind.size(); ++k) {
    sp[kind[k]] += np[k] * np[k];
  }
  auto dense = at::stack({sums[0], sums[2]});
  auto expert = sums.narrow(0, 1, 1).clone();
  if (dp_ && dp_->size() > 1) {
    dp_->all_reduce_sum(dense);
  }
  if (edp_ && edp_->size() > 1) {
    edp_->all_reduce_sum(expert);
  }
  auto split = dense.narrow(0, 1, 1).clone();
  if (tp_) {
    tp_->all_reduce_sum(split);
  }
  if (ep_) {
    ep_->all_reduce_sum(expert);
  }
  return std::sqrt(
      dense[0].item<double>() + split.item<double>() + expert.item<double>());
}

std::string Trainer::skip_reason(double loss, double grad_norm) const {
  if (!std::isfinite(loss) || !std::isfinite(grad_norm)) {
    return "non-finite";
  }
  // The spike guard needs a few accepted steps for a meaningful median.
  const double f = cfg_.train.spike_factor;
  if (f > 0 && recent_losses_.size() >= 5) {
    std::vector<double> v(recent_losses_.begin(), recent_losses_.end());
    std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
    const double median = v[v.size() / 2];
    if (loss > f * median) {
      return "loss spike";
    }
  }
  return "";
}

void Trainer::note_skipped(int64_t step, const StepOutcome& out) {
  ++bad_in_row_;
  log::warn(log::format(
      "step %ld: %s (loss %g, grad norm %g); step skipped (%ld in a row)",
      step + 1,
      out.skipped == "loss spike"
          ? log::format(
                "loss above %g x the running median", cfg_.train.spike_factor)
                .c_str()
          : "non-finite loss or gradient norm",
      out.loss,
      out.grad_norm,
      bad_in_row_));
  TORCH_CHECK(
      bad_in_row_ < cfg_.train.max_bad_steps,
      "training aborted: ",
      bad_in_row_,
      " skipped steps in a row (last: ",
      out.skipped,
      "; train.max_bad_steps = ",
      cfg_.train.max_bad_steps,
      ")");
}

void Trainer::note_accepted(double loss) {
  bad_in_row_ = 0;
  recent_losses_.push_back(loss);
  while (static_cast<int64_t>(recent_losses_.size()) >
         cfg_.train.spike_window) {
    recent_losses_.pop_front();
  }
}

void Trainer::optimizer_step(
    const std::vector<at::Tensor>& params, double grad_norm) {
  if (cfg_.optim.grad_clip > 0 && grad_norm > cfg_.optim.grad_clip) {
    at::NoGradGuard g;
    const double s = cfg_.optim.grad_clip / (grad_norm + 1e-6);
    for (auto p : params) {
      p.mutable_grad().mul_(s);
    }
  }
  opt_->step();
  if (cfg_.optim.sharded()) {
    gather_sharded_params();
    return;
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    if (masters_[i].defined()) {
      at::NoGradGuard g;
      params_[i].copy_(masters_[i]);
    }
  }
}

void Trainer::update_relu_l1(const nlohmann::json& moe_layers) {
  const double mult = cfg_.schedule.relu_l1_mult;
  if (mult == 0 || moe_layers.empty()) {
    return;
  }
  const double k = mean_real_experts_per_token(moe_layers);
  const double target = static_cast<double>(cfg_.model.moe.routing.top_k);
  relu_l1_coeff_ *= k > target ? mult : k < target ? 1.0 / mult : 1.0;
}

void Trainer::update_selection_bias(
    const std::vector<at::Tensor>& layer_tokens) {
  const auto& sc = cfg_.schedule;
  if (sc.bias_update_rate <= 0 && sc.null_bias_rate <= 0) {
    return;
  }
  size_t l = 0;
  for (const auto& m : model_->layers->children()) {
    auto block = std::dynamic_pointer_cast<BlockImpl>(m);
    if (block && block->moe) {
      auto& moe = *block->moe;
      if (moe.selection_bias.defined() && sc.bias_update_rate > 0) {
        moe.update_selection_bias(layer_tokens[l], sc.bias_update_rate);
      }
      if (sc.null_bias_rate > 0) {
        moe.update_null_bias(
            layer_tokens[l], sc.null_target_fraction, sc.null_bias_rate);
      }
      ++l;
    }
  }
}

} // namespace moeyard::train::detail
