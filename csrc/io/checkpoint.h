#pragma once
// The native checkpoint format (docs/training.md, docs/distributed.md): a
// directory `step_<N>/` with `manifest.json` (the run's state and the
// SHA-256 of every file) and safetensors files of two kinds, "model" and
// "optimizer": `<kind>.safetensors` (one process) or
// `<kind>-rank<r>.safetensors` (rank r), each holding whole tensors and
// pieces of split tensors under their global names. A piece's place in the
// full tensor is its `__metadata__` entry (piece_metadata). This file reads,
// verifies and joins those files; what a run saves and when is the
// trainer's (csrc/train).

#include <nlohmann/json.hpp>

#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "parallel/piece.h"
#include "parallel/tensor_parallel.h"

namespace moeyard {
class TransformerImpl;
} // namespace moeyard

namespace moeyard::io {

// The file of kind `kind` a process writes: `<kind><suffix>.safetensors`
// (suffix "" or "-rank<r>").
std::string checkpoint_file(const std::string& kind, const std::string& suffix);

// Whether `file` is a file of kind `kind` (either form).
bool is_checkpoint_file(const std::string& file, const std::string& kind);

// The metadata of piece `index` of `count` along split `s`.
std::string piece_metadata(
    const parallel::TpSplit& s, int64_t index, int64_t count);

// The metadata of a flat piece: the elements from `begin` on of the
// flattened tensor of `shape`, which is itself piece `index` of `count`
// along split `s` (index 0 of 1: the whole tensor). The sharded optimizer
// writes its state so.
std::string flat_piece_metadata(
    const std::vector<int64_t>& shape,
    int64_t begin,
    const parallel::TpSplit& s,
    int64_t index,
    int64_t count);

// The SHA-256 of every file in `dir`, by file name: the manifest's
// "sha256" entry.
nlohmann::json hash_files(const std::filesystem::path& dir);

// Verifies every file's SHA-256 against a checkpoint's manifest.json and
// returns the manifest.
nlohmann::json read_manifest(const std::filesystem::path& dir);

// The full tensors of a checkpoint's files of one kind ("model",
// "optimizer"): whole tensors and the pieces ranks wrote (flat pieces
// first joined into theirs), joined. Errors name a missing piece, a piece
// that does not fit, a tensor in two files.
TensorMap load_checkpoint_tensors(
    const std::filesystem::path& dir, const std::string& kind);

// A checkpoint's files of one kind ("model", "optimizer"), memory-mapped
// and read piece by piece: a rank reads only the stored rows that overlap
// what it owns, converted to its dtype slice by slice.
class CheckpointReader {
 public:
  CheckpointReader(const std::filesystem::path& dir, const std::string& kind);
  ~CheckpointReader();

  bool has(const std::string& name) const;
  // Stored tensor names.
  std::vector<std::string> names() const;
  // Fills `dst`, piece `want` of tensor `name`, from its stored copies
  // (whole tensors, pieces, flat pieces). Errors name the tensor: missing,
  // a stored shape that does not fit, rows no stored piece holds.
  void read(
      const std::string& name,
      at::Tensor& dst,
      const parallel::Piece& want) const;
  // A tensor stored whole (a step count).
  at::Tensor read_whole(const std::string& name) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Where each of the model's tensors sits in its full tensor (whole when
// empty or for names it does not split).
using PieceOfName = std::function<parallel::Piece(const std::string& name)>;

// Copies a checkpoint's model tensors into `model`, each of whose tensors
// is piece `piece_of(name)` of the full tensor: from the memory-mapped
// files, only the rows of stored pieces (whole tensors included) that
// overlap it are read, converted to the model's dtype slice by slice; long
// loads log their progress (bytes, rate). Every name must match in both
// directions; a shape that does not fit or rows no stored piece holds are
// errors naming the tensor.
void load_model_tensors(
    TransformerImpl& model,
    const std::filesystem::path& dir,
    const PieceOfName& piece_of = {});

} // namespace moeyard::io
