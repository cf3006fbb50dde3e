#include "io/token_corpus.h"

#include <c10/util/Exception.h>
#include <glob.h>

#include <ATen/ops/ones.h>

#include <algorithm>
#include <fstream>

namespace moeyard::io {
namespace {

bool is_glob(const std::string& p) {
  return p.find_first_of("*?[") != std::string::npos;
}

// A glob's matches, sorted; errors name the key and the pattern.
std::vector<std::string> expand(
    const std::string& pattern, const std::string& key) {
  if (!is_glob(pattern)) {
    return {pattern};
  }
  glob_t g{};
  const int rc = ::glob(pattern.c_str(), 0, nullptr, &g);
  std::vector<std::string> out;
  for (size_t i = 0; rc == 0 && i < g.gl_pathc; ++i) {
    const std::string p = g.gl_pathv[i];
    const std::string mask = ".mask.bin"; // a shard's loss mask, not data
    if (p.size() < mask.size() ||
        p.compare(p.size() - mask.size(), mask.size(), mask) != 0) {
      out.push_back(p);
    }
  }
  globfree(&g);
  TORCH_CHECK(
      !out.empty(),
      "config: ",
      key,
      ": the glob '",
      pattern,
      "' matches no file");
  std::sort(out.begin(), out.end());
  return out;
}

// <name>.mask.bin beside <name>.bin: one 0/1 per token of the file.
std::unique_ptr<TokenShard> mask_of(
    const TokenShard& f, const std::string& key) {
  const auto& p = f.path();
  const std::string suffix = ".bin";
  if (p.size() < suffix.size() ||
      p.compare(p.size() - suffix.size(), suffix.size(), suffix) != 0) {
    return nullptr;
  }
  const auto path = p.substr(0, p.size() - suffix.size()) + ".mask.bin";
  if (!std::ifstream(path).good()) {
    return nullptr;
  }
  auto m = std::make_unique<TokenShard>(path);
  TORCH_CHECK(
      m->size() == f.size() && m->vocab_size() == 2,
      "config: ",
      key,
      ": the loss mask ",
      path,
      " has ",
      m->size(),
      " entries of vocabulary ",
      m->vocab_size(),
      "; expected one 0/1 (vocabulary 2) per token of ",
      p,
      " (",
      f.size(),
      ")");
  return m;
}

} // namespace

TokenCorpus::TokenCorpus(
    const std::vector<CorpusSource>& sources,
    uint32_t raw_width,
    int64_t seq_len,
    const std::string& key)
    : seq_len_(seq_len) {
  TORCH_CHECK(!sources.empty(), "config: ", key, " names no file");
  const auto weighted =
      std::count_if(sources.begin(), sources.end(), [](const auto& s) {
        return s.weight > 0;
      });
  TORCH_CHECK(
      weighted == 0 || weighted == static_cast<int64_t>(sources.size()),
      "config: ",
      key,
      ": ",
      weighted,
      " of ",
      sources.size(),
      " sources have a weight; give every source one, or none (windows "
      "drawn in proportion to the tokens)");
  weighted_ = weighted > 0 && sources.size() > 1;
  for (const auto& src : sources) {
    Source s;
    s.first_file = files_.size();
    s.first_window = windows_;
    s.weight = src.weight;
    for (const auto& path : expand(src.path, key)) {
      auto f = std::make_unique<TokenShard>(path, raw_width);
      TORCH_CHECK(
          f->size() > seq_len,
          "config: ",
          key,
          " (",
          path,
          ") has ",
          f->size(),
          " tokens, fewer than data.seq_len + 1 = ",
          seq_len + 1);
      first_window_.push_back(windows_);
      windows_ += f->size() - seq_len;
      masks_.push_back(mask_of(*f, key));
      has_masks_ = has_masks_ || masks_.back();
      files_.push_back(std::move(f));
    }
    s.files = files_.size() - s.first_file;
    s.windows = windows_ - s.first_window;
    sources_.push_back(s);
  }
  first_window_.push_back(windows_);
}

size_t TokenCorpus::file_of(int64_t position) const {
  TORCH_CHECK(
      position >= 0 && position < windows_,
      "data: window ",
      position,
      " is outside [0, ",
      windows_,
      ")");
  const auto it =
      std::upper_bound(first_window_.begin(), first_window_.end(), position);
  return static_cast<size_t>(it - first_window_.begin()) - 1;
}

at::Tensor TokenCorpus::window(int64_t position, int64_t vocab) const {
  const size_t f = file_of(position);
  return files_[f]->read(position - first_window_[f], seq_len_, vocab);
}

at::Tensor TokenCorpus::loss_mask(int64_t position) const {
  const size_t f = file_of(position);
  if (!masks_[f]) {
    return at::ones({seq_len_}, at::kLong);
  }
  return masks_[f]->read(position - first_window_[f], seq_len_, 2);
}

int64_t TokenCorpus::random_position(uint64_t r, uint64_t pick) const {
  if (!weighted_) {
    return static_cast<int64_t>(r % static_cast<uint64_t>(windows_));
  }
  double total = 0;
  for (const auto& s : sources_) {
    total += s.weight;
  }
  // pick / 2^64 in [0, 1), scaled to the weights.
  double u = static_cast<double>(pick >> 11) * 0x1.0p-53 * total;
  const Source* chosen = &sources_.back();
  for (const auto& s : sources_) {
    if (u < s.weight) {
      chosen = &s;
      break;
    }
    u -= s.weight;
  }
  return chosen->first_window +
         static_cast<int64_t>(r % static_cast<uint64_t>(chosen->windows));
}

} // namespace moeyard::io
