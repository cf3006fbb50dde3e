#pragma once
// Helpers for the CUDA glue files (csrc/ops/*/cuda/*.cu): device checks, CUB
// temporary storage from the caching allocator.

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace moeyard::ops::detail {

inline void check_cuda(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(
      t.is_cuda(), op, ": ", arg, " must be a CUDA tensor, got ", t.device());
}

// Runs a CUB device algorithm twice: once to size, once to run, with the
// temporary storage taken from PyTorch's caching allocator.
template <typename Fn>
void cub_call(const at::Tensor& like, Fn&& fn) {
  size_t bytes = 0;
  C10_CUDA_CHECK(fn(nullptr, bytes));
  auto temp =
      at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  C10_CUDA_CHECK(fn(temp.data_ptr(), bytes));
}

} // namespace moeyard::ops::detail
