#pragma once
// A Hugging Face `tokenizer.json` loaded in C++: the BPE tokenizers of open
// MoE checkpoints, encoding and decoding exactly as the `tokenizers` library
// does (tests/python/test_tokenizer.py compares the two).
//
// Supported:
//   model          BPE (merges as "a b" strings or ["a", "b"] pairs,
//                  byte_fallback, unk_token, fuse_unk, ignore_merges)
//   normalizer     null, NFC (see below), Prepend, Replace, Sequence
//   pre_tokenizer  null, ByteLevel, Split (String or Regex, every behavior,
//                  invert), Metaspace, Digits, Whitespace, WhitespaceSplit,
//                  Sequence
//   decoder        null, ByteLevel, Metaspace, Replace, ByteFallback, Fuse,
//                  Strip, BPEDecoder, Sequence
//   post_processor null, ByteLevel, TemplateProcessing, Sequence (only the
//                  single-sequence template is used)
//   added_tokens   matched literally (leftmost longest, lstrip/rstrip) before
//                  the model runs.
// Regexes run through PCRE2 (UTF + UCP). NFC is not implemented: a tokenizer
// with an NFC normalizer accepts only text that NFC provably leaves unchanged
// (ASCII, Latin, Greek, Cyrillic, CJK, kana, Hangul syllables, symbols,
// emoji, without combining marks) and refuses other text with an error.
// Anything else in the file (another model type, an unknown normalizer, ...)
// is an error naming the file, the JSON field and the value.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace moeyard {

class Tokenizer {
 public:
  static Tokenizer from_file(const std::string& path);
  static Tokenizer from_json_string(
      const std::string& json, const std::string& name = "<string>");

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Token ids of `text`. add_special_tokens adds what the post-processor's
  // single-sequence template adds (e.g. Llama's BOS); the default matches
  // `tokenizers`' encode(text, add_special_tokens=False).
  std::vector<int64_t> encode(
      const std::string& text, bool add_special_tokens = false) const;
  // Text of `ids` (unknown ids are skipped, like `tokenizers`).
  std::string decode(
      const std::vector<int64_t>& ids, bool skip_special_tokens = true) const;
  // 1 + the largest id of the vocabulary and the added tokens.
  int64_t vocab_size() const;
  // The id of a token (vocabulary or added), if any.
  std::optional<int64_t> token_to_id(const std::string& token) const;
  // The first token the single-sequence template adds, if it adds one first.
  std::optional<int64_t> bos_id() const;
  // The end-of-sequence token: the last token the single-sequence template
  // appends, else a special added token with a well-known EOS name
  // (</s>, <|endoftext|>, <|end_of_text|>, <｜end▁of▁sentence｜>, ...).
  std::optional<int64_t> eos_id() const;
  // "byte-level BPE" or "SentencePiece-style BPE" (for logs).
  std::string kind() const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

} // namespace moeyard
