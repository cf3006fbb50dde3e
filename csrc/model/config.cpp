#include "model/config.h"

#include <c10/util/Exception.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>

#include "config/yaml_reader.h"

namespace moeyard {

using config::Range;

// Every field of the two sections once: its key, its member and, for
// numbers, its valid range (docs/model.md lists the same ranges). `field`
// is called as field(key, member) or field(key, member, range); the YAML
// readers read with it, validate() checks configs from other sources with
// it. Ranges that depend on another key are checked in validate().
template <typename Model, typename F>
void model_fields(Model& c, F&& field) {
  field("vocab_size", c.vocab_size, Range::at_least(1));
  field("hidden_size", c.hidden_size, Range::at_least(1));
  field("num_layers", c.num_layers, Range::at_least(1));
  field("num_heads", c.num_heads, Range::at_least(1));
  field("num_kv_heads", c.num_kv_heads, Range::at_least(0));
  field("head_dim", c.head_dim, Range::at_least(0));
  field("ffn_size", c.ffn_size, Range::at_least(1));
  field("dense_ffn_size", c.dense_ffn_size, Range::at_least(0));
  field("mlp", c.mlp);
  field("norm", c.norm);
  field("norm_eps", c.norm_eps, Range::greater_than(0));
  field("qk_norm", c.qk_norm);
  field("qkv_bias", c.qkv_bias);
  field("attention_bias", c.attention_bias);
  field("clip_qkv", c.clip_qkv, Range::at_least(0));
  field("attention", c.attention);
  field("q_lora_rank", c.q_lora_rank, Range::at_least(0));
  field("kv_lora_rank", c.kv_lora_rank, Range::at_least(0));
  field("qk_nope_head_dim", c.qk_nope_head_dim, Range::at_least(0));
  field("qk_rope_head_dim", c.qk_rope_head_dim, Range::at_least(0));
  field("v_head_dim", c.v_head_dim, Range::at_least(0));
  field("attention_scale", c.attention_scale, Range::at_least(0));
  field("attention_sinks", c.attention_sinks);
  field("sliding_window", c.sliding_window, Range::at_least(0));
  field("layer_types", c.layer_types);
  field("rope_theta", c.rope_theta, Range::greater_than(0));
  field("rotary_pct", c.rotary_pct, Range::closed(0, 1));
  field("rope_scaling", c.rope_scaling);
  field("rope_factor", c.rope_factor, Range::at_least(1));
  field(
      "rope_original_max_position",
      c.rope_original_max_position,
      Range::at_least(1));
  field("yarn_beta_fast", c.yarn_beta_fast, Range::greater_than(0));
  field("yarn_beta_slow", c.yarn_beta_slow, Range::greater_than(0));
  field("yarn_truncate", c.yarn_truncate);
  field("yarn_mscale", c.yarn_mscale, Range::at_least(0));
  field("yarn_mscale_all_dim", c.yarn_mscale_all_dim, Range::at_least(0));
  field("yarn_attention_factor", c.yarn_attention_factor, Range::at_least(0));
  field("rope_interleave", c.rope_interleave);
  field("max_seq_len", c.max_seq_len, Range::at_least(1));
  field("tie_embeddings", c.tie_embeddings);
  field("dtype", c.dtype);
}

template <typename MoE, typename F>
void moe_fields(MoE& m, F&& field) {
  field("num_experts", m.num_experts, Range::at_least(0));
  field("ffn_size", m.ffn_size, Range::at_least(0));
  field("moe_every_n", m.moe_every_n, Range::at_least(1));
  field("first_k_dense", m.first_k_dense, Range::at_least(0));
  field("layers", m.layers, Range::at_least(0)); // < model.num_layers
  field("num_shared_experts", m.num_shared_experts, Range::at_least(0));
  field("shared_ffn_size", m.shared_ffn_size, Range::at_least(0));
  field("shared_gate", m.shared_gate);
  field("router_bias", m.router_bias);
  field("selection_bias", m.selection_bias);
  field("expert_bias", m.expert_bias);
  field("expert_dropout", m.expert_dropout, Range::closed_open(0, 1));
  field("switch_coeff", m.switch_coeff, Range::at_least(0));
  field("switch_per_sequence", m.switch_per_sequence);
  field("importance_coeff", m.importance_coeff, Range::at_least(0));
  field("load_coeff", m.load_coeff, Range::at_least(0));
  field("z_coeff", m.z_coeff, Range::at_least(0));
  auto& o = m.routing;
  field("top_k", o.top_k, Range::at_least(1)); // <= moe.num_experts
  field("score_fn", o.score_fn);
  field("renormalize", o.renormalize);
  field("scale", o.scale, Range::greater_than(0));
  field("num_groups", o.num_groups, Range::at_least(1)); // divides E
  field("topk_groups", o.topk_groups, Range::at_least(1)); // <= num_groups
  field("routing", o.routing);
  field("weight_on_input", o.weight_on_input);
  field("capacity_factor", o.capacity_factor, Range::at_least(0));
  field("min_capacity", o.min_capacity, Range::at_least(1));
  field("drop_policy", o.drop_policy);
  field("noise", o.noise);
  field("noise_eps", o.noise_eps, Range::closed_open(0, 1));
  field("temperature", o.temperature, Range::greater_than(0));
  field("activation", o.activation);
  field("swiglu_alpha", o.swiglu_alpha, Range::greater_than(0));
  field("swiglu_limit", o.swiglu_limit, Range::greater_than(0));
}

void read_model_fields(config::YamlReader& r, ModelConfig& c) {
  model_fields(c, [&](const char* key, auto& v, const auto&... range) {
    r.get(key, v, range...);
  });
}

void read_model_field(config::YamlReader& r, ModelConfig& c, const char* key) {
  model_fields(c, [&](const char* k, auto& v, const auto&... range) {
    if (std::string(k) == key) {
      r.get(k, v, range...);
    }
  });
}

void read_moe_config(config::YamlReader r, MoEConfig& m) {
  moe_fields(m, [&](const char* key, auto& v, const auto&... range) {
    r.get(key, v, range...);
  });
  r.finish();
}

namespace {

template <typename T>
void check_one_of(
    const std::string& field,
    const std::string& v,
    std::initializer_list<T> allowed) {
  for (const auto& a : allowed) {
    if (v == a) {
      return;
    }
  }
  std::string list;
  for (const auto& a : allowed) {
    list += (list.empty() ? "" : ", ") + std::string(a);
  }
  TORCH_CHECK(
      false, "config: ", field, " must be one of ", list, ", got '", v, "'");
}

std::string shown(int64_t v) {
  return std::to_string(v);
}
std::string shown(double v) {
  return config::show_number(v);
}
std::string shown(const std::string& v) {
  return "'" + v + "'";
}

// Keys in messages: "model.num_heads (tiny.yaml:9)" and, with the value,
// "model.num_heads (tiny.yaml:9) = 4".
struct Names {
  const ModelConfig::KeyNamer& name;
  std::string at(const std::string& key) const {
    return name ? name(key) : key;
  }
  template <typename V>
  std::string is(const std::string& key, const V& v) const {
    return at(key) + " = " + shown(v);
  }
};

// A number of a config from any source (YAML has been checked on reading).
void check_value(const std::string& name, double v, const Range& range) {
  config::check_range(name, v, range);
}
void check_value(
    const std::string& name,
    const std::vector<int64_t>& v,
    const Range& range) {
  for (const auto x : v) {
    TORCH_CHECK(
        range.contains(static_cast<double>(x)),
        "config: ",
        name,
        ": entry ",
        x,
        " is outside ",
        range.str());
  }
}

void validate_mla(const ModelConfig& c, const Names& n) {
  const std::string mla = " with " + n.is("model.attention", c.attention);
  auto at_least = [&](const char* f, int64_t v, int64_t lo) {
    TORCH_CHECK(v >= lo, "config: ", n.is(f, v), " must be >= ", lo, mla);
  };
  at_least("model.kv_lora_rank", c.kv_lora_rank, 1);
  at_least("model.qk_rope_head_dim", c.qk_rope_head_dim, 2);
  at_least("model.v_head_dim", c.v_head_dim, 1);
  TORCH_CHECK(
      c.qk_rope_head_dim % 2 == 0,
      "config: ",
      n.is("model.qk_rope_head_dim", c.qk_rope_head_dim),
      " must be even");
  TORCH_CHECK(
      c.kv_heads() == c.num_heads,
      "config: ",
      n.is("model.num_kv_heads", c.num_kv_heads),
      " must be 0 or ",
      n.is("model.num_heads", c.num_heads),
      mla);
  TORCH_CHECK(
      c.qk_norm == "none",
      "config: ",
      n.is("model.qk_norm", c.qk_norm),
      " must be 'none'",
      mla);
  TORCH_CHECK(
      c.clip_qkv == 0,
      "config: ",
      n.is("model.clip_qkv", c.clip_qkv),
      " must be 0",
      mla);
}

void validate_moe(const ModelConfig& c, const Names& n) {
  const auto& moe = c.moe;
  const auto& o = moe.routing;
  const std::string experts = n.is("moe.num_experts", moe.num_experts);
  TORCH_CHECK(
      o.top_k <= moe.num_experts,
      "config: ",
      n.is("moe.top_k", o.top_k),
      " is outside [1, ",
      experts,
      "]");
  for (auto l : moe.layers) {
    TORCH_CHECK(
        l < c.num_layers,
        "config: ",
        n.at("moe.layers"),
        ": entry ",
        l,
        " is not a layer index in [0, ",
        n.is("model.num_layers", c.num_layers),
        ")");
  }
  TORCH_CHECK(
      moe.num_experts % o.num_groups == 0,
      "config: ",
      n.is("moe.num_groups", o.num_groups),
      " must divide ",
      experts);
  TORCH_CHECK(
      o.topk_groups <= o.num_groups,
      "config: ",
      n.is("moe.topk_groups", o.topk_groups),
      " is outside [1, ",
      n.is("moe.num_groups", o.num_groups),
      "]");
  check_one_of("moe.score_fn", o.score_fn, {"softmax", "sigmoid"});
  check_one_of("moe.routing", o.routing, {"token_choice", "expert_choice"});
  check_one_of("moe.drop_policy", o.drop_policy, {"position", "probs"});
  check_one_of(
      "moe.noise", o.noise, {"none", "noisy_topk", "gumbel", "jitter"});
  check_one_of("moe.activation", o.activation, {"swiglu", "clamped_swiglu"});
}

} // namespace

int64_t ModelConfig::rope_dim() const {
  if (is_mla()) {
    return qk_rope_head_dim;
  }
  return static_cast<int64_t>(rotary_pct * dim_per_head());
}

int64_t ModelConfig::window_of(int64_t i) const {
  if (layer_types.empty()) {
    return sliding_window;
  }
  return layer_types.at(i) == "sliding" ? sliding_window : 0;
}

bool ModelConfig::is_moe_layer(int64_t i) const {
  if (moe.num_experts <= 0) {
    return false;
  }
  if (!moe.layers.empty()) {
    return std::find(moe.layers.begin(), moe.layers.end(), i) !=
           moe.layers.end();
  }
  return i >= moe.first_k_dense && (i + 1) % moe.moe_every_n == 0;
}

void ModelConfig::validate(const KeyNamer& name) const {
  const Names n{name};
  // Every number in its range: read from YAML it was checked on reading;
  // this covers configs from other sources (config.json, C++).
  model_fields(*this, [&](const char* key, const auto& v, const auto&... r) {
    if constexpr (sizeof...(r) == 1) {
      check_value(n.at(std::string("model.") + key), v, r...);
    }
  });
  moe_fields(moe, [&](const char* key, const auto& v, const auto&... r) {
    if constexpr (sizeof...(r) == 1) {
      check_value(n.at(std::string("moe.") + key), v, r...);
    }
  });
  TORCH_CHECK(
      head_dim > 0 || is_mla() || hidden_size % num_heads == 0,
      "config: ",
      n.is("model.num_heads", num_heads),
      " must divide ",
      n.is("model.hidden_size", hidden_size),
      " unless model.head_dim is set");
  TORCH_CHECK(
      num_heads % kv_heads() == 0,
      "config: ",
      n.is("model.num_kv_heads", num_kv_heads),
      " must divide ",
      n.is("model.num_heads", num_heads));
  const int64_t rot = static_cast<int64_t>(rotary_pct * dim_per_head());
  TORCH_CHECK(
      is_mla() || rot % 2 == 0,
      "config: ",
      n.is("model.rotary_pct", rotary_pct),
      " must give an even number of rotary dims (head_dim ",
      dim_per_head(),
      " -> ",
      rot,
      ")");
  check_one_of("model.mlp", mlp, {"swiglu", "gelu"});
  check_one_of("model.norm", norm, {"rmsnorm", "layernorm"});
  check_one_of("model.qk_norm", qk_norm, {"none", "head", "projection"});
  check_one_of("model.rope_scaling", rope_scaling, {"none", "linear", "yarn"});
  check_one_of("model.dtype", dtype, {"float32", "bfloat16", "float64"});
  check_one_of("model.attention", attention, {"mha", "mla"});
  if (is_mla()) {
    validate_mla(*this, n);
  }
  if (!layer_types.empty()) {
    TORCH_CHECK(
        static_cast<int64_t>(layer_types.size()) == num_layers,
        "config: ",
        n.at("model.layer_types"),
        " has ",
        layer_types.size(),
        " entries, ",
        n.is("model.num_layers", num_layers));
    for (const auto& t : layer_types) {
      check_one_of("model.layer_types entry", t, {"full", "sliding"});
      TORCH_CHECK(
          t != "sliding" || sliding_window > 0,
          "config: ",
          n.at("model.layer_types"),
          " has a 'sliding' layer but ",
          n.is("model.sliding_window", sliding_window));
    }
  }
  if (moe.num_experts > 0) {
    validate_moe(*this, n);
  }
}

ModelConfig ModelConfig::from_yaml(
    const YAML::Node& node, const std::string& path, const std::string& file) {
  ModelConfig c;
  config::YamlReader r(node, path, file);
  read_model_fields(r, c);
  read_moe_config(r.child("moe"), c.moe);
  r.finish();
  // "model.num_heads" is `num_heads` here, "moe.top_k" `moe.top_k`.
  c.validate([&](const std::string& key) {
    const bool model = key.rfind("model.", 0) == 0;
    const std::string loc = r.locate(model ? key.substr(6) : key);
    return key + (loc.empty() ? " (default)" : loc);
  });
  return c;
}

ModelConfig ModelConfig::from_yaml_string(const std::string& text) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    TORCH_CHECK(false, "config: cannot parse YAML: ", e.what());
  }
  return from_yaml(root, "");
}

