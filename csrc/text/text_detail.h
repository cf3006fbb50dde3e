#pragma once
// Internal to csrc/text: UTF-8 helpers, errors, PCRE2 regexes, the splitting
// of normalized strings (tokenizers' NormalizedString::split), patterns and
// GPT-2's byte-level alphabet, shared by tokenizer_load.cpp and
// tokenizer.cpp.

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <array>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace moeyard::text_detail {

using json = nlohmann::json;

// ---- UTF-8 ------------------------------------------------------------------

// Length of the UTF-8 sequence starting at s[i] (text is validated first).
size_t char_len(const std::string& s, size_t i);
// The code point at s[i].
uint32_t code_point(const std::string& s, size_t i);
// UTF-8 bytes of a code point.
std::string utf8(uint32_t cp);
// Length of the valid UTF-8 sequence at b[i], 0 if invalid.
size_t valid_seq(const std::string& b, size_t i);
// Invalid sequences replaced by U+FFFD (Rust's from_utf8_lossy).
std::string from_utf8_lossy(const std::string& b);
bool is_valid_utf8(const std::string& s);

// ---- errors -----------------------------------------------------------------

[[noreturn]] void fail(
    const std::string& file, const std::string& field, const std::string& msg);
// A JSON value shortened for messages.
std::string dump(const json& v);

// ---- PCRE2
// --------------------------------------------------------------------

class Regex {
 public:
  Regex(
      const std::string& pattern,
      const std::string& file,
      const std::string& field) {
    auto* ctx = pcre2_compile_context_create(nullptr);
    // \uHHHH and \u{...} as in Oniguruma, which `tokenizers` uses.
    pcre2_set_compile_extra_options(ctx, PCRE2_EXTRA_ALT_BSUX);
    int err = 0;
    PCRE2_SIZE off = 0;
    auto* code = pcre2_compile(
        reinterpret_cast<PCRE2_SPTR>(pattern.data()),
        pattern.size(),
        PCRE2_UTF | PCRE2_UCP | PCRE2_ALT_BSUX,
        &err,
        &off,
        ctx);
    pcre2_compile_context_free(ctx);
    if (code == nullptr) {
      PCRE2_UCHAR buf[256];
      pcre2_get_error_message(err, buf, sizeof(buf));
      fail(
          file,
          field,
          "regex " + dump(pattern) +
              " does not compile (PCRE2: " + reinterpret_cast<char*>(buf) +
              " at offset " + std::to_string(off) + ")");
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE); // best effort
    code_.reset(code, pcre2_code_free);
  }

  // Non-overlapping matches [start, end) left to right. An empty match right
  // where the previous match ended is skipped by moving one character on (as
  // the onig crate's find_iter does).
  std::vector<std::pair<size_t, size_t>> find_all(const std::string& s) const {
    std::vector<std::pair<size_t, size_t>> out;
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> md(
        pcre2_match_data_create_from_pattern(code_.get(), nullptr),
        pcre2_match_data_free);
    size_t pos = 0;
    std::optional<size_t> last_end;
    while (pos <= s.size()) {
      const int rc = pcre2_match(
          code_.get(),
          reinterpret_cast<PCRE2_SPTR>(s.data()),
          s.size(),
          pos,
          PCRE2_NO_UTF_CHECK,
          md.get(),
          nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) {
        break;
      }
      if (rc < 0) {
        throw std::runtime_error(
            "tokenizer: regex match failed (PCRE2 error " + std::to_string(rc) +
            ")");
      }
      const auto* ov = pcre2_get_ovector_pointer(md.get());
      const size_t a = ov[0], b = ov[1];
      if (a == b && last_end && *last_end == b) {
        pos += pos < s.size() ? char_len(s, pos) : 1;
        continue;
      }
      out.emplace_back(a, b);
      pos = b;
      last_end = b;
    }
    return out;
  }

 private:
  std::shared_ptr<pcre2_code> code_;
};

// ---- splitting (tokenizers' NormalizedString::split)
// --------------------------

enum class Behavior {
  kRemoved,
  kIsolated,
  kMergedWithPrevious,
  kMergedWithNext,
  kContiguous
};

using Segments = std::vector<std::pair<std::pair<size_t, size_t>, bool>>;

// Matches -> (span, is_match) segments covering s.
Segments segments_of(
    const std::string& s,
    const std::vector<std::pair<size_t, size_t>>& matches);
std::vector<std::string> split_by(
    const std::string& s, Segments seg, Behavior behavior, bool invert);
std::vector<std::pair<size_t, size_t>> find_literal(
    const std::string& s, const std::string& lit);

// A pattern field: {"String": s} or {"Regex": r}.
struct Pattern {
  std::string literal;
  std::shared_ptr<Regex> regex;

  static Pattern parse(
      const json& j, const std::string& file, const std::string& field) {
    Pattern p;
    if (j.is_object() && j.contains("String")) {
      p.literal = j.at("String").get<std::string>();
    } else if (j.is_object() && j.contains("Regex")) {
      p.regex = std::make_shared<Regex>(
          j.at("Regex").get<std::string>(), file, field);
    } else {
      fail(
          file,
          field,
          "expected {\"String\": ...} or {\"Regex\": ...}, got " + dump(j));
    }
    return p;
  }
  std::vector<std::pair<size_t, size_t>> find(const std::string& s) const {
    return regex ? regex->find_all(s) : find_literal(s, literal);
  }
  std::string replace(const std::string& s, const std::string& with) const {
    std::string out;
    size_t prev = 0;
    for (const auto& [a, b] : find(s)) {
      out.append(s, prev, a - prev);
      out += with;
      prev = b;
    }
    out.append(s, prev, std::string::npos);
    return out;
  }
};

// ---- byte-level alphabet (GPT-2's bytes_to_unicode)
// ---------------------------

struct ByteAlphabet {
  std::array<std::string, 256> to_char;
  std::unordered_map<uint32_t, uint8_t> to_byte;
  ByteAlphabet() {
    uint32_t n = 0;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') ||
                             (b >= 0xA1 && b <= 0xAC) ||
                             (b >= 0xAE && b <= 0xFF);
      const uint32_t cp = printable ? b : 256 + n++;
      to_char[b] = utf8(cp);
      to_byte[cp] = static_cast<uint8_t>(b);
    }
  }
};

const ByteAlphabet& byte_alphabet();

// GPT-2's pre-tokenizer regex (ByteLevel with use_regex).
extern const char* const kGpt2Pattern;

} // namespace moeyard::text_detail
