#include "io/hf_checkpoint.h"

#include <ATen/ops/cat.h>
#include <ATen/ops/stack.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>

#include "io/safetensors.h"

namespace moeyard::io {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// ---- config.json reading with errors naming file, key and value -----------

struct JsonReader {
  const json& j;
  std::string file;

  bool has(const std::string& key) const {
    return j.contains(key) && !j.at(key).is_null();
  }
  template <typename T>
  T get(const std::string& key, T fallback) const {
    if (!has(key)) {
      return fallback;
    }
    try {
      return j.at(key).get<T>();
    } catch (const std::exception&) {
      TORCH_CHECK(
          false,
          file,
          ": key '",
          key,
          "' has value ",
          j.at(key).dump(),
          " of the wrong type");
    }
    return fallback;
  }
  template <typename T>
  T need(const std::string& key) const {
    TORCH_CHECK(has(key), file, ": required key '", key, "' is missing");
    return get<T>(key, T{});
  }
  // A key whose only supported value is `ok` (or absent).
  template <typename T>
  void only(const std::string& key, const T& ok, const std::string& why) const {
    if (has(key)) {
      const T v = get<T>(key, ok);
      TORCH_CHECK(
          v == ok,
          file,
          ": key '",
          key,
          "' = ",
          j.at(key).dump(),
          " is not supported (",
          why,
          ")");
    }
  }
};

enum class Family {
  kMixtral,
  kQwen2Moe,
  kQwen3Moe,
  kOlmoe,
  kDeepseekV3,
  kGptOss
};

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

// Rotary settings: `rope_parameters` (transformers 5) or the older
// `rope_theta` + `rope_scaling` pair.
void read_rope(const JsonReader& r, ModelConfig& c) {
  json params = json::object();
  if (r.has("rope_parameters")) {
    params = r.j.at("rope_parameters");
  } else if (r.has("rope_scaling")) {
    params = r.j.at("rope_scaling");
  }
  TORCH_CHECK(
      params.is_object(),
      r.file,
      ": rope_parameters must be an object, got ",
      params.dump());
  JsonReader p{params, r.file + " rope_parameters"};
  c.rope_theta = p.get<double>("rope_theta", r.get<double>("rope_theta", 1e4));
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
    // transformers falls back to max_position / original when factor is null
    c.rope_factor =
        p.has("factor")
            ? p.get<double>("factor", 1.0)
            : double(r.get<int64_t>("max_position_embeddings", 2048)) /
                  double(p.need<int64_t>("original_max_position_embeddings"));
    c.rope_original_max_position = p.get<int64_t>(
        "original_max_position_embeddings",
        r.get<int64_t>("max_position_embeddings", 2048));
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

ModelConfig hf_model_config(const json& hf, const std::string& file) {
  JsonReader r{hf, file};
  const auto type = r.need<std::string>("model_type");
  const Family fam = family_of(type, file);
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
  c.norm_eps = r.get<double>("rms_norm_eps", 1e-6);
  c.max_seq_len = r.get<int64_t>("max_position_embeddings", 2048);
  c.tie_embeddings = r.get<bool>("tie_word_embeddings", false);
  c.dtype = "float32";
  r.only<std::string>("hidden_act", "silu", "the experts are SwiGLU");
  read_rope(r, c);

  auto& m = c.moe;
  m.routing.top_k = r.need<int64_t>("num_experts_per_tok");
  m.routing.score_fn = "softmax";
  m.routing.capacity_factor = 0.0; // dropless, as transformers runs it
  m.switch_coeff = 0.0;
  m.z_coeff = 0.0;
  switch (fam) {
    case Family::kMixtral:
      m.num_experts = r.need<int64_t>("num_local_experts");
      m.ffn_size = c.ffn_size;
      m.routing.renormalize = true;
      c.sliding_window = r.get<int64_t>("sliding_window", 0);
      if (r.get<double>("router_jitter_noise", 0.0) > 0) {
        m.routing.noise = "jitter";
        m.routing.noise_eps = r.get<double>("router_jitter_noise", 0.0);
      }
      break;
    case Family::kQwen2Moe:
    case Family::kQwen3Moe:
      // Qwen3-MoE's files name it num_local_experts (an attribute alias).
      m.num_experts = r.has("num_experts")
                          ? r.need<int64_t>("num_experts")
                          : r.need<int64_t>("num_local_experts");
      m.ffn_size = r.need<int64_t>("moe_intermediate_size");
      m.routing.renormalize = r.get<bool>("norm_topk_prob", false);
      set_moe_layers(c, sparse_step_layers(r, c.num_layers));
      r.only<bool>(
          "use_sliding_window", false, "per-layer sliding windows of Qwen");
      if (fam == Family::kQwen2Moe) {
        c.qkv_bias = r.get<bool>("qkv_bias", true);
        const auto shared =
            r.get<int64_t>("shared_expert_intermediate_size", 0);
        if (shared > 0) {
          m.num_shared_experts = 1;
          m.shared_ffn_size = shared;
          m.shared_gate = true;
        }
      } else {
        c.qk_norm = "head";
        c.attention_bias = r.get<bool>("attention_bias", false);
      }
      break;
    case Family::kOlmoe:
      m.num_experts = r.need<int64_t>("num_experts");
      m.ffn_size = c.ffn_size;
      m.routing.renormalize = r.get<bool>("norm_topk_prob", false);
      c.qk_norm = "projection";
      c.attention_bias = r.get<bool>("attention_bias", false);
      c.clip_qkv = r.get<double>("clip_qkv", 0.0);
      break;
    case Family::kDeepseekV3:
      c.attention = "mla";
      c.head_dim = 0; // config.json's head_dim is the rotary width
      c.q_lora_rank = r.get<int64_t>("q_lora_rank", 0);
      c.kv_lora_rank = r.need<int64_t>("kv_lora_rank");
      c.qk_nope_head_dim = r.need<int64_t>("qk_nope_head_dim");
      c.qk_rope_head_dim = r.need<int64_t>("qk_rope_head_dim");
      c.v_head_dim = r.need<int64_t>("v_head_dim");
      c.attention_bias = r.get<bool>("attention_bias", false);
      c.rope_interleave = r.get<bool>("rope_interleave", true);
      c.num_kv_heads = 0;
      m.num_experts = r.need<int64_t>("n_routed_experts");
      m.ffn_size = r.need<int64_t>("moe_intermediate_size");
      m.first_k_dense = r.get<int64_t>("first_k_dense_replace", 0);
      m.moe_every_n = r.get<int64_t>("moe_layer_freq", 1);
      m.routing.score_fn = "sigmoid";
      m.selection_bias = true; // e_score_correction_bias
      m.routing.renormalize = r.get<bool>("norm_topk_prob", true);
      m.routing.scale = r.get<double>("routed_scaling_factor", 1.0);
      m.routing.num_groups = r.get<int64_t>("n_group", 1);
      m.routing.topk_groups = r.get<int64_t>("topk_group", 1);
      m.num_shared_experts = r.get<int64_t>("n_shared_experts", 0);
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
      m.routing.swiglu_alpha = r.get<double>("swiglu_alpha", 1.702);
      m.routing.swiglu_limit = r.get<double>("swiglu_limit", 7.0);
      c.attention_bias = r.get<bool>("attention_bias", true);
      c.attention_sinks = true;
      break;
  }
  // Per-layer attention kinds (GPT-OSS; Qwen2-MoE lists all-full layers).
  if (r.has("layer_types")) {
    const auto types = r.get<std::vector<std::string>>("layer_types", {});
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
  } else if (fam == Family::kGptOss) {
    c.sliding_window = r.get<int64_t>("sliding_window", 0);
  }
  // transformers' load-balancing loss is E * sum_e (count_e / T) P_e over
  // all layers' tokens at once; moeyard's switch loss uses count_e / (T K)
  // per layer and sums the layers, so the equivalent coefficient is
  // coef * K / (MoE layers) (equal when the layers' statistics agree).
  int64_t n_moe = 0;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    n_moe += c.is_moe_layer(i);
  }
  m.switch_coeff = r.get<double>("router_aux_loss_coef", 0.0) *
                   static_cast<double>(m.routing.top_k) /
                   std::max<int64_t>(n_moe, 1);
  c.validate();
  return c;
}

// ---- weights ----------------------------------------------------------------

namespace {

// The tensors of a checkpoint directory: model.safetensors, or the shards
// named by model.safetensors.index.json. Tracks which were used.
class HfTensors {
 public:
  explicit HfTensors(const std::string& dir) : dir_(dir) {
    const fs::path index = fs::path(dir) / "model.safetensors.index.json";
    const fs::path single = fs::path(dir) / "model.safetensors";
    if (fs::exists(index)) {
      std::ifstream in(index);
      json j;
      try {
        in >> j;
      } catch (const std::exception& e) {
        TORCH_CHECK(false, index.string(), ": not valid JSON: ", e.what());
      }
      TORCH_CHECK(
          j.contains("weight_map") && j.at("weight_map").is_object(),
          index.string(),
          ": no 'weight_map' object");
      std::set<std::string> files;
      for (const auto& [name, file] : j.at("weight_map").items()) {
        TORCH_CHECK(
            file.is_string(),
            index.string(),
            ": weight_map['",
            name,
            "'] is not a file name");
        files.insert(file.get<std::string>());
      }
      for (const auto& f : files) {
        TORCH_CHECK(
            f.find('/') == std::string::npos && f != "..",
            index.string(),
            ": shard name '",
            f,
            "' must be a file in the same directory");
        add_file((fs::path(dir) / f).string());
      }
      for (const auto& [name, file] : j.at("weight_map").items()) {
        const auto it = origin_.find(name);
        TORCH_CHECK(
            it != origin_.end() &&
                fs::path(it->second).filename() == file.get<std::string>(),
            index.string(),
            ": tensor '",
            name,
            "' is listed in ",
            file.get<std::string>(),
            " but not stored there");
      }
    } else {
      TORCH_CHECK(
          fs::exists(single),
          dir,
          ": neither model.safetensors nor model.safetensors.index.json "
          "(only safetensors weights are read)");
      add_file(single.string());
    }
  }

