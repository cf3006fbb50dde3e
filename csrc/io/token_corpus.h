#pragma once
// The training data as a set of token files (data.train, data.valid;
// docs/training.md, "Data"): sources, each a path or a glob of moeyard
// shards or raw token files, with optional mixture weights. Windows are
// drawn from the files in proportion to their windows, or, with weights,
// from a source chosen by weight first.

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include "io/token_shard.h"

namespace moeyard::io {

struct CorpusSource {
  // A file or a glob (*, ?, [...]) of files; a glob leaves out loss masks
  // (*.mask.bin), which belong to the shard beside them.
  std::string path;
  double weight = 0; // the share of windows drawn from it (0: by windows)
};

class TokenCorpus {
 public:
  // The files of every source (a glob's matches in sorted order), each
  // longer than `seq_len` (a window of seq_len tokens); `raw_width`: bytes per
  // token of files without a header (0: none allowed). `key` names the config
  // field in errors: a glob matching nothing, a file too short, weights
  // given to some sources only.
  TokenCorpus(
      const std::vector<CorpusSource>& sources,
      uint32_t raw_width,
      int64_t seq_len,
      const std::string& key);

  const std::vector<std::unique_ptr<TokenShard>>& files() const {
    return files_;
  }
  // Start positions of windows over every file.
  int64_t windows() const {
    return windows_;
  }
  // Whether sources carry weights (a draw picks the source first).
  bool weighted() const {
    return weighted_;
  }
  // The seq_len tokens at window `position` in [0, windows()): files in
  // order, each contributing its size - seq_len starts.
  at::Tensor window(int64_t position, int64_t vocab) const;
  // Whether any file has a loss mask: <name>.mask.bin beside <name>.bin, a
  // shard of 0/1 per token (scripts/prepare_data.py --chat).
  bool has_loss_masks() const {
    return has_masks_;
  }
  // File i's loss mask (null: none).
  const TokenShard* mask_of_file(size_t i) const {
    return masks_[i].get();
  }
  // The loss mask [seq_len] (int64 0/1) of window `position`: all ones in a
  // file without a mask.
  at::Tensor loss_mask(int64_t position) const;
  // A random window's position from two 64-bit draws: with weights, `pick`
  // chooses the source (in proportion to its weight) and `r` the window
  // inside it; without, `r` chooses among all windows (`pick` unused).
  int64_t random_position(uint64_t r, uint64_t pick) const;

 private:
  struct Source {
    size_t first_file = 0, files = 0;
    int64_t first_window = 0, windows = 0;
    double weight = 0;
  };
  // The file holding window `position`.
  size_t file_of(int64_t position) const;

  std::vector<std::unique_ptr<TokenShard>> files_;
  std::vector<std::unique_ptr<TokenShard>> masks_; // per file; null: none
  bool has_masks_ = false;
  std::vector<int64_t> first_window_; // per file, then windows_
  std::vector<Source> sources_;
  int64_t windows_ = 0, seq_len_ = 0;
  bool weighted_ = false;
};

} // namespace moeyard::io
