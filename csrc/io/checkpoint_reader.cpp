// Reading a native checkpoint piece by piece (io/checkpoint.h): each rank
// reads, from the memory-mapped files, only the stored rows that overlap
// the pieces it owns.

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>

#include "io/checkpoint.h"
#include "model/transformer.h"
#include "util/log.h"

namespace moeyard::io {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Logs a long load's progress every few seconds: bytes read, rate.
class LoadProgress {
 public:
  LoadProgress(std::string what, int64_t total)
      : what_(std::move(what)), total_(total) {}
  void add(int64_t bytes) {
    done_ += bytes;
    const auto now = std::chrono::steady_clock::now();
    if (now - last_ > std::chrono::seconds(5)) {
      last_ = now;
      log::info(line());
    }
  }
  void finish() const {
    if (std::chrono::steady_clock::now() - start_ > std::chrono::seconds(2) ||
        done_ > (int64_t(256) << 20)) {
      log::info(line());
    }
  }

 private:
  std::string line() const {
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_)
            .count();
    return log::format(
        "loading %s: %.1f of %.1f MB this rank owns (%.0f MB/s)",
        what_.c_str(),
        done_ / 1e6,
        total_ / 1e6,
        done_ / 1e6 / std::max(s, 1e-9));
  }
  std::string what_;
  int64_t total_ = 0, done_ = 0;
  std::chrono::steady_clock::time_point start_ =
                                            std::chrono::steady_clock::now(),
                                        last_ = start_;
};

// One stored copy of a tensor: whole, a piece, or a flat piece (elements
// from `flat_begin` on of a piece of shape `flat_shape`).
struct Stored {
  const SafetensorsFile* file = nullptr;
  parallel::Piece piece;
  bool flat = false;
  std::vector<int64_t> flat_shape;
  int64_t flat_begin = 0;
};

Stored describe(const SafetensorsFile& f, const std::string& name) {
  Stored s;
  s.file = &f;
  const auto m = f.metadata().find(name);
  if (m == f.metadata().end()) {
    return s;
  }
  try {
    const auto j = json::parse(m->second);
    s.piece = {
        {j.at("dim").get<int64_t>(), j.at("parts").get<int64_t>()},
        j.at("index").get<int64_t>(),
        j.at("count").get<int64_t>()};
    if (j.contains("flat_begin")) {
      s.flat = true;
      s.flat_shape = j.at("flat_shape").get<std::vector<int64_t>>();
      s.flat_begin = j.at("flat_begin").get<int64_t>();
    }
  } catch (const std::exception&) {
    TORCH_CHECK(
        false,
        "checkpoint ",
        f.path(),
        ": bad piece metadata for '",
        name,
        "'");
  }
  const auto& p = s.piece;
  TORCH_CHECK(
      p.split.dim >= 0 && p.split.parts >= 1 && p.count >= 1 && p.index >= 0 &&
          p.index < p.count && s.flat_begin >= 0 &&
          (!s.flat ||
           (p.split.dim < static_cast<int64_t>(s.flat_shape.size()) &&
            std::all_of(
                s.flat_shape.begin(),
                s.flat_shape.end(),
                [](int64_t d) { return d >= 0 && d < (int64_t(1) << 40); }))),
      "checkpoint ",
      f.path(),
      ": bad piece metadata for '",
      name,
      "'");
  return s;
}

} // namespace

struct CheckpointReader::Impl {
  fs::path dir;
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  std::map<std::string, std::vector<Stored>> stored;

  // Flat pieces of `name`'s piece `index`, joined (an error when some of
  // its elements are in no file).
  at::Tensor join_flat(
      const std::string& name, const std::vector<const Stored*>& parts) const {
    const auto& shape = parts.front()->flat_shape;
    auto t = at::empty(shape, parts.front()->file->view(name).options());
    auto flat = t.view(-1);
    int64_t covered = 0;
    for (const auto* p : parts) {
      const auto v = p->file->view(name);
      TORCH_CHECK(
          p->flat_shape == shape && v.dim() == 1 &&
              p->flat_begin + v.numel() <= flat.numel(),
          "checkpoint ",
          p->file->path(),
          ": flat piece of tensor '",
          name,
          "' at element ",
          p->flat_begin,
          " does not fit the other pieces");
      flat.narrow(0, p->flat_begin, v.numel()).copy_(v);
      covered += v.numel();
    }
    TORCH_CHECK(
        covered == flat.numel(),
        "checkpoint ",
        dir.string(),
        ": tensor '",
        name,
        "' has ",
        covered,
        " of its ",
        flat.numel(),
        " elements in flat pieces: a rank's file is missing");
    return t;
  }
};