  bool has(const std::string& name) const {
    return tensors_.count(name) > 0;
  }

  // The tensor `name`, checked against `shape` (empty: any).
  at::Tensor take(const std::string& name, at::IntArrayRef shape = {}) {
    const auto it = tensors_.find(name);
    TORCH_CHECK(it != tensors_.end(), dir_, ": tensor '", name, "' is missing");
    TORCH_CHECK(
        shape.empty() || it->second.sizes() == shape,
        origin_.at(name),
        ": tensor '",
        name,
        "' has shape ",
        it->second.sizes(),
        ", expected ",
        shape);
    used_.insert(name);
    return it->second;
  }

  // Every stored tensor must have been used, except derived rotary
  // inverse-frequency buffers of old checkpoints and those `skip` names.
  template <typename Skip>
  void check_all_used(const Skip& skip) const {
    std::vector<std::string> extra;
    for (const auto& [name, t] : tensors_) {
      const bool derived =
          name.find("rotary_emb.inv_freq") != std::string::npos;
      if (!used_.count(name) && !derived && !skip(name)) {
        extra.push_back(name);
      }
    }
    if (!extra.empty()) {
      std::string list;
      for (size_t i = 0; i < extra.size() && i < 5; ++i) {
        list += (i ? ", " : "") + extra[i] + " (" + origin_.at(extra[i]) + ")";
      }
      TORCH_CHECK(
          false,
          dir_,
          ": ",
          extra.size(),
          " tensors are not used by the model, e.g. ",
          list,
          " (a config key the importer does not honour?)");
    }
  }

