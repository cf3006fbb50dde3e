#pragma once
// The one implementation of an MoE layer's math: router (fp32), noise, top-k
// or expert choice, plan, permute, experts, unpermute, shared experts, aux
// losses and routing statistics. The C++ model calls moe_forward directly;
// Python's moeyard.nn.MoE reaches it through the CompositeImplicitAutograd op
// torch.ops.moeyard.moe_forward, so there is no second implementation.

#include <ATen/core/Tensor.h>

#include <string>

#include "model/moe_interface.h"

namespace moeyard {
namespace parallel {
struct Group;
}

// The routing options (moe_interface.h's MOEYARD_MOE_OPTIONS), the aux-loss
// coefficients (read by the model's loss, not by moe_forward) and two
// settings of the call itself.
struct MoEOptions {
#define MOEYARD_DECLARE(type, name, def, allowed, doc) type name = def;
  MOEYARD_MOE_OPTIONS(MOEYARD_DECLARE)
#undef MOEYARD_DECLARE
#define MOEYARD_DECLARE(loss, coeff, def, doc) double coeff = def;
  MOEYARD_MOE_AUX_LOSSES(MOEYARD_DECLARE)
#undef MOEYARD_DECLARE
  bool training = false; // noise and dropout apply in training only
  // Expert parallelism: this rank holds experts [rank * E / ep, (rank + 1)
  // * E / ep) of the group's ep ranks (w_gate_up/w_down/b_* are those
  // slices) and rows travel by all-to-all (csrc/parallel/expert_dispatch.h).
  // Not owned; null: every expert is local.
  const parallel::Group* expert_group = nullptr;
};

// MOEYARD_MOE_WEIGHTS; optional tensors may be undefined.
struct MoEWeights {
#define MOEYARD_DECLARE(name, required, doc) at::Tensor name;
  MOEYARD_MOE_WEIGHTS(MOEYARD_DECLARE)
#undef MOEYARD_DECLARE
  // LoRA of the experts (C++ model only, not in the op's schema; shapes in
  // MoELayerImpl::add_lora): expert e computes with w_gate_up[e] +
  // lora_scale * lora_gate_up_b[e] lora_gate_up_a[e], likewise w_down, with
  // lora_dropout on the factors' input in training. Undefined: no LoRA.
  at::Tensor lora_gate_up_a, lora_gate_up_b, lora_down_a, lora_down_b;
  double lora_scale = 0.0, lora_dropout = 0.0;
};

// The op's outputs: y, the aux losses, the statistics and indices.
struct MoEOutput {
  at::Tensor y; // shape of x
#define MOEYARD_DECLARE(name, ...) at::Tensor name;
  MOEYARD_MOE_AUX_LOSSES(MOEYARD_DECLARE)
  MOEYARD_MOE_STATISTICS(MOEYARD_DECLARE)
#undef MOEYARD_DECLARE
  at::Tensor indices; // token choice: [T, K] (-1 padding, >= E a null
                      // expert); EC: [E, C]
  // The sums behind the statistics, so that callers can combine them over
  // micro-batches and ranks exactly (C++ only, not in the op's outputs).
  at::Tensor importance; // [E + Z] float32: routing probabilities summed
                         // over the real tokens (P_e of the switch loss x
                         // tokens)
  at::Tensor valid_tokens; // scalar float32: real (unmasked) tokens
};

// Errors unless every option is in its table range or list.
void check_moe_option_values(const MoEOptions& o, const std::string& who);

// Errors unless every option is in its table range or list and top_k,
// num_groups and topk_groups fit `num_experts`; messages start with `who`.
void check_moe_options(
    const MoEOptions& o, int64_t num_experts, const std::string& who);

// The switch load-balance loss over the last dim of f (the fraction of the
// T * K picks each expert got) and p (its mean routing probability), both
// [..., E + Z] with the null experts last: E * sum f p without null
// experts; with them, `o.null_balance` says how they count (moe_interface.h).
at::Tensor switch_loss_of(
    const at::Tensor& f, const at::Tensor& p, const MoEOptions& o);

// x [..., H]; mask (optional) [...] of x's leading shape, nonzero = real
// token; token_ids (optional, needed by hash routing) [...] likewise;
// drop_lowest (optional, bool) [...]: tokens whose lowest-weight real pick
// is skipped (token choice; a token's only real pick stays). Errors name
// the field and value.
MoEOutput moe_forward(
    const at::Tensor& x,
    const MoEWeights& weights,
    const MoEOptions& options,
    const at::Tensor& mask = {},
    const at::Tensor& token_ids = {},
    const at::Tensor& drop_lowest = {});

} // namespace moeyard
