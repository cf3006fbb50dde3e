// C++ autograd for the moeyard ops, registered under the Autograd key so a
// C++ model trains without Python. Each forward redispatches below autograd;
// each backward calls the op's own registered backward op. The backward ops
// and route_plan (integer outputs) get the not-implemented fallback: calling
// them is fine, differentiating through them is an error.
//
// All ops share this one translation unit: autograd headers are the most
// expensive to compile and there are six small functions.

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>

#include "ops/ops.h"

namespace moeyard::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class RouterTopkFn : public torch::autograd::Function<RouterTopkFn> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const at::Tensor& logits,
      int64_t k,
      c10::string_view score_fn,
      bool renormalize,
      double scale,
      const std::optional<at::Tensor>& selection_bias,
      int64_t num_groups,
      int64_t topk_groups) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [weights, indices, scores] = router_topk(
        logits,
        k,
        score_fn,
        renormalize,
        scale,
        selection_bias,
        num_groups,
        topk_groups);
    ctx->save_for_backward({indices, scores});
    ctx->saved_data["score_fn"] = std::string(score_fn);
    ctx->saved_data["renormalize"] = renormalize;
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({indices});
    return {weights, indices, scores};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto grad_logits = router_topk_backward(
        grads[0],
        grads[2],
        saved[0],
        saved[1],
        ctx->saved_data["score_fn"].toStringRef(),
        ctx->saved_data["renormalize"].toBool(),
        ctx->saved_data["scale"].toDouble());
    return {grad_logits, {}, {}, {}, {}, {}, {}, {}};
  }
};

class PermuteFn : public torch::autograd::Function<PermuteFn> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx, const at::Tensor& x, const at::Tensor& row_token) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({row_token});
    ctx->saved_data["num_tokens"] = x.sym_size(0);
    return permute(x, row_token);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto num_tokens = ctx->saved_data["num_tokens"].toSymInt();
    return {permute_backward(grads[0], saved[0], std::move(num_tokens)), {}};
  }
};

class UnpermuteFn : public torch::autograd::Function<UnpermuteFn> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& rows,
      const at::Tensor& slot,
      const at::Tensor& weights) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({rows, slot, weights});
    return unpermute(rows, slot, weights);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [grad_rows, grad_weights] =
        unpermute_backward(grads[0], s[0], s[1], s[2]);
    return {grad_rows, {}, grad_weights};
  }
};

class GroupedMmFn : public torch::autograd::Function<GroupedMmFn> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& input,
      const at::Tensor& weight,
      const at::Tensor& expert_offsets) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({input, weight, expert_offsets});
    return grouped_mm(input, weight, expert_offsets);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto [grad_input, grad_weight] =
        grouped_mm_backward(grads[0], s[0], s[1], s[2]);
    return {grad_input, grad_weight, {}};
  }
};

class SwigluFn : public torch::autograd::Function<SwigluFn> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx,
      const at::Tensor& gate_up,
      const std::optional<at::Tensor>& expert_offsets) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward(
        {gate_up, expert_offsets ? *expert_offsets : at::Tensor()});
    return swiglu(gate_up, expert_offsets);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto offsets =
        s[1].defined() ? std::optional<at::Tensor>(s[1]) : std::nullopt;
    return {swiglu_backward(grads[0], s[0], offsets), {}};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_topk_autograd(
    const at::Tensor& logits,
    int64_t k,
    c10::string_view score_fn,
    bool renormalize,
    double scale,
    const std::optional<at::Tensor>& selection_bias,
    int64_t num_groups,
    int64_t topk_groups) {
  auto out = RouterTopkFn::apply(
      logits,
      k,
      score_fn,
      renormalize,
      scale,
      selection_bias,
      num_groups,
      topk_groups);
  return {out[0], out[1], out[2]};
}

at::Tensor permute_autograd(const at::Tensor& x, const at::Tensor& row_token) {
  return PermuteFn::apply(x, row_token);
}

at::Tensor unpermute_autograd(
    const at::Tensor& rows, const at::Tensor& slot, const at::Tensor& weights) {
  return UnpermuteFn::apply(rows, slot, weights);
}

at::Tensor grouped_mm_autograd(
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& expert_offsets) {
  return GroupedMmFn::apply(input, weight, expert_offsets);
}

at::Tensor swiglu_autograd(
    const at::Tensor& gate_up,
    const std::optional<at::Tensor>& expert_offsets) {
  return SwigluFn::apply(gate_up, expert_offsets);
}

} // namespace

TORCH_LIBRARY_IMPL(moeyard, Autograd, m) {
  m.impl("router_topk", &router_topk_autograd);
  m.impl("permute", &permute_autograd);
  m.impl("unpermute", &unpermute_autograd);
  m.impl("grouped_mm", &grouped_mm_autograd);
  m.impl("swiglu", &swiglu_autograd);
  for (const char* name :
       {"route_plan",
        "router_topk_backward",
        "permute_backward",
        "unpermute_backward",
        "grouped_mm_backward",
        "swiglu_backward"}) {
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
  }
}

} // namespace moeyard::ops
