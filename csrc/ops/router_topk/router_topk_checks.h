#pragma once
// Argument validation of router_topk, shared by the CPU, CUDA and Meta
// kernels so that every device rejects the same inputs with the same words.

#include "ops/common.h"

namespace moeyard::ops::detail {

inline void check_router_topk_args(
    const at::Tensor& logits,
    int64_t k,
    c10::string_view score_fn,
    const std::optional<at::Tensor>& selection_bias,
    int64_t num_groups,
    int64_t topk_groups) {
  constexpr const char* op = "router_topk";
  check_float(logits, op, "logits");
  check_dim(logits, 2, op, "logits", "[tokens, experts]");
  parse_score_fn(score_fn, op);
  const int64_t E = logits.sym_size(1).guard_int(__FILE__, __LINE__);
  TORCH_CHECK(
      E >= 1,
      op,
      ": logits must have at least 1 expert column, got shape ",
      logits.sym_sizes());
  TORCH_CHECK(
      k >= 1 && k <= E, op, ": k must be in [1, num_experts=", E, "], got ", k);
  TORCH_CHECK(
      num_groups >= 1 && E % num_groups == 0,
      op,
      ": num_groups must be >= 1 and divide num_experts=",
      E,
      ", got ",
      num_groups);
  TORCH_CHECK(
      topk_groups >= 1 && topk_groups <= num_groups,
      op,
      ": topk_groups must be in [1, num_groups=",
      num_groups,
      "], got ",
      topk_groups);
  TORCH_CHECK(
      k <= topk_groups * (E / num_groups),
      op,
      ": k=",
      k,
      " exceeds the experts reachable in topk_groups=",
      topk_groups,
      " groups of ",
      E / num_groups,
      " experts");
  if (selection_bias.has_value() && selection_bias->defined()) {
    const auto& b = *selection_bias;
    check_float(b, op, "selection_bias");
    TORCH_CHECK(
        b.dim() == 1 && b.sym_size(0) == E,
        op,
        ": selection_bias must have shape [",
        E,
        "], got ",
        b.sym_sizes());
    check_same_device(logits, b, op, "logits", "selection_bias");
  }
}

inline void check_router_topk_backward_args(
    const at::Tensor& grad_weights,
    const at::Tensor& grad_scores,
    const at::Tensor& indices,
    const at::Tensor& scores,
    c10::string_view score_fn) {
  constexpr const char* op = "router_topk_backward";
  parse_score_fn(score_fn, op);
  check_float(scores, op, "scores");
  check_dim(scores, 2, op, "scores", "[tokens, experts]");
  check_index(indices, op, "indices");
  check_dim(indices, 2, op, "indices", "[tokens, k]");
  check_float(grad_weights, op, "grad_weights");
  check_float(grad_scores, op, "grad_scores");
  TORCH_CHECK(
      grad_weights.sym_sizes() == indices.sym_sizes(),
      op,
      ": grad_weights must have the shape of indices ",
      indices.sym_sizes(),
      ", got ",
      grad_weights.sym_sizes());
  TORCH_CHECK(
      grad_scores.sym_sizes() == scores.sym_sizes(),
      op,
      ": grad_scores must have the shape of scores ",
      scores.sym_sizes(),
      ", got ",
      grad_scores.sym_sizes());
  TORCH_CHECK(
      indices.sym_size(0) == scores.sym_size(0),
      op,
      ": indices and scores must have the same number of tokens, got ",
      indices.sym_size(0),
      " and ",
      scores.sym_size(0));
  check_same_device(scores, indices, op, "scores", "indices");
  check_same_device(scores, grad_weights, op, "scores", "grad_weights");
  check_same_device(scores, grad_scores, op, "scores", "grad_scores");
}

} // namespace moeyard::ops::detail
