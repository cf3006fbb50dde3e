// swiglu on CUDA: elementwise grid-stride kernels of kernels/swiglu.cuh.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "kernels/swiglu.cuh"
#include "ops/cuda_utils.h"
#include "ops/swiglu/swiglu_checks.h"

namespace moeyard::ops {
namespace {

namespace ks = kernels::swiglu;
constexpr int kThreads = 256;

// The offsets' first and last entries on the device (null: every row).
const int64_t* span_of(const std::optional<at::Tensor>& offsets) {
  return offsets ? offsets->const_data_ptr<int64_t>() : nullptr;
}

at::Tensor swiglu_cuda(
    const at::Tensor& gate_up_in,
    const std::optional<at::Tensor>& expert_offsets_in) {
  detail::check_swiglu_args(gate_up_in, "swiglu");
  detail::check_swiglu_offsets(expert_offsets_in, gate_up_in, "swiglu");
  const auto expert_offsets =
      expert_offsets_in
          ? std::optional<at::Tensor>(expert_offsets_in->contiguous())
          : std::nullopt;
  detail::check_cuda(gate_up_in, "swiglu", "gate_up");
  c10::cuda::CUDAGuard guard(gate_up_in.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto gate_up = gate_up_in.contiguous();
  const int64_t N = gate_up.size(0), F = gate_up.size(1) / 2;
  auto out = at::empty({N, F}, gate_up.options());
  if (N * F == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, gate_up.scalar_type(), "swiglu_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        ks::forward_kernel<scalar_t, acc_t>
            <<<kernels::grid_for(N * F, kThreads), kThreads, 0, stream>>>(
                gate_up.const_data_ptr<scalar_t>(),
                N,
                F,
                span_of(expert_offsets),
                expert_offsets ? expert_offsets->numel() : 0,
                out.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

at::Tensor swiglu_backward_cuda(
    const at::Tensor& grad_in,
    const at::Tensor& gate_up_in,
    const std::optional<at::Tensor>& expert_offsets_in) {
  detail::check_swiglu_backward_args(grad_in, gate_up_in);
  detail::check_swiglu_offsets(
      expert_offsets_in, gate_up_in, "swiglu_backward");
  const auto expert_offsets =
      expert_offsets_in
          ? std::optional<at::Tensor>(expert_offsets_in->contiguous())
          : std::nullopt;
  detail::check_cuda(gate_up_in, "swiglu_backward", "gate_up");
  c10::cuda::CUDAGuard guard(gate_up_in.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto gate_up = gate_up_in.contiguous();
  const auto grad = grad_in.to(gate_up.scalar_type()).contiguous();
  const int64_t N = gate_up.size(0), F = gate_up.size(1) / 2;
  auto grad_gate_up = at::empty_like(gate_up, at::MemoryFormat::Contiguous);
  if (N * F == 0) {
    return grad_gate_up;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf,
      at::kBFloat16,
      gate_up.scalar_type(),
      "swiglu_backward_cuda",
      [&] {
        using acc_t = at::opmath_type<scalar_t>;
        ks::backward_kernel<scalar_t, acc_t>
            <<<kernels::grid_for(N * F, kThreads), kThreads, 0, stream>>>(
                grad.const_data_ptr<scalar_t>(),
                gate_up.const_data_ptr<scalar_t>(),
                N,
                F,
                span_of(expert_offsets),
                expert_offsets ? expert_offsets->numel() : 0,
                grad_gate_up.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad_gate_up;
}

} // namespace

TORCH_LIBRARY_IMPL(moeyard, CUDA, m) {
  m.impl("swiglu", &swiglu_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
}

} // namespace moeyard::ops
