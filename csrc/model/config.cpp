#include "model/config.h"

#include <c10/util/Exception.h>

#include <algorithm>

#include "config/range.h"
#include "model/config_fields.h"
#include "util/dtype.h"

namespace moeyard {

using config::Range;

namespace {

void check_one_of(
    const std::string& field,
    const std::string& v,
    const std::vector<std::string>& allowed) {
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
void check_one_of(
    const std::string& field,
    const std::string& v,
    std::initializer_list<const char*> allowed) {
  check_one_of(
      field, v, std::vector<std::string>(allowed.begin(), allowed.end()));
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
  for_each_moe_option(o, [&](const char* key, const auto& v, const auto& a) {
    if constexpr (std::is_same_v<std::decay_t<decltype(v)>, std::string>) {
      const auto names = moe_spec::choices_of(a);
      check_one_of(std::string("moe.") + key, v, names);
    }
  });
  // The combinations the layer refuses (routing with null experts, groups,
  // score function), named as the layer names them.
  check_moe_options(o, moe.num_experts, "config: moe");
  TORCH_CHECK(
      moe.critic_hidden == 0 || o.routing != "expert_choice",
      "config: ",
      n.is("moe.critic_hidden", moe.critic_hidden),
      " needs a token-choice routing (the critic skips a token's lowest "
      "pick), got 'expert_choice'");
  TORCH_CHECK(
      !moe.selection_bias || o.routing == "token_choice",
      "config: ",
      n.at("moe.selection_bias"),
      ": true needs moe.routing: token_choice, got '",
      o.routing,
      "'");
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
  check_one_of("model.dtype", dtype, dtype_names());
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
