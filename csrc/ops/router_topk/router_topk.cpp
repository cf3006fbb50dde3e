// router_topk: dispatcher wrappers and the Meta (shape) kernels.

#include "ops/router_topk/router_topk.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "ops/router_topk/router_topk_checks.h"

namespace moeyard::ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_topk(
    const at::Tensor& logits,
    int64_t k,
    c10::string_view score_fn,
    bool renormalize,
    double scale,
    const std::optional<at::Tensor>& selection_bias,
    int64_t num_groups,
    int64_t topk_groups) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moeyard::router_topk", "")
                       .typed<decltype(router_topk)>();
  return op.call(
      logits,
      k,
      score_fn,
      renormalize,
      scale,
      selection_bias,
      num_groups,
      topk_groups);
}

at::Tensor router_topk_backward(
    const at::Tensor& grad_weights,
    const at::Tensor& grad_scores,
    const at::Tensor& indices,
    const at::Tensor& scores,
    c10::string_view score_fn,
    bool renormalize,
    double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moeyard::router_topk_backward", "")
                       .typed<decltype(router_topk_backward)>();
  return op.call(
      grad_weights, grad_scores, indices, scores, score_fn, renormalize, scale);
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_topk_meta(
    const at::Tensor& logits,
    int64_t k,
    c10::string_view score_fn,
    bool renormalize,
    double scale,
    const std::optional<at::Tensor>& selection_bias,
    int64_t num_groups,
    int64_t topk_groups) {
  detail::check_router_topk_args(
      logits, k, score_fn, selection_bias, num_groups, topk_groups);
  auto T = logits.sym_size(0);
  auto weights = at::empty_symint({T, c10::SymInt(k)}, logits.options());
  auto indices =
      at::empty_symint({T, c10::SymInt(k)}, logits.options().dtype(at::kLong));
  auto scores = at::empty_like(logits, at::MemoryFormat::Contiguous);
  return {weights, indices, scores};
}

at::Tensor router_topk_backward_meta(
    const at::Tensor& grad_weights,
    const at::Tensor& grad_scores,
    const at::Tensor& indices,
    const at::Tensor& scores,
    c10::string_view score_fn,
    bool renormalize,
    double scale) {
  detail::check_router_topk_backward_args(
      grad_weights, grad_scores, indices, scores, score_fn);
  return at::empty_like(scores, at::MemoryFormat::Contiguous);
}

} // namespace

TORCH_LIBRARY_IMPL(moeyard, Meta, m) {
  m.impl("router_topk", &router_topk_meta);
  m.impl("router_topk_backward", &router_topk_backward_meta);
}

} // namespace moeyard::ops
