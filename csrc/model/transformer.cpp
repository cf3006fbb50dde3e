#include "model/transformer.h"
#include "model/init.h"
#include "ops/linear.h"
#include "util/dtype.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

namespace moeyard {

// ---- Linear, Norm ---------------------------------------------------------

LinearImpl::LinearImpl(
    int64_t in, int64_t out, bool has_bias, at::ScalarType dt) {
  weight =
      register_parameter("weight", at::empty({out, in}, param_options(dt)));
  if (has_bias) {
    bias = register_parameter("bias", at::zeros({out}, param_options(dt)));
  }
}

at::Tensor LinearImpl::forward(const at::Tensor& x, bool add_bias) const {
  // A frozen LoRA base may be stored in another dtype (model/lora.h).
  const auto w = weight.scalar_type() == x.scalar_type()
                     ? weight
                     : weight.to(x.scalar_type());
  auto y = ops::linear(
      x, w, add_bias && bias.defined() ? std::optional(bias) : std::nullopt);
  if (lora_a.defined()) {
    const auto in = lora_dropout > 0 && is_training()
                        ? at::dropout(x, lora_dropout, /*train=*/true)
                        : x;
    y = y + ops::linear(ops::linear(in, lora_a), lora_b) * lora_scale;
  }
  return y;
}

NormImpl::NormImpl(
    int64_t dim, const std::string& kind, double e, at::ScalarType dt)
    : layernorm(kind == "layernorm"), eps(e) {
  weight = register_parameter("weight", at::ones({dim}, param_options(dt)));
  if (layernorm) {
    bias = register_parameter("bias", at::zeros({dim}, param_options(dt)));
  }
}

at::Tensor NormImpl::forward(const at::Tensor& x) const {
  if (layernorm) {
    return at::layer_norm(x, {x.size(-1)}, weight, bias, eps);
  }
  // HF convention: normalize in float32, cast back, then scale.
  const auto xf = x.scalar_type() == at::kDouble ? x : x.to(at::kFloat);
  const auto mean_sq =
      tp ? parallel::all_reduce_tp(xf.square().sum(-1, true), *tp) /
               static_cast<double>(full_dim)
         : xf.square().mean(-1, true);
  const auto normed = xf * at::rsqrt(mean_sq + eps);
  return weight * normed.to(x.scalar_type());
}

// ---- MLP, MoE -------------------------------------------------------------

MlpImpl::MlpImpl(
    int64_t H, int64_t F, const std::string& kind, at::ScalarType dt) {
  if (kind == "swiglu") {
    gate_up = register_module("gate_up", Linear(H, 2 * F, false, dt));
  } else {
    up = register_module("up", Linear(H, F, false, dt));
  }
  down = register_module("down", Linear(F, H, false, dt));
}

at::Tensor MlpImpl::forward(const at::Tensor& x_in) const {
  // Under tensor parallelism: column-parallel in, row-parallel out.
  const auto x = tp ? parallel::copy_to_tp(x_in, *tp) : x_in;
  at::Tensor a;
  if (gate_up) {
    auto h = gate_up->forward(x);
    const int64_t F = h.size(-1) / 2;
    a = at::silu(h.narrow(-1, 0, F)) * h.narrow(-1, F, F);
  } else {
    a = at::gelu(up->forward(x), "tanh");
  }
  const auto y = down->forward(a);
  return tp ? parallel::reduce_from_tp(y, *tp) : y;
}

MoELayerImpl::MoELayerImpl(const ModelConfig& c) : options(c.moe.routing) {
  const auto dt = parse_dtype(c.dtype);
  const auto& m = c.moe;
  const int64_t H = c.hidden_size, E = m.num_experts;
  const int64_t routed = E + m.routing.null_experts; // router rows
  const int64_t F = m.ffn_size > 0 ? m.ffn_size : c.ffn_size;
  // The router is float32 (float64 in a float64 model), whatever the experts.
  const auto router_dt = dt == at::kDouble ? at::kDouble : at::kFloat;
  router =
      register_module("router", Linear(H, routed, m.router_bias, router_dt));
  w_gate_up = register_parameter(
      "w_gate_up", at::empty({E, 2 * F, H}, param_options(dt)));
  w_down =
      register_parameter("w_down", at::empty({E, H, F}, param_options(dt)));
  if (m.num_shared_experts > 0) {
    const int64_t Fs =
        m.num_shared_experts * (m.shared_ffn_size > 0 ? m.shared_ffn_size : F);
    shared_gate_up = register_parameter(
        "shared_gate_up", at::empty({2 * Fs, H}, param_options(dt)));
    shared_down = register_parameter(
        "shared_down", at::empty({H, Fs}, param_options(dt)));
    if (m.shared_gate) {
      shared_gate = register_parameter(
          "shared_gate", at::empty({1, H}, param_options(dt)));
    }
  }
  if (m.expert_bias) {
    b_gate_up = register_parameter(
        "b_gate_up", at::zeros({E, 2 * F}, param_options(dt)));
    b_down = register_parameter("b_down", at::zeros({E, H}, param_options(dt)));
  }
  if (m.selection_bias) {
    selection_bias = register_buffer(
        "selection_bias", at::zeros({routed}, at::dtype(router_dt)));
  }
  if (options.noise == "noisy_topk") {
    noise_weight = register_parameter(
        "noise_weight", at::zeros({routed, H}, param_options(router_dt)));
  }
  if (m.critic_hidden > 0) {
    const int64_t c = m.critic_hidden;
    critic_w1 = register_parameter(
        "critic_w1", at::empty({c, H}, param_options(router_dt)));
    critic_b1 = register_parameter(
        "critic_b1", at::zeros({c}, param_options(router_dt)));
    critic_w2 = register_parameter(
        "critic_w2", at::empty({1, c}, param_options(router_dt)));
    critic_b2 = register_parameter(
        "critic_b2", at::zeros({1}, param_options(router_dt)));
    critic_threshold = register_buffer(
        "critic_threshold",
        at::full(
            {1},
            -std::numeric_limits<double>::infinity(),
            at::dtype(router_dt)));
  }
}

at::Tensor MoELayerImpl::critic(const at::Tensor& x) const {
  const auto in = x.detach().to(critic_w1.scalar_type());
  const auto h = at::relu(at::linear(in, critic_w1, critic_b1));
  return at::linear(h, critic_w2, critic_b2).squeeze(-1);
}

MoEWeights MoELayerImpl::weights() const {
  return {
      router->weight,
      router->bias,
      w_gate_up,
      w_down,
      shared_gate_up,
      shared_down,
      shared_gate,
      selection_bias,
      noise_weight,
      b_gate_up,
      b_down,
      lora_gate_up_a,
      lora_gate_up_b,
      lora_down_a,
      lora_down_b,
      lora_scale,
      lora_dropout};
}

MoEOutput MoELayerImpl::forward(
    const at::Tensor& x,
    const at::Tensor& mask,
    const at::Tensor& token_ids) const {
  MoEOptions o = options;
  o.training = is_training();
  if (capture_input) {
    captured_input = x.detach();
  }
  at::Tensor drop;
  if (drop_all_lowest) {
    drop =
        at::ones(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kBool));
  } else if (critic_w1.defined() && (!o.training || critic_in_training)) {
    // No host read of the threshold: at -inf (not calibrated) no token is
    // below it.
    at::NoGradGuard g;
    drop = critic(x) < critic_threshold;
  }
  return moe_forward(x, weights(), o, mask, token_ids, drop);
}

