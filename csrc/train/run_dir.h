#pragma once
// The run directory (checkpoint.dir): which checkpoint a run starts from,
// how a checkpoint is published so that a crash at any instant leaves a
// resumable directory, and which old checkpoints pruning may delete.
// docs/training.md ("Checkpoints" and "Resuming") states the rules.
//
//   <dir>/step_<N>/        a committed checkpoint (manifest.json last)
//   <dir>/step_<N>.tmp/    being written; read only to complete a save
//                          that `latest` already names
//   <dir>/step_<N>.old/    a committed step_<N> set aside while a new
//                          step_<N> replaces it; restored if the swap died
//   <dir>/step_<N>.deleting/  being deleted
//   <dir>/latest           the name of the newest committed checkpoint: the
//                          commit point of a save

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace moeyard::train::run_dir {

namespace fs = std::filesystem;

// fsyncs a file or a directory; errors name the path.
void fsync_path(const fs::path& p);
// Writes `text` to `p` so that after a crash `p` holds either its old
// content or all of `text`: a temporary file, fsync, rename, fsync of the
// directory.
void write_durably(const fs::path& p, const std::string& text);
// Test hook: when the environment variable MOEYARD_CRASH_AT is `name` (or
// `name#k`), the process dies at once, as if killed with SIGKILL, the first
// (k-th) time it passes this point.
void crash_point(const char* name);

// step_<digits> -> N; anything else (step_x, step_3.tmp) -> nullopt.
std::optional<int64_t> parse_step_name(const std::string& name);

struct Checkpoint {
  int64_t step;
  fs::path path;
};
// The committed checkpoints of `dir`, by increasing step.
std::vector<Checkpoint> list_checkpoints(const fs::path& dir);

// Finishes what a crash interrupted. `latest` is the commit point: if the
// checkpoint it names is missing, it is completed from step_<N>.tmp (when
// that verifies) or restored from step_<N>.old. Then a step_<N>.old whose
// step_<N> is missing is renamed back, and other step_<N>.old, .tmp and
// .deleting directories are deleted. Returns one line per action, for the
// log. `verify(checkpoint)` returns "" when it is complete and intact.
std::vector<std::string> recover(
    const fs::path& dir,
    const std::function<std::string(const fs::path&)>& verify);

// The checkpoint name (step_<N>) `latest` holds, or nullopt when the file
// is missing, empty, unreadable or holds anything else.
std::optional<std::string> read_latest(const fs::path& dir);

// Where a run starts. `verify(checkpoint)` returns "" when the checkpoint is
// complete and intact, else why not.
struct Start {
  fs::path from; // empty: a fresh start at step 0
  std::vector<std::string> notes; // what the log should say about the choice
};
Start choose_start(
    const fs::path& dir,
    const std::string& resume, // "auto", "never" or a checkpoint directory
    const std::function<std::string(const fs::path&)>& verify);

// Publishes the finished checkpoint `tmp` as `final_dir`: `latest` names it
// first (the commit point), then an existing `final_dir` is set aside as
// <final_dir>.old, `tmp` is renamed into place and the .old deleted.
void publish(const fs::path& tmp, const fs::path& final_dir);

// Deletes checkpoints so that a crash midway leaves none half-deleted
// under its committed name (each is renamed to <name>.deleting first).
void remove_checkpoints(const fs::path& dir, const std::vector<fs::path>& drop);

// The checkpoints pruning deletes after `committed` was published: of the
// older checkpoints that belong to `run_id`, all but the newest
// keep_last - 1; with `discard_others` (a run started with --overwrite)
// also every checkpoint of another run and every newer one. `run_of` reads
// a checkpoint's run id ("" when it cannot).
std::vector<fs::path> prune_list(
    const std::vector<Checkpoint>& all,
    int64_t committed,
    const std::string& run_id,
    int64_t keep_last,
    bool discard_others,
    const std::function<std::string(const fs::path&)>& run_of);

// Identifies the contents of a token file: size, its first 32 bytes and a
// SHA-256 of up to three 1 MiB blocks (start, middle, end).
nlohmann::json data_fingerprint(const std::string& path);
// A corpus's: its one file's fingerprint, or {path: the files joined,
// files: each one's} for several.
nlohmann::json corpus_fingerprint(const std::vector<std::string>& paths);
// "" when the two fingerprints name the same content (files compared in
// order), else what differs.
std::string fingerprint_difference(
    const nlohmann::json& was, const nlohmann::json& now);

} // namespace moeyard::train::run_dir
