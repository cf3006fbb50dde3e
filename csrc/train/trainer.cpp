#include "train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/optim/adamw.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>

#include "io/hf_checkpoint.h"
#include "io/safetensors.h"
#include "io/token_shard.h"
#include "model/transformer.h"
#include "parallel/process_group.h"
#include "util/log.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace moeyard::train {
namespace {

std::atomic<int> g_signal{0};
void on_signal(int sig) {
  g_signal = sig;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Learning-rate multiplier at `step` (0-based) of `total`.
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

json read_manifest(const fs::path& dir) {
  std::ifstream in(dir / "manifest.json");
  TORCH_CHECK(in, "checkpoint ", dir.string(), ": no manifest.json");
  json manifest;
  try {
    in >> manifest;
  } catch (const std::exception& e) {
    TORCH_CHECK(
        false,
        "checkpoint ",
        dir.string(),
        ": manifest.json is not valid JSON: ",
        e.what());
  }
  for (const auto& [file, sum] : manifest.at("sha256").items()) {
    const auto got = io::sha256_file((dir / file).string());
    TORCH_CHECK(
        got == sum.get<std::string>(),
        "checkpoint ",
        (dir / file).string(),
        ": SHA-256 mismatch (manifest ",
        sum.get<std::string>(),
        ", file ",
        got,
        "): the file is corrupt");
  }
  return manifest;
}

// Copies a checkpoint's model tensors into `model`: every name and shape
// must match, in both directions.
void load_model_tensors(TransformerImpl& model, const fs::path& dir) {
  auto model_t = io::load_safetensors((dir / "model.safetensors").string());
  at::NoGradGuard g;
  size_t used = 0;
  auto take = [&](const std::string& n, at::Tensor& dst) {
    auto it = model_t.find(n);
    TORCH_CHECK(
        it != model_t.end(),
        "checkpoint ",
        dir.string(),
        ": tensor '",
        n,
        "' is missing");
    TORCH_CHECK(
        it->second.sizes() == dst.sizes(),
        "checkpoint ",
        dir.string(),
        ": tensor '",
        n,
        "' has shape ",
        it->second.sizes(),
        ", the model expects ",
        dst.sizes());
    dst.copy_(it->second);
    ++used;
  };
  for (auto& p : model.named_parameters()) {
    take(p.key(), p.value());
  }
  for (auto& b : model.named_buffers()) {
    take(b.key(), b.value());
  }
  TORCH_CHECK(
      used == model_t.size(),
      "checkpoint ",
      dir.string(),
      ": has ",
      model_t.size() - used,
      " tensors the model does not have");
}

class Trainer {
 public:
  Trainer(const TrainConfig& c) : cfg_(c), model_(c.model) {
    if (cfg_.train.threads > 0) {
      at::set_num_threads(cfg_.train.threads);
    }
    setup_parallel();
    try {
      device_ = c10::Device(cfg_.train.device);
    } catch (const std::exception&) {
      TORCH_CHECK(
          false,
          "config: train.device must be cpu, cuda or cuda:N, got '",
          cfg_.train.device,
          "'");
    }
    model_->to(device_);
    train_ = std::make_unique<io::TokenShard>(cfg_.data.train);
    check_shard(*train_, "data.train");
    if (!cfg_.data.valid.empty()) {
      valid_ = std::make_unique<io::TokenShard>(cfg_.data.valid);
      check_shard(*valid_, "data.valid");
    }
    metrics_path_ =
        cfg_.log.metrics.empty()
            ? (fs::path(cfg_.checkpoint.dir) / "metrics.jsonl").string()
            : cfg_.log.metrics;
  }

  RunResult run(const std::string& resume);

 private:
  void check_shard(const io::TokenShard& s, const char* field) {
    TORCH_CHECK(
        s.vocab_size() <= cfg_.model.vocab_size,
        "config: ",
        field,
        " (",
        s.path(),
        ") was made for a vocabulary of ",
        s.vocab_size(),
        " tokens but model.vocab_size is ",
        cfg_.model.vocab_size);
    TORCH_CHECK(
        s.size() > cfg_.data.seq_len,
        "config: ",
        field,
        " (",
        s.path(),
        ") has ",
        s.size(),
        " tokens, fewer than data.seq_len + 1 = ",
        cfg_.data.seq_len + 1);
  }

  // The tokenizer the data was made with: tokenizer.json beside the train
  // shard (scripts/prepare_data.py puts it there), else init_from's; "" for
  // byte-level data.
  std::string tokenizer_path() const {
    auto data_dir = fs::path(cfg_.data.train).parent_path();
    if (fs::exists((data_dir.empty() ? "." : data_dir) / "tokenizer.json")) {
      return ((data_dir.empty() ? "." : data_dir) / "tokenizer.json").string();
    }
    if (!cfg_.init_from.empty() &&
        fs::exists(fs::path(cfg_.init_from) / "tokenizer.json")) {
      return (fs::path(cfg_.init_from) / "tokenizer.json").string();
    }
    return "";
  }
  // Data parallelism over every process of the launch (docs/distributed.md).
  void setup_parallel();
  bool distributed() const {
    return dp_.has_value();
  }
  // Mean over the data-parallel ranks (identity in one process).
  double dp_mean(double v) const;
  // Averages the gradients of params_ over the data-parallel ranks (expert
  // slices over the expert-data-parallel ranks), in float32 buffers.
  void all_reduce_grads();
  // Expert parallelism: slices every MoE layer's experts to this rank's.
  void shard_experts();
  // The full tensor of an expert parameter (or its optimizer state) from
  // every expert-parallel rank's slice; `t` itself otherwise.
  at::Tensor gather_experts(const std::string& name, const at::Tensor& t) const;
  // This rank's slice of a full expert tensor read from a checkpoint.
  at::Tensor expert_slice(const std::string& name, const at::Tensor& t) const;
  bool is_expert(const std::string& name) const {
    return ep_.has_value() && (ends_with(name, ".moe.w_gate_up") ||
                               ends_with(name, ".moe.w_down") ||
                               ends_with(name, ".moe.b_gate_up") ||
                               ends_with(name, ".moe.b_down"));
  }
  void load_model_state(const std::string& dir);
  int64_t load_optimizer_state(const std::string& dir);
  void build_optimizer();
  at::Tensor batch(
      const io::TokenShard& s, int64_t step, int64_t micro, bool random);
  double evaluate();
  void save(int64_t step);
  void apply_moe_schedules(int64_t step);

  TrainConfig cfg_;
  Transformer model_;
  std::unique_ptr<io::TokenShard> train_, valid_;
  std::unique_ptr<torch::optim::AdamW> opt_;
  std::vector<double> base_lr_; // per parameter group
  std::vector<std::string> names_; // parameter names in optimizer order
  std::vector<at::Tensor> params_,
      masters_; // masters: fp32 copies of non-fp32 params
  std::string metrics_path_;
  std::vector<std::string> param_names_; // parallel to params_
  std::vector<bool> opt_is_master_; // parallel to names_
  c10::Device device_{c10::kCPU};
  parallel::LaunchEnv env_;
  std::optional<parallel::Group> dp_, ep_, edp_; // data, expert, expert-data
  int64_t dp_size_ = 1, dp_rank_ = 0, ep_size_ = 1, ep_rank_ = 0;
};

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
  auto full = at::zeros(sizes, t.options().dtype(at::kFloat));
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

void Trainer::save(int64_t step) {
  // Full tensors under global names: expert slices are gathered from the
  // expert-parallel ranks (every rank takes part), then rank 0 writes, as
  // the data-parallel replicas hold the same model and optimizer, and the
  // others wait for the commit. The checkpoint loads at any layout.
  io::TensorMap model_t, opt_t;
  for (const auto& p : model_->named_parameters()) {
    model_t[p.key()] = gather_experts(p.key(), p.value());
  }
  for (const auto& b : model_->named_buffers()) {
    model_t[b.key()] = b.value();
  }
  // Optimizer state by parameter name.
  auto& state = opt_->state();
  size_t i = 0;
  for (auto& group : opt_->param_groups()) {
    for (auto& p : group.params()) {
      auto it = state.find(p.unsafeGetTensorImpl());
      if (it != state.end()) {
        auto& s = static_cast<torch::optim::AdamWParamState&>(*it->second);
        const auto& n = names_[i];
        opt_t[n + ".exp_avg"] = gather_experts(n, s.exp_avg());
        opt_t[n + ".exp_avg_sq"] = gather_experts(n, s.exp_avg_sq());
        opt_t[n + ".step"] = at::full({}, s.step(), at::kLong);
        if (opt_is_master_[i]) {
          opt_t[n + ".master"] = gather_experts(n, p);
        }
      }
      ++i;
    }
  }
  if (dp_rank_ != 0) {
    dp_->barrier();
    return;
  }
  const fs::path dir(cfg_.checkpoint.dir);
  const auto name = "step_" + std::to_string(step);
  const fs::path tmp = dir / (name + ".tmp"), final_dir = dir / name;
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  io::save_safetensors((tmp / "model.safetensors").string(), model_t);
  io::save_safetensors((tmp / "optimizer.safetensors").string(), opt_t);
  auto rng = at::detail::getDefaultCPUGenerator().get_state();
  io::save_safetensors((tmp / "rng.safetensors").string(), {{"cpu", rng}});
  json manifest = {
      {"step", step},
      {"config", cfg_.text},
      {"data_position", step},
      {"parallel",
       {{"tensor_parallel", 1},
        {"data_parallel", dp_size_},
        {"expert_parallel", ep_size_}}}};
  std::vector<std::string> files = {
      "model.safetensors", "optimizer.safetensors", "rng.safetensors"};
  if (!cfg_.init_from.empty()) { // the architecture, for resume and export
    std::ofstream out(tmp / "hf_config.json");
    out << cfg_.hf_config.dump(2) << "\n";
    files.push_back("hf_config.json");
  }
  if (const auto tok = tokenizer_path(); !tok.empty()) { // for generate
    fs::copy_file(tok, tmp / "tokenizer.json");
    files.push_back("tokenizer.json");
  }
  for (const auto& f : files) {
    manifest["sha256"][f] = io::sha256_file((tmp / f).string());
  }
  {
    std::ofstream out(tmp / "manifest.json");
    out << manifest.dump(2);
  }
  fs::remove_all(final_dir);
  fs::rename(tmp, final_dir);
  // `latest` moves only after the rename commits the checkpoint.
  {
    std::ofstream out(dir / "latest.tmp");
    out << name << "\n";
  }
  fs::rename(dir / "latest.tmp", dir / "latest");
  // Keep the newest keep_last checkpoints.
  std::vector<std::pair<int64_t, fs::path>> all;
  for (const auto& e : fs::directory_iterator(dir)) {
    const auto n = e.path().filename().string();
    if (e.is_directory() && n.rfind("step_", 0) == 0 && !ends_with(n, ".tmp")) {
      all.emplace_back(std::stoll(n.substr(5)), e.path());
    }
  }
  std::sort(all.begin(), all.end());
  const int64_t keep = std::max<int64_t>(cfg_.checkpoint.keep_last, 1);
  for (int64_t k = 0; k + keep < static_cast<int64_t>(all.size()); ++k) {
    fs::remove_all(all[k].second);
  }
  log::info("checkpoint saved: " + final_dir.string());
  if (distributed()) {
    dp_->barrier();
  }
}

void Trainer::load_model_state(const std::string& dir) {
  read_manifest(fs::path(dir)); // SHA-256 of every file
  load_model_tensors(*model_, fs::path(dir));
}

int64_t Trainer::load_optimizer_state(const std::string& dir_in) {
  const fs::path dir(dir_in);
  std::ifstream in(dir / "manifest.json");
  const json manifest = json::parse(in);
  auto opt_t = io::load_safetensors((dir / "optimizer.safetensors").string());
  size_t i = 0;
  for (auto& group : opt_->param_groups()) {
    for (auto& p : group.params()) {
      const auto& n = names_[i];
      if (opt_t.count(n + ".exp_avg")) {
        auto s = std::make_unique<torch::optim::AdamWParamState>();
        s->exp_avg(expert_slice(n, opt_t.at(n + ".exp_avg")).clone());
        s->exp_avg_sq(expert_slice(n, opt_t.at(n + ".exp_avg_sq")).clone());
        s->step(opt_t.at(n + ".step").item<int64_t>());
        opt_->state()[p.unsafeGetTensorImpl()] = std::move(s);
        if (opt_is_master_[i]) {
          p.detach().copy_(expert_slice(n, opt_t.at(n + ".master")));
        }
      }
      ++i;
    }
  }
  auto rng = io::load_safetensors((dir / "rng.safetensors").string());
  auto gen = at::detail::getDefaultCPUGenerator();
  gen.set_state(rng.at("cpu"));
  return manifest.at("step").get<int64_t>();
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
  shard_experts();
  build_optimizer();
  if (!from.empty()) {
    step = load_optimizer_state(from);
    log::info(log::format("resumed from %s at step %ld", from.c_str(), step));
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
      auto v = at::tensor(
          {loss_sum, ce_sum, aux_sum, stop_requested ? 1.0 : 0.0}, at::kDouble);
      dp_->all_reduce_sum(v);
      loss_sum = v[0].item<double>() / dp_size_;
      ce_sum = v[1].item<double>() / dp_size_;
      aux_sum = v[2].item<double>() / dp_size_;
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
    std::vector<bool> opt_expert; // an expert slice (counted over EP ranks)
    {
      size_t k = 0;
      for (auto& g : opt_->param_groups()) {
        for (auto& p : g.params()) {
          if (p.grad().defined()) {
            opt_params.push_back(p);
            opt_expert.push_back(is_expert(names_[k]));
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
      const auto sq =
          grads.empty()
              ? at::zeros({0}, at::kDouble)
              : at::stack(at::_foreach_norm(grads)).to(at::kDouble).square();
      double dense = 0;
      auto expert = at::zeros({1}, at::kDouble);
      for (size_t k = 0; k < opt_params.size(); ++k) {
        if (opt_expert[k]) {
          expert += sq[k];
        } else {
          dense += sq[k].item<double>();
        }
      }
      if (ep_) {
        ep_->all_reduce_sum(expert);
      }
      grad_norm = std::sqrt(dense + expert.item<double>());
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

} // namespace

Transformer load_model(const std::string& checkpoint_dir) {
  const fs::path dir(checkpoint_dir);
  const json manifest = read_manifest(dir);
  json hf = nullptr; // fine-tuned from a Hugging Face checkpoint
  if (fs::exists(dir / "hf_config.json")) {
    std::ifstream in(dir / "hf_config.json");
    hf = json::parse(in);
  }
  const auto cfg =
      TrainConfig::from_text(manifest.at("config").get<std::string>(), hf);
  Transformer model(cfg.model);
  load_model_tensors(*model, dir);
  model->eval();
  return model;
}

RunResult run_training(const TrainConfig& config, const std::string& resume) {
  log::info("resolved config:\n" + config.text);
  Trainer t(config);
  return t.run(resume);
}

} // namespace moeyard::train
