#pragma once
// The MoE layer's interface, declared once: its weights, its routing options
// and its outputs, one row each. From these rows come MoEWeights, MoEOptions
// and MoEOutput (moe_forward.h), the composite op's schema and unpacking
// (moe_op.cpp), the `moe:` config keys with their validation
// (config/model_yaml.cpp), the `schedule.<option>` keys of the trainer, its
// per-layer metrics, the aux-loss sum of Transformer::loss, and in Python
// nn.MoE's keyword arguments, docstring and MoEResult (through
// moeyard._C.moe_interface()). docs/model.md's `moe:` table is generated
// from them (scripts/gen_docs.py; a test checks it is current).
//
// Adding an option is one row in MOEYARD_MOE_OPTIONS plus the code that uses
// it; adding a statistic one row in MOEYARD_MOE_STATISTICS plus its value.

#include <string>
#include <vector>

#include "config/range.h"

namespace moeyard::moe_spec {

// The values an option may take: a range for numbers, a list of names for
// strings (space-separated), nothing for flags.
struct Allowed {
  config::Range range = config::Range::any();
  const char* choices = nullptr;
};
inline Allowed at_least(double lo) {
  return {config::Range::at_least(lo)};
}
inline Allowed greater_than(double lo) {
  return {config::Range::greater_than(lo)};
}
inline Allowed closed_open(double lo, double hi) {
  return {config::Range::closed_open(lo, hi)};
}
inline Allowed open_closed(double lo, double hi) {
  return {config::Range::open_closed(lo, hi)};
}
inline Allowed closed(double lo, double hi) {
  return {config::Range::closed(lo, hi)};
}
inline Allowed one_of(const char* names) {
  return {config::Range::any(), names};
}
inline Allowed any() {
  return {};
}
// The names of a one_of list, in order.
std::vector<std::string> choices_of(const Allowed& a);

} // namespace moeyard::moe_spec

// Weights: X(name, required | optional, doc). Expert tensors are the slices
// this rank holds under expert parallelism.
#define MOEYARD_MOE_WEIGHTS(X)                                             \
  X(router_weight,                                                         \
    required,                                                              \
    "[E + Z, H] float32 router (Z = null_experts rows last)")              \
  X(router_bias, optional, "[E + Z] float32 router bias (GPT-OSS)")        \
  X(w_gate_up, required, "[E, 2F, H] experts' gate rows, then up rows")    \
  X(w_down, required, "[E, H, F] experts' down projections")               \
  X(shared_gate_up, optional, "[2Fs, H] shared experts, fused")            \
  X(shared_down, optional, "[H, Fs]")                                      \
  X(shared_gate, optional, "[1, H] sigmoid gate on the shared output")     \
  X(selection_bias, optional, "[E + Z] float32, added for selection only") \
  X(noise_weight, optional, "[E + Z, H] float32 noisy top-k noise scale")  \
  X(b_gate_up, optional, "[E, 2F] added to each expert's gate_up output")  \
  X(b_down, optional, "[E, H] added to each expert's down output")

