#pragma once
// The model's configuration: every field has a default, a one-line doc and,
// if a number, a valid range (docs/model.md lists them; config.cpp declares
// the ranges once, in model_fields / moe_fields). Built from YAML (a file, a
// string, or a node of a larger config); unknown keys, wrong types, values
// outside their range and inconsistent values are errors naming the key
// path and where it was given.

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/moe_forward.h"

namespace YAML {
class Node;
}
namespace moeyard::config {
class YamlReader;
}

namespace moeyard {

struct MoEConfig {
  int64_t num_experts = 8; // routed experts E (0: no MoE layers)
  int64_t ffn_size = 0; // width of each routed expert (0: model.ffn_size)
  int64_t moe_every_n = 1; // MoE in layer i when (i + 1) % n == 0
  int64_t first_k_dense = 0; // the first k layers are dense
  std::vector<int64_t> layers; // explicit MoE layers (overrides the two above)
  int64_t num_shared_experts = 0; // always-on experts
  int64_t shared_ffn_size = 0; // width of each shared expert (0: ffn_size)
  bool shared_gate = false; // sigmoid gate on the shared output (Qwen2-MoE)
  bool router_bias = false; // router linear has a bias (GPT-OSS)
  bool selection_bias = false; // aux-loss-free bias buffer (DeepSeek-V3)
  bool expert_bias = false; // per-expert biases b_gate_up, b_down (GPT-OSS)
  double expert_dropout = 0.0; // dropout on expert activations in training
  // aux loss coefficients (summed into the loss by Transformer::loss)
  double switch_coeff = 0.01;
  bool switch_per_sequence = false; // balance per sequence, then average
  double importance_coeff = 0.0;
  double load_coeff = 0.0;
  double z_coeff = 0.001;
  // top_k, score_fn, capacity, drop policy, noise, expert activation, ...
  MoEOptions routing;
};

struct ModelConfig {
  int64_t vocab_size = 256;
  int64_t hidden_size = 128;
  int64_t num_layers = 2;
  int64_t num_heads = 4;
  int64_t num_kv_heads = 0; // 0: num_heads (MHA); 1: MQA; else GQA
  int64_t head_dim = 0; // 0: hidden_size / num_heads
  int64_t ffn_size = 512; // dense MLP width
  int64_t dense_ffn_size = 0; // dense layers in an MoE model (0: ffn_size)
  std::string mlp = "swiglu"; // "swiglu" | "gelu"
  std::string norm = "rmsnorm"; // "rmsnorm" | "layernorm"
  double norm_eps = 1e-6;
  std::string qk_norm = "none"; // "none" | "head" | "projection"
  bool qkv_bias = false; // biases on q/k/v projections
  bool attention_bias = false; // biases on q/k/v/o (MLA: q_a, kv_a, o)
  double clip_qkv = 0.0; // > 0: clamp q, k, v projections to [-c, c]
  std::string attention = "mha"; // "mha" | "mla" (multi-head latent)
  int64_t q_lora_rank = 0; // MLA: q low-rank width (0: plain q_proj)
  int64_t kv_lora_rank = 0; // MLA: compressed kv width
  int64_t qk_nope_head_dim = 0; // MLA: per-head q/k part without rope
  int64_t qk_rope_head_dim = 0; // MLA: per-head rotary part (k shared)
  int64_t v_head_dim = 0; // MLA: per-head value width
  double attention_scale = 0.0; // softmax scale; 0: derived (see docs)
  bool attention_sinks = false; // learned per-head logit in the softmax
  int64_t sliding_window = 0; // 0: full attention
  // Per layer "full" | "sliding"; empty: all sliding if sliding_window > 0.
  std::vector<std::string> layer_types;
  double rope_theta = 10000.0;
  double rotary_pct = 1.0; // fraction of head_dim that is rotated
  std::string rope_scaling = "none"; // "none" | "linear" | "yarn"
  double rope_factor = 1.0;
  int64_t rope_original_max_position = 2048; // YaRN
  double yarn_beta_fast = 32.0;
  double yarn_beta_slow = 1.0;
  bool yarn_truncate = true; // floor/ceil the correction range
  double yarn_mscale = 0.0; // attention factor mscale (0: unset)
  double yarn_mscale_all_dim = 0.0; // mscale_all_dim (0: unset)
  double yarn_attention_factor = 0.0; // explicit cos/sin factor (0: derived)
  bool rope_interleave = false; // rotary pairs are (x0,x1),(x2,x3),...
  int64_t max_seq_len = 2048;
  bool tie_embeddings = true;
  std::string dtype = "float32"; // experts/attention dtype; router is fp32
  MoEConfig moe;

  // Derived values.
  int64_t kv_heads() const {
    return num_kv_heads > 0 ? num_kv_heads : num_heads;
  }
  int64_t dim_per_head() const {
    return head_dim > 0 ? head_dim : hidden_size / num_heads;
  }
  bool is_mla() const {
    return attention == "mla";
  }
  // Rotated features per head (MLA: qk_rope_head_dim).
  int64_t rope_dim() const;
  // q/k width per head (MLA: qk_nope_head_dim + qk_rope_head_dim).
  int64_t qk_head_dim() const {
    return is_mla() ? qk_nope_head_dim + qk_rope_head_dim : dim_per_head();
  }
  // Window of layer i: sliding_window for a "sliding" layer, else 0.
  int64_t window_of(int64_t i) const;
  bool is_moe_layer(int64_t i) const;

  // Names a key ("model.num_heads", "moe.top_k", "parallel.tensor_parallel")
  // in an error message with where it was given: "model.num_heads
  // (tiny.yaml:9)". Empty: the bare key.
  using KeyNamer = std::function<std::string(const std::string& key)>;

  // Throws c10::Error naming the fields, their values and where they were
  // given on a value outside its range or inconsistent values.
  void validate(const KeyNamer& name = {}) const;
  // Errors unless the model splits over `tp` tensor-parallel ranks: heads,
  // kv heads, vocabulary and dense-MLP width divisible by tp; no MLA.
  void check_tensor_parallel(int64_t tp, const KeyNamer& name = {}) const;

  static ModelConfig from_yaml(
      const YAML::Node& node,
      const std::string& path = "model",
      const std::string& file = "");
  static ModelConfig from_yaml_string(const std::string& text);
  static ModelConfig from_yaml_file(const std::string& file);
};

// Readers of the two sections, for configs that hold them at other paths
// (the trainer's top-level `model:` and `moe:`). read_model_field reads one
// key only (e.g. max_seq_len beside model.init_from).
void read_model_fields(config::YamlReader& r, ModelConfig& c);
void read_model_field(config::YamlReader& r, ModelConfig& c, const char* key);
void read_moe_config(config::YamlReader r, MoEConfig& m);

} // namespace moeyard
