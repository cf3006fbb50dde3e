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
#include <string>

#include "io/safetensors.h"
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

// Copies a checkpoint's model tensors into `model`: every name and shape
// must match, in both directions.
void load_model_tensors(
    TransformerImpl& model, const std::filesystem::path& dir);

} // namespace moeyard::io
