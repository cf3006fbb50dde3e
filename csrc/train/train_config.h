#pragma once
// The trainer's configuration: one YAML file onto typed sections. Every field
// has a default, a one-line doc and, if a number, a valid range
// (docs/training.md lists them; train_config.cpp declares each range once,
// where the field is read); unknown keys, wrong types, values outside their
// range and inconsistent values are errors naming the key path and where
// the value was given (file:line, or the `--set` argument).

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <yaml-cpp/yaml.h>
#include <nlohmann/json.hpp>

#include "io/token_corpus.h"
#include "model/config.h"
#include "model/lora.h"
#include "parallel/layout.h"
#include "train/schedule.h"

namespace moeyard::config {
struct Sources;
}

namespace moeyard::train {

struct DataConfig {
  // Token files: a path or glob, a list of them, or a list of {path,
  // weight} (a mixture).
  std::vector<io::CorpusSource> train = {{"data/builtin/train.bin", 0}};
  std::string valid = "data/builtin/valid.bin"; // path or glob ("" : none)
  // Files without moeyard's header are raw token arrays of this type:
  // uint16 | uint32 ("" : such files are an error).
  std::string raw_dtype = "";
  uint32_t raw_width() const {
    return raw_dtype == "uint16" ? 2 : raw_dtype == "uint32" ? 4 : 0;
  }
  int64_t seq_len = 128;
  int64_t seed = 1234;
};

// Gradient buckets (reduced together; the sharded optimizer's flat pieces)
// hold at most this many elements (or one larger tensor): the reduction
// buffer and the sharded optimizer's AdamW temporaries are bounded by it.
inline constexpr int64_t kShardBucketElements = int64_t(1) << 26;

struct OptimConfig {
  double lr = 3e-3;
  double min_lr_ratio = 0.1; // cosine/linear decay to lr * ratio
  std::string lr_schedule = "cosine"; // cosine | linear | constant | wsd
  int64_t warmup = 20;
  double wsd_decay_fraction = 0.2; // WSD: last fraction of steps decays
  double weight_decay = 0.1; // not applied to norms, biases, embeddings
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double router_lr_mult = 1.0;
  double grad_clip = 1.0; // global norm (0: off)
  double expert_grad_clip = 0.0; // per-expert norm of its weights (0: off)
  // Per-parameter-group overrides: the first group whose pattern occurs in
  // a parameter's name sets its lr multiplier and weight decay.
  struct Group {
    std::string pattern;
    double lr_mult = 1.0;
    double weight_decay = 0.0;
  };
  std::vector<Group> groups;
  // Parameters whose name contains one of these substrings are frozen
  // (no gradient, not in the optimizer), e.g. ".router.", ".moe.w_".
  std::vector<std::string> freeze;
  // Sharding over the data-parallel ranks (ZeRO): none | optimizer (fp32
  // masters and AdamW moments split) | optimizer+grads (gradients
  // reduce-scattered too).
  std::string shard = "none";
  bool sharded() const {
    return shard != "none";
  }

