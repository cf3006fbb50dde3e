// The training loop (docs/training.md): each step, then its metrics
// record, evaluation, progress line, a requested stop and periodic
// checkpoints; the data windows, evaluation and the MoE layers' schedules
// and routing statistics. One step is trainer_step.cpp.

#include "train/trainer_impl.h"

namespace moeyard::train {
namespace detail {
namespace {

std::atomic<int> g_signal{0};
void on_signal(int sig) {
  g_signal = sig;
}

// SIGINT and SIGTERM request a stop while a run holds this; the previous
// handlers come back when it ends.
class StopSignals {
 public:
  StopSignals() {
    g_signal = 0;
    prev_int_ = std::signal(SIGINT, on_signal);
    prev_term_ = std::signal(SIGTERM, on_signal);
  }
  ~StopSignals() {
    std::signal(SIGINT, prev_int_);
    std::signal(SIGTERM, prev_term_);
    g_signal = 0;
  }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

 private:
  void (*prev_int_)(int) = SIG_DFL;
  void (*prev_term_)(int) = SIG_DFL;
};

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

int received_signal() {
  return g_signal;
}

// Micro-batch `micro` of step `step`: random windows from a generator seeded
// by (seed, step, micro), so any step can be replayed after a resume.

Trainer::Batch Trainer::batch(
    const io::TokenCorpus& s, int64_t step, int64_t micro, bool random) {
  // The global micro-batch has micro_batch rows per data-parallel rank;
  // this rank reads its slice, so the run sees the same windows whatever
  // the number of processes.
  const int64_t B = cfg_.train.micro_batch * layout_.dp;
  const int64_t mine_begin = layout_.dp_rank * cfg_.train.micro_batch,
                mine_end = mine_begin + cfg_.train.micro_batch;
  const int64_t span = s.windows();
  std::vector<at::Tensor> rows, masks;
  uint64_t state =
      static_cast<uint64_t>(cfg_.data.seed) * 0x9E3779B97F4A7C15ull +
      static_cast<uint64_t>(step) * 1000003ull + static_cast<uint64_t>(micro);
  const auto draw = [&state] { // xorshift64*
    state ^= state >> 12, state ^= state << 25, state ^= state >> 27;
    return state * 2685821657736338717ull;
  };
  for (int64_t b = 0; b < B; ++b) {
    int64_t position = 0;
    if (random) {
      const uint64_t r = draw();
      const uint64_t pick = s.weighted() ? draw() : 0; // the source
      position = s.random_position(r, pick);
    } else {
      position = (span / std::max<int64_t>(B * cfg_.train.eval_batches, 1)) *
                 (micro * B + b);
    }
    if (b >= mine_begin && b < mine_end) {
      rows.push_back(s.window(position, cfg_.model.vocab_size));
      if (s.has_loss_masks()) {
        masks.push_back(s.loss_mask(position));
      }
    }
  }
  // To a GPU from pinned memory, without waiting: a copy from pageable
  // memory would wait for the device to finish its queue.
  const auto to_device = [&](const at::Tensor& t) {
    return device_.is_cuda() ? t.pin_memory().to(device_, /*non_blocking=*/true)
                             : t;
  };
  return {
      to_device(at::stack(rows)),
      masks.empty() ? at::Tensor() : to_device(at::stack(masks))};
}

double Trainer::evaluate(
    std::vector<at::Tensor>* predictions, double* experts_per_token) {
  if (!valid_) {
    return NAN;
  }
  at::NoGradGuard g;
  model_->eval();
  const auto layers = moe_layers();
  if (predictions) {
    predictions->assign(layers.size(), at::Tensor());
    for (auto* l : layers) {
      l->capture_input = true;
    }
  }
  // With loss masks batches count by their marked tokens (some may hold
  // none); without, every batch has the same number. Sums stay on the
  // device, read once at the end: [ce sum, tokens counted, experts/token].
  at::Tensor sums;
  for (int64_t i = 0; i < cfg_.train.eval_batches; ++i) {
    const auto b = batch(*valid_, 0, i, false);
    const auto r = model_->loss(b.tokens, {}, b.loss_mask);
    const auto ce = r.ce.to(at::kDouble);
    const auto n =
        b.loss_mask.defined() ? r.tokens.to(at::kDouble) : at::ones_like(ce);
    auto experts = at::zeros_like(ce);
    for (const auto& m : r.out.moe_layers) {
      experts += m.moe.real_experts_per_token.to(at::kDouble) /
                 static_cast<double>(r.out.moe_layers.size());
    }
    const auto row = at::stack({ce * n, n, experts});
    sums = sums.defined() ? sums + row : row;
    for (size_t j = 0; predictions && j < layers.size(); ++j) {
      auto& p = (*predictions)[j];
      const auto now = layers[j]->critic(layers[j]->captured_input).flatten();
      p = p.defined() ? at::cat({p, now}) : now;
    }
  }
  const auto host = sums.cpu().contiguous();
  const double sum = host.const_data_ptr<double>()[0];
  const double counted = host.const_data_ptr<double>()[1];
  const double experts = host.const_data_ptr<double>()[2];
  for (auto* l : layers) {
    l->capture_input = false;
    l->captured_input = at::Tensor();
  }
  model_->train();
  if (experts_per_token) {
    *experts_per_token = dp_mean(experts / cfg_.train.eval_batches);
  }
  if (valid_->has_loss_masks()) {
    const double all = dp_mean(counted);
    return all > 0 ? dp_mean(sum) / all : 0.0;
  }
  return dp_mean(sum / cfg_.train.eval_batches);
}

void Trainer::apply_moe_schedules(int64_t step) {
  const auto& schedules = cfg_.schedule.options;
  const bool relu_l1 = cfg_.schedule.relu_l1_mult > 0;
  if (schedules.empty() && !relu_l1) {
    return;
  }
  for (const auto& m : model_->layers->children()) {
    auto block = std::dynamic_pointer_cast<BlockImpl>(m);
    if (!block || !block->moe) {
      continue;
    }
    if (relu_l1) { // the adaptive L1 of relu routing
      block->moe->options.switch_coeff = relu_l1_coeff_;
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
            if (cfg_.schedule.options.count(key) ||
                (cfg_.schedule.relu_l1_mult > 0 &&
                 std::string(key) == "switch_coeff")) {
              out[key] = v;
            }
          });
      break;
    }
  }
  return out;
}

nlohmann::json Trainer::routing_records(const at::Tensor& rows) const {
  json out = json::array();
  if (rows.numel() == 0) {
    return out;
  }
  size_t l = 0;
  int64_t layer = -1;
  for (const auto& m : model_->layers->children()) {
    ++layer;
    auto block = std::dynamic_pointer_cast<BlockImpl>(m);
    if (!block || !block->moe) {
      continue;
    }
    out.push_back(routing_record(
        rows[l], layer, block->moe->options, cfg_.model.moe.num_experts));
    ++l;
  }
  return out;
}

namespace {
// A run directory's name, also when it is given with a trailing '/'.
std::string run_name(const std::string& dir) {
  auto p = fs::path(dir).lexically_normal();
  return (p.has_filename() ? p : p.parent_path()).filename().string();
}
} // namespace

RunResult Trainer::run(const RunOptions& options) {
  RunResult result;
  int64_t step = start(options);
  std::ofstream metrics; // rank 0 writes the metrics
  if (layout_.rank == 0 && !cfg_.log.tensorboard.empty()) {
    tensorboard_ = std::make_unique<EventWriter>(cfg_.log.tensorboard);
    log::info("log.tensorboard: " + tensorboard_->path());
  }
  if (layout_.rank == 0 && !cfg_.log.wandb.empty()) {
    wandb_ = std::make_unique<WandbFeed>(WandbOptions{
        cfg_.log.wandb,
        cfg_.log.wandb_mode,
        run_name(cfg_.checkpoint.dir),
        cfg_.checkpoint.dir,
        cfg_.resolved});
    log::info(
        "log.wandb: project " + cfg_.log.wandb + " (" + cfg_.log.wandb_mode +
        "), files in " + (fs::path(cfg_.checkpoint.dir) / "wandb").string());
  }
  if (layout_.rank == 0) {
    metrics.open(metrics_path_, std::ios::app);
  }
  StopSignals signals;
  model_->train();
  Progress progress;
  progress.start = progress.last = std::chrono::steady_clock::now();
  progress.first_step = progress.logged_from = step;
  while (step < cfg_.train.steps) {
    const auto began = std::chrono::steady_clock::now();
    auto p = train_step(step);
    p.step_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - began)
            .count();
    ++step;
    const bool stop = p.stop_signal != 0;
    pending_.push_back(std::move(p));
    if (!flush_due(step, stop)) {
      continue;
    }
    StepOutcome last;
    for (auto& s : flush()) {
      note_outcome(s); // may abort (train.max_bad_steps)
      if (s.skipped.empty()) {
        result.final_loss = s.loss;
      } else {
        ++result.skipped_steps;
      }
      json rec = step_record(s.step, s);
      rec["step_s"] = s.step_s;
      if (s.step == step && eval_due(step)) {
        evaluate_into(step, rec, result);
      }
      if (metrics.is_open()) {
        metrics << rec.dump() << "\n";
        metrics.flush();
      }
      if (tensorboard_ || wandb_) {
        log_dashboards(rec);
      }
      log_progress(s.step, s, progress);
      last = std::move(s);
    }
    if (stop) {
      stop_at(step, last);
      result.interrupted = true;
      break;
    }
    if (checkpoint_due(step)) {
      save(step);
    }
  }
  if (!result.interrupted) {
    save(step);
  }
  wandb_.reset(); // the W&B run finishes with the training's
  result.steps_done = step;
  result.host_reads = host_reads_;
  return result;
}

