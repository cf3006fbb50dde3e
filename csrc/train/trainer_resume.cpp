// Where a run starts: crash recovery of the run directory, the choice of
// checkpoint, the checks that it fits this config and data, loading, and
// the metrics records of steps that will run again (docs/training.md,
// "Resuming").

#include "train/trainer_impl.h"

namespace moeyard::train::detail {

int64_t Trainer::start(const RunOptions& options) {
  options_ = options;
  const fs::path dir(cfg_.checkpoint.dir);
  fs::create_directories(dir);
  const auto verify = [](const fs::path& p) -> std::string {
    try {
      io::read_manifest(p);
      return "";
    } catch (const c10::Error& e) {
      return e.what_without_backtrace();
    } catch (const std::exception& e) {
      return e.what();
    }
  };
  if (layout_.rank == 0) {
    for (const auto& line : run_dir::recover(dir, verify)) {
      log::warn("checkpoint.dir: " + line);
    }
  }
  save_barrier(); // the directory is in order before any rank reads it
  const auto begin = run_dir::choose_start(dir, options.resume, verify);
  if (layout_.rank == 0) {
    for (const auto& note : begin.notes) {
      log::warn("resume: " + note);
    }
  }
  // What is sampled: every file and loss mask, the mixture's weights, how
  // raw files are read.
  const auto fingerprint = [this](const io::TokenCorpus& c, bool train) {
    std::vector<std::string> paths;
    for (size_t i = 0; i < c.files().size(); ++i) {
      paths.push_back(c.files()[i]->path());
      if (const auto* m = c.mask_of_file(i)) {
        paths.push_back(m->path());
      }
    }
    auto fp = run_dir::corpus_fingerprint(paths);
    if (train && c.weighted()) {
      for (const auto& s : cfg_.data.train) {
        fp["weights"].push_back(s.weight);
      }
    }
    if (!cfg_.data.raw_dtype.empty()) {
      fp["raw_dtype"] = cfg_.data.raw_dtype;
    }
    return fp;
  };
  data_fingerprint_ = {{"train", fingerprint(*train_, true)}};
  if (valid_) {
    data_fingerprint_["valid"] = fingerprint(*valid_, false);
  }
  // Where the weights come from: a checkpoint of any layout, a Hugging
  // Face checkpoint or a fresh init (load_weights, after the checks).
  int64_t step = 0;
  json manifest;
  std::vector<double> recent; // the spike guard's accepted losses
  relu_l1_coeff_ = cfg_.model.moe.routing.switch_coeff;
  if (!begin.from.empty()) {
    manifest = io::read_manifest(begin.from); // SHA-256 of every file
    step = manifest.at("step").get<int64_t>();
    check_resume_compatible(manifest, begin.from);
    teacher_of_start_ = manifest.value("teacher", std::string());
    run_id_ = manifest.value("run_id", std::string("legacy"));
    const auto& st = manifest.value("trainer_state", json::object());
    bad_in_row_ = st.value("bad_in_row", int64_t(0));
    relu_l1_coeff_ = st.value("relu_l1_coeff", relu_l1_coeff_);
    for (const auto& l : st.value("recent_losses", json::array())) {
      recent.push_back(l.get<double>());
    }
  } else {
    run_id_ = [] {
      std::random_device rd;
      char buf[17];
      std::snprintf(
          buf,
          sizeof buf,
          "%08x%08x",
          static_cast<unsigned>(rd()),
          static_cast<unsigned>(rd()));
      return std::string(buf);
    }();
  }
  reset_spike_window(recent);
  // Checkpoints newer than the start belong to another run, or to the
  // future of an older step: never mixed with this run's silently.
  std::vector<std::string> newer;
  for (const auto& c : run_dir::list_checkpoints(dir)) {
    if (c.step > step || begin.from.empty()) {
      newer.push_back(c.path.filename().string());
    }
  }
  // A run started with --overwrite that died before it discarded them
  // still may (its checkpoints say so).
  const bool overwrite =
      options.overwrite ||
      (manifest.is_object() && manifest.value("overwrite", false));
  TORCH_CHECK(
      newer.empty() || overwrite,
      "checkpoint.dir ",
      dir.string(),
      " already holds ",
      begin.from.empty()
          ? "checkpoints ("
          : "checkpoints newer than step " + std::to_string(step) + " (",
      c10::Join(", ", newer),
      "; the newest is ",
      newer.empty() ? "" : newer.back(),
      ") that this run would overwrite or mix with. Continue them with "
      "--resume auto, choose another checkpoint.dir, or pass --overwrite to "
      "replace them (they are deleted when this run commits its first "
      "checkpoint)");
  discard_others_ = overwrite && !newer.empty();
  if (cfg_.distill.enabled()) {
    load_teacher();
    if (!teacher_of_start_.empty() && teacher_of_start_ != teacher_dir_) {
      log::warn(
          "distill.teacher resolves to " + teacher_dir_ +
          " now; the checkpoint resumed was trained against " +
          teacher_of_start_);
    }
  }
  load_weights(begin.from);
  if (teacher_ && cfg_.distill.kl_coeff == 0) {
    teacher_ = nullptr; // it only initialized the student
    log::info("distill.kl_coeff is 0: the teacher is released");
  }
  for (auto* l : moe_layers()) {
    l->critic_in_training = cfg_.critic.skip_in_training;
  }
  build_optimizer();
  if (!begin.from.empty()) {
    load_optimizer_state(begin.from.string());
    log::info(log::format(
        "resumed from %s at step %ld", begin.from.string().c_str(), step));
  } else {
    seed_stream(0);
  }
  log_memory();
  if (distributed()) { // every rank resumed the same step
    save_barrier(); // loading may take the ranks unequal times
    auto t = at::tensor({double(step), -double(step)}, at::kDouble);
    world_->all_reduce_max(t);
    TORCH_CHECK(
        t[0].item<double>() == -t[1].item<double>(),
        "resume: the ranks resumed different steps (",
        -t[1].item<double>(),
        " to ",
        t[0].item<double>(),
        "); every rank must see the same checkpoint directory");
  }
  if (layout_.rank == 0) {
    if (discard_others_ && fs::exists(metrics_path_)) {
      // The records of the run being replaced stay readable.
      const auto kept = metrics_path_ + ".before-overwrite";
      fs::copy_file(metrics_path_, kept, fs::copy_options::overwrite_existing);
      run_dir::fsync_path(kept);
      log::info("--overwrite: the earlier metrics are kept in " + kept);
    }
    truncate_metrics(step);
  }
  return step;
}

void Trainer::load_weights(const fs::path& from) {
  // The model was built with shapes only: cut them to this rank's pieces,
  // give those memory on the device, fill them from the checkpoint's
  // overlapping rows (a Hugging Face checkpoint: this rank's experts' and
  // its pieces' source tensors) or with the init's values at their
  // positions.
  model_->shard(layout_);
  materialize(*model_, device_);
  model_->to(device_);
  const auto piece_of = [this](const std::string& n) { return piece(n); };
  if (!from.empty()) {
    io::load_model_tensors(*model_, from, piece_of);
  } else if (cfg_.distill.enabled() && cfg_.distill.init_student) {
    // The init first: tensors the teacher lacks keep it.
    at::manual_seed(cfg_.train.seed);
    init_parameters(*model_, 0.02, init_key_from_default_generator(), piece_of);
    init_student_from_teacher();
  } else if (!cfg_.init_from.empty()) {
    io::load_hf_weights(*model_, cfg_.hf_config, cfg_.init_from, piece_of);
    log::info("initialized from " + cfg_.init_from);
    // LoRA factors (not in the base checkpoint): A random, B zero, so the
    // model starts as its base.
    at::manual_seed(cfg_.train.seed);
    init_parameters(
        *model_,
        0.02,
        init_key_from_default_generator(),
        piece_of,
        is_lora_parameter);
  } else {
    at::manual_seed(cfg_.train.seed);
    init_parameters(*model_, 0.02, init_key_from_default_generator(), piece_of);
  }
}

void Trainer::log_memory() const {
  int64_t params = 0, state = 0;
  for (const auto& p : model_->parameters()) {
    params += p.nbytes();
  }
  for (const auto& m : masters_) {
    state += m.defined() ? m.nbytes() : 0;
  }
  for (const auto& b : buckets_) {
    state += b.master.defined() ? b.master.nbytes() : 0;
  }
  for (const auto& [key, s] : opt_->states()) {
    state += s.exp_avg.nbytes() + s.exp_avg_sq.nbytes();
  }
  log::info(log::format(
      "memory: this rank holds %.3f MB of parameters and %.3f MB of "
      "optimizer state; resident %.1f MB, peak %.1f MB",
      params / 1e6,
      state / 1e6,
      util::rss_bytes() / 1e6,
      util::peak_rss_bytes() / 1e6));
}

parallel::Piece Trainer::piece_in(
    const TransformerImpl& m, const std::string& name) const {
  switch (placement_in(m, name)) {
    case parallel::Placement::kTensorParallel:
      return {m.tp_split(name), layout_.tp_rank, layout_.tp};
    case parallel::Placement::kExpert:
      return {{0, 1}, layout_.ep_rank, layout_.ep};
    case parallel::Placement::kReplicated:
      break;
  }
  return {};
}

void Trainer::check_resume_compatible(
    const json& manifest, const fs::path& from) {
  // The checkpoint's resolved config, and its config text as this binary
  // resolves it: that gives a key added since the checkpoint was written
  // its default (older manifests carry only the text).
  json hf = nullptr;
  if (fs::exists(from / "hf_config.json")) {
    hf = json::parse(std::ifstream(from / "hf_config.json"));
  }
  std::map<std::string, std::string> was;
  try {
    was = TrainConfig::from_text(manifest.at("config").get<std::string>(), hf)
              .resolved;
  } catch (const std::exception&) {
    if (!manifest.contains("resolved_config")) {
      throw; // nothing else says what the checkpoint's config was
    }
  }
  if (manifest.contains("resolved_config")) {
    for (const auto& [k, v] : manifest.at("resolved_config")
                                  .get<std::map<std::string, std::string>>()) {
      was[k] = v;
    }
  }
  const auto defines_model = [](const std::string& key) {
    if (key == "model.init_from") { // its config.json is compared below
      return false;
    }
    // model:, moe: and the MoE schedules (schedule.<option>.*).
    for (const char* p : {"model.", "moe.", "schedule.", "finetune."}) {
      if (key.rfind(p, 0) == 0) {
        // The bias controllers' rates and target may change.
        return key != "schedule.bias_update_rate" &&
               key != "schedule.null_bias_rate" &&
               key != "schedule.relu_l1_mult" &&
               key != "schedule.null_target_fraction";
      }
    }
    return false;
  };
  const auto is_data = [](const std::string& key) {
    return key == "data.seed" || key == "data.seq_len";
  };
  std::string model_diff, data_diff;
  auto differ =
      [&](const std::string& key, const std::string& a, const std::string& b) {
        return "\n  " + key + ": checkpoint " + (a.empty() ? "(unset)" : a) +
               ", this config " + (b.empty() ? "(unset)" : b);
      };
  std::set<std::string> keys;
  for (const auto& [k, v] : was) {
    keys.insert(k);
  }
  for (const auto& [k, v] : cfg_.resolved) {
    keys.insert(k);
  }
  for (const auto& k : keys) {
    const auto a = was.count(k) ? was.at(k) : std::string();
    const auto b = cfg_.resolved.count(k) ? cfg_.resolved.at(k) : std::string();
    if (a == b) {
      continue;
    }
    if (defines_model(k)) {
      model_diff += differ(k, a, b);
    } else if (is_data(k)) {
      data_diff += differ(k, a, b);
    }
  }
  if (!cfg_.init_from.empty() && fs::exists(from / "hf_config.json")) {
    const json hf = json::parse(std::ifstream(from / "hf_config.json"));
    for (const auto& [k, v] : hf.items()) {
      const auto now = cfg_.hf_config.value(k, json());
      if (now != v) {
        model_diff += differ("config.json " + k, v.dump(), now.dump());
      }
    }
  }
  TORCH_CHECK(
      model_diff.empty(),
      "resume: ",
      from.string(),
      " was saved with another model or routing; fields that differ:",
      model_diff,
      "\nResume with the checkpoint's values, or start a new run (another "
      "checkpoint.dir, or --resume never --overwrite). Fields that may change "
      "on resume are listed in docs/training.md");
  // The data: the same content (a moved file is fine) and sampling.
  const auto saved = manifest.value("data", json::object());
  for (const auto& [split, fp] : data_fingerprint_.items()) {
    if (!saved.contains(split)) {
      continue; // a manifest from before data fingerprints
    }
    const auto why = run_dir::fingerprint_difference(saved.at(split), fp);
    if (!why.empty()) {
      data_diff += "\n  data." + split + ": " +
                   saved.at(split).value("path", std::string()) + " then, " +
                   fp.value("path", std::string()) + " now: " + why;
    } else if (saved.at(split).value("path", "") != fp.value("path", "")) {
      log::info(
          "resume: data." + split + " moved to " + fp.value("path", "") +
          " (same content)");
    }
  }
  if (!data_diff.empty()) {
    TORCH_CHECK(
        options_.allow_data_change,
        "resume: the training data differs from the checkpoint's (",
        from.string(),
        "):",
        data_diff,
        "\nThe resumed run would not see the batches the checkpoint's run "
        "would have. Pass --allow-data-change to resume anyway");
    log::warn("resume: the data differs (--allow-data-change):" + data_diff);
  }
}

void Trainer::truncate_metrics(int64_t step) const {
  if (!fs::exists(metrics_path_)) {
    return;
  }
  std::ifstream in(metrics_path_);
  std::string line, kept;
  int64_t dropped = 0;
  while (std::getline(in, line)) {
    json rec;
    try {
      rec = json::parse(line);
    } catch (const std::exception&) {
      ++dropped; // a record torn by a crash
      continue;
    }
    if (!rec.is_object() || rec.value("step", int64_t(0)) > step) {
      ++dropped;
      continue;
    }
    kept += line + "\n";
  }
  in.close();
  if (dropped > 0) {
    run_dir::write_durably(metrics_path_, kept);
    log::info(log::format(
        "%s: dropped %ld records past step %ld (those steps run again)",
        metrics_path_.c_str(),
        dropped,
        step));
  }
}

} // namespace moeyard::train::detail
