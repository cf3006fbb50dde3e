// PEFT adapter export (io/hf_peft.h). peft's layouts (peft/tuners/lora):
// an nn.Linear's adapter is lora_A.weight [r, in] and lora_B.weight [out, r]
// under "base_model.model.<module>."; a 3-D expert parameter [E, out, in]
// has one lora_A [E * r, in] whose rows e * r .. e * r + r - 1 are expert
// e's A, and one lora_B [out, r * E] whose column k * E + e is column k of
// expert e's B; a transposed parameter [E, in, out] (transformers'
// is_transposed experts, GPT-OSS) takes the same factors, its delta being
// (B A)^T. Two parameters of one module nest: the first registered
// (gate_up_proj) is the inner wrapper, its keys under "<module>.base_layer.".
// A 2-D parameter (a dense MLP's weight) has the nn.Linear layout.

#include "io/hf_peft.h"

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <vector>

#include "io/hf/tensor_names.h"
#include "io/safetensors.h"

namespace moeyard::io {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

const std::string kPrefix = "base_model.model.";

// "a.b.weight" -> "a.b".
std::string module_of(const std::string& tensor) {
  const auto dot = tensor.rfind('.');
  TORCH_INTERNAL_ASSERT(dot != std::string::npos, tensor);
  return tensor.substr(0, dot);
}

// Expert factors in peft's ParamWrapper layout: a [E, r, in] ->
// [E * r, in]; b [E, out, r] -> [out, r * E] (column k * E + e).
at::Tensor peft_expert_a(const at::Tensor& a) {
  return a.reshape({a.size(0) * a.size(1), a.size(2)}).contiguous();
}
at::Tensor peft_expert_b(const at::Tensor& b) {
  return b.permute({1, 2, 0})
      .reshape({b.size(1), b.size(2) * b.size(0)})
      .contiguous();
}

} // namespace

