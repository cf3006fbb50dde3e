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
  explicit TokenShard(const std::string& path);

  int64_t size() const {
    return count_;
  }
  int64_t vocab_size() const {
    return vocab_;
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
  const uint8_t* data_ = nullptr; // the whole file
};

} // namespace moeyard::io
