#pragma once
// The per-layer routing metrics of a training step, from the rows of the
// MoE layer's tables (model/moe_interface.h): every aux loss and statistic
// is summed over micro-batches and data-parallel ranks exactly, then
// reported per layer in metrics.jsonl.

#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>

#include "model/moe_forward.h"

namespace moeyard::train {

// One MoE layer's sums of one micro-batch, float64: [each `sum` statistic
// (its length), importance (E + Z), real tokens n, then n times each aux
// loss and each `mean` statistic in table order]. Rows of micro-batches and
// ranks add up.
at::Tensor routing_sums(const MoEOutput& m);

// The metrics of one layer from its summed row (on the CPU): tokens,
// token-weighted means of the aux losses and statistics (the switch loss
// of the whole step from its counts, unless per sequence), the `sum`
// statistics, dead_experts, max_violation (the most loaded real expert's
// load over the mean, less 1) and the options that scheduling changes.
nlohmann::json routing_record(
    const at::Tensor& row,
    int64_t layer,
    const MoEOptions& o,
    int64_t num_experts);

// Real experts per token averaged over the MoE layers of a step's records.
double mean_real_experts_per_token(const nlohmann::json& moe_layers);

} // namespace moeyard::train
