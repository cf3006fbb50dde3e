#include "io/token_shard_format.h"

#include <cstring>

namespace moeyard::io {
namespace {

constexpr char kMagic[8] = {'M', 'O', 'E', 'Y', 'T', 'O', 'K', '1'};

uint64_t load_le(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) {
    v = (v << 8) | p[i];
  }
  return v;
}

} // namespace

bool has_token_shard_magic(const uint8_t* data, size_t size) {
  return data != nullptr && size >= sizeof(kMagic) &&
         std::memcmp(data, kMagic, sizeof(kMagic)) == 0;
}

TokenShardHeader raw_token_file(
    size_t size, uint32_t width, const std::string& path) {
  if (width != 2 && width != 4) {
    format_error(
        "raw token file ",
        path,
        ": ",
        width,
        " bytes per token, expected 2 or 4");
  }
  if (size % width != 0) {
    format_error(
        "raw token file ",
        path,
        ": ",
        size,
        " bytes is not a whole number of ",
        width,
        "-byte tokens (truncated, or another dtype)");
  }
  TokenShardHeader h;
  h.width = width;
  h.count = size / width;
  h.vocab = uint64_t(1) << (8 * width);
  h.offset = 0;
  return h;
}

TokenShardHeader parse_token_shard(
    const uint8_t* data, size_t size, const std::string& path) {
  if (size < kTokenShardHeaderBytes) {
    format_error(
        "token shard ",
        path,
        ": ",
        size,
        " bytes is smaller than the 32-byte header");
  }
  if (std::memcmp(data, kMagic, sizeof(kMagic)) != 0) {
    format_error(
        "token shard ",
        path,
        ": bad magic (expected MOEYTOK1); not a moeyard "
        "shard");
  }
  const uint64_t version = load_le(data + 8, 4);
  if (version != 1) {
    format_error("token shard ", path, ": version ", version, ", expected 1");
  }
  TokenShardHeader h;
  h.width = static_cast<uint32_t>(load_le(data + 12, 4));
  if (h.width != 1 && h.width != 2 && h.width != 4) {
    format_error(
        "token shard ",
        path,
        ": bytes per token ",
        h.width,
        ", expected 1, 2 or 4");
  }
  h.count = load_le(data + 16, 8);
  h.vocab = load_le(data + 24, 8);
  const uint64_t have = size - kTokenShardHeaderBytes;
  uint64_t need = 0;
  if (!mul_fits(h.count, h.width, &need)) {
    format_error(
        "token shard ",
        path,
        ": header says ",
        h.count,
        " tokens of ",
        h.width,
        " bytes, more than 2^64 bytes, but the file has ",
        have,
        " data bytes (corrupt)");
  }
  if (need != have) {
    format_error(
        "token shard ",
        path,
        ": header says ",
        h.count,
        " tokens of ",
        h.width,
        " bytes but the file has ",
        have,
        " data bytes (truncated or corrupt)");
  }
  // Ids are below vocab and stored in `width` bytes.
  const uint64_t max_vocab = uint64_t(1) << (8 * h.width);
  if (h.vocab < 1 || h.vocab > max_vocab) {
    format_error(
        "token shard ",
        path,
        ": vocabulary size ",
        h.vocab,
        " is impossible for ",
        h.width,
        "-byte tokens (expected 1 to ",
        max_vocab,
        ")");
  }
  return h;
}

} // namespace moeyard::io
