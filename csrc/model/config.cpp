#include "model/config.h"

#include <c10/util/Exception.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>

#include "config/yaml_reader.h"

namespace moeyard {

void read_moe_config(config::YamlReader r, MoEConfig& m) {
  r.get("num_experts", m.num_experts);
  r.get("ffn_size", m.ffn_size);
  r.get("moe_every_n", m.moe_every_n);
  r.get("first_k_dense", m.first_k_dense);
  r.get("layers", m.layers);
  r.get("num_shared_experts", m.num_shared_experts);
  r.get("shared_ffn_size", m.shared_ffn_size);
  r.get("shared_gate", m.shared_gate);
  r.get("router_bias", m.router_bias);
  r.get("selection_bias", m.selection_bias);
  r.get("expert_bias", m.expert_bias);
  r.get("expert_dropout", m.expert_dropout);
  r.get("switch_coeff", m.switch_coeff);
  r.get("switch_per_sequence", m.switch_per_sequence);
  r.get("importance_coeff", m.importance_coeff);
  r.get("load_coeff", m.load_coeff);
  r.get("z_coeff", m.z_coeff);
  auto& o = m.routing;
  r.get("top_k", o.top_k);
  r.get("score_fn", o.score_fn);
  r.get("renormalize", o.renormalize);
  r.get("scale", o.scale);
  r.get("num_groups", o.num_groups);
  r.get("topk_groups", o.topk_groups);
  r.get("routing", o.routing);
  r.get("weight_on_input", o.weight_on_input);
  r.get("capacity_factor", o.capacity_factor);
  r.get("min_capacity", o.min_capacity);
  r.get("drop_policy", o.drop_policy);
  r.get("noise", o.noise);
  r.get("noise_eps", o.noise_eps);
  r.get("temperature", o.temperature);
  r.get("activation", o.activation);
  r.get("swiglu_alpha", o.swiglu_alpha);
  r.get("swiglu_limit", o.swiglu_limit);
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

void validate_mla(const ModelConfig& c) {
  auto at_least = [](const char* f, int64_t v, int64_t lo) {
    TORCH_CHECK(
        v >= lo,
        "config: ",
        f,
        " must be >= ",
        lo,
        " with model.attention 'mla', got ",
        v);
  };
  at_least("model.kv_lora_rank", c.kv_lora_rank, 1);
  at_least("model.qk_rope_head_dim", c.qk_rope_head_dim, 2);
  at_least("model.qk_nope_head_dim", c.qk_nope_head_dim, 0);
  at_least("model.v_head_dim", c.v_head_dim, 1);
  at_least("model.q_lora_rank", c.q_lora_rank, 0);
  TORCH_CHECK(
      c.qk_rope_head_dim % 2 == 0,
      "config: model.qk_rope_head_dim (",
      c.qk_rope_head_dim,
      ") must be even");
  TORCH_CHECK(
      c.kv_heads() == c.num_heads,
      "config: model.num_kv_heads (",
      c.num_kv_heads,
      ") must be 0 or model.num_heads (",
      c.num_heads,
      ") with model.attention 'mla'");
  TORCH_CHECK(
      c.qk_norm == "none",
      "config: model.qk_norm ('",
      c.qk_norm,
      "') must be 'none' with model.attention 'mla'");
  TORCH_CHECK(
      c.clip_qkv == 0,
      "config: model.clip_qkv (",
      c.clip_qkv,
      ") must be 0 with model.attention 'mla'");
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

void ModelConfig::validate() const {
  auto positive = [](const char* f, int64_t v) {
    TORCH_CHECK(v >= 1, "config: ", f, " must be >= 1, got ", v);
  };
  positive("model.vocab_size", vocab_size);
  positive("model.hidden_size", hidden_size);
  positive("model.num_layers", num_layers);
  positive("model.num_heads", num_heads);
  positive("model.ffn_size", ffn_size);
  positive("model.max_seq_len", max_seq_len);
  TORCH_CHECK(
      head_dim > 0 || is_mla() || hidden_size % num_heads == 0,
      "config: model.num_heads (",
      num_heads,
      ") must divide model.hidden_size (",
      hidden_size,
      ") unless model.head_dim is set");
  TORCH_CHECK(
      num_kv_heads >= 0 && num_heads % kv_heads() == 0,
      "config: model.num_kv_heads (",
      num_kv_heads,
      ") must divide model.num_heads (",
      num_heads,
      ")");
  const int64_t rot = static_cast<int64_t>(rotary_pct * dim_per_head());
  TORCH_CHECK(
      is_mla() || (rotary_pct >= 0 && rotary_pct <= 1 && rot % 2 == 0),
      "config: model.rotary_pct (",
      rotary_pct,
      ") must be in [0, 1] and give an "
      "even number of rotary dims (head_dim ",
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
    validate_mla(*this);
  }
  TORCH_CHECK(
      clip_qkv >= 0, "config: model.clip_qkv must be >= 0, got ", clip_qkv);
  TORCH_CHECK(
      attention_scale >= 0,
      "config: model.attention_scale must be >= 0, got ",
      attention_scale);
  TORCH_CHECK(
      yarn_mscale >= 0 && yarn_mscale_all_dim >= 0 &&
          yarn_attention_factor >= 0,
      "config: model.yarn_mscale (",
      yarn_mscale,
      "), model.yarn_mscale_all_dim (",
      yarn_mscale_all_dim,
      ") and model.yarn_attention_factor (",
      yarn_attention_factor,
      ") must be >= 0");
  if (!layer_types.empty()) {
    TORCH_CHECK(
        static_cast<int64_t>(layer_types.size()) == num_layers,
        "config: model.layer_types has ",
        layer_types.size(),
        " entries, model.num_layers is ",
        num_layers);
    for (const auto& t : layer_types) {
      check_one_of("model.layer_types entry", t, {"full", "sliding"});
      TORCH_CHECK(
          t != "sliding" || sliding_window > 0,
          "config: model.layer_types has a 'sliding' layer but "
          "model.sliding_window is ",
          sliding_window);
    }
  }
  TORCH_CHECK(
      rope_factor >= 1.0,
      "config: model.rope_factor must be >= 1, got ",
      rope_factor);
  TORCH_CHECK(
      sliding_window >= 0,
      "config: model.sliding_window must be >= 0, got ",
      sliding_window);
  TORCH_CHECK(
      norm_eps > 0, "config: model.norm_eps must be > 0, got ", norm_eps);
  if (moe.num_experts <= 0) {
    return;
  }
  const auto& o = moe.routing;
  TORCH_CHECK(
      o.top_k >= 1 && o.top_k <= moe.num_experts,
      "config: moe.top_k (",
      o.top_k,
      ") must be in [1, moe.num_experts=",
      moe.num_experts,
      "]");
  positive("moe.moe_every_n", moe.moe_every_n);
  TORCH_CHECK(
      moe.first_k_dense >= 0,
      "config: moe.first_k_dense must be >= 0, got ",
      moe.first_k_dense);
  for (auto l : moe.layers) {
    TORCH_CHECK(
        l >= 0 && l < num_layers,
        "config: moe.layers entry ",
        l,
        " is not a layer index in [0, ",
        num_layers,
        ")");
  }
  TORCH_CHECK(
      o.capacity_factor <= 0 || o.capacity_factor > 0,
      "config: moe.capacity_factor is NaN");
  TORCH_CHECK(
      o.num_groups >= 1 && moe.num_experts % o.num_groups == 0,
      "config: moe.num_groups (",
      o.num_groups,
      ") must divide moe.num_experts (",
      moe.num_experts,
      ")");
  TORCH_CHECK(
      o.topk_groups >= 1 && o.topk_groups <= o.num_groups,
      "config: moe.topk_groups (",
      o.topk_groups,
      ") must be in [1, moe.num_groups=",
      o.num_groups,
      "]");
  check_one_of("moe.score_fn", o.score_fn, {"softmax", "sigmoid"});
  check_one_of("moe.routing", o.routing, {"token_choice", "expert_choice"});
  check_one_of("moe.drop_policy", o.drop_policy, {"position", "probs"});
  check_one_of(
      "moe.noise", o.noise, {"none", "noisy_topk", "gumbel", "jitter"});
  TORCH_CHECK(
      moe.expert_dropout >= 0 && moe.expert_dropout < 1,
      "config: moe.expert_dropout must be in [0, 1), got ",
      moe.expert_dropout);
  TORCH_CHECK(
      moe.num_shared_experts >= 0,
      "config: moe.num_shared_experts must be >= 0, got ",
      moe.num_shared_experts);
  check_one_of("moe.activation", o.activation, {"swiglu", "clamped_swiglu"});
  TORCH_CHECK(
      o.activation == "swiglu" || o.swiglu_limit > 0,
      "config: moe.swiglu_limit must be > 0, got ",
      o.swiglu_limit);
}

void read_model_fields(config::YamlReader& r, ModelConfig& c) {
  r.get("vocab_size", c.vocab_size);
  r.get("hidden_size", c.hidden_size);
  r.get("num_layers", c.num_layers);
  r.get("num_heads", c.num_heads);
  r.get("num_kv_heads", c.num_kv_heads);
  r.get("head_dim", c.head_dim);
  r.get("ffn_size", c.ffn_size);
  r.get("dense_ffn_size", c.dense_ffn_size);
  r.get("mlp", c.mlp);
  r.get("norm", c.norm);
  r.get("norm_eps", c.norm_eps);
  r.get("qk_norm", c.qk_norm);
  r.get("qkv_bias", c.qkv_bias);
  r.get("attention_bias", c.attention_bias);
  r.get("clip_qkv", c.clip_qkv);
  r.get("attention", c.attention);
  r.get("q_lora_rank", c.q_lora_rank);
  r.get("kv_lora_rank", c.kv_lora_rank);
  r.get("qk_nope_head_dim", c.qk_nope_head_dim);
  r.get("qk_rope_head_dim", c.qk_rope_head_dim);
  r.get("v_head_dim", c.v_head_dim);
  r.get("attention_scale", c.attention_scale);
  r.get("attention_sinks", c.attention_sinks);
  r.get("sliding_window", c.sliding_window);
  r.get("layer_types", c.layer_types);
  r.get("rope_theta", c.rope_theta);
  r.get("rotary_pct", c.rotary_pct);
  r.get("rope_scaling", c.rope_scaling);
  r.get("rope_factor", c.rope_factor);
  r.get("rope_original_max_position", c.rope_original_max_position);
  r.get("yarn_beta_fast", c.yarn_beta_fast);
  r.get("yarn_beta_slow", c.yarn_beta_slow);
  r.get("yarn_truncate", c.yarn_truncate);
  r.get("yarn_mscale", c.yarn_mscale);
  r.get("yarn_mscale_all_dim", c.yarn_mscale_all_dim);
  r.get("yarn_attention_factor", c.yarn_attention_factor);
  r.get("rope_interleave", c.rope_interleave);
  r.get("max_seq_len", c.max_seq_len);
  r.get("tie_embeddings", c.tie_embeddings);
  r.get("dtype", c.dtype);
}

ModelConfig ModelConfig::from_yaml(
    const YAML::Node& node, const std::string& path, const std::string& file) {
  ModelConfig c;
  config::YamlReader r(node, path, file);
  read_model_fields(r, c);
  read_moe_config(r.child("moe"), c.moe);
  r.finish();
  c.validate();
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

void ModelConfig::check_tensor_parallel(int64_t tp) const {
  TORCH_CHECK(
      tp >= 1, "config: parallel.tensor_parallel must be >= 1, got ", tp);
  if (tp == 1) {
    return;
  }
  auto divides = [&](const char* field, int64_t value) {
    TORCH_CHECK(
        value % tp == 0,
        "config: parallel.tensor_parallel (",
        tp,
        ") must divide ",
        field,
        " (",
        value,
        ")");
  };
  divides("model.num_heads", num_heads);
  if (!is_mla()) {
    // Split kv heads, or (fewer kv heads than ranks) whole ones on every rank.
    TORCH_CHECK(
        kv_heads() % tp == 0 || tp % kv_heads() == 0,
        "config: parallel.tensor_parallel (",
        tp,
        ") must divide model.num_kv_heads (",
        kv_heads(),
        ") or be a multiple of it");
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
