// Hugging Face checkpoint weights into the C++ model and back (the
// config.json mapping is hf_config.cpp).

#include "io/hf_checkpoint.h"

#include <ATen/ops/cat.h>
#include <ATen/ops/stack.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "io/hf_family.h"
#include "io/safetensors.h"
#include "util/dtype.h"

namespace moeyard::io {
namespace fs = std::filesystem;
using json = nlohmann::json;
using detail::Family;
using detail::family_of;
using detail::JsonReader;

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
  // DeepSeek-V3's multi-token-prediction layers (model.layers.{L} ..
  // {L + num_nextn_predict_layers - 1}, after the num_hidden_layers = L
  // decoder layers) are not part of the causal LM's forward; transformers
  // does not load them into it either. The key defaults to 1, as in
  // DeepseekV3Config; other families have none.
  const int64_t mtp =
      fam == Family::kDeepseekV3
          ? JsonReader{detail::with_class_defaults(hf, fam), file}.get<int64_t>(
                "num_nextn_predict_layers", 0)
          : 0;
  t.check_all_used([&](const std::string& name) {
    // The layer number comes from a file: anything but digits (or more
    // digits than a layer count has) is not an MTP layer, and is reported
    // as an unused tensor with its file.
    if (mtp <= 0 || name.rfind("model.layers.", 0) != 0) {
      return false;
    }
    const auto digits = name.substr(13, name.find('.', 13) - 13);
    if (digits.empty() || digits.size() > 9 ||
        digits.find_first_not_of("0123456789") != std::string::npos) {
      return false;
    }
    const int64_t layer = std::stoll(digits);
    return layer >= c.num_layers && layer < c.num_layers + mtp;
  });
}

Transformer load_hf_model(const std::string& dir) {
  const auto hf = read_hf_config(dir);
  Transformer model(
      hf_model_config(hf, (fs::path(dir) / "config.json").string()));
  load_hf_weights(*model, hf, dir);
  return model;
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