// Routing options: X(type, name, default, allowed, doc). Their order is the
// op's keyword order.
#define MOEYARD_MOE_OPTIONS(X)                                                 \
  X(int64_t,                                                                   \
    top_k,                                                                     \
    2,                                                                         \
    at_least(1),                                                               \
    "experts per token K, at most `num_experts` (expert choice: the average "  \
    "experts per token that sizes C)")                                         \
  X(std::string,                                                               \
    score_fn,                                                                  \
    "softmax",                                                                 \
    one_of("softmax sigmoid"),                                                 \
    "router scores")                                                           \
  X(bool,                                                                      \
    renormalize,                                                               \
    true,                                                                      \
    any(),                                                                     \
    "divide the selected weights by their sum (+1e-20); not for `relu`")       \
  X(double,                                                                    \
    scale,                                                                     \
    1.0,                                                                       \
    greater_than(0),                                                           \
    "multiply the weights by this (`routed_scaling_factor`)")                  \
  X(int64_t,                                                                   \
    num_groups,                                                                \
    1,                                                                         \
    at_least(1),                                                               \
    "group-limited top-k (DeepSeek-V3): experts in this many groups; divides " \
    "`num_experts`")                                                           \
  X(int64_t,                                                                   \
    topk_groups,                                                               \
    1,                                                                         \
    at_least(1),                                                               \
    "... of which the best this many are eligible; at most `num_groups`")      \
  X(std::string,                                                               \
    routing,                                                                   \
    "token_choice",                                                            \
    one_of("token_choice expert_choice top_p threshold relu sinkhorn hash"),   \
    "`token_choice`: each token its top_k; `expert_choice`: each expert its "  \
    "best C tokens; `top_p`: the fewest of the top_k whose probabilities "     \
    "reach `top_p`; `threshold`: the top_k with score >= `score_threshold` "   \
    "(the best always); `relu`: every expert with a positive logit, weight "   \
    "= that logit (ReMoE; top_k = the target average); `sinkhorn`: top_k of "  \
    "the Sinkhorn-balanced scores in training, plain top_k otherwise "         \
    "(S-BASE); `hash`: top_k consecutive experts from a fixed hash of the "    \
    "token id, each weighted `scale / top_k` (Hash Layers; the router is "     \
    "not used; needs token ids)")                                              \
  X(double,                                                                    \
    top_p,                                                                     \
    0.4,                                                                       \
    open_closed(0, 1),                                                         \
    "`top_p` routing: the probability mass the picks reach")                   \
  X(double,                                                                    \
    score_threshold,                                                           \
    0.2,                                                                       \
    closed(0, 1),                                                              \
    "`threshold` routing: the least score of a pick after the first")          \
  X(double,                                                                    \
    skip_ratio,                                                                \
    0.0,                                                                       \
    closed_open(0, 1),                                                         \
    "token choice: a pick whose weight is below this times the token's "       \
    "largest is skipped (no row, its weight dropped; Lu et al. 2024); 0: off") \
  X(int64_t,                                                                   \
    sinkhorn_iters,                                                            \
    8,                                                                         \
    at_least(1),                                                               \
    "`sinkhorn` routing: normalization rounds (over tokens, then experts)")    \
  X(bool,                                                                      \
    weight_on_input,                                                           \
    false,                                                                     \
    any(),                                                                     \
    "the routing weight scales the expert input, not its output (Llama-4)")    \
  X(double,                                                                    \
    capacity_factor,                                                           \
    0.0,                                                                       \
    at_least(0),                                                               \
    "`C = max(min_capacity, ceil(factor T K / E))` slots per expert; 0 = "     \
    "dropless")                                                                \
  X(int64_t, min_capacity, 1, at_least(1), "lower bound on C")                 \
  X(std::string,                                                               \
    drop_policy,                                                               \
    "position",                                                                \
    one_of("position probs"),                                                  \
    "over capacity: keep the earliest tokens (`position`) or the highest "     \
    "weights (`probs`)")                                                       \
  X(std::string,                                                               \
    noise,                                                                     \
    "none",                                                                    \
    one_of("none noisy_topk gumbel jitter"),                                   \
    "training-only router noise: `noisy_topk` (learned `noise_weight`), "      \
    "`gumbel`, `jitter` (on the router input), or `none`")                     \
  X(double,                                                                    \
    noise_eps,                                                                 \
    0.01,                                                                      \
    closed_open(0, 1),                                                         \
    "jitter: router input times U(1 - eps, 1 + eps)")                          \
  X(double,                                                                    \
    temperature,                                                               \
    1.0,                                                                       \
    greater_than(0),                                                           \
    "gumbel: (logits + G) / temperature")                                      \
  X(double,                                                                    \
    expert_dropout,                                                            \
    0.0,                                                                       \
    closed_open(0, 1),                                                         \
    "dropout on the experts' hidden activations, training only")               \
  X(std::string,                                                               \
    activation,                                                                \
    "swiglu",                                                                  \
    one_of("swiglu clamped_swiglu"),                                           \
    "routed experts on `[gate | up]`: `swiglu` = `silu(gate) * up`; "          \
    "`clamped_swiglu` (GPT-OSS) = `gate = min(gate, limit)`, `up = clamp(up, " \
    "-limit, limit)`, `(up + 1) * gate * sigmoid(alpha * gate)`. Shared "      \
    "experts are always SwiGLU")                                               \
  X(double,                                                                    \
    swiglu_alpha,                                                              \
    1.702,                                                                     \
    greater_than(0),                                                           \
    "`clamped_swiglu`: sigmoid gain alpha")                                    \
  X(double,                                                                    \
    swiglu_limit,                                                              \
    7.0,                                                                       \
    greater_than(0),                                                           \
    "`clamped_swiglu`: clamp limit")                                           \
  X(bool,                                                                      \
    switch_per_sequence,                                                       \
    false,                                                                     \
    any(),                                                                     \
    "switch loss per sequence (x's second-to-last dimension), averaged "       \
    "(DeepSeek's sequence-wise aux loss)")                                     \
  X(int64_t,                                                                   \
    null_experts,                                                              \
    0,                                                                         \
    at_least(0),                                                               \
    "Z zero-compute experts scored beside the E real ones (router rows E .. "  \
    "E + Z - 1): a pick of one makes no expert row and runs no GEMM (AdaMoE, " \
    "ZEDA); token choice only")                                                \
  X(std::string,                                                               \
    null_kind,                                                                 \
    "zero",                                                                    \
    one_of("zero copy"),                                                       \
    "what a null pick adds: `zero` nothing, `copy` its weight times the "      \
    "token (MoE++)")                                                           \
  X(std::string,                                                               \
    null_weights,                                                              \
    "keep",                                                                    \
    one_of("keep real"),                                                       \
    "`keep`: null picks keep their share of the combine weights, so the "      \
    "output shrinks (ZEDA); `real`: the real picks' weights are renormalized " \
    "to sum to `scale` (AdaMoE; needs `null_kind: zero`)")                     \
  X(std::string,                                                               \
    null_balance,                                                              \
    "average",                                                                 \
    one_of("average grouped"),                                                 \
    "switch loss with null experts: `average` balances the E real experts "    \
    "and the null experts' mean (AdaMoE); `grouped` balances only real "       \
    "against null, `(E + Z) (F_real P_real / E + F_null P_null / Z)` (ZEDA)")