 private:
  void add_file(const std::string& path) {
    for (auto& [name, t] : load_safetensors(path)) {
      TORCH_CHECK(
          !tensors_.count(name),
          path,
          ": tensor '",
          name,
          "' is also stored in ",
          origin_[name]);
      origin_[name] = path;
      tensors_.emplace(name, std::move(t));
    }
  }
  std::string dir_;
  TensorMap tensors_;
  std::map<std::string, std::string> origin_;
  std::set<std::string> used_;
};

// Where a family stores things (transformers' save_pretrained names).
struct Naming {
  std::string moe_block = "mlp"; // Mixtral's files say block_sparse_moe
  std::string router = "gate"; // GPT-OSS: router
  std::string gate = "gate_proj", up = "up_proj", down = "down_proj";
  std::string shared = "shared_expert"; // DeepSeek-V3: shared_experts
  std::string shared_gate = "shared_expert_gate";
  // GPT-OSS: fused experts only, gate_up_proj [E, H, 2F] with gate and up
  // interleaved in the last dim, down_proj [E, F, H], and their biases.
  bool gpt_oss_experts = false;
};

Naming naming_of(Family f) {
  Naming n;
  if (f == Family::kMixtral) {
    n.moe_block = "block_sparse_moe";
    n.gate = "w1";
    n.up = "w3";
    n.down = "w2";
  } else if (f == Family::kDeepseekV3) {
    n.shared = "shared_experts";
  } else if (f == Family::kGptOss) {
    n.router = "router";
    n.gpt_oss_experts = true;
  }
  return n;
}

std::string layer_prefix(int64_t i) {
  return "model.layers." + std::to_string(i) + ".";
}

// moeyard name -> HF name, for tensors copied as they are (embeddings,
// norms, attention); the MoE and MLP tensors are composite, handled apart.
std::map<std::string, std::string> simple_mapping(
    const TransformerImpl& model) {
  const auto& c = model.config;
  std::map<std::string, std::string> m;
  m["embed.weight"] = "model.embed_tokens.weight";
  m["norm.weight"] = "model.norm.weight";
  if (!c.tie_embeddings) {
    m["lm_head.weight"] = "lm_head.weight";
  }
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
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const auto L = "layers." + std::to_string(i) + ".";
    const auto P = layer_prefix(i);
    m[L + "attn_norm.weight"] = P + "input_layernorm.weight";
    m[L + "mlp_norm.weight"] = P + "post_attention_layernorm.weight";
    for (const auto& [mine, theirs] : attn) {
      for (const char* what : {"weight", "bias"}) {
        m[L + "attn." + mine + "." + what] =
            P + "self_attn." + theirs + "." + what;
      }
    }
    m[L + "attn.sinks"] = P + "self_attn.sinks";
  }
  return m;
}

// The MoE block prefix present in the files: the family's save_pretrained
// name, or transformers' in-memory name "mlp" (fused checkpoints).
std::string moe_prefix(const HfTensors& t, const Naming& n, int64_t i) {
  const auto P = layer_prefix(i);
  if (t.has(P + n.moe_block + "." + n.router + ".weight")) {
    return P + n.moe_block + ".";
  }
  return P + "mlp.";
}

// Splits "layers.{i}.<rest>".
std::pair<int64_t, std::string> layer_and_rest(const std::string& name) {
  TORCH_CHECK(
      name.rfind("layers.", 0) == 0, "hf checkpoint: no rule for ", name);
  const auto dot = name.find('.', 7);
  return {std::stoll(name.substr(7, dot - 7)), name.substr(dot + 1)};
}

// GPT-OSS interleaves gate and up columns; moeyard stacks gate then up.
at::Tensor deinterleave(const at::Tensor& t) { // [..., 2F] -> [..., 2F]
  const int64_t d = t.dim() - 1;
  return at::cat(
      {t.slice(d, 0, c10::nullopt, 2), t.slice(d, 1, c10::nullopt, 2)}, d);
}
at::Tensor interleave(const at::Tensor& t) {
  const int64_t d = t.dim() - 1, half = t.size(d) / 2;
  return at::stack({t.slice(d, 0, half), t.slice(d, half)}, d + 1)
      .flatten(d, d + 1);
}

} // namespace

