#pragma once
// Internal to csrc/train: the Trainer class, whose members are defined in
// trainer.cpp (the loop, data, evaluation, metrics), trainer_step.cpp (one
// optimizer step), trainer_resume.cpp (where a run starts),
// trainer_optimizer.cpp (parameter groups, clipping), checkpoint.cpp (what
// a run saves and restores; the file format is csrc/io/checkpoint.h) and
// trainer_parallel.cpp (the parallel layout, gradient reduction).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/StringUtil.h>

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

#include "io/checkpoint.h"
#include "io/hf_checkpoint.h"
#include "io/safetensors.h"
#include "io/token_corpus.h"
#include "model/init.h"
#include "model/transformer.h"
#include "parallel/layout.h"
#include "parallel/process_group.h"
#include "train/routing_metrics.h"
#include "util/log.h"
#include "util/memory.h"

#include "train/adamw.h"
#include "train/dashboard.h"
#include "train/run_dir.h"
#include "train/tensorboard.h"
#include "train/trainer.h"

namespace moeyard::train::detail {

namespace fs = std::filesystem;
using nlohmann::json;

inline bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The signal (SIGINT, SIGTERM) received since the run installed its
// handlers; 0: none.
int received_signal();

// Scales each expert's slices of a layer's w_gate_up and w_down gradients
// together so that their joint norm is at most `clip`.
void clip_experts(
    const std::vector<std::string>& names,
    const std::vector<at::Tensor>& params,
    double clip);

// The sharded optimizer (optim.shard, docs/training.md): the parameters of
// one optimizer group that are reduced over the same ranks, counted alike in
// the gradient norm and stored in the same dtype, flattened into one buffer
// padded to a multiple of the group's size. Rank r of the group owns
// elements [r * shard, (r + 1) * shard): their fp32 master, gradient and
// AdamW moments.
// A bucket of parameters whose gradients are reduced together, in one
// float32 buffer of shard x ranks elements: the gradient reduction's layout
// in every optim.shard mode, so a gradient element is summed in the same
// order whether the optimizer is sharded or not. Sharded, each rank's shard
// of the buffer is its part of the optimizer (`master`).
struct ShardBucket {
  size_t opt_group = 0;
  int kind = 0; // as in the gradient norm: 0 replicated, 1 expert, 2 TP piece
  at::ScalarType dtype = at::kFloat; // the members'
  const parallel::Group* group = nullptr; // dp or edp; null: not split
  std::vector<size_t> members; // indices into the trainer's params_
  std::vector<int64_t> offsets; // each member's first element in the buffer
  int64_t numel = 0; // elements of the members together
  int64_t shard = 0; // elements per rank (the last rank's padded with zeros)
  int64_t begin = 0; // this rank's first element
  at::Tensor master; // float32 [shard]: this rank's elements (sharded only)