CheckpointReader::CheckpointReader(const fs::path& dir, const std::string& kind)
    : impl_(std::make_unique<Impl>()) {
  impl_->dir = dir;
  const json manifest = json::parse(std::ifstream(dir / "manifest.json"));
  for (const auto& [file, sum] : manifest.at("sha256").items()) {
    (void)sum;
    if (!is_checkpoint_file(file, kind)) {
      continue;
    }
    impl_->files.push_back(
        std::make_unique<SafetensorsFile>((dir / file).string()));
    const auto& f = *impl_->files.back();
    for (const auto& name : f.names()) {
      impl_->stored[name].push_back(describe(f, name));
    }
  }
  TORCH_CHECK(
      !impl_->files.empty(),
      "checkpoint ",
      dir.string(),
      ": no ",
      kind,
      " tensors (",
      kind,
      ".safetensors or ",
      kind,
      "-rank<r>.safetensors) in the manifest");
}

CheckpointReader::~CheckpointReader() = default;

bool CheckpointReader::has(const std::string& name) const {
  return impl_->stored.count(name) > 0;
}

std::vector<std::string> CheckpointReader::names() const {
  std::vector<std::string> n;
  for (const auto& [name, copies] : impl_->stored) {
    n.push_back(name);
  }
  return n;
}

at::Tensor CheckpointReader::read_whole(const std::string& name) const {
  const auto it = impl_->stored.find(name);
  TORCH_CHECK(
      it != impl_->stored.end() && it->second.size() == 1 &&
          it->second[0].piece.whole() && !it->second[0].flat,
      "checkpoint ",
      impl_->dir.string(),
      ": tensor '",
      name,
      "' is missing or not stored whole");
  return it->second[0].file->view(name).clone();
}

void CheckpointReader::read(
    const std::string& name,
    at::Tensor& dst,
    const parallel::Piece& want) const {
  const auto it = impl_->stored.find(name);
  TORCH_CHECK(
      it != impl_->stored.end(),
      "checkpoint ",
      impl_->dir.string(),
      ": tensor '",
      name,
      "' is missing");
  // Stored pieces (flat ones joined per piece index first).
  std::vector<std::pair<parallel::Piece, at::Tensor>> copies;
  std::map<int64_t, std::vector<const Stored*>> flat;
  for (const auto& s : it->second) {
    if (s.flat) {
      flat[s.piece.index].push_back(&s);
    } else {
      copies.emplace_back(s.piece, s.file->view(name));
    }
  }
  for (const auto& [index, parts] : flat) {
    copies.emplace_back(parts.front()->piece, impl_->join_flat(name, parts));
  }
  int64_t written = 0;
  for (const auto& [have, src] : copies) {
    // The full size along the split: from whichever side is a piece.
    const auto& split = want.whole() ? have : want;
    int64_t n = 0;
    bool fits = src.dim() == dst.dim();
    if (split.whole()) {
      fits = fits && src.sizes() == dst.sizes();
    } else {
      const int64_t d = split.split.dim;
      fits = fits && d < dst.dim();
      if (fits) {
        n = want.whole() ? dst.size(d) : dst.size(d) * want.count;
        fits = src.size(d) * (have.whole() ? 1 : have.count) == n;
      }
      for (int64_t k = 0; fits && k < dst.dim(); ++k) {
        fits = k == d || src.size(k) == dst.size(k);
      }
    }
    TORCH_CHECK(
        fits,
        "checkpoint ",
        impl_->dir.string(),
        ": tensor '",
        name,
        "' has shape ",
        src.sizes(),
        (have.whole() ? "" : " (a piece)"),
        ", which does not fit the model's ",
        dst.sizes(),
        (want.whole() ? "" : " (this rank's piece)"));
    written += parallel::copy_overlap(dst, want, src, have, n);
  }
  for (const auto& s : it->second) {
    s.file->release(name); // read: out of this process's resident memory
  }
  TORCH_CHECK(
      written == dst.numel(),
      "checkpoint ",
      impl_->dir.string(),
      ": tensor '",
      name,
      "': the stored pieces hold ",
      written,
      " of the ",
      dst.numel(),
      " elements this rank needs (a rank's file is missing)");
}

void load_model_tensors(
    TransformerImpl& model, const fs::path& dir, const PieceOfName& piece_of) {
  const CheckpointReader reader(dir, "model");
  std::vector<std::pair<std::string, at::Tensor>> targets;
  int64_t total = 0;
  for (auto& p : model.named_parameters()) {
    targets.emplace_back(p.key(), p.value());
    total += p.value().nbytes();
  }
  for (auto& b : model.named_buffers()) {
    targets.emplace_back(b.key(), b.value());
    total += b.value().nbytes();
  }
  LoadProgress progress(dir.string(), total);
  at::NoGradGuard g;
  std::set<std::string> wanted;
  for (auto& [name, dst] : targets) {
    reader.read(name, dst, piece_of ? piece_of(name) : parallel::Piece{});
    progress.add(dst.nbytes());
    wanted.insert(name);
  }
  progress.finish();
  int64_t extra = 0;
  std::string first;
  for (const auto& name : reader.names()) {
    if (!wanted.count(name)) {
      first = first.empty() ? name : first;
      ++extra;
    }
  }
  TORCH_CHECK(
      extra == 0,
      "checkpoint ",
      dir.string(),
      ": has ",
      extra,
      " tensors the model does not have (e.g. '",
      first,
      "')");
}

} // namespace moeyard::io