void MoELayerImpl::update_selection_bias(
    const at::Tensor& load, double rate, const at::Tensor& gate) {
  TORCH_CHECK(
      selection_bias.defined(),
      "MoE: update_selection_bias needs moe.selection_bias: true");
  at::NoGradGuard g;
  // The real experts are balanced; null experts have their own controller.
  const int64_t E = load.size(0) - options.null_experts;
  const auto l = load.narrow(0, 0, E).to(at::kFloat);
  const auto move = at::sign(l.mean() - l);
  selection_bias.narrow(0, 0, E).add_(
      gate.defined() ? move * gate : move, rate);
}

void MoELayerImpl::update_null_bias(
    const at::Tensor& load,
    double target,
    double rate,
    const at::Tensor& gate) {
  const int64_t Z = options.null_experts;
  TORCH_CHECK(
      selection_bias.defined() && Z > 0,
      "MoE: update_null_bias needs moe.null_experts > 0 and "
      "moe.selection_bias: true");
  at::NoGradGuard g;
  const auto l = load.to(at::kFloat);
  const auto share = l.narrow(0, l.size(0) - Z, Z).sum() / l.sum().clamp_min(1);
  const auto move = at::sign(target - share);
  selection_bias.narrow(0, l.size(0) - Z, Z)
      .add_(gate.defined() ? move * gate : move, rate);
}

// ---- Block, Transformer ---------------------------------------------------

