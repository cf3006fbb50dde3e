// unpermute on CUDA: one block per token gathers its K rows (deterministic);
// the backward runs one block per (token, slot) pair.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include "kernels/permute.cuh"
#include "ops/cuda_utils.h"
#include "ops/unpermute/unpermute_checks.h"

namespace moeyard::ops {
namespace {

namespace kp = kernels::permute;
constexpr int kThreads = 256;

// Calls fn.template operator()<scalar_t, w_t>() for the dtype pair in use.
template <typename Fn>
void dispatch_rows_weights(at::ScalarType rows_t, at::ScalarType w_t, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, rows_t, "unpermute_cuda", [&] {
        if (w_t == rows_t) {
          fn.template operator()<scalar_t, scalar_t>();
        } else {
          fn.template operator()<scalar_t, float>();
        }
      });
}

at::Tensor unpermute_cuda(
    const at::Tensor& rows_in,
    const at::Tensor& slot_in,
    const at::Tensor& weights_in) {
  detail::check_unpermute_args(rows_in, slot_in, weights_in, "unpermute");
  detail::check_cuda(rows_in, "unpermute", "rows");
  c10::cuda::CUDAGuard guard(rows_in.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto rows = rows_in.contiguous();
  const auto slot = slot_in.contiguous();
  const auto weights = weights_in.contiguous();
  const int64_t T = slot.size(0), K = slot.size(1), H = rows.size(1);
  auto y = at::empty({T, H}, rows.options());
  if (T == 0 || H == 0) {
    return y;
  }
  dispatch_rows_weights(
      rows.scalar_type(),
      weights.scalar_type(),
      [&]<typename scalar_t, typename w_t>() {
        using acc_t = at::opmath_type<scalar_t>;
        kp::unpermute_kernel<scalar_t, w_t, acc_t>
            <<<kernels::grid_for(T, 1), kThreads, 0, stream>>>(
                rows.const_data_ptr<scalar_t>(),
                slot.const_data_ptr<int64_t>(),
                weights.const_data_ptr<w_t>(),
                T,
                K,
                H,
                rows.size(0),
                y.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return y;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(
    const at::Tensor& grad_y_in,
    const at::Tensor& rows_in,
    const at::Tensor& slot_in,
    const at::Tensor& weights_in) {
  constexpr const char* op = "unpermute_backward";
  detail::check_unpermute_backward_args(
      grad_y_in, rows_in, slot_in, weights_in);
  detail::check_cuda(rows_in, op, "rows");
  c10::cuda::CUDAGuard guard(rows_in.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto rows = rows_in.contiguous();
  const auto slot = slot_in.contiguous();
  const auto weights = weights_in.contiguous();
  const auto grad_y = grad_y_in.to(rows.scalar_type()).contiguous();
  auto grad_rows = at::zeros_like(rows, at::MemoryFormat::Contiguous);
  auto grad_weights = at::empty_like(weights, at::MemoryFormat::Contiguous);
  const int64_t P = slot.numel(), K = slot.size(1), H = rows.size(1);
  if (P == 0) {
    return {grad_rows, grad_weights};
  }
  dispatch_rows_weights(
      rows.scalar_type(),
      weights.scalar_type(),
      [&]<typename scalar_t, typename w_t>() {
        using acc_t = at::opmath_type<scalar_t>;
        kp::unpermute_backward_kernel<scalar_t, w_t, acc_t, kThreads>
            <<<kernels::grid_for(P, 1), kThreads, 0, stream>>>(
                grad_y.const_data_ptr<scalar_t>(),
                rows.const_data_ptr<scalar_t>(),
                slot.const_data_ptr<int64_t>(),
                weights.const_data_ptr<w_t>(),
                P,
                K,
                H,
                rows.size(0),
                grad_rows.mutable_data_ptr<scalar_t>(),
                grad_weights.mutable_data_ptr<w_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {grad_rows, grad_weights};
}

} // namespace

TORCH_LIBRARY_IMPL(moeyard, CUDA, m) {
  m.impl("unpermute", &unpermute_cuda);
  m.impl("unpermute_backward", &unpermute_backward_cuda);
}

} // namespace moeyard::ops
