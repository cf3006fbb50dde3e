// Reading and writing the safetensors files of a Hugging Face checkpoint
// directory.

#include "io/hf_files.h"

#include <c10/util/Exception.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <vector>

namespace moeyard::io {
namespace fs = std::filesystem;
using json = nlohmann::json;

HfTensors::HfTensors(const std::string& dir) : dir_(dir) {
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single = fs::path(dir) / "model.safetensors";
  if (fs::exists(index)) {
    add_index(index.string());
  } else {
    TORCH_CHECK(
        fs::exists(single),
        dir,
        ": neither model.safetensors nor model.safetensors.index.json "
        "(only safetensors weights are read)");
    add_file(single.string());
  }
}

// The shards model.safetensors.index.json names, each tensor checked to be
// in the shard the index says.
void HfTensors::add_index(const std::string& path) {
  const fs::path index(path);
  const std::string& dir = dir_;
  std::ifstream in(index);
  json j;
  try {
    in >> j;
  } catch (const std::exception& e) {
    TORCH_CHECK(false, index.string(), ": not valid JSON: ", e.what());
  }
  TORCH_CHECK(
      j.contains("weight_map") && j.at("weight_map").is_object(),
      index.string(),
      ": no 'weight_map' object");
  std::set<std::string> files;
  for (const auto& [name, file] : j.at("weight_map").items()) {
    TORCH_CHECK(
        file.is_string(),
        index.string(),
        ": weight_map['",
        name,
        "'] is not a file name");
    files.insert(file.get<std::string>());
  }
  for (const auto& f : files) {
    TORCH_CHECK(
        f.find('/') == std::string::npos && f != "..",
        index.string(),
        ": shard name '",
        f,
        "' must be a file in the same directory");
    add_file((fs::path(dir) / f).string());
  }
  for (const auto& [name, file] : j.at("weight_map").items()) {
    const auto it = origin_.find(name);
    TORCH_CHECK(
        it != origin_.end() &&
            fs::path(it->second).filename() == file.get<std::string>(),
        index.string(),
        ": tensor '",
        name,
        "' is listed in ",
        file.get<std::string>(),
        " but not stored there");
  }
}

at::Tensor HfTensors::take(const std::string& name, at::IntArrayRef shape) {
  const auto it = tensors_.find(name);
  TORCH_CHECK(it != tensors_.end(), dir_, ": tensor '", name, "' is missing");
  TORCH_CHECK(
      shape.empty() || it->second.sizes() == shape,
      origin_.at(name),
      ": tensor '",
      name,
      "' has shape ",
      it->second.sizes(),
      ", expected ",
      shape);
  used_.insert(name);
  return it->second;
}

void HfTensors::check_all_used(
    const std::function<bool(const std::string&)>& skip) const {
  std::vector<std::string> extra;
  for (const auto& [name, t] : tensors_) {
    const bool derived = name.find("rotary_emb.inv_freq") != std::string::npos;
    if (!used_.count(name) && !derived && !skip(name)) {
      extra.push_back(name);
    }
  }
  if (!extra.empty()) {
    std::string list;
    for (size_t i = 0; i < extra.size() && i < 5; ++i) {
      list += (i ? ", " : "") + extra[i] + " (" + origin_.at(extra[i]) + ")";
    }
    TORCH_CHECK(
        false,
        dir_,
        ": ",
        extra.size(),
        " tensors are not used by the model, e.g. ",
        list,
        " (a config key the importer does not honour?)");
  }
}

void HfTensors::add_file(const std::string& path) {
  for (auto& [name, t] : load_safetensors(path)) {
    TORCH_CHECK(
        !tensors_.count(name),
        path,
        ": tensor '",
        name,
        "' is also stored in ",
        origin_[name]);
    origin_[name] = path;
    tensors_.emplace(name, std::move(t));
  }
}

void write_hf_weights(
    const std::string& out_dir, const TensorMap& out, int64_t max_shard_bytes) {
  // Shards in name order, each up to max_shard_bytes (a tensor larger than
  // that gets a shard of its own).
  std::vector<TensorMap> shards(1);
  int64_t in_shard = 0, total = 0;
  for (const auto& [name, t] : out) {
    const int64_t bytes = t.numel() * t.element_size();
    if (in_shard > 0 && in_shard + bytes > max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back()[name] = t;
    in_shard += bytes;
    total += bytes;
  }
  const std::map<std::string, std::string> meta = {{"format", "pt"}};
  // A previous export's files would be mixed in by an index-less reader.
  for (const auto& e : fs::directory_iterator(out_dir)) {
    const auto f = e.path().filename().string();
    if (f.rfind("model", 0) == 0 &&
        f.find(".safetensors") != std::string::npos) {
      fs::remove(e.path());
    }
  }
  if (shards.size() == 1) {
    save_safetensors(
        (fs::path(out_dir) / "model.safetensors").string(), shards[0], meta);
    return;
  }
  json index = {
      {"metadata", {{"total_size", total}}}, {"weight_map", json::object()}};
  auto pad5 = [](size_t v) {
    auto s = std::to_string(v);
    return std::string(s.size() < 5 ? 5 - s.size() : 0, '0') + s;
  };
  for (size_t s = 0; s < shards.size(); ++s) {
    const auto file =
        "model-" + pad5(s + 1) + "-of-" + pad5(shards.size()) + ".safetensors";
    save_safetensors((fs::path(out_dir) / file).string(), shards[s], meta);
    for (const auto& [name, t] : shards[s]) {
      index["weight_map"][name] = file;
    }
  }
  const auto path =
      (fs::path(out_dir) / "model.safetensors.index.json").string();
  std::ofstream f(path);
  f << index.dump(2) << "\n";
  TORCH_CHECK(f.good(), path, ": write failed");
}

} // namespace moeyard::io
