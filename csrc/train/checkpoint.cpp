// Checkpoints: save (atomic, SHA-256 manifest, full tensors under global
// names), load of the model and of the optimizer state; docs/training.md.

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

// Copies a checkpoint's model tensors into `model`: every name and shape
// must match, in both directions.

void load_model_tensors(TransformerImpl& model, const fs::path& dir) {
  auto model_t = io::load_safetensors((dir / "model.safetensors").string());
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

void Trainer::save(int64_t step) {
  // Full tensors under global names: tensor-parallel pieces and expert
  // slices are gathered (every rank takes part), then rank 0 writes, as the
  // replicas hold the same model and optimizer, and the others wait for the
  // commit. The checkpoint loads at any layout.
  io::TensorMap model_t, opt_t;
  for (const auto& p : model_->named_parameters()) {
    model_t[p.key()] = full_tensor(p.key(), p.value());
  }
  for (const auto& b : model_->named_buffers()) {
    model_t[b.key()] = b.value();
  }
  // Optimizer state by parameter name.
  auto& state = opt_->state();
  size_t i = 0;
  for (auto& group : opt_->param_groups()) {
    for (auto& p : group.params()) {
      auto it = state.find(p.unsafeGetTensorImpl());
      if (it != state.end()) {
        auto& s = static_cast<torch::optim::AdamWParamState&>(*it->second);
        const auto& n = names_[i];
        opt_t[n + ".exp_avg"] = full_tensor(n, s.exp_avg());
        opt_t[n + ".exp_avg_sq"] = full_tensor(n, s.exp_avg_sq());
        opt_t[n + ".step"] = at::full({}, s.step(), at::kLong);
        if (opt_is_master_[i]) {
          opt_t[n + ".master"] = full_tensor(n, p);
        }
      }
      ++i;
    }
  }
  if (env_.rank != 0) {
    world_->barrier();
    return;
  }
  const fs::path dir(cfg_.checkpoint.dir);
  const auto name = "step_" + std::to_string(step);
  const fs::path tmp = dir / (name + ".tmp"), final_dir = dir / name;
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  io::save_safetensors((tmp / "model.safetensors").string(), model_t);
  io::save_safetensors((tmp / "optimizer.safetensors").string(), opt_t);
  auto rng = at::detail::getDefaultCPUGenerator().get_state();
  io::save_safetensors((tmp / "rng.safetensors").string(), {{"cpu", rng}});
  json manifest = {
      {"step", step},
      {"config", cfg_.text},
      {"data_position", step},
      {"parallel",
       {{"tensor_parallel", tp_size_},
        {"data_parallel", dp_size_},
        {"expert_parallel", ep_size_}}}};
  std::vector<std::string> files = {
      "model.safetensors", "optimizer.safetensors", "rng.safetensors"};
  if (!cfg_.init_from.empty()) { // the architecture, for resume and export
    std::ofstream out(tmp / "hf_config.json");
    out << cfg_.hf_config.dump(2) << "\n";
    files.push_back("hf_config.json");
  }
  if (const auto tok = tokenizer_path(); !tok.empty()) { // for generate
    fs::copy_file(tok, tmp / "tokenizer.json");
    files.push_back("tokenizer.json");
  }
  for (const auto& f : files) {
    manifest["sha256"][f] = io::sha256_file((tmp / f).string());
  }
  {
    std::ofstream out(tmp / "manifest.json");
    out << manifest.dump(2);
  }
  fs::remove_all(final_dir);
  fs::rename(tmp, final_dir);
  // `latest` moves only after the rename commits the checkpoint.
  {
    std::ofstream out(dir / "latest.tmp");
    out << name << "\n";
  }
  fs::rename(dir / "latest.tmp", dir / "latest");
  // Keep the newest keep_last checkpoints.
  std::vector<std::pair<int64_t, fs::path>> all;
  for (const auto& e : fs::directory_iterator(dir)) {
    const auto n = e.path().filename().string();
    if (e.is_directory() && n.rfind("step_", 0) == 0 && !ends_with(n, ".tmp")) {
      const auto num = n.substr(5);
      if (!num.empty() && std::all_of(num.begin(), num.end(), [](char c) {
            return c >= '0' && c <= '9';
          })) { // other step_* names are not ours
        all.emplace_back(std::stoll(num), e.path());
      }
    }
  }
  std::sort(all.begin(), all.end());
  const int64_t keep = std::max<int64_t>(cfg_.checkpoint.keep_last, 1);
  for (int64_t k = 0; k + keep < static_cast<int64_t>(all.size()); ++k) {
    fs::remove_all(all[k].second);
  }
  log::info("checkpoint saved: " + final_dir.string());
  if (distributed()) {
    world_->barrier();
  }
}

void Trainer::load_model_state(const std::string& dir) {
  read_manifest(fs::path(dir)); // SHA-256 of every file
  load_model_tensors(*model_, fs::path(dir));
}

int64_t Trainer::load_optimizer_state(const std::string& dir_in) {
  const fs::path dir(dir_in);
  std::ifstream in(dir / "manifest.json");
  const json manifest = json::parse(in);
  auto opt_t = io::load_safetensors((dir / "optimizer.safetensors").string());
  size_t i = 0;
  for (auto& group : opt_->param_groups()) {
    for (auto& p : group.params()) {
      const auto& n = names_[i];
      if (opt_t.count(n + ".exp_avg")) {
        auto s = std::make_unique<torch::optim::AdamWParamState>();
        s->exp_avg(local_piece(n, opt_t.at(n + ".exp_avg")).clone());
        s->exp_avg_sq(local_piece(n, opt_t.at(n + ".exp_avg_sq")).clone());
        s->step(opt_t.at(n + ".step").item<int64_t>());
        opt_->state()[p.unsafeGetTensorImpl()] = std::move(s);
        if (opt_is_master_[i]) {
          p.detach().copy_(local_piece(n, opt_t.at(n + ".master")));
        }
      }
      ++i;
    }
  }
  auto rng = io::load_safetensors((dir / "rng.safetensors").string());
  auto gen = at::detail::getDefaultCPUGenerator();
  gen.set_state(rng.at("cpu"));
  return manifest.at("step").get<int64_t>();
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
