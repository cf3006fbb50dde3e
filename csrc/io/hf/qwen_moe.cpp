// Qwen2-MoE and Qwen3-MoE (transformers' Qwen2MoeConfig, Qwen3MoeConfig):
// GQA, softmax top-k, MoE layers chosen by decoder_sparse_step and
// mlp_only_layers. Qwen2-MoE adds q/k/v biases and a shared expert with a
// sigmoid gate; Qwen3-MoE a per-head q/k RMSNorm.

#include <algorithm>

#include "io/hf/family.h"

namespace moeyard::io::hf {
using json = nlohmann::json;

namespace {

// MoE layer indices of decoder_sparse_step + mlp_only_layers.
std::vector<int64_t> sparse_step_layers(const JsonReader& r, int64_t layers) {
  const auto step = r.get<int64_t>("decoder_sparse_step", 1);
  TORCH_CHECK(
      step >= 1, r.file, ": decoder_sparse_step must be >= 1, got ", step);
  const auto mlp_only = r.get<std::vector<int64_t>>("mlp_only_layers", {});
  std::vector<int64_t> out;
  for (int64_t i = 0; i < layers; ++i) {
    const bool dense =
        std::find(mlp_only.begin(), mlp_only.end(), i) != mlp_only.end();
    if (!dense && (i + 1) % step == 0) {
      out.push_back(i);
    }
  }
  TORCH_CHECK(
      !out.empty(),
      r.file,
      ": decoder_sparse_step/mlp_only_layers leave no MoE layer");
  return out;
}

void read_qwen(const JsonReader& r, ModelConfig& c) {
  // Qwen3-MoE's files may name it num_local_experts (an attribute alias);
  // Qwen2-MoE has no such alias.
  c.moe.num_experts = r.need<int64_t>("num_experts");
  c.moe.ffn_size = r.need<int64_t>("moe_intermediate_size");
  c.moe.routing.renormalize = r.need<bool>("norm_topk_prob");
  set_moe_layers(c, sparse_step_layers(r, c.num_layers));
  r.only<bool>(
      "use_sliding_window", false, "per-layer sliding windows of Qwen");
}

void write_qwen(const ModelConfig& c, json& j) {
  j["num_experts"] = c.moe.num_experts;
  j["moe_intermediate_size"] = expert_ffn_size(c);
  j["intermediate_size"] = c.dense_ffn_size > 0 ? c.dense_ffn_size : c.ffn_size;
  j["norm_topk_prob"] = c.moe.routing.renormalize;
  j["decoder_sparse_step"] = 1;
  j["mlp_only_layers"] = dense_layers(c);
  j["use_sliding_window"] = false;
}

void read_qwen2(const JsonReader& r, ModelConfig& c) {
  read_qwen(r, c);
  const auto shared = r.need<int64_t>("shared_expert_intermediate_size");
  if (shared > 0) {
    c.moe.num_shared_experts = 1;
    c.moe.shared_ffn_size = shared;
    c.moe.shared_gate = true;
  }
}

void write_qwen2(const ModelConfig& c, json& j, const Cannot& cannot) {
  const auto& m = c.moe;
  write_qwen(c, j);
  cannot(
      m.num_shared_experts <= 1 && (m.num_shared_experts == 0 || m.shared_gate),
      "shared experts other than one with a sigmoid gate");
  j["shared_expert_intermediate_size"] =
      m.num_shared_experts > 0
          ? (m.shared_ffn_size > 0 ? m.shared_ffn_size : expert_ffn_size(c))
          : 0;
  j["layer_types"] = json::array();
  for (int64_t i = 0; i < c.num_layers; ++i) {
    j["layer_types"].push_back("full_attention");
  }
}

void write_qwen3(const ModelConfig& c, json& j, const Cannot& cannot) {
  write_qwen(c, j);
  cannot(c.moe.num_shared_experts == 0, "shared experts");
}

// The class defaults both config classes share.
json qwen_defaults() {
  return {
      {"vocab_size", 151936},
      {"hidden_size", 2048},
      {"num_hidden_layers", 24},
      {"hidden_act", "silu"},
      {"max_position_embeddings", 32768},
      {"rms_norm_eps", 1e-6},
      {"tie_word_embeddings", false},
      {"use_sliding_window", false},
      {"decoder_sparse_step", 1},
      {"norm_topk_prob", false},
      {"router_aux_loss_coef", 0.001},
      {"mlp_only_layers", json::array()},
      {"rope_theta", 1e4},
  };
}

} // namespace

HfFamily qwen2_moe_family() {
  HfFamily f;
  f.model_type = "qwen2_moe";
  f.architecture = "Qwen2MoeForCausalLM";
  f.defaults = qwen_defaults();
  f.defaults.update({
      {"intermediate_size", 5632},
      {"num_attention_heads", 16},
      {"num_key_value_heads", 16},
      {"moe_intermediate_size", 1408},
      {"shared_expert_intermediate_size", 5632},
      {"num_experts_per_tok", 4},
      {"num_experts", 60},
      {"qkv_bias", true},
  }); // no aliases: num_local_experts is not read
  f.traits.qkv_bias_key = true;
  f.read = read_qwen2;
  f.write = write_qwen2;
  TensorRule shared_gate{
      "{layer}.moe.shared_gate", {"{moe}.shared_expert_gate.weight"}};
  f.tensors = join(
      {default_tensor_rules(),
       shared_expert_rules("shared_expert"),
       {shared_gate}});
  return f;
}

HfFamily qwen3_moe_family() {
  HfFamily f;
  f.model_type = "qwen3_moe";
  f.architecture = "Qwen3MoeForCausalLM";
  f.defaults = qwen_defaults();
  f.defaults.update({
      {"intermediate_size", 6144},
      {"num_attention_heads", 32},
      {"num_key_value_heads", 4},
      {"attention_bias", false},
      {"moe_intermediate_size", 768},
      {"num_experts_per_tok", 8},
      {"num_experts", 128},
  }); // head_dim: hidden_size / num_attention_heads
  f.aliases = {{"num_local_experts", "num_experts"}};
  f.traits.qk_norm = "head";
  f.traits.attention_bias_key = true;
  f.traits.head_dim_key = true;
  f.read = read_qwen;
  f.write = write_qwen3;
  f.tensors = default_tensor_rules();
  return f;
}

} // namespace moeyard::io::hf
