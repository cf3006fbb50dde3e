// Reading and writing the safetensors files of a Hugging Face checkpoint
// directory; quantized tensors are dequantized as they are taken.

#include "io/hf_files.h"

#include <c10/util/Exception.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <utility>
#include <vector>

namespace moeyard::io {
namespace fs = std::filesystem;
using json = nlohmann::json;

HfTensors::HfTensors(
    const std::string& dir, HfQuantization quant, at::ScalarType dtype)
    : dir_(dir), quant_(std::move(quant)), dtype_(dtype) {
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
  const bool stored = tensors_.count(name) > 0;
  TORCH_CHECK(
      stored || tensors_.count(name + "_blocks"),
      dir_,
      ": tensor '",
      name,
      "' is missing");
  at::Tensor t = stored ? take_stored(name) : take_mxfp4(name);
  TORCH_CHECK(
      shape.empty() || t.sizes() == shape,
      origin_.at(stored ? name : name + "_blocks"),
      ": tensor '",
      name,
      "' has shape ",
      t.sizes(),
      ", expected ",
      shape);
  used_.insert(name);
  return t;
}

// A stored tensor; float8_e4m3fn ones dequantized with their scale.
at::Tensor HfTensors::take_stored(const std::string& name) {
  const at::Tensor& w = tensors_.at(name);
  const std::string scale = name + "_scale_inv";
  const std::string& file = origin_.at(name);
  if (w.scalar_type() != at::kFloat8_e4m3fn) {
    TORCH_CHECK(
        !tensors_.count(scale),
        origin_.at(scale),
        ": tensor '",
        scale,
        "' scales '",
        name,
        "', which is ",
        w.scalar_type(),
        " (expected float8_e4m3fn)");
    return w.clone(); // read from the mapped file
  }
  TORCH_CHECK(
      quant_.method == "fp8",
      file,
      ": tensor '",
      name,
      "' is float8_e4m3fn, but ",
      dir_,
      "/config.json has ",
      quant_.method.empty()
          ? std::string("no quantization_config")
          : "quantization_config.quant_method '" + quant_.method + "'",
      " (expected quant_method 'fp8')");
  TORCH_CHECK(
      tensors_.count(scale),
      file,
      ": tensor '",
      name,
      "' is float8_e4m3fn without its scale '",
      scale,
      "'");
  used_.insert(scale);
  return dequantize_fp8_blocks(
      w,
      tensors_.at(scale),
      quant_.block,
      dtype_,
      file + ": tensor '" + name + "' (scale '" + scale + "' in " +
          origin_.at(scale) + ")");
}

// <name>_blocks and <name>_scales dequantized: [..., rows, G * 32], then
// the last two dimensions swapped (transformers' convert_moe_packed_tensors:
// the blocks are stored [E, out, in / 32, 16], the weight is [E, in, out]).
at::Tensor HfTensors::take_mxfp4(const std::string& name) {
  const std::string blocks = name + "_blocks", scales = name + "_scales";
  const std::string& file = origin_.at(blocks);
  TORCH_CHECK(
      quant_.method == "mxfp4",
      file,
      ": tensor '",
      blocks,
      "' is MXFP4-quantized '",
      name,
      "', but ",
      dir_,
      "/config.json has ",
      quant_.method.empty()
          ? std::string("no quantization_config")
          : "quantization_config.quant_method '" + quant_.method + "'",
      " (expected quant_method 'mxfp4')");
  TORCH_CHECK(
      tensors_.count(scales),
      file,
      ": tensor '",
      blocks,
      "' has no scales '",
      scales,
      "'");
  const at::Tensor& b = tensors_.at(blocks);
  TORCH_CHECK(
      b.dim() >= 3,
      file,
      ": tensor '",
      blocks,
      "' has shape ",
      b.sizes(),
      ", expected [..., rows, groups, 16]");
  used_.insert(blocks);
  used_.insert(scales);
  const std::string what = file + ": tensor '" + blocks + "' (scales '" +
                           scales + "' in " + origin_.at(scales) + ")";
  return dequantize_mxfp4(b, tensors_.at(scales), dtype_, what)
      .transpose(-2, -1);
}

void HfTensors::skip(const std::string& name) {
  for (const char* suffix : {"", "_scale_inv", "_blocks", "_scales"}) {
    if (tensors_.count(name + suffix)) {
      used_.insert(name + suffix);
    }
  }
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
  // Views over the memory-mapped file: a tensor is read when it is taken.
  const SafetensorsFile file(path);
  for (const auto& name : file.names()) {
    auto t = file.view(name);
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