  // The lr factor over the run (warmup, then lr_schedule from 1 to
  // min_lr_ratio); the lr of a group is lr * its multiplier * this factor.
  Schedule lr_factor() const;
};

struct TrainSection {
  int64_t steps = 200;
  int64_t micro_batch = 8;
  int64_t grad_accum = 1;
  int64_t seed = 0;
  int64_t threads = 0; // 0: PyTorch default
  int64_t eval_every = 50; // 0: never
  int64_t eval_batches = 4;
  int64_t max_bad_steps = 5; // consecutive skipped steps before abort
  // Loss-spike guard: skip a step whose loss exceeds spike_factor times the
  // median of the last spike_window accepted losses (0: off).
  double spike_factor = 0.0;
  int64_t spike_window = 50;
  std::string device = "cpu"; // cpu | cuda | cuda:N
  // Activation recompute (model/recompute.h): none | moe | attention | full,
  // in the blocks recompute_layers lists (empty: every block).
  std::string recompute = "none";
  std::vector<int64_t> recompute_layers;
};

struct CheckpointConfig {
  std::string dir = "runs/tiny";
  int64_t every = 100; // 0: only the final save
  int64_t keep_last = 2;
  // How long the ranks of a multi-process run wait for each other while a
  // checkpoint is written (the collectives' parallel.timeout_s is shorter).
  double timeout_s = 3600;
};

struct LogConfig {
  int64_t every = 10;
  std::string metrics = ""; // JSONL file ("" : <checkpoint.dir>/metrics.jsonl)
  std::string tensorboard = ""; // TensorBoard event files' directory ("": off)
  std::string wandb = ""; // Weights & Biases project ("": off)
  std::string wandb_mode =
      "online"; // online | offline (wandb sync uploads later)
  // The device's peak TFLOP/s for the progress line's MFU (0: not shown).
  double peak_tflops = 0.0;
};

struct ParallelConfig {
  // Data-parallel replicas; 0: every process (WORLD_SIZE / tensor_parallel).
  int64_t data_parallel = 0;
  int64_t tensor_parallel = 1; // heads, dense MLP, vocabulary split
  int64_t expert_parallel = 1; // experts split inside each DP group
  double timeout_s = 300; // rendezvous and collective timeout
};

struct MoESchedules {
  // schedule.<option>: a Schedule for any numeric routing option or aux-loss
  // coefficient (moe_interface.h), by name. Absent or null: off (the moe:
  // value stays). Values must lie in the option's range (top_k: [1,
  // moe.num_experts]; integer options take the rounded value).
  std::map<std::string, Schedule> options;
  double bias_update_rate = 0.0; // aux-loss-free selection bias update
  // Null-fraction controller (moe.null_experts): after each step the null
  // experts' selection bias moves by rate * sign(target - null share).
  double null_bias_rate = 0.0; // 0: off
  double null_target_fraction = 0.5;
  // Adaptive L1 of `relu` routing (ReMoE): after each step moe.switch_coeff
  // is multiplied by this to the power sign(real experts per token -
  // moe.top_k), averaged over the MoE layers. 0: off (ReMoE uses 1.2).
  double relu_l1_mult = 0.0;
};

// The routing critic (moe.critic_hidden > 0): how it is trained and used.
struct CriticConfig {
  // Steps between target measurements (one forward per MoE layer with that
  // layer's lowest picks skipped, on the step's first micro-batch); 0: the
  // critic is not trained.
  int64_t every = 10;
  double clip = 1.0; // targets (loss increases, nats) clipped to +-clip
  // Share of real tokens whose lowest pick the critic skips at evaluation:
  // per layer the threshold is the budget's quantile of the predictions on
  // the validation batches, recalibrated at each evaluation. 0: off.
  double skip_budget = 0.0;
  bool skip_in_training = false; // the thresholds act in training too
};

// Distillation from a frozen teacher (docs/training.md, "Distillation"),
// e.g. to teach a model with null experts added to skip compute.
struct DistillConfig {
  // A moeyard checkpoint (a step directory, or a run directory: its
  // latest) or a Hugging Face checkpoint directory; "": off.
  std::string teacher;
  double kl_coeff = 1.0; // weight of KL(teacher || student) per token
  double ce_coeff = 0.0; // weight of the data's cross-entropy beside it
  // A fresh run's weights are the teacher's (with model.init_from, that
  // only defines the architecture); router rows of null experts the
  // teacher lacks copy its real rows.
  bool init_student = true;
  // Added to those null experts' logits (their router bias, else their
  // selection bias) so that each starts below the real expert it copies.
  double null_logit_offset = -0.5;
  bool enabled() const {
    return !teacher.empty();
  }
};

struct TrainConfig {
  ModelConfig model;
  DataConfig data;
  OptimConfig optim;
  TrainSection train;
  CheckpointConfig checkpoint;
  LogConfig log;
  MoESchedules schedule;
  ParallelConfig parallel;
  CriticConfig critic;
  DistillConfig distill;
  LoraOptions lora; // finetune.lora: LoRA fine-tuning (off when absent)
  std::string text; // the config as given, as YAML (saved with checkpoints)
  // Every key with its resolved value ("moe.score_fn" -> "softmax"),
  // defaults included: what resume compares (docs/training.md).
  std::map<std::string, std::string> resolved;
  // model.init_from: a Hugging Face checkpoint directory whose config.json
  // defines the model and whose weights initialize it (fine-tuning).
  std::string init_from;
  nlohmann::json hf_config; // that config.json (null without init_from)

  // The sizes the parallel layout is built from (parallel.*,
  // moe.num_experts).
  parallel::LayoutSizes layout_sizes() const;

  // overrides: "a.b=value" applied before parsing (errors about them cite
  // the argument: "optim.lr (--set optim.lr=inf)").
  static TrainConfig load(
      const std::string& file, const std::vector<std::string>& overrides = {});
  // From YAML text (e.g. the config saved in a checkpoint manifest).
  // hf_config: the init_from config.json saved with that checkpoint (null:
  // read it from model.init_from).
  static TrainConfig from_text(
      const std::string& text, const nlohmann::json& hf_config = nullptr);

 private:
  static TrainConfig parse(
      YAML::Node root,
      std::shared_ptr<const config::Sources> sources,
      const nlohmann::json& hf);
};

// distill.teacher's checkpoint: where its weights are and the model they
// fit. `path` is a moeyard step directory (manifest.json; `verify`: every
// file's SHA-256 checked), a run directory (the checkpoint its `latest`
// names) or a Hugging Face checkpoint directory (config.json). Errors name
// distill.teacher and the path.
struct TeacherSource {
  std::string dir; // the checkpoint directory
  TrainConfig config; // a moeyard checkpoint's; for HF its model only
  nlohmann::json hf; // a Hugging Face checkpoint's config.json, else null
};
TeacherSource find_teacher(const std::string& path, bool verify);

} // namespace moeyard::train
