// GPT-OSS (transformers' GptOssConfig, GptOssForCausalLM): GQA with q/k/v/o
// biases and attention sinks, alternating sliding/full layers, a router
// with a bias (softmax over the top-k logits), experts with biases and the
// clamped SwiGLU, stored fused with gate and up interleaved.

#include "io/hf/family.h"

namespace moeyard::io::hf {
using json = nlohmann::json;

namespace {

// GptOssConfig's computed defaults: the rotary settings when config.json
// gives none (or null; a non-empty rope_scaling still wins over them), and
// without layer_types even layers sliding, odd layers full.
void derived_defaults(json& hf) {
  if (!hf.contains("rope_parameters") || hf.at("rope_parameters").is_null()) {
    hf["rope_parameters"] = {
        {"rope_type", "yarn"},
        {"factor", 32.0},
        {"beta_fast", 32.0},
        {"beta_slow", 1.0},
        {"truncate", false},
        {"original_max_position_embeddings", 4096}};
  }
  const json& layers = hf.at("num_hidden_layers");
  if ((!hf.contains("layer_types") || hf.at("layer_types").is_null()) &&
      layers.is_number_integer() && layers.get<int64_t>() >= 0) {
    json types = json::array();
    for (int64_t i = 0; i < layers.get<int64_t>(); ++i) {
      types.push_back((i + 1) % 2 ? "sliding_attention" : "full_attention");
    }
    hf["layer_types"] = types;
  }
}

void read(const JsonReader& r, ModelConfig& c) {
  auto& m = c.moe;
  m.num_experts = r.need<int64_t>("num_local_experts");
  m.ffn_size = c.ffn_size;
  m.routing.renormalize = true; // softmax over the top-k logits
  m.routing.swiglu_alpha = r.need<double>("swiglu_alpha");
  m.routing.swiglu_limit = r.need<double>("swiglu_limit");
}

void write(const ModelConfig& c, json& j, const Cannot& cannot) {
  const auto& r = c.moe.routing;
  json types = json::array();
  for (int64_t i = 0; i < c.num_layers; ++i) {
    types.push_back(
        c.window_of(i) > 0 ? "sliding_attention" : "full_attention");
  }
  j["layer_types"] = types;
  j["sliding_window"] = c.sliding_window;
  check_moe_every_layer(c, cannot);
  cannot(r.renormalize, "moe.renormalize = false");
  cannot(c.attention_bias, "attention without biases");
  j["intermediate_size"] = expert_ffn_size(c);
  j["num_local_experts"] = c.moe.num_experts;
  j["swiglu_alpha"] = r.swiglu_alpha;
  j["swiglu_limit"] = r.swiglu_limit;
}

// Fused experts only: gate_up_proj [E, H, 2F] with gate and up interleaved
// in the last dim, down_proj [E, F, H], and their biases.
std::vector<TensorRule> experts() {
  const std::string X = "{moe}.experts.";
  TensorRule w_gate_up{"{layer}.moe.w_gate_up", {X + "gate_up_proj"}};
  w_gate_up.interleaved = w_gate_up.transposed = true;
  TensorRule b_gate_up{"{layer}.moe.b_gate_up", {X + "gate_up_proj_bias"}};
  b_gate_up.interleaved = true;
  TensorRule w_down{"{layer}.moe.w_down", {X + "down_proj"}};
  w_down.transposed = true;
  return {
      w_gate_up,
      b_gate_up,
      w_down,
      {"{layer}.moe.b_down", {X + "down_proj_bias"}},
      {"{layer}.moe.router.bias", {"{moe}.router.bias"}}};
}

} // namespace

HfFamily gpt_oss_family() {
  HfFamily f;
  f.model_type = "gpt_oss";
  f.architecture = "GptOssForCausalLM";
  f.defaults = {
      {"num_hidden_layers", 36},       {"num_local_experts", 128},
      {"vocab_size", 201088},          {"hidden_size", 2880},
      {"intermediate_size", 2880},     {"head_dim", 64},
      {"num_attention_heads", 64},     {"num_key_value_heads", 8},
      {"sliding_window", 128},         {"tie_word_embeddings", false},
      {"hidden_act", "silu"},          {"max_position_embeddings", 131072},
      {"rms_norm_eps", 1e-5},          {"num_experts_per_tok", 4},
      {"swiglu_alpha", 1.702},         {"swiglu_limit", 7.0},
      {"router_aux_loss_coef", 0.001}, {"attention_bias", true},
      {"rope_theta", 150000.0},
  };
  f.aliases = {{"num_experts", "num_local_experts"}};
  f.derived_defaults = derived_defaults;
  f.traits.activation = "clamped_swiglu";
  f.traits.router_bias = true;
  f.traits.expert_bias = true;
  f.traits.attention_sinks = true;
  f.traits.attention_bias_key = true;
  f.traits.head_dim_key = true;
  f.traits.window_keys = true;
  f.read = read;
  f.write = write;
  f.tensors = join({common_tensor_rules(), router_rules("router"), experts()});
  return f;
}

} // namespace moeyard::io::hf