  int64_t ranks() const {
    return group ? group->size() : 1;
  }
  // Calls f(member, first element in the member, first element in the
  // shard, elements) for each member that overlaps this rank's shard.
  template <typename F>
  void for_each_overlap(F&& f) const {
    for_each_overlap_in(begin, shard, std::forward<F>(f));
  }
  // The same for the window [first, first + count) of the buffer.
  template <typename F>
  void for_each_overlap_in(int64_t first, int64_t count, F&& f) const {
    for (size_t m = 0; m < members.size(); ++m) {
      const int64_t lo = offsets[m],
                    hi = m + 1 < members.size() ? offsets[m + 1] : numel;
      const int64_t a = std::max(lo, first), b = std::min(hi, first + count);
      if (a < b) {
        f(m, a - lo, a - first, b - a);
      }
    }
  }
};

class Trainer {
 public:
  // The model is built with shapes only (meta): start() gives this rank's
  // pieces memory.
  Trainer(const TrainConfig& c) : cfg_(c), model_(shapes_only(c.model)) {
    count_model_flops();
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
    model_->set_recompute(
        parse_recompute(cfg_.train.recompute, "train.recompute"),
        cfg_.train.recompute_layers);
    if (const int64_t n = apply_lora(*model_, cfg_.lora)) {
      log::info(log::format(
          "finetune.lora: %ld trainable LoRA parameters, the base frozen", n));
    }
    const auto raw = cfg_.data.raw_width();
    train_ = std::make_unique<io::TokenCorpus>(
        cfg_.data.train, raw, cfg_.data.seq_len, "data.train");
    check_vocabulary(*train_, "data.train");
    if (!cfg_.data.valid.empty()) {
      valid_ = std::make_unique<io::TokenCorpus>(
          std::vector<io::CorpusSource>{{cfg_.data.valid, 0}},
          raw,
          cfg_.data.seq_len,
          "data.valid");
      check_vocabulary(*valid_, "data.valid");
    }
    metrics_path_ =
        cfg_.log.metrics.empty()
            ? (fs::path(cfg_.checkpoint.dir) / "metrics.jsonl").string()
            : cfg_.log.metrics;
  }

  RunResult run(const RunOptions& options);

 private:
  static Transformer shapes_only(const ModelConfig& m) {
    ParamDeviceGuard meta(c10::kMeta);
    return Transformer(m);
  }
  // What one optimizer step did, for the metrics and the loop.
  struct StepOutcome {
    int64_t step = 0; // 1-based, as logged
    double loss = 0, ce = 0, aux = 0, kl = 0, grad_norm = 0, lr = 0;
    double step_s = 0; // wall time of train_step
    std::string skipped; // "" : applied; else why it was skipped
    int stop_signal = 0; // a stop was requested (on any rank) by this signal
    bool stop_here = false; // this rank received the signal
    nlohmann::json moe_layers = nlohmann::json::array();
    nlohmann::json critic; // per MoE layer, on critic target steps
    nlohmann::json scheduled; // what the schedules gave routing
  };
  // A finished step whose numbers are still on the device: the host reads
  // them with the rest of the logging interval's in one copy (flush).
  struct PendingStep {
    int64_t step = 0; // 1-based, as logged
    double lr = 0, step_s = 0;
    int stop_signal = 0;
    bool stop_here = false;
    nlohmann::json critic, scheduled;
    // float64 [6]: loss, ce, aux, kl (means over micro-batches and
    // data-parallel ranks), the global gradient norm, the skip code (0
    // applied, 1 non-finite, 2 loss spike).
    at::Tensor values;
    // float64 [MoE layers, statistics] (routing_metrics.h), summed over the
    // data-parallel ranks.
    at::Tensor routing;
  };
  // What the micro-batches of a step leave on the device.
  struct MicroBatchSums {
    at::Tensor losses; // [loss, ce, aux, kl] summed over micro-batches
    std::vector<at::Tensor> routing; // per MoE layer, see routing_stats
  };
  // Timing of the progress lines.
  struct Progress {
    std::chrono::steady_clock::time_point start, last;
    int64_t first_step = 0, logged_from = 0;
  };

  // total_params_ and flops_per_token_ of the whole model (before it is
  // cut into this rank's pieces): 6 FLOPs per active parameter (dense ones
  // and top_k / E of the experts') and token, plus the causal attention's
  // 6 x layers x hidden x seq_len.
  void count_model_flops() {
    double dense = 0, expert = 0;
    for (const auto& p : model_->named_parameters()) {
      (is_expert_parameter(p.key()) ? expert : dense) +=
          static_cast<double>(p.value().numel());
    }
    total_params_ = dense + expert;
    const auto& m = cfg_.model;
    const double active =
        dense +
        expert * static_cast<double>(m.moe.routing.top_k) /
            static_cast<double>(std::max<int64_t>(m.moe.num_experts, 1));
    flops_per_token_ =
        6 * active + 6.0 * static_cast<double>(m.num_layers * m.hidden_size) *
                         static_cast<double>(cfg_.data.seq_len);
  }

