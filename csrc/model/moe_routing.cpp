// moe_forward's routing plan: router logits (float32), training noise, then
// top-k token choice or expert choice, in the plan form both share.

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "model/moe_detail.h"
#include "ops/ops.h"

namespace moeyard::detail {
namespace {

int64_t capacity_of(
    double factor, int64_t T, int64_t K, int64_t E, int64_t min_c) {
  const double c = std::ceil(factor * static_cast<double>(T * K) / E);
  return std::max<int64_t>(min_c, static_cast<int64_t>(c));
}

// Logits with the training noise that acts on them (noisy top-k, Gumbel).
at::Tensor noisy_logits(
    const Router& r, const MoEWeights& w, const MoEOptions& o) {
  if (!o.training || o.noise == "none") {
    return r.logits;
  }
  if (o.noise == "noisy_topk") {
    const auto std_dev =
        at::softplus(at::linear(r.input, w.noise_weight.to(r.dtype)));
    return r.logits + at::randn_like(r.logits) * std_dev;
  }
  if (o.noise == "gumbel") {
    const auto u = at::empty_like(r.logits).uniform_(1e-10, 1.0);
    return (r.logits - at::log(-at::log(u))) / o.temperature;
  }
  return r.logits; // jitter acted on the router input
}

// Null picks get no row (index -1 for route_plan); with null_weights
// "real" the real picks' weights are renormalized over the real picks.
at::Tensor real_pick_weights(
    const at::Tensor& weights,
    const at::Tensor& null_pick,
    const MoEOptions& o) {
  if (o.null_weights != "real") {
    return weights;
  }
  const auto real = weights * (~null_pick).to(weights.scalar_type());
  return real / (real.sum(-1, true) + 1e-20) * o.scale;
}

// A token-choice router's picks: [T, K] combine weights and expert indices
// (-1: no pick) and the [T, E + Z] scores the statistics read.
struct Picks {
  at::Tensor weights, indices, scores;
};

at::Tensor scores_of(const at::Tensor& logits, const MoEOptions& o) {
  return o.score_fn == "sigmoid" ? logits.sigmoid() : logits.softmax(-1);
}

// Weights from the scores of the kept picks: renormalized over them
// (unless `relu` or renormalize is off), times scale.
Picks weighted_picks(
    const at::Tensor& values,
    const at::Tensor& experts,
    const at::Tensor& keep,
    const at::Tensor& scores,
    const MoEOptions& o) {
  auto weights = values * keep.to(values.scalar_type());
  if (o.renormalize && o.routing != "relu") {
    weights = weights / (weights.sum(-1, true) + 1e-20);
  }
  return {weights * o.scale, at::where(keep, experts, -1), scores};
}

// top_k (DeepSeek-V3 groups, selection bias): the fused router op.
Picks pick_top_k(
    const at::Tensor& logits, const MoEWeights& w, const MoEOptions& o) {
  std::optional<at::Tensor> bias;
  if (w.selection_bias.defined()) {
    bias = w.selection_bias;
  }
  auto [weights, indices, scores] = ops::router_topk(
      logits,
      o.top_k,
      o.score_fn,
      o.renormalize,
      o.scale,
      bias,
      o.num_groups,
      o.topk_groups);
  return {weights, indices, scores};
}

// Dynamic K: of each token's best top_k scores (relu: every expert), the
// first, then those the rule keeps. Picks stay sorted by score.
Picks pick_dynamic(const at::Tensor& logits, const MoEOptions& o) {
  const bool relu = o.routing == "relu";
  const auto scores = relu ? at::relu(logits) : scores_of(logits, o);
  const int64_t k = relu ? logits.size(1) : o.top_k;
  const auto [values, experts] = at::topk(scores, k, -1);
  at::Tensor keep;
  if (relu) {
    keep = values > 0;
  } else if (o.routing == "top_p") {
    // The smallest prefix whose mass reaches p: a pick is kept while the
    // mass before it is below p.
    keep = (values.cumsum(-1) - values) < o.top_p;
  } else { // threshold
    keep = values >= o.score_threshold;
    keep.select(1, 0).fill_(true);
  }
  return weighted_picks(values, experts, keep, scores, o);
}

// S-BASE: in training, top_k of the Sinkhorn-balanced scores (selection
// only, no gradient): rows and columns are normalized in turn in the log
// domain, columns over the real tokens only; the weights are the picked
// experts' scores. Otherwise plain top_k.
Picks pick_sinkhorn(
    const at::Tensor& logits, const at::Tensor& valid, const MoEOptions& o) {
  const auto scores = scores_of(logits, o);
  auto balanced = logits.detach();
  if (o.training) {
    const auto real = valid.defined() ? valid.unsqueeze(1)
                                      : at::ones_like(balanced, at::kBool);
    const double neg_inf = -std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < o.sinkhorn_iters; ++i) {
      balanced =
          balanced - at::logsumexp(at::where(real, balanced, neg_inf), 0, true);
      balanced = balanced - at::logsumexp(balanced, 1, true);
    }
  }
  const auto experts = std::get<1>(at::topk(balanced, o.top_k, -1));
  const auto values = scores.gather(1, experts);
  return weighted_picks(
      values, experts, at::ones_like(experts, at::kBool), scores, o);
}

// Hash Layers: top_k consecutive experts (mod E) from the first that a
// fixed multiplicative hash of the token id gives, equally weighted; the
// scores are the router's, for the statistics only.
Picks pick_hash(
    const at::Tensor& logits, const at::Tensor& ids, const MoEOptions& o) {
  const int64_t E = logits.size(1);
  // Knuth's multiplicative hash on the low 32 bits (no int64 overflow for
  // ids below 2^31), its high bits taken.
  const auto h = at::bitwise_right_shift(
      at::remainder(ids.to(at::kLong) * 2654435761LL, int64_t(1) << 32), 8);
  const auto first = at::remainder(h, E).unsqueeze(1);
  const auto experts =
      at::remainder(first + at::arange(o.top_k, first.options()), E);
  const auto weights = at::full(
      experts.sizes(),
      o.scale / static_cast<double>(o.top_k),
      logits.options());
  return {weights, experts, scores_of(logits, o)};
}

Picks token_choice_picks(
    const at::Tensor& logits,
    const Router& r,
    const MoEWeights& w,
    const MoEOptions& o) {
  if (o.routing == "token_choice") {
    return pick_top_k(logits, w, o);
  }
  if (o.routing == "sinkhorn") {
    return pick_sinkhorn(logits, r.valid, o);
  }
  if (o.routing == "hash") {
    return pick_hash(logits, r.ids, o);
  }
  return pick_dynamic(logits, o);
}

// With a capacity, expert e's filled rows are the first counts[e] of its C
// (route_plan). Moved together, with offsets the running sum of the counts,
// the expert GEMMs (and the rows sent under expert parallelism) cover the
// filled rows only; the buffer keeps its E * C rows, the unfilled ones last
// as padding (row_token -1), as in dropless plans.
void pack_filled_rows(Plan& p, int64_t C) {
  const int64_t E = p.counts.size(0);
  const auto opts = p.offsets.options();
  const auto offsets = at::cat({at::zeros({1}, opts), p.counts.cumsum(0)});
  const auto rows = at::arange(E * C, opts);
  const auto expert = at::div(rows, C, "floor");
  const auto j = rows - expert * C; // position within the expert's block
  const auto filled = j < p.counts.index_select(0, expert);
  const auto moved =
      at::where(filled, offsets.index_select(0, expert) + j, -1); // new row
  p.slot = at::where(
      p.slot >= 0,
      moved.index_select(0, p.slot.clamp_min(0).flatten()).view_as(p.slot),
      -1);
  // Static shapes (torch.compile): unfilled rows (row_token -1) all go to
  // one extra entry, dropped after.
  p.row_token = at::full({E * C + 1}, -1, opts)
                    .scatter_(0, at::where(filled, moved, E * C), p.row_token)
                    .narrow(0, 0, E * C);
  p.offsets = offsets;
}

// [T, K] bool: each token's lowest-weight pick of a real expert, where the
// token has two or more (its best pick always stays).
at::Tensor lowest_real_pick(
    const at::Tensor& weights, const at::Tensor& indices, int64_t E) {
  const auto real = (indices >= 0) & (indices < E);
  const auto lowest =
      at::where(real, weights.detach(), std::numeric_limits<double>::infinity())
          .argmin(-1, true);
  const auto several = real.sum(-1, true) >= 2;
  return at::zeros_like(real).scatter_(1, lowest, several);
}

Plan plan_token_choice(
    const at::Tensor& logits,
    const Router& r,
    const MoEWeights& w,
    const MoEOptions& o) {
  const int64_t T = logits.size(0), routed = logits.size(1);
  const int64_t E = routed - o.null_experts; // real experts
  const auto& valid = r.valid;
  auto [weights, indices, scores] = token_choice_picks(logits, r, w, o);
  if (valid.defined()) {
    indices = at::where(valid.unsqueeze(1), indices, -1);
  }
  if (o.skip_ratio > 0) { // picks far below the token's best are skipped
    const auto skip = weights < weights.amax(-1, true) * o.skip_ratio;
    indices = at::where(skip, -1, indices);
    weights = weights * (~skip).to(weights.scalar_type());
  }
  if (r.drop_lowest.defined()) {
    const auto skip =
        lowest_real_pick(weights, indices, E) & r.drop_lowest.unsqueeze(1);
    indices = at::where(skip, -1, indices);
    weights = weights * (~skip).to(weights.scalar_type());
  }
  at::Tensor null_pick, real_indices = indices;
  if (o.null_experts > 0) {
    null_pick = indices >= E;
    real_indices = at::where(null_pick, -1, indices);
    weights = real_pick_weights(weights, null_pick, o);
  }
  const int64_t C =
      o.capacity_factor > 0
          ? capacity_of(o.capacity_factor, T, o.top_k, E, o.min_capacity)
          : -1;
  auto [row_token, slot, offsets, counts] =
      ops::route_plan(real_indices, weights, E, C, o.drop_policy);
  auto assigned = at::zeros({routed + 1}, logits.options())
                      .scatter_add_(
                          0,
                          (indices + 1).flatten(),
                          at::ones({indices.numel()}, logits.options()))
                      .narrow(0, 1, routed);
  Plan plan{
      row_token,
      slot,
      offsets,
      counts,
      weights,
      indices,
      assigned,
      scores,
      null_pick};
  if (C > 0) {
    pack_filled_rows(plan, C);
  }
  return plan;
}

// Each expert takes its C best tokens by score; rows stay in token order.
Plan plan_expert_choice(
    const at::Tensor& logits, const at::Tensor& valid, const MoEOptions& o) {
  const int64_t T = logits.size(0), E = logits.size(1);
  auto scores = o.score_fn == "sigmoid" ? logits.sigmoid() : logits.softmax(-1);
  const double factor = o.capacity_factor > 0 ? o.capacity_factor : 1.0;
  const int64_t C =
      std::min<int64_t>(T, capacity_of(factor, T, o.top_k, E, o.min_capacity));
  auto opts = logits.options().dtype(at::kLong);
  auto key = scores.detach();
  if (valid.defined()) {
    key = at::where(valid.unsqueeze(1), key, -1.0);
  }
  // Stable descending sort: ties go to the earlier token.
  auto order = std::get<1>(at::sort(key.t(), /*stable=*/true, 1, true));
  auto chosen = std::get<0>(at::sort(order.narrow(1, 0, C), 1)); // [E, C]
  auto ok = valid.defined()
                ? valid.index_select(0, chosen.flatten()).view({E, C})
                : at::ones({E, C}, opts.dtype(at::kBool));
  auto rows = at::arange(E * C, opts).view({E, C});
  auto slot_t =
      at::full({E, T}, -1, opts).scatter_(1, chosen, at::where(ok, rows, -1));
  auto slot = slot_t.t().contiguous(); // [T, E]
  auto row_token = at::where(ok, chosen, -1).flatten();
  auto counts = ok.sum(1);
  auto offsets = at::arange(E + 1, opts) * C;
  auto weights = scores * (slot >= 0).to(scores.scalar_type());
  return {
      row_token,
      slot,
      offsets,
      counts,
      weights,
      chosen,
      counts.to(logits.scalar_type()),
      scores};
}

} // namespace