void save_peft(
    const TransformerImpl& model,
    const std::string& family,
    const std::string& out_dir,
    const std::string& base_model) {
  const hf::HfFamily& fam = hf::family_of(family, "PEFT export");
  auto cannot = [&](bool ok, const std::string& what) {
    TORCH_CHECK(
        ok, "PEFT export to ", family, ": cannot express LoRA on ", what);
  };
  TensorMap out;
  std::vector<std::string> modules, parameters;
  int64_t rank = 0;
  double scale = 0.0, dropout = 0.0;
  auto factors = [&](const at::Tensor& a, double s, double d) {
    TORCH_CHECK(
        rank == 0 || (rank == a.size(-2) && scale == s && dropout == d),
        "PEFT export: every LoRA factor must share rank, alpha and dropout");
    rank = a.size(-2);
    scale = s;
    dropout = d;
  };
  // In-memory module names (transformers' "mlp" for the MoE block).
  auto rule_for = [&](const std::string& name, hf::Place& where) {
    const auto* rule = hf::rule_of(fam, name, &where.layer);
    where.moe_block = "mlp";
    cannot(rule != nullptr, name);
    return rule;
  };
  for (const auto& item : model.named_modules()) {
    const auto& name = item.key();
    if (auto* lin = item.value()->as<LinearImpl>();
        lin && lin->lora_a.defined()) {
      factors(lin->lora_a, lin->lora_scale, lin->lora_dropout);
      hf::Place where;
      const auto* rule = rule_for(name + ".weight", where);
      cannot(
          !rule->interleaved && !rule->transposed && !hf::per_expert(*rule),
          name + " (its files' layout)");
      // One module, or gate and up: B's rows split, A shared. Dense MLPs
      // are targeted by their weight parameter: peft rewrites target_modules
      // named gate_proj/up_proj/down_proj of MoE families into the experts'
      // fused parameters (its transformers v4 -> v5 conversion).
      const bool mlp = name.find(".mlp.") != std::string::npos;
      const auto parts = static_cast<int64_t>(rule->theirs.size());
      const int64_t rows = lin->lora_b.size(0) / parts;
      for (int64_t i = 0; i < parts; ++i) {
        const auto param = where.name(rule->theirs[i]);
        const auto mod = module_of(param);
        (mlp ? parameters : modules).push_back(mlp ? param : mod);
        out[kPrefix + mod + ".lora_A.weight"] = lin->lora_a.detach();
        out[kPrefix + mod + ".lora_B.weight"] =
            lin->lora_b.detach().narrow(0, i * rows, rows);
      }
    } else if (auto* moe = item.value()->as<MoELayerImpl>();
               moe && moe->lora_gate_up_a.defined()) {
      factors(moe->lora_gate_up_a, moe->lora_scale, moe->lora_dropout);
      hf::Place where;
      const auto* gate_up = rule_for(name + ".w_gate_up", where);
      const auto* down = rule_for(name + ".w_down", where);
      // The files' fused tensor, or transformers' in-memory one.
      auto fused_param = [&](const hf::TensorRule* rule) {
        cannot(
            !rule->fused.empty() || !hf::per_expert(*rule),
            name + "'s experts (per-expert tensors in memory)");
        return where.name(rule->fused.empty() ? rule->theirs[0] : rule->fused);
      };
      const auto gate_up_param = fused_param(gate_up);
      const auto down_param = fused_param(down);
      const auto mod = module_of(gate_up_param);
      TORCH_INTERNAL_ASSERT(mod == module_of(down_param), mod);
      parameters.push_back(gate_up_param);
      parameters.push_back(down_param);
      const std::string inner = kPrefix + mod + ".base_layer.";
      const std::string outer = kPrefix + mod + ".";
      out[inner + "lora_A.weight"] =
          peft_expert_a(moe->lora_gate_up_a.detach());
      // A transposed parameter [E, in, out] (GPT-OSS) takes the same
      // factors: peft's delta is then (B A)^T. Interleaved gate/up columns
      // interleave B's rows.
      const auto b_gate_up = moe->lora_gate_up_b.detach();
      const bool interleaved = gate_up->fused.empty() && gate_up->interleaved;
      out[inner + "lora_B.weight"] =
          peft_expert_b(interleaved ? hf::interleave(b_gate_up, 1) : b_gate_up);
      out[outer + "lora_A.weight"] = peft_expert_a(moe->lora_down_a.detach());
      out[outer + "lora_B.weight"] = peft_expert_b(moe->lora_down_b.detach());
    }
  }
  TORCH_CHECK(
      rank > 0,
      "PEFT export: the model has no LoRA factors (train with finetune.lora)");
  const double alpha = scale * static_cast<double>(rank);
  json cfg = {
      {"peft_type", "LORA"},
      {"task_type", "CAUSAL_LM"},
      {"base_model_name_or_path",
       base_model.empty() ? json(nullptr) : json(base_model)},
      {"r", rank},
      {"lora_alpha",
       alpha == std::round(alpha) ? json(std::llround(alpha)) : json(alpha)},
      // peft refuses dropout on target_parameters; it does not change the
      // adapter's outputs (dropout is off in inference).
      {"lora_dropout", parameters.empty() ? dropout : 0.0},
      {"target_modules", modules.empty() ? json(nullptr) : json(modules)},
      {"target_parameters",
       parameters.empty() ? json(nullptr) : json(parameters)},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"use_rslora", false},
      {"use_dora", false},
      {"init_lora_weights", true},
      {"inference_mode", true},
      {"modules_to_save", nullptr}};
  fs::create_directories(out_dir);
  const auto path = (fs::path(out_dir) / "adapter_config.json").string();
  {
    std::ofstream f(path);
    f << cfg.dump(2) << "\n";
    TORCH_CHECK(f.good(), path, ": write failed");
  }
  save_safetensors(
      (fs::path(out_dir) / "adapter_model.safetensors").string(),
      out,
      {{"format", "pt"}});
}

} // namespace moeyard::io
