// LoRA factors on the C++ model (model/lora.h): adding them to Linear and
// MoE layers, their initialization and the merged weights. The forward
// passes are LinearImpl::forward (transformer.cpp) and the experts'
// (moe_experts.cpp).

#include "model/lora.h"

#include <ATen/ATen.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <cmath>
#include <set>

#include "model/transformer.h"
#include "util/dtype.h"

namespace moeyard {
namespace {

// A factor pair's A [..., r, in]: uniform in +-1/sqrt(in); B zero.
void init_pair(at::Tensor& a, at::Tensor& b) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(a.size(-1)));
  a.uniform_(-bound, bound);
  b.zero_();
}

// A frozen base weight in `dt`, under the same registered name.
at::Tensor frozen(const at::Tensor& w, at::ScalarType dt) {
  return w.detach().to(dt).requires_grad_(false);
}

} // namespace

void LinearImpl::add_lora(
    int64_t rank, double scale, double dropout, at::ScalarType base_dt) {
  const auto opts = weight.options().requires_grad(false);
  lora_a = register_parameter(
      "lora_a", at::empty({rank, weight.size(1)}, opts), true);
  lora_b = register_parameter(
      "lora_b", at::empty({weight.size(0), rank}, opts), true);
  lora_scale = scale;
  lora_dropout = dropout;
  weight = frozen(weight, base_dt);
  parameters_["weight"] = weight;
  at::NoGradGuard g;
  init_pair(lora_a, lora_b);
}

void MoELayerImpl::add_lora(
    int64_t rank, double scale, double dropout, at::ScalarType base_dt) {
  const auto opts = w_gate_up.options().requires_grad(false);
  const int64_t E = w_gate_up.size(0), H = w_gate_up.size(2);
  const int64_t F2 = w_gate_up.size(1), F = w_down.size(2);
  lora_gate_up_a =
      register_parameter("lora_gate_up_a", at::empty({E, rank, H}, opts), true);
  lora_gate_up_b = register_parameter(
      "lora_gate_up_b", at::empty({E, F2, rank}, opts), true);
  lora_down_a =
      register_parameter("lora_down_a", at::empty({E, rank, F}, opts), true);
  lora_down_b =
      register_parameter("lora_down_b", at::empty({E, H, rank}, opts), true);
  lora_scale = scale;
  lora_dropout = dropout;
  w_gate_up = frozen(w_gate_up, base_dt);
  w_down = frozen(w_down, base_dt);
  parameters_["w_gate_up"] = w_gate_up;
  parameters_["w_down"] = w_down;
  at::NoGradGuard g;
  init_pair(lora_gate_up_a, lora_gate_up_b);
  init_pair(lora_down_a, lora_down_b);
}

const std::vector<std::string>& lora_target_names() {
  static const std::vector<std::string> names = {
      "attention",
      "mlp",
      "experts",
      "q_proj",
      "k_proj",
      "v_proj",
      "o_proj",
      "q_a_proj",
      "q_b_proj",
      "kv_a_proj",
      "kv_b_proj"};
  return names;
}

bool is_lora_parameter(const std::string& name) {
  return name.find(".lora_") != std::string::npos;
}

int64_t apply_lora(TransformerImpl& model, const LoraOptions& o) {
  if (!o.enabled) {
    return 0;
  }
  const auto& known = lora_target_names();
  for (const auto& t : o.targets) {
    TORCH_CHECK(
        std::find(known.begin(), known.end(), t) != known.end(),
        "config: finetune.lora.targets: unknown target '",
        t,
        "' (one of: ",
        c10::Join(", ", known),
        ")");
  }
  TORCH_CHECK(
      !o.targets.empty(),
      "config: finetune.lora.targets is empty; name at least one of: ",
      c10::Join(", ", known));
  const auto base_dt =
      parse_dtype(o.base_dtype == "model" ? model.config.dtype : o.base_dtype);
  for (auto& p : model.parameters()) {
    p.requires_grad_(false);
  }
  std::set<std::string> matched;
  auto wants = [&](const std::string& group, const std::string& name) {
    for (const auto& t : o.targets) {
      if (t == group || t == name) {
        matched.insert(t);
        return true;
      }
    }
    return false;
  };
  for (const auto& m : model.layers->children()) {
    auto* b = m->as<BlockImpl>();
    std::vector<std::pair<const char*, Linear>> attn = {
        {"q_proj", b->attn->q_proj},
        {"k_proj", b->attn->k_proj},
        {"v_proj", b->attn->v_proj},
        {"o_proj", b->attn->o_proj},
        {"q_a_proj", b->attn->q_a_proj},
        {"q_b_proj", b->attn->q_b_proj},
        {"kv_a_proj", b->attn->kv_a_proj},
        {"kv_b_proj", b->attn->kv_b_proj}};
    for (auto& [name, lin] : attn) {
      if (lin && wants("attention", name)) {
        lin->add_lora(o.rank, o.scale(), o.dropout, base_dt);
      }
    }
    if (b->mlp && wants("mlp", "mlp")) {
      for (auto* lin : {&b->mlp->gate_up, &b->mlp->up, &b->mlp->down}) {
        if (*lin) {
          (*lin)->add_lora(o.rank, o.scale(), o.dropout, base_dt);
        }
      }
    }
    if (b->moe && wants("experts", "experts")) {
      b->moe->add_lora(o.rank, o.scale(), o.dropout, base_dt);
    }
  }
  // A group names a kind of layer a model may lack (an all-MoE model has
  // no dense MLP); a projection name must exist.
  for (const auto& t : o.targets) {
    const bool group = t == "attention" || t == "mlp" || t == "experts";
    TORCH_CHECK(
        group || matched.count(t) > 0,
        "config: finetune.lora.targets: '",
        t,
        "' matches no layer of this model");
  }
  TORCH_CHECK(
      !matched.empty(),
      "config: finetune.lora.targets [",
      c10::Join(", ", o.targets),
      "] match no layer of this model");
  int64_t n = 0;
  for (const auto& p : model.named_parameters()) {
    if (is_lora_parameter(p.key())) {
      n += p.value().numel();
    }
  }
  return n;
}

std::vector<std::pair<std::string, at::Tensor>> lora_merged_weights(
    const TransformerImpl& model) {
  at::NoGradGuard g;
  const auto dt = parse_dtype(model.config.dtype);
  const auto math = dt == at::kDouble ? at::kDouble : at::kFloat;
  auto merge = [&](const at::Tensor& w,
                   const at::Tensor& b,
                   const at::Tensor& a,
                   double s) {
    const auto delta = at::matmul(b.to(math), a.to(math)) * s;
    return (w.to(math) + delta).to(dt);
  };
  std::vector<std::pair<std::string, at::Tensor>> out;
  const auto modules = model.named_modules();
  for (const auto& item : modules) {
    const auto& name = item.key();
    if (auto* lin = item.value()->as<LinearImpl>();
        lin && lin->lora_a.defined()) {
      out.emplace_back(
          name + ".weight",
          merge(lin->weight, lin->lora_b, lin->lora_a, lin->lora_scale));
    } else if (auto* moe = item.value()->as<MoELayerImpl>();
               moe && moe->lora_gate_up_a.defined()) {
      const double s = moe->lora_scale;
      out.emplace_back(
          name + ".w_gate_up",
          merge(moe->w_gate_up, moe->lora_gate_up_b, moe->lora_gate_up_a, s));
      out.emplace_back(
          name + ".w_down",
          merge(moe->w_down, moe->lora_down_b, moe->lora_down_a, s));
    }
  }
  return out;
}

} // namespace moeyard
