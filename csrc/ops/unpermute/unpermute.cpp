// unpermute: dispatcher wrappers and Meta kernels.

#include "ops/unpermute/unpermute.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "ops/unpermute/unpermute_checks.h"

namespace moeyard::ops {

at::Tensor unpermute(
    const at::Tensor& rows, const at::Tensor& slot, const at::Tensor& weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moeyard::unpermute", "")
                       .typed<decltype(unpermute)>();
  return op.call(rows, slot, weights);
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward(
    const at::Tensor& grad_y,
    const at::Tensor& rows,
    const at::Tensor& slot,
    const at::Tensor& weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moeyard::unpermute_backward", "")
                       .typed<decltype(unpermute_backward)>();
  return op.call(grad_y, rows, slot, weights);
}

namespace {

at::Tensor unpermute_meta(
    const at::Tensor& rows, const at::Tensor& slot, const at::Tensor& weights) {
  detail::check_unpermute_args(rows, slot, weights, "unpermute");
  return at::empty_symint({slot.sym_size(0), rows.sym_size(1)}, rows.options());
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_meta(
    const at::Tensor& grad_y,
    const at::Tensor& rows,
    const at::Tensor& slot,
    const at::Tensor& weights) {
  detail::check_unpermute_backward_args(grad_y, rows, slot, weights);
  return {
      at::empty_like(rows, at::MemoryFormat::Contiguous),
      at::empty_like(weights, at::MemoryFormat::Contiguous)};
}

} // namespace

TORCH_LIBRARY_IMPL(moeyard, Meta, m) {
  m.impl("unpermute", &unpermute_meta);
  m.impl("unpermute_backward", &unpermute_backward_meta);
}

} // namespace moeyard::ops
