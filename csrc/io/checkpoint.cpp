// The native checkpoint format: file names, piece metadata, the manifest's
// hashes, and reading a checkpoint back at any layout (checkpoint.h).

#include "io/checkpoint.h"

#include <algorithm>
#include <chrono>
#include <fstream>
#include <map>
#include <memory>
#include <set>

#include "model/transformer.h"
#include "util/log.h"

namespace moeyard::io {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

} // namespace

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
    const auto got = sha256_file((dir / file).string());
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

std::string checkpoint_file(
    const std::string& kind, const std::string& suffix) {
  return kind + suffix + ".safetensors";
}

bool is_checkpoint_file(const std::string& file, const std::string& kind) {
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

// Piece `index` of `count` along `dim`, each of `parts` blocks split alike
// (parallel::TpSplit).
std::string piece_metadata(
    const parallel::TpSplit& s, int64_t index, int64_t count) {
  return json{
      {"dim", s.dim}, {"parts", s.parts}, {"index", index}, {"count", count}}
      .dump();
}

std::string flat_piece_metadata(
    const std::vector<int64_t>& shape,
    int64_t begin,
    const parallel::TpSplit& s,
    int64_t index,
    int64_t count) {
  return json{
      {"dim", s.dim},
      {"parts", s.parts},
      {"index", index},
      {"count", count},
      {"flat_shape", shape},
      {"flat_begin", begin}}
      .dump();
}

json hash_files(const fs::path& dir) {
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir)) {
    files.push_back(e.path().filename().string());
  }
  std::sort(files.begin(), files.end());
  json sums = json::object();
  for (const auto& f : files) {
    sums[f] = sha256_file((dir / f).string());
  }
  return sums;
}

TensorMap load_checkpoint_tensors(
    const fs::path& dir, const std::string& kind) {
  const json manifest = json::parse(std::ifstream(dir / "manifest.json"));
  TensorMap whole;
  struct Pieces {
    parallel::TpSplit split;
    int64_t count = 0;
    std::map<int64_t, at::Tensor> by_index;
  };
  std::map<std::string, Pieces> pieces;
  // Flat pieces by (name, piece index): element offset -> elements.
  struct Flat {
    std::vector<int64_t> shape;
    std::map<int64_t, at::Tensor> by_begin;
    std::string file; // one of them, for errors
  };
  std::map<std::pair<std::string, int64_t>, Flat> flats;
  int64_t files = 0;
  for (const auto& [file, sum] : manifest.at("sha256").items()) {
    (void)sum;
    if (!is_checkpoint_file(file, kind)) {
      continue;
    }
    ++files;
    const auto path = (dir / file).string();
    std::map<std::string, std::string> meta;
    auto tensors = load_safetensors(path, &meta);
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
      parallel::TpSplit s;
      int64_t index = 0, count = 0;
      try {
        s = {j.at("dim").get<int64_t>(), j.at("parts").get<int64_t>()};
        index = j.at("index").get<int64_t>();
        count = j.at("count").get<int64_t>();
        if (j.contains("flat_begin")) {
          auto& f = flats[{name, index}];
          const auto shape = j.at("flat_shape").get<std::vector<int64_t>>();
          const int64_t begin = j.at("flat_begin").get<int64_t>();
          TORCH_CHECK(
              t.dim() == 1 && begin >= 0 && s.dim >= 0 &&
                  s.dim < static_cast<int64_t>(shape.size()) && s.parts >= 1 &&
                  count >= 1 && index >= 0 && index < count &&
                  (p.count == 0 || p.count == count) &&
                  (f.by_begin.empty() || f.shape == shape) &&
                  !f.by_begin.count(begin),
              "checkpoint ",
              path,
              ": flat piece of tensor '",
              name,
              "' at element ",
              begin,
              " does not fit the other pieces");
          f.shape = shape;
          f.file = path;
          f.by_begin[begin] = t;
          t = at::Tensor(); // joined below
        }
      } catch (const json::exception&) {
        TORCH_CHECK(
            false,
            "checkpoint ",
            path,
            ": bad piece metadata for '",
            name,
            "'");
      }
      if (!t.defined()) {
        p.split = s;
        p.count = count;
        continue;
      }
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
  for (auto& [key, f] : flats) {
    const auto& [name, index] = key;
    int64_t numel = 1, at_ = 0;
    for (auto d : f.shape) {
      TORCH_CHECK(
          d >= 0 && (d == 0 || numel <= (int64_t(1) << 50) / d),
          "checkpoint ",
          f.file,
          ": flat piece of tensor '",
          name,
          "' has a bad shape");
      numel *= d;
    }
    std::vector<at::Tensor> parts;
    for (auto& [begin, t] : f.by_begin) {
      TORCH_CHECK(
          begin == at_,
          "checkpoint ",
          dir.string(),
          ": tensor '",
          name,
          "' lacks elements [",
          at_,
          ", ",
          begin,
          ") of its flat pieces: a rank's file is missing");
      parts.push_back(t);
      at_ += t.numel();
    }
    TORCH_CHECK(
        at_ == numel,
        "checkpoint ",
        dir.string(),
        ": tensor '",
        name,
        "' has ",
        at_,
        " of its ",
        numel,
        " elements in flat pieces: a rank's file is missing");
    auto& p = pieces[name];
    TORCH_CHECK(
        !whole.count(name) && !p.by_index.count(index) && index >= 0 &&
            index < p.count,
        "checkpoint ",
        f.file,
        ": tensor '",
        name,
        "' piece ",
        index,
        " appears twice");
    p.by_index[index] = at::cat(parts).view(f.shape);
  }
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

} // namespace moeyard::io
