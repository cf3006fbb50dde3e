// permute on CUDA: row copies with 16-byte loads where alignment allows; the
// backward sorts row_token stably (CUB radix sort) and gathers per token in
// row order: deterministic, no atomics.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <cub/device/device_radix_sort.cuh>

#include "kernels/permute.cuh"
#include "ops/cuda_utils.h"
#include "ops/permute/permute_checks.h"

namespace moeyard::ops {
namespace {

namespace kp = kernels::permute;
constexpr int kThreads = 256;

template <typename V>
void launch_permute(
    const at::Tensor& x,
    const at::Tensor& row_token,
    at::Tensor& rows,
    int64_t row_bytes,
    cudaStream_t stream) {
  const int64_t N = row_token.size(0);
  kp::permute_kernel<V><<<kernels::grid_for(N, 1), kThreads, 0, stream>>>(
      static_cast<const V*>(x.const_data_ptr()),
      row_token.const_data_ptr<int64_t>(),
      N,
      x.size(0),
      row_bytes / static_cast<int64_t>(sizeof(V)),
      static_cast<V*>(rows.mutable_data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

at::Tensor permute_cuda(const at::Tensor& x_in, const at::Tensor& rt_in) {
  detail::check_permute_args(x_in, rt_in, "permute", "x");
  detail::check_cuda(x_in, "permute", "x");
  c10::cuda::CUDAGuard guard(x_in.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto x = x_in.contiguous();
  const auto row_token = rt_in.contiguous();
  const int64_t N = row_token.size(0), H = x.size(1);
  auto rows = at::empty({N, H}, x.options());
  if (N == 0 || H == 0) {
    return rows;
  }
  const int64_t row_bytes = H * x.element_size();
  if (row_bytes % 16 == 0 && aligned16(x.const_data_ptr()) &&
      aligned16(rows.const_data_ptr())) {
    launch_permute<uint4>(x, row_token, rows, row_bytes, stream);
  } else if (x.element_size() == 8) {
    launch_permute<uint64_t>(x, row_token, rows, row_bytes, stream);
  } else if (x.element_size() == 4) {
    launch_permute<uint32_t>(x, row_token, rows, row_bytes, stream);
  } else {
    launch_permute<uint16_t>(x, row_token, rows, row_bytes, stream);
  }
  return rows;
}

at::Tensor permute_backward_cuda(
    const at::Tensor& grad_rows_in, const at::Tensor& rt_in, int64_t T) {
  detail::check_permute_backward_args(grad_rows_in, rt_in, T);
  detail::check_cuda(grad_rows_in, "permute_backward", "grad_rows");
  c10::cuda::CUDAGuard guard(grad_rows_in.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto g = grad_rows_in.contiguous();
  const auto row_token = rt_in.contiguous();
  const int64_t N = row_token.size(0), H = g.size(1);
  auto grad_x = at::zeros({T, H}, g.options());
  if (N == 0 || T == 0 || H == 0) {
    return grad_x;
  }
  auto rows_in = at::arange(N, row_token.options());
  auto sorted_tokens = at::empty_like(row_token);
  auto sorted_rows = at::empty_like(row_token);
  detail::cub_call(row_token, [&](void* temp, size_t& bytes) {
    return cub::DeviceRadixSort::SortPairs(
        temp,
        bytes,
        row_token.const_data_ptr<int64_t>(),
        sorted_tokens.mutable_data_ptr<int64_t>(),
        rows_in.const_data_ptr<int64_t>(),
        sorted_rows.mutable_data_ptr<int64_t>(),
        N,
        0,
        64,
        stream);
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, g.scalar_type(), "permute_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        kp::permute_backward_kernel<scalar_t, acc_t>
            <<<kernels::grid_for(T, 1), kThreads, 0, stream>>>(
                g.const_data_ptr<scalar_t>(),
                sorted_tokens.const_data_ptr<int64_t>(),
                sorted_rows.const_data_ptr<int64_t>(),
                N,
                T,
                H,
                grad_x.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad_x;
}

} // namespace

TORCH_LIBRARY_IMPL(moeyard, CUDA, m) {
  m.impl("permute", &permute_cuda);
  m.impl("permute_backward", &permute_backward_cuda);
}

} // namespace moeyard::ops