  // ---- The loop (trainer.cpp) ----
  // The metrics record of a finished step (skipped ones included).
  json step_record(int64_t step, const StepOutcome& s) const;
  bool eval_due(int64_t step) const;
  bool checkpoint_due(int64_t step) const;
  // The validation loss into `rec`, the result and the log.
  void evaluate_into(int64_t step, json& rec, RunResult& result);
  // Every log.every steps and at the end: loss, lr, throughput, model
  // TFLOP/s (and MFU with log.peak_tflops), parameters, memory, ETA.
  void log_progress(int64_t step, const StepOutcome& s, Progress& p) const;
  // A step's metrics record to the dashboards (log.tensorboard, log.wandb):
  // its numbers, per MoE layer moe/<statistic>/layer<i>, every log.every
  // steps the expert loads as an image.
  void log_dashboards(const json& rec);
  // Tokens of one optimizer step over every data-parallel rank.
  double tokens_per_step() const {
    return static_cast<double>(
        layout_.dp * cfg_.train.micro_batch * cfg_.train.grad_accum *
        cfg_.data.seq_len);
  }
  // A stop requested by a signal: saves `step`, verifies it (rank 0), waits
  // for every rank.
  void stop_at(int64_t step, const StepOutcome& s);

  // ---- One step (trainer_step.cpp), in the order it runs ----
  // Everything up to the update, on the device: no value comes to the host.
  PendingStep train_step(int64_t step);
  // The pending steps' outcomes, read in one device-to-host copy.
  std::vector<StepOutcome> flush();
  // Whether the steps so far are read now: at logging, evaluation,
  // checkpoint and stop points, and each step where the host needs the
  // step's routing (schedule.relu_l1_mult).
  bool flush_due(int64_t step, bool stop) const;
  // A read step's consequences on the host: the bad-step count (aborts
  // after train.max_bad_steps), the adaptive relu L1.
  void note_outcome(const StepOutcome& s);
  // Sets each parameter group's learning rate for `step`; the first's.
  double set_learning_rate(int64_t step);
  // The micro-batch loop: gradients of the mean loss accumulate; losses
  // and routing sums stay on the device until the step's one host copy.
  MicroBatchSums forward_backward(int64_t step);
  // Adds one micro-batch's routing statistics to `sums` (one row per MoE
  // layer, see routing_stats).
  static void add_routing_sums(
      const TransformerOutput& out, std::vector<at::Tensor>& sums);
  // A stop request (max over every process, on the host) into `out`.
  void reduce_stop(PendingStep& out);
  // [loss, ce, aux, kl] per micro-batch, mean over the data-parallel ranks
  // (on the device).
  at::Tensor mean_losses(const at::Tensor& sums);
  // The micro-batches' routing rows summed over the data-parallel ranks
  // (on the device), float64.
  at::Tensor summed_routing(const std::vector<at::Tensor>& rows);
  // Gradients over the ranks, per-expert clipping, fp32 masters' gradients.
  void reduce_gradients();
  // The optimizer group of the routing critics (the last).
  size_t critic_group() const {
    return 3 + cfg_.optim.groups.size();
  }
  // The norm of each piece of the buckets' gradients that this rank counts
  // (on the device) and each piece's kind (replicated, expert, TP).
  struct NormPieces {
    at::Tensor values;
    std::vector<int> kind;
  };
  NormPieces grad_norm_pieces() const;
  // The global gradient norm over every rank, from the pieces' norms (a
  // float64 scalar on the device).
  at::Tensor global_grad_norm(const NormPieces& pieces);
  // The step's tensors in one device-to-host copy (as double, their shapes
  // kept).
  static std::vector<at::Tensor> one_host_copy(
      const std::vector<at::Tensor>& parts);
  // Whether this step must be skipped, as the code of PendingStep::values
  // (on the device).
  at::Tensor skip_code(
      const at::Tensor& loss, const at::Tensor& grad_norm) const;
  // Counts and logs a skipped step; aborts after train.max_bad_steps.
  void note_skipped(const StepOutcome& out);
  // An applied step's loss joins the spike guard's window (on the device).
  void note_loss(const at::Tensor& loss, const at::Tensor& applied);
  // The spike guard's window holding `losses` (the last of them), and the
  // accepted losses it holds, oldest first.
  void reset_spike_window(const std::vector<double>& losses);
  std::vector<double> spike_window() const;
  // ---- The sharded optimizer (trainer_shard.cpp) ----
  // buckets_ from params_ and param_group_ (`n_groups` optimizer groups),
  // with this rank's masters when the optimizer is sharded.
  void build_buckets(size_t n_groups);
  // The bucket's gradients in its float32 buffer (a missing gradient counts
  // as zero); `release` drops each parameter's gradient once copied.
  at::Tensor bucket_gradients(const ShardBucket& b, bool release);
  // Sums over TP the TP-partial gradients (replicated parameters used inside
  // the TP-split computation) in `grad`, the bucket's buffer window that
  // starts at element `first`.
  void sum_tp_partial(const ShardBucket& b, at::Tensor& grad, int64_t first);
  // Each bucket's gradient shard: reduced (optim.shard: optimizer) or
  // reduce-scattered (optimizer+grads) over its group, TP-partial
  // gradients summed over TP, divided by the replicas; the parameters'
  // full gradients are released.
  void reduce_sharded_gradients();
  // Per-expert clipping (optim.expert_grad_clip) of the expert shards.
  void clip_sharded_experts();
  // Every bucket's updated shard, gathered into the model's parameters.
  void gather_sharded_params();
  // The unsharded optimizer's state in a checkpoint, by parameter name,
  // and back.
  void save_optimizer_state(
      io::TensorMap& t, std::map<std::string, std::string>& meta) const;
  void load_unsharded_state(const io::CheckpointReader& reader);
  // This rank's optimizer state in a checkpoint: each parameter's part
  // of the shard under the parameter's name (flat pieces, any layout
  // loads them).
  void save_sharded_state(
      io::TensorMap& t, std::map<std::string, std::string>& meta) const;
  // The shards from a checkpoint's optimizer files (one parameter's piece
  // at a time).
  void load_sharded_state(const io::CheckpointReader& reader);

