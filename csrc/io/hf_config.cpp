// config.json -> ModelConfig (import): the keys every family shares, the
// rotary settings, per-layer attention kinds and the aux-loss coefficient.
// Each family's own keys are in csrc/io/hf/<family>.cpp; export is
// hf_config_export.cpp, the weights hf_checkpoint.cpp.

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "io/hf/family.h"
#include "io/hf_checkpoint.h"
#include "io/hf_quantization.h"

namespace moeyard::io {
namespace fs = std::filesystem;
using json = nlohmann::json;
using hf::JsonReader;

namespace {

// Python's truth value of a JSON value.
bool truthy(const json& v) {
  if (v.is_boolean()) {
    return v.get<bool>();
  }
  if (v.is_number()) {
    return v.get<double>() != 0.0;
  }
  if (v.is_string()) {
    return !v.get_ref<const std::string&>().empty();
  }
  return !v.is_null() && !v.empty(); // arrays and objects
}

// Rotary settings, resolved as transformers 5.23's PreTrainedConfig does
// (convert_rope_params_to_dict, standardize_rope_params): `rope_scaling`
// (older files) when it is truthy in Python's sense, else `rope_parameters`,
// else none; a falsy rope_scaling (null, false, 0, "", [], {}) is ignored.
// rope_theta is the dict's, else the top-level rope_theta, else the class's
// default_theta (in the family's class defaults); partial_rotary_factor
// likewise; rope_type is the dict's rope_type, else its legacy `type`, else
// "default". A top-level original_max_position_embeddings is not read
// (transformers reads only the dict's, default max_position_embeddings).
void read_rope(const JsonReader& r, ModelConfig& c) {
  std::string key = "rope_parameters";
  json params = json::object();
  if (r.j.contains("rope_scaling") && truthy(r.j.at("rope_scaling"))) {
    key = "rope_scaling";
    params = r.j.at(key);
  } else if (r.has("rope_parameters")) {
    params = r.j.at(key);
  }
  TORCH_CHECK(
      params.is_object(),
      r.file,
      ": ",
      key,
      " must be an object, got ",
      params.dump());
  for (const auto& [name, value] : params.items()) {
    TORCH_CHECK(
        !value.is_object(),
        r.file,
        ": ",
        key,
        " per layer type ('",
        name,
        "') is not supported (one set of rotary settings for every layer)");
  }
  JsonReader p{params, r.file + " " + key};
  c.rope_theta = p.get<double>("rope_theta", r.need<double>("rope_theta"));
  std::string type = p.get<std::string>("rope_type", "");
  if (type.empty()) {
    type = p.get<std::string>("type", "default");
  }
  const double partial = p.get<double>(
      "partial_rotary_factor", r.get<double>("partial_rotary_factor", 1.0));
  c.rotary_pct = partial;
  if (type == "default") {
    c.rope_scaling = "none";
  } else if (type == "linear") {
    c.rope_scaling = "linear";
    c.rope_factor = p.need<double>("factor");
  } else if (type == "yarn") {
    c.rope_scaling = "yarn";
    // transformers: original_max_position_embeddings defaults to
    // max_position_embeddings, and a null factor is their ratio.
    const auto max_pos = r.need<int64_t>("max_position_embeddings");
    c.rope_original_max_position =
        p.get<int64_t>("original_max_position_embeddings", max_pos);
    c.rope_factor = p.has("factor") ? p.get<double>("factor", 1.0)
                                    : double(max_pos) /
                                          double(c.rope_original_max_position);
    c.yarn_beta_fast = p.get<double>("beta_fast", 32.0);
    c.yarn_beta_slow = p.get<double>("beta_slow", 1.0);
    c.yarn_truncate = p.get<bool>("truncate", true);
    c.yarn_mscale = p.get<double>("mscale", 0.0);
    c.yarn_mscale_all_dim = p.get<double>("mscale_all_dim", 0.0);
    c.yarn_attention_factor = p.get<double>("attention_factor", 0.0);
  } else {
    TORCH_CHECK(
        false,
        r.file,
        ": rope type '",
        type,
        "' is not supported (default, linear, yarn)");
  }
}

// The settings a family fixes, and those config.json has a key for.
void read_traits(const hf::HfTraits& t, const JsonReader& r, ModelConfig& c) {
  c.attention = t.attention;
  c.qk_norm = t.qk_norm;
  c.attention_sinks = t.attention_sinks;
  c.moe.routing.score_fn = t.score_fn;
  c.moe.routing.activation = t.activation;
  c.moe.router_bias = t.router_bias;
  c.moe.expert_bias = t.expert_bias;
  c.moe.selection_bias = t.selection_bias;
  if (t.attention_bias_key) {
    c.attention_bias = r.need<bool>("attention_bias");
  }
  if (t.qkv_bias_key) {
    c.qkv_bias = r.need<bool>("qkv_bias");
  }
  if (t.clip_qkv_key) {
    c.clip_qkv = r.get<double>("clip_qkv", 0.0); // null: none
  }
  if (t.rope_interleave_key) {
    c.rope_interleave = r.get<bool>("rope_interleave", false); // null: falsy
  }
}

// Per-layer attention kinds (GPT-OSS; Qwen2-MoE lists all-full layers).
void read_layer_types(const JsonReader& r, ModelConfig& c) {
  if (!r.has("layer_types")) {
    return;
  }
  const auto types = r.get<std::vector<std::string>>("layer_types", {});
  TORCH_CHECK(
      static_cast<int64_t>(types.size()) == c.num_layers,
      r.file,
      ": layer_types has ",
      types.size(),
      " entries for num_hidden_layers = ",
      c.num_layers);
  bool any_sliding = false;
  std::vector<std::string> mine;
  for (const auto& t : types) {
    TORCH_CHECK(
        t == "full_attention" || t == "sliding_attention",
        r.file,
        ": layer_types entry '",
        t,
        "' is not supported (full_attention, sliding_attention)");
    any_sliding |= t == "sliding_attention";
    mine.push_back(t == "sliding_attention" ? "sliding" : "full");
  }
  if (any_sliding) {
    c.layer_types = mine;
    c.sliding_window = r.need<int64_t>("sliding_window");
  }
}

// transformers' load-balancing loss is E * sum_e (count_e / T) P_e over all
// layers' tokens at once; moeyard's switch loss uses count_e / (T K) per
// layer and sums the layers, so the equivalent coefficient is coef * K /
// (MoE layers) (equal when the layers' statistics agree).
void read_aux_coefficient(const JsonReader& r, ModelConfig& c) {
  int64_t n_moe = 0;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    n_moe += c.is_moe_layer(i);
  }
  c.moe.routing.switch_coeff = r.get<double>("router_aux_loss_coef", 0.0) *
                               static_cast<double>(c.moe.routing.top_k) /
                               std::max<int64_t>(n_moe, 1);
}

} // namespace

