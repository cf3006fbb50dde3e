// route_plan: dispatcher wrapper and Meta kernel. The plan has no gradient
// (integer outputs), so it needs no autograd kernel of its own beyond the
// fallthrough registered in autograd/.

#include "ops/route_plan/route_plan.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops/route_plan/route_plan_checks.h"

namespace moeyard::ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_plan(
    const at::Tensor& indices,
    const at::Tensor& weights,
    int64_t num_experts,
    int64_t capacity,
    c10::string_view drop_policy) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("moeyard::route_plan", "")
                       .typed<decltype(route_plan)>();
  return op.call(indices, weights, num_experts, capacity, drop_policy);
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_plan_meta(
    const at::Tensor& indices,
    const at::Tensor& weights,
    int64_t num_experts,
    int64_t capacity,
    c10::string_view drop_policy) {
  detail::check_route_plan_args(
      indices, weights, num_experts, capacity, drop_policy);
  const auto opts = indices.options();
  c10::SymInt N =
      capacity < 0 ? indices.sym_numel() : c10::SymInt(num_experts * capacity);
  auto row_token = at::empty_symint({N}, opts);
  auto slot = at::empty_symint(indices.sym_sizes(), opts);
  auto offsets = at::empty({num_experts + 1}, opts);
  auto counts = at::empty({num_experts}, opts);
  return {row_token, slot, offsets, counts};
}

} // namespace

TORCH_LIBRARY_IMPL(moeyard, Meta, m) {
  m.impl("route_plan", &route_plan_meta);
}

} // namespace moeyard::ops