void load_hf_weights(
    TransformerImpl& model, const json& hf, const std::string& dir) {
  const auto file = (fs::path(dir) / "config.json").string();
  JsonReader cfg{hf, file};
  const Family fam = family_of(cfg.need<std::string>("model_type"), file);
  const Naming n = naming_of(fam);
  HfTensors t(dir);
  const auto& c = model.config;
  const int64_t E = c.moe.num_experts;
  const auto simple = simple_mapping(model);
  at::NoGradGuard no_grad;

  auto set =
      [&](at::Tensor& dst, const at::Tensor& src, const std::string& what) {
        TORCH_CHECK(
            src.sizes() == dst.sizes(),
            dir,
            ": ",
            what,
            " has shape ",
            src.sizes(),
            ", the model expects ",
            dst.sizes());
        dst.copy_(src);
      };
  // gate [F, H] and up [F, H] stacked as [2F, H].
  auto gate_up =
      [&](const std::string& base, const std::string& g, const std::string& u) {
        return at::cat(
            {t.take(base + g + ".weight"), t.take(base + u + ".weight")}, 0);
      };

  for (auto& p : model.named_parameters()) {
    const auto& name = p.key();
    auto& dst = p.value();
    const auto it = simple.find(name);
    if (it != simple.end()) {
      set(dst, t.take(it->second, dst.sizes()), "'" + it->second + "'");
      continue;
    }
    const auto [i, rest] = layer_and_rest(name);
    const auto P = layer_prefix(i);
    const auto B = moe_prefix(t, n, i);
    const auto X = B + "experts.";
    if (rest == "mlp.gate_up.weight") {
      set(dst,
          gate_up(P + "mlp.", "gate_proj", "up_proj"),
          P + "mlp.{gate,up}_proj.weight");
    } else if (rest == "mlp.down.weight") {
      set(dst, t.take(P + "mlp.down_proj.weight"), P + "mlp.down_proj.weight");
    } else if (rest == "moe.router.weight" || rest == "moe.router.bias") {
      const auto src = B + n.router + "." + rest.substr(11);
      set(dst, t.take(src), "'" + src + "'");
    } else if (n.gpt_oss_experts && rest == "moe.w_gate_up") {
      set(dst,
          deinterleave(t.take(X + "gate_up_proj")).transpose(1, 2),
          X + "gate_up_proj");
    } else if (n.gpt_oss_experts && rest == "moe.b_gate_up") {
      set(dst,
          deinterleave(t.take(X + "gate_up_proj_bias")),
          X + "gate_up_proj_bias");
    } else if (n.gpt_oss_experts && rest == "moe.w_down") {
      set(dst, t.take(X + "down_proj").transpose(1, 2), X + "down_proj");
    } else if (n.gpt_oss_experts && rest == "moe.b_down") {
      set(dst, t.take(X + "down_proj_bias"), X + "down_proj_bias");
    } else if (rest == "moe.w_gate_up" || rest == "moe.w_down") {
      const bool up = rest == "moe.w_gate_up";
      const auto fused = X + (up ? "gate_up_proj" : "down_proj");
      if (t.has(fused)) { // transformers' in-memory 3-D layout
        set(dst, t.take(fused), "'" + fused + "'");
      } else {
        std::vector<at::Tensor> per;
        for (int64_t e = 0; e < E; ++e) {
          const auto base = X + std::to_string(e) + ".";
          per.push_back(
              up ? gate_up(base, n.gate, n.up)
                 : t.take(base + n.down + ".weight"));
        }
        set(dst, at::stack(per), X + "{0.." + std::to_string(E - 1) + "}");
      }
    } else if (rest == "moe.shared_gate_up") {
      set(dst,
          gate_up(B + n.shared + ".", "gate_proj", "up_proj"),
          B + n.shared + ".{gate,up}_proj.weight");
    } else if (rest == "moe.shared_down") {
      const auto src = B + n.shared + ".down_proj.weight";
      set(dst, t.take(src), "'" + src + "'");
    } else if (rest == "moe.shared_gate") {
      const auto src = B + n.shared_gate + ".weight";
      set(dst, t.take(src), "'" + src + "'");
    } else {
      TORCH_CHECK(
          false,
          dir,
          ": the model's parameter '",
          name,
          "' has no source in a ",
          hf.at("model_type").get<std::string>(),
          " checkpoint");
    }
  }
  // The aux-loss-free selection bias (DeepSeek-V3's e_score_correction_bias);
  // a bias enabled for fine-tuning a checkpoint without one starts at zero.
  for (auto& b : model.named_buffers()) {
    const auto [i, rest] = layer_and_rest(b.key());
    if (rest == "moe.selection_bias") {
      const auto src =
          moe_prefix(t, n, i) + n.router + ".e_score_correction_bias";
      if (t.has(src)) {
        set(b.value(), t.take(src), "'" + src + "'");
      }
    }
  }
  // DeepSeek-V3's multi-token-prediction layers (model.layers.{L}.. beyond
  // num_hidden_layers) are not part of the causal LM; transformers skips
  // them too.
  const int64_t mtp = cfg.get<int64_t>("num_nextn_predict_layers", 0);
  t.check_all_used([&](const std::string& name) {
    if (mtp <= 0 || name.rfind("model.layers.", 0) != 0) {
      return false;
    }
    return std::stoll(name.substr(13)) >= c.num_layers;
  });
}

