#pragma once
// Memory-mapped token shards (format: token_shard_format.h,
// scripts/prepare_data.py, docs/training.md). Every header field is validated
// against the file by parse_token_shard, overflow-checked; token ids are
// checked against the model's vocabulary when a batch is read.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "io/mapped_file.h"
#include "io/token_shard_format.h"

namespace moeyard::io {

class TokenShard {
 public:
  // A moeyard shard; a file without its header is a raw token file of
  // `raw_width` bytes per token (2 or 4), or an error when that is 0.
  explicit TokenShard(const std::string& path, uint32_t raw_width = 0);

  int64_t size() const {
    return count_;
  }
  // The vocabulary the shard was made for (0: a raw file, which does not
  // say).
  int64_t vocab_size() const {
    return raw_ ? 0 : vocab_;
  }
  const std::string& path() const {
    return path_;
  }
  // tokens[start : start + n] as int64; ids >= vocab are an error naming the
  // file and the position.
  at::Tensor read(int64_t start, int64_t n, int64_t vocab) const;

 private:
  std::string path_;
  MappedFile file_; // not copyable, so neither is a TokenShard
  TokenShardHeader header_;
  int64_t count_ = 0, vocab_ = 0;
  bool raw_ = false;
  const uint8_t* data_ = nullptr; // the whole file
};

} // namespace moeyard::io
