// Tensor and expert parallelism of the model (transformer.h,
// docs/distributed.md): which parameters split over the TP group and how,
// which are expert parameters, and the sharding of a fully built model into
// this rank's pieces. The forward passes place the
// collectives (csrc/parallel/tensor_parallel.h).

#include <ATen/ATen.h>

#include "model/transformer.h"

namespace moeyard {
namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

} // namespace

bool is_expert_parameter(const std::string& name, bool weights_only) {
  const size_t n = weights_only ? kExpertWeights : kExpertParameters.size();
  for (size_t i = 0; i < n; ++i) {
    if (ends_with(name, std::string(".moe.") + kExpertParameters[i])) {
      return true;
    }
  }
  return false;
}

void LinearImpl::shard(
    const parallel::TpSplit& split, int64_t rank, int64_t tp, bool bias_too) {
  auto keep = [&](const char* name, at::Tensor& t, parallel::TpSplit s) {
    t = parallel::tp_slice(t.detach(), s, rank, tp)
            .clone()
            .requires_grad_(t.requires_grad());
    parameters_[name] = t;
  };
  keep("weight", weight, split);
  if (bias_too && bias.defined()) {
    keep("bias", bias, {0, split.parts});
  }
  if (lora_a.defined()) {
    keep("lora_a", lora_a, split.dim == 1 ? split : parallel::TpSplit{});
    keep("lora_b", lora_b, split.dim == 0 ? split : parallel::TpSplit{});
  }
}

void NormImpl::shard(int64_t rank, int64_t tp_size, const parallel::Group* g) {
  TORCH_CHECK(!layernorm, "tensor parallelism: split LayerNorm unsupported");
  full_dim = weight.size(0);
  weight = parallel::tp_slice(weight.detach(), {0, 1}, rank, tp_size)
               .clone()
               .requires_grad_(weight.requires_grad());
  parameters_["weight"] = weight;
  tp = g;
}

void MlpImpl::shard(int64_t rank, int64_t tp_size, const parallel::Group* g) {
  if (gate_up) {
    gate_up->shard({0, 2}, rank, tp_size, false); // [gate_r; up_r]
  } else {
    up->shard({0, 1}, rank, tp_size, false);
  }
  down->shard({1, 1}, rank, tp_size, false);
  tp = g;
}

namespace {

bool kv_replicated(const ModelConfig& c, int64_t tp) {
  return !c.is_mla() && c.kv_heads() % tp != 0;
}

// A Linear's LoRA factor ("layers.0.attn.o_proj.lora_a"; the experts'
// factors are named lora_gate_up_a, ...) and its base weight.
bool is_linear_lora(const std::string& n) {
  return ends_with(n, ".lora_a") || ends_with(n, ".lora_b");
}
std::string lora_base(const std::string& n) {
  return n.substr(0, n.size() - std::string(".lora_a").size()) + ".weight";
}

bool is_kv_param(const std::string& n) {
  return n.find(".attn.k_proj.") != std::string::npos ||
         n.find(".attn.v_proj.") != std::string::npos ||
         ends_with(n, ".attn.k_norm.weight");
}

} // namespace

parallel::TpSplit TransformerImpl::tp_split(const std::string& n) const {
  if (is_linear_lora(n)) { // B's rows follow split rows, A's split columns
    const auto base = tp_split(lora_base(n));
    return base.dim == (ends_with(n, ".lora_b") ? 0 : 1) ? base
                                                         : parallel::TpSplit{};
  }
  if (kv_replicated(config, tp_size) && is_kv_param(n)) {
    return {}; // whole on every rank
  }
  if (n == "embed.weight" || n == "lm_head.weight") {
    return {0, 1}; // vocabulary rows
  }
  for (const char* p :
       {".attn.q_proj.",
        ".attn.k_proj.",
        ".attn.v_proj.",
        ".attn.q_b_proj.",
        ".attn.kv_b_proj."}) {
    if (n.find(p) != std::string::npos) {
      return {0, 1}; // heads (weight rows and bias)
    }
  }
  if (ends_with(n, ".attn.o_proj.weight") || ends_with(n, ".mlp.down.weight")) {
    return {1, 1}; // row-parallel: input features
  }
  if (ends_with(n, ".attn.sinks") || ends_with(n, ".mlp.up.weight")) {
    return {0, 1};
  }
  if (ends_with(n, ".mlp.gate_up.weight")) {
    return {0, 2};
  }
  if (config.qk_norm == "projection" && (ends_with(n, ".attn.q_norm.weight") ||
                                         ends_with(n, ".attn.k_norm.weight"))) {
    return {0, 1};
  }
  return {};
}