Transformer load_hf_model(const std::string& dir) {
  const auto hf = read_hf_config(dir);
  Transformer model(
      hf_model_config(hf, (fs::path(dir) / "config.json").string()));
  load_hf_weights(*model, hf, dir);
  return model;
}

// ---- export
// -------------------------------------------------------------------

json hf_config_of(
    const ModelConfig& c, const std::string& family, const json& base) {
  const Family fam = family_of(family, "export");
  json j = base.is_object() ? base : json::object();
  auto cannot = [&](bool ok, const std::string& what) {
    TORCH_CHECK(ok, "export to ", family, ": cannot express ", what);
  };
  const auto& m = c.moe;
  const auto& r = m.routing;
  const bool ds = fam == Family::kDeepseekV3, gpt = fam == Family::kGptOss;
  cannot(c.mlp == "swiglu", "model.mlp = " + c.mlp);
  cannot(c.norm == "rmsnorm", "model.norm = " + c.norm);
  cannot(
      r.score_fn == (ds ? "sigmoid" : "softmax"),
      "moe.score_fn = " + r.score_fn);
  cannot(ds || r.scale == 1.0, "moe.scale != 1");
  cannot(ds || r.num_groups == 1, "group-limited top-k (moe.num_groups > 1)");
  cannot(r.routing == "token_choice", "moe.routing = " + r.routing);
  cannot(!r.weight_on_input, "moe.weight_on_input");
  cannot(
      m.router_bias == gpt,
      "moe.router_bias = " + std::to_string(m.router_bias));
  cannot(
      m.expert_bias == gpt,
      "moe.expert_bias = " + std::to_string(m.expert_bias));
  cannot(
      r.activation == (gpt ? "clamped_swiglu" : "swiglu"),
      "moe.activation = " + r.activation);
  cannot(
      m.selection_bias == ds,
      "moe.selection_bias = " + std::to_string(m.selection_bias));
  cannot(
      c.attention_sinks == gpt,
      "model.attention_sinks = " + std::to_string(c.attention_sinks));
  cannot(c.is_mla() == ds, "model.attention = " + c.attention);
  cannot(c.rotary_pct == 1.0, "partial rotary (model.rotary_pct < 1)");
  cannot(fam == Family::kOlmoe || c.clip_qkv == 0.0, "model.clip_qkv");
  cannot(ds || !c.rope_interleave, "model.rope_interleave");
  cannot(!c.qkv_bias || fam == Family::kQwen2Moe, "qkv bias");
  cannot(
      !c.attention_bias ||
          (fam == Family::kQwen3Moe || fam == Family::kOlmoe || ds || gpt),
      "model.attention_bias");
  const std::map<Family, std::string> arch = {
      {Family::kMixtral, "MixtralForCausalLM"},
      {Family::kQwen2Moe, "Qwen2MoeForCausalLM"},
      {Family::kQwen3Moe, "Qwen3MoeForCausalLM"},
      {Family::kOlmoe, "OlmoeForCausalLM"},
      {Family::kDeepseekV3, "DeepseekV3ForCausalLM"},
      {Family::kGptOss, "GptOssForCausalLM"}};
  j["model_type"] = family;
  j["architectures"] = json::array({arch.at(fam)});
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
  if (fam == Family::kMixtral || fam == Family::kQwen3Moe || gpt) {
    j["head_dim"] = c.dim_per_head();
  } else if (!ds) {
    cannot(
        c.dim_per_head() * c.num_heads == c.hidden_size,
        "head_dim != hidden_size / num_heads");
  }
  json rope = {{"rope_theta", c.rope_theta}};
  if (c.rope_scaling == "none") {
    rope["rope_type"] = "default";
  } else {
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
  }
  j.erase("rope_scaling");
  j.erase("rope_theta");
  j["rope_parameters"] = rope;
  const int64_t F = m.ffn_size > 0 ? m.ffn_size : c.ffn_size;
  std::vector<int64_t> dense;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    if (!c.is_moe_layer(i)) {
      dense.push_back(i);
    }
  }
  // Sliding windows: Mixtral's one window, GPT-OSS's per-layer kinds.
  bool any_sliding = false;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    any_sliding |= c.window_of(i) > 0;
  }
  if (gpt) {
    json types = json::array();
    for (int64_t i = 0; i < c.num_layers; ++i) {
      types.push_back(
          c.window_of(i) > 0 ? "sliding_attention" : "full_attention");
    }
    j["layer_types"] = types;
    j["sliding_window"] = c.sliding_window;
  } else if (fam == Family::kMixtral) {
    cannot(c.layer_types.empty(), "per-layer attention kinds");
    j["sliding_window"] =
        c.sliding_window > 0 ? json(c.sliding_window) : json(nullptr);
  } else {
    cannot(!any_sliding, "a sliding window");
    if (fam == Family::kQwen2Moe) {
      j["layer_types"] = json::array();
      for (int64_t i = 0; i < c.num_layers; ++i) {
        j["layer_types"].push_back("full_attention");
      }
    } else {
      j.erase("layer_types");
    }
  }
  switch (fam) {
    case Family::kMixtral:
    case Family::kOlmoe:
    case Family::kGptOss:
      cannot(dense.empty(), "dense layers");
      cannot(m.num_shared_experts == 0, "shared experts");
      cannot(fam == Family::kOlmoe || r.renormalize, "moe.renormalize = false");
      j["intermediate_size"] = F;
      if (fam == Family::kMixtral) {
        cannot(c.qk_norm == "none", "q/k norm");
        j["num_local_experts"] = m.num_experts;
        j["router_jitter_noise"] = r.noise == "jitter" ? r.noise_eps : 0.0;
      } else if (fam == Family::kOlmoe) {
        cannot(c.qk_norm == "projection", "q/k norm other than projection");
        j["num_experts"] = m.num_experts;
        j["norm_topk_prob"] = r.renormalize;
        j["attention_bias"] = c.attention_bias;
        j["clip_qkv"] = c.clip_qkv > 0 ? json(c.clip_qkv) : json(nullptr);
      } else {
        cannot(c.qk_norm == "none", "q/k norm");
        cannot(c.attention_bias, "attention without biases");
        j["num_local_experts"] = m.num_experts;
        j["attention_bias"] = true;
        j["swiglu_alpha"] = r.swiglu_alpha;
        j["swiglu_limit"] = r.swiglu_limit;
      }
      break;
    case Family::kQwen2Moe:
    case Family::kQwen3Moe:
      j["num_experts"] = m.num_experts;
      j["moe_intermediate_size"] = F;
      j["intermediate_size"] =
          c.dense_ffn_size > 0 ? c.dense_ffn_size : c.ffn_size;
      j["norm_topk_prob"] = r.renormalize;
      j["decoder_sparse_step"] = 1;
      j["mlp_only_layers"] = dense;
      j["use_sliding_window"] = false;
      if (fam == Family::kQwen2Moe) {
        cannot(c.qk_norm == "none", "q/k norm");
        cannot(
            m.num_shared_experts <= 1 &&
                (m.num_shared_experts == 0 || m.shared_gate),
            "shared experts other than one with a sigmoid gate");
        j["qkv_bias"] = c.qkv_bias;
        j["shared_expert_intermediate_size"] =
            m.num_shared_experts > 0
                ? (m.shared_ffn_size > 0 ? m.shared_ffn_size : F)
                : 0;
      } else {
        cannot(c.qk_norm == "head", "q/k norm other than per head");
        cannot(m.num_shared_experts == 0, "shared experts");
        j["attention_bias"] = c.attention_bias;
      }
      break;
    case Family::kDeepseekV3: {
      cannot(!m.shared_gate, "a gated shared expert");
      cannot(
          m.num_shared_experts == 0 || m.shared_ffn_size == 0 ||
              m.shared_ffn_size == F,
          "shared experts narrower or wider than the routed ones");
      // Dense layers must be exactly the first k (moe_every_n = 1).
      for (size_t k = 0; k < dense.size(); ++k) {
        cannot(
            dense[k] == static_cast<int64_t>(k),
            "dense layers other than the first k");
      }
      j["n_routed_experts"] = m.num_experts;
      j["moe_intermediate_size"] = F;
      j["intermediate_size"] =
          c.dense_ffn_size > 0 ? c.dense_ffn_size : c.ffn_size;
      j["first_k_dense_replace"] = dense.size();
      j["n_shared_experts"] = m.num_shared_experts;
      j["routed_scaling_factor"] = r.scale;
      j["n_group"] = r.num_groups;
      j["topk_group"] = r.topk_groups;
      j["norm_topk_prob"] = r.renormalize;
      j["q_lora_rank"] =
          c.q_lora_rank > 0 ? json(c.q_lora_rank) : json(nullptr);
      j["kv_lora_rank"] = c.kv_lora_rank;
      j["qk_nope_head_dim"] = c.qk_nope_head_dim;
      j["qk_rope_head_dim"] = c.qk_rope_head_dim;
      j["qk_head_dim"] = c.qk_nope_head_dim + c.qk_rope_head_dim;
      j["head_dim"] = c.qk_rope_head_dim;
      j["v_head_dim"] = c.v_head_dim;
      j["attention_bias"] = c.attention_bias;
      j["rope_interleave"] = c.rope_interleave;
      j["num_key_value_heads"] = c.num_heads;
      cannot(c.attention_scale == 0.0, "an explicit model.attention_scale");
      break;
    }
  }
  return j;
}

