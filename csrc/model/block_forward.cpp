// A block's forward: the two residual sub-blocks, each run plainly or
// through recompute_segment as the block's recompute mode says, and
// Transformer::set_recompute, which sets that mode.

#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "model/transformer.h"

namespace moeyard {
namespace {

// The parameters of `modules` that take gradients (frozen ones do not).
std::vector<at::Tensor> trainable(
    std::initializer_list<const torch::nn::Module*> modules) {
  std::vector<at::Tensor> out;
  for (const auto* m : modules) {
    if (m == nullptr) {
      continue;
    }
    for (const auto& p : m->parameters()) {
      if (p.requires_grad()) {
        out.push_back(p);
      }
    }
  }
  return out;
}

// The segment's output, then (MoE blocks) the MoE layer's tensors in
// MoEOutput order. The segment's output and the aux losses take gradients;
// the MoE layer's own y (inside the segment) does not, nor do the
// statistics and indices.
std::vector<at::Tensor> pack(
    const at::Tensor& y, const std::optional<MoEOutput>& m) {
  std::vector<at::Tensor> out{y};
  if (m) {
    out.push_back(m->y);
#define MOEYARD_PUSH(name, ...) out.push_back(m->name);
    MOEYARD_MOE_AUX_LOSSES(MOEYARD_PUSH)
    MOEYARD_MOE_STATISTICS(MOEYARD_PUSH)
#undef MOEYARD_PUSH
    out.insert(out.end(), {m->indices, m->importance, m->valid_tokens});
  }
  return out;
}

std::vector<bool> differentiable(bool has_moe) {
  std::vector<bool> out{true};
  if (has_moe) {
    out.push_back(false); // y
#define MOEYARD_PUSH(...) out.push_back(true);
    MOEYARD_MOE_AUX_LOSSES(MOEYARD_PUSH)
#undef MOEYARD_PUSH
#define MOEYARD_PUSH(...) out.push_back(false);
    MOEYARD_MOE_STATISTICS(MOEYARD_PUSH)
#undef MOEYARD_PUSH
    out.insert(out.end(), {false, false, false});
  }
  return out;
}

// pack's inverse: returns the output, fills `m` for MoE blocks.
at::Tensor unpack(
    const std::vector<at::Tensor>& t,
    bool has_moe,
    std::optional<MoEOutput>& m) {
  if (has_moe) {
    MoEOutput o;
    size_t i = 1;
    o.y = t[i++];
#define MOEYARD_TAKE(name, ...) o.name = t[i++];
    MOEYARD_MOE_AUX_LOSSES(MOEYARD_TAKE)
    MOEYARD_MOE_STATISTICS(MOEYARD_TAKE)
#undef MOEYARD_TAKE
    o.indices = t[i++];
    o.importance = t[i++];
    o.valid_tokens = t[i++];
    m = std::move(o);
  }
  return t[0];
}

// The block's two residual sub-blocks.
at::Tensor attention_residual(
    const BlockImpl& b,
    const at::Tensor& x,
    const at::Tensor& attn_mask,
    const Rotary& rotary) {
  return x + b.attention_part(x, attn_mask, rotary);
}
at::Tensor ffn_residual(
    const BlockImpl& b,
    const at::Tensor& h,
    const Tokens& tokens,
    std::optional<MoEOutput>& moe_out) {
  return h + b.ffn_part(h, tokens, moe_out);
}

} // namespace

at::Tensor BlockImpl::forward(
    const at::Tensor& x,
    const at::Tensor& attn_mask,
    const Tokens& tokens,
    const Rotary& rotary,
    std::optional<MoEOutput>& moe_out) const {
  // Without grad there is no backward to keep activations for.
  const auto mode = at::GradMode::is_enabled() ? recompute : Recompute::none;
  return forward_with(x, attn_mask, tokens, rotary, moe_out, mode);
}

at::Tensor BlockImpl::forward_with(
    const at::Tensor& x,
    const at::Tensor& attn_mask,
    const Tokens& tokens,
    const Rotary& rotary,
    std::optional<MoEOutput>& moe_out,
    Recompute mode) const {
  // Each segment ends with its residual add, so that its input's every use
  // is inside it and its gradient sums in the order of a plain run.
  const bool has_moe = static_cast<bool>(moe);
  if (mode == Recompute::full) {
    const auto fn = [this, attn_mask, tokens, &rotary](
                        const std::vector<at::Tensor>& in) {
      std::optional<MoEOutput> m;
      const auto y =
          forward_with(in[0], attn_mask, tokens, rotary, m, Recompute::none);
      return pack(y, m);
    };
    const auto out =
        recompute_segment(fn, {x}, trainable({this}), differentiable(has_moe));
    return unpack(out, has_moe, moe_out);
  }
  at::Tensor h;
  if (mode == Recompute::attention) {
    const auto fn =
        [this, attn_mask, &rotary](const std::vector<at::Tensor>& in) {
          return std::vector<at::Tensor>{
              attention_residual(*this, in[0], attn_mask, rotary)};
        };
    h = recompute_segment(
        fn, {x}, trainable({attn_norm.get(), attn.get()}), {true})[0];
  } else {
    h = attention_residual(*this, x, attn_mask, rotary);
  }
  if (mode == Recompute::moe) {
    const auto fn = [this, tokens](const std::vector<at::Tensor>& in) {
      std::optional<MoEOutput> m;
      const auto y = ffn_residual(*this, in[0], tokens, m);
      return pack(y, m);
    };
    const auto params = trainable(
        {mlp_norm.get(),
         has_moe ? static_cast<const torch::nn::Module*>(moe.get())
                 : mlp.get()});
    const auto out =
        recompute_segment(fn, {h}, params, differentiable(has_moe));
    return unpack(out, has_moe, moe_out);
  }
  return ffn_residual(*this, h, tokens, moe_out);
}

void TransformerImpl::set_recompute(
    Recompute mode, const std::vector<int64_t>& which) {
  const int64_t L = static_cast<int64_t>(layers->size());
  for (const int64_t l : which) {
    TORCH_CHECK(
        l >= 0 && l < L,
        "Transformer::set_recompute: layer ",
        l,
        " is not a layer index in [0, ",
        L,
        ")");
  }
  for (int64_t i = 0; i < L; ++i) {
    const bool listed = which.empty() ||
                        std::find(which.begin(), which.end(), i) != which.end();
    layers[i]->as<BlockImpl>()->recompute = listed ? mode : Recompute::none;
  }
}

} // namespace moeyard
