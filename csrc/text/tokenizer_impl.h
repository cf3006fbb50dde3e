#pragma once
// Internal to csrc/text: the tokenizer pipeline's state (tokenizer.json
// parsed into it by tokenizer_load*.cpp, run by tokenizer.cpp to encode and
// tokenizer_decode.cpp to decode).

#include <optional>

#include "text/text_detail.h"
#include "text/tokenizer.h"

namespace moeyard {

struct Tokenizer::Impl {
  using json = text_detail::json;
  using Pattern = text_detail::Pattern;
  using Behavior = text_detail::Behavior;
  using Regex = text_detail::Regex;

  std::string file;

  struct Norm {
    // kUnicode: a Unicode normalization form (text: NFC, NFD, NFKC or
    // NFKD), applied by utf8proc with the options in `form`.
    enum Kind { kUnicode, kPrepend, kReplace } kind;
    std::string text;
    Pattern pattern;
    int form = 0;
  };
  std::vector<Norm> normalizers;

  struct Pre {
    enum Kind { kByteLevel, kSplit, kMetaspace, kDigits } kind;
    bool add_prefix_space = false, use_regex = true; // ByteLevel
    Pattern pattern; // Split
    Behavior behavior = Behavior::kIsolated;
    bool invert = false;
    std::string replacement; // Metaspace
    std::string prepend_scheme = "always";
    bool split = true;
    bool individual_digits = false; // Digits
  };
  std::vector<Pre> pre_tokenizers;
  std::shared_ptr<Regex> gpt2;

  struct Dec {
    enum Kind {
      kByteLevel,
      kMetaspace,
      kReplace,
      kByteFallback,
      kBpe,
      kFuse,
      kStrip
    } kind;
    Pattern pattern;
    std::string text; // Replace content, Strip content, Metaspace replacement
    bool prepend = true; // Metaspace
    size_t start = 0, stop = 0; // Strip
  };
  std::vector<Dec> decoders;
  bool has_decoder = false;

  // BPE
  std::unordered_map<std::string, int64_t> vocab;
  std::unordered_map<uint64_t, std::pair<int64_t, int64_t>> merges; // rank,id
  std::optional<std::string> unk_token;
  bool fuse_unk = false, byte_fallback = false, ignore_merges = false;
  std::array<int64_t, 256> byte_ids{};

  struct Added {
    std::string content;
    std::string match; // content, normalized when `normalized`
    int64_t id;
    bool special, normalized, lstrip, rstrip;
  };
  std::vector<Added> added;
  std::unordered_map<int64_t, std::string> id_to_added;
  std::vector<std::string> id_to_token; // the model's vocabulary
  std::vector<int64_t> prefix, suffix; // single-sequence template
  std::optional<int64_t> eos;
  bool byte_level = false;
  int64_t size = 0;

  // -- loading (tokenizer_load.cpp, tokenizer_load_pipeline.cpp) --
  // A token id read from the file at `field`: an integer in [0, 2^24).
  static int64_t token_id(
      const json& v, const std::string& file, const std::string& field);
  void parse_normalizer(const json& j, const std::string& field);
  void parse_pre_tokenizer(const json& j, const std::string& field);
  void parse_decoder(const json& j, const std::string& field);
  void parse_post_processor(const json& j, const std::string& field);
  void parse_model(const json& m);

  // -- running (tokenizer.cpp: encoding; tokenizer_decode.cpp: decoding) --
  static uint64_t key(int64_t a, int64_t b);
  // -- encoding --
  // Splits pieces at added tokens (only those with the given `normalized`
  // flag), leftmost longest. Tokens become ids in `out` order via callback.
  void split_added(
      const std::string& text,
      bool normalized,
      const std::function<void(const std::string&, bool)>& on_text,
      const std::function<void(int64_t)>& on_token) const;
  std::string normalize(const std::string& s) const;
  struct Piece {
    std::string text;
    bool at_start;
  };
  std::vector<Piece> pre_tokenize(const std::string& s, bool at_start) const;
  int64_t unk_id() const;
  void bpe(const std::string& word, std::vector<int64_t>& out) const;
  // -- decoding --
  std::vector<std::string> decode_chain(std::vector<std::string> toks) const;
};

} // namespace moeyard
