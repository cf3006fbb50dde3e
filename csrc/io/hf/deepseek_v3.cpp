// DeepSeek-V3 (transformers' DeepseekV3Config, DeepseekV3ForCausalLM):
// multi-head latent attention, sigmoid scores with a selection bias,
// group-limited top-k scaled by routed_scaling_factor, shared experts, the
// first k layers dense.

#include "io/hf/family.h"

namespace moeyard::io::hf {
using json = nlohmann::json;

namespace {

void read(const JsonReader& r, ModelConfig& c) {
  auto& m = c.moe;
  c.head_dim = 0; // config.json's head_dim is the rotary width
  c.num_kv_heads = 0;
  c.q_lora_rank = r.get<int64_t>("q_lora_rank", 0); // null: q_proj
  c.kv_lora_rank = r.need<int64_t>("kv_lora_rank");
  c.qk_nope_head_dim = r.need<int64_t>("qk_nope_head_dim");
  c.qk_rope_head_dim = r.need<int64_t>("qk_rope_head_dim");
  c.v_head_dim = r.need<int64_t>("v_head_dim");
  m.num_experts = r.need<int64_t>("n_routed_experts");
  m.ffn_size = r.need<int64_t>("moe_intermediate_size");
  // transformers' DeepseekV3DecoderLayer: MoE iff layer >=
  // first_k_dense_replace. moe_layer_freq (in DeepSeek's own files, and
  // honoured by its remote code as layer % freq == 0) is not read by
  // transformers, whose weights are laid out without it; so neither is it
  // here.
  m.first_k_dense = r.need<int64_t>("first_k_dense_replace");
  m.moe_every_n = 1;
  // null is transformers' None: falsy, no renormalization
  m.routing.renormalize = r.get<bool>("norm_topk_prob", false);
  m.routing.scale = r.need<double>("routed_scaling_factor");
  m.routing.num_groups = r.need<int64_t>("n_group");
  m.routing.topk_groups = r.need<int64_t>("topk_group");
  m.num_shared_experts = r.need<int64_t>("n_shared_experts");
  m.shared_ffn_size = m.ffn_size;
  r.only<std::string>("topk_method", "noaux_tc", "DeepSeek-V3 routing");
  r.only<std::string>("scoring_func", "sigmoid", "DeepSeek-V3 routing");
}

void write(const ModelConfig& c, json& j, const Cannot& cannot) {
  const auto& m = c.moe;
  const auto& r = m.routing;
  const int64_t F = expert_ffn_size(c);
  cannot(!m.shared_gate, "a gated shared expert");
  cannot(
      m.num_shared_experts == 0 || m.shared_ffn_size == 0 ||
          m.shared_ffn_size == F,
      "shared experts narrower or wider than the routed ones");
  // Dense layers must be exactly the first k (moe_every_n = 1).
  const auto dense = dense_layers(c);
  for (size_t k = 0; k < dense.size(); ++k) {
    cannot(
        dense[k] == static_cast<int64_t>(k),
        "dense layers other than the first k");
  }
  cannot(c.attention_scale == 0.0, "an explicit model.attention_scale");
  j["n_routed_experts"] = m.num_experts;
  j["moe_intermediate_size"] = F;
  j["intermediate_size"] = c.dense_ffn_size > 0 ? c.dense_ffn_size : c.ffn_size;
  j["first_k_dense_replace"] = dense.size();
  j["n_shared_experts"] = m.num_shared_experts;
  j["routed_scaling_factor"] = r.scale;
  j["n_group"] = r.num_groups;
  j["topk_group"] = r.topk_groups;
  j["norm_topk_prob"] = r.renormalize;
  j["q_lora_rank"] = c.q_lora_rank > 0 ? json(c.q_lora_rank) : json(nullptr);
  j["kv_lora_rank"] = c.kv_lora_rank;
  j["qk_nope_head_dim"] = c.qk_nope_head_dim;
  j["qk_rope_head_dim"] = c.qk_rope_head_dim;
  j["qk_head_dim"] = c.qk_nope_head_dim + c.qk_rope_head_dim;
  j["head_dim"] = c.qk_rope_head_dim;
  j["v_head_dim"] = c.v_head_dim;
  j["num_key_value_heads"] = c.num_heads;
  // The export carries no multi-token-prediction layers (absent, the key
  // would mean DeepseekV3Config's 1).
  j["num_nextn_predict_layers"] = 0;
}

} // namespace

HfFamily deepseek_v3_family() {
  HfFamily f;
  f.model_type = "deepseek_v3";
  f.architecture = "DeepseekV3ForCausalLM";
  f.defaults = {
      {"vocab_size", 129280},
      {"hidden_size", 7168},
      {"intermediate_size", 18432},
      {"moe_intermediate_size", 2048},
      {"num_hidden_layers", 61},
      {"num_attention_heads", 128},
      {"num_key_value_heads", 128},
      {"n_shared_experts", 1},
      {"n_routed_experts", 256},
      {"routed_scaling_factor", 2.5},
      {"kv_lora_rank", 512},
      {"q_lora_rank", 1536},
      {"qk_rope_head_dim", 64},
      {"v_head_dim", 128},
      {"qk_nope_head_dim", 128},
      {"n_group", 8},
      {"topk_group", 4},
      {"num_experts_per_tok", 8},
      {"first_k_dense_replace", 3},
      {"norm_topk_prob", true},
      {"hidden_act", "silu"},
      {"max_position_embeddings", 4096},
      {"rms_norm_eps", 1e-6},
      {"tie_word_embeddings", false},
      {"rope_interleave", true},
      {"attention_bias", false},
      {"num_nextn_predict_layers", 1},
      {"rope_theta", 1e4},
  }; // no router_aux_loss_coef: no load-balancing loss
  f.aliases = {
      {"num_local_experts", "n_routed_experts"},
      {"num_mtp_layers", "num_nextn_predict_layers"}};
  f.traits.attention = "mla";
  f.traits.score_fn = "sigmoid";
  f.traits.selection_bias = true; // e_score_correction_bias
  f.traits.attention_bias_key = true;
  f.traits.rope_interleave_key = true;
  f.traits.group_routing_keys = true;
  f.read = read;
  f.write = write;
  f.tensors =
      join({default_tensor_rules(), shared_expert_rules("shared_experts")});
  // Multi-token-prediction modules (model.layers.{L} .. {L + n - 1} after
  // the L decoder layers): not part of the causal LM's forward, which
  // transformers does not load them into either.
  f.unused_layers_key = "num_nextn_predict_layers";
  return f;
}

} // namespace moeyard::io::hf
