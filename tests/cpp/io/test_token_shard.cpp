// TokenShard and parse_token_shard on valid and crafted shards: header sizes
// that overflow, impossible vocabularies, truncation, reads out of range.
// Every error names the file; none is a crash.

#include <gtest/gtest.h>

#include <limits>

#include "bad_files.h"
#include "io/token_shard.h"

namespace {

using moeyard::io::TokenShard;
using moeyard_test::le;

std::string header(uint64_t width, uint64_t count, uint64_t vocab) {
  return "MOEYTOK1" + le(1, 4) + le(width, 4) + le(count, 8) + le(vocab, 8);
}

class TokenShardFile : public moeyard_test::BadFiles {};

TEST_F(TokenShardFile, ValidShardsReadBack) {
  const auto p2 =
      write("w2.bin", header(2, 3, 300) + le(7, 2) + le(299, 2) + le(0, 2));
  TokenShard s2(p2);
  EXPECT_EQ(s2.size(), 3);
  EXPECT_EQ(s2.vocab_size(), 300);
  const auto t = s2.read(0, 3, 300);
  EXPECT_EQ(t[0].item<int64_t>(), 7);
  EXPECT_EQ(t[1].item<int64_t>(), 299);
  EXPECT_EQ(t[2].item<int64_t>(), 0);
  const auto p4 =
      write("w4.bin", header(4, 2, 1ull << 32) + le(70000, 4) + le(5, 4));
  TokenShard s4(p4);
  EXPECT_EQ(s4.read(1, 1, 80000)[0].item<int64_t>(), 5);
  EXPECT_EQ(s4.read(0, 1, 80000)[0].item<int64_t>(), 70000);
  // An empty shard is a valid file (the trainer asks for seq_len + 1).
  EXPECT_EQ(TokenShard(write("empty.bin", header(2, 0, 1))).size(), 0);
}

// count * width wraps to the data size: 2^62 + 200 tokens of 4 bytes are
// 2^64 + 800 bytes, i.e. 800 mod 2^64. Reading them was a SIGSEGV.
TEST_F(TokenShardFile, CountTimesWidthOverflowIsAnError) {
  const auto p = write(
      "huge.bin", header(4, (1ull << 62) + 200, 256) + std::string(800, '\0'));
  MOEYARD_EXPECT_FILE_ERROR(
      p,
      "4611686018427388104 tokens of 4 bytes, more than 2^64",
      TokenShard{p});
  const auto q = write(
      "huge2.bin", header(2, (1ull << 63) + 4, 256) + std::string(8, '\0'));
  MOEYARD_EXPECT_FILE_ERROR(q, "more than 2^64 bytes", TokenShard{q});
}

TEST_F(TokenShardFile, CountMustMatchTheFile) {
  const auto p = write("trunc.bin", header(4, 10, 256) + std::string(36, '\0'));
  MOEYARD_EXPECT_FILE_ERROR(
      p, "10 tokens of 4 bytes but the file has 36 data bytes", TokenShard{p});
  const auto big = std::numeric_limits<uint64_t>::max();
  const auto q = write("max.bin", header(2, big, 256) + std::string(8, '\0'));
  MOEYARD_EXPECT_FILE_ERROR(q, "more than 2^64 bytes", TokenShard{q});
}

TEST_F(TokenShardFile, VocabularyMustFitTheTokenWidth) {
  struct Case {
    uint64_t width, vocab;
    const char* what;
  };
  for (const auto& c : std::vector<Case>{
           {2, 0, "vocabulary size 0 is impossible for 2-byte tokens"},
           {1, 257, "vocabulary size 257 is impossible for 1-byte tokens"},
           {2, 65537, "vocabulary size 65537 is impossible for 2-byte"},
           {4, (1ull << 32) + 1, "expected 1 to 4294967296"},
           // Read as int64 this was negative and passed the model check.
           {4, (1ull << 63) + 5, "vocabulary size 9223372036854775813"}}) {
    const auto p = write("v.bin", header(c.width, 1, c.vocab) + le(0, c.width));
    MOEYARD_EXPECT_FILE_ERROR(p, c.what, TokenShard{p});
  }
}

TEST_F(TokenShardFile, BadHeadersAndNonFiles) {
  auto p = write("short.bin", "MOEYTOK1");
  MOEYARD_EXPECT_FILE_ERROR(
      p, "8 bytes is smaller than the 32-byte header", TokenShard{p});
  p = write("empty.bin", "");
  MOEYARD_EXPECT_FILE_ERROR(p, "0 bytes is smaller", TokenShard{p});
  p = write("magic.bin", std::string(40, 'x'));
  MOEYARD_EXPECT_FILE_ERROR(p, "bad magic", TokenShard{p});
  auto h = header(2, 0, 256);
  h[8] = 2;
  p = write("version.bin", h);
  MOEYARD_EXPECT_FILE_ERROR(p, "version 2, expected 1", TokenShard{p});
  p = write("width.bin", header(3, 0, 256));
  MOEYARD_EXPECT_FILE_ERROR(
      p, "bytes per token 3, expected 1, 2 or 4", TokenShard{p});
  MOEYARD_EXPECT_FILE_ERROR(dir(), "not a regular file", TokenShard{dir()});
  MOEYARD_EXPECT_FILE_ERROR(
      dir() + "/none.bin", "cannot open", TokenShard{dir() + "/none.bin"});
}

TEST_F(TokenShardFile, ReadsOutsideTheShardAreErrors) {
  const auto p = write("r.bin", header(2, 4, 256) + std::string(8, '\0'));
  TokenShard s(p);
  MOEYARD_EXPECT_FILE_ERROR(
      p,
      "read of 2 tokens from position 3 is outside [0, 4)",
      s.read(3, 2, 256));
  // start + n overflows int64: was accepted, then allocated n tokens.
  const auto max = std::numeric_limits<int64_t>::max();
  MOEYARD_EXPECT_FILE_ERROR(p, "outside [0, 4)", s.read(1, max, 256));
  MOEYARD_EXPECT_FILE_ERROR(p, "outside [0, 4)", s.read(-1, 1, 256));
  const auto q = write("id.bin", header(2, 1, 300) + le(299, 2));
  MOEYARD_EXPECT_FILE_ERROR(
      q,
      "token 299 at position 0 is outside the model vocabulary (256)",
      TokenShard(q).read(0, 1, 256));
}

} // namespace
