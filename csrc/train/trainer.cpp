#include "train/trainer_impl.h"

namespace moeyard::train {
namespace detail {
namespace {

std::atomic<int> g_signal{0};
void on_signal(int sig) {
  g_signal = sig;
}

double lr_factor(const OptimConfig& o, int64_t step, int64_t total) {
  if (step < o.warmup) {
    return static_cast<double>(step + 1) / o.warmup;
  }
  const double lo = o.min_lr_ratio;
  const double f = static_cast<double>(step - o.warmup) /
                   std::max<int64_t>(total - o.warmup, 1);
  if (o.lr_schedule == "constant") {
    return 1.0;
  }
  if (o.lr_schedule == "linear") {
    return 1.0 - (1.0 - lo) * f;
  }
  if (o.lr_schedule == "wsd") { // warmup, stable, decay over the last part
    const double d = o.wsd_decay_fraction;
    return f < 1.0 - d ? 1.0 : 1.0 - (1.0 - lo) * (f - (1.0 - d)) / d;
  }
  return lo + (1.0 - lo) * 0.5 * (1.0 + std::cos(M_PI * f));
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

void Trainer::build_optimizer() {
  // Groups: decayed matrices, no-decay (norms, biases, embeddings), router,
  // then one per optim.groups override (first matching pattern wins).
  const auto& o = cfg_.optim;
  const size_t n_groups = 3 + o.groups.size();
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
    if (freeze) { // no gradient, not in the optimizer
      t.requires_grad_(false);
      ++frozen;
      frozen_numel += t.numel();
      continue;
    }
    at::Tensor opt_t = t;
    if (t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble) {
      opt_t = t.detach().to(at::kFloat).requires_grad_(true); // fp32 master
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
    members[g].push_back(opt_t);
    member_names[g].push_back(n);
    member_master[g].push_back(
        opt_t.unsafeGetTensorImpl() != t.unsafeGetTensorImpl());
  }
  auto options = [&](double lr, double wd) {
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(lr)
            .betas({o.beta1, o.beta2})
            .eps(o.eps)
            .weight_decay(wd));
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  for (size_t g = 0; g < n_groups; ++g) {
    double lr = o.lr, wd = g == 0 ? o.weight_decay : 0.0;
    if (g == 2) {
      lr = o.lr * o.router_lr_mult;
    } else if (g >= 3) {
      lr = o.lr * o.groups[g - 3].lr_mult;
      wd = o.groups[g - 3].weight_decay;
    }
    groups.emplace_back(members[g], options(lr, wd));
    base_lr_.push_back(lr);
    names_.insert(names_.end(), member_names[g].begin(), member_names[g].end());
    opt_is_master_.insert(
        opt_is_master_.end(), member_master[g].begin(), member_master[g].end());
  }
  opt_ = std::make_unique<torch::optim::AdamW>(
      groups, torch::optim::AdamWOptions(o.lr));
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

// Per-expert clipping: expert e's slices of a layer's w_gate_up and w_down
// are scaled together so that their joint gradient norm is at most `clip`.

void clip_experts(
    const std::vector<std::string>& names,
    const std::vector<at::Tensor>& params,
    double clip) {
  at::NoGradGuard g;
  std::map<std::string, std::vector<at::Tensor>> by_layer;
  for (size_t i = 0; i < names.size(); ++i) {
    if ((ends_with(names[i], ".moe.w_gate_up") ||
         ends_with(names[i], ".moe.w_down")) &&
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
  const auto& sc = cfg_.schedule;
  for (const auto& m : model_->layers->children()) {
    auto block = std::dynamic_pointer_cast<BlockImpl>(m);
    if (!block || !block->moe) {
      continue;
    }
    auto& o = block->moe->options;
    if (sc.capacity_factor.start >= 0) {
      o.capacity_factor = sc.capacity_factor.value(step, cfg_.train.steps);
    }
    if (sc.top_k.start >= 1) {
      o.top_k = std::clamp<int64_t>(
          std::llround(sc.top_k.value(step, cfg_.train.steps)),
          1,
          cfg_.model.moe.num_experts);
    }
  }
}

RunResult Trainer::run(const std::string& resume) {
  RunResult result;
  fs::create_directories(cfg_.checkpoint.dir);
  int64_t step = 0;
  std::string from;
  if (resume == "auto") {
    std::ifstream latest(fs::path(cfg_.checkpoint.dir) / "latest");
    std::string name;
    if (latest >> name) {
      from = (fs::path(cfg_.checkpoint.dir) / name).string();
    }
  } else if (resume != "never") {
    from = resume;
  }
  // The full model first (a checkpoint of any layout, or a fresh init),
  // then this rank's expert slices, then the optimizer over what it holds.
  if (!from.empty()) {
    load_model_state(from);
  } else {
    at::manual_seed(cfg_.train.seed);
    if (cfg_.init_from.empty()) {
      model_->init_weights();
    } else {
      io::load_hf_weights(*model_, cfg_.hf_config, cfg_.init_from);
      log::info("initialized from " + cfg_.init_from);
    }
  }
  shard_model();
  build_optimizer();
  if (!from.empty()) {
    step = load_optimizer_state(from);
    log::info(log::format("resumed from %s at step %ld", from.c_str(), step));
  } else {
    seed_stream(0);
  }
  if (distributed()) { // every rank resumed the same step
    save_barrier(); // loading may take the ranks unequal times
    auto t = at::tensor({double(step), -double(step)}, at::kDouble);
    world_->all_reduce_max(t);
    TORCH_CHECK(
        t[0].item<double>() == -t[1].item<double>(),
        "resume: the ranks resumed different steps (",
        -t[1].item<double>(),
        " to ",
        t[0].item<double>(),
        "); every rank must see the same checkpoint directory");
  }
  std::ofstream metrics; // rank 0 writes the metrics
  if (env_.rank == 0) {
    metrics.open(metrics_path_, std::ios::app);
  }
  auto prev_int = std::signal(SIGINT, on_signal);
  auto prev_term = std::signal(SIGTERM, on_signal);
  const int64_t total = cfg_.train.steps;
  const int64_t tokens_per_step = dp_size_ * cfg_.train.micro_batch *
                                  cfg_.train.grad_accum * cfg_.data.seq_len;
  model_->train();
  auto t_start = std::chrono::steady_clock::now();
  auto t_log = t_start;
  int64_t bad_in_row = 0, logged_from = step;
  const int64_t first_step = step;
  while (step < total) {
    apply_moe_schedules(step);
    const double lr_f = lr_factor(cfg_.optim, step, total);
    auto& groups = opt_->param_groups();
    for (size_t g = 0; g < groups.size(); ++g) {
      static_cast<torch::optim::AdamWOptions&>(groups[g].options())
          .lr(base_lr_[g] * lr_f);
    }
    // Micro-batch loop: accumulate gradients of the mean loss.
    for (auto& p : params_) {
      p.mutable_grad() = at::Tensor();
    }
    double loss_sum = 0, ce_sum = 0, aux_sum = 0;
    std::vector<at::Tensor> layer_tokens;
    json layer_stats = json::array();
    for (int64_t micro = 0; micro < cfg_.train.grad_accum; ++micro) {
      auto r = model_->loss(batch(*train_, step, micro, true));
      (r.loss / cfg_.train.grad_accum).backward();
      loss_sum += r.loss.item<double>();
      ce_sum += r.ce.item<double>();
      aux_sum += r.aux.item<double>();
      for (size_t l = 0; l < r.out.moe_layers.size(); ++l) {
        const auto tpe = r.out.moe_layers[l].moe.tokens_per_expert.detach();
        if (layer_tokens.size() <= l) {
          layer_tokens.push_back(tpe.clone());
        } else {
          layer_tokens[l] += tpe;
        }
        if (micro == cfg_.train.grad_accum - 1) {
          const auto& m = r.out.moe_layers[l].moe;
          layer_stats.push_back(
              {{"layer", r.out.moe_layers[l].layer},
               {"dropped_fraction", m.dropped_fraction.item<double>()},
               {"router_entropy", m.router_entropy.item<double>()},
               {"switch_loss", m.switch_loss.item<double>()},
               {"z_loss", m.z_loss.item<double>()},
               {"capacity_utilization",
                m.capacity_utilization.item<double>()}});
        }
      }
    }
    // Across data-parallel ranks: the logged losses, a stop request from a
    // signal on any rank, the routing counts and the gradients.
    bool stop_requested = g_signal != 0;
    if (distributed()) {
      // Over every process: tensor-parallel ranks hold the same values.
      auto v = at::tensor(
          {loss_sum, ce_sum, aux_sum, stop_requested ? 1.0 : 0.0}, at::kDouble);
      world_->all_reduce_sum(v);
      const double n = static_cast<double>(env_.world_size);
      loss_sum = v[0].item<double>() / n;
      ce_sum = v[1].item<double>() / n;
      aux_sum = v[2].item<double>() / n;
      stop_requested = v[3].item<double>() > 0;
      if (!layer_tokens.empty()) {
        auto counts = at::stack(layer_tokens).to(at::kDouble);
        dp_->all_reduce_sum(counts);
        for (size_t l = 0; l < layer_tokens.size(); ++l) {
          layer_tokens[l] = counts[l].to(layer_tokens[l].scalar_type());
        }
      }
      all_reduce_grads();
    }
    const double loss = loss_sum / cfg_.train.grad_accum;
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
    double grad_norm = 0;
    {
      at::NoGradGuard g;
      // Per-tensor norms in the gradients' own dtype (no float64 copies of
      // every gradient), combined in float64. Every parameter is counted
      // once: replicated ones here, expert slices summed over the
      // expert-parallel group.
      std::vector<at::Tensor> grads;
      grads.reserve(opt_params.size());
      for (auto& p : opt_params) {
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
      for (size_t k = 0; k < opt_params.size(); ++k) {
        sums[opt_kind[k]] += sqp[k];
      }
      const double dense = sums[0];
      auto expert = at::full({1}, sums[1], at::kDouble);
      auto split = at::full({1}, sums[2], at::kDouble);
      if (ep_) {
        ep_->all_reduce_sum(expert);
      }
      if (tp_) {
        tp_->all_reduce_sum(split);
      }
      grad_norm =
          std::sqrt(dense + expert.item<double>() + split.item<double>());
    }
    if (!std::isfinite(loss) || !std::isfinite(grad_norm)) {
      ++result.skipped_steps;
      ++bad_in_row;
      log::warn(log::format(
          "step %ld: non-finite loss %g or grad norm %g; step skipped (%ld in "
          "a row)",
          step + 1,
          loss,
          grad_norm,
          bad_in_row));
      TORCH_CHECK(
          bad_in_row < cfg_.train.max_bad_steps,
          "training aborted: ",
          bad_in_row,
          " non-finite steps in a row (train.max_bad_steps = ",
          cfg_.train.max_bad_steps,
          ")");
      ++step;
      if (stop_requested) {
        save(step);
        result.interrupted = true;
        break;
      }
      continue;
    }
    bad_in_row = 0;
    if (cfg_.optim.grad_clip > 0 && grad_norm > cfg_.optim.grad_clip) {
      at::NoGradGuard g;
      const double s = cfg_.optim.grad_clip / (grad_norm + 1e-6);
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
    ++step;
    result.final_loss = loss;
    // Metrics (every step) and the console line (every log.every steps).
    json rec = {
        {"step", step},
        {"loss", loss},
        {"ce", ce_sum / cfg_.train.grad_accum},
        {"aux", aux_sum / cfg_.train.grad_accum},
        {"lr", base_lr_[0] * lr_f},
        {"grad_norm", grad_norm},
        {"moe_layers", layer_stats}};
    for (size_t l = 0; l < layer_tokens.size(); ++l) {
      auto v = layer_tokens[l].to(at::kDouble).contiguous();
      rec["moe_layers"][l]["tokens_per_expert"] = std::vector<double>(
          v.data_ptr<double>(), v.data_ptr<double>() + v.numel());
      rec["moe_layers"][l]["dead_experts"] =
          (layer_tokens[l] == 0).sum().item<int64_t>();
    }
    if (cfg_.schedule.capacity_factor.start >= 0) {
      rec["capacity_factor"] =
          cfg_.schedule.capacity_factor.value(step - 1, total);
    }
    if (cfg_.schedule.top_k.start >= 1) {
      rec["top_k"] = std::llround(cfg_.schedule.top_k.value(step - 1, total));
    }
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
          loss,
          base_lr_[0] * lr_f,
          tps,
          fmt_duration(eta).c_str()));
      t_log = now;
      logged_from = step;
    }
    if (stop_requested) {
      log::warn(log::format(
          "signal %d: saving a checkpoint at step %ld and stopping",
          int(g_signal),
          step));
      save(step);
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

RunResult run_training(const TrainConfig& config, const std::string& resume) {
  log::info("resolved config:\n" + config.text);
  detail::Trainer t(config);
  return t.run(resume);
}

} // namespace moeyard::train
