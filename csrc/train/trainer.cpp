#include "train/trainer_impl.h"

namespace moeyard::train {
namespace detail {
namespace {

std::atomic<int> g_signal{0};
void on_signal(int sig) {
  g_signal = sig;
}

std::string fmt_duration(double s) {
  const int64_t t = static_cast<int64_t>(s);
  char buf[32];
  if (t >= 3600) {
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, (t / 60) % 60);
  } else {
    std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  }
  return buf;
}

} // namespace

// Micro-batch `micro` of step `step`: random windows from a generator seeded
// by (seed, step, micro), so any step can be replayed after a resume.

at::Tensor Trainer::batch(
    const io::TokenShard& s, int64_t step, int64_t micro, bool random) {
  // The global micro-batch has micro_batch rows per data-parallel rank;
  // this rank reads its slice, so the run sees the same windows whatever
  // the number of processes.
  const int64_t B = cfg_.train.micro_batch * dp_size_, S = cfg_.data.seq_len;
  const int64_t mine_begin = dp_rank_ * cfg_.train.micro_batch,
                mine_end = mine_begin + cfg_.train.micro_batch;
  const int64_t span = s.size() - S;
  std::vector<at::Tensor> rows;
  uint64_t state =
      static_cast<uint64_t>(cfg_.data.seed) * 0x9E3779B97F4A7C15ull +
      static_cast<uint64_t>(step) * 1000003ull + static_cast<uint64_t>(micro);
  for (int64_t b = 0; b < B; ++b) {
    int64_t start;
    if (random) {
      state ^= state >> 12, state ^= state << 25,
          state ^= state >> 27; // xorshift64*
      start = static_cast<int64_t>(
          (state * 2685821657736338717ull) % static_cast<uint64_t>(span));
    } else {
      start = (span / std::max<int64_t>(B * cfg_.train.eval_batches, 1)) *
              (micro * B + b);
    }
    if (b >= mine_begin && b < mine_end) {
      rows.push_back(s.read(start, S, cfg_.model.vocab_size));
    }
  }
  return at::stack(rows).to(device_);
}

double Trainer::evaluate() {
  if (!valid_) {
    return NAN;
  }
  at::NoGradGuard g;
  model_->eval();
  double sum = 0;
  for (int64_t i = 0; i < cfg_.train.eval_batches; ++i) {
    sum += model_->loss(batch(*valid_, 0, i, false)).ce.item<double>();
  }
  model_->train();
  return dp_mean(sum / cfg_.train.eval_batches);
}

void Trainer::apply_moe_schedules(int64_t step) {
  const auto& schedules = cfg_.schedule.options;
  if (schedules.empty()) {
    return;
  }
  for (const auto& m : model_->layers->children()) {
    auto block = std::dynamic_pointer_cast<BlockImpl>(m);
    if (!block || !block->moe) {
      continue;
    }
    for_each_moe_option(
        block->moe->options, [&](const char* key, auto& v, const auto&) {
          using T = std::decay_t<decltype(v)>;
          const auto it = schedules.find(key);
          if constexpr (std::is_same_v<T, double>) {
            if (it != schedules.end()) {
              v = it->second.value(step, cfg_.train.steps);
            }
          } else if constexpr (std::is_same_v<T, int64_t>) {
            if (it != schedules.end()) { // top_k checked against num_experts
              v = std::llround(it->second.value(step, cfg_.train.steps));
            }
          }
        });
  }
}

nlohmann::json Trainer::scheduled_values() const {
  json out = json::object();
  for (const auto& m : model_->layers->children()) {
    auto block = std::dynamic_pointer_cast<BlockImpl>(m);
    if (block && block->moe) {
      for_each_moe_option(
          block->moe->options, [&](const char* key, auto& v, const auto&) {
            if (cfg_.schedule.options.count(key)) {
              out[key] = v;
            }
          });
      break;
    }
  }
  return out;
}

nlohmann::json Trainer::routing_stats(
    std::vector<at::Tensor>& sums, std::vector<at::Tensor>& layer_tokens) {
  json out = json::array();
  if (sums.empty()) {
    return out;
  }
  // One row per layer (routing_metrics.h), summed over ranks.
  auto all = at::stack(sums).cpu();
  if (distributed()) {
    dp_->all_reduce_sum(all);
  }
  const int64_t E = cfg_.model.moe.num_experts;
  size_t l = 0;
  int64_t layer = -1;
  for (const auto& m : model_->layers->children()) {
    ++layer;
    auto block = std::dynamic_pointer_cast<BlockImpl>(m);
    if (!block || !block->moe) {
      continue;
    }
    out.push_back(routing_record(all[l], layer, block->moe->options));
    layer_tokens[l] = // on the model's device, for the selection bias
        all[l].narrow(0, 0, E).to(sums[l].device(), at::kFloat);
    ++l;
  }
  return out;
}

double Trainer::global_grad_norm(
    const std::vector<at::Tensor>& params, const std::vector<int>& kind) {
  at::NoGradGuard g;
  // Per-tensor norms in the gradients' own dtype (no float64 copies of
  // every gradient), combined in float64. Every parameter is counted once:
  // replicated ones here, expert slices summed over the expert-parallel
  // group, tensor-parallel pieces over the tensor-parallel group.
  std::vector<at::Tensor> grads;
  grads.reserve(params.size());
  for (const auto& p : params) {
    grads.push_back(p.grad());
  }
  // One host copy of the squared norms (one device sync on GPUs).
  const auto sq = grads.empty() ? at::zeros({0}, at::kDouble)
                                : at::stack(at::_foreach_norm(grads))
                                      .to(at::kDouble)
                                      .square()
                                      .cpu()
                                      .contiguous();
  const double* sqp = sq.const_data_ptr<double>();
  double sums[3] = {0, 0, 0}; // replicated, expert, TP piece
  for (size_t k = 0; k < params.size(); ++k) {
    sums[kind[k]] += sqp[k];
  }
  auto expert = at::full({1}, sums[1], at::kDouble);
  auto split = at::full({1}, sums[2], at::kDouble);
  if (ep_) {
    ep_->all_reduce_sum(expert);
  }
  if (tp_) {
    tp_->all_reduce_sum(split);
  }
  return std::sqrt(sums[0] + expert.item<double>() + split.item<double>());
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

Trainer::StepOutcome Trainer::train_step(int64_t step) {
  StepOutcome out;
  const int64_t total = cfg_.train.steps;
  apply_moe_schedules(step);
  const double lr_f = cfg_.optim.lr_factor().value(step, total);
  out.lr = base_lr_[0] * lr_f;
  auto& groups = opt_->param_groups();
  for (size_t g = 0; g < groups.size(); ++g) {
    static_cast<torch::optim::AdamWOptions&>(groups[g].options())
        .lr(base_lr_[g] * lr_f);
  }
  // Micro-batch loop: accumulate gradients of the mean loss. Losses and
  // routing sums stay on the device until the step's one host copy.
  for (auto& p : params_) {
    p.mutable_grad() = at::Tensor();
  }
  at::Tensor losses; // [loss, ce, aux] summed over micro-batches
  std::vector<at::Tensor> sums; // per MoE layer, see routing_stats
  for (int64_t micro = 0; micro < cfg_.train.grad_accum; ++micro) {
    auto r = model_->loss(batch(*train_, step, micro, true));
    (r.loss / cfg_.train.grad_accum).backward();
    const auto l = at::stack({r.loss.detach(), r.ce.detach(), r.aux.detach()})
                       .to(at::kDouble);
    losses = losses.defined() ? losses + l : l;
    for (size_t k = 0; k < r.out.moe_layers.size(); ++k) {
      const auto row = routing_sums(r.out.moe_layers[k].moe);
      if (sums.size() <= k) {
        sums.push_back(row);
      } else {
        sums[k] += row;
      }
    }
  }
  // Across ranks: the logged losses and a stop request from a signal on
  // any rank (tensor-parallel ranks hold the same values, so over every
  // process), the routing statistics and the gradients.
  const int sig = g_signal;
  out.stop_here = sig != 0;
  auto v = losses.cpu().contiguous();
  auto stop = at::tensor({double(sig)}, at::kDouble); // max over ranks
  if (distributed()) {
    world_->all_reduce_sum(v);
    v.div_(static_cast<double>(env_.world_size));
    world_->all_reduce_max(stop);
  }
  const double* vp = v.const_data_ptr<double>();
  out.loss = vp[0] / cfg_.train.grad_accum;
  out.ce = vp[1] / cfg_.train.grad_accum;
  out.aux = vp[2] / cfg_.train.grad_accum;
  out.stop_signal = static_cast<int>(stop.item<double>());
  std::vector<at::Tensor> layer_tokens(sums.size());
  out.moe_layers = routing_stats(sums, layer_tokens);
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
  std::vector<at::Tensor> opt_params;
  // 1: an expert slice (counted over EP ranks), 2: a tensor-parallel
  // piece (counted over TP ranks), 0: replicated.
  std::vector<int> opt_kind;
  {
    size_t k = 0;
    for (auto& g : opt_->param_groups()) {
      for (auto& p : g.params()) {
        if (p.grad().defined()) {
          opt_params.push_back(p);
          opt_kind.push_back(
              is_expert(names_[k])       ? 1
              : is_tp_sharded(names_[k]) ? 2
                                         : 0);
        }
        ++k;
      }
    }
  }
  out.grad_norm = global_grad_norm(opt_params, opt_kind);
  out.skipped = skip_reason(out.loss, out.grad_norm);
  if (!out.skipped.empty()) {
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
    return out;
  }
  bad_in_row_ = 0;
  recent_losses_.push_back(out.loss);
  while (static_cast<int64_t>(recent_losses_.size()) >
         cfg_.train.spike_window) {
    recent_losses_.pop_front();
  }
  if (cfg_.optim.grad_clip > 0 && out.grad_norm > cfg_.optim.grad_clip) {
    at::NoGradGuard g;
    const double s = cfg_.optim.grad_clip / (out.grad_norm + 1e-6);
    for (auto& p : opt_params) {
      p.mutable_grad().mul_(s);
    }
  }
  opt_->step();
  for (size_t i = 0; i < params_.size(); ++i) {
    if (masters_[i].defined()) {
      at::NoGradGuard g;
      params_[i].copy_(masters_[i]);
    }
  }
  if (cfg_.schedule.bias_update_rate > 0) {
    size_t l = 0;
    for (const auto& m : model_->layers->children()) {
      auto block = std::dynamic_pointer_cast<BlockImpl>(m);
      if (block && block->moe) {
        if (block->moe->selection_bias.defined()) {
          block->moe->update_selection_bias(
              layer_tokens[l], cfg_.schedule.bias_update_rate);
        }
        ++l;
      }
    }
  }
  return out;
}

RunResult Trainer::run(const RunOptions& options) {
  RunResult result;
  int64_t step = start(options);
  std::ofstream metrics; // rank 0 writes the metrics
  if (env_.rank == 0) {
    metrics.open(metrics_path_, std::ios::app);
  }
  g_signal = 0;
  auto prev_int = std::signal(SIGINT, on_signal);
  auto prev_term = std::signal(SIGTERM, on_signal);
  const int64_t total = cfg_.train.steps;
  const int64_t tokens_per_step = dp_size_ * cfg_.train.micro_batch *
                                  cfg_.train.grad_accum * cfg_.data.seq_len;
  model_->train();
  auto t_start = std::chrono::steady_clock::now();
  auto t_log = t_start;
  int64_t logged_from = step;
  const int64_t first_step = step;
  while (step < total) {
    const auto s = train_step(step);
    ++step;
    if (s.skipped.empty()) {
      result.final_loss = s.loss;
    } else {
      ++result.skipped_steps;
    }
    // Metrics: one record per step, skipped ones included.
    json rec = {
        {"step", step},
        {"loss", s.loss},
        {"ce", s.ce},
        {"aux", s.aux},
        {"lr", s.lr},
        {"grad_norm", s.grad_norm},
        {"moe_layers", s.moe_layers}};
    if (!s.skipped.empty()) {
      rec["skipped"] = true;
      rec["skip_reason"] = s.skipped;
    }
    rec.update(scheduled_values()); // what the schedules gave routing
    const bool eval_now = cfg_.train.eval_every > 0 &&
                          (step % cfg_.train.eval_every == 0 || step == total);
    if (eval_now && valid_) {
      const double vl = evaluate();
      rec["valid_loss"] = vl;
      rec["valid_ppl"] = std::exp(vl);
      result.final_valid_loss = vl;
      log::info(log::format(
          "step %ld | valid loss %.4f | ppl %.2f", step, vl, std::exp(vl)));
    }
    if (metrics.is_open()) {
      metrics << rec.dump() << "\n";
      metrics.flush();
    }
    if (step % std::max<int64_t>(cfg_.log.every, 1) == 0 || step == total) {
      const auto now = std::chrono::steady_clock::now();
      const double dt = std::chrono::duration<double>(now - t_log).count();
      const double elapsed =
          std::chrono::duration<double>(now - t_start).count();
      const double tps =
          (step - logged_from) * tokens_per_step / std::max(dt, 1e-9);
      const double eta =
          elapsed / std::max<int64_t>(step - first_step, 1) * (total - step);
      log::info(log::format(
          "step %5ld/%ld | loss %.4f | lr %.2e | %.0f tok/s | ETA %s",
          step,
          total,
          s.loss,
          s.lr,
          tps,
          fmt_duration(eta).c_str()));
      t_log = now;
      logged_from = step;
    }
    if (s.stop_signal != 0) {
      const auto what = s.stop_signal == SIGINT    ? "SIGINT"
                        : s.stop_signal == SIGTERM ? "SIGTERM"
                                                   : "a signal";
      const auto msg =
          s.stop_here
              ? log::format("%s received", what)
              : log::format("stop requested by another rank (%s)", what);
      if (env_.rank == 0 || s.stop_here) {
        log::warn(
            msg + log::format(
                      ": saving a checkpoint at step %ld and "
                      "stopping",
                      step));
      }
      save(step);
      if (env_.rank == 0) { // the stop is clean only if the save verifies
        read_manifest(
            fs::path(cfg_.checkpoint.dir) / ("step_" + std::to_string(step)));
        log::info(log::format(
            "checkpoint step_%ld verified; resume with --resume auto", step));
      }
      save_barrier();
      result.interrupted = true;
      break;
    }
    if (cfg_.checkpoint.every > 0 && step % cfg_.checkpoint.every == 0 &&
        step != total) {
      save(step);
    }
  }
  if (!result.interrupted) {
    save(step);
  }
  std::signal(SIGINT, prev_int);
  std::signal(SIGTERM, prev_term);
  g_signal = 0;
  result.steps_done = step;
  return result;
}

} // namespace detail

RunResult run_training(const TrainConfig& config, const RunOptions& options) {
  // Before the trainer sets up its groups: only rank 0 prints the config.
  log::set_rank(static_cast<int>(parallel::LaunchEnv::from_env().rank));
  log::info("resolved config:\n" + config.text);
  detail::Trainer t(config);
  return t.run(options);
}

} // namespace moeyard::train