  // Clipping to optim.grad_clip and AdamW, both skipped where `skip` (a
  // device flag) is 1; fp32 masters back into the model.
  void optimizer_step(const at::Tensor& grad_norm, const at::Tensor& skip);
  // Aux-loss-free balancing from the step's global expert loads (the
  // summed routing rows), where `applied` (a device flag) is 1.
  void update_selection_bias(
      const at::Tensor& routing, const at::Tensor& applied);
  // Adaptive L1 of relu routing (schedule.relu_l1_mult): the step's real
  // experts per token (records of routing_stats) move relu_l1_coeff_.
  void update_relu_l1(const nlohmann::json& moe_layers);

  // Chooses the checkpoint to start from (or none), checks that it fits
  // this config and data, loads the model and optimizer; the first step.
  int64_t start(const RunOptions& options);
  // The model's weights on this rank: from the checkpoint `from` (reading
  // only this rank's pieces), else init_from's Hugging Face checkpoint,
  // else the init (train.seed); this rank's pieces only, on device_.
  void load_weights(const fs::path& from);
  // What this rank holds after loading, and its resident memory.
  void log_memory() const;
  // Where parameter `name` of this rank sits in the full tensor.
  parallel::Piece piece(const std::string& name) const {
    return piece_in(*model_, name);
  }
  // The same for a parameter of model `m` (the student or the teacher).
  parallel::Piece piece_in(
      const TransformerImpl& m, const std::string& name) const;
  // ---- Distillation (trainer_distill.cpp) ----
  // teacher_: distill.teacher's model, this rank's pieces, frozen.
  void load_teacher();
  // A fresh student's weights from the teacher's (distill.init_student).
  void init_student_from_teacher();
  // The micro-batch's objective: its loss, or with distillation
  // distill.ce_coeff x CE + aux + distill.kl_coeff x KL(teacher || student)
  // (the KL, mean over positions, into `kl`; 0 without a teacher).
  at::Tensor objective(
      const at::Tensor& tokens, const LossOutput& r, at::Tensor& kl);
  // Errors naming every field that defines the model or routing and
  // differs from the checkpoint's; the data fingerprint likewise.
  void check_resume_compatible(const json& manifest, const fs::path& from);
  // Drops metrics records past `step` (their steps will be run again).
  void truncate_metrics(int64_t step) const;
  // Per MoE layer, the routing statistics of the whole step (every
  // micro-batch on every data-parallel rank) from its summed rows, on the
  // host.
  nlohmann::json routing_records(const at::Tensor& rows) const;
  // rank 0: the manifest fields that describe the run, not the files.
  json manifest_state(int64_t step) const;
  // Every file's vocabulary (raw files do not say) fits the model's.
  void check_vocabulary(const io::TokenCorpus& c, const char* field) {
    for (const auto& s : c.files()) {
      TORCH_CHECK(
          s->vocab_size() <= cfg_.model.vocab_size,
          "config: ",
          field,
          " (",
          s->path(),
          ") was made for a vocabulary of ",
          s->vocab_size(),
          " tokens but model.vocab_size is ",
          cfg_.model.vocab_size);
    }
  }

