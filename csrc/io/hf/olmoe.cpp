// OLMoE (transformers' OlmoeConfig, OlmoeForCausalLM): q/k RMSNorm over the
// whole projection, optional clip_qkv, softmax top-k in every layer.

#include "io/hf/family.h"

namespace moeyard::io::hf {
using json = nlohmann::json;

namespace {

void read(const JsonReader& r, ModelConfig& c) {
  c.moe.num_experts = r.need<int64_t>("num_experts");
  c.moe.ffn_size = c.ffn_size;
  c.moe.routing.renormalize = r.need<bool>("norm_topk_prob");
}

void write(const ModelConfig& c, json& j, const Cannot& cannot) {
  check_moe_every_layer(c, cannot);
  j["intermediate_size"] = expert_ffn_size(c);
  j["num_experts"] = c.moe.num_experts;
  j["norm_topk_prob"] = c.moe.routing.renormalize;
}

} // namespace

HfFamily olmoe_family() {
  HfFamily f;
  f.model_type = "olmoe";
  f.architecture = "OlmoeForCausalLM";
  f.defaults = {
      {"vocab_size", 50304},
      {"hidden_size", 2048},
      {"intermediate_size", 2048},
      {"num_hidden_layers", 16},
      {"num_attention_heads", 16},
      {"hidden_act", "silu"},
      {"max_position_embeddings", 4096},
      {"rms_norm_eps", 1e-5},
      {"tie_word_embeddings", false},
      {"attention_bias", false},
      {"num_experts_per_tok", 8},
      {"num_experts", 64},
      {"router_aux_loss_coef", 0.01},
      {"norm_topk_prob", false},
      {"rope_theta", 1e4},
  }; // num_key_value_heads: num_attention_heads; clip_qkv: None
  f.aliases = {{"num_local_experts", "num_experts"}};
  f.traits.qk_norm = "projection";
  f.traits.attention_bias_key = true;
  f.traits.clip_qkv_key = true;
  f.read = read;
  f.write = write;
  f.tensors = default_tensor_rules();
  return f;
}

} // namespace moeyard::io::hf
