#pragma once
// router_topk's per-token algorithm. The host/device functions below are the
// parts both the CPU kernel and the CUDA kernel (one warp per token) call;
// the CUDA kernel adds only the lane split and the warp reductions.

#include "common.cuh"

namespace moeyard::kernels::router_topk {

// Sum of the two largest values of p[0:n) (the largest alone when n == 1):
// DeepSeek-V3's group score.
template <typename T>
MOEYARD_HD T group_top2_sum(const T* p, int64_t n, T neg_inf) {
  T best = neg_inf, second = neg_inf;
  for (int64_t j = 0; j < n; ++j) {
    if (p[j] > best) {
      second = best;
      best = p[j];
    } else if (p[j] > second) {
      second = p[j];
    }
  }
  return n >= 2 ? best + second : best;
}

// Best (value, index) among p[lane], p[lane + lanes], ... below n, in the
// ranks_before order; index -1 if the lane has no element.
template <typename T>
MOEYARD_HD void lane_best(
    const T* p,
    int64_t n,
    int64_t lane,
    int64_t lanes,
    T neg_inf,
    T& value,
    int64_t& index) {
  value = neg_inf;
  index = -1;
  for (int64_t j = lane; j < n; j += lanes) {
    if (index < 0 || ranks_before(p[j], j, value, index)) {
      value = p[j];
      index = j;
    }
  }
}

// Merges two (value, index) candidates: the one that ranks first wins;
// index -1 means no candidate.
template <typename T>
MOEYARD_HD void merge_best(T& v, int64_t& i, T v2, int64_t i2) {
  if (i2 >= 0 && (i < 0 || ranks_before(v2, i2, v, i))) {
    v = v2;
    i = i2;
  }
}

// weights[k] = scores[indices[k]] * scale (/ (sum + 1e-20) if renormalize).
template <typename Acc, typename Out>
MOEYARD_HD void finalize_weights(
    const Acc* scores,
    const int64_t* indices,
    int64_t K,
    bool renormalize,
    double scale,
    Out* weights) {
  Acc denom = 0;
  for (int64_t k = 0; k < K; ++k) {
    denom += scores[indices[k]];
  }
  const Acc mult = renormalize
      ? static_cast<Acc>(scale) / (denom + static_cast<Acc>(1e-20))
      : static_cast<Acc>(scale);
  for (int64_t k = 0; k < K; ++k) {
    weights[k] = static_cast<Out>(scores[indices[k]] * mult);
  }
}

// Adds the weights' gradient to the scores' gradient gs[E] of one token.
template <typename Acc, typename G>
MOEYARD_HD void add_weight_grad(
    const Acc* scores,
    const int64_t* indices,
    const G* grad_weights,
    int64_t K,
    bool renormalize,
    double scale,
    Acc* gs) {
  if (!renormalize) {
    for (int64_t k = 0; k < K; ++k) {
      gs[indices[k]] +=
          static_cast<Acc>(scale) * static_cast<Acc>(grad_weights[k]);
    }
    return;
  }
  // w_k = scale * s_k / D with D = sum_j s_j + 1e-20 over the selected.
  Acc D = 0, dot = 0;
  for (int64_t k = 0; k < K; ++k) {
    D += scores[indices[k]];
  }
  D += static_cast<Acc>(1e-20);
  for (int64_t k = 0; k < K; ++k) {
    dot += static_cast<Acc>(grad_weights[k]) * scores[indices[k]];
  }
  const Acc c = static_cast<Acc>(scale) / D;
  for (int64_t k = 0; k < K; ++k) {
    gs[indices[k]] += c * (static_cast<Acc>(grad_weights[k]) - dot / D);
  }
}

} // namespace moeyard::kernels::router_topk