ModelConfig ModelConfig::from_yaml_file(const std::string& file) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(file);
  } catch (const YAML::Exception& e) {
    TORCH_CHECK(false, "config: cannot read ", file, ": ", e.what());
  }
  return from_yaml(root, "", file);
}

void ModelConfig::check_tensor_parallel(
    int64_t tp, const KeyNamer& name) const {
  const Names n{name};
  const std::string tp_is = n.is("parallel.tensor_parallel", tp);
  TORCH_CHECK(tp >= 1, "config: ", tp_is, " is outside [1, inf)");
  if (tp == 1) {
    return;
  }
  auto divides = [&](const char* field, int64_t value) {
    TORCH_CHECK(
        value % tp == 0,
        "config: ",
        tp_is,
        " must divide ",
        n.is(field, value));
  };
  divides("model.num_heads", num_heads);
  if (!is_mla()) {
    // Split kv heads, or (fewer kv heads than ranks) whole ones on every rank.
    TORCH_CHECK(
        kv_heads() % tp == 0 || tp % kv_heads() == 0,
        "config: ",
        tp_is,
        " must divide ",
        n.is("model.num_kv_heads", kv_heads()),
        " or be a multiple of it");
  }
  divides("model.vocab_size", vocab_size);
  for (int64_t i = 0; i < num_layers; ++i) {
    if (!is_moe_layer(i)) {
      if (moe.num_experts > 0 && dense_ffn_size > 0) {
        divides("model.dense_ffn_size", dense_ffn_size);
      } else {
        divides("model.ffn_size", ffn_size);
      }
      break;
    }
  }
}

} // namespace moeyard
