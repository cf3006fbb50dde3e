#pragma once
// The training loop: data, AdamW with parameter groups, LR and MoE schedules,
// gradient accumulation and clipping, non-finite step skipping, metrics,
// validation and checkpoints. docs/training.md describes every part.

#include <string>

#include "model/transformer.h"
#include "train/train_config.h"

namespace moeyard::train {

struct RunResult {
  int64_t steps_done = 0;
  double final_loss = 0.0;
  double final_valid_loss = 0.0;
  int64_t skipped_steps = 0;
  bool interrupted = false;
  // Device-to-host reads of the steps' numbers: one per logging interval
  // (and at evaluation, checkpoint and stop points).
  int64_t host_reads = 0;
};

// How a run treats the checkpoints already in checkpoint.dir
// (docs/training.md, "Resuming").
struct RunOptions {
  // "auto": continue from <dir>/latest (or the newest checkpoint that
  // verifies when `latest` is unusable); "never": a new run; or a
  // checkpoint directory to continue from.
  std::string resume = "auto";
  // Allow a run to start in a directory holding checkpoints newer than its
  // starting point (another run's, or the future of an older step): they
  // are deleted once this run commits its first checkpoint.
  bool overwrite = false;
  // Resume although the training data or its sampling (data.train,
  // data.seed, data.seq_len) differs from the checkpoint's.
  bool allow_data_change = false;
};

// Runs training; a requested stop (SIGINT/SIGTERM) saves, verifies the
// checkpoint and returns with `interrupted` set.
RunResult run_training(
    const TrainConfig& config, const RunOptions& options = {});

// The model of a checkpoint directory (config from its manifest, weights
// verified against their SHA-256). Used by `moeyard generate`.
Transformer load_model(const std::string& checkpoint_dir);

} // namespace moeyard::train