void Trainer::log_dashboards(const json& rec) {
  const int64_t step = rec.at("step").get<int64_t>();
  const bool with_load = step % cfg_.log.every == 0 || step == cfg_.train.steps;
  const auto view = dashboard_step(rec, tokens_per_step(), with_load);
  if (wandb_) {
    wandb_->send(view);
  }
  if (!tensorboard_) {
    return;
  }
  for (const auto& [tag, value] : view.scalars) {
    tensorboard_->scalar(tag, value, step);
  }
  if (!view.expert_load.empty()) {
    int64_t h = 0, w = 0;
    const auto png = png_heatmap(view.expert_load, 16, &h, &w);
    tensorboard_->image("moe/expert_load", png, h, w, step);
  }
  tensorboard_->flush();
}

json Trainer::step_record(int64_t step, const StepOutcome& s) const {
  json rec = {
      {"step", step},
      {"loss", s.loss},
      {"ce", s.ce},
      {"aux", s.aux},
      {"lr", s.lr},
      {"grad_norm", s.grad_norm},
      {"moe_layers", s.moe_layers}};
  if (!s.critic.is_null()) {
    rec["critic"] = s.critic;
  }
  if (teacher_) {
    rec["kl"] = s.kl;
  }
  if (!s.skipped.empty()) {
    rec["skipped"] = true;
    rec["skip_reason"] = s.skipped;
  }
  // The values routing used this step (after clamping to the model).
  rec.update(s.scheduled);
  return rec;
}

