// TokenCorpus against counting by hand: windows never cross files, draws
// without weights are uniform over every window, with weights the sources
// get their shares; raw token files beside moeyard shards; globs; errors
// name the key and the file.

#include <gtest/gtest.h>

#include <map>

#include "bad_files.h"
#include "io/token_corpus.h"

namespace {

using moeyard::io::CorpusSource;
using moeyard::io::TokenCorpus;
using moeyard_test::le;

// A moeyard shard of `n` tokens, every one `value`.
std::string shard(uint64_t n, uint64_t value) {
  std::string s = "MOEYTOK1" + le(1, 4) + le(2, 4) + le(n, 8) + le(256, 8);
  for (uint64_t i = 0; i < n; ++i) {
    s += le(value, 2);
  }
  return s;
}

// A raw uint16 file of `n` tokens, every one `value`.
std::string raw(uint64_t n, uint64_t value) {
  std::string s;
  for (uint64_t i = 0; i < n; ++i) {
    s += le(value, 2);
  }
  return s;
}

class Corpus : public moeyard_test::BadFiles {
 protected:
  // The shares of draws whose window holds `value`, over `n` draws of a
  // simple generator.
  std::map<int64_t, double> shares(const TokenCorpus& c, int n) {
    std::map<int64_t, double> count;
    uint64_t state = 12345;
    auto next = [&state] {
      state ^= state >> 12, state ^= state << 25, state ^= state >> 27;
      return state * 2685821657736338717ull;
    };
    for (int i = 0; i < n; ++i) {
      const uint64_t r = next(), pick = next();
      const auto w = c.window(c.random_position(r, pick), 256);
      // Every window lies in one file: all its tokens are that file's.
      EXPECT_EQ(w.min().item<int64_t>(), w.max().item<int64_t>());
      count[w[0].item<int64_t>()] += 1.0 / n;
    }
    return count;
  }
};

TEST_F(Corpus, WindowsStayInsideFilesAndDrawByWindows) {
  // Windows of 4 tokens: 100 - 4 = 96 and 36 - 4 = 32 starts.
  const auto a = write("a.bin", shard(100, 1));
  const auto b = write("b.bin", raw(36, 2));
  TokenCorpus c({{a, 0}, {b, 0}}, 2, 4, "data.train");
  EXPECT_EQ(c.windows(), 96 + 32);
  EXPECT_FALSE(c.weighted());
  EXPECT_EQ(c.window(95, 256)[3].item<int64_t>(), 1);
  EXPECT_EQ(c.window(96, 256)[0].item<int64_t>(), 2);
  const auto s = shares(c, 20000);
  EXPECT_NEAR(s.at(1), 96.0 / 128, 0.02);
  EXPECT_NEAR(s.at(2), 32.0 / 128, 0.02);
}

TEST_F(Corpus, WeightsSetTheSourcesShares) {
  const auto a = write("a.bin", shard(100, 1));
  write("b1.bin", shard(20, 2));
  write("b2.bin", shard(500, 2));
  TokenCorpus c({{a, 0.25}, {dir() + "/b*.bin", 0.75}}, 0, 4, "data.train");
  EXPECT_TRUE(c.weighted());
  EXPECT_EQ(c.files().size(), 3u);
  const auto s = shares(c, 20000);
  EXPECT_NEAR(s.at(1), 0.25, 0.02);
  EXPECT_NEAR(s.at(2), 0.75, 0.02);
}

TEST_F(Corpus, GlobsLeaveLossMasksToTheirShards) {
  write("m.bin", shard(50, 3));
  std::string mask = "MOEYTOK1" + le(1, 4) + le(1, 4) + le(50, 8) + le(2, 8);
  for (int i = 0; i < 50; ++i) {
    mask += static_cast<char>(i % 2);
  }
  write("m.mask.bin", mask);
  TokenCorpus c({{dir() + "/m*.bin", 0}}, 0, 4, "data.train");
  ASSERT_EQ(c.files().size(), 1u);
  EXPECT_TRUE(c.has_loss_masks());
  EXPECT_EQ(c.loss_mask(1)[0].item<int64_t>(), 1);
  EXPECT_EQ(c.loss_mask(2)[0].item<int64_t>(), 0);
}

TEST_F(Corpus, ErrorsNameTheKeyAndFile) {
  const auto a = write("a.bin", shard(100, 1));
  const auto r = write("r.bin", raw(50, 1));
  const auto expect_error = [](auto&& f, const std::string& part) {
    try {
      f();
      ADD_FAILURE() << "no error; expected: " << part;
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos)
          << e.what();
    }
  };
  expect_error(
      [&] {
        TokenCorpus({{dir() + "/none*.bin", 0}}, 0, 4, "data.train");
      },
      "data.train: the glob '" + dir() + "/none*.bin' matches no file");
  expect_error(
      [&] {
        TokenCorpus({{a, 1}, {a, 0}}, 0, 4, "data.train");
      },
      "data.train: 1 of 2 sources have a weight");
  expect_error(
      [&] {
        TokenCorpus({{a, 0}}, 0, 100, "data.valid");
      },
      "data.valid (" + a +
          ") has 100 tokens, fewer than data.seq_len + 1 = 101");
  expect_error(
      [&] {
        TokenCorpus({{r, 0}}, 0, 4, "data.train");
      },
      "needs data.raw_dtype: uint16 or uint32");
  expect_error(
      [&] {
        TokenCorpus(
            {{write("odd.bin", raw(5, 1) + "x"), 0}}, 2, 4, "data.train");
      },
      "11 bytes is not a whole number of 2-byte tokens");
}

} // namespace
