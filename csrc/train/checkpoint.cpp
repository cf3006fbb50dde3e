// The trainer's checkpoints: what each rank saves (what it owns under global
// names, with its place in the full tensor; layout_.writes), the atomic
// commit with its manifest, and restoring the optimizer and random streams
// at any layout. The file format is csrc/io/checkpoint.h; docs/training.md.

#include "train/trainer_impl.h"

namespace moeyard::train {
namespace detail {

std::string Trainer::piece_of(const std::string& name) const {
  const auto where = placement(name);
  const auto piece = layout_.piece(where);
  switch (where) {
    case parallel::Placement::kTensorParallel:
      return io::piece_metadata(
          model_->tp_split(name), piece.index, piece.count);
    case parallel::Placement::kExpert:
      return io::piece_metadata({0, 1}, piece.index, piece.count);
    case parallel::Placement::kReplicated:
      break;
  }
  return "";
}

void Trainer::save_barrier() const {
  if (distributed()) {
    world_->barrier(std::chrono::milliseconds(
        static_cast<int64_t>(cfg_.checkpoint.timeout_s * 1000)));
  }
}

void Trainer::save(int64_t step) {
  // Each rank writes what it owns under global names (one copy of each
  // replicated tensor, each TP piece and expert slice, with its place in
  // the full tensor), the RNG stream of its data-parallel rank; rank 0 then
  // hashes every file into the manifest and commits. Loads at any layout.
  const fs::path dir(cfg_.checkpoint.dir);
  const auto name = "step_" + std::to_string(step);
  const fs::path tmp = dir / (name + ".tmp"), final_dir = dir / name;
  if (layout_.rank == 0) {
    fs::remove_all(tmp);
    fs::create_directories(tmp);
  }
  save_barrier();
  TORCH_CHECK(
      fs::is_directory(tmp),
      "checkpoint: rank ",
      layout_.rank,
      " does not see ",
      tmp.string(),
      " that rank 0 created: checkpoint.dir must be on a filesystem every "
      "rank shares");
  io::TensorMap model_t, opt_t;
  std::map<std::string, std::string> model_meta, opt_meta;
  auto keep = [&](io::TensorMap& m,
                  std::map<std::string, std::string>& meta,
                  const std::string& param,
                  const std::string& key,
                  const at::Tensor& t) {
    m[key] = t.detach();
    if (const auto piece = piece_of(param); !piece.empty()) {
      meta[key] = piece;
    }
  };
  for (const auto& p : model_->named_parameters()) {
    if (layout_.writes(placement(p.key()))) {
      keep(model_t, model_meta, p.key(), p.key(), p.value());
    }
  }
  for (const auto& b : model_->named_buffers()) {
    if (layout_.writes(placement(b.key()))) {
      model_t[b.key()] = b.value();
    }
  }
  // Optimizer state by parameter name.
  if (cfg_.optim.sharded()) {
    save_sharded_state(opt_t, opt_meta);
  } else {
    save_optimizer_state(opt_t, opt_meta);
  }
  const auto suffix = layout_.file_suffix();
  if (!model_t.empty()) {
    io::save_safetensors(
        (tmp / io::checkpoint_file("model", suffix)).string(),
        model_t,
        model_meta);
  }
  if (!opt_t.empty() || layout_.rank == 0) { // rank 0's even before any step
    io::save_safetensors(
        (tmp / io::checkpoint_file("optimizer", suffix)).string(),
        opt_t,
        opt_meta);
  }
  if (layout_.writes_rng()) {
    auto rng = at::detail::getDefaultCPUGenerator().get_state();
    io::save_safetensors(
        (tmp / rng_file(layout_.dp_rank)).string(), {{"cpu", rng}});
  }
  run_dir::crash_point("save:written");
  save_barrier();
  if (layout_.rank == 0) {
    commit(step, tmp, final_dir);
  }
  save_barrier();
}

void Trainer::save_optimizer_state(
    io::TensorMap& t, std::map<std::string, std::string>& meta) const {
  auto keep =
      [&](const std::string& n, const std::string& key, const at::Tensor& v) {
        t[key] = v.detach();
        if (const auto piece = piece_of(n); !piece.empty()) {
          meta[key] = piece;
        }
      };
  size_t i = 0;
  for (const auto& group : opt_->groups()) {
    for (const auto& p : group.params) {
      const AdamWState* s = opt_->state(p);
      const auto& n = names_[i];
      if (s && layout_.writes(placement(n))) {
        keep(n, n + ".exp_avg", s->exp_avg);
        keep(n, n + ".exp_avg_sq", s->exp_avg_sq);
        // The step count is whole: written with the first piece only.
        if (layout_.piece(placement(n)).index == 0) {
          t[n + ".step"] = s->step.to(at::kCPU, at::kLong);
        }
        if (opt_is_master_[i]) {
          keep(n, n + ".master", p);
        }
      }
      ++i;
    }
  }
}

std::string Trainer::rng_file(int64_t dp_rank) const {
  return distributed() ? "rng-dp" + std::to_string(dp_rank) + ".safetensors"
                       : "rng.safetensors";
}

json Trainer::manifest_state(int64_t step) const {
  json recent = json::array();
  for (const double l : spike_window()) {
    recent.push_back(l);
  }
  return {
      {"step", step},
      {"run_id", run_id_},
      // Started with --overwrite and not yet done discarding.
      {"overwrite", discard_others_},
      {"config", cfg_.text},
      {"resolved_config", cfg_.resolved},
      {"data", data_fingerprint_},
      {"teacher", teacher_dir_}, // the checkpoint distill.teacher resolved to
      {"data_position", step},
      {"trainer_state",
       {{"bad_in_row", bad_in_row_},
        {"recent_losses", recent},
        {"relu_l1_coeff", relu_l1_coeff_}}},
      {"parallel",
       {{"tensor_parallel", layout_.tp},
        {"data_parallel", layout_.dp},
        {"expert_parallel", layout_.ep}}}};
}

void Trainer::commit(
    int64_t step, const fs::path& tmp, const fs::path& final_dir) {
  // Every file is on disk (fsynced) before the manifest names it, the
  // manifest before the directory is renamed into place, the rename before
  // `latest` names it, and `latest` before anything old is deleted.
  const fs::path dir(cfg_.checkpoint.dir);
  json manifest = manifest_state(step);
  if (!cfg_.init_from.empty()) { // the architecture, for resume and export
    run_dir::write_durably(
        tmp / "hf_config.json", cfg_.hf_config.dump(2) + "\n");
  }
  if (const auto tok = tokenizer_path(); !tok.empty()) { // for generate
    fs::copy_file(tok, tmp / "tokenizer.json");
    run_dir::fsync_path(tmp / "tokenizer.json");
  }
  manifest["sha256"] = io::hash_files(tmp);
  run_dir::crash_point("commit:files");
  run_dir::write_durably(tmp / "manifest.json", manifest.dump(2));
  run_dir::publish(tmp, final_dir);
  // Pruning: never what `latest` names (final_dir), never another run's
  // checkpoints or newer ones unless this run was started with --overwrite.
  const auto run_of = [](const fs::path& p) {
    try {
      return json::parse(std::ifstream(p / "manifest.json"))
          .value("run_id", std::string("legacy"));
    } catch (const std::exception&) {
      // unreadable: nobody's, deleted only by a run with --overwrite
      return std::string();
    }
  };
  const auto drop = run_dir::prune_list(
      run_dir::list_checkpoints(dir),
      step,
      run_id_,
      cfg_.checkpoint.keep_last,
      discard_others_,
      run_of);
  run_dir::remove_checkpoints(dir, drop);
  if (discard_others_ && !drop.empty()) {
    log::info(
        "--overwrite: removed the earlier checkpoints this run replaces (" +
        std::to_string(drop.size()) + ")");
  }
  discard_others_ = false;
  log::info("checkpoint saved: " + final_dir.string());
}

void Trainer::load_unsharded_state(const io::CheckpointReader& reader) {
  at::NoGradGuard g;
  size_t i = 0;
  for (const auto& group : opt_->groups()) {
    for (const auto& p : group.params) {
      const auto& n = names_[i];
      if (reader.has(n + ".exp_avg")) {
        const auto want = piece(n);
        auto& s = opt_->reset_state(
            p, reader.read_whole(n + ".step").item<int64_t>());
        reader.read(n + ".exp_avg", s.exp_avg, want);
        reader.read(n + ".exp_avg_sq", s.exp_avg_sq, want);
        if (opt_is_master_[i]) {
          auto master = p.detach();
          reader.read(n + ".master", master, want);
        }
      }
      ++i;
    }
  }
}

int64_t Trainer::load_optimizer_state(const std::string& dir_in) {
  const fs::path dir(dir_in);
  const json manifest = json::parse(std::ifstream(dir / "manifest.json"));
  const io::CheckpointReader reader(dir, "optimizer");
  if (cfg_.optim.sharded()) {
    load_sharded_state(reader);
  } else {
    load_unsharded_state(reader);
  }
  const int64_t step = manifest.at("step").get<int64_t>();
  // The random stream of this data-parallel rank continues where it was
  // saved when the data-parallel size is unchanged; otherwise it restarts
  // from the seed at this step (router noise and expert dropout differ from
  // an uninterrupted run).
  const auto& par = manifest.at("parallel");
  std::vector<std::string> candidates;
  if (par.value("data_parallel", int64_t(1)) == layout_.dp) {
    candidates.push_back(
        "rng-dp" + std::to_string(layout_.dp_rank) + ".safetensors");
    if (layout_.dp == 1) {
      candidates.push_back("rng.safetensors");
    }
  }
  bool restored = false;
  for (const auto& f : candidates) {
    if (fs::exists(dir / f)) {
      auto rng = io::load_safetensors((dir / f).string());
      auto gen = at::detail::getDefaultCPUGenerator();
      gen.set_state(rng.at("cpu"));
      restored = true;
      break;
    }
  }
  if (!restored) {
    log::warn(log::format(
        "resume: no random-stream file for data-parallel rank %ld in %s "
        "(saved with data_parallel %ld, this run has %ld); random streams "
        "restart from train.seed at step %ld",
        layout_.dp_rank,
        dir.string().c_str(),
        par.value("data_parallel", int64_t(1)),
        layout_.dp,
        step));
    seed_stream(step);
  }
  return step;
}

void Trainer::seed_stream(int64_t step) {
  // One stream per data-parallel rank, apart from the initialization's.
  uint64_t x = static_cast<uint64_t>(cfg_.train.seed) * 0x9E3779B97F4A7C15ull ^
               (static_cast<uint64_t>(layout_.dp_rank + 1) << 32) ^
               static_cast<uint64_t>(step);
  x ^= x >> 31;
  at::manual_seed(x & 0x7FFFFFFFFFFFFFFFull);
}

} // namespace detail

Transformer load_model(const std::string& checkpoint_dir) {
  namespace fs = std::filesystem;
  using nlohmann::json;
  const fs::path dir(checkpoint_dir);
  const json manifest = io::read_manifest(dir);
  json hf = nullptr; // fine-tuned from a Hugging Face checkpoint
  if (fs::exists(dir / "hf_config.json")) {
    std::ifstream in(dir / "hf_config.json");
    hf = json::parse(in);
  }
  const auto cfg =
      TrainConfig::from_text(manifest.at("config").get<std::string>(), hf);
  Transformer model(cfg.model);
  apply_lora(*model, cfg.lora);
  io::load_model_tensors(*model, dir);
  model->eval();
  return model;
}

} // namespace moeyard::train
