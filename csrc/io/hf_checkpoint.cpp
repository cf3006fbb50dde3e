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

enum class Family { kMixtral, kQwen2Moe, kQwen3Moe, kOlmoe };

const std::vector<std::pair<std::string, Family>>& family_table() {
  static const std::vector<std::pair<std::string, Family>> t = {
      {"mixtral", Family::kMixtral},
      {"qwen2_moe", Family::kQwen2Moe},
      {"qwen3_moe", Family::kQwen3Moe},
      {"olmoe", Family::kOlmoe},
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
    c.rope_factor = p.need<double>("factor");
    c.rope_original_max_position = p.get<int64_t>(
        "original_max_position_embeddings",
        r.get<int64_t>("max_position_embeddings", 2048));
    c.yarn_beta_fast = p.get<double>("beta_fast", 32.0);
    c.yarn_beta_slow = p.get<double>("beta_slow", 1.0);
    for (const char* k : {"attention_factor", "mscale", "mscale_all_dim"}) {
      TORCH_CHECK(
          !p.has(k),
          r.file,
          ": rope_parameters.",
          k,
          " = ",
          params.at(k).dump(),
          " is not supported (moeyard's YaRN uses the default attention "
          "factor 0.1 ln(factor) + 1)");
    }
    p.only<bool>("truncate", true, "moeyard's YaRN truncates the ramp bounds");
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
        r.only<bool>("attention_bias", false, "bias on q/k/v/o projections");
      }
      break;
    case Family::kOlmoe:
      m.num_experts = r.need<int64_t>("num_experts");
      m.ffn_size = c.ffn_size;
      m.routing.renormalize = r.get<bool>("norm_topk_prob", false);
      c.qk_norm = "projection";
      r.only<bool>("attention_bias", false, "bias on q/k/v/o projections");
      TORCH_CHECK(
          !r.has("clip_qkv"),
          file,
          ": clip_qkv = ",
          hf.at("clip_qkv").dump(),
          " is not supported yet");
      break;
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

  // Every stored tensor must have been used (rotary inverse-frequency
  // buffers of old checkpoints are derived data and may be left).
  void check_all_used() const {
    std::vector<std::string> extra;
    for (const auto& [name, t] : tensors_) {
      const bool derived =
          name.find("rotary_emb.inv_freq") != std::string::npos;
      if (!used_.count(name) && !derived) {
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
  std::string gate = "gate_proj", up = "up_proj", down = "down_proj";
  std::string shared = "shared_expert";
  std::string shared_gate = "shared_expert_gate";
};

Naming naming_of(Family f) {
  Naming n;
  if (f == Family::kMixtral) {
    n.moe_block = "block_sparse_moe";
    n.gate = "w1";
    n.up = "w3";
    n.down = "w2";
  }
  return n;
}

std::string layer_prefix(int64_t i) {
  return "model.layers." + std::to_string(i) + ".";
}

// moeyard tensor name -> HF tensors, both directions, by one table of
// "simple" renames plus the composite expert tensors.
struct Mapping {
  // moeyard name -> HF name, for tensors copied as they are.
  std::map<std::string, std::string> rename;
};

Mapping simple_mapping(const TransformerImpl& model) {
  const auto& c = model.config;
  Mapping m;
  m.rename["embed.weight"] = "model.embed_tokens.weight";
  m.rename["norm.weight"] = "model.norm.weight";
  if (!c.tie_embeddings) {
    m.rename["lm_head.weight"] = "lm_head.weight";
  }
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const auto L = "layers." + std::to_string(i) + ".";
    const auto P = layer_prefix(i);
    m.rename[L + "attn_norm.weight"] = P + "input_layernorm.weight";
    m.rename[L + "mlp_norm.weight"] = P + "post_attention_layernorm.weight";
    for (const char* proj : {"q_proj", "k_proj", "v_proj", "o_proj"}) {
      for (const char* what : {"weight", "bias"}) {
        m.rename[L + "attn." + proj + "." + what] =
            P + "self_attn." + proj + "." + what;
      }
    }
    for (const char* norm : {"q_norm", "k_norm"}) {
      m.rename[L + "attn." + norm + ".weight"] =
          P + "self_attn." + norm + ".weight";
    }
  }
  return m;
}

// The MoE block prefix present in the files: the family's save_pretrained
// name, or transformers' in-memory name "mlp" (fused checkpoints).
std::string moe_prefix(const HfTensors& t, const Naming& n, int64_t i) {
  const auto P = layer_prefix(i);
  if (t.has(P + n.moe_block + ".gate.weight")) {
    return P + n.moe_block + ".";
  }
  return P + "mlp.";
}

} // namespace

void load_hf_weights(
    TransformerImpl& model, const json& hf, const std::string& dir) {
  const auto file = (fs::path(dir) / "config.json").string();
  const Family fam =
      family_of(JsonReader{hf, file}.need<std::string>("model_type"), file);
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
  auto gate_up = [&](const std::string& base, const Naming& nm) {
    return at::cat(
        {t.take(base + nm.gate + ".weight"), t.take(base + nm.up + ".weight")},
        0);
  };

  std::set<std::string> done;
  for (auto& p : model.named_parameters()) {
    const auto& name = p.key();
    auto& dst = p.value();
    const auto it = simple.rename.find(name);
    if (it != simple.rename.end()) {
      set(dst, t.take(it->second, dst.sizes()), "'" + it->second + "'");
      continue;
    }
    // layers.{i}.<rest>
    TORCH_CHECK(
        name.rfind("layers.", 0) == 0,
        "hf import: no rule for parameter ",
        name);
    const auto dot = name.find('.', 7);
    const int64_t i = std::stoll(name.substr(7, dot - 7));
    const auto rest = name.substr(dot + 1);
    const auto P = layer_prefix(i);
    if (rest == "mlp.gate_up.weight") {
      set(dst, gate_up(P + "mlp.", Naming{}), P + "mlp.{gate,up}_proj.weight");
    } else if (rest == "mlp.down.weight") {
      set(dst, t.take(P + "mlp.down_proj.weight"), P + "mlp.down_proj.weight");
    } else if (rest == "moe.router.weight" || rest == "moe.router.bias") {
      const auto B = moe_prefix(t, n, i);
      const auto src = B + "gate." + rest.substr(11);
      set(dst, t.take(src).to(dst.scalar_type()), "'" + src + "'");
    } else if (rest == "moe.w_gate_up" || rest == "moe.w_down") {
      const auto B = moe_prefix(t, n, i) + "experts.";
      const bool up = rest == "moe.w_gate_up";
      const auto fused = B + (up ? "gate_up_proj" : "down_proj");
      if (t.has(fused)) { // transformers' in-memory 3-D layout
        set(dst, t.take(fused), "'" + fused + "'");
      } else {
        std::vector<at::Tensor> per;
        for (int64_t e = 0; e < E; ++e) {
          const auto base = B + std::to_string(e) + ".";
          per.push_back(
              up ? gate_up(base, n) : t.take(base + n.down + ".weight"));
        }
        set(dst, at::stack(per), B + "{0.." + std::to_string(E - 1) + "}");
      }
    } else if (rest == "moe.shared_gate_up") {
      const auto B = moe_prefix(t, n, i) + n.shared + ".";
      set(dst, gate_up(B, Naming{}), B + "{gate,up}_proj.weight");
    } else if (rest == "moe.shared_down") {
      const auto src = moe_prefix(t, n, i) + n.shared + ".down_proj.weight";
      set(dst, t.take(src), "'" + src + "'");
    } else if (rest == "moe.shared_gate") {
      const auto src = moe_prefix(t, n, i) + n.shared_gate + ".weight";
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
  t.check_all_used();
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
  cannot(c.mlp == "swiglu", "model.mlp = " + c.mlp);
  cannot(c.norm == "rmsnorm", "model.norm = " + c.norm);
  cannot(r.score_fn == "softmax", "moe.score_fn = " + r.score_fn);
  cannot(r.scale == 1.0, "moe.scale != 1");
  cannot(r.num_groups == 1, "group-limited top-k (moe.num_groups > 1)");
  cannot(r.routing == "token_choice", "moe.routing = " + r.routing);
  cannot(!r.weight_on_input, "moe.weight_on_input");
  cannot(!m.router_bias, "moe.router_bias");
  cannot(!m.selection_bias, "moe.selection_bias");
  cannot(c.rotary_pct == 1.0, "partial rotary (model.rotary_pct < 1)");
  const std::string arch = family == "mixtral"     ? "MixtralForCausalLM"
                           : family == "qwen2_moe" ? "Qwen2MoeForCausalLM"
                           : family == "qwen3_moe" ? "Qwen3MoeForCausalLM"
                                                   : "OlmoeForCausalLM";
  j["model_type"] = family;
  j["architectures"] = json::array({arch});
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.kv_heads();
  if (fam == Family::kMixtral || fam == Family::kQwen3Moe) {
    j["head_dim"] = c.dim_per_head();
  } else {
    cannot(
        c.dim_per_head() * c.num_heads == c.hidden_size,
        "head_dim != hidden_size / num_heads");
  }
  j["rms_norm_eps"] = c.norm_eps;
  j["max_position_embeddings"] = c.max_seq_len;
  j["tie_word_embeddings"] = c.tie_embeddings;
  j["hidden_act"] = "silu";
  j["num_experts_per_tok"] = r.top_k;
  j["dtype"] = c.dtype;
  j.erase("torch_dtype");
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
  if (fam == Family::kMixtral || fam == Family::kOlmoe) {
    cannot(dense.empty(), "dense layers");
    cannot(m.num_shared_experts == 0, "shared experts");
    cannot(c.qkv_bias == false, "qkv bias");
    j["intermediate_size"] = F;
    if (fam == Family::kMixtral) {
      cannot(c.qk_norm == "none", "q/k norm");
      cannot(r.renormalize, "moe.renormalize = false");
      j["num_local_experts"] = m.num_experts;
      j["sliding_window"] =
          c.sliding_window > 0 ? json(c.sliding_window) : json(nullptr);
      j["router_jitter_noise"] = r.noise == "jitter" ? r.noise_eps : 0.0;
    } else {
      cannot(c.qk_norm == "projection", "q/k norm other than projection");
      j["num_experts"] = m.num_experts;
      j["norm_topk_prob"] = r.renormalize;
    }
  } else {
    cannot(c.sliding_window == 0, "a sliding window");
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
      cannot(!c.qkv_bias, "qkv bias");
      j["attention_bias"] = false;
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
  TensorMap out;
  for (const auto& p : model.named_parameters()) {
    const auto& name = p.key();
    const auto w = p.value().detach().contiguous();
    const auto it = simple.rename.find(name);
    if (it != simple.rename.end()) {
      out[it->second] = w;
      continue;
    }
    const auto dot = name.find('.', 7);
    const int64_t i = std::stoll(name.substr(7, dot - 7));
    const auto rest = name.substr(dot + 1);
    const auto P = layer_prefix(i);
    const auto B = P + n.moe_block + ".";
    auto split_gate_up =
        [&](const at::Tensor& gu, const std::string& base, const Naming& nm) {
          const auto half = gu.size(0) / 2;
          out[base + nm.gate + ".weight"] = gu.slice(0, 0, half).contiguous();
          out[base + nm.up + ".weight"] = gu.slice(0, half).contiguous();
        };
    if (rest == "mlp.gate_up.weight") {
      split_gate_up(w, P + "mlp.", Naming{});
    } else if (rest == "mlp.down.weight") {
      out[P + "mlp.down_proj.weight"] = w;
    } else if (rest == "moe.router.weight") {
      // The router is float32 in moeyard; the file holds the model dtype.
      out[B + "gate.weight"] = w.to(parse_dtype(c.dtype));
    } else if (rest == "moe.w_gate_up" || rest == "moe.w_down") {
      for (int64_t e = 0; e < w.size(0); ++e) {
        const auto base = B + "experts." + std::to_string(e) + ".";
        if (rest == "moe.w_gate_up") {
          split_gate_up(w[e], base, n);
        } else {
          out[base + n.down + ".weight"] = w[e].contiguous();
        }
      }
    } else if (rest == "moe.shared_gate_up") {
      split_gate_up(w, B + n.shared + ".", Naming{});
    } else if (rest == "moe.shared_down") {
      out[B + n.shared + ".down_proj.weight"] = w;
    } else if (rest == "moe.shared_gate") {
      out[B + n.shared_gate + ".weight"] = w;
    } else {
      TORCH_CHECK(
          false, "export to ", family, ": no HF name for parameter ", name);
    }
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
  if (shards.size() == 1) {
    save_safetensors(
        (fs::path(out_dir) / "model.safetensors").string(), shards[0], meta);
    return;
  }
  json index = {
      {"metadata", {{"total_size", total}}}, {"weight_map", json::object()}};
  const auto count = std::to_string(shards.size());
  for (size_t s = 0; s < shards.size(); ++s) {
    auto num = std::to_string(s + 1);
    num = std::string(5 - std::min<size_t>(5, num.size()), '0') + num;
    auto cnt = std::string(5 - std::min<size_t>(5, count.size()), '0') + count;
    const auto file = "model-" + num + "-of-" + cnt + ".safetensors";
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
