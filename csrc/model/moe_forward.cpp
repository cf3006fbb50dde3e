#include "model/moe_forward.h"

#include <ATen/ATen.h>

#include <cmath>

#include "ops/linear.h"
#include "ops/ops.h"
#include "parallel/expert_dispatch.h"
#include "parallel/layout.h"

namespace moeyard {
namespace {

// The plan of one routing decision in the form every routing mode shares.
struct Plan {
  at::Tensor row_token, slot, offsets, counts; // route_plan's outputs
  at::Tensor weights; // [T, K'] combine weights (fp32)
  at::Tensor indices; // reported choice
  at::Tensor assigned; // [E] fp32: assignments before drops
};

void check_options(const MoEOptions& o, int64_t E) {
  TORCH_CHECK(
      o.routing == "token_choice" || o.routing == "expert_choice",
      "moe_forward: routing must be 'token_choice' or 'expert_choice', got '",
      o.routing,
      "'");
  TORCH_CHECK(
      o.noise == "none" || o.noise == "noisy_topk" || o.noise == "gumbel" ||
          o.noise == "jitter",
      "moe_forward: noise must be one of none, noisy_topk, gumbel, jitter, "
      "got '",
      o.noise,
      "'");
  TORCH_CHECK(
      o.top_k >= 1 && o.top_k <= E,
      "moe_forward: top_k must be in [1, num_experts=",
      E,
      "], got ",
      o.top_k);
  TORCH_CHECK(
      o.min_capacity >= 1,
      "moe_forward: min_capacity must be >= 1, got ",
      o.min_capacity);
  TORCH_CHECK(
      o.temperature > 0,
      "moe_forward: temperature must be > 0, got ",
      o.temperature);
  TORCH_CHECK(
      o.noise_eps >= 0 && o.noise_eps < 1,
      "moe_forward: noise_eps must be in [0, 1), got ",
      o.noise_eps);
  TORCH_CHECK(
      o.activation == "swiglu" || o.activation == "clamped_swiglu",
      "moe_forward: activation must be 'swiglu' or 'clamped_swiglu', got '",
      o.activation,
      "'");
  TORCH_CHECK(
      o.activation == "swiglu" || o.swiglu_limit > 0,
      "moe_forward: swiglu_limit must be > 0, got ",
      o.swiglu_limit);
}

// Expert index of each of the N plan rows: row r belongs to the expert e
// with offsets[e] <= r < offsets[e + 1]. Rows past offsets[E] (dropless
// padding rows) are given expert E - 1; nothing reads them.
at::Tensor expert_of_rows(const at::Tensor& offsets, int64_t N) {
  const int64_t E = offsets.size(0) - 1;
  const auto rows = at::arange(N, offsets.options());
  return at::searchsorted(offsets.narrow(0, 1, E), rows, false, true)
      .clamp_max(E - 1);
}

// Adds bias[expert of row] to every row of h [N, D]; bias [E, D].
at::Tensor add_expert_bias(
    const at::Tensor& h, const at::Tensor& bias, const at::Tensor& row_expert) {
  return h + bias.to(h.scalar_type()).index_select(0, row_expert);
}

// GPT-OSS's clamped SwiGLU on [gate | up] rows.
at::Tensor clamped_swiglu(const at::Tensor& h, double alpha, double limit) {
  const int64_t F = h.size(-1) / 2;
  const auto gate = h.narrow(-1, 0, F).clamp_max(limit);
  const auto up = h.narrow(-1, F, F).clamp(-limit, limit);
  return (up + 1) * (gate * at::sigmoid(gate * alpha));
}

int64_t capacity_of(
    double factor, int64_t T, int64_t K, int64_t E, int64_t min_c) {
  const double c = std::ceil(factor * static_cast<double>(T * K) / E);
  return std::max<int64_t>(min_c, static_cast<int64_t>(c));
}

Plan plan_token_choice(
    const at::Tensor& logits,
    const at::Tensor& valid,
    const MoEWeights& w,
    const MoEOptions& o,
    at::Tensor& scores) {
  const int64_t T = logits.size(0), E = logits.size(1);
  std::optional<at::Tensor> bias;
  if (w.selection_bias.defined()) {
    bias = w.selection_bias;
  }
  auto [weights, indices, s] = ops::router_topk(
      logits,
      o.top_k,
      o.score_fn,
      o.renormalize,
      o.scale,
      bias,
      o.num_groups,
      o.topk_groups);
  scores = s;
  if (valid.defined()) {
    indices = at::where(valid.unsqueeze(1), indices, -1);
  }
  const int64_t C =
      o.capacity_factor > 0
          ? capacity_of(o.capacity_factor, T, o.top_k, E, o.min_capacity)
          : -1;
  auto [row_token, slot, offsets, counts] =
      ops::route_plan(indices, weights, E, C, o.drop_policy);
  auto assigned = at::zeros({E + 1}, logits.options())
                      .scatter_add_(
                          0,
                          (indices + 1).flatten(),
                          at::ones({indices.numel()}, logits.options()))
                      .narrow(0, 1, E);
  return {row_token, slot, offsets, counts, weights, indices, assigned};
}

// Each expert takes its C best tokens by score; rows stay in token order.
Plan plan_expert_choice(
    const at::Tensor& logits,
    const at::Tensor& valid,
    const MoEOptions& o,
    at::Tensor& scores) {
  const int64_t T = logits.size(0), E = logits.size(1);
  scores = o.score_fn == "sigmoid" ? logits.sigmoid() : logits.softmax(-1);
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
      counts.to(logits.scalar_type())};
}

} // namespace

