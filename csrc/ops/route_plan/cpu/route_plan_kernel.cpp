// route_plan on the CPU: the per-chunk functions of kernels/route_plan.cuh
// (shared with the CUDA kernels), one chunk per thread.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "kernels/route_plan.cuh"
#include "ops/route_plan/route_plan_checks.h"

namespace moeyard::ops {
namespace {

constexpr int64_t kPairGrain = 4096;

template <typename scalar_t>
void keep_highest_weights(
    const int64_t* pairs, // pairs of one expert, in flat order
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

  namespace rp = kernels::route_plan;
  // Phase 1: per-chunk histograms, expert-major table [E, n_chunks].
  const int64_t n_chunks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), P / kPairGrain));
  const int64_t chunk = kernels::ceil_div(std::max<int64_t>(P, 1), n_chunks);
  auto chunk_end = [&](int64_t c) { return std::min(P, (c + 1) * chunk); };
  std::vector<int64_t> table(E * n_chunks);
  at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      rp::count_chunk(
          idx, c * chunk, chunk_end(c), E, table.data() + c, n_chunks);
    }
  });
  // Phase 2: exclusive scan in place; chunk 0's value is the expert offset.
  std::vector<int64_t> dropless_offset(E + 1);
  int64_t run = 0;
  for (int64_t i = 0; i < E * n_chunks; ++i) {
    if (i % n_chunks == 0) {
      dropless_offset[i / n_chunks] = run;
    }
    const int64_t n = table[i];
    table[i] = run;
    run += n;
  }
  dropless_offset[E] = run;

  auto row_token = at::full({N}, -1, opts);
  auto slot = at::empty({indices.size(0), K}, opts);
  auto offsets = at::empty({E + 1}, opts);
  auto counts = at::empty({E}, opts);
  int64_t* rt = row_token.mutable_data_ptr<int64_t>();
  int64_t* sl = slot.mutable_data_ptr<int64_t>();

  // Phase 3: stable placement, each chunk advancing its own table column.
  const bool keep_by_position = !by_probs;
  std::vector<int64_t> pair_at(dropless || keep_by_position ? 0 : P);
  at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      rp::place_chunk(
          idx,
          c * chunk,
          chunk_end(c),
          K,
          capacity,
          keep_by_position,
          table.data() + c,
          n_chunks,
          dropless_offset.data(),
          sl,
          rt,
          pair_at.data());
    }
  });
  if (!pair_at.empty()) {
    // "probs": each over-full expert keeps its C highest weights.
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
                  dropless_offset[e + 1] - dropless_offset[e],
                  capacity,
                  w,
                  kept);
              rp::write_kept(e, kept.data(), kept.size(), K, capacity, sl, rt);
            }
          });
        });
  }
  for (int64_t e = 0; e < E; ++e) {
    rp::finish_expert(
        e,
        dropless_offset.data(),
        capacity,
        offsets.mutable_data_ptr<int64_t>(),
        counts.mutable_data_ptr<int64_t>(),
        E);
  }
  return {row_token, slot, offsets, counts};
}

} // namespace

TORCH_LIBRARY_IMPL(moeyard, CPU, m) {
  m.impl("route_plan", &route_plan_cpu);
}

} // namespace moeyard::ops
