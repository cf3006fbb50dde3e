#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace moeyard::ops {

// Scores the experts of every token and picks its top k.
// logits [T, E] -> weights [T, K] (float like logits), indices [T, K] int64,
// scores [T, E]. score_fn: "softmax" or "sigmoid". selection_bias [E] shifts
// the selection only (DeepSeek-V3); the weights stay the unbiased scores.
// With num_groups > 1 the experts form groups of E / num_groups, each scored
// by the sum of its top-2 biased scores, and only the best topk_groups groups
// may be selected. Ties go to the lower expert (and group) index.
std::tuple<at::Tensor, at::Tensor, at::Tensor> router_topk(
    const at::Tensor& logits,
    int64_t k,
    c10::string_view score_fn = "softmax",
    bool renormalize = true,
    double scale = 1.0,
    const std::optional<at::Tensor>& selection_bias = std::nullopt,
    int64_t num_groups = 1,
    int64_t topk_groups = 1);

// Gradient of router_topk with respect to logits.
at::Tensor router_topk_backward(
    const at::Tensor& grad_weights,
    const at::Tensor& grad_scores,
    const at::Tensor& indices,
    const at::Tensor& scores,
    c10::string_view score_fn,
    bool renormalize,
    double scale);

} // namespace moeyard::ops
