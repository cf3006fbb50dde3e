// The memory planner (plan.h): per rank, from the config and the model's
// shapes (built on the meta device), following the layout's placement,
// the optimizer's sharding and the recompute modes.

#include "train/plan.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <sstream>

#include "model/init.h"
#include "model/transformer.h"
#include "parallel/layout.h"
#include "util/dtype.h"
#include "util/log.h"

namespace moeyard::train {

namespace {

bool contains(const std::string& s, const char* part) {
  return s.find(part) != std::string::npos;
}

// How parameter `name` is spread (as the trainer places it).
parallel::Placement placement_of(
    const TransformerImpl& m, const parallel::Layout& l, const std::string& n) {
  if (l.tp > 1 && m.tp_split(n).sharded()) {
    return parallel::Placement::kTensorParallel;
  }
  if (l.ep > 1 && is_expert_parameter(n)) {
    return parallel::Placement::kExpert;
  }
  return parallel::Placement::kReplicated;
}

// Ring collectives: bytes each member sends.
int64_t ring_all_reduce(int64_t bytes, int64_t n) {
  return n > 1 ? 2 * bytes * (n - 1) / n : 0;
}
int64_t ring_half(int64_t bytes, int64_t n) { // reduce-scatter, all-gather
  return n > 1 ? bytes * (n - 1) / n : 0;
}

// Tensors saved for backward by one block's two parts, per token (bytes).
struct BlockActivations {
  int64_t attention = 0, ffn = 0, input = 0; // input: the block's input
};

BlockActivations block_activations(
    const TransformerImpl& model,
    const parallel::Layout& layout,
    int64_t index,
    int64_t B,
    int64_t S) {
  const auto& c = model.config;
  const int64_t b = at::elementSize(parse_dtype(c.dtype));
  const int64_t H = c.hidden_size, T = B * S;
  BlockActivations a;
  a.input = T * H * b;
  // Attention: its input and normed input, each projection's output (q and
  // k twice: before and after rotary), the attention output, the norm's
  // float32 rsqrt and SDPA's logsumexp.
  int64_t widths = 0, q_k = 0, out = 0;
  const std::string prefix = "layers." + std::to_string(index) + ".attn.";
  const auto attn = model.layers->ptr(index)->as<BlockImpl>()->attn;
  for (const auto& p : attn->named_parameters()) {
    const auto n = prefix + p.key();
    if (!contains(n, "proj.weight")) {
      continue;
    }
    const int64_t div =
        placement_of(model, layout, n) == parallel::Placement::kTensorParallel
            ? layout.tp
            : 1;
    if (contains(n, ".o_proj.")) {
      out = p.value().size(1) / div;
      continue;
    }
    widths += p.value().size(0) / div;
    if (contains(n, ".q_proj.") || contains(n, ".q_b_proj.") ||
        contains(n, ".k_proj.")) {
      q_k += p.value().size(0) / div;
    }
  }
  if (c.qk_norm != "none") {
    q_k *= 2;
  }
  const int64_t heads = c.num_heads / layout.tp;
  a.attention =
      T * (2 * H + widths + q_k + out) * b + T * 4 + B * heads * S * 4;
  // Feed-forward: input and normed input, then the MoE's float32 router
  // (input, logits, probabilities, scores) and per routed row its input,
  // gate_up output, activation and output; or the dense MLP's outputs.
  a.ffn = 2 * T * H * b + T * 4;
  if (c.is_moe_layer(index)) {
    const int64_t E = c.moe.num_experts, k = c.moe.routing.top_k;
    const int64_t F = c.moe.ffn_size > 0 ? c.moe.ffn_size : c.ffn_size;
    a.ffn += T * (H + 3 * E) * 4 + T * k * (2 * H + 3 * F) * b;
    if (c.moe.num_shared_experts > 0) {
      const int64_t Fs =
          c.moe.num_shared_experts *
          (c.moe.shared_ffn_size > 0 ? c.moe.shared_ffn_size : F);
      a.ffn += T * (3 * Fs + H) * b;
    }
  } else {
    const int64_t F =
        (c.moe.num_experts > 0 && c.dense_ffn_size > 0 ? c.dense_ffn_size
                                                       : c.ffn_size) /
        layout.tp;
    a.ffn += T * (c.mlp == "swiglu" ? 3 * F : 2 * F) * b;
  }
  return a;
}

} // namespace

int64_t RankPlan::step_peak(const std::string& recompute) const {
  const auto it = activations.find(recompute);
  return params + grads + optimizer + grad_buffer + logits + teacher +
         (it == activations.end() ? 0 : it->second);
}

Plan make_plan(const TrainConfig& cfg, int64_t world) {
  auto sizes = cfg.layout_sizes();
  parallel::check_layout_sizes(sizes);
  Transformer model = [&] {
    ParamDeviceGuard meta(c10::kMeta);
    Transformer m(cfg.model);
    apply_lora(*m, cfg.lora); // LoRA: the factors train, the base is frozen
    return m;
  }();
  const auto& c = model->config;
  const int64_t B = cfg.train.micro_batch, S = cfg.data.seq_len;
  // distill.teacher's model, while the run holds it (kl_coeff > 0).
  Transformer teacher{nullptr};
  if (cfg.distill.enabled() && cfg.distill.kl_coeff > 0) {
    const auto src = find_teacher(cfg.distill.teacher, false);
    ParamDeviceGuard meta(c10::kMeta);
    teacher = Transformer(src.config.model);
    apply_lora(*teacher, src.config.lora);
  }
  Plan plan;
  plan.world = world;
  std::map<std::string, RankPlan> by_figures; // equal ranks together
  std::vector<std::string> order;
  // Every dimension splits evenly (the layout checks it), so ranks with the
  // same tensor- and expert-parallel coordinates hold the same bytes: one
  // of each is computed.
  std::map<std::pair<int64_t, int64_t>, std::string> seen;
  for (int64_t r = 0; r < world; ++r) {
    const auto l = parallel::Layout::build(sizes, world, r);
    if (const auto it = seen.find({l.tp_rank, l.ep_rank}); it != seen.end()) {
      by_figures[it->second].ranks.push_back(r);
      continue;
    }
    if (r == 0) {
      plan.layout = log::format(
          "TP%ld x EP%ld x EDP%ld (DP %ld)", l.tp, l.ep, l.edp, l.dp);
    }
    RankPlan rp;
    int64_t dense_grad = 0, expert_grad = 0, dense_fp32 = 0, expert_fp32 = 0,
            largest = 0, largest_dense = 0, largest_expert = 0;
    for (const auto& p : model->named_parameters()) {
      const auto& n = p.key();
      const auto where = placement_of(*model, l, n);
      const int64_t numel =
          p.value().numel() / (where == parallel::Placement::kTensorParallel
                                   ? l.tp
                               : where == parallel::Placement::kExpert ? l.ep
                                                                       : 1);
      const int64_t b = p.value().element_size();
      rp.params += numel * b;
      largest = std::max(largest, numel * 4);
      if (r == 0) {
        plan.total_params += p.value().numel();
      }
      const bool frozen =
          !p.value().requires_grad() ||
          std::any_of(
              cfg.optim.freeze.begin(),
              cfg.optim.freeze.end(),
              [&](const std::string& pat) { return contains(n, pat.c_str()); });
      if (frozen) {
        continue;
      }
      if (r == 0) {
        plan.trainable_params += p.value().numel();
      }
      rp.grads += numel * b;
      const bool expert = where == parallel::Placement::kExpert;
      (expert ? expert_grad : dense_grad) += numel * b;
      (expert ? expert_fp32 : dense_fp32) += numel;
      const int64_t ranks = !cfg.optim.sharded() ? 1 : expert ? l.edp : l.dp;
      const int64_t master = cfg.optim.sharded() || b != 4 ? 4 : 0;
      rp.optimizer += (numel + ranks - 1) / ranks * (8 + master);
      (expert ? largest_expert : largest_dense) =
          std::max(expert ? largest_expert : largest_dense, numel);
    }
    // Gradient reduction: one float32 buffer per bucket, one bucket at a
    // time (trainer_shard.cpp); the unsharded optimizer in one process
    // reduces nothing. Buckets hold up to kShardBucketElements, or one
    // larger tensor.
    const auto bucket = [](int64_t total, int64_t one, int64_t ranks) {
      return (std::max(one, std::min(total, kShardBucketElements)) + ranks -
              1) /
             ranks;
    };
    const bool multi = world > 1;
    if (cfg.optim.sharded() || multi) {
      rp.grad_buffer = 4 * std::max(
                               bucket(dense_fp32, largest_dense, 1),
                               bucket(expert_fp32, largest_expert, 1));
    }
    if (cfg.optim.shard == "optimizer+grads") {
      rp.sent_grad_reduce =
          ring_half(4 * dense_fp32, l.dp) + ring_half(4 * expert_fp32, l.edp);
    } else {
      rp.sent_grad_reduce = ring_all_reduce(4 * dense_fp32, l.dp) +
                            ring_all_reduce(4 * expert_fp32, l.edp);
    }
    if (cfg.optim.sharded()) {
      rp.sent_param_gather =
          ring_half(dense_grad, l.dp) + ring_half(expert_grad, l.edp);
    }
    // Activations per micro-batch by recompute mode; the loss's logits.
    const int64_t b = at::elementSize(parse_dtype(c.dtype));
    // Per mode, every block recomputing so; "configured": train.recompute
    // in train.recompute_layers. A recomputed block's activations exist
    // again during its backward.
    const auto& chosen = cfg.train.recompute_layers;
    int64_t moe_layers = 0, widest = 0, widest_chosen = 0;
    std::map<std::string, int64_t> kept;
    for (int64_t i = 0; i < c.num_layers; ++i) {
      const auto a = block_activations(*model, l, i, B, S);
      const std::map<std::string, int64_t> by_mode = {
          {"none", a.attention + a.ffn},
          {"full", a.input},
          {"attention", a.input + a.ffn},
          {"moe", a.attention + a.input}};
      for (const auto& [mode, bytes] : by_mode) {
        kept[mode] += bytes;
      }
      const bool mine =
          chosen.empty() ||
          std::find(chosen.begin(), chosen.end(), i) != chosen.end();
      kept["configured"] +=
          by_mode.at(mine ? cfg.train.recompute : std::string("none"));
      widest = std::max(widest, a.attention + a.ffn);
      if (mine) {
        widest_chosen = std::max(widest_chosen, a.attention + a.ffn);
      }
      moe_layers += c.is_moe_layer(i) ? 1 : 0;
    }
    for (auto& [mode, bytes] : kept) {
      const bool recomputes =
          mode == "configured" ? cfg.train.recompute != "none" : mode != "none";
      rp.activations[mode] =
          bytes +
          (recomputes ? (mode == "configured" ? widest_chosen : widest) : 0);
    }
    const int64_t V = c.vocab_size / l.tp, T = B * S;
    rp.logits = T * V * (b + 4 + 4);
    if (teacher) { // its pieces, its float32 logits and the KL's gradient
      for (const auto& p : teacher->named_parameters()) {
        const auto where = placement_of(*teacher, l, p.key());
        rp.teacher += p.value().nbytes() /
                      (where == parallel::Placement::kTensorParallel ? l.tp
                       : where == parallel::Placement::kExpert       ? l.ep
                                                                     : 1);
      }
      rp.teacher += T * V * (4 + 4);
    }
    // Expert dispatch: each routed row's hidden state to its expert's rank
    // and back, forward and backward, per micro-batch.
    const int64_t rows = T * c.moe.routing.top_k;
    rp.sent_all_to_all = l.ep > 1
                             ? 4 * ring_half(rows * c.hidden_size * b, l.ep) *
                                   moe_layers * cfg.train.grad_accum
                             : 0;
    // Tensor parallelism: attention and feed-forward outputs forward, their
    // input gradients backward, per layer and micro-batch.
    rp.sent_tp = ring_all_reduce(T * c.hidden_size * b, l.tp) * 4 *
                 c.num_layers * cfg.train.grad_accum;
    // Loading a checkpoint: the pieces, the optimizer state, one
    // parameter's float32 piece in flight; from a Hugging Face checkpoint
    // the pieces and one source tensor in flight.
    rp.load_peak = rp.params + rp.optimizer + largest;
    int64_t source = 0; // the largest tensor a Hugging Face load holds
    for (const auto& p : model->named_parameters()) {
      const int64_t n =
          is_expert_parameter(p.key())
              ? p.value().numel() / std::max<int64_t>(p.value().size(0), 1)
              : p.value().numel();
      source = std::max(source, n * 4);
    }
    rp.hf_load_peak = rp.params + source;
    std::ostringstream key;
    key << rp.params << "/" << rp.optimizer << "/" << rp.activations["none"]
        << "/" << rp.sent_all_to_all << "/" << rp.sent_tp;
    if (!by_figures.count(key.str())) {
      order.push_back(key.str());
      by_figures[key.str()] = rp;
    }
    by_figures[key.str()].ranks.push_back(r);
    seen[{l.tp_rank, l.ep_rank}] = key.str();
  }
  for (const auto& k : order) {
    plan.ranks.push_back(by_figures[k]);
  }
  return plan;
}

namespace {

std::string gb(int64_t bytes) {
  return bytes >= 1e9 ? log::format("%.3f GB", bytes / 1e9)
                      : log::format("%.3f MB", bytes / 1e6);
}

std::string rank_list(const std::vector<int64_t>& r) {
  if (r.size() == 1) {
    return std::to_string(r[0]);
  }
  std::ostringstream s;
  s << r.size() << " ranks (" << r.front();
  for (size_t i = 1; i < std::min<size_t>(r.size(), 4); ++i) {
    s << ", " << r[i];
  }
  s << (r.size() > 4 ? ", ...)" : ")");
  return s.str();
}

} // namespace

std::string format_plan(const Plan& plan, const TrainConfig& cfg) {
  std::ostringstream o;
  o << "plan: " << plan.world << " processes, " << plan.layout << "; "
    << plan.total_params << " parameters (" << plan.trainable_params
    << " trainable), optim.shard " << cfg.optim.shard << ", micro-batch "
    << cfg.train.micro_batch << " x " << cfg.data.seq_len << " tokens\n";
  for (const auto& r : plan.ranks) {
    o << "\nrank " << rank_list(r.ranks) << ":\n";
    o << "  parameters             " << gb(r.params) << "\n";
    o << "  gradients              " << gb(r.grads) << "\n";
    o << "  optimizer state        " << gb(r.optimizer) << "\n";
    o << "  reduction buffer       " << gb(r.grad_buffer) << "\n";
    o << "  logits (loss)          " << gb(r.logits) << "\n";
    if (r.teacher > 0) {
      o << "  teacher (distill)      " << gb(r.teacher) << "\n";
    }
    for (const char* mode : {"none", "attention", "moe", "full"}) {
      o << "  activations (" << mode << ")"
        << std::string(10 - std::string(mode).size(), ' ')
        << gb(r.activations.at(mode)) << "   step peak "
        << gb(r.step_peak(mode)) << "\n";
    }
    o << "  configured (train.recompute: " << cfg.train.recompute
      << ")   step peak " << gb(r.step_peak("configured")) << "\n";
    o << "  load peak (resume)     " << gb(r.load_peak) << "\n";
    o << "  load peak (init_from)  " << gb(r.hf_load_peak) << "\n";
    o << "  sent per step: all-to-all " << gb(r.sent_all_to_all)
      << ", gradient reduction " << gb(r.sent_grad_reduce)
      << ", parameter all-gather " << gb(r.sent_param_gather)
      << ", tensor-parallel " << gb(r.sent_tp) << "\n";
  }
  o << "\n(host memory of the process itself, the allocator's slack and "
       "the data loader come on top)\n";
  return o.str();
}

std::string plan_json(const Plan& plan) {
  nlohmann::json ranks = nlohmann::json::array();
  for (const auto& r : plan.ranks) {
    ranks.push_back(
        {{"ranks", r.ranks},
         {"params", r.params},
         {"grads", r.grads},
         {"optimizer", r.optimizer},
         {"grad_buffer", r.grad_buffer},
         {"logits", r.logits},
         {"teacher", r.teacher},
         {"activations", r.activations},
         {"step_peak", r.step_peak("configured")},
         {"load_peak", r.load_peak},
         {"hf_load_peak", r.hf_load_peak},
         {"sent_all_to_all", r.sent_all_to_all},
         {"sent_grad_reduce", r.sent_grad_reduce},
         {"sent_param_gather", r.sent_param_gather},
         {"sent_tp", r.sent_tp}});
  }
  return nlohmann::json{
             {"world", plan.world},
             {"layout", plan.layout},
             {"total_params", plan.total_params},
             {"trainable_params", plan.trainable_params},
             {"ranks", ranks}}
             .dump(1) +
         "\n";
}

} // namespace moeyard::train
