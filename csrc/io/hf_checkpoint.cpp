// Hugging Face checkpoint weights into the C++ model and back. Both
// directions walk the model's tensors and apply the family's tensor rules
// (csrc/io/hf/<family>.cpp); the files are hf_files.cpp, config.json is
// hf_config.cpp (import) and hf_config_export.cpp (export).

#include "io/hf_checkpoint.h"

#include <ATen/ops/cat.h>
#include <ATen/ops/stack.h>
#include <c10/util/Exception.h>

#include <filesystem>
#include <fstream>

#include "io/hf/family.h"
#include "io/hf/tensor_names.h"
#include "io/hf_files.h"
#include "io/hf_quantization.h"
#include "model/lora.h"
#include "util/dtype.h"
#include "util/log.h"

namespace moeyard::io {
namespace fs = std::filesystem;
using json = nlohmann::json;
using hf::HfFamily;
using hf::per_expert;
using hf::Place;
using hf::replace_all;
using hf::rule_of;
using hf::TensorRule;

namespace {

// ---- import -----------------------------------------------------------------

// The MoE block of layer i in the files: the family's save_pretrained name
// when the router is stored under it, else transformers' in-memory "mlp"
// (files written from a state_dict, e.g. with fused experts).
std::string moe_block_in_files(
    const HfTensors& t, const HfFamily& fam, int64_t layer) {
  int64_t unused = 0;
  const TensorRule* router =
      rule_of(fam, "layers.0.moe.router.weight", &unused);
  if (router != nullptr &&
      t.has(Place{layer, fam.moe_block}.name(router->theirs[0]))) {
    return fam.moe_block;
  }
  return "mlp";
}

// Copies the rule's tensors from the files into dst, piece `want` of the
// model's tensor (a per-expert rule reads only the piece's experts).
void read_rule(
    HfTensors& t,
    const TensorRule& rule,
    const Place& where,
    at::Tensor& dst,
    const parallel::Piece& want,
    const std::string& dir) {
  // The full tensor's shape, and the first expert dst holds.
  auto full = dst.sizes().vec();
  int64_t first = 0;
  if (!want.whole()) {
    full[want.split.dim] *= want.count;
    first = want.split.dim == 0 ? want.index * dst.size(0) : 0;
  }
  auto set = [&](const at::Tensor& src, const std::string& what) {
    TORCH_CHECK(
        src.sizes() == at::IntArrayRef(full),
        dir,
        ": ",
        what,
        " has shape ",
        src.sizes(),
        ", the model expects ",
        at::IntArrayRef(full));
    parallel::copy_overlap(
        dst, want, src, {}, want.whole() ? 0 : full[want.split.dim]);
  };
  const auto& theirs = rule.theirs;
  const std::string fused = where.name(rule.fused);
  if (!rule.fused.empty() && t.has(fused)) {
    set(t.take(fused), std::string("'").append(fused).append("'"));
    return;
  }
  if (rule.optional && !t.has(where.name(theirs[0]))) {
    return;
  }
  // One tensor, or gate and up stacked by rows; for expert e or for all.
  auto one = [&](int64_t e) {
    if (theirs.size() == 2) {
      return at::cat(
          {t.take(where.name(theirs[0], e)), t.take(where.name(theirs[1], e))},
          0);
    }
    return t.take(where.name(theirs[0], e));
  };
  std::string what;
  for (const auto& n : theirs) {
    what += (what.empty() ? "'" : " + '") + n + "'";
  }
  if (per_expert(rule)) {
    // This piece's experts only; the others' tensors are another rank's.
    const bool slice = !want.whole() && want.split.dim == 0;
    std::vector<at::Tensor> experts;
    for (int64_t e = 0; e < full[0]; ++e) {
      if (slice && (e < first || e >= first + dst.size(0))) {
        for (const auto& n : theirs) {
          t.skip(where.name(n, e));
        }
        continue;
      }
      experts.push_back(one(e));
    }
    replace_all(what, "{e}", "{0.." + std::to_string(full[0] - 1) + "}");
    if (slice) {
      auto got = at::stack(experts);
      TORCH_CHECK(
          got.sizes() == dst.sizes(),
          dir,
          ": ",
          where.name(what),
          " gives experts of shape ",
          got.sizes().slice(1),
          ", the model expects ",
          dst.sizes().slice(1));
      dst.copy_(got);
    } else {
      set(at::stack(experts), where.name(what));
    }
  } else if (theirs.size() == 2) {
    set(one(-1), where.name(what));
  } else if (rule.interleaved || rule.transposed) {
    at::Tensor x = t.take(where.name(theirs[0]));
    x = rule.interleaved ? hf::deinterleave(x) : x;
    set(rule.transposed ? x.transpose(-2, -1) : x, where.name(what));
  } else {
    set(t.take(where.name(theirs[0]), full), where.name(what));
  }
}

// Files of layers the causal LM does not use (DeepSeek-V3's
// multi-token-prediction layers L .. L + n - 1 after the L decoder layers).
std::function<bool(const std::string&)> unused_layers(
    const HfFamily& fam, const json& hf, const std::string& file, int64_t L) {
  const int64_t n =
      fam.unused_layers_key.empty()
          ? 0
          : hf::JsonReader{hf::with_class_defaults(hf, fam), file}.get<int64_t>(
                fam.unused_layers_key, 0);
  return [n, L](const std::string& name) {
    // The layer number comes from a file: anything but digits (or more
    // digits than a layer count has) is not such a layer, and is reported
    // as an unused tensor with its file.
    if (n <= 0 || name.rfind("model.layers.", 0) != 0) {
      return false;
    }
    const auto digits = name.substr(13, name.find('.', 13) - 13);
    if (digits.empty() || digits.size() > 9 ||
        digits.find_first_not_of("0123456789") != std::string::npos) {
      return false;
    }
    const int64_t layer = std::stoll(digits);
    return layer >= L && layer < L + n;
  };
}

// ---- export -----------------------------------------------------------------

// Writes w into `out` under the rule's names.
void write_rule(
    TensorMap& out,
    const TensorRule& rule,
    const Place& where,
    const at::Tensor& w,
    at::ScalarType file_dtype) {
  auto put = [&](const std::string& name, const at::Tensor& x) {
    out[name] = x.to(rule.float32 ? at::kFloat : file_dtype).contiguous();
  };
  auto one = [&](at::Tensor x, int64_t e) {
    if (rule.theirs.size() == 2) { // gate rows, then up rows
      const auto half = x.size(0) / 2;
      put(where.name(rule.theirs[0], e), x.slice(0, 0, half));
      put(where.name(rule.theirs[1], e), x.slice(0, half));
      return;
    }
    x = rule.transposed ? x.transpose(-2, -1) : x;
    put(where.name(rule.theirs[0], e),
        rule.interleaved ? hf::interleave(x) : x);
  };
  if (per_expert(rule)) {
    for (int64_t e = 0; e < w.size(0); ++e) {
      one(w[e], e);
    }
  } else {
    one(w, -1);
  }
}

} // namespace

void load_hf_weights(
    TransformerImpl& model,
    const json& hf,
    const std::string& dir,
    const std::function<parallel::Piece(const std::string&)>& piece_of) {
  const auto file = (fs::path(dir) / "config.json").string();
  const HfFamily& fam = hf::family_of(
      hf::JsonReader{hf, file}.need<std::string>("model_type"), file);
  // Quantized tensors are dequantized one by one into the model's dtype.
  HfTensors t(
      dir, read_hf_quantization(hf, file), parse_dtype(model.config.dtype));
  at::NoGradGuard no_grad;
  auto place = [&](int64_t layer) {
    return Place{layer, layer >= 0 ? moe_block_in_files(t, fam, layer) : ""};
  };
  for (auto& p : model.named_parameters()) {
    if (is_lora_parameter(p.key())) { // not in the base checkpoint
      continue;
    }
    int64_t layer = -1;
    const TensorRule* rule = rule_of(fam, p.key(), &layer);
    TORCH_CHECK(
        rule != nullptr,
        dir,
        ": the model's parameter '",
        p.key(),
        "' has no source in a ",
        fam.model_type,
        " checkpoint");
    read_rule(
        t,
        *rule,
        place(layer),
        p.value(),
        piece_of ? piece_of(p.key()) : parallel::Piece{},
        dir);
  }
  // Buffers with a rule (the selection bias); others are derived state.
  for (auto& b : model.named_buffers()) {
    int64_t layer = -1;
    if (const TensorRule* rule = rule_of(fam, b.key(), &layer)) {
      read_rule(t, *rule, place(layer), b.value(), {}, dir);
    }
  }
  t.check_all_used(unused_layers(fam, hf, file, model.config.num_layers));
}

Transformer load_hf_model(const std::string& dir, const std::string& dtype) {
  const auto hf = read_hf_config(dir);
  ModelConfig c = hf_model_config(hf, (fs::path(dir) / "config.json").string());
  c.dtype = dtype;
  c.validate();
  Transformer model(c);
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
  const HfFamily& fam = hf::family_of(family, "export");
  const auto file_dtype = parse_dtype(c.dtype);
  TensorMap out;
  auto emit = [&](const std::string& name, const at::Tensor& w) {
    int64_t layer = -1;
    const TensorRule* rule = rule_of(fam, name, &layer);
    TORCH_CHECK(
        rule != nullptr,
        "export to ",
        family,
        ": no Hugging Face name for ",
        name);
    write_rule(out, *rule, Place{layer, fam.moe_block}, w, file_dtype);
  };
  // LoRA: the merged weights (base + scale * B A), no factors.
  std::map<std::string, at::Tensor> merged;
  for (auto& [name, w] : lora_merged_weights(model)) {
    merged[name] = w;
  }
  // The routing critics are moeyard's own: Hugging Face models have none.
  auto critic = [](const std::string& name) {
    return name.find(".moe.critic_") != std::string::npos;
  };
  if (c.moe.critic_hidden > 0) {
    log::info(
        "export: the routing critics are not exported (no Hugging "
        "Face equivalent)");
  }
  for (const auto& p : model.named_parameters()) {
    if (!is_lora_parameter(p.key()) && !critic(p.key())) {
      const auto it = merged.find(p.key());
      emit(p.key(), it != merged.end() ? it->second : p.value().detach());
    }
  }
  for (const auto& b : model.named_buffers()) {
    if (!critic(b.key())) {
      emit(b.key(), b.value());
    }
  }
  fs::create_directories(out_dir);
  {
    const auto path = (fs::path(out_dir) / "config.json").string();
    std::ofstream f(path);
    f << cfg.dump(2) << "\n";
    TORCH_CHECK(f.good(), path, ": write failed");
  }
  write_hf_weights(out_dir, out, max_shard_bytes);
}

} // namespace moeyard::io