Router router_logits(
    const at::Tensor& x2,
    const at::Tensor& mask,
    const at::Tensor& token_ids,
    const at::Tensor& drop_lowest,
    const MoEWeights& w,
    const MoEOptions& o) {
  const int64_t T = x2.size(0);
  Router r;
  if (mask.defined()) {
    TORCH_CHECK(
        mask.numel() == T,
        "moe_forward: mask must have one entry per token (",
        T,
        "), got shape ",
        mask.sizes());
    r.valid = mask.reshape({T}).to(at::kBool);
  }
  if (drop_lowest.defined()) {
    TORCH_CHECK(
        drop_lowest.numel() == T && drop_lowest.scalar_type() == at::kBool,
        "moe_forward: drop_lowest must be bool, one per token (",
        T,
        "), got shape ",
        drop_lowest.sizes(),
        " of ",
        drop_lowest.scalar_type());
    TORCH_CHECK(
        o.routing != "expert_choice",
        "moe_forward: drop_lowest needs a token-choice routing, got "
        "'expert_choice'");
    r.drop_lowest = drop_lowest.reshape({T}).to(x2.device());
  }
  TORCH_CHECK(
      o.routing != "hash" || token_ids.defined(),
      "moe_forward: routing 'hash' picks experts from the token ids; pass "
      "token_ids (one per token)");
  if (token_ids.defined()) {
    TORCH_CHECK(
        token_ids.numel() == T && !at::isFloatingType(token_ids.scalar_type()),
        "moe_forward: token_ids must be integers, one per token (",
        T,
        "), got shape ",
        token_ids.sizes(),
        " of ",
        token_ids.scalar_type());
    r.ids = token_ids.reshape({T}).to(x2.device(), at::kLong);
  }
  // Float32, or float64 for a float64 model (never lower).
  r.dtype = x2.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  r.input = x2.to(r.dtype);
  if (o.training && o.noise == "jitter") {
    r.input = r.input * at::empty_like(r.input).uniform_(
                            1.0 - o.noise_eps, 1.0 + o.noise_eps);
  }
  std::optional<at::Tensor> bias;
  if (w.router_bias.defined()) {
    bias = w.router_bias.to(r.dtype);
  }
  r.logits = at::linear(r.input, w.router_weight.to(r.dtype), bias);
  return r;
}

Plan routing_plan(const Router& r, const MoEWeights& w, const MoEOptions& o) {
  const auto logits = noisy_logits(r, w, o);
  return o.routing == "expert_choice" ? plan_expert_choice(logits, r.valid, o)
                                      : plan_token_choice(logits, r, w, o);
}

} // namespace moeyard::detail
