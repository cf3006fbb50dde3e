#pragma once
// Internal to csrc/train: the Trainer class, whose members are defined in
// trainer.cpp (the step and the loop, data, metrics), trainer_resume.cpp
// (where a run starts), trainer_optimizer.cpp (parameter groups, clipping),
// checkpoint.cpp (save and load) and trainer_parallel.cpp (process groups,
// gradient reduction, expert sharding).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/StringUtil.h>
#include <torch/optim/adamw.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <random>
#include <set>

#include "io/hf_checkpoint.h"
#include "io/safetensors.h"
#include "io/token_shard.h"
#include "model/transformer.h"
#include "parallel/process_group.h"
#include "train/routing_metrics.h"
#include "util/log.h"

#include "train/run_dir.h"
#include "train/trainer.h"

namespace moeyard::train::detail {

namespace fs = std::filesystem;
using nlohmann::json;

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Learning-rate multiplier at `step` (0-based) of `total`.

// Verifies every file's SHA-256 against a checkpoint's manifest.json and
// returns the manifest.
json read_manifest(const fs::path& dir);

// The full tensors of a checkpoint's files of one kind ("model",
// "optimizer"): whole tensors and the pieces ranks wrote, joined.
io::TensorMap load_checkpoint_tensors(
    const fs::path& dir, const std::string& kind);

// Copies a checkpoint's model tensors into `model`: every name and shape
// must match, in both directions.
void load_model_tensors(TransformerImpl& model, const fs::path& dir);

// Scales each expert's slices of a layer's w_gate_up and w_down gradients
// together so that their joint norm is at most `clip`.
void clip_experts(
    const std::vector<std::string>& names,
    const std::vector<at::Tensor>& params,
    double clip);

class Trainer {
 public:
  Trainer(const TrainConfig& c) : cfg_(c), model_(c.model) {
    if (cfg_.train.threads > 0) {
      at::set_num_threads(cfg_.train.threads);
    }
    try {
      device_ = c10::Device(cfg_.train.device);
    } catch (const std::exception&) {
      TORCH_CHECK(
          false,
          "config: train.device must be cpu, cuda or cuda:N, got '",
          cfg_.train.device,
          "'");
    }
    setup_parallel(); // a multi-process GPU run: device_ becomes
                      // cuda:LOCAL_RANK
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

  RunResult run(const RunOptions& options);

 private:
  // What one optimizer step did, for the metrics and the loop.
  struct StepOutcome {
    double loss = 0, ce = 0, aux = 0, grad_norm = 0, lr = 0;
    std::string skipped; // "" : applied; else why it was skipped
    int stop_signal = 0; // a stop was requested (on any rank) by this signal
    bool stop_here = false; // this rank received the signal
    nlohmann::json moe_layers = nlohmann::json::array();
  };
  // Chooses the checkpoint to start from (or none), checks that it fits
  // this config and data, loads the model and optimizer; the first step.
  int64_t start(const RunOptions& options);
  // Errors naming every field that defines the model or routing and
  // differs from the checkpoint's; the data fingerprint likewise.
  void check_resume_compatible(const json& manifest, const fs::path& from);
  // Drops metrics records past `step` (their steps will be run again).
  void truncate_metrics(int64_t step) const;
  StepOutcome train_step(int64_t step);
  // Per MoE layer, the routing statistics of the whole step: every
  // micro-batch on every data-parallel rank (one collective).
  nlohmann::json routing_stats(
      std::vector<at::Tensor>& sums, std::vector<at::Tensor>& layer_tokens);
  double global_grad_norm(
      const std::vector<at::Tensor>& params, const std::vector<int>& kind);
  // Why this step must be skipped ("" : it must not).
  std::string skip_reason(double loss, double grad_norm) const;
  // rank 0: the manifest fields that describe the run, not the files.
  json manifest_state(int64_t step) const;
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
  // The process groups of the layout (docs/distributed.md): rank = (dp index)
  // x tp + tp rank; expert-parallel groups inside the data-parallel ones.
  void setup_parallel();
  bool distributed() const {
    return world_.has_value();
  }
  // Mean over the data-parallel ranks (identity in one process).
  double dp_mean(double v) const;
  // Averages the gradients of params_ over the data-parallel ranks (expert
  // slices over the expert-data-parallel ranks), in float32 buffers.
  void all_reduce_grads();
  // Tensor parallelism (this rank's heads, hidden units, vocabulary rows),
  // then expert parallelism (this rank's experts of every MoE layer).
  void shard_model();
  // This rank's piece of a full tensor read from a checkpoint.
  at::Tensor local_piece(const std::string& name, const at::Tensor& t) const;
  at::Tensor expert_slice(const std::string& name, const at::Tensor& t) const;
  bool is_tp_sharded(const std::string& name) const {
    return tp_.has_value() && model_->tp_split(name).sharded();
  }
  bool is_expert(const std::string& name) const {
    return ep_.has_value() && (ends_with(name, ".moe.w_gate_up") ||
                               ends_with(name, ".moe.w_down") ||
                               ends_with(name, ".moe.b_gate_up") ||
                               ends_with(name, ".moe.b_down"));
  }
  int64_t load_optimizer_state(const std::string& dir);
  void build_optimizer();
  at::Tensor batch(
      const io::TokenShard& s, int64_t step, int64_t micro, bool random);
  double evaluate();
  void save(int64_t step);
  // Rank 0: manifest (SHA-256 of every file), rename, `latest`, pruning.
  void commit(int64_t step, const fs::path& tmp, const fs::path& final_dir);
  // Whether this rank writes `name` (one copy of each tensor or piece) and
  // the piece metadata it writes with it ("" for whole tensors).
  bool writes(const std::string& name) const;
  std::string piece_of(const std::string& name) const;
  std::string rng_file(int64_t dp_rank) const;
  // Every rank, with checkpoint.timeout_s (a save outlasts collectives).
  void save_barrier() const;
  // Seeds this data-parallel rank's random stream for training at `step`.
  void seed_stream(int64_t step);
  void apply_moe_schedules(int64_t step);
  // The scheduled options' values this step (first MoE layer), by name.
  nlohmann::json scheduled_values() const;

  TrainConfig cfg_;
  Transformer model_;
  RunOptions options_;
  std::string run_id_; // the run the checkpoints of this run belong to
  bool discard_others_ = false; // --overwrite, until the first commit
  json data_fingerprint_; // data.train and data.valid
  std::deque<double> recent_losses_; // accepted steps, for the spike guard
  int64_t bad_in_row_ = 0; // consecutive skipped steps
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
  // Every process; data, expert, expert-data and tensor parallel groups.
  std::optional<parallel::Group> world_, dp_, ep_, edp_, tp_;
  int64_t dp_size_ = 1, dp_rank_ = 0, ep_size_ = 1, ep_rank_ = 0;
  int64_t tp_size_ = 1, tp_rank_ = 0;
};

} // namespace moeyard::train::detail
