// route_plan on CUDA: the chunk functions of kernels/route_plan.cuh, one CUDA
// thread per chunk of kCudaChunk pairs, with a CUB exclusive scan between
// count and place; the "probs" policy adds two CUB stable segmented sorts
// (weights descending per expert, then the kept pairs by pair index).

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <torch/library.h>
#include <cub/device/device_scan.cuh>
#include <cub/device/device_segmented_sort.cuh>

#include "kernels/route_plan.cuh"
#include "ops/cuda_utils.h"
#include "ops/route_plan/route_plan_checks.h"

namespace moeyard::ops {
namespace {

namespace rp = kernels::route_plan;
constexpr int kThreads = 256;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_plan_cuda(
    const at::Tensor& indices_in,
    const at::Tensor& weights_in,
    int64_t E,
    int64_t capacity,
    c10::string_view drop_policy) {
  detail::check_route_plan_args(
      indices_in, weights_in, E, capacity, drop_policy);
  detail::check_cuda(indices_in, "route_plan", "indices");
  const bool by_probs = detail::parse_drop_policy(drop_policy, "route_plan");
  c10::cuda::CUDAGuard guard(indices_in.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto idx = indices_in.contiguous();
  const int64_t K = idx.size(1), P = idx.numel();
  const bool dropless = capacity < 0;
  const int64_t N = dropless ? P : E * capacity;
  const auto opts = idx.options();

  auto row_token = at::full({N}, -1, opts);
  auto slot = at::empty({idx.size(0), K}, opts);
  auto offsets = at::empty({E + 1}, opts);
  auto counts = at::empty({E}, opts);

  // 1. per-chunk histograms (expert-major), 2. exclusive scan with the total
  // in the extra last entry, 3. expert offsets, 4. placement.
  const int64_t n_chunks =
      std::max<int64_t>(1, kernels::ceil_div(P, rp::kCudaChunk));
  const int64_t cells = E * n_chunks;
  auto table = at::empty({cells + 1}, opts);
  table.narrow(0, cells, 1).zero_();
  rp::count_kernel<<<
      kernels::grid_for(n_chunks, kThreads),
      kThreads,
      0,
      stream>>>(
      idx.const_data_ptr<int64_t>(),
      P,
      E,
      n_chunks,
      table.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto cursor = at::empty({cells + 1}, opts);
  detail::cub_call(table, [&](void* temp, size_t& bytes) {
    return cub::DeviceScan::ExclusiveSum(
        temp,
        bytes,
        table.const_data_ptr<int64_t>(),
        cursor.mutable_data_ptr<int64_t>(),
        cells + 1,
        stream);
  });
  auto dropless_offset = at::empty({E + 1}, opts);
  rp::offsets_kernel<<<
      kernels::grid_for(E + 1, kThreads),
      kThreads,
      0,
      stream>>>(
      cursor.const_data_ptr<int64_t>(),
      E,
      n_chunks,
      dropless_offset.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const bool keep_by_position = !by_probs;
  auto pair_at = at::empty({dropless || keep_by_position ? 0 : P}, opts);
  rp::place_kernel<<<
      kernels::grid_for(n_chunks, kThreads),
      kThreads,
      0,
      stream>>>(
      idx.const_data_ptr<int64_t>(),
      P,
      K,
      capacity,
      keep_by_position,
      n_chunks,
      cursor.mutable_data_ptr<int64_t>(),
      dropless_offset.const_data_ptr<int64_t>(),
      slot.mutable_data_ptr<int64_t>(),
      row_token.mutable_data_ptr<int64_t>(),
      pair_at.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  rp::finish_kernel<<<kernels::grid_for(E, kThreads), kThreads, 0, stream>>>(
      dropless_offset.const_data_ptr<int64_t>(),
      capacity,
      E,
      offsets.mutable_data_ptr<int64_t>(),
      counts.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (pair_at.numel() > 0) {
    // "probs": per expert, stable sort by weight (descending) keeps the
    // earliest pair among equal weights; its first C pairs are kept and
    // re-sorted by pair index.
    const auto weights = weights_in.contiguous();
    auto keys = at::empty({P}, opts.dtype(at::kFloat));
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf,
        at::kBFloat16,
        weights.scalar_type(),
        "route_plan_probs",
        [&] {
          rp::gather_weight_keys<scalar_t>
              <<<kernels::grid_for(P, kThreads), kThreads, 0, stream>>>(
                  pair_at.const_data_ptr<int64_t>(),
                  weights.const_data_ptr<scalar_t>(),
                  dropless_offset.const_data_ptr<int64_t>(),
                  E,
                  P,
                  keys.mutable_data_ptr<float>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    auto keys_sorted = at::empty_like(keys);
    auto pairs_sorted = at::empty_like(pair_at);
    const int64_t* seg = dropless_offset.const_data_ptr<int64_t>();
    detail::cub_call(keys, [&](void* temp, size_t& bytes) {
      return cub::DeviceSegmentedSort::StableSortPairsDescending(
          temp,
          bytes,
          keys.const_data_ptr<float>(),
          keys_sorted.mutable_data_ptr<float>(),
          pair_at.const_data_ptr<int64_t>(),
          pairs_sorted.mutable_data_ptr<int64_t>(),
          P,
          E,
          seg,
          seg + 1,
          stream);
    });
    auto kept = at::empty({E * capacity}, opts);
    auto kept_begin = at::empty({E}, opts);
    auto kept_end = at::empty({E}, opts);
    rp::take_kept_kernel<<<kernels::grid_for(E, 1), kThreads, 0, stream>>>(
        pairs_sorted.const_data_ptr<int64_t>(),
        seg,
        E,
        capacity,
        kept.mutable_data_ptr<int64_t>(),
        kept_begin.mutable_data_ptr<int64_t>(),
        kept_end.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto kept_sorted = at::empty_like(kept);
    detail::cub_call(kept, [&](void* temp, size_t& bytes) {
      return cub::DeviceSegmentedSort::StableSortKeys(
          temp,
          bytes,
          kept.const_data_ptr<int64_t>(),
          kept_sorted.mutable_data_ptr<int64_t>(),
          E * capacity,
          E,
          kept_begin.const_data_ptr<int64_t>(),
          kept_end.const_data_ptr<int64_t>(),
          stream);
    });
    rp::write_kept_kernel<<<
        kernels::grid_for(E, kThreads),
        kThreads,
        0,
        stream>>>(
        kept_sorted.const_data_ptr<int64_t>(),
        kept_end.const_data_ptr<int64_t>(),
        E,
        K,
        capacity,
        slot.mutable_data_ptr<int64_t>(),
        row_token.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {row_token, slot, offsets, counts};
}

} // namespace

TORCH_LIBRARY_IMPL(moeyard, CUDA, m) {
  m.impl("route_plan", &route_plan_cuda);
}

} // namespace moeyard::ops
