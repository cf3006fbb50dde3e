// moe_forward's aux losses and routing statistics, in the router's float
// type over the real (unmasked) tokens only.

#include <ATen/ATen.h>

#include "model/moe_detail.h"

namespace moeyard::detail {
namespace {

// Squared coefficient of variation.
at::Tensor cv2(const at::Tensor& v) {
  return v.var(0, /*unbiased=*/false) / (v.mean().square() + 1e-10);
}

// Switch loss per sequence of S tokens (f and P over each sequence's real
// tokens), averaged over the sequences.
at::Tensor switch_loss_per_sequence(
    const Plan& plan,
    const at::Tensor& masked_probs,
    const at::Tensor& vw,
    int64_t S,
    const MoEOptions& o) {
  const int64_t T = masked_probs.size(0), R = masked_probs.size(1);
  const auto fopts = masked_probs.options();
  const auto one_hot =
      at::zeros({T, R + 1}, fopts)
          .scatter_add_(
              1, plan.indices + 1, at::ones(plan.indices.sizes(), fopts))
          .narrow(1, 1, R);
  const auto n_seq = vw.view({-1, S}).sum(1, true).clamp_min(1.0); // [B,1]
  const auto f_seq = one_hot.view({-1, S, R}).sum(1) / (n_seq * o.top_k);
  const auto p_seq = masked_probs.view({-1, S, R}).sum(1) / n_seq;
  return switch_loss_of(f_seq, p_seq, o).mean();
}

} // namespace

void routing_statistics(
    const Router& r,
    const Plan& plan,
    const MoEOptions& o,
    int64_t tokens_per_sequence,
    MoEOutput& out) {
  const auto& logits = r.logits;
  const int64_t T = logits.size(0), routed = logits.size(1);
  const int64_t E = routed - o.null_experts; // real experts
  const bool expert_choice = o.routing == "expert_choice";
  const int64_t K = expert_choice ? E : o.top_k;
  const int64_t slots = expert_choice ? K : plan.indices.size(1);
  const auto fopts = logits.options();
  const auto vw =
      r.valid.defined() ? r.valid.to(r.dtype) : at::ones({T}, fopts);
  const auto n_valid = vw.sum().clamp_min(1.0);
  const bool relu = o.routing == "relu";
  // The routing distribution; the balance losses' P_e is its mean, or for
  // `relu` the mean gate, so that the switch loss is ReMoE's
  // load-weighted L1 penalty.
  auto probs = plan.scores;
  if (o.score_fn == "sigmoid" || relu) {
    probs = plan.scores / (plan.scores.sum(-1, true) + 1e-20);
  }
  const auto masked_probs = (relu ? plan.scores : probs) * vw.unsqueeze(1);
  const auto importance = masked_probs.sum(0); // [E]
  if (tokens_per_sequence > 0 && !expert_choice) {
    out.switch_loss = switch_loss_per_sequence(
        plan, masked_probs, vw, tokens_per_sequence, o);
  } else {
    out.switch_loss = switch_loss_of(
        plan.assigned / (n_valid * o.top_k), importance / n_valid, o);
  }
  // Over the real experts (null experts are not balanced one by one).
  out.importance_loss = cv2(importance.narrow(0, 0, E));
  out.load_loss = cv2(plan.assigned.narrow(0, 0, E));
  out.z_loss = (at::logsumexp(logits, -1).square() * vw).sum() / n_valid;
  out.tokens_per_expert = plan.assigned;
  // Each real token's number of real picks (expert choice: of experts that
  // took it), counted.
  const auto real_per_token =
      expert_choice ? (plan.slot >= 0).sum(1)
                    : ((plan.indices >= 0) & (plan.indices < E)).sum(1);
  out.experts_per_token_histogram =
      at::zeros({E + 1}, fopts).index_add_(0, real_per_token, vw);
  const auto real_picks = plan.assigned.narrow(0, 0, E).sum();
  out.real_experts_per_token = real_picks / n_valid;
  const auto picks = plan.assigned.sum().clamp_min(1.0);
  out.null_fraction = plan.assigned.narrow(0, E, o.null_experts).sum() / picks;
  const auto kept = plan.counts.sum().to(r.dtype);
  // With no real token (all padding, or T = 0) nothing was dropped: 0.
  const auto n_real = vw.sum();
  out.dropped_fraction =
      expert_choice
          // fraction of real tokens no expert took
          ? (n_real - ((plan.slot >= 0).any(1).to(r.dtype) * vw).sum()) /
                n_valid
          // real picks an expert's capacity dropped
          : (real_picks - kept) / picks;
  const auto ent = -(probs * at::log(probs.clamp_min(1e-20))).sum(-1);
  out.entropy_loss = (ent * vw).sum() / n_valid;
  out.router_entropy = out.entropy_loss;
  // Allocated rows: E*C with a capacity; dropless, the real tokens' slots
  // (K, or E for `relu`; rows of padding tokens are not "allocated"), so
  // dropless reads 1 less the null and unused slots.
  const bool has_capacity = expert_choice || o.capacity_factor > 0;
  out.capacity_utilization =
      has_capacity ? kept / std::max<int64_t>(plan.row_token.size(0), 1)
                   : kept / (n_valid * slots);
  out.indices = plan.indices;
  out.importance = importance;
  out.valid_tokens = n_real;
}

} // namespace moeyard::detail

namespace moeyard {

at::Tensor switch_loss_of(
    const at::Tensor& f, const at::Tensor& p, const MoEOptions& o) {
  const int64_t Z = o.null_experts, R = f.size(-1), E = R - Z;
  if (Z == 0) {
    return E * (f * p).sum(-1);
  }
  const auto f_real = f.narrow(-1, 0, E), p_real = p.narrow(-1, 0, E);
  const auto f_null = f.narrow(-1, E, Z), p_null = p.narrow(-1, E, Z);
  if (o.null_balance == "grouped") {
    return R * (f_real.sum(-1) * p_real.sum(-1) / E +
                f_null.sum(-1) * p_null.sum(-1) / Z);
  }
  return R *
         ((f_real * p_real).sum(-1) + Z * f_null.mean(-1) * p_null.mean(-1));
}

} // namespace moeyard
