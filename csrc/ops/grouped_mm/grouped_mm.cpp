// grouped_mm: dispatcher wrappers and Meta kernels.

#include "ops/grouped_mm/grouped_mm.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "ops/grouped_mm/grouped_mm_checks.h"

namespace moeyard::ops {

at::Tensor grouped_mm(
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& expert_offsets) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moeyard::grouped_mm", "")
                       .typed<decltype(grouped_mm)>();
  return op.call(input, weight, expert_offsets);
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& expert_offsets) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moeyard::grouped_mm_backward", "")
                       .typed<decltype(grouped_mm_backward)>();
  return op.call(grad_out, input, weight, expert_offsets);
}

namespace {

at::Tensor grouped_mm_meta(
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& expert_offsets) {
  detail::check_grouped_mm_args(input, weight, expert_offsets, "grouped_mm");
  return at::empty_symint(
      {input.sym_size(0), weight.sym_size(1)}, input.options());
}

std::tuple<at::Tensor, at::Tensor> grouped_mm_backward_meta(
    const at::Tensor& grad_out,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& expert_offsets) {
  detail::check_grouped_mm_backward_args(
      grad_out, input, weight, expert_offsets);
  return {
      at::empty_like(input, at::MemoryFormat::Contiguous),
      at::empty_like(weight, at::MemoryFormat::Contiguous)};
}

} // namespace

TORCH_LIBRARY_IMPL(moeyard, Meta, m) {
  m.impl("grouped_mm", &grouped_mm_meta);
  m.impl("grouped_mm_backward", &grouped_mm_backward_meta);
}

} // namespace moeyard::ops
