// Mixtral (transformers' MixtralConfig, MixtralForCausalLM): GQA with an
// optional sliding window, softmax top-k renormalized in every layer.

#include "io/hf/family.h"

namespace moeyard::io::hf {
using json = nlohmann::json;

namespace {

void read(const JsonReader& r, ModelConfig& c) {
  auto& m = c.moe;
  m.num_experts = r.need<int64_t>("num_local_experts");
  m.ffn_size = c.ffn_size;
  m.routing.renormalize = true;
  c.sliding_window = r.get<int64_t>("sliding_window", 0);
  if (r.need<double>("router_jitter_noise") > 0) {
    m.routing.noise = "jitter";
    m.routing.noise_eps = r.need<double>("router_jitter_noise");
  }
}

void write(const ModelConfig& c, json& j, const Cannot& cannot) {
  const auto& r = c.moe.routing;
  cannot(c.layer_types.empty(), "per-layer attention kinds");
  j["sliding_window"] =
      c.sliding_window > 0 ? json(c.sliding_window) : json(nullptr);
  check_moe_every_layer(c, cannot);
  cannot(r.renormalize, "moe.renormalize = false");
  j["intermediate_size"] = expert_ffn_size(c);
  j["num_local_experts"] = c.moe.num_experts;
  j["router_jitter_noise"] = r.noise == "jitter" ? r.noise_eps : 0.0;
}

} // namespace

HfFamily mixtral_family() {
  HfFamily f;
  f.model_type = "mixtral";
  f.architecture = "MixtralForCausalLM";
  f.defaults = {
      {"vocab_size", 32000},
      {"hidden_size", 4096},
      {"intermediate_size", 14336},
      {"num_hidden_layers", 32},
      {"num_attention_heads", 32},
      {"num_key_value_heads", 8}, // null: num_attention_heads
      {"hidden_act", "silu"},
      {"max_position_embeddings", 4096 * 32},
      {"rms_norm_eps", 1e-5},
      {"tie_word_embeddings", false},
      {"num_experts_per_tok", 2},
      {"num_local_experts", 8},
      {"router_aux_loss_coef", 0.001},
      {"router_jitter_noise", 0.0},
      {"rope_theta", 1e6},
  }; // head_dim, sliding_window: None
  f.aliases = {{"num_experts", "num_local_experts"}};
  f.traits.head_dim_key = true;
  f.traits.window_keys = true;
  f.read = read;
  f.write = write;
  // save_pretrained's names: block_sparse_moe, experts' w1 (gate), w3 (up)
  // and w2 (down).
  f.moe_block = "block_sparse_moe";
  f.tensors = join(
      {common_tensor_rules(),
       router_rules("gate"),
       expert_rules("w1", "w3", "w2")});
  return f;
}

} // namespace moeyard::io::hf
