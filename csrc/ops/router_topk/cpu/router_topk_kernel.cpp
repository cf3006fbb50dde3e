// router_topk on the CPU: one fused pass per token (scores, selection bias,
// group limit, top-k, gather, renormalize, scale), parallel over tokens.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "kernels/router_topk.cuh"
#include "ops/router_topk/router_topk_checks.h"
#include "ops/vec_math.h"

namespace moeyard::ops {
namespace {

namespace kr = kernels::router_topk;
constexpr int64_t kTokenGrain = 16;

// Scores of one token into `s` (acc_t), softmax or sigmoid.
template <typename scalar_t, typename acc_t>
void score_row(const scalar_t* x, acc_t* s, int64_t E, bool sigmoid) {
  for (int64_t e = 0; e < E; ++e) {
    s[e] = static_cast<acc_t>(x[e]);
  }
  if (sigmoid) {
    detail::sigmoid_inplace(s, E);
  } else {
    detail::softmax_inplace(s, E);
  }
}

// The first index of `w` holding `m` (the first NaN when nan), E - 1 if
// none. With AVX2 a float row is searched eight lanes at a time.
template <typename acc_t>
int64_t first_equal(const acc_t* w, int64_t E, acc_t m, bool nan) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (!nan) {
      const __m256 mv = _mm256_set1_ps(m);
      int64_t c = 0;
      for (; c + 8 <= E; c += 8) {
        const int mask = _mm256_movemask_ps(
            _mm256_cmp_ps(_mm256_loadu_ps(w + c), mv, _CMP_EQ_OQ));
        if (mask != 0) {
          return c + __builtin_ctz(static_cast<unsigned>(mask));
        }
      }
      for (; c < E - 1 && w[c] != m; ++c) {
      }
      return c;
    }
  }
#endif
  int64_t i = 0;
  while (i < E - 1 && !(nan ? w[i] != w[i] : w[i] == m)) {
    ++i;
  }
  return i;
}

#if defined(CPU_CAPABILITY_AVX2)
// Index of the first maximum of w[0, E), E >= 8, in two vector passes (max,
// then the first lane equal to it); -1 if w holds a NaN (the caller's
// generic path then picks the first NaN, as the CUDA kernel does).
inline int64_t argmax_avx2(const float* w, int64_t E) {
  __m256 m = _mm256_loadu_ps(w);
  __m256 nan = _mm256_cmp_ps(m, m, _CMP_UNORD_Q);
  int64_t c = 8;
  for (; c + 8 <= E; c += 8) {
    const __m256 v = _mm256_loadu_ps(w + c);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    m = _mm256_max_ps(m, v);
  }
  if (_mm256_movemask_ps(nan) != 0) {
    return -1;
  }
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
  float best = _mm_cvtss_f32(x);
  for (int64_t t = c; t < E; ++t) {
    if (w[t] != w[t]) {
      return -1;
    }
    best = std::max(best, w[t]);
  }
  return first_equal(w, E, best, false);
}
#endif

