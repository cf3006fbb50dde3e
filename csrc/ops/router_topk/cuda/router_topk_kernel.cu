// router_topk on CUDA: checks, guard, stream, dtype dispatch, launch of
// kernels/router_topk.cuh (one warp per token).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "kernels/router_topk.cuh"
#include "ops/cuda_utils.h"
#include "ops/router_topk/router_topk_checks.h"

namespace moeyard::ops {
namespace {

namespace kr = kernels::router_topk;
constexpr int kThreads = kr::kWarpsPerBlock * kernels::kWarpSize;

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_topk_cuda(
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
  detail::check_cuda(logits_in, "router_topk", "logits");
  TORCH_CHECK(
      k <= kr::kMaxK,
      "router_topk: k must be <= ",
      kr::kMaxK,
      " on CUDA, got ",
      k);
  const bool sigmoid = detail::parse_score_fn(score_fn, "router_topk");
  c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  auto weights = at::empty({T, k}, logits.options());
  auto indices = at::empty({T, k}, logits.options().dtype(at::kLong));
  auto scores = at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (T == 0) {
    return {weights, indices, scores};
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "router_topk_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        at::Tensor bias;
        if (selection_bias.has_value() && selection_bias->defined()) {
          bias = selection_bias->to(c10::CppTypeToScalarType<acc_t>::value)
                     .contiguous();
        }
        const size_t smem =
            kr::kWarpsPerBlock * (2 * E + num_groups) * sizeof(acc_t);
        TORCH_CHECK(
            smem <= 48 * 1024,
            "router_topk: num_experts=",
            E,
            " needs more shared memory than the CUDA kernel allows (48 KiB)");
        kr::forward_kernel<scalar_t, acc_t>
            <<<kernels::grid_for(T, kr::kWarpsPerBlock),
               kThreads,
               smem,
               stream>>>(
                logits.const_data_ptr<scalar_t>(),
                bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr,
                T,
                E,
                k,
                sigmoid,
                renormalize,
                scale,
                num_groups,
                topk_groups,
                weights.mutable_data_ptr<scalar_t>(),
                indices.mutable_data_ptr<int64_t>(),
                scores.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {weights, indices, scores};
}

at::Tensor router_topk_backward_cuda(
    const at::Tensor& grad_weights,
    const at::Tensor& grad_scores,
    const at::Tensor& indices,
    const at::Tensor& scores_in,
    c10::string_view score_fn,
    bool renormalize,
    double scale) {
  detail::check_router_topk_backward_args(
      grad_weights, grad_scores, indices, scores_in, score_fn);
  detail::check_cuda(scores_in, "router_topk_backward", "scores");
  const bool sigmoid = detail::parse_score_fn(score_fn, "router_topk_backward");
  c10::cuda::CUDAGuard guard(scores_in.device());
  const auto scores = scores_in.contiguous();
  const auto dt = scores.scalar_type();
  const auto gw = grad_weights.to(dt).contiguous();
  const auto gs = grad_scores.to(dt).contiguous();
  const auto idx = indices.contiguous();
  const int64_t T = scores.size(0), E = scores.size(1), K = idx.size(1);
  auto grad_logits = at::empty_like(scores, at::MemoryFormat::Contiguous);
  if (T == 0) {
    return grad_logits;
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dt, "router_topk_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const size_t smem = kr::kWarpsPerBlock * 2 * E * sizeof(acc_t);
        TORCH_CHECK(
            smem <= 48 * 1024,
            "router_topk_backward: num_experts=",
            E,
            " is too large for the CUDA kernel");
        kr::backward_kernel<scalar_t, acc_t>
            <<<kernels::grid_for(T, kr::kWarpsPerBlock),
               kThreads,
               smem,
               stream>>>(
                gw.const_data_ptr<scalar_t>(),
                gs.const_data_ptr<scalar_t>(),
                idx.const_data_ptr<int64_t>(),
                scores.const_data_ptr<scalar_t>(),
                T,
                E,
                K,
                sigmoid,
                renormalize,
                scale,
                grad_logits.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad_logits;
}

} // namespace

TORCH_LIBRARY_IMPL(moeyard, CUDA, m) {
  m.impl("router_topk", &router_topk_cuda);
  m.impl("router_topk_backward", &router_topk_backward_cuda);
}

} // namespace moeyard::ops