MoEOutput moe_forward(
    const at::Tensor& x,
    const MoEWeights& w,
    const MoEOptions& o,
    const at::Tensor& mask) {
  TORCH_CHECK(
      x.dim() >= 1, "moe_forward: x must be [..., hidden], got ", x.sizes());
  TORCH_CHECK(
      w.router_weight.defined() && w.router_weight.dim() == 2,
      "moe_forward: router_weight must be [num_experts, hidden]");
  TORCH_CHECK(
      w.w_gate_up.defined() && w.w_down.defined(),
      "moe_forward: w_gate_up and w_down are required");
  const int64_t H = x.size(-1);
  const int64_t E = w.router_weight.size(0);
  const int64_t ep = o.expert_group ? o.expert_group->size() : 1;
  const int64_t El = parallel::experts_per_rank(E, ep, "moe_forward");
  TORCH_CHECK(
      w.router_weight.size(1) == H,
      "moe_forward: router_weight must be [",
      E,
      ", ",
      H,
      "] for hidden=",
      H,
      ", got ",
      w.router_weight.sizes());
  TORCH_CHECK(
      w.w_gate_up.dim() == 3 && w.w_gate_up.size(0) == El &&
          w.w_gate_up.size(2) == H && w.w_gate_up.size(1) % 2 == 0,
      "moe_forward: w_gate_up must be [",
      El,
      ", 2F, ",
      H,
      "], got ",
      w.w_gate_up.sizes());
  const int64_t F = w.w_gate_up.size(1) / 2;
  TORCH_CHECK(
      w.w_down.dim() == 3 && w.w_down.size(0) == El && w.w_down.size(1) == H &&
          w.w_down.size(2) == F,
      "moe_forward: w_down must be [",
      El,
      ", ",
      H,
      ", ",
      F,
      "], got ",
      w.w_down.sizes());
  check_options(o, E);
  TORCH_CHECK(
      !w.b_gate_up.defined() ||
          (w.b_gate_up.dim() == 2 && w.b_gate_up.size(0) == El &&
           w.b_gate_up.size(1) == 2 * F),
      "moe_forward: b_gate_up must be [",
      El,
      ", ",
      2 * F,
      "], got ",
      w.b_gate_up.sizes());
  TORCH_CHECK(
      !w.b_down.defined() || (w.b_down.dim() == 2 && w.b_down.size(0) == El &&
                              w.b_down.size(1) == H),
      "moe_forward: b_down must be [",
      El,
      ", ",
      H,
      "], got ",
      w.b_down.sizes());

  const auto x2 = x.reshape({-1, H});
  const int64_t T = x2.size(0);
  const int64_t K = o.routing == "expert_choice" ? E : o.top_k;
  at::Tensor valid; // [T] bool, undefined = all tokens real
  if (mask.defined()) {
    TORCH_CHECK(
        mask.numel() == T,
        "moe_forward: mask must have one entry per token (",
        T,
        "), got shape ",
        mask.sizes());
    valid = mask.reshape({T}).to(at::kBool);
  }

  // Router in float32, or float64 for a float64 model (never lower).
  const auto rdt = x2.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto xr = x2.to(rdt);
  const bool train_noise = o.training && o.noise != "none";
  if (train_noise && o.noise == "jitter") {
    xr = xr * at::empty_like(xr).uniform_(1.0 - o.noise_eps, 1.0 + o.noise_eps);
  }
  std::optional<at::Tensor> router_bias;
  if (w.router_bias.defined()) {
    router_bias = w.router_bias.to(rdt);
  }
  const auto logits = at::linear(xr, w.router_weight.to(rdt), router_bias);
  auto route_logits = logits;
  if (train_noise && o.noise == "noisy_topk") {
    TORCH_CHECK(
        w.noise_weight.defined(),
        "moe_forward: noise 'noisy_topk' needs noise_weight [",
        E,
        ", ",
        H,
        "]");
    const auto std_dev = at::softplus(at::linear(xr, w.noise_weight.to(rdt)));
    route_logits = logits + at::randn_like(logits) * std_dev;
  } else if (train_noise && o.noise == "gumbel") {
    const auto u = at::empty_like(logits).uniform_(1e-10, 1.0);
    route_logits = (logits - at::log(-at::log(u))) / o.temperature;
  }

  at::Tensor scores;
  Plan plan = o.routing == "expert_choice"
                  ? plan_expert_choice(route_logits, valid, o, scores)
                  : plan_token_choice(route_logits, valid, w, o, scores);

  // Experts on expert-contiguous rows.
  auto rows = ops::permute(x2, plan.row_token);
  auto combine = plan.weights;
  if (o.weight_on_input) {
    // Each row is scaled by the weight of the (token, slot) pair it holds.
    const int64_t N = rows.size(0);
    const auto flat_slot = plan.slot.flatten();
    const auto target = at::where(flat_slot >= 0, flat_slot, N);
    const auto row_w = at::zeros({N + 1}, combine.options())
                           .scatter(0, target, combine.flatten())
                           .narrow(0, 0, N);
    rows = (rows.to(rdt) * row_w.unsqueeze(1)).to(x2.scalar_type());
    combine = (plan.slot >= 0).to(combine.scalar_type());
  }
  // The experts held here on expert-contiguous rows laid out by `offsets`.
  auto local_experts = [&](const at::Tensor& r, const at::Tensor& offsets) {
    at::Tensor row_expert; // [N] expert of each row, for the expert biases
    if (w.b_gate_up.defined() || w.b_down.defined()) {
      row_expert = expert_of_rows(offsets, r.size(0));
    }
    auto h = ops::grouped_mm(r, w.w_gate_up, offsets);
    if (w.b_gate_up.defined()) {
      h = add_expert_bias(h, w.b_gate_up, row_expert);
    }
    auto act = o.activation == "clamped_swiglu"
                   ? clamped_swiglu(h, o.swiglu_alpha, o.swiglu_limit)
                   : ops::swiglu(h);
    if (o.training && o.expert_dropout > 0) {
      act = at::dropout(act, o.expert_dropout, /*train=*/true);
    }
    auto out = ops::grouped_mm(act, w.w_down, offsets);
    if (w.b_down.defined()) {
      out = add_expert_bias(out, w.b_down, row_expert);
    }
    return out;
  };
  const auto out_rows =
      o.expert_group ? parallel::dispatch_to_experts(
                           rows, plan.offsets, *o.expert_group, local_experts)
                     : local_experts(rows, plan.offsets);
  auto y = ops::unpermute(out_rows, plan.slot, combine);

  if (w.shared_gate_up.defined()) {
    auto shared = ops::linear(
        ops::swiglu(ops::linear(x2, w.shared_gate_up)), w.shared_down);
    if (w.shared_gate.defined()) {
      shared = shared * at::sigmoid(ops::linear(x2, w.shared_gate));
    }
    y = y + shared;
  }

  // Aux losses and statistics in float32 over the real tokens only.
  MoEOutput out;
  out.y = y.view(x.sizes());
  const auto fopts = logits.options();
  const auto vw = valid.defined() ? valid.to(rdt) : at::ones({T}, fopts);
  const auto n_valid = vw.sum().clamp_min(1.0);
  auto probs = scores;
  if (o.score_fn == "sigmoid") {
    probs = scores / (scores.sum(-1, true) + 1e-20);
  }
  const auto masked_probs = probs * vw.unsqueeze(1);
  const auto importance = masked_probs.sum(0); // [E]
  if (o.sequence_length > 0 && o.routing == "token_choice") {
    // Per sequence: f and P over each sequence's real tokens, then the mean.
    const int64_t S = o.sequence_length;
    TORCH_CHECK(
        T % S == 0,
        "moe_forward: sequence_length (",
        S,
        ") must divide the token count (",
        T,
        ")");
    const auto one_hot =
        at::zeros({T, E + 1}, fopts)
            .scatter_add_(
                1, plan.indices + 1, at::ones(plan.indices.sizes(), fopts))
            .narrow(1, 1, E);
    const auto n_seq = vw.view({-1, S}).sum(1, true).clamp_min(1.0); // [B,1]
    const auto f_seq = one_hot.view({-1, S, E}).sum(1) / (n_seq * o.top_k);
    const auto p_seq = masked_probs.view({-1, S, E}).sum(1) / n_seq;
    out.switch_loss = E * (f_seq * p_seq).sum(1).mean();
  } else {
    const auto frac = plan.assigned / (n_valid * o.top_k);
    out.switch_loss = E * (frac * importance / n_valid).sum();
  }
  auto cv2 = [](const at::Tensor& v) {
    return v.var(0, /*unbiased=*/false) / (v.mean().square() + 1e-10);
  };
  out.importance_loss = cv2(importance);
  out.load_loss = cv2(plan.assigned);
  out.z_loss = (at::logsumexp(logits, -1).square() * vw).sum() / n_valid;
  out.tokens_per_expert = plan.assigned;
  const auto kept = plan.counts.sum().to(rdt);
  // With no real token (all padding, or T = 0) nothing was dropped: 0.
  const auto n_real = vw.sum();
  out.dropped_fraction =
      o.routing == "expert_choice"
          // fraction of real tokens no expert took
          ? (n_real - ((plan.slot >= 0).any(1).to(rdt) * vw).sum()) / n_valid
          : (n_real * K - kept) / (n_valid * K);
  const auto ent = -(probs * at::log(probs.clamp_min(1e-20))).sum(-1);
  out.router_entropy = (ent * vw).sum() / n_valid;
  // Allocated rows: E*C with a capacity; dropless, the real tokens' K slots
  // (rows of padding tokens are not "allocated"), so dropless reads 1.
  const bool has_capacity =
      o.routing == "expert_choice" || o.capacity_factor > 0;
  out.capacity_utilization =
      has_capacity ? kept / std::max<int64_t>(plan.row_token.size(0), 1)
                   : kept / (n_valid * K);
  out.indices = plan.indices;
  out.importance = importance;
  out.valid_tokens = n_real;
  return out;
}

} // namespace moeyard