bool Trainer::eval_due(int64_t step) const {
  return valid_ && cfg_.train.eval_every > 0 &&
         (step % cfg_.train.eval_every == 0 || step == cfg_.train.steps);
}

bool Trainer::checkpoint_due(int64_t step) const {
  return cfg_.checkpoint.every > 0 && step % cfg_.checkpoint.every == 0 &&
         step != cfg_.train.steps;
}

void Trainer::evaluate_into(int64_t step, json& rec, RunResult& result) {
  // With critic.skip_budget: without skipping first (the critic's
  // predictions calibrate its thresholds), then with.
  const bool critic = cfg_.critic.skip_budget > 0;
  if (critic) {
    at::NoGradGuard g;
    for (auto* l : moe_layers()) {
      l->critic_threshold.fill_(-std::numeric_limits<double>::infinity());
    }
  }
  std::vector<at::Tensor> predictions;
  double experts = 0;
  const double vl = evaluate(critic ? &predictions : nullptr, &experts);
  rec["valid_loss"] = vl;
  rec["valid_ppl"] = std::exp(vl);
  result.final_valid_loss = vl;
  log::info(log::format(
      "step %ld | valid loss %.4f | ppl %.2f", step, vl, std::exp(vl)));
  if (critic) {
    rec["critic_thresholds"] = calibrate_critic(predictions);
    double skipping = 0;
    const double vs = evaluate(nullptr, &skipping);
    const double share = experts > 0 ? 1.0 - skipping / experts : 0.0;
    rec["valid_loss_critic_skip"] = vs;
    rec["critic_skipped"] = share;
    log::info(log::format(
        "step %ld | critic skips %.1f%% of picks | valid loss %.4f (%+.4f)",
        step,
        100 * share,
        vs,
        vs - vl));
  }
}

