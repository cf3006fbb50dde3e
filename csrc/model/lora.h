#pragma once
// LoRA fine-tuning of the C++ model: low-rank factors beside frozen base
// weights, y = base(x) + (alpha / rank) * B A dropout(x), on the attention
// projections, the dense MLPs and every routed expert (per-expert A_e, B_e
// run as two grouped GEMMs over the expert-contiguous rows). Parameter names:
// <linear>.lora_a [r, in], <linear>.lora_b [out, r] (e.g.
// layers.0.attn.q_proj.lora_a), layers.{i}.moe.lora_{gate_up,down}_{a,b}
// [E, r, in] / [E, out, r]. docs/training.md describes the config.

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

namespace moeyard {

class TransformerImpl;

struct LoraOptions {
  bool enabled = false; // finetune.lora given
  int64_t rank = 8; // r of every factor pair
  double alpha = 16.0; // the update is scaled by alpha / rank
  double dropout = 0.0; // on the factors' input, in training only
  // What gets factors: "attention", "mlp", "experts", or one attention
  // projection by name (lora_target_names()).
  std::vector<std::string> targets = {"attention", "mlp", "experts"};
  // Storage of the frozen weights that carry factors: "model" (the model's
  // dtype) or a dtype name; they are cast to the compute dtype when used.
  std::string base_dtype = "model";

  double scale() const {
    return alpha / static_cast<double>(rank);
  }
};

// The names finetune.lora.targets accepts, groups first.
const std::vector<std::string>& lora_target_names();

// Whether `name` is a LoRA factor ("layers.0.attn.q_proj.lora_a").
bool is_lora_parameter(const std::string& name);

// Adds the factors to the targeted layers and freezes every other parameter
// (requires_grad false). Errors name the target that is unknown or matches
// no layer of the model. Returns the number of LoRA parameters (elements).
int64_t apply_lora(TransformerImpl& model, const LoraOptions& o);

// The weights LoRA changes, merged: (base parameter name, base + scale * B
// A) in the model's dtype, computed in float32 (float64 stays).
std::vector<std::pair<std::string, at::Tensor>> lora_merged_weights(
    const TransformerImpl& model);

} // namespace moeyard
