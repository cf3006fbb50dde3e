// Distillation from a frozen teacher (distill.*, docs/training.md,
// "Distillation"): the teacher's model on this rank (its pieces under this
// run's layout), a fresh student's start from its weights (null experts
// added: ZEDA-style skip adaptation), and the KL term of the objective.

#include "model/lora.h"
#include "parallel/tensor_parallel.h"
#include "train/trainer_impl.h"

namespace moeyard::train::detail {

namespace {

// Student tensors a teacher may lack; they keep their init.
bool new_in_student(const std::string& name) {
  for (const char* part :
       {".moe.critic_",
        ".moe.selection_bias",
        ".moe.noise_weight",
        ".moe.router.bias"}) {
    if (name.find(part) != std::string::npos) {
      return true;
    }
  }
  return is_lora_parameter(name);
}

// Tensors with one row per routed expert (real then null).
bool per_routed_expert(const std::string& name) {
  return ends_with(name, ".moe.router.weight") ||
         ends_with(name, ".moe.router.bias") ||
         ends_with(name, ".moe.selection_bias") ||
         ends_with(name, ".moe.noise_weight");
}

} // namespace

void Trainer::load_teacher() {
  const auto src = find_teacher(cfg_.distill.teacher, true);
  const auto& m = src.config.model;
  TORCH_CHECK(
      m.vocab_size == cfg_.model.vocab_size,
      "config: distill.teacher (",
      src.dir,
      ") has a vocabulary of ",
      m.vocab_size,
      " tokens but model.vocab_size is ",
      cfg_.model.vocab_size,
      "; the teacher and the student must share the tokenizer");
  teacher_ = shapes_only(m);
  apply_lora(*teacher_, src.config.lora);
  teacher_->shard(layout_);
  materialize(*teacher_, device_);
  teacher_->to(device_);
  const auto piece_of = [this](const std::string& n) {
    return piece_in(*teacher_, n);
  };
  if (src.hf.is_null()) {
    io::load_model_tensors(*teacher_, fs::path(src.dir), piece_of);
  } else {
    io::load_hf_weights(*teacher_, src.hf, src.dir, piece_of);
  }
  teacher_->eval();
  for (auto& p : teacher_->parameters()) {
    p.set_requires_grad(false);
  }
  teacher_dir_ = src.dir;
  // A run directory's `latest` may move while ranks resolve it: every rank
  // must hold the same teacher (compared by a hash of the path).
  if (distributed()) {
    const auto h = static_cast<double>(
        std::hash<std::string>{}(teacher_dir_) % (uint64_t(1) << 52));
    auto both = at::tensor({h, -h}, at::kDouble);
    world_->all_reduce_max(both);
    TORCH_CHECK(
        both[0].item<double>() == -both[1].item<double>(),
        "distill.teacher (",
        cfg_.distill.teacher,
        "): the ranks resolved different checkpoints (this one ",
        teacher_dir_,
        "); name a step directory");
  }
  log::info("distill.teacher: " + teacher_dir_ + " (frozen)");
}

void Trainer::init_student_from_teacher() {
  at::NoGradGuard g;
  std::map<std::string, at::Tensor> theirs;
  for (const auto& p : teacher_->named_parameters()) {
    theirs[p.key()] = p.value();
  }
  for (const auto& b : teacher_->named_buffers()) {
    theirs[b.key()] = b.value();
  }
  // A LoRA teacher's factors change what its base weights compute.
  const auto mine = model_->named_parameters();
  for (const auto& [name, t] : theirs) {
    TORCH_CHECK(
        !is_lora_parameter(name) || mine.contains(name),
        "distill.init_student: the teacher (",
        teacher_dir_,
        ") has LoRA factors ('",
        name,
        "') the student lacks; export the teacher with them merged "
        "(moeyard convert --to hf) and name that, or give the student the "
        "same finetune.lora");
  }
  const int64_t E = cfg_.model.moe.num_experts;
  std::set<std::string> widened; // MoE layers whose null rows were added
  auto copy = [&](const std::string& name, at::Tensor dst) {
    const auto it = theirs.find(name);
    if (it == theirs.end()) {
      TORCH_CHECK(
          new_in_student(name),
          "distill.init_student: the teacher (",
          teacher_dir_,
          ") has no tensor '",
          name,
          "'; the student must have the teacher's architecture apart from "
          "null experts, routing options, critics and LoRA");
      return;
    }
    const auto& src = it->second;
    if (src.sizes() == dst.sizes()) {
      dst.copy_(src);
      return;
    }
    // Null experts the teacher lacks: its E real rows, repeated.
    TORCH_CHECK(
        per_routed_expert(name) && src.dim() == dst.dim() && src.size(0) == E &&
            dst.size(0) > E && src.sizes().slice(1) == dst.sizes().slice(1),
        "distill.init_student: tensor '",
        name,
        "' has shape ",
        dst.sizes(),
        " in this model but ",
        src.sizes(),
        " in the teacher (",
        teacher_dir_,
        "); the student must have the teacher's architecture apart from "
        "null experts and routing options");
    for (int64_t r = 0; r < dst.size(0); r += E) {
      const int64_t n = std::min(E, dst.size(0) - r);
      dst.narrow(0, r, n).copy_(src.narrow(0, 0, n));
    }
    widened.insert(name.substr(0, name.find(".moe.")));
  };
  for (auto& p : model_->named_parameters()) {
    copy(p.key(), p.value());
  }
  for (auto& b : model_->named_buffers()) {
    copy(b.key(), b.value());
  }
  // The added null experts start below the real experts they copy.
  const double offset = cfg_.distill.null_logit_offset;
  const int64_t Z = cfg_.model.moe.routing.null_experts;
  bool placed = true;
  for (const auto& item : model_->layers->named_children()) {
    auto* block = item.value()->template as<BlockImpl>();
    if (!block || !block->moe || !widened.count("layers." + item.key())) {
      continue;
    }
    auto& moe = *block->moe;
    if (moe.router->bias.defined()) {
      moe.router->bias.narrow(0, E, Z).add_(offset);
    } else if (moe.selection_bias.defined()) {
      moe.selection_bias.narrow(0, E, Z).add_(offset);
    } else {
      placed = false;
    }
  }
  log::info(log::format(
      "distill.init_student: the weights are the teacher's%s",
      widened.empty() ? ""
                      : log::format(
                            "; %ld null experts per MoE layer copy its real "
                            "router rows",
                            Z)
                            .c_str()));
  if (!widened.empty() && !placed && offset != 0) {
    log::warn(
        "distill.null_logit_offset has no effect: the model has neither "
        "moe.router_bias nor moe.selection_bias, so each null expert ties "
        "with the real expert whose router row it copies");
  }
}

at::Tensor Trainer::objective(
    const at::Tensor& tokens, const LossOutput& r, at::Tensor& kl) {
  kl = at::zeros({}, r.ce.options());
  if (!cfg_.distill.enabled()) {
    return r.loss;
  }
  if (teacher_) {
    at::Tensor theirs;
    {
      at::NoGradGuard g;
      theirs = teacher_->loss(tokens).out.logits; // this rank's vocabulary
    }
    const int64_t S = tokens.size(1), V = r.out.logits.size(-1);
    const auto student = r.out.logits.narrow(1, 0, S - 1).reshape({-1, V});
    const auto teacher = theirs.narrow(1, 0, S - 1).reshape({-1, V});
    // Over the positions the loss counts (a loss mask's answers).
    kl = parallel::vocab_parallel_kl(student, teacher, r.keep, tp_).sum() /
         r.tokens.clamp_min(1);
  }
  return cfg_.distill.ce_coeff * r.ce + r.aux + cfg_.distill.kl_coeff * kl;
}

} // namespace moeyard::train::detail