// Aux losses, float32 scalars over the real tokens, each with the option
// that weighs it in the model's loss: X(name, coefficient, default, doc).
#define MOEYARD_MOE_AUX_LOSSES(X)                                           \
  X(switch_loss,                                                            \
    switch_coeff,                                                           \
    0.01,                                                                   \
    "`E * sum_e f_e * P_e`: switch load-balance loss (Switch Transformer)") \
  X(importance_loss,                                                        \
    importance_coeff,                                                       \
    0.0,                                                                    \
    "CV^2 of the per-expert summed router probabilities (Shazeer et al.)")  \
  X(load_loss,                                                              \
    load_coeff,                                                             \
    0.0,                                                                    \
    "CV^2 of the per-expert assignment counts (no gradient)")               \
  X(z_loss, z_coeff, 0.001, "mean over tokens of logsumexp(logits)^2")      \
  X(entropy_loss,                                                           \
    entropy_coeff,                                                          \
    0.0,                                                                    \
    "mean entropy of the routing distribution (sharpens `top_p` routing)")

// Routing statistics over the real tokens: X(name, combine, length, doc).
// combine: how micro-batches and ranks combine, `sum` (counts, a vector of
// `length` entries for E real and Z null experts) or `mean` (a
// token-weighted scalar, length 1).
#define MOEYARD_MOE_STATISTICS(X)                                           \
  X(tokens_per_expert,                                                      \
    sum,                                                                    \
    E + Z,                                                                  \
    "[E + Z] float32: assignments before capacity drops (null experts "     \
    "last)")                                                                \
  X(experts_per_token_histogram,                                            \
    sum,                                                                    \
    E + 1,                                                                  \
    "[E + 1] float32: real tokens with 0, 1, ..., E real picks (token "     \
    "choice: before capacity drops; expert choice: the experts that took "  \
    "it)")                                                                  \
  X(real_experts_per_token,                                                 \
    mean,                                                                   \
    1,                                                                      \
    "picks of real experts per token, before capacity drops")               \
  X(null_fraction, mean, 1, "null picks / all picks")                       \
  X(dropped_fraction, mean, 1, "dropped / valid (token, slot) assignments") \
  X(router_entropy, mean, 1, "mean entropy of the routing distribution")    \
  X(capacity_utilization, mean, 1, "executed / allocated expert rows")

namespace moeyard {

// f(name, member, allowed) for every option in table order, then every
// aux-loss coefficient (allowed: [0, inf)). Options: MoEOptions.
template <typename Options, typename F>
void for_each_moe_option(Options& o, F&& f) {
  using namespace moe_spec;
#define MOEYARD_VISIT(type, name, def, allowed, doc) f(#name, o.name, allowed);
  MOEYARD_MOE_OPTIONS(MOEYARD_VISIT)
#undef MOEYARD_VISIT
#define MOEYARD_VISIT(loss, coeff, def, doc) f(#coeff, o.coeff, at_least(0));
  MOEYARD_MOE_AUX_LOSSES(MOEYARD_VISIT)
#undef MOEYARD_VISIT
}

} // namespace moeyard