bool TransformerImpl::tp_partial_grad(const std::string& n) const {
  if (is_linear_lora(n)) { // the whole factor beside a split weight
    const auto base = lora_base(n);
    return tp_split(base).sharded() ? !tp_split(n).sharded()
                                    : tp_partial_grad(base);
  }
  if (kv_replicated(config, tp_size) && is_kv_param(n)) {
    return true; // each rank's gradient covers the kv head it uses
  }
  if (config.is_mla()) { // MLA's shared low-rank projections and norms
    for (const char* p :
         {".attn.q_a_proj.",
          ".attn.q_a_norm.",
          ".attn.kv_a_proj.",
          ".attn.kv_a_norm."}) {
      if (n.find(p) != std::string::npos) {
        return true;
      }
    }
    return false;
  }
  return config.qk_norm == "head" && (ends_with(n, ".attn.q_norm.weight") ||
                                      ends_with(n, ".attn.k_norm.weight"));
}

void TransformerImpl::shard_tensor_parallel(
    int64_t rank, int64_t size, const parallel::Group* group) {
  TORCH_CHECK(
      size >= 1 && rank >= 0 && rank < size,
      "tensor parallelism: rank ",
      rank,
      " outside group size ",
      size);
  if (size == 1) {
    return;
  }
  TORCH_CHECK(!tp, "tensor parallelism: the model is already sharded");
  TORCH_CHECK(
      group && group->size() == size,
      "tensor parallelism: the group must have ",
      size,
      " members");
  config.check_tensor_parallel(size);
  embed->shard({0, 1}, rank, size, false);
  if (lm_head) {
    lm_head->shard({0, 1}, rank, size, false);
  }
  for (const auto& m : layers->children()) {
    auto* b = m->as<BlockImpl>();
    b->attn->shard(rank, size, group);
    if (b->mlp) {
      b->mlp->shard(rank, size, group);
    }
  }
  tp = group;
  tp_size = size;
}

void MoELayerImpl::shard_experts(const parallel::Layout& layout) {
  const int64_t E = w_gate_up.size(0);
  const int64_t El = parallel::experts_per_rank(E, layout.ep, "moe");
  const int64_t first = layout.first_expert(E);
  // In the order of kExpertParameters.
  const std::array<at::Tensor*, kExpertParameters.size()> tensors = {
      &w_gate_up,
      &w_down,
      &b_gate_up,
      &b_down,
      &lora_gate_up_a,
      &lora_gate_up_b,
      &lora_down_a,
      &lora_down_b};
  for (size_t i = 0; i < tensors.size(); ++i) {
    at::Tensor& t = *tensors[i];
    if (!t.defined()) {
      continue;
    }
    auto slice = t.detach().narrow(0, first, El).clone();
    slice.requires_grad_(t.requires_grad());
    parameters_[kExpertParameters[i]] = slice;
    t = slice;
  }
  options.expert_group = layout.groups.ep ? &*layout.groups.ep : nullptr;
}

void TransformerImpl::shard(const parallel::Layout& layout) {
  if (layout.groups.tp) {
    shard_tensor_parallel(layout.tp_rank, layout.tp, &*layout.groups.tp);
  }
  if (!layout.groups.ep) {
    return;
  }
  for (const auto& m : layers->children()) {
    auto* block = m->as<BlockImpl>();
    if (block && block->moe) {
      block->moe->shard_experts(layout);
    }
  }
}

} // namespace moeyard