BlockImpl::BlockImpl(const ModelConfig& c, int64_t index) {
  const auto dt = parse_dtype(c.dtype);
  attn_norm =
      register_module("attn_norm", Norm(c.hidden_size, c.norm, c.norm_eps, dt));
  attn = register_module("attn", Attention(c, index));
  mlp_norm =
      register_module("mlp_norm", Norm(c.hidden_size, c.norm, c.norm_eps, dt));
  if (c.is_moe_layer(index)) {
    moe = register_module("moe", MoELayer(c));
  } else {
    const bool moe_model = c.moe.num_experts > 0;
    const int64_t F =
        moe_model && c.dense_ffn_size > 0 ? c.dense_ffn_size : c.ffn_size;
    mlp = register_module("mlp", Mlp(c.hidden_size, F, c.mlp, dt));
  }
}

// BlockImpl::forward and forward_with: csrc/model/block_forward.cpp.

at::Tensor BlockImpl::attention_part(
    const at::Tensor& x,
    const at::Tensor& attn_mask,
    const Rotary& rotary) const {
  return attn->forward(attn_norm->forward(x), attn_mask, rotary);
}

at::Tensor BlockImpl::ffn_part(
    const at::Tensor& h,
    const Tokens& tokens,
    std::optional<MoEOutput>& moe_out) const {
  const auto n = mlp_norm->forward(h);
  if (moe) {
    moe_out = moe->forward(n, tokens.mask, tokens.ids);
    return moe_out->y;
  }
  return mlp->forward(n);
}

at::Tensor BlockImpl::forward_cached(
    const at::Tensor& x,
    const at::Tensor& ids,
    KVCache& cache,
    const Rotary& rotary) const {
  auto h = x + attn->forward_cached(attn_norm->forward(x), cache, rotary);
  const auto n = mlp_norm->forward(h);
  return h + (moe ? moe->forward(n, {}, ids).y : mlp->forward(n));
}

TransformerImpl::TransformerImpl(ModelConfig c)
    : config(std::move(c)), rotary(config) {
  config.validate();
  const auto dt = parse_dtype(config.dtype);
  // Embedding [V, H]; stored as a bias-free Linear H -> V so that the
  // parameter is named embed.weight (and lm_head.weight when untied).
  embed = register_module(
      "embed", Linear(config.hidden_size, config.vocab_size, false, dt));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < config.num_layers; ++i) {
    layers->push_back(Block(config, i));
  }
  norm = register_module(
      "norm", Norm(config.hidden_size, config.norm, config.norm_eps, dt));
  if (!config.tie_embeddings) {
    lm_head = register_module(
        "lm_head", Linear(config.hidden_size, config.vocab_size, false, dt));
  }
  init_weights();
}

void TransformerImpl::init_weights(double std) {
  init_parameters(*this, std, init_key_from_default_generator());
}

namespace {

// A [B, S] mask (nonzero = counts) must have the tokens' shape; undefined
// is none.
void check_token_mask(
    const at::Tensor& m, const at::Tensor& tokens, const char* name) {
  TORCH_CHECK(
      !m.defined() || m.sizes() == tokens.sizes(),
      "Transformer: ",
      name,
      " must have the shape of tokens ",
      tokens.sizes(),
      ", got ",
      m.defined() ? m.sizes() : at::IntArrayRef{});
}

// [B, 1, S, S] bool: causal, sliding window, key padding; a query always
// sees itself so that padding rows stay finite.
at::Tensor attention_mask(
    const at::Tensor& mask,
    int64_t B,
    int64_t S,
    int64_t window,
    const at::TensorOptions& opts) {
  const auto i = at::arange(S, opts.dtype(at::kLong)).unsqueeze(1);
  const auto j = at::arange(S, opts.dtype(at::kLong)).unsqueeze(0);
  auto allowed = j <= i;
  if (window > 0) {
    allowed = allowed & (i - j < window);
  }
  auto m = allowed.view({1, 1, S, S}).expand({B, 1, S, S});
  if (mask.defined()) {
    m = m & mask.to(at::kBool).view({B, 1, 1, S});
  }
  return m | at::eye(S, opts.dtype(at::kBool)).view({1, 1, S, S});
}

} // namespace

at::Tensor TransformerImpl::embed_tokens(const at::Tensor& tokens) const {
  if (!tp) {
    return at::embedding(embed->weight, tokens);
  }
  return parallel::vocab_parallel_embedding(
      tokens, embed->weight, tp->rank * embed->weight.size(0), *tp);
}

