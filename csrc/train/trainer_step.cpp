// One optimizer step, top to bottom: learning rate, micro-batches (loss,
// backward), reduction over the ranks, clipping, the skip guard, AdamW and
// the selection-bias update (docs/training.md).

#include "train/trainer_impl.h"

namespace moeyard::train::detail {

Trainer::PendingStep Trainer::train_step(int64_t step) {
  PendingStep out;
  out.step = step + 1;
  apply_moe_schedules(step);
  out.lr = set_learning_rate(step);
  out.scheduled = scheduled_values(); // what the schedules gave routing
  // Micro-batches: forward, loss, backward of loss / grad_accum.
  auto sums = forward_backward(step);
  if (critic_due(step)) {
    out.critic = train_critic(step);
  }
  // Gradients across ranks (and per-expert clipping).
  reduce_gradients();
  // A stop request, over every process (on the host: no device value).
  reduce_stop(out);
  // From here to the update, nothing leaves the device: the losses and
  // routing sums over the data-parallel ranks, the global gradient norm,
  // the skip guard's verdict, AdamW (skipped inside its kernel), the
  // selection bias. The host reads them once per logging interval (flush).
  const auto losses = mean_losses(sums.losses);
  out.routing = summed_routing(sums.routing);
  const auto norm = global_grad_norm(grad_norm_pieces());
  const auto code = skip_code(losses[0], norm);
  const auto skip = (code != 0).to(at::kFloat);
  // Clip, AdamW, then aux-loss-free balancing from this step's loads.
  optimizer_step(norm, skip);
  const auto applied = 1 - skip;
  note_loss(losses[0], applied);
  update_selection_bias(out.routing, applied);
  out.values = at::cat({losses, norm.view(1), code.view(1)});
  return out;
}

std::vector<Trainer::StepOutcome> Trainer::flush() {
  // The interval's numbers in one device-to-host copy.
  std::vector<at::Tensor> parts;
  for (const auto& p : pending_) {
    parts.push_back(p.values);
    parts.push_back(p.routing);
  }
  const auto host = one_host_copy(parts);
  ++host_reads_;
  std::vector<StepOutcome> out;
  for (size_t i = 0; i < pending_.size(); ++i) {
    const auto& p = pending_[i];
    StepOutcome s;
    const double* v = host[2 * i].const_data_ptr<double>();
    s.step = p.step;
    s.loss = v[0];
    s.ce = v[1];
    s.aux = v[2];
    s.kl = v[3];
    s.grad_norm = v[4];
    s.skipped = v[5] == 0 ? "" : v[5] == 1 ? "non-finite" : "loss spike";
    s.lr = p.lr;
    s.step_s = p.step_s;
    s.stop_signal = p.stop_signal;
    s.stop_here = p.stop_here;
    s.critic = p.critic;
    s.scheduled = p.scheduled;
    s.moe_layers = routing_records(host[2 * i + 1]);
    out.push_back(std::move(s));
  }
  pending_.clear();
  return out;
}

bool Trainer::flush_due(int64_t step, bool stop) const {
  // The adaptive relu L1 moves its coefficient from each step's routing,
  // read on the host before the next step.
  return stop || step == cfg_.train.steps ||
         step % std::max<int64_t>(cfg_.log.every, 1) == 0 || eval_due(step) ||
         checkpoint_due(step) || cfg_.schedule.relu_l1_mult != 0;
}

void Trainer::note_outcome(const StepOutcome& s) {
  if (!s.skipped.empty()) {
    note_skipped(s);
    return;
  }
  bad_in_row_ = 0;
  update_relu_l1(s.moe_layers);
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
  auto& groups = opt_->groups();
  for (size_t g = 0; g < groups.size(); ++g) {
    groups[g].lr = base_lr_[g] * lr_f;
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

void Trainer::reduce_stop(PendingStep& out) {
  const int sig = received_signal();
  out.stop_here = sig != 0;
  auto stop = at::tensor({double(sig)}, at::kDouble); // max over ranks
  if (distributed()) {
    world_->all_reduce_max(stop);
  }
  out.stop_signal = static_cast<int>(stop.item<double>());
}

at::Tensor Trainer::mean_losses(const at::Tensor& sums) {
  // Tensor-parallel ranks hold the same values: the mean over the
  // data-parallel ranks is every process's.
  auto v = sums.clone();
  if (distributed()) {
    dp_->all_reduce_sum(v);
    v.div_(static_cast<double>(dp_->size()));
  }
  return v / static_cast<double>(cfg_.train.grad_accum);
}

at::Tensor Trainer::summed_routing(const std::vector<at::Tensor>& rows) {
  if (rows.empty()) {
    return at::zeros({0, 0}, at::dtype(at::kDouble).device(device_));
  }
  // One row per layer (routing_metrics.h), summed over ranks.
  auto all = at::stack(rows).to(at::kDouble);
  if (distributed()) {
    dp_->all_reduce_sum(all);
  }
  return all;
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

at::Tensor Trainer::global_grad_norm(const NormPieces& n) {
  at::NoGradGuard g;
  // Squares summed by kind: replicated, expert, TP piece.
  auto sums = at::zeros({3}, at::dtype(at::kDouble).device(device_));
  if (!n.kind.empty()) {
    if (n.kind != norm_kinds_host_) { // the same pieces step after step
      norm_kinds_host_ = n.kind;
      auto kinds = at::tensor(
          std::vector<int64_t>(n.kind.begin(), n.kind.end()), at::kLong);
      norm_kinds_ = device_.is_cuda()
                        ? kinds.pin_memory().to(device_, /*non_blocking=*/true)
                        : kinds;
    }
    sums.index_add_(0, norm_kinds_, n.values.square());
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
  return (dense[0] + split[0] + expert[0]).sqrt();
}

at::Tensor Trainer::skip_code(
    const at::Tensor& loss, const at::Tensor& grad_norm) const {
  at::NoGradGuard g;
  const auto finite = at::isfinite(loss) & at::isfinite(grad_norm);
  // The spike guard needs a few accepted steps for a meaningful median:
  // the window holds the last spike_window accepted losses (NaN where
  // none yet), oldest first; NaN sorts last, so the accepted ones come
  // first in order and the median is the middle one (the upper of two).
  auto spike = at::zeros_like(finite);
  const double f = cfg_.train.spike_factor;
  if (f > 0 && recent_losses_.numel() >= 5) {
    const auto count = at::isfinite(recent_losses_).sum();
    const auto sorted = std::get<0>(recent_losses_.sort());
    const auto median =
        sorted.gather(0, at::floor_divide(count, 2).view(1)).squeeze(0);
    spike = (count >= 5) & (loss > f * median);
  }
  const auto one = at::ones_like(loss);
  auto code = at::where(finite, at::where(spike, 2 * one, 0 * one), one);
  // Every tensor-parallel rank takes the same verdict, whatever the last
  // bits of its loss.
  if (tp_) {
    tp_->all_reduce_max(code);
  }
  return code;
}

void Trainer::note_skipped(const StepOutcome& out) {
  ++bad_in_row_;
  log::warn(log::format(
      "step %ld: %s (loss %g, grad norm %g); step skipped (%ld in a row)",
      out.step,
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

void Trainer::note_loss(const at::Tensor& loss, const at::Tensor& applied) {
  at::NoGradGuard g;
  const int64_t w = recent_losses_.numel();
  const auto pushed =
      at::cat({recent_losses_.narrow(0, 1, w - 1), loss.view(1)});
  recent_losses_ = at::where(applied.to(at::kBool), pushed, recent_losses_);
}

void Trainer::reset_spike_window(const std::vector<double>& losses) {
  const int64_t w = cfg_.train.spike_window;
  recent_losses_ = at::full(
      {w},
      std::numeric_limits<double>::quiet_NaN(),
      at::dtype(at::kDouble).device(device_));
  const int64_t n = std::min<int64_t>(w, losses.size());
  if (n > 0) {
    const std::vector<double> last(losses.end() - n, losses.end());
    recent_losses_.narrow(0, w - n, n).copy_(at::tensor(last, at::kDouble));
  }
}

std::vector<double> Trainer::spike_window() const {
  std::vector<double> out;
  const auto h = recent_losses_.cpu();
  const double* p = h.const_data_ptr<double>();
  for (int64_t i = 0; i < h.numel(); ++i) {
    if (std::isfinite(p[i])) {
      out.push_back(p[i]);
    }
  }
  return out;
}

void Trainer::optimizer_step(
    const at::Tensor& grad_norm, const at::Tensor& skip) {
  // Clipping to optim.grad_clip: AdamW divides the gradients by
  // (norm + 1e-6) / grad_clip where the norm exceeds grad_clip.
  at::Tensor divisor;
  if (cfg_.optim.grad_clip > 0) {
    const double c = cfg_.optim.grad_clip;
    divisor =
        at::where(
            grad_norm > c, (grad_norm + 1e-6) / c, at::ones_like(grad_norm))
            .to(at::kFloat);
  }
  opt_->step(skip, divisor);
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
    const at::Tensor& routing, const at::Tensor& applied) {
  const auto& sc = cfg_.schedule;
  if (sc.bias_update_rate <= 0 && sc.null_bias_rate <= 0) {
    return;
  }
  // tokens_per_expert: the real experts, then the null ones.
  const int64_t E =
      cfg_.model.moe.num_experts + cfg_.model.moe.routing.null_experts;
  const auto gate = applied.to(at::kFloat);
  int64_t l = 0;
  for (const auto& m : model_->layers->children()) {
    auto block = std::dynamic_pointer_cast<BlockImpl>(m);
    if (block && block->moe) {
      auto& moe = *block->moe;
      const auto load = routing[l].narrow(0, 0, E).to(at::kFloat);
      if (moe.selection_bias.defined() && sc.bias_update_rate > 0) {
        moe.update_selection_bias(load, sc.bias_update_rate, gate);
      }
      if (sc.null_bias_rate > 0) {
        moe.update_null_bias(
            load, sc.null_target_fraction, sc.null_bias_rate, gate);
      }
      ++l;
    }
  }
}

} // namespace moeyard::train::detail
