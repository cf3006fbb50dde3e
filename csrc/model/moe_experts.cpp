// moe_forward's experts: permute the routed rows, run the experts held here
// (or exchange rows with the expert-parallel group), unpermute with the
// combine weights, add the shared experts.

#include <ATen/ATen.h>

#include "model/moe_detail.h"
#include "ops/linear.h"
#include "ops/ops.h"
#include "parallel/expert_dispatch.h"

namespace moeyard::detail {
namespace {

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

// GPT-OSS's clamped SwiGLU on [gate | up] rows: an elementwise ATen
// expression over every row (no host read of the offsets); the padding
// rows' values are never read (the next grouped_mm and unpermute skip
// them).
at::Tensor clamped_swiglu(const at::Tensor& h, double alpha, double limit) {
  const int64_t F = h.size(-1) / 2;
  const auto gate = h.narrow(-1, 0, F).clamp_max(limit);
  const auto up = h.narrow(-1, F, F).clamp(-limit, limit);
  return (up + 1) * (gate * at::sigmoid(gate * alpha));
}

// One expert projection of the rows: grouped_mm with the base weight (cast
// to the rows' dtype when a LoRA base is stored in another), plus, with
// LoRA factors, scale * B_e A_e dropout(rows) as two grouped GEMMs over the
// same rows.
at::Tensor expert_projection(
    const at::Tensor& rows,
    const at::Tensor& w,
    const at::Tensor& lora_a,
    const at::Tensor& lora_b,
    const at::Tensor& offsets,
    const MoEWeights& ws,
    const MoEOptions& o) {
  const auto base =
      w.scalar_type() == rows.scalar_type() ? w : w.to(rows.scalar_type());
  auto out = ops::grouped_mm(rows, base, offsets);
  if (lora_a.defined()) {
    const auto in = o.training && ws.lora_dropout > 0
                        ? at::dropout(rows, ws.lora_dropout, /*train=*/true)
                        : rows;
    const auto low = ops::grouped_mm(in, lora_a, offsets); // [N, r]
    out = out + ops::grouped_mm(low, lora_b, offsets) * ws.lora_scale;
  }
  return out;
}

// The experts held here on expert-contiguous rows laid out by `offsets`.
at::Tensor local_experts(
    const at::Tensor& rows,
    const at::Tensor& offsets,
    const MoEWeights& w,
    const MoEOptions& o) {
  at::Tensor row_expert; // [N] expert of each row, for the expert biases
  if (w.b_gate_up.defined() || w.b_down.defined()) {
    row_expert = expert_of_rows(offsets, rows.size(0));
  }
  auto h = expert_projection(
      rows, w.w_gate_up, w.lora_gate_up_a, w.lora_gate_up_b, offsets, w, o);
  if (w.b_gate_up.defined()) {
    h = add_expert_bias(h, w.b_gate_up, row_expert);
  }
  auto act = o.activation == "clamped_swiglu"
                 ? clamped_swiglu(h, o.swiglu_alpha, o.swiglu_limit)
                 : ops::swiglu(h, offsets);
  if (o.training && o.expert_dropout > 0) {
    act = at::dropout(act, o.expert_dropout, /*train=*/true);
  }
  auto out = expert_projection(
      act, w.w_down, w.lora_down_a, w.lora_down_b, offsets, w, o);
  if (w.b_down.defined()) {
    out = add_expert_bias(out, w.b_down, row_expert);
  }
  return out;
}

at::Tensor shared_experts(const at::Tensor& x2, const MoEWeights& w) {
  auto shared = ops::linear(
      ops::swiglu(ops::linear(x2, w.shared_gate_up)), w.shared_down);
  if (w.shared_gate.defined()) {
    shared = shared * at::sigmoid(ops::linear(x2, w.shared_gate));
  }
  return shared;
}

} // namespace

at::Tensor run_experts(
    const at::Tensor& x2,
    const Plan& plan,
    const Router& r,
    const MoEWeights& w,
    const MoEOptions& o) {
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
    rows = (rows.to(r.dtype) * row_w.unsqueeze(1)).to(x2.scalar_type());
    combine = (plan.slot >= 0).to(combine.scalar_type());
  }
  auto experts = [&](const at::Tensor& rs, const at::Tensor& offsets) {
    return local_experts(rs, offsets, w, o);
  };
  const auto out_rows = o.expert_group
                            ? parallel::dispatch_to_experts(
                                  rows, plan.offsets, *o.expert_group, experts)
                            : experts(rows, plan.offsets);
  auto y = ops::unpermute(out_rows, plan.slot, combine);
  if (o.null_kind == "copy" && plan.null_pick.defined()) {
    // A copy null expert returns its input: w * x, without a row.
    const auto copy_w =
        (plan.weights * plan.null_pick.to(plan.weights.scalar_type()))
            .sum(-1, true);
    y = y + (x2.to(r.dtype) * copy_w).to(y.scalar_type());
  }
  if (w.shared_gate_up.defined()) {
    y = y + shared_experts(x2, w);
  }
  return y;
}

} // namespace moeyard::detail
