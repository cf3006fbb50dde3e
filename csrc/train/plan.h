#pragma once
// The memory planner (`moeyard plan`, docs/scaling.md): what each rank of a
// launch holds and sends, from the config alone. The model is built with
// shapes only (nothing allocated); each rank's share follows the parallel
// layout's placement rules, the optimizer's sharding and the recompute
// mode, as the trainer applies them.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "train/train_config.h"

namespace moeyard::train {

// Bytes of one rank (or of several ranks with the same figures).
struct RankPlan {
  std::vector<int64_t> ranks;
  int64_t params = 0; // this rank's pieces, in their dtypes
  int64_t grads = 0; // trainable pieces' gradients, in the parameters' dtypes
  int64_t optimizer = 0; // fp32 masters and AdamW moments (its shard)
  int64_t grad_buffer = 0; // the float32 reduction buffer (transient)
  // Tensors saved for backward per micro-batch, by train.recompute mode
  // (every block), and "configured" (the config's mode and layers).
  std::map<std::string, int64_t> activations;
  int64_t logits = 0; // the loss's float32 logits and their gradient
  // distill.teacher: its pieces, its logits and the KL's saved gradient.
  int64_t teacher = 0;
  int64_t load_peak = 0; // the load's peak host memory (resume)
  int64_t hf_load_peak = 0; // ... when model.init_from is read
  // Bytes this rank sends per optimizer step.
  int64_t sent_all_to_all = 0; // expert dispatch and combine
  int64_t sent_grad_reduce = 0; // all-reduce / reduce-scatter
  int64_t sent_param_gather = 0; // sharded optimizer's all-gather
  int64_t sent_tp = 0; // tensor-parallel all-reduces
  // The training step's peak: parameters, gradients, optimizer state,
  // one micro-batch's activations in the configured recompute mode, the
  // logits, the reduction buffer and a teacher.
  int64_t step_peak(const std::string& recompute) const;
};

struct Plan {
  int64_t world = 1;
  std::string layout; // "TP2 x EP2 x EDP1 (DP 2)"
  int64_t total_params = 0, trainable_params = 0;
  std::vector<RankPlan> ranks; // one entry per group of equal ranks
};

// The plan of `cfg` launched as `world` processes. Errors as the trainer's
// (layout, config).
Plan make_plan(const TrainConfig& cfg, int64_t world);

// A table per rank group, for the terminal.
std::string format_plan(const Plan& plan, const TrainConfig& cfg);
// The same as JSON (bytes; step_peak with the configured recompute).
std::string plan_json(const Plan& plan);

} // namespace moeyard::train