void save_hf(
    const TransformerImpl& model,
    const std::string& family,
    const std::string& out_dir,
    const json& base,
    int64_t max_shard_bytes) {
  const auto& c = model.config;
  const json cfg = hf_config_of(c, family, base);
  const Naming n = naming_of(family_of(family, "export"));
  const auto simple = simple_mapping(model);
  const auto file_dtype = parse_dtype(c.dtype);
  TensorMap out;
  auto put = [&](const std::string& name, const at::Tensor& w) {
    out[name] = w.to(file_dtype).contiguous();
  };
  auto split_gate_up = [&](const at::Tensor& gu,
                           const std::string& base,
                           const std::string& g,
                           const std::string& u) {
    const auto half = gu.size(0) / 2;
    put(base + g + ".weight", gu.slice(0, 0, half));
    put(base + u + ".weight", gu.slice(0, half));
  };
  auto emit = [&](const std::string& name, const at::Tensor& w) {
    const auto it = simple.find(name);
    if (it != simple.end()) {
      put(it->second, w);
      return;
    }
    const auto [i, rest] = layer_and_rest(name);
    const auto P = layer_prefix(i);
    const auto B = P + n.moe_block + ".";
    const auto X = B + "experts.";
    if (rest == "mlp.gate_up.weight") {
      split_gate_up(w, P + "mlp.", "gate_proj", "up_proj");
    } else if (rest == "mlp.down.weight") {
      put(P + "mlp.down_proj.weight", w);
    } else if (rest == "moe.router.weight" || rest == "moe.router.bias") {
      put(B + n.router + "." + rest.substr(11), w);
    } else if (rest == "moe.selection_bias") {
      out[B + n.router + ".e_score_correction_bias"] =
          w.to(at::kFloat).contiguous();
    } else if (n.gpt_oss_experts && rest == "moe.w_gate_up") {
      put(X + "gate_up_proj", interleave(w.transpose(1, 2)));
    } else if (n.gpt_oss_experts && rest == "moe.b_gate_up") {
      put(X + "gate_up_proj_bias", interleave(w));
    } else if (n.gpt_oss_experts && rest == "moe.w_down") {
      put(X + "down_proj", w.transpose(1, 2));
    } else if (n.gpt_oss_experts && rest == "moe.b_down") {
      put(X + "down_proj_bias", w);
    } else if (rest == "moe.w_gate_up" || rest == "moe.w_down") {
      for (int64_t e = 0; e < w.size(0); ++e) {
        const auto base = X + std::to_string(e) + ".";
        if (rest == "moe.w_gate_up") {
          split_gate_up(w[e], base, n.gate, n.up);
        } else {
          put(base + n.down + ".weight", w[e]);
        }
      }
    } else if (rest == "moe.shared_gate_up") {
      split_gate_up(w, B + n.shared + ".", "gate_proj", "up_proj");
    } else if (rest == "moe.shared_down") {
      put(B + n.shared + ".down_proj.weight", w);
    } else if (rest == "moe.shared_gate") {
      put(B + n.shared_gate + ".weight", w);
    } else {
      TORCH_CHECK(
          false, "export to ", family, ": no Hugging Face name for ", name);
    }
  };
  for (const auto& p : model.named_parameters()) {
    emit(p.key(), p.value().detach());
  }
  for (const auto& b : model.named_buffers()) {
    emit(b.key(), b.value());
  }

  fs::create_directories(out_dir);
  {
    const auto path = (fs::path(out_dir) / "config.json").string();
    std::ofstream f(path);
    f << cfg.dump(2) << "\n";
    TORCH_CHECK(f.good(), path, ": write failed");
  }
  // Shards in name order, each up to max_shard_bytes (a tensor larger than
  // that gets a shard of its own).
  std::vector<TensorMap> shards(1);
  int64_t in_shard = 0, total = 0;
  for (auto& [name, t] : out) {
    const int64_t bytes = t.numel() * t.element_size();
    if (in_shard > 0 && in_shard + bytes > max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back()[name] = t;
    in_shard += bytes;
    total += bytes;
  }
  const std::map<std::string, std::string> meta = {{"format", "pt"}};
  // A previous export's files would be mixed in by an index-less reader.
  for (const auto& e : fs::directory_iterator(out_dir)) {
    const auto f = e.path().filename().string();
    if (f.rfind("model", 0) == 0 &&
        f.find(".safetensors") != std::string::npos) {
      fs::remove(e.path());
    }
  }
  if (shards.size() == 1) {
    save_safetensors(
        (fs::path(out_dir) / "model.safetensors").string(), shards[0], meta);
    return;
  }
  json index = {
      {"metadata", {{"total_size", total}}}, {"weight_map", json::object()}};
  auto pad5 = [](size_t v) {
    auto s = std::to_string(v);
    return std::string(s.size() < 5 ? 5 - s.size() : 0, '0') + s;
  };
  for (size_t s = 0; s < shards.size(); ++s) {
    const auto file =
        "model-" + pad5(s + 1) + "-of-" + pad5(shards.size()) + ".safetensors";
    save_safetensors((fs::path(out_dir) / file).string(), shards[s], meta);
    for (const auto& [name, t] : shards[s]) {
      index["weight_map"][name] = file;
    }
  }
  const auto path =
      (fs::path(out_dir) / "model.safetensors.index.json").string();
  std::ofstream f(path);
  f << index.dump(2) << "\n";
  TORCH_CHECK(f.good(), path, ": write failed");
}

} // namespace moeyard::io
