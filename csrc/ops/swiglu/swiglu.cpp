// swiglu: dispatcher wrappers, argument checks and Meta kernels.

#include "ops/swiglu/swiglu.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "ops/swiglu/swiglu_checks.h"

namespace moeyard::ops {

at::Tensor swiglu(
    const at::Tensor& gate_up,
    const std::optional<at::Tensor>& expert_offsets) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moeyard::swiglu", "")
                       .typed<decltype(swiglu)>();
  return op.call(gate_up, expert_offsets);
}

at::Tensor swiglu_backward(
    const at::Tensor& grad,
    const at::Tensor& gate_up,
    const std::optional<at::Tensor>& expert_offsets) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moeyard::swiglu_backward", "")
                       .typed<decltype(swiglu_backward)>();
  return op.call(grad, gate_up, expert_offsets);
}

namespace {

at::Tensor swiglu_meta(
    const at::Tensor& gate_up,
    const std::optional<at::Tensor>& expert_offsets) {
  detail::check_swiglu_args(gate_up, "swiglu");
  detail::check_swiglu_offsets(expert_offsets, gate_up, "swiglu");
  return at::empty_symint(
      {gate_up.sym_size(0), gate_up.sym_size(1) / 2}, gate_up.options());
}

at::Tensor swiglu_backward_meta(
    const at::Tensor& grad,
    const at::Tensor& gate_up,
    const std::optional<at::Tensor>& expert_offsets) {
  detail::check_swiglu_backward_args(grad, gate_up);
  detail::check_swiglu_offsets(expert_offsets, gate_up, "swiglu_backward");
  return at::empty_like(gate_up, at::MemoryFormat::Contiguous);
}

} // namespace

TORCH_LIBRARY_IMPL(moeyard, Meta, m) {
  m.impl("swiglu", &swiglu_meta);
  m.impl("swiglu_backward", &swiglu_backward_meta);
}

} // namespace moeyard::ops
