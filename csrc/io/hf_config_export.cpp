// ModelConfig -> config.json (export): the checks and keys every family
// shares and the rotary settings; each family's own keys and checks are in
// csrc/io/hf/<family>.cpp. Import is hf_config.cpp.

#include "io/hf/family.h"
#include "io/hf_checkpoint.h"

namespace moeyard::io {
using json = nlohmann::json;

namespace {

std::string str(bool b) {
  return std::to_string(b);
}

// What the family fixes must be what the model has (the q/k norm is
// checked last).
void check_traits(
    const hf::HfTraits& t, const ModelConfig& c, const hf::Cannot& cannot) {
  const auto& m = c.moe;
  const auto& r = m.routing;
  cannot(r.score_fn == t.score_fn, "moe.score_fn = " + r.score_fn);
  if (!t.group_routing_keys) {
    cannot(r.scale == 1.0, "moe.scale != 1");
    cannot(r.num_groups == 1, "group-limited top-k (moe.num_groups > 1)");
  }
  cannot(
      m.router_bias == t.router_bias,
      "moe.router_bias = " + str(m.router_bias));
  cannot(
      m.expert_bias == t.expert_bias,
      "moe.expert_bias = " + str(m.expert_bias));
  cannot(r.activation == t.activation, "moe.activation = " + r.activation);
  cannot(
      m.selection_bias == t.selection_bias,
      "moe.selection_bias = " + str(m.selection_bias));
  cannot(
      c.attention_sinks == t.attention_sinks,
      "model.attention_sinks = " + str(c.attention_sinks));
  cannot(c.attention == t.attention, "model.attention = " + c.attention);
}

// The settings config.json has a key for, or moeyard's default without one.
void write_trait_keys(
    const hf::HfTraits& t,
    const ModelConfig& c,
    json& j,
    const hf::Cannot& cannot) {
  if (t.attention_bias_key) {
    j["attention_bias"] = c.attention_bias;
  } else {
    cannot(!c.attention_bias, "model.attention_bias");
  }
  if (t.qkv_bias_key) {
    j["qkv_bias"] = c.qkv_bias;
  } else {
    cannot(!c.qkv_bias, "qkv bias");
  }
  if (t.clip_qkv_key) {
    j["clip_qkv"] = c.clip_qkv > 0 ? json(c.clip_qkv) : json(nullptr);
  } else {
    cannot(c.clip_qkv == 0.0, "model.clip_qkv");
  }
  if (t.rope_interleave_key) {
    j["rope_interleave"] = c.rope_interleave;
  } else {
    cannot(!c.rope_interleave, "model.rope_interleave");
  }
  if (t.head_dim_key) {
    j["head_dim"] = c.dim_per_head();
  } else if (!c.is_mla()) {
    cannot(
        c.dim_per_head() * c.num_heads == c.hidden_size,
        "head_dim != hidden_size / num_heads");
  }
  if (!t.window_keys) {
    bool any_sliding = false;
    for (int64_t i = 0; i < c.num_layers; ++i) {
      any_sliding |= c.window_of(i) > 0;
    }
    cannot(!any_sliding, "a sliding window");
    j.erase("layer_types");
  }
}

json rope_parameters(const ModelConfig& c) {
  json rope = {{"rope_theta", c.rope_theta}};
  if (c.rope_scaling == "none") {
    rope["rope_type"] = "default";
    return rope;
  }
  rope["rope_type"] = c.rope_scaling;
  rope["factor"] = c.rope_factor;
  if (c.rope_scaling == "yarn") {
    rope["original_max_position_embeddings"] = c.rope_original_max_position;
    rope["beta_fast"] = c.yarn_beta_fast;
    rope["beta_slow"] = c.yarn_beta_slow;
    rope["truncate"] = c.yarn_truncate;
    if (c.yarn_mscale > 0) {
      rope["mscale"] = c.yarn_mscale;
    }
    if (c.yarn_mscale_all_dim > 0) {
      rope["mscale_all_dim"] = c.yarn_mscale_all_dim;
    }
    if (c.yarn_attention_factor > 0) {
      rope["attention_factor"] = c.yarn_attention_factor;
    }
  }
  return rope;
}

} // namespace

json hf_config_of(
    const ModelConfig& c, const std::string& family, const json& base) {
  const hf::HfFamily& fam = hf::family_of(family, "export");
  const hf::Cannot cannot = [&](bool ok, const std::string& what) {
    TORCH_CHECK(ok, "export to ", family, ": cannot express ", what);
  };
  const auto& r = c.moe.routing;
  cannot(c.mlp == "swiglu", "model.mlp = " + c.mlp);
  cannot(c.norm == "rmsnorm", "model.norm = " + c.norm);
  check_traits(fam.traits, c, cannot);
  cannot(r.routing == "token_choice", "moe.routing = " + r.routing);
  cannot(
      r.null_experts == 0,
      "moe.null_experts = " + std::to_string(r.null_experts));
  cannot(!r.weight_on_input, "moe.weight_on_input");
  cannot(c.rotary_pct == 1.0, "partial rotary (model.rotary_pct < 1)");

  json j = base.is_object() ? base : json::object();
  // An alias left in `base` would be read for its key by transformers (and
  // by the importer): the keys written here are the only spelling.
  for (const auto& [alias, key] : fam.aliases) {
    j.erase(alias);
  }
  j["model_type"] = family;
  j["architectures"] = json::array({fam.architecture});
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.kv_heads();
  j["rms_norm_eps"] = c.norm_eps;
  j["max_position_embeddings"] = c.max_seq_len;
  j["tie_word_embeddings"] = c.tie_embeddings;
  j["hidden_act"] = "silu";
  j["num_experts_per_tok"] = r.top_k;
  j["dtype"] = c.dtype;
  j.erase("torch_dtype");
  j.erase("quantization_config"); // weights are written unquantized
  j.erase("rope_scaling");
  j.erase("rope_theta");
  j["rope_parameters"] = rope_parameters(c);
  write_trait_keys(fam.traits, c, j, cannot);
  fam.write(c, j, cannot);
  cannot(c.qk_norm == fam.traits.qk_norm, "model.qk_norm = " + c.qk_norm);
  return j;
}

} // namespace moeyard::io
