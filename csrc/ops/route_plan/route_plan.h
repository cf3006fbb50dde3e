#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace moeyard::ops {

// Turns top-k choices into an expert-contiguous row layout.
// indices [T, K] int64 in [0, E) (or -1: no assignment, e.g. a padding
// token), weights [T, K] (read only by drop_policy "probs").
// capacity -1: dropless, N = T*K rows; expert_offsets is the running sum of
// counts and rows past expert_offsets[E] are padding. capacity C >= 1: N = E*C,
// expert e owns rows [e*C, e*C + counts[e]) of its window and
// expert_offsets = [0, C, ..., E*C]; drop_policy "position" keeps the earliest
// (token, slot) pairs, "probs" the highest weights (ties: earliest).
// Within an expert rows keep token order, then slot order.
// Returns row_token [N] (-1 = padding row), slot [T, K] (-1 = dropped),
// expert_offsets [E+1], counts [E] (kept assignments), all int64.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_plan(
    const at::Tensor& indices,
    const at::Tensor& weights,
    int64_t num_experts,
    int64_t capacity = -1,
    c10::string_view drop_policy = "position");

} // namespace moeyard::ops
