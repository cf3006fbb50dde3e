#pragma once
// The steps of moe_forward (moe_forward.cpp reads them top to bottom):
// checks (moe_checks.cpp), the routing plan (moe_routing.cpp), the experts
// (moe_experts.cpp) and the aux losses and statistics (moe_statistics.cpp).
// Internal to the model; callers use moe_forward.h.

#include <ATen/core/Tensor.h>

#include "model/moe_forward.h"

namespace moeyard::detail {

// Errors unless the weights fit x's hidden size H, each other and the
// experts held here (E / ep of them).
void check_weights(
    const at::Tensor& x, const MoEWeights& w, const MoEOptions& o);

// The router's view of the tokens: logits in float32 (float64 for a float64
// model) and the real-token mask.
struct Router {
  at::ScalarType dtype; // the router's float type
  at::Tensor input; // [T, H] x in that type (after jitter noise)
  at::Tensor logits; // [T, E], without noise (z loss, entropy)
  at::Tensor valid; // [T] bool; undefined: every token is real
  at::Tensor ids; // [T] int64 token ids (hash routing); may be undefined
  // [T] bool: tokens whose lowest-weight real pick is skipped; may be
  // undefined.
  at::Tensor drop_lowest;
};

// The plan of one routing decision in the form every routing mode shares.
struct Plan {
  at::Tensor row_token, slot, offsets, counts; // route_plan's outputs
  at::Tensor weights; // [T, K'] combine weights (fp32)
  at::Tensor indices; // reported choice (token choice: null picks >= E)
  at::Tensor assigned; // [E + Z] fp32: assignments before drops
  at::Tensor scores; // [T, E + Z] routing scores (softmax or sigmoid)
  // With null experts (token choice): [T, K] bool, the picks of a null
  // expert; undefined without.
  at::Tensor null_pick;
};

// x2 [T, H]; mask, token_ids and drop_lowest of T entries or undefined.
Router router_logits(
    const at::Tensor& x2,
    const at::Tensor& mask,
    const at::Tensor& token_ids,
    const at::Tensor& drop_lowest,
    const MoEWeights& w,
    const MoEOptions& o);
// Training noise, then top-k (token choice) or expert choice.
Plan routing_plan(const Router& r, const MoEWeights& w, const MoEOptions& o);
// The routed experts (local or across the expert-parallel group) and the
// shared experts: the layer's output [T, H].
at::Tensor run_experts(
    const at::Tensor& x2,
    const Plan& plan,
    const Router& r,
    const MoEWeights& w,
    const MoEOptions& o);
// Aux losses and routing statistics over the real tokens into `out`;
// tokens_per_sequence: the per-sequence switch loss's sequence length.
void routing_statistics(
    const Router& r,
    const Plan& plan,
    const MoEOptions& o,
    int64_t tokens_per_sequence,
    MoEOutput& out);

} // namespace moeyard::detail