  // The tokenizer the data was made with: tokenizer.json beside the train
  // shard (scripts/prepare_data.py puts it there), else init_from's; "" for
  // byte-level data.
  std::string tokenizer_path() const {
    auto data_dir = fs::path(train_->files().front()->path()).parent_path();
    if (fs::exists((data_dir.empty() ? "." : data_dir) / "tokenizer.json")) {
      return ((data_dir.empty() ? "." : data_dir) / "tokenizer.json").string();
    }
    if (!cfg_.init_from.empty() &&
        fs::exists(fs::path(cfg_.init_from) / "tokenizer.json")) {
      return (fs::path(cfg_.init_from) / "tokenizer.json").string();
    }
    return "";
  }

  // ---- The parallel layout (trainer_parallel.cpp) ----
  // Builds layout_ from the config and the launch and connects its groups
  // (a multi-process GPU run: device_ becomes cuda:LOCAL_RANK).
  void setup_parallel();
  bool distributed() const {
    return layout_.distributed();
  }
  // How `name` (a parameter of model `m`: the student or the teacher) is
  // spread over the ranks.
  parallel::Placement placement_in(
      const TransformerImpl& m, const std::string& name) const {
    if (layout_.tp > 1 && m.tp_split(name).sharded()) {
      return parallel::Placement::kTensorParallel;
    }
    if (layout_.ep > 1 && is_expert_parameter(name)) {
      return parallel::Placement::kExpert;
    }
    return parallel::Placement::kReplicated;
  }
  parallel::Placement placement(const std::string& name) const {
    return placement_in(*model_, name);
  }
  bool is_expert(const std::string& name) const {
    return placement(name) == parallel::Placement::kExpert;
  }
  // Mean over the data-parallel ranks (identity in one process).
  double dp_mean(double v) const;
  // Averages the gradients of params_ over the data-parallel ranks (expert
  // slices over the expert-data-parallel ranks), bucket by bucket.
  void all_reduce_grads();
  int64_t load_optimizer_state(const std::string& dir);
  void build_optimizer();
  // This rank's rows of micro-batch `micro` of `step` (random windows), or
  // of evaluation batch `micro` (evenly spaced windows), and their loss
  // masks (undefined when the data has none).
  struct Batch {
    at::Tensor tokens, loss_mask;
  };
  Batch batch(
      const io::TokenCorpus& s, int64_t step, int64_t micro, bool random);
  // Mean validation loss over the data-parallel ranks; with `predictions`,
  // each MoE layer's critic predictions on every validation token; the mean
  // real experts per token into `experts_per_token`.
  double evaluate(
      std::vector<at::Tensor>* predictions, double* experts_per_token);
  // ---- The routing critic (trainer_critic.cpp) ----
  std::vector<MoELayerImpl*> moe_layers() const;
  bool critic_due(int64_t step) const;
  // [B, S - 1] cross-entropy of each position's next token.
  at::Tensor per_token_ce(const at::Tensor& tokens);
  // Measures the critic's targets on `step`'s first micro-batch and adds
  // the critic's gradients; its error per MoE layer.
  json train_critic(int64_t step);
  // Sets each layer's threshold to critic.skip_budget's quantile of its
  // predictions over the data-parallel ranks; the thresholds.
  json calibrate_critic(const std::vector<at::Tensor>& predictions);
  void save(int64_t step);
  // Rank 0: manifest (SHA-256 of every file), rename, `latest`, pruning.
  void commit(int64_t step, const fs::path& tmp, const fs::path& final_dir);
  // The piece metadata this rank writes with `name` ("" for whole
  // tensors).
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
  // distill.teacher's model (null without distillation, or once it has
  // initialized the student when distill.kl_coeff is 0), and its directory.
  Transformer teacher_{nullptr};
  std::string teacher_dir_;
  std::string teacher_of_start_; // the resumed checkpoint's teacher ("": none)
  std::unique_ptr<EventWriter> tensorboard_; // rank 0 with log.tensorboard
  std::unique_ptr<WandbFeed> wandb_; // rank 0 with log.wandb
  double total_params_ = 0, flops_per_token_ = 0;
  RunOptions options_;
  std::string run_id_; // the run the checkpoints of this run belong to
  bool discard_others_ = false; // --overwrite, until the first commit
  json data_fingerprint_; // data.train and data.valid
  // The spike guard's window: the last train.spike_window accepted losses,
  // oldest first, NaN where none yet (float64, on the device).
  at::Tensor recent_losses_;
  int64_t bad_in_row_ = 0; // consecutive skipped steps
  std::vector<PendingStep> pending_; // run, not yet read (flush)
  int64_t host_reads_ = 0; // flushes so far
  // The gradient norm pieces' kinds, on the device and as last built.
  at::Tensor norm_kinds_;
  std::vector<int> norm_kinds_host_;
  // relu routing's switch_coeff under schedule.relu_l1_mult (checkpointed).
  double relu_l1_coeff_ = 0.0;
  std::unique_ptr<io::TokenCorpus> train_, valid_;
  std::unique_ptr<AdamW> opt_;
  std::vector<double> base_lr_; // per parameter group
  std::vector<std::string> names_; // parameter names in optimizer order
  std::vector<at::Tensor> params_,
      masters_; // masters: fp32 copies of non-fp32 params
  std::string metrics_path_;
  std::vector<std::string> param_names_; // parallel to params_
  std::vector<bool> opt_is_master_; // parallel to names_
  std::vector<size_t> param_group_; // optimizer group, parallel to params_
  std::vector<ShardBucket> buckets_; // the gradient reduction's layout
  c10::Device device_{c10::kCPU};
  parallel::Layout layout_;
  // layout_'s groups (null when absent): every process; data, expert,
  // expert-data and tensor parallel.
  const parallel::Group *world_ = nullptr, *dp_ = nullptr, *ep_ = nullptr,
                        *edp_ = nullptr, *tp_ = nullptr;
};

} // namespace moeyard::train::detail
