// permute: dispatcher wrappers and Meta kernels.

#include "ops/permute/permute.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops/permute/permute_checks.h"

namespace moeyard::ops {

at::Tensor permute(const at::Tensor& x, const at::Tensor& row_token) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moeyard::permute", "")
                       .typed<decltype(permute)>();
  return op.call(x, row_token);
}

at::Tensor permute_backward(
    const at::Tensor& grad_rows,
    const at::Tensor& row_token,
    c10::SymInt num_tokens) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moeyard::permute_backward", "")
                       .typed<decltype(permute_backward)>();
  return op.call(grad_rows, row_token, std::move(num_tokens));
}

namespace {

at::Tensor permute_meta(const at::Tensor& x, const at::Tensor& row_token) {
  detail::check_permute_args(x, row_token, "permute", "x");
  return at::empty_symint({row_token.sym_size(0), x.sym_size(1)}, x.options());
}

at::Tensor permute_backward_meta(
    const at::Tensor& grad_rows,
    const at::Tensor& row_token,
    c10::SymInt num_tokens) {
  detail::check_permute_backward_args(grad_rows, row_token, num_tokens);
  return at::empty_symint(
      {std::move(num_tokens), grad_rows.sym_size(1)}, grad_rows.options());
}

} // namespace

TORCH_LIBRARY_IMPL(moeyard, Meta, m) {
  m.impl("permute", &permute_meta);
  m.impl("permute_backward", &permute_backward_meta);
}

} // namespace moeyard::ops
