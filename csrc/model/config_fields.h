#pragma once
// Every key of the model's two config sections once, with its member and,
// for numbers, its valid range: model_fields lists `model:`, moe_fields the
// `moe:` keys from the MoE tables (MOEYARD_MOE_STRUCTURE, then the routing
// options and aux-loss coefficients of moe_interface.h). `field` is called
// as field(key, member) or field(key, member, range); the YAML reader
// (config/model_yaml.cpp) reads with it, ModelConfig::validate checks
// configs from other sources with it. Ranges that depend on another key are
// checked in validate().

#include <type_traits>

#include "model/config.h"

namespace moeyard {

template <typename Model, typename F>
void model_fields(Model& c, F&& field) {
  field("vocab_size", c.vocab_size, config::Range::at_least(1));
  field("hidden_size", c.hidden_size, config::Range::at_least(1));
  field("num_layers", c.num_layers, config::Range::at_least(1));
  field("num_heads", c.num_heads, config::Range::at_least(1));
  field("num_kv_heads", c.num_kv_heads, config::Range::at_least(0));
  field("head_dim", c.head_dim, config::Range::at_least(0));
  field("ffn_size", c.ffn_size, config::Range::at_least(1));
  field("dense_ffn_size", c.dense_ffn_size, config::Range::at_least(0));
  field("mlp", c.mlp);
  field("norm", c.norm);
  field("norm_eps", c.norm_eps, config::Range::greater_than(0));
  field("qk_norm", c.qk_norm);
  field("qkv_bias", c.qkv_bias);
  field("attention_bias", c.attention_bias);
  field("clip_qkv", c.clip_qkv, config::Range::at_least(0));
  field("attention", c.attention);
  field("q_lora_rank", c.q_lora_rank, config::Range::at_least(0));
  field("kv_lora_rank", c.kv_lora_rank, config::Range::at_least(0));
  field("qk_nope_head_dim", c.qk_nope_head_dim, config::Range::at_least(0));
  field("qk_rope_head_dim", c.qk_rope_head_dim, config::Range::at_least(0));
  field("v_head_dim", c.v_head_dim, config::Range::at_least(0));
  field("attention_scale", c.attention_scale, config::Range::at_least(0));
  field("attention_sinks", c.attention_sinks);
  field("sliding_window", c.sliding_window, config::Range::at_least(0));
  field("layer_types", c.layer_types);
  field("rope_theta", c.rope_theta, config::Range::greater_than(0));
  field("rotary_pct", c.rotary_pct, config::Range::closed(0, 1));
  field("rope_scaling", c.rope_scaling);
  field("rope_factor", c.rope_factor, config::Range::at_least(1));
  field(
      "rope_original_max_position",
      c.rope_original_max_position,
      config::Range::at_least(1));
  field("yarn_beta_fast", c.yarn_beta_fast, config::Range::greater_than(0));
  field("yarn_beta_slow", c.yarn_beta_slow, config::Range::greater_than(0));
  field("yarn_truncate", c.yarn_truncate);
  field("yarn_mscale", c.yarn_mscale, config::Range::at_least(0));
  field(
      "yarn_mscale_all_dim", c.yarn_mscale_all_dim, config::Range::at_least(0));
  field(
      "yarn_attention_factor",
      c.yarn_attention_factor,
      config::Range::at_least(0));
  field("rope_interleave", c.rope_interleave);
  field("max_seq_len", c.max_seq_len, config::Range::at_least(1));
  field("tie_embeddings", c.tie_embeddings);
  field("dtype", c.dtype);
}

// One row of an MoE table as a field: numbers with their range.
template <typename T, typename F>
void moe_field(F& field, const char* key, T& v, const moe_spec::Allowed& a) {
  using V = std::remove_const_t<T>;
  if constexpr (
      std::is_same_v<V, int64_t> || std::is_same_v<V, double> ||
      std::is_same_v<V, std::vector<int64_t>>) {
    field(key, v, a.range);
  } else {
    field(key, v);
  }
}

template <typename MoE, typename F>
void moe_fields(MoE& m, F&& field) {
  using namespace moe_spec;
#define MOEYARD_FIELD(type, name, def, allowed, doc) \
  moe_field(field, #name, m.name, allowed);
  MOEYARD_MOE_STRUCTURE(MOEYARD_FIELD)
#undef MOEYARD_FIELD
  for_each_moe_option(m.routing, [&](const char* key, auto& v, const auto& a) {
    moe_field(field, key, v, a);
  });
}

} // namespace moeyard