std::vector<std::string> hf_families() {
  std::vector<std::string> out;
  for (const hf::HfFamily& f : hf::all_families()) {
    out.push_back(f.model_type);
  }
  return out;
}

json read_hf_config(const std::string& dir) {
  const auto path = (fs::path(dir) / "config.json").string();
  std::ifstream in(path);
  TORCH_CHECK(
      in,
      path,
      ": cannot open (is ",
      dir,
      " a Hugging Face checkpoint directory?)");
  json j;
  try {
    in >> j;
  } catch (const std::exception& e) {
    TORCH_CHECK(false, path, ": not valid JSON: ", e.what());
  }
  TORCH_CHECK(j.is_object(), path, ": expected a JSON object");
  return j;
}

ModelConfig hf_model_config(const json& file_json, const std::string& file) {
  const hf::HfFamily& fam = hf::family_of(
      JsonReader{file_json, file}.need<std::string>("model_type"), file);
  const json hf = hf::with_class_defaults(file_json, fam);
  JsonReader r{hf, file};
  ModelConfig c;
  c.vocab_size = r.need<int64_t>("vocab_size");
  c.hidden_size = r.need<int64_t>("hidden_size");
  c.num_layers = r.need<int64_t>("num_hidden_layers");
  c.num_heads = r.need<int64_t>("num_attention_heads");
  c.num_kv_heads = r.get<int64_t>("num_key_value_heads", c.num_heads);
  c.head_dim = r.get<int64_t>("head_dim", 0);
  c.ffn_size = r.need<int64_t>("intermediate_size");
  c.mlp = "swiglu";
  c.norm = "rmsnorm";
  c.norm_eps = r.need<double>("rms_norm_eps");
  c.max_seq_len = r.need<int64_t>("max_position_embeddings");
  c.tie_embeddings = r.need<bool>("tie_word_embeddings");
  c.dtype = "float32";
  r.only<std::string>("hidden_act", "silu", "the experts are SwiGLU");
  read_rope(r, c);
  auto& m = c.moe;
  m.routing.top_k = r.need<int64_t>("num_experts_per_tok");
  m.routing.capacity_factor = 0.0; // dropless, as transformers runs it
  m.routing.switch_coeff = 0.0;
  m.routing.z_coeff = 0.0;
  read_traits(fam.traits, r, c);
  fam.read(r, c);
  read_layer_types(r, c);
  read_aux_coefficient(r, c);
  read_hf_quantization(file_json, file); // its errors before any weight
  c.validate();
  return c;
}

} // namespace moeyard::io