void Trainer::log_progress(
    int64_t step, const StepOutcome& s, Progress& p) const {
  const int64_t total = cfg_.train.steps;
  if (step % std::max<int64_t>(cfg_.log.every, 1) != 0 && step != total) {
    return;
  }
  const double tokens_per_step = this->tokens_per_step();
  const auto now = std::chrono::steady_clock::now();
  const double dt = std::chrono::duration<double>(now - p.last).count();
  const double elapsed = std::chrono::duration<double>(now - p.start).count();
  const double tps =
      (step - p.logged_from) * tokens_per_step / std::max(dt, 1e-9);
  const double eta =
      elapsed / std::max<int64_t>(step - p.first_step, 1) * (total - step);
  // Where routing picks a varying number of experts: their mean per token
  // over the MoE layers.
  const auto& o = cfg_.model.moe.routing;
  std::string experts;
  if (!s.moe_layers.empty() &&
      (o.null_experts > 0 ||
       (o.routing != "token_choice" && o.routing != "sinkhorn" &&
        o.routing != "hash"))) {
    experts = log::format(
        " | experts/token %.2f", mean_real_experts_per_token(s.moe_layers));
  }
  if (teacher_) {
    experts += log::format(" | kl %.4f", s.kl);
  }
  // Model FLOPs: 6 per active parameter and token, plus the attention's.
  const double tflops = flops_per_token_ * tps / 1e12;
  const std::string mfu =
      cfg_.log.peak_tflops > 0
          ? log::format(" (MFU %.1f%%)", 100 * tflops / cfg_.log.peak_tflops)
          : "";
  log::info(log::format(
      "step %5ld/%ld | loss %.4f | lr %.2e%s | %.0f tok/s | %.3g TFLOP/s%s | "
      "%.2fB params | mem %.0f MB | ETA %s",
      step,
      total,
      s.loss,
      s.lr,
      experts.c_str(),
      tps,
      tflops,
      mfu.c_str(),
      total_params_ / 1e9,
      util::rss_bytes() / 1e6,
      fmt_duration(eta).c_str()));
  p.last = now;
  p.logged_from = step;
}

void Trainer::stop_at(int64_t step, const StepOutcome& s) {
  const auto what = s.stop_signal == SIGINT    ? "SIGINT"
                    : s.stop_signal == SIGTERM ? "SIGTERM"
                                               : "a signal";
  const auto msg =
      s.stop_here ? log::format("%s received", what)
                  : log::format("stop requested by another rank (%s)", what);
  if (layout_.rank == 0 || s.stop_here) {
    log::warn(
        msg +
        log::format(": saving a checkpoint at step %ld and stopping", step));
  }
  save(step);
  if (layout_.rank == 0) { // the stop is clean only if the save verifies
    io::read_manifest(
        fs::path(cfg_.checkpoint.dir) / ("step_" + std::to_string(step)));
    log::info(log::format(
        "checkpoint step_%ld verified; resume with --resume auto", step));
  }
  save_barrier();
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
