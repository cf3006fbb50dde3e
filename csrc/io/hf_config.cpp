// config.json -> ModelConfig for each Hugging Face family (import); export
// is in hf_config_export.cpp, the weights in hf_checkpoint.cpp.

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>

#include "io/hf_checkpoint.h"
#include "io/hf_family.h"

namespace moeyard::io {
namespace fs = std::filesystem;
using json = nlohmann::json;
using detail::Family;
using detail::JsonReader;

namespace {

const std::vector<std::pair<std::string, Family>>& family_table() {
  static const std::vector<std::pair<std::string, Family>> t = {
      {"mixtral", Family::kMixtral},
      {"qwen2_moe", Family::kQwen2Moe},
      {"qwen3_moe", Family::kQwen3Moe},
      {"olmoe", Family::kOlmoe},
      {"deepseek_v3", Family::kDeepseekV3},
      {"gpt_oss", Family::kGptOss},
  };
  return t;
}

std::string family_list() {
  std::string s;
  for (const auto& [name, f] : family_table()) {
    s += (s.empty() ? "" : ", ") + name;
  }
  return s;
}

// Rotary settings, resolved as transformers' PreTrainedConfig does: a
// non-empty `rope_scaling` (older files) wins over `rope_parameters`
// (transformers 5); the dict's rope_theta, else the top-level rope_theta,
// else the class's default_theta (in the class defaults below).

void read_rope(const JsonReader& r, ModelConfig& c) {
  std::string key = "rope_parameters";
  json params = json::object();
  if (r.has("rope_scaling") &&
      !(r.j.at("rope_scaling").is_object() && r.j.at("rope_scaling").empty())) {
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

// MoE layer indices of Qwen-style decoder_sparse_step + mlp_only_layers.
std::vector<int64_t> sparse_step_layers(const JsonReader& r, int64_t layers) {
  const auto step = r.get<int64_t>("decoder_sparse_step", 1);
  TORCH_CHECK(
      step >= 1, r.file, ": decoder_sparse_step must be >= 1, got ", step);
  const auto mlp_only = r.get<std::vector<int64_t>>("mlp_only_layers", {});
  std::vector<int64_t> out;
  for (int64_t i = 0; i < layers; ++i) {
    const bool dense =
        std::find(mlp_only.begin(), mlp_only.end(), i) != mlp_only.end();
    if (!dense && (i + 1) % step == 0) {
      out.push_back(i);
    }
  }
  TORCH_CHECK(
      !out.empty(),
      r.file,
      ": decoder_sparse_step/mlp_only_layers leave no MoE layer");
  return out;
}

// transformers' config classes (transformers 5.23): the defaults of the keys
// read here and the attribute_map aliases. A key absent from config.json
// takes its class default, as transformers loads it; rope_theta is the
// class's default_theta (used when the rotary settings carry none).
// tests/python/test_hf_defaults.py compares these with the installed
// transformers, so a drift fails a test.
struct ClassDefaults {
  json defaults = json::object();
  std::vector<std::pair<std::string, std::string>> aliases; // alias, key
};

ClassDefaults class_defaults(Family fam) {
  ClassDefaults d;
  switch (fam) {
    case Family::kMixtral: // MixtralConfig
      d.defaults = {
          {"vocab_size", 32000},
          {"hidden_size", 4096},
          {"intermediate_size", 14336},
          {"num_hidden_layers", 32},
          {"num_attention_heads", 32},
          {"num_key_value_heads", 8}, // null: num_attention_heads
          {"hidden_act", "silu"},
          {"max_position_embeddings", 4096 * 32},
          {"rms_norm_eps", 1e-5},
          {"tie_word_embeddings", false},
          {"num_experts_per_tok", 2},
          {"num_local_experts", 8},
          {"router_aux_loss_coef", 0.001},
          {"router_jitter_noise", 0.0},
          {"rope_theta", 1e6},
      }; // head_dim, sliding_window: None
      d.aliases = {{"num_experts", "num_local_experts"}};
      break;
    case Family::kQwen2Moe: // Qwen2MoeConfig
      d.defaults = {
          {"vocab_size", 151936},
          {"hidden_size", 2048},
          {"intermediate_size", 5632},
          {"num_hidden_layers", 24},
          {"num_attention_heads", 16},
          {"num_key_value_heads", 16},
          {"hidden_act", "silu"},
          {"max_position_embeddings", 32768},
          {"rms_norm_eps", 1e-6},
          {"tie_word_embeddings", false},
          {"use_sliding_window", false},
          {"decoder_sparse_step", 1},
          {"moe_intermediate_size", 1408},
          {"shared_expert_intermediate_size", 5632},
          {"num_experts_per_tok", 4},
          {"num_experts", 60},
          {"norm_topk_prob", false},
          {"router_aux_loss_coef", 0.001},
          {"mlp_only_layers", json::array()},
          {"qkv_bias", true},
          {"rope_theta", 1e4},
      }; // no aliases: num_local_experts is not read
      break;
    case Family::kQwen3Moe: // Qwen3MoeConfig
      d.defaults = {
          {"vocab_size", 151936},
          {"hidden_size", 2048},
          {"intermediate_size", 6144},
          {"num_hidden_layers", 24},
          {"num_attention_heads", 32},
          {"num_key_value_heads", 4},
          {"hidden_act", "silu"},
          {"max_position_embeddings", 32768},
          {"rms_norm_eps", 1e-6},
          {"tie_word_embeddings", false},
          {"attention_bias", false},
          {"use_sliding_window", false},
          {"decoder_sparse_step", 1},
          {"moe_intermediate_size", 768},
          {"num_experts_per_tok", 8},
          {"num_experts", 128},
          {"norm_topk_prob", false},
          {"router_aux_loss_coef", 0.001},
          {"mlp_only_layers", json::array()},
          {"rope_theta", 1e4},
      }; // head_dim: hidden_size / num_attention_heads
      d.aliases = {{"num_local_experts", "num_experts"}};
      break;
    case Family::kOlmoe: // OlmoeConfig
      d.defaults = {
          {"vocab_size", 50304},
          {"hidden_size", 2048},
          {"intermediate_size", 2048},
          {"num_hidden_layers", 16},
          {"num_attention_heads", 16},
          {"hidden_act", "silu"},
          {"max_position_embeddings", 4096},
          {"rms_norm_eps", 1e-5},
          {"tie_word_embeddings", false},
          {"attention_bias", false},
          {"num_experts_per_tok", 8},
          {"num_experts", 64},
          {"router_aux_loss_coef", 0.01},
          {"norm_topk_prob", false},
          {"rope_theta", 1e4},
      }; // num_key_value_heads: num_attention_heads; clip_qkv: None
      d.aliases = {{"num_local_experts", "num_experts"}};
      break;
    case Family::kDeepseekV3: // DeepseekV3Config
      d.defaults = {
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
          // Multi-token-prediction modules after the last layer: not part of
          // the causal LM's forward; their tensors are skipped on import.
          {"num_nextn_predict_layers", 1},
          {"rope_theta", 1e4},
      }; // no router_aux_loss_coef: no load-balancing loss
      d.aliases = {
          {"num_local_experts", "n_routed_experts"},
          {"num_mtp_layers", "num_nextn_predict_layers"}};
      break;
    case Family::kGptOss: // GptOssConfig
      d.defaults = {
          {"num_hidden_layers", 36},       {"num_local_experts", 128},
          {"vocab_size", 201088},          {"hidden_size", 2880},
          {"intermediate_size", 2880},     {"head_dim", 64},
          {"num_attention_heads", 64},     {"num_key_value_heads", 8},
          {"sliding_window", 128},         {"tie_word_embeddings", false},
          {"hidden_act", "silu"},          {"max_position_embeddings", 131072},
          {"rms_norm_eps", 1e-5},          {"num_experts_per_tok", 4},
          {"swiglu_alpha", 1.702},         {"swiglu_limit", 7.0},
          {"router_aux_loss_coef", 0.001}, {"attention_bias", true},
          {"rope_theta", 150000.0},
      };
      d.aliases = {{"num_experts", "num_local_experts"}};
      break;
  }
  return d;
}

// Layers that are not MoE take a dense MLP; the layer list is explicit
// whenever it is not "every layer".
void set_moe_layers(ModelConfig& c, std::vector<int64_t> layers) {
  c.moe.moe_every_n = 1;
  c.moe.first_k_dense = 0;
  if (static_cast<int64_t>(layers.size()) == c.num_layers) {
    c.moe.layers.clear();
  } else {
    c.moe.layers = std::move(layers);
  }
}

} // namespace

namespace detail {

Family family_of(const std::string& model_type, const std::string& file) {
  for (const auto& [name, f] : family_table()) {
    if (name == model_type) {
      return f;
    }
  }
  TORCH_CHECK(
      false,
      file,
      ": model_type '",
      model_type,
      "' has no importer; supported: ",
      family_list());
  return Family::kMixtral;
}

std::vector<std::pair<std::string, std::string>> class_aliases(Family fam) {
  return class_defaults(fam).aliases;
}

json with_class_defaults(const json& hf, Family fam) {
  const ClassDefaults d = class_defaults(fam);
  json out = hf;
  for (const auto& [alias, key] : d.aliases) {
    if (out.contains(alias) && !out.contains(key)) {
      out[key] = out.at(alias);
    }
  }
  for (const auto& [key, value] : d.defaults.items()) {
    if (!out.contains(key)) {
      out[key] = value;
    }
  }
  // GptOssConfig's rope_parameters when config.json gives none (or null); a
  // non-empty rope_scaling still wins over it in read_rope.
  if (fam == Family::kGptOss && (!out.contains("rope_parameters") ||
                                 out.at("rope_parameters").is_null())) {
    out["rope_parameters"] = {
        {"rope_type", "yarn"},
        {"factor", 32.0},
        {"beta_fast", 32.0},
        {"beta_slow", 1.0},
        {"truncate", false},
        {"original_max_position_embeddings", 4096}};
  }
  return out;
}

} // namespace detail

using detail::family_of;
using detail::with_class_defaults;

std::vector<std::string> hf_families() {
  std::vector<std::string> out;
  for (const auto& [name, f] : family_table()) {
    out.push_back(name);
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
  const Family fam = family_of(
      JsonReader{file_json, file}.need<std::string>("model_type"), file);
  const json hf = with_class_defaults(file_json, fam);
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
  m.routing.score_fn = "softmax";
  m.routing.capacity_factor = 0.0; // dropless, as transformers runs it
  m.routing.switch_coeff = 0.0;
  m.routing.z_coeff = 0.0;
  switch (fam) {
    case Family::kMixtral:
      m.num_experts = r.need<int64_t>("num_local_experts");
      m.ffn_size = c.ffn_size;
      m.routing.renormalize = true;
      c.sliding_window = r.get<int64_t>("sliding_window", 0);
      if (r.need<double>("router_jitter_noise") > 0) {
        m.routing.noise = "jitter";
        m.routing.noise_eps = r.need<double>("router_jitter_noise");
      }
      break;
    case Family::kQwen2Moe:
    case Family::kQwen3Moe:
      // Qwen3-MoE's files name it num_local_experts (an attribute alias);
      // Qwen2-MoE has no such alias.
      m.num_experts = r.need<int64_t>("num_experts");
      m.ffn_size = r.need<int64_t>("moe_intermediate_size");
      m.routing.renormalize = r.need<bool>("norm_topk_prob");
      set_moe_layers(c, sparse_step_layers(r, c.num_layers));
      r.only<bool>(
          "use_sliding_window", false, "per-layer sliding windows of Qwen");
      if (fam == Family::kQwen2Moe) {
        c.qkv_bias = r.need<bool>("qkv_bias");
        const auto shared = r.need<int64_t>("shared_expert_intermediate_size");
        if (shared > 0) {
          m.num_shared_experts = 1;
          m.shared_ffn_size = shared;
          m.shared_gate = true;
        }
      } else {
        c.qk_norm = "head";
        c.attention_bias = r.need<bool>("attention_bias");
      }
      break;
    case Family::kOlmoe:
      m.num_experts = r.need<int64_t>("num_experts");
      m.ffn_size = c.ffn_size;
      m.routing.renormalize = r.need<bool>("norm_topk_prob");
      c.qk_norm = "projection";
      c.attention_bias = r.need<bool>("attention_bias");
      c.clip_qkv = r.get<double>("clip_qkv", 0.0);
      break;
    case Family::kDeepseekV3:
      c.attention = "mla";
      c.head_dim = 0; // config.json's head_dim is the rotary width
      c.q_lora_rank = r.get<int64_t>("q_lora_rank", 0); // null: q_proj
      c.kv_lora_rank = r.need<int64_t>("kv_lora_rank");
      c.qk_nope_head_dim = r.need<int64_t>("qk_nope_head_dim");
      c.qk_rope_head_dim = r.need<int64_t>("qk_rope_head_dim");
      c.v_head_dim = r.need<int64_t>("v_head_dim");
      c.attention_bias = r.need<bool>("attention_bias");
      c.rope_interleave = r.get<bool>("rope_interleave", false); // null: falsy
      c.num_kv_heads = 0;
      m.num_experts = r.need<int64_t>("n_routed_experts");
      m.ffn_size = r.need<int64_t>("moe_intermediate_size");
      // transformers' DeepseekV3DecoderLayer: MoE iff layer >=
      // first_k_dense_replace. moe_layer_freq (in DeepSeek's own files, and
      // honoured by its remote code as layer % freq == 0) is not read by
      // transformers, whose weights are laid out without it; so neither is
      // it here.
      m.first_k_dense = r.need<int64_t>("first_k_dense_replace");
      m.moe_every_n = 1;
      m.routing.score_fn = "sigmoid";
      m.selection_bias = true; // e_score_correction_bias
      // null is transformers' None: falsy, no renormalization
      m.routing.renormalize = r.get<bool>("norm_topk_prob", false);
      m.routing.scale = r.need<double>("routed_scaling_factor");
      m.routing.num_groups = r.need<int64_t>("n_group");
      m.routing.topk_groups = r.need<int64_t>("topk_group");
      m.num_shared_experts = r.need<int64_t>("n_shared_experts");
      m.shared_ffn_size = m.ffn_size;
      r.only<std::string>("topk_method", "noaux_tc", "DeepSeek-V3 routing");
      r.only<std::string>("scoring_func", "sigmoid", "DeepSeek-V3 routing");
      break;
    case Family::kGptOss:
      m.num_experts = r.need<int64_t>("num_local_experts");
      m.ffn_size = c.ffn_size;
      m.routing.renormalize = true; // softmax over the top-k logits
      m.router_bias = true;
      m.expert_bias = true;
      m.routing.activation = "clamped_swiglu";
      m.routing.swiglu_alpha = r.need<double>("swiglu_alpha");
      m.routing.swiglu_limit = r.need<double>("swiglu_limit");
      c.attention_bias = r.need<bool>("attention_bias");
      c.attention_sinks = true;
      break;
  }
  // Per-layer attention kinds (GPT-OSS; Qwen2-MoE lists all-full layers).
  // Without layer_types GptOssConfig alternates, starting with a sliding
  // layer: "sliding_attention" if (i + 1) % 2 else "full_attention".
  if (r.has("layer_types") || fam == Family::kGptOss) {
    std::vector<std::string> types;
    if (r.has("layer_types")) {
      types = r.get<std::vector<std::string>>("layer_types", {});
      TORCH_CHECK(
          static_cast<int64_t>(types.size()) == c.num_layers,
          file,
          ": layer_types has ",
          types.size(),
          " entries for num_hidden_layers = ",
          c.num_layers);
    } else {
      for (int64_t i = 0; i < c.num_layers; ++i) {
        types.push_back((i + 1) % 2 ? "sliding_attention" : "full_attention");
      }
    }
    bool any_sliding = false;
    std::vector<std::string> mine;
    for (const auto& t : types) {
      TORCH_CHECK(
          t == "full_attention" || t == "sliding_attention",
          file,
          ": layer_types entry '",
          t,
          "' is not supported (full_attention, sliding_attention)");
      any_sliding |= t == "sliding_attention";
      mine.push_back(t == "sliding_attention" ? "sliding" : "full");
    }
    if (any_sliding) {
      c.layer_types = mine;
      c.sliding_window = r.need<int64_t>("sliding_window");
    } else if (fam != Family::kMixtral) {
      c.sliding_window = 0;
    }
  }
  // transformers' load-balancing loss is E * sum_e (count_e / T) P_e over
  // all layers' tokens at once; moeyard's switch loss uses count_e / (T K)
  // per layer and sums the layers, so the equivalent coefficient is
  // coef * K / (MoE layers) (equal when the layers' statistics agree).
  int64_t n_moe = 0;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    n_moe += c.is_moe_layer(i);
  }
  m.routing.switch_coeff = r.get<double>("router_aux_loss_coef", 0.0) *
                           static_cast<double>(m.routing.top_k) /
                           std::max<int64_t>(n_moe, 1);
  c.validate();
  return c;
}

} // namespace moeyard::io
