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
};

// Runs training. resume: "auto" (continue from <dir>/latest if present),
// "never", or a checkpoint directory.
RunResult run_training(
    const TrainConfig& config, const std::string& resume = "auto");

// The model of a checkpoint directory (config from its manifest, weights
// verified against their SHA-256). Used by `moeyard generate`.
Transformer load_model(const std::string& checkpoint_dir);

} // namespace moeyard::train
