// moeyard::Tokenizer on small hand-written tokenizer.json files: merge order,
// byte fallback, <unk>, added tokens and errors. (Parity with the `tokenizers`
// library on trained tokenizers is tested in tests/python/test_tokenizer.py.)

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "text/tokenizer.h"

namespace {

using moeyard::Tokenizer;
using Ids = std::vector<int64_t>;

// A SentencePiece-style file whose merges are given as a JSON list.
std::string sp_json(const std::string& merges) {
  return R"({
  "version": "1.0",
  "added_tokens": [
    {"id": 0, "content": "<unk>", "special": true, "normalized": false,
     "single_word": false, "lstrip": false, "rstrip": false},
    {"id": 1, "content": "</s>", "special": true, "normalized": false,
     "single_word": false, "lstrip": false, "rstrip": false}
  ],
  "normalizer": {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "▁"},
    {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
  "pre_tokenizer": null,
  "post_processor": null,
  "decoder": {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
    {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
  "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
    "fuse_unk": true, "byte_fallback": true,
    "vocab": {"<unk>": 0, "</s>": 1, "<0xE2>": 2, "<0x82>": 3, "<0xAC>": 4,
              "▁": 5, "a": 6, "b": 7, "c": 8, "ab": 9, "bc": 10, "abc": 11,
              "▁abc": 12},
    "merges": )" +
         merges + "}}";
}

Tokenizer from_temp_file(const std::string& json) {
  const auto path =
      std::filesystem::temp_directory_path() / "moeyard_test_tokenizer.json";
  std::ofstream(path) << json;
  auto t = Tokenizer::from_file(path.string());
  std::filesystem::remove(path);
  return t;
}

TEST(Tokenizer, MergesApplyByRank) {
  // "b c" first: a + bc -> "abc" needs the merge "a bc", absent here.
  auto t = from_temp_file(sp_json(R"(["b c", "a b", "ab c"])"));
  EXPECT_EQ(t.encode("abc"), (Ids{5, 6, 10}));
  // "a b" first: ab + c -> abc; the pair form of merges reads the same.
  auto u = from_temp_file(sp_json(R"([["a", "b"], ["b", "c"], ["ab", "c"]])"));
  EXPECT_EQ(u.encode("abc"), (Ids{5, 11}));
  EXPECT_EQ(u.encode("abab"), (Ids{5, 9, 9}));
  EXPECT_EQ(u.decode(u.encode("abc abc")), "abc abc");
  EXPECT_EQ(u.vocab_size(), 13);
}

TEST(Tokenizer, ByteFallbackAndUnk) {
  auto t = from_temp_file(sp_json(R"(["a b", "ab c"])"));
  // "€" is E2 82 AC: three byte tokens; "z" has neither a token nor all of
  // its bytes, so it is <unk> (consecutive ones fused).
  EXPECT_EQ(t.encode("€"), (Ids{5, 2, 3, 4}));
  EXPECT_EQ(t.decode({5, 2, 3, 4}), "€");
  EXPECT_EQ(t.decode({2, 3}), "\xEF\xBF\xBD\xEF\xBF\xBD"); // incomplete: U+FFFD
  EXPECT_EQ(t.encode("azzc"), (Ids{5, 6, 0, 8}));
  // Added tokens are cut out before normalization (so each side gets "▁").
  EXPECT_EQ(t.encode("abc</s>abc"), (Ids{5, 11, 1, 5, 11}));
  EXPECT_EQ(t.decode({5, 11, 1}), "abc");
  EXPECT_EQ(t.decode({5, 11, 1}, /*skip_special_tokens=*/false), "abc</s>");
  EXPECT_EQ(t.eos_id(), std::optional<int64_t>(1));
  EXPECT_EQ(t.token_to_id("abc"), std::optional<int64_t>(11));
}

TEST(Tokenizer, ByteLevelWithGpt2Regex) {
  // Byte-level: a space is "Ġ" (U+0120), and the GPT-2 regex splits " ab"
  // from "c!" so no merge crosses it.
  auto t = Tokenizer::from_json_string(R"({
    "normalizer": null,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false,
                      "trim_offsets": true, "use_regex": true},
    "decoder": {"type": "ByteLevel"},
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "!": 3,
              "Ġ": 4, "Ġa": 5, "Ġab": 6, "'s": 7, "'": 8, "s": 9},
              "merges": ["Ġ a", "Ġa b", "' s"]}})");
  EXPECT_EQ(t.encode(" ab!"), (Ids{6, 3}));
  EXPECT_EQ(t.encode("a's"), (Ids{0, 7}));
  EXPECT_EQ(t.decode({6, 3, 4}), " ab! ");
  EXPECT_EQ(t.kind(), "byte-level BPE");
}

TEST(Tokenizer, ErrorsNameFileFieldAndValue) {
  const auto expect_error = [](const std::string& json, const char* needle) {
    try {
      Tokenizer::from_json_string(json, "t.json");
      ADD_FAILURE() << "no error for " << needle;
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
          << e.what();
      EXPECT_NE(std::string(e.what()).find("t.json"), std::string::npos);
    }
  };
  expect_error(
      R"({"model": {"type": "WordPiece", "vocab": {}}})",
      "model.type: unsupported model \"WordPiece\"");
  expect_error(
      R"({"model": {"type": "BPE", "vocab": {"a": 0}}})",
      "model.merges: missing");
  expect_error(
      R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}})",
      "model.merges[0]");
  expect_error(
      R"({"normalizer": {"type": "Lowercase"},
          "model": {"type": "BPE", "vocab": {}, "merges": []}})",
      "normalizer.type: unsupported normalizer \"Lowercase\"");
  EXPECT_THROW(
      Tokenizer::from_file("/nonexistent/tokenizer.json"), std::runtime_error);
}

} // namespace
