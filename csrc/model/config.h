#pragma once
// The model's configuration: every field has a default, a one-line doc and,
// if a number, a valid range (docs/model.md lists them; config.cpp declares
// the ranges once: model_fields in config_fields.h, the `moe:` keys in the
// tables of moe_interface.h and MOEYARD_MOE_STRUCTURE below). Read from YAML
// by config/model_yaml.h; unknown keys, wrong types, values outside their
// range and inconsistent values are errors naming the key path and where it
// was given.

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/moe_forward.h"

namespace moeyard {

// The MoE layers' structure, what parameters they have: X(type, name,
// default, allowed, doc) as in moe_interface.h. With the routing options and
// the aux-loss coefficients of moe_interface.h these are the `moe:` keys.
#define MOEYARD_MOE_STRUCTURE(X)                                            \
  X(int64_t,                                                                \
    num_experts,                                                            \
    8,                                                                      \
    at_least(0),                                                            \
    "routed experts E; 0 = a dense model")                                  \
  X(int64_t,                                                                \
    ffn_size,                                                               \
    0,                                                                      \
    at_least(0),                                                            \
    "routed expert width; 0 = `model.ffn_size`")                            \
  X(int64_t,                                                                \
    moe_every_n,                                                            \
    1,                                                                      \
    at_least(1),                                                            \
    "MoE in layer i when `(i + 1) % n == 0` ...")                           \
  X(int64_t, first_k_dense, 0, at_least(0), "... and `i >= first_k_dense`") \
  X(std::vector<int64_t>,                                                   \
    layers,                                                                 \
    {},                                                                     \
    at_least(0),                                                            \
    "explicit MoE layer indices, each in `[0, num_layers)` (overrides the " \
    "two above)")                                                           \
  X(int64_t,                                                                \
    num_shared_experts,                                                     \
    0,                                                                      \
    at_least(0),                                                            \
    "always-on SwiGLU experts (fused, width `num_shared_experts * "         \
    "shared_ffn_size`)")                                                    \
  X(int64_t,                                                                \
    shared_ffn_size,                                                        \
    0,                                                                      \
    at_least(0),                                                            \
    "width of each shared expert; 0 = routed expert width")                 \
  X(bool,                                                                   \
    shared_gate,                                                            \
    false,                                                                  \
    any(),                                                                  \
    "shared output times `sigmoid(x w)` (Qwen2-MoE)")                       \
  X(bool, router_bias, false, any(), "bias on the router linear (GPT-OSS)") \
  X(bool,                                                                   \
    selection_bias,                                                         \
    false,                                                                  \
    any(),                                                                  \
    "aux-loss-free balancing buffer `selection_bias [E]` (selection only)") \
  X(bool,                                                                   \
    expert_bias,                                                            \
    false,                                                                  \
    any(),                                                                  \
    "per-expert biases `b_gate_up [E, 2F]` (after the gate_up matmul) and " \
    "`b_down [E, H]` (after the down matmul) (GPT-OSS)")                    \
  X(int64_t,                                                                \
    critic_hidden,                                                          \
    0,                                                                      \
    at_least(0),                                                            \
    "a routing critic per MoE layer, an MLP `H -> critic_hidden -> 1` "     \
    "predicting each token's loss increase if its lowest-weight pick is "   \
    "skipped (trained as `critic:` says); 0 = none")

struct MoEConfig {
#define MOEYARD_DECLARE(type, name, def, allowed, doc) type name = def;
  MOEYARD_MOE_STRUCTURE(MOEYARD_DECLARE)
#undef MOEYARD_DECLARE
  // top_k, score_fn, capacity, noise, activation, aux-loss coefficients, ...
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
};

} // namespace moeyard
