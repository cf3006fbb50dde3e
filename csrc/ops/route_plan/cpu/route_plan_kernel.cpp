// route_plan on the CPU. The same three phases as the CUDA kernel:
//   1. per-chunk histogram of the (token, slot) pairs over experts,
//   2. exclusive scan over (expert, chunk) -> each chunk's first rank,
//   3. stable placement: a pair's rank within its expert is its position in
//      flat (token, slot) order among the pairs of that expert.
// The result does not depend on the number of chunks or threads.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "ops/route_plan/route_plan_checks.h"

namespace moeyard::ops {
namespace {

constexpr int64_t kPairGrain = 4096;

template <typename scalar_t>
void keep_highest_weights(
    const int64_t* pairs,  // pairs of one expert, in flat order
    int64_t n,
    int64_t C,
    const scalar_t* w,
    std::vector<int64_t>& kept) {
  kept.assign(pairs, pairs + n);
  if (n > C) {
    auto by_weight = [w](int64_t a, int64_t b) {
      const float wa = static_cast<float>(w[a]), wb = static_cast<float>(w[b]);
      return wa > wb || (wa == wb && a < b);
    };
    std::nth_element(kept.begin(), kept.begin() + C, kept.end(), by_weight);
    kept.resize(C);
    std::sort(kept.begin(), kept.end());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_plan_cpu(
    const at::Tensor& indices_in,
    const at::Tensor& weights_in,
    int64_t E,
    int64_t capacity,
    c10::string_view drop_policy) {
  detail::check_route_plan_args(
      indices_in, weights_in, E, capacity, drop_policy);
  const bool by_probs = detail::parse_drop_policy(drop_policy, "route_plan");
  const auto indices = indices_in.contiguous();
  const int64_t K = indices.size(1);
  const int64_t P = indices.numel();
  const bool dropless = capacity < 0;
  const int64_t N = dropless ? P : E * capacity;
  const auto opts = indices.options();
  const int64_t* idx = indices.const_data_ptr<int64_t>();

  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(
        idx[p] >= -1 && idx[p] < E,
        "route_plan: indices must be in [0, num_experts=",
        E,
        ") or -1 (unassigned), got ",
        idx[p],
        " at token ",
        p / K,
        ", slot ",
        p % K);
  }

  // Phase 1: histogram per chunk.
  const int64_t n_chunks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), P / kPairGrain));
  const int64_t chunk = (P + n_chunks - 1) / std::max<int64_t>(n_chunks, 1);
  std::vector<int64_t> hist(n_chunks * E, 0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      int64_t* h = hist.data() + c * E;
      for (int64_t p = c * chunk; p < std::min(P, (c + 1) * chunk); ++p) {
        if (idx[p] >= 0) {
          ++h[idx[p]];
        }
      }
    }
  });
  // Phase 2: exclusive scan over (expert, chunk) in expert-major order.
  std::vector<int64_t> total(E, 0), rank_start(n_chunks * E);
  for (int64_t e = 0; e < E; ++e) {
    int64_t run = 0;
    for (int64_t c = 0; c < n_chunks; ++c) {
      rank_start[c * E + e] = run;
      run += hist[c * E + e];
    }
    total[e] = run;
  }
  std::vector<int64_t> dropless_offset(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) {
    dropless_offset[e + 1] = dropless_offset[e] + total[e];
  }

  auto row_token = at::full({N}, -1, opts);
  auto slot = at::empty({indices.size(0), K}, opts);
  auto offsets = at::empty({E + 1}, opts);
  auto counts = at::empty({E}, opts);
  int64_t* rt = row_token.mutable_data_ptr<int64_t>();
  int64_t* sl = slot.mutable_data_ptr<int64_t>();
  int64_t* off = offsets.mutable_data_ptr<int64_t>();
  int64_t* cnt = counts.mutable_data_ptr<int64_t>();

  // Phase 3: stable placement. In capacity mode a pair whose rank reaches C
  // is dropped (policy "position"); for "probs" the dropless order is built
  // first and each over-full expert then keeps its C highest weights.
  const bool place_final = dropless || !by_probs;
  std::vector<int64_t> pair_at(place_final ? 0 : P);
  at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<int64_t> next(E);
    for (int64_t c = cb; c < ce; ++c) {
      std::copy(
          rank_start.begin() + c * E,
          rank_start.begin() + (c + 1) * E,
          next.begin());
      for (int64_t p = c * chunk; p < std::min(P, (c + 1) * chunk); ++p) {
        const int64_t e = idx[p];
        if (e < 0) {
          sl[p] = -1;
          continue;
        }
        const int64_t r = next[e]++;
        if (dropless) {
          sl[p] = dropless_offset[e] + r;
          rt[sl[p]] = p / K;
        } else if (!by_probs) {
          sl[p] = r < capacity ? e * capacity + r : -1;
          if (r < capacity) {
            rt[sl[p]] = p / K;
          }
        } else {
          pair_at[dropless_offset[e] + r] = p;
          sl[p] = -1;
        }
      }
    }
  });
  if (!place_final) {
    const auto weights = weights_in.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf,
        at::kBFloat16,
        weights.scalar_type(),
        "route_plan_probs",
        [&] {
          const scalar_t* w = weights.const_data_ptr<scalar_t>();
          at::parallel_for(0, E, 1, [&](int64_t eb, int64_t ee) {
            std::vector<int64_t> kept;
            for (int64_t e = eb; e < ee; ++e) {
              keep_highest_weights(
                  pair_at.data() + dropless_offset[e],
                  total[e],
                  capacity,
                  w,
                  kept);
              for (size_t j = 0; j < kept.size(); ++j) {
                const int64_t row = e * capacity + static_cast<int64_t>(j);
                sl[kept[j]] = row;
                rt[row] = kept[j] / K;
              }
            }
          });
        });
  }
  for (int64_t e = 0; e < E; ++e) {
    cnt[e] = dropless ? total[e] : std::min(total[e], capacity);
    off[e] = dropless ? dropless_offset[e] : e * capacity;
  }
  off[E] = dropless ? dropless_offset[E] : E * capacity;
  return {row_token, slot, offsets, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(moeyard, CPU, m) {
  m.impl("route_plan", &route_plan_cpu);
}

}  // namespace moeyard::ops
