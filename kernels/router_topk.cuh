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
  const Acc mult =
      renormalize ? static_cast<Acc>(scale) / (denom + static_cast<Acc>(1e-20))
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

// Whether group g is among the best `keep` of groups scored score[0:G)
// (ranks_before order). The CUDA kernel asks this per group; the CPU kernel
// partially sorts the groups; tests check that both agree.
template <typename T>
MOEYARD_HD bool group_is_kept(
    const T* score, int64_t G, int64_t g, int64_t keep) {
  int64_t rank = 0;
  for (int64_t h = 0; h < G; ++h) {
    rank += ranks_before(score[h], h, score[g], g) ? 1 : 0;
  }
  return rank < keep;
}

constexpr int64_t kMaxK = 16; // CUDA kernel limit on k (a register array)
constexpr int kWarpsPerBlock = 4;

#if defined(__CUDACC__)

template <typename T>
__device__ __forceinline__ void warp_best(T& v, int64_t& i) {
  for (int o = kWarpSize / 2; o > 0; o >>= 1) {
    const T v2 = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t i2 = __shfl_xor_sync(0xffffffffu, i, o);
    merge_best(v, i, v2, i2);
  }
}

// One warp per token (grid-stride). Shared memory per warp: scores [E],
// selection keys [E], group scores [G], all in Acc.
template <typename scalar_t, typename Acc>
__global__ void forward_kernel(
    const scalar_t* __restrict__ logits,
    const Acc* __restrict__ bias, // [E] or nullptr
    int64_t T,
    int64_t E,
    int64_t K,
    bool sigmoid,
    bool renormalize,
    double scale,
    int64_t G,
    int64_t TG,
    scalar_t* __restrict__ weights,
    int64_t* __restrict__ indices,
    scalar_t* __restrict__ scores) {
  extern __shared__ unsigned char smem_raw[];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  Acc* s = reinterpret_cast<Acc*>(smem_raw) + warp * (2 * E + G);
  Acc* sel = s + E;
  Acc* gscore = sel + E;
  const Acc neg_inf = -INFINITY;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
       t < T;
       t += warps) {
    const scalar_t* x = logits + t * E;
    if (sigmoid) {
      for (int64_t e = lane; e < E; e += kWarpSize) {
        s[e] = Acc(1) / (Acc(1) + exp(-static_cast<Acc>(x[e])));
      }
    } else {
      Acc m = neg_inf;
      for (int64_t e = lane; e < E; e += kWarpSize) {
        const Acc v = static_cast<Acc>(x[e]);
        m = v > m ? v : m;
      }
      m = warp_max(m);
      Acc sum = 0;
      for (int64_t e = lane; e < E; e += kWarpSize) {
        s[e] = exp(static_cast<Acc>(x[e]) - m);
        sum += s[e];
      }
      const Acc inv = Acc(1) / warp_sum(sum);
      for (int64_t e = lane; e < E; e += kWarpSize) {
        s[e] *= inv;
      }
    }
    for (int64_t e = lane; e < E; e += kWarpSize) {
      sel[e] = bias ? s[e] + bias[e] : s[e];
      scores[t * E + e] = static_cast<scalar_t>(s[e]);
    }
    __syncwarp();
    if (G > 1 && TG < G) {
      const int64_t size = E / G;
      for (int64_t g = lane; g < G; g += kWarpSize) {
        gscore[g] = group_top2_sum(sel + g * size, size, neg_inf);
      }
      __syncwarp();
      for (int64_t g = lane; g < G; g += kWarpSize) {
        if (!group_is_kept(gscore, G, g, TG)) {
          for (int64_t j = 0; j < size; ++j) {
            sel[g * size + j] = neg_inf;
          }
        }
      }
      __syncwarp();
    }
    int64_t chosen[kMaxK];
    for (int64_t k = 0; k < K; ++k) {
      Acc v;
      int64_t i;
      lane_best(sel, E, lane, kWarpSize, neg_inf, v, i);
      warp_best(v, i);
      chosen[k] = i;
      __syncwarp();
      if (lane == 0) {
        sel[i] = neg_inf;
      }
      __syncwarp();
    }
    if (lane == 0) {
      for (int64_t k = 0; k < K; ++k) {
        indices[t * K + k] = chosen[k];
      }
      finalize_weights(s, chosen, K, renormalize, scale, weights + t * K);
    }
    __syncwarp();
  }
}

// One warp per token: d logits from d weights and d scores.
template <typename scalar_t, typename Acc>
__global__ void backward_kernel(
    const scalar_t* __restrict__ grad_weights,
    const scalar_t* __restrict__ grad_scores,
    const int64_t* __restrict__ indices,
    const scalar_t* __restrict__ scores,
    int64_t T,
    int64_t E,
    int64_t K,
    bool sigmoid,
    bool renormalize,
    double scale,
    scalar_t* __restrict__ grad_logits) {
  extern __shared__ unsigned char smem_raw[];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  Acc* s = reinterpret_cast<Acc*>(smem_raw) + warp * 2 * E;
  Acc* gs = s + E;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
       t < T;
       t += warps) {
    for (int64_t e = lane; e < E; e += kWarpSize) {
      s[e] = static_cast<Acc>(scores[t * E + e]);
      gs[e] = static_cast<Acc>(grad_scores[t * E + e]);
    }
    __syncwarp();
    if (lane == 0) {
      for (int64_t k = 0; k < K; ++k) {
        MOEYARD_KERNEL_ASSERT(
            indices[t * K + k] >= 0 && indices[t * K + k] < E);
      }
      add_weight_grad(
          s, indices + t * K, grad_weights + t * K, K, renormalize, scale, gs);
    }
    __syncwarp();
    Acc dot = 0;
    if (!sigmoid) {
      for (int64_t e = lane; e < E; e += kWarpSize) {
        dot += gs[e] * s[e];
      }
      dot = warp_sum(dot);
    }
    for (int64_t e = lane; e < E; e += kWarpSize) {
      const Acc g =
          sigmoid ? gs[e] * s[e] * (Acc(1) - s[e]) : s[e] * (gs[e] - dot);
      grad_logits[t * E + e] = static_cast<scalar_t>(g);
    }
    __syncwarp();
  }
}

#endif // __CUDACC__

} // namespace moeyard::kernels::router_topk
