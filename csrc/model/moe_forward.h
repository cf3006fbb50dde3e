#pragma once
// The one implementation of an MoE layer's math: router (fp32), noise, top-k
// or expert choice, plan, permute, experts, unpermute, shared experts, aux
// losses and routing statistics. The C++ model calls moe_forward directly;
// Python's moeyard.nn.MoE reaches it through the CompositeImplicitAutograd op
// torch.ops.moeyard.moe_forward, so there is no second implementation.

#include <ATen/core/Tensor.h>

#include <string>

namespace moeyard {
namespace parallel {
struct Group;
}

struct MoEOptions {
  int64_t top_k = 2;
  std::string score_fn = "softmax"; // "softmax" | "sigmoid"
  bool renormalize = true; // divide the k weights by their sum
  double scale = 1.0; // routed scaling factor
  int64_t num_groups = 1; // group-limited top-k (DeepSeek-V3)
  int64_t topk_groups = 1;
  std::string routing = "token_choice"; // "token_choice" | "expert_choice"
  bool weight_on_input = false; // Llama-4: weight scales the expert input
  double capacity_factor = 0.0; // <= 0: dropless (token choice)
  int64_t min_capacity = 1;
  std::string drop_policy = "position"; // "position" | "probs"
  std::string noise = "none"; // "none" | "noisy_topk" | "gumbel" | "jitter"
  double noise_eps = 1e-2; // jitter: router input * U(1 - eps, 1 + eps)
  double temperature = 1.0; // gumbel: (logits + G) / temperature
  double expert_dropout = 0.0; // dropout on expert activations (training)
  // Routed experts' activation on [gate | up]: "swiglu" silu(g) * u, or
  // "clamped_swiglu" (GPT-OSS): g = min(g, limit), u = clamp(u, +-limit),
  // (u + 1) * g * sigmoid(alpha * g).
  std::string activation = "swiglu";
  double swiglu_alpha = 1.702;
  double swiglu_limit = 7.0;
  // > 0: the switch loss is computed per sequence of this many tokens
  // (x's tokens in order) and averaged; 0: over the whole micro-batch.
  int64_t sequence_length = 0;
  bool training = false; // noise and dropout apply in training only
  // Expert parallelism: this rank holds experts [rank * E / ep, (rank + 1)
  // * E / ep) of the group's ep ranks (w_gate_up/w_down/b_* are those
  // slices) and rows travel by all-to-all (csrc/parallel/expert_dispatch.h).
  // Not owned; null: every expert is local.
  const parallel::Group* expert_group = nullptr;
};

// Expert weights are [E, 2F, H] (gate rows, then up rows) and [E, H, F].
// Optional tensors may be undefined.
struct MoEWeights {
  at::Tensor router_weight; // [E, H] float32
  at::Tensor router_bias; // [E] float32 (GPT-OSS)
  at::Tensor w_gate_up; // [E, 2F, H]
  at::Tensor w_down; // [E, H, F]
  at::Tensor shared_gate_up; // [2Fs, H]
  at::Tensor shared_down; // [H, Fs]
  at::Tensor shared_gate; // [1, H]: sigmoid gate on the shared output
  at::Tensor selection_bias; // [E] float32, selection only
  at::Tensor noise_weight; // [E, H] float32, noisy top-k noise scale
  at::Tensor b_gate_up; // [E, 2F]: added to each expert's gate_up output
  at::Tensor b_down; // [E, H]: added to each expert's down output
};

struct MoEOutput {
  at::Tensor y; // shape of x
  // Aux losses, float32 scalars, padding tokens excluded.
  at::Tensor switch_loss; // E * sum_e f_e * P_e
  at::Tensor importance_loss; // CV^2 of per-expert summed probabilities
  at::Tensor load_loss; // CV^2 of per-expert assignment counts
  at::Tensor z_loss; // mean_t logsumexp(logits_t)^2
  // Routing statistics.
  at::Tensor tokens_per_expert; // [E] float32, assignments before drops
  at::Tensor dropped_fraction; // scalar: dropped / valid assignments
  at::Tensor router_entropy; // scalar: mean entropy of routing probs
  at::Tensor capacity_utilization; // scalar: filled / allocated expert rows
  // The sums behind the statistics, so that callers can combine them over
  // micro-batches and ranks exactly (C++ only, not in the op's outputs).
  at::Tensor importance; // [E] float32: routing probabilities summed over
                         // the real tokens (P_e of the switch loss x tokens)
  at::Tensor valid_tokens; // scalar float32: real (unmasked) tokens
  at::Tensor indices; // token choice: [T, K] (-1 padding); EC: [E, C]
};

// x [..., H]; mask (optional) [...] of x's leading shape, nonzero = real
// token. Errors name the field and value.
MoEOutput moe_forward(
    const at::Tensor& x,
    const MoEWeights& weights,
    const MoEOptions& options,
    const at::Tensor& mask = {});

} // namespace moeyard