at::Tensor TransformerImpl::local_logits(const at::Tensor& x) const {
  const auto& head = config.tie_embeddings ? embed->weight : lm_head->weight;
  auto logits = ops::linear(tp ? parallel::copy_to_tp(x, *tp) : x, head);
  return logits.scalar_type() == at::kDouble ? logits : logits.to(at::kFloat);
}

TransformerOutput TransformerImpl::forward(
    const at::Tensor& tokens, const at::Tensor& mask) {
  TransformerOutput out;
  const auto x = hidden(tokens, mask, out);
  out.logits = local_logits(x);
  if (tp) { // every rank gets the whole vocabulary
    out.logits = parallel::gather_from_tp(out.logits, -1, *tp);
  }
  return out;
}

at::Tensor TransformerImpl::hidden(
    const at::Tensor& tokens, const at::Tensor& mask, TransformerOutput& out) {
  TORCH_CHECK(
      tokens.dim() == 2 && tokens.scalar_type() == at::kLong,
      "Transformer: tokens must be int64 [batch, seq], got ",
      tokens.scalar_type(),
      " ",
      tokens.sizes());
  const int64_t B = tokens.size(0), S = tokens.size(1);
  check_token_mask(mask, tokens, "mask");
  auto x = embed_tokens(tokens);
  // One mask per distinct window (full and sliding layers), built once.
  std::vector<std::pair<int64_t, at::Tensor>> masks;
  auto mask_for = [&](int64_t window) {
    for (const auto& [w, m] : masks) {
      if (w == window) {
        return m;
      }
    }
    masks.emplace_back(
        window,
        attention_mask(mask, B, S, window, x.options().device(x.device())));
    return masks.back().second;
  };
  for (int64_t i = 0; i < static_cast<int64_t>(layers->size()); ++i) {
    std::optional<MoEOutput> moe_out;
    const auto* block = layers[i]->as<BlockImpl>();
    x = block->forward(
        x, mask_for(block->attn->window), {mask, tokens}, rotary, moe_out);
    if (moe_out) {
      out.moe_layers.push_back({i, std::move(*moe_out)});
    }
  }
  return norm->forward(x);
}

LossOutput TransformerImpl::loss(
    const at::Tensor& tokens,
    const at::Tensor& mask,
    const at::Tensor& loss_mask) {
  LossOutput r;
  const auto x = hidden(tokens, mask, r.out);
  // Under tensor parallelism out.logits holds this rank's vocabulary columns.
  r.out.logits = local_logits(x);
  const int64_t S = tokens.size(1), V = r.out.logits.size(-1);
  const auto logits = r.out.logits.narrow(1, 0, S - 1).reshape({-1, V});
  auto target = tokens.narrow(1, 1, S - 1).reshape({-1});
  r.keep = at::ones_like(target, target.options().dtype(at::kBool));
  check_token_mask(loss_mask, tokens, "loss_mask"); // mask: in hidden()
  for (const auto& m : {mask, loss_mask}) {
    if (m.defined()) {
      r.keep = r.keep & m.narrow(1, 1, S - 1).reshape({-1}).to(at::kBool);
    }
  }
  if (mask.defined() || loss_mask.defined()) {
    target = at::where(r.keep, target, -100);
  }
  r.tokens = r.keep.sum();
  if (tp) {
    r.ce = parallel::vocab_parallel_cross_entropy(
               logits, target, tp->rank * V, -100, *tp)
               .sum() /
           r.tokens.clamp_min(1);
  } else if (loss_mask.defined()) { // a batch may hold no answer token
    r.ce =
        at::cross_entropy_loss(logits, target, {}, at::Reduction::Sum, -100) /
        r.tokens.clamp_min(1);
  } else {
    r.ce =
        at::cross_entropy_loss(logits, target, {}, at::Reduction::Mean, -100);
  }
  // Every aux loss of every MoE layer times its coefficient, in table order.
  r.aux = at::zeros({}, logits.options());
  for (const auto& l : r.out.moe_layers) {
    const auto& o = layers[l.layer]->as<BlockImpl>()->moe->options;
#define MOEYARD_ADD(loss, coeff, def, doc) r.aux = r.aux + o.coeff * l.moe.loss;
    MOEYARD_MOE_AUX_LOSSES(MOEYARD_ADD)
#undef MOEYARD_ADD
  }
  r.loss = r.ce + r.aux;
  return r;
}

} // namespace moeyard
