// Checkpoints: save (each rank writes what it owns under global names, with
// its place in the full tensor; atomic commit, SHA-256 manifest), load at
// any layout (pieces joined, then this rank's cut); docs/training.md.

#include "train/trainer_impl.h"

namespace moeyard::train {
namespace detail {

json read_manifest(const fs::path& dir) {
  std::ifstream in(dir / "manifest.json");
  TORCH_CHECK(in, "checkpoint ", dir.string(), ": no manifest.json");
  json manifest;
  try {
    in >> manifest;
  } catch (const std::exception& e) {
    TORCH_CHECK(
        false,
        "checkpoint ",
        dir.string(),
        ": manifest.json is not valid JSON: ",
        e.what());
  }
  for (const auto& [file, sum] : manifest.at("sha256").items()) {
    const auto got = io::sha256_file((dir / file).string());
    TORCH_CHECK(
        got == sum.get<std::string>(),
        "checkpoint ",
        (dir / file).string(),
        ": SHA-256 mismatch (manifest ",
        sum.get<std::string>(),
        ", file ",
        got,
        "): the file is corrupt");
  }
  return manifest;
}

namespace {

// A file of kind `kind` ("model", "optimizer"): <kind>.safetensors (one
// process) or <kind>-rank<r>.safetensors (rank r of a multi-process run).
bool is_kind_file(const std::string& file, const std::string& kind) {
  const std::string ext = ".safetensors";
  if (file == kind + ext) {
    return true;
  }
  const std::string pre = kind + "-rank";
  if (file.rfind(pre, 0) != 0 || !ends_with(file, ext) ||
      file.size() <= pre.size() + ext.size()) {
    return false;
  }
  const auto num =
      file.substr(pre.size(), file.size() - pre.size() - ext.size());
  return std::all_of(
      num.begin(), num.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// Split metadata of a piece: piece `index` of `count` along `dim`, each of
// `parts` blocks split alike (parallel::TpSplit).
std::string piece_meta(
    const parallel::TpSplit& s, int64_t index, int64_t count) {
  return json{
      {"dim", s.dim}, {"parts", s.parts}, {"index", index}, {"count", count}}
      .dump();
}

} // namespace

io::TensorMap load_checkpoint_tensors(
    const fs::path& dir, const std::string& kind) {
  const json manifest = json::parse(std::ifstream(dir / "manifest.json"));
  io::TensorMap whole;
  struct Pieces {
    parallel::TpSplit split;
    int64_t count = 0;
    std::map<int64_t, at::Tensor> by_index;
  };
  std::map<std::string, Pieces> pieces;
  int64_t files = 0;
  for (const auto& [file, sum] : manifest.at("sha256").items()) {
    (void)sum;
    if (!is_kind_file(file, kind)) {
      continue;
    }
    ++files;
    const auto path = (dir / file).string();
    std::map<std::string, std::string> meta;
    auto tensors = io::load_safetensors(path, &meta);
    for (auto& [name, t] : tensors) {
      auto m = meta.find(name);
      if (m == meta.end()) {
        TORCH_CHECK(
            !whole.count(name) && !pieces.count(name),
            "checkpoint ",
            path,
            ": tensor '",
            name,
            "' is also in another file");
        whole[name] = t;
        continue;
      }
      json j;
      try {
        j = json::parse(m->second);
      } catch (const std::exception&) {
        TORCH_CHECK(
            false,
            "checkpoint ",
            path,
            ": bad piece metadata for '",
            name,
            "'");
      }
      auto& p = pieces[name];
      const parallel::TpSplit s{
          j.at("dim").get<int64_t>(), j.at("parts").get<int64_t>()};
      const int64_t index = j.at("index").get<int64_t>(),
                    count = j.at("count").get<int64_t>();
      TORCH_CHECK(
          !whole.count(name) && s.dim >= 0 && s.dim < t.dim() && s.parts >= 1 &&
              count >= 1 && index >= 0 && index < count &&
              (p.by_index.empty() ||
               (p.count == count && p.split.dim == s.dim &&
                p.split.parts == s.parts)) &&
              !p.by_index.count(index),
          "checkpoint ",
          path,
          ": piece ",
          index,
          " of ",
          count,
          " of tensor '",
          name,
          "' does not fit the other pieces");
      p.split = s;
      p.count = count;
      p.by_index[index] = t;
    }
  }
  TORCH_CHECK(
      files > 0,
      "checkpoint ",
      dir.string(),
      ": no ",
      kind,
      " tensors (",
      kind,
      ".safetensors or ",
      kind,
      "-rank<r>.safetensors) in the manifest");
  for (auto& [name, p] : pieces) {
    TORCH_CHECK(
        static_cast<int64_t>(p.by_index.size()) == p.count,
        "checkpoint ",
        dir.string(),
        ": tensor '",
        name,
        "' has ",
        p.by_index.size(),
        " of its ",
        p.count,
        " pieces: a rank's file is missing");
    std::vector<at::Tensor> ordered;
    for (auto& [i, t] : p.by_index) {
      ordered.push_back(t);
    }
    whole[name] = parallel::tp_join(ordered, p.split);
  }
  return whole;
}

// Copies a checkpoint's model tensors into `model`: every name and shape
// must match, in both directions.

void load_model_tensors(TransformerImpl& model, const fs::path& dir) {
  auto model_t = load_checkpoint_tensors(dir, "model");
  at::NoGradGuard g;
  size_t used = 0;
  auto take = [&](const std::string& n, at::Tensor& dst) {
    auto it = model_t.find(n);
    TORCH_CHECK(
        it != model_t.end(),
        "checkpoint ",
        dir.string(),
        ": tensor '",
        n,
        "' is missing");
    TORCH_CHECK(
        it->second.sizes() == dst.sizes(),
        "checkpoint ",
        dir.string(),
        ": tensor '",
        n,
        "' has shape ",
        it->second.sizes(),
        ", the model expects ",
        dst.sizes());
    dst.copy_(it->second);
    ++used;
  };
  for (auto& p : model.named_parameters()) {
    take(p.key(), p.value());
  }
  for (auto& b : model.named_buffers()) {
    take(b.key(), b.value());
  }
  TORCH_CHECK(
      used == model_t.size(),
      "checkpoint ",
      dir.string(),
      ": has ",
      model_t.size() - used,
      " tensors the model does not have");
}

bool Trainer::writes(const std::string& name) const {
  if (is_tp_sharded(name)) {
    return dp_rank_ == 0; // one data-parallel replica's TP pieces
  }
  if (is_expert(name)) {
    // One expert-data-parallel replica's expert slices (tensor-parallel
    // ranks hold the same experts).
    return tp_rank_ == 0 && dp_rank_ < ep_size_;
  }
  return env_.rank == 0;
}

std::string Trainer::piece_of(const std::string& name) const {
  if (is_tp_sharded(name)) {
    return piece_meta(model_->tp_split(name), tp_rank_, tp_size_);
  }
  if (is_expert(name)) {
    return piece_meta({0, 1}, ep_rank_, ep_size_);
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
  if (env_.rank == 0) {
    fs::remove_all(tmp);
    fs::create_directories(tmp);
  }
  save_barrier();
  TORCH_CHECK(
      fs::is_directory(tmp),
      "checkpoint: rank ",
      env_.rank,
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
    if (writes(p.key())) {
      keep(model_t, model_meta, p.key(), p.key(), p.value());
    }
  }
  for (const auto& b : model_->named_buffers()) {
    if (writes(b.key())) {
      model_t[b.key()] = b.value();
    }
  }
  // Optimizer state by parameter name.
  auto& state = opt_->state();
  size_t i = 0;
  for (auto& group : opt_->param_groups()) {
    for (auto& p : group.params()) {
      auto it = state.find(p.unsafeGetTensorImpl());
      const auto& n = names_[i];
      if (it != state.end() && writes(n)) {
        auto& s = static_cast<torch::optim::AdamWParamState&>(*it->second);
        keep(opt_t, opt_meta, n, n + ".exp_avg", s.exp_avg());
        keep(opt_t, opt_meta, n, n + ".exp_avg_sq", s.exp_avg_sq());
        // The step count is whole: written with the first piece only.
        if ((!is_tp_sharded(n) || tp_rank_ == 0) &&
            (!is_expert(n) || ep_rank_ == 0)) {
          opt_t[n + ".step"] = at::full({}, s.step(), at::kLong);
        }
        if (opt_is_master_[i]) {
          keep(opt_t, opt_meta, n, n + ".master", p);
        }
      }
      ++i;
    }
  }
  const auto suffix =
      distributed() ? "-rank" + std::to_string(env_.rank) : std::string();
  if (!model_t.empty()) {
    io::save_safetensors(
        (tmp / ("model" + suffix + ".safetensors")).string(),
        model_t,
        model_meta);
  }
  if (!opt_t.empty() || env_.rank == 0) { // rank 0's even before any step
    io::save_safetensors(
        (tmp / ("optimizer" + suffix + ".safetensors")).string(),
        opt_t,
        opt_meta);
  }
  if (tp_rank_ == 0) { // tensor-parallel ranks share their stream
    auto rng = at::detail::getDefaultCPUGenerator().get_state();
    io::save_safetensors((tmp / rng_file(dp_rank_)).string(), {{"cpu", rng}});
  }
  run_dir::crash_point("save:written");
  save_barrier();
  if (env_.rank == 0) {
    commit(step, tmp, final_dir);
  }
  save_barrier();
}

std::string Trainer::rng_file(int64_t dp_rank) const {
  return distributed() ? "rng-dp" + std::to_string(dp_rank) + ".safetensors"
                       : "rng.safetensors";
}

json Trainer::manifest_state(int64_t step) const {
  json recent = json::array();
  for (const double l : recent_losses_) {
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
      {"data_position", step},
      {"trainer_state",
       {{"bad_in_row", bad_in_row_}, {"recent_losses", recent}}},
      {"parallel",
       {{"tensor_parallel", tp_size_},
        {"data_parallel", dp_size_},
        {"expert_parallel", ep_size_}}}};
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
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(tmp)) {
    files.push_back(e.path().filename().string());
  }
  std::sort(files.begin(), files.end());
  for (const auto& f : files) {
    manifest["sha256"][f] = io::sha256_file((tmp / f).string());
  }
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

int64_t Trainer::load_optimizer_state(const std::string& dir_in) {
  const fs::path dir(dir_in);
  const json manifest = json::parse(std::ifstream(dir / "manifest.json"));
  const auto opt_t = load_checkpoint_tensors(dir, "optimizer");
  size_t i = 0;
  for (auto& group : opt_->param_groups()) {
    for (auto& p : group.params()) {
      const auto& n = names_[i];
      if (opt_t.count(n + ".exp_avg")) {
        auto piece = [&](const std::string& key) {
          auto t = local_piece(n, opt_t.at(key));
          TORCH_CHECK(
              t.sizes() == p.sizes(),
              "checkpoint ",
              dir.string(),
              ": optimizer tensor '",
              key,
              "' gives this rank shape ",
              t.sizes(),
              ", the parameter has ",
              p.sizes());
          return t;
        };
        auto s = std::make_unique<torch::optim::AdamWParamState>();
        s->exp_avg(piece(n + ".exp_avg").clone());
        s->exp_avg_sq(piece(n + ".exp_avg_sq").clone());
        s->step(opt_t.at(n + ".step").item<int64_t>());
        opt_->state()[p.unsafeGetTensorImpl()] = std::move(s);
        if (opt_is_master_[i]) {
          p.detach().copy_(piece(n + ".master"));
        }
      }
      ++i;
    }
  }
  const int64_t step = manifest.at("step").get<int64_t>();
  // The random stream of this data-parallel rank continues where it was
  // saved when the data-parallel size is unchanged; otherwise it restarts
  // from the seed at this step (router noise and expert dropout differ from
  // an uninterrupted run).
  const auto& par = manifest.at("parallel");
  std::vector<std::string> candidates;
  if (par.value("data_parallel", int64_t(1)) == dp_size_) {
    candidates.push_back("rng-dp" + std::to_string(dp_rank_) + ".safetensors");
    if (dp_size_ == 1) {
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
        dp_rank_,
        dir.string().c_str(),
        par.value("data_parallel", int64_t(1)),
        dp_size_,
        step));
    seed_stream(step);
  }
  return step;
}

void Trainer::seed_stream(int64_t step) {
  // One stream per data-parallel rank, apart from the initialization's.
  uint64_t x = static_cast<uint64_t>(cfg_.train.seed) * 0x9E3779B97F4A7C15ull ^
               (static_cast<uint64_t>(dp_rank_ + 1) << 32) ^
               static_cast<uint64_t>(step);
  x ^= x >> 31;
  at::manual_seed(x & 0x7FFFFFFFFFFFFFFFull);
}

} // namespace detail

Transformer load_model(const std::string& checkpoint_dir) {
  namespace fs = std::filesystem;
  using nlohmann::json;
  const fs::path dir(checkpoint_dir);
  const json manifest = detail::read_manifest(dir);
  json hf = nullptr; // fine-tuned from a Hugging Face checkpoint
  if (fs::exists(dir / "hf_config.json")) {
    std::ifstream in(dir / "hf_config.json");
    hf = json::parse(in);
  }
  const auto cfg =
      TrainConfig::from_text(manifest.at("config").get<std::string>(), hf);
  Transformer model(cfg.model);
  detail::load_model_tensors(*model, dir);
  model->eval();
  return model;
}

} // namespace moeyard::train
