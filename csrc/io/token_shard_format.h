#pragma once
// The token shard header (scripts/prepare_data.py, docs/training.md), parsed
// from bytes alone: TokenShard (token_shard.h) reads files with it and the
// fuzz harness tests/fuzz/fuzz_token_shard.cpp calls it directly.
//
//   0  magic "MOEYTOK1"   8  u32 version (1)   12  u32 bytes per token (1, 2,
//   4; 1: loss masks)
//   16 u64 token count   24  u64 vocabulary size   32  tokens, little-endian

#include <cstddef>
#include <cstdint>
#include <string>

#include "io/file_format.h"

namespace moeyard::io {

constexpr size_t kTokenShardHeaderBytes = 32;

struct TokenShardHeader {
  uint32_t width = 0; // bytes per token: 1, 2 or 4
  uint64_t count = 0; // tokens after the header
  uint64_t vocab = 0; // every id is below this: 1 .. 2^(8 * width)
  uint64_t offset = kTokenShardHeaderBytes; // where the tokens start
};

// Checks the header of the whole shard `data[0, size)` (`path` names it in
// errors): magic, version, width, count * width == size - 32 without
// overflow, 1 <= vocab <= 2^(8 * width). Throws FormatError.
TokenShardHeader parse_token_shard(
    const uint8_t* data, size_t size, const std::string& path);

// Whether `data[0, size)` starts with a token shard's magic (null data:
// no).
bool has_token_shard_magic(const uint8_t* data, size_t size);

// A raw token file (the common memmap format: little-endian ids of `width`
// bytes, 2 or 4, no header) of `size` bytes: a whole number of tokens, the
// vocabulary bounded by the width only. Throws FormatError naming `path`.
TokenShardHeader raw_token_file(
    size_t size, uint32_t width, const std::string& path);

// Token i of a shard whose header parse_token_shard (or raw_token_file)
// accepted (i < count).
inline uint32_t token_at(
    const uint8_t* data, const TokenShardHeader& h, uint64_t i) {
  const uint8_t* q = data + h.offset + i * h.width;
  if (h.width == 1) {
    return q[0];
  }
  uint32_t v = q[0] | (uint32_t(q[1]) << 8);
  if (h.width == 4) {
    v |= (uint32_t(q[2]) << 16) | (uint32_t(q[3]) << 24);
  }
  return v;
}

} // namespace moeyard::io
