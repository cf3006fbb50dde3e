// Pieces of the family descriptions that several families share.

#include "io/hf/family.h"

namespace moeyard::io::hf {

std::vector<TensorRule> common_tensor_rules() {
  std::vector<TensorRule> rules = {
      {"embed.weight", {"model.embed_tokens.weight"}},
      {"norm.weight", {"model.norm.weight"}},
      {"lm_head.weight", {"lm_head.weight"}},
      {"{layer}.attn_norm.weight", {"{layer}.input_layernorm.weight"}},
      {"{layer}.mlp_norm.weight", {"{layer}.post_attention_layernorm.weight"}},
      {"{layer}.attn.sinks", {"{layer}.self_attn.sinks"}},
      {"{layer}.mlp.gate_up.weight",
       {"{layer}.mlp.gate_proj.weight", "{layer}.mlp.up_proj.weight"}},
      {"{layer}.mlp.down.weight", {"{layer}.mlp.down_proj.weight"}},
  };
  // moeyard attention module -> transformers' self_attn module.
  const std::vector<std::pair<std::string, std::string>> attn = {
      {"q_proj", "q_proj"},
      {"k_proj", "k_proj"},
      {"v_proj", "v_proj"},
      {"o_proj", "o_proj"},
      {"q_norm", "q_norm"},
      {"k_norm", "k_norm"},
      {"q_a_proj", "q_a_proj"},
      {"q_a_norm", "q_a_layernorm"},
      {"q_b_proj", "q_b_proj"},
      {"kv_a_proj", "kv_a_proj_with_mqa"},
      {"kv_a_norm", "kv_a_layernorm"},
      {"kv_b_proj", "kv_b_proj"}};
  for (const auto& [mine, theirs] : attn) {
    for (const std::string what : {"weight", "bias"}) {
      rules.push_back(
          {"{layer}.attn." + mine + "." + what,
           {"{layer}.self_attn." + theirs + "." + what}});
    }
  }
  return rules;
}

std::vector<TensorRule> router_rules(const std::string& router) {
  const std::string R = "{moe}." + router;
  TensorRule selection_bias{
      "{layer}.moe.selection_bias", {R + ".e_score_correction_bias"}};
  // A bias enabled for fine-tuning a checkpoint without one starts at zero.
  selection_bias.optional = true;
  selection_bias.float32 = true;
  return {{"{layer}.moe.router.weight", {R + ".weight"}}, selection_bias};
}

std::vector<TensorRule> expert_rules(
    const std::string& gate, const std::string& up, const std::string& down) {
  const std::string X = "{moe}.experts.";
  return {
      {"{layer}.moe.w_gate_up",
       {X + "{e}." + gate + ".weight", X + "{e}." + up + ".weight"},
       X + "gate_up_proj"},
      {"{layer}.moe.w_down", {X + "{e}." + down + ".weight"}, X + "down_proj"},
  };
}

std::vector<TensorRule> default_tensor_rules() {
  return join(
      {common_tensor_rules(),
       router_rules("gate"),
       expert_rules("gate_proj", "up_proj", "down_proj")});
}

std::vector<TensorRule> shared_expert_rules(const std::string& name) {
  const std::string S = "{moe}." + name + ".";
  return {
      {"{layer}.moe.shared_gate_up",
       {S + "gate_proj.weight", S + "up_proj.weight"}},
      {"{layer}.moe.shared_down", {S + "down_proj.weight"}},
  };
}

std::vector<TensorRule> join(std::vector<std::vector<TensorRule>> parts) {
  std::vector<TensorRule> out;
  for (auto& p : parts) {
    out.insert(out.end(), p.begin(), p.end());
  }
  return out;
}

void set_moe_layers(ModelConfig& c, std::vector<int64_t> layers) {
  c.moe.moe_every_n = 1;
  c.moe.first_k_dense = 0;
  if (static_cast<int64_t>(layers.size()) == c.num_layers) {
    c.moe.layers.clear();
  } else {
    c.moe.layers = std::move(layers);
  }
}

std::vector<int64_t> dense_layers(const ModelConfig& c) {
  std::vector<int64_t> dense;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    if (!c.is_moe_layer(i)) {
      dense.push_back(i);
    }
  }
  return dense;
}

int64_t expert_ffn_size(const ModelConfig& c) {
  return c.moe.ffn_size > 0 ? c.moe.ffn_size : c.ffn_size;
}

void check_moe_every_layer(const ModelConfig& c, const Cannot& cannot) {
  cannot(dense_layers(c).empty(), "dense layers");
  cannot(c.moe.num_shared_experts == 0, "shared experts");
}

} // namespace moeyard::io::hf