template <typename scalar_t>
void router_topk_kernel(
    const at::Tensor& logits,
    const at::Tensor& bias, // acc dtype, contiguous, or undefined
    int64_t K,
    bool sigmoid,
    bool renormalize,
    double scale,
    int64_t G,
    int64_t TG,
    at::Tensor& weights,
    at::Tensor& indices,
    at::Tensor& scores) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = logits.size(0);
  const int64_t E = logits.size(1);
  const int64_t group_size = E / G;
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const acc_t* b = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  scalar_t* w_out = weights.mutable_data_ptr<scalar_t>();
  int64_t* i_out = indices.mutable_data_ptr<int64_t>();
  scalar_t* s_out = scores.mutable_data_ptr<scalar_t>();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  using Vec = at::vec::Vectorized<acc_t>;
  const bool limit_groups = G > 1 && TG < G;
  const bool separate_sel = b != nullptr || limit_groups;
  at::parallel_for(0, T, kTokenGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(E), sel_buf(separate_sel ? E : 0), group_score(G);
    std::vector<acc_t> work(separate_sel ? 0 : E);
    std::vector<int64_t> group_order(G);
    auto by_group = [&](int64_t a, int64_t c) {
      return kernels::ranks_before(group_score[a], a, group_score[c], c);
    };
    for (int64_t t = begin; t < end; ++t) {
      score_row(x + t * E, s.data(), E, sigmoid);
      scalar_t* srow = s_out + t * E;
      for (int64_t e = 0; e < E; ++e) {
        srow[e] = static_cast<scalar_t>(s[e]);
      }
      const acc_t* sel = s.data();
      if (separate_sel) {
        for (int64_t e = 0; e < E; ++e) {
          sel_buf[e] = b ? s[e] + b[e] : s[e];
        }
        sel = sel_buf.data();
      }
      if (limit_groups) {
        // Group score: sum of the group's two best biased scores.
        for (int64_t g = 0; g < G; ++g) {
          group_score[g] =
              kr::group_top2_sum(sel + g * group_size, group_size, neg_inf);
        }
        std::iota(group_order.begin(), group_order.end(), 0);
        std::partial_sort(
            group_order.begin(),
            group_order.begin() + TG,
            group_order.end(),
            by_group);
        for (int64_t r = TG; r < G; ++r) {
          acc_t* p = sel_buf.data() + group_order[r] * group_size;
          std::fill(p, p + group_size, neg_inf);
        }
      }
      // Top-k as k vectorized arg-max passes over a scratch copy: branch-free
      // max, then the first index holding it (ties go to the lower index),
      // which is then knocked out. Faster than a sorted insertion buffer on
      // random scores, whose branches mispredict.
      int64_t* it = i_out + t * K;
      acc_t* wk = separate_sel ? sel_buf.data() : work.data();
      if (!separate_sel) {
        std::copy(sel, sel + E, wk);
      }
      for (int64_t k = 0; k < K; ++k) {
#if defined(CPU_CAPABILITY_AVX2)
        if constexpr (std::is_same_v<acc_t, float>) {
          const int64_t i = E >= 8 ? argmax_avx2(wk, E) : -1;
          if (i >= 0) {
            it[k] = i;
            wk[i] = neg_inf;
            continue;
          }
        }
#endif
        const acc_t m = at::vec::reduce_all<acc_t>(
            [](Vec a, Vec c) { return at::vec::maximum(a, c); }, wk, E);
        const bool nan = m != m;
        int64_t i = first_equal(wk, E, m, nan);
        it[k] = i;
        wk[i] = neg_inf;
      }
      kr::finalize_weights(s.data(), it, K, renormalize, scale, w_out + t * K);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_topk_cpu(
    const at::Tensor& logits_in,
    int64_t k,
    c10::string_view score_fn,
    bool renormalize,
    double scale,
    const std::optional<at::Tensor>& selection_bias,
    int64_t num_groups,
    int64_t topk_groups) {
  detail::check_router_topk_args(
      logits_in, k, score_fn, selection_bias, num_groups, topk_groups);
  const bool sigmoid = detail::parse_score_fn(score_fn, "router_topk");
  const auto logits = logits_in.contiguous();
  const int64_t T = logits.size(0);
  auto weights = at::empty({T, k}, logits.options());
  auto indices = at::empty({T, k}, logits.options().dtype(at::kLong));
  auto scores = at::empty_like(logits, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "router_topk_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::Tensor bias;
        if (selection_bias.has_value() && selection_bias->defined()) {
          bias = selection_bias->to(c10::CppTypeToScalarType<acc_t>::value)
                     .contiguous();
        }
        router_topk_kernel<scalar_t>(
            logits,
            bias,
            k,
            sigmoid,
            renormalize,
            scale,
            num_groups,
            topk_groups,
            weights,
            indices,
            scores);
      });
  return {weights, indices, scores};
}

// d logits from d weights and d scores (see docs/ops.md for the derivation).
template <typename scalar_t>
void router_topk_backward_kernel(
    const at::Tensor& grad_weights,
    const at::Tensor& grad_scores,
    const at::Tensor& indices,
    const at::Tensor& scores,
    bool sigmoid,
    bool renormalize,
    double scale,
    at::Tensor& grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = scores.size(0);
  const int64_t E = scores.size(1);
  const int64_t K = indices.size(1);
  const scalar_t* gw = grad_weights.const_data_ptr<scalar_t>();
  const scalar_t* gs_in = grad_scores.const_data_ptr<scalar_t>();
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  const scalar_t* s_in = scores.const_data_ptr<scalar_t>();
  scalar_t* out = grad_logits.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, T, kTokenGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gs(E), s(E);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t e = 0; e < E; ++e) {
        gs[e] = static_cast<acc_t>(gs_in[t * E + e]);
        s[e] = static_cast<acc_t>(s_in[t * E + e]);
      }
      const int64_t* it = idx + t * K;
      const scalar_t* gwt = gw + t * K;
      for (int64_t k = 0; k < K; ++k) {
        TORCH_CHECK(
            it[k] >= 0 && it[k] < E,
            "router_topk_backward: indices must be in [0, ",
            E,
            "), got ",
            it[k]);
      }
      kr::add_weight_grad(s.data(), it, gwt, K, renormalize, scale, gs.data());
      scalar_t* o = out + t * E;
      if (sigmoid) {
        for (int64_t e = 0; e < E; ++e) {
          o[e] = static_cast<scalar_t>(gs[e] * s[e] * (acc_t(1) - s[e]));
        }
      } else {
        acc_t dot = 0;
        for (int64_t e = 0; e < E; ++e) {
          dot += gs[e] * s[e];
        }
        for (int64_t e = 0; e < E; ++e) {
          o[e] = static_cast<scalar_t>(s[e] * (gs[e] - dot));
        }
      }
    }
  });
}

at::Tensor router_topk_backward_cpu(
    const at::Tensor& grad_weights,
    const at::Tensor& grad_scores,
    const at::Tensor& indices,
    const at::Tensor& scores,
    c10::string_view score_fn,
    bool renormalize,
    double scale) {
  detail::check_router_topk_backward_args(
      grad_weights, grad_scores, indices, scores, score_fn);
  const bool sigmoid = detail::parse_score_fn(score_fn, "router_topk_backward");
  const auto s = scores.contiguous();
  const auto dt = s.scalar_type();
  const auto gw = grad_weights.to(dt).contiguous();
  const auto gs = grad_scores.to(dt).contiguous();
  const auto idx = indices.contiguous();
  auto grad_logits = at::empty_like(s, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dt, "router_topk_backward_cpu", [&] {
        router_topk_backward_kernel<scalar_t>(
            gw, gs, idx, s, sigmoid, renormalize, scale, grad_logits);
      });
  return grad_logits;
}

} // namespace

TORCH_LIBRARY_IMPL(moeyard, CPU, m) {
  m.impl("router_topk", &router_topk_cpu);
  m.impl("router_topk_backward", &router_topk_backward_cpu);
}

} // namespace moeyard::ops
