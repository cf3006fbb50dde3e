#include "text/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

namespace moeyard {
namespace {

using json = nlohmann::json;

// ---- UTF-8 ------------------------------------------------------------------

// Length of the UTF-8 sequence starting at s[i] (text is validated first).
size_t char_len(const std::string& s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
}

uint32_t code_point(const std::string& s, size_t i) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data()) + i;
  switch (char_len(s, i)) {
    case 1:
      return p[0];
    case 2:
      return ((p[0] & 0x1Fu) << 6) | (p[1] & 0x3Fu);
    case 3:
      return ((p[0] & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3Fu);
    default:
      return ((p[0] & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12) |
             ((p[2] & 0x3Fu) << 6) | (p[3] & 0x3Fu);
  }
}

std::string utf8(uint32_t cp) {
  std::string out;
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return out;
}

// Length of the valid UTF-8 sequence at b[i], or 0 when it is invalid.
size_t valid_seq(const std::string& b, size_t i) {
  const auto u = [&](size_t k) {
    return k < b.size() ? static_cast<unsigned char>(b[k]) : 0x100u;
  };
  const unsigned c = u(i);
  if (c < 0x80) {
    return 1;
  }
  size_t n;
  unsigned lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    lo = c == 0xE0 ? 0xA0 : 0x80;
    hi = c == 0xED ? 0x9F : 0xBF;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    lo = c == 0xF0 ? 0x90 : 0x80;
    hi = c == 0xF4 ? 0x8F : 0xBF;
  } else {
    return 0;
  }
  for (size_t k = 1; k < n; ++k) {
    const unsigned d = u(i + k);
    if (d < (k == 1 ? lo : 0x80) || d > (k == 1 ? hi : 0xBF)) {
      return 0;
    }
  }
  return n;
}

// Bytes to text replacing each maximal invalid subpart with U+FFFD (Rust's
// String::from_utf8_lossy, Python's errors="replace").
std::string from_utf8_lossy(const std::string& b) {
  std::string out;
  size_t i = 0;
  while (i < b.size()) {
    if (size_t n = valid_seq(b, i)) {
      out.append(b, i, n);
      i += n;
      continue;
    }
    // Skip the longest prefix of a valid sequence (at least one byte).
    size_t skip = 1;
    const unsigned c = static_cast<unsigned char>(b[i]);
    size_t need = (c >= 0xC2 && c <= 0xDF)   ? 2
                  : (c >= 0xE0 && c <= 0xEF) ? 3
                  : (c >= 0xF0 && c <= 0xF4) ? 4
                                             : 1;
    for (size_t k = 1; k < need && i + k < b.size(); ++k) {
      const unsigned d = static_cast<unsigned char>(b[i + k]);
      unsigned lo = 0x80, hi = 0xBF;
      if (k == 1) {
        lo = c == 0xE0 ? 0xA0 : c == 0xF0 ? 0x90 : 0x80;
        hi = c == 0xED ? 0x9F : c == 0xF4 ? 0x8F : 0xBF;
      }
      if (d < lo || d > hi) {
        break;
      }
      skip = k + 1;
    }
    out += "\xEF\xBF\xBD";
    i += skip;
  }
  return out;
}

bool is_valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const size_t n = valid_seq(s, i);
    if (n == 0) {
      return false;
    }
    i += n;
  }
  return true;
}

// True when NFC provably leaves the character unchanged in any context: the
// ranges hold only characters with NFC_Quick_Check=Yes and canonical
// combining class 0 (no combining marks, no Hangul jamo, no singletons or
// composition exclusions).
bool nfc_invariant(uint32_t c) {
  static const std::pair<uint32_t, uint32_t> kRanges[] = {
      {0x0000, 0x02FF}, {0x0370, 0x0373},   {0x0375, 0x037D},
      {0x037F, 0x0386}, {0x0388, 0x03FF},   {0x0400, 0x0482},
      {0x048A, 0x052F}, {0x1E00, 0x1EFF},   {0x2002, 0x20CF},
      {0x2100, 0x2125}, {0x2127, 0x2129},   {0x212C, 0x2328},
      {0x232B, 0x2ADB}, {0x2ADD, 0x2BFF},   {0x3000, 0x3029},
      {0x3030, 0x3098}, {0x309B, 0x33FF},   {0x3400, 0x4DBF},
      {0x4E00, 0x9FFF}, {0xAC00, 0xD7A3},   {0xFE00, 0xFE0F},
      {0xFF00, 0xFFEF}, {0x1F000, 0x1FAFF}, {0x20000, 0x2EBEF},
  };
  for (const auto& [lo, hi] : kRanges) {
    if (c >= lo && c <= hi) {
      return true;
    }
  }
  return false;
}

// ---- errors
// -------------------------------------------------------------------

[[noreturn]] void fail(
    const std::string& file, const std::string& field, const std::string& msg) {
  throw std::runtime_error(
      "tokenizer " + file + ": " + field + (field.empty() ? "" : ": ") + msg);
}

std::string dump(const json& v) {
  auto s = v.dump();
  return s.size() > 120 ? s.substr(0, 117) + "..." : s;
}

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
    const std::vector<std::pair<size_t, size_t>>& matches) {
  Segments seg;
  size_t prev = 0;
  for (const auto& [a, b] : matches) {
    if (prev != a) {
      seg.push_back({{prev, a}, false});
    }
    seg.push_back({{a, b}, true});
    prev = b;
  }
  if (prev != s.size()) {
    seg.push_back({{prev, s.size()}, false});
  }
  return seg;
}

std::vector<std::string> split_by(
    const std::string& s, Segments seg, Behavior behavior, bool invert) {
  if (invert) {
    for (auto& x : seg) {
      x.second = !x.second;
    }
  }
  Segments out;
  bool previous_match = false;
  switch (behavior) {
    case Behavior::kIsolated:
      out = seg;
      break;
    case Behavior::kRemoved:
      for (const auto& x : seg) {
        if (!x.second) {
          out.push_back(x);
        }
      }
      break;
    case Behavior::kMergedWithPrevious:
      for (const auto& x : seg) {
        if (x.second && !previous_match && !out.empty()) {
          out.back().first.second = x.first.second;
        } else {
          out.push_back({x.first, false});
        }
        previous_match = x.second;
      }
      break;
    case Behavior::kMergedWithNext:
      for (auto it = seg.rbegin(); it != seg.rend(); ++it) {
        if (it->second && !previous_match && !out.empty()) {
          out.back().first.first = it->first.first;
        } else {
          out.push_back({it->first, false});
        }
        previous_match = it->second;
      }
      std::reverse(out.begin(), out.end());
      break;
    case Behavior::kContiguous:
      for (size_t i = 0; i < seg.size(); ++i) {
        if (i > 0 && seg[i].second == previous_match) {
          out.back().first.second = seg[i].first.second;
        } else {
          out.push_back({seg[i].first, false});
        }
        previous_match = seg[i].second;
      }
      break;
  }
  std::vector<std::string> pieces;
  for (const auto& x : out) {
    if (x.first.second > x.first.first) {
      pieces.push_back(s.substr(x.first.first, x.first.second - x.first.first));
    }
  }
  return pieces;
}

std::vector<std::pair<size_t, size_t>> find_literal(
    const std::string& s, const std::string& lit) {
  std::vector<std::pair<size_t, size_t>> out;
  if (lit.empty()) {
    return out;
  }
  for (size_t p = s.find(lit); p != std::string::npos;
       p = s.find(lit, p + lit.size())) {
    out.emplace_back(p, p + lit.size());
  }
  return out;
}

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

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet a;
  return a;
}

const char* kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|"
    "\\s+(?!\\S)|\\s+";

} // namespace

// ---- the pipeline
// -------------------------------------------------------------

struct Tokenizer::Impl {
  std::string file;

  struct Norm {
    enum Kind { kNfc, kPrepend, kReplace } kind;
    std::string text;
    Pattern pattern;
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

  // -- loading --

  void parse_normalizer(const json& j, const std::string& field) {
    if (j.is_null()) {
      return;
    }
    const auto type = j.value("type", std::string());
    if (type == "Sequence") {
      const auto& list = j.at("normalizers");
      for (size_t i = 0; i < list.size(); ++i) {
        parse_normalizer(
            list[i], field + ".normalizers[" + std::to_string(i) + "]");
      }
    } else if (type == "NFC") {
      normalizers.push_back({Norm::kNfc, "", {}});
    } else if (type == "Prepend") {
      normalizers.push_back(
          {Norm::kPrepend, j.at("prepend").get<std::string>(), {}});
    } else if (type == "Replace") {
      normalizers.push_back(
          {Norm::kReplace,
           j.at("content").get<std::string>(),
           Pattern::parse(j.at("pattern"), file, field + ".pattern")});
    } else {
      fail(
          file,
          field + ".type",
          "unsupported normalizer " + dump(type) +
              " (supported: NFC, Prepend, Replace, Sequence)");
    }
  }

  void parse_pre_tokenizer(const json& j, const std::string& field) {
    if (j.is_null()) {
      return;
    }
    const auto type = j.value("type", std::string());
    Pre p{};
    if (type == "Sequence") {
      const auto& list = j.at("pretokenizers");
      for (size_t i = 0; i < list.size(); ++i) {
        parse_pre_tokenizer(
            list[i], field + ".pretokenizers[" + std::to_string(i) + "]");
      }
      return;
    } else if (type == "ByteLevel") {
      p.kind = Pre::kByteLevel;
      p.add_prefix_space = j.value("add_prefix_space", false);
      p.use_regex = j.value("use_regex", true);
      byte_level = true;
      if (p.use_regex && !gpt2) {
        gpt2 = std::make_shared<Regex>(kGpt2Pattern, file, field);
      }
    } else if (type == "Split") {
      p.kind = Pre::kSplit;
      p.pattern = Pattern::parse(j.at("pattern"), file, field + ".pattern");
      const auto b = j.at("behavior").get<std::string>();
      static const std::pair<const char*, Behavior> kBehaviors[] = {
          {"Removed", Behavior::kRemoved},
          {"Isolated", Behavior::kIsolated},
          {"MergedWithPrevious", Behavior::kMergedWithPrevious},
          {"MergedWithNext", Behavior::kMergedWithNext},
          {"Contiguous", Behavior::kContiguous}};
      bool found = false;
      for (const auto& [name, value] : kBehaviors) {
        if (b == name) {
          p.behavior = value;
          found = true;
        }
      }
      if (!found) {
        fail(file, field + ".behavior", "unknown behavior " + dump(b));
      }
      p.invert = j.value("invert", false);
    } else if (type == "Metaspace") {
      p.kind = Pre::kMetaspace;
      p.replacement = j.value("replacement", std::string("\xE2\x96\x81"));
      if (j.contains("prepend_scheme")) {
        p.prepend_scheme = j.at("prepend_scheme").get<std::string>();
      } else {
        p.prepend_scheme =
            j.value("add_prefix_space", true) ? "always" : "never";
      }
      if (p.prepend_scheme != "always" && p.prepend_scheme != "first" &&
          p.prepend_scheme != "never") {
        fail(
            file,
            field + ".prepend_scheme",
            "unknown value " + dump(p.prepend_scheme));
      }
      p.split = j.value("split", true);
    } else if (type == "Whitespace" || type == "WhitespaceSplit") {
      // Keeps the matches of \w+|[^\w\s]+ (Whitespace) or \S+ (split on
      // whitespace), dropping the rest.
      p.kind = Pre::kSplit;
      p.pattern.regex = std::make_shared<Regex>(
          type == "Whitespace" ? "\\w+|[^\\w\\s]+" : "\\S+", file, field);
      p.behavior = Behavior::kRemoved;
      p.invert = true;
    } else if (type == "Digits") {
      p.kind = Pre::kDigits;
      p.individual_digits = j.value("individual_digits", false);
    } else {
      fail(
          file,
          field + ".type",
          "unsupported pre-tokenizer " + dump(type) +
              " (supported: ByteLevel, Split, Metaspace, Digits, Whitespace, "
              "WhitespaceSplit, Sequence)");
    }
    pre_tokenizers.push_back(std::move(p));
  }

  void parse_decoder(const json& j, const std::string& field) {
    if (j.is_null()) {
      return;
    }
    has_decoder = true;
    const auto type = j.value("type", std::string());
    Dec d{};
    if (type == "Sequence") {
      const auto& list = j.at("decoders");
      for (size_t i = 0; i < list.size(); ++i) {
        parse_decoder(list[i], field + ".decoders[" + std::to_string(i) + "]");
      }
      return;
    } else if (type == "ByteLevel") {
      d.kind = Dec::kByteLevel;
    } else if (type == "Metaspace") {
      d.kind = Dec::kMetaspace;
      d.text = j.value("replacement", std::string("\xE2\x96\x81"));
      d.prepend = j.contains("prepend_scheme")
                      ? j.at("prepend_scheme").get<std::string>() != "never"
                      : j.value("add_prefix_space", true);
    } else if (type == "Replace") {
      d.kind = Dec::kReplace;
      d.pattern = Pattern::parse(j.at("pattern"), file, field + ".pattern");
      d.text = j.at("content").get<std::string>();
    } else if (type == "BPEDecoder") {
      d.kind = Dec::kBpe;
      d.text = j.value("suffix", std::string("</w>"));
    } else if (type == "ByteFallback") {
      d.kind = Dec::kByteFallback;
    } else if (type == "Fuse") {
      d.kind = Dec::kFuse;
    } else if (type == "Strip") {
      d.kind = Dec::kStrip;
      d.text = j.at("content").get<std::string>();
      d.start = j.value("start", 0);
      d.stop = j.value("stop", 0);
    } else {
      fail(
          file,
          field + ".type",
          "unsupported decoder " + dump(type) +
              " (supported: ByteLevel, Metaspace, Replace, ByteFallback, "
              "BPEDecoder, Fuse, Strip, Sequence)");
    }
    decoders.push_back(std::move(d));
  }

  void parse_post_processor(const json& j, const std::string& field) {
    if (j.is_null()) {
      return;
    }
    const auto type = j.value("type", std::string());
    if (type == "Sequence") {
      const auto& list = j.at("processors");
      for (size_t i = 0; i < list.size(); ++i) {
        parse_post_processor(
            list[i], field + ".processors[" + std::to_string(i) + "]");
      }
    } else if (type == "ByteLevel") {
      // Offsets only.
    } else if (type == "TemplateProcessing") {
      bool seen_a = false;
      for (const auto& piece : j.at("single")) {
        if (piece.contains("Sequence")) {
          seen_a = true;
          continue;
        }
        const auto name = piece.at("SpecialToken").at("id").get<std::string>();
        const auto& st = j.at("special_tokens");
        if (!st.contains(name)) {
          fail(
              file,
              field + ".special_tokens",
              "template token " + dump(name) + " is not defined");
        }
        for (const auto& id : st.at(name).at("ids")) {
          (seen_a ? suffix : prefix).push_back(id.get<int64_t>());
        }
      }
    } else {
      fail(
          file,
          field + ".type",
          "unsupported post-processor " + dump(type) +
              " (supported: TemplateProcessing, ByteLevel, Sequence)");
    }
  }

  void parse_model(const json& m) {
    const auto type =
        m.value("type", std::string(m.contains("merges") ? "BPE" : ""));
    if (type != "BPE") {
      fail(
          file,
          "model.type",
          "unsupported model " + dump(type) + " (only BPE is supported)");
    }
    if (m.contains("dropout") && !m.at("dropout").is_null() &&
        m.at("dropout").get<double>() > 0) {
      fail(
          file,
          "model.dropout",
          "BPE dropout is not supported, got " + dump(m.at("dropout")));
    }
    for (const char* key :
         {"continuing_subword_prefix", "end_of_word_suffix"}) {
      if (m.contains(key) && !m.at(key).is_null() &&
          !m.at(key).get<std::string>().empty()) {
        fail(
            file,
            std::string("model.") + key,
            "is not supported, got " + dump(m.at(key)));
      }
    }
    if (!m.contains("vocab") || !m.at("vocab").is_object()) {
      fail(file, "model.vocab", "missing (expected an object token -> id)");
    }
    if (!m.contains("merges") || !m.at("merges").is_array()) {
      fail(file, "model.merges", "missing (expected a list of merges)");
    }
    for (const auto& [tok, id] : m.at("vocab").items()) {
      vocab[tok] = id.get<int64_t>();
    }
    if (m.contains("unk_token") && !m.at("unk_token").is_null()) {
      unk_token = m.at("unk_token").get<std::string>();
    }
    fuse_unk = m.value("fuse_unk", false);
    byte_fallback = m.value("byte_fallback", false);
    ignore_merges = m.value("ignore_merges", false);
    const auto& list = m.at("merges");
    for (size_t r = 0; r < list.size(); ++r) {
      const auto& e = list[r];
      std::string a, b;
      if (e.is_string()) {
        const auto s = e.get<std::string>();
        const auto sp = s.find(' ');
        if (sp == std::string::npos) {
          fail(
              file,
              "model.merges[" + std::to_string(r) + "]",
              "expected \"a b\", got " + dump(e));
        }
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else if (e.is_array() && e.size() == 2) {
        a = e[0].get<std::string>();
        b = e[1].get<std::string>();
      } else {
        fail(
            file,
            "model.merges[" + std::to_string(r) + "]",
            "expected \"a b\" or [\"a\", \"b\"], got " + dump(e));
      }
      const auto ia = vocab.find(a), ib = vocab.find(b),
                 iab = vocab.find(a + b);
      if (ia == vocab.end() || ib == vocab.end() || iab == vocab.end()) {
        fail(
            file,
            "model.merges[" + std::to_string(r) + "]",
            "merge " + dump(e) + " uses a token missing from model.vocab");
      }
      merges.emplace(
          key(ia->second, ib->second),
          std::make_pair(static_cast<int64_t>(r), iab->second));
    }
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      const auto it = vocab.find(name);
      byte_ids[b] = it == vocab.end() ? -1 : it->second;
    }
  }

  static uint64_t key(int64_t a, int64_t b) {
    return (static_cast<uint64_t>(a) << 32) | static_cast<uint64_t>(b);
  }

  // -- encoding --

  // Splits pieces at added tokens (only those with the given `normalized`
  // flag), leftmost longest. Tokens become ids in `out` order via callback.
  void split_added(
      const std::string& text,
      bool normalized,
      const std::function<void(const std::string&, bool)>& on_text,
      const std::function<void(int64_t)>& on_token) const {
    size_t i = 0, piece = 0;
    while (i < text.size()) {
      const Added* best = nullptr;
      for (const auto& a : added) {
        if (a.normalized != normalized) {
          continue;
        }
        if (!a.match.empty() && text.compare(i, a.match.size(), a.match) == 0 &&
            (!best || a.match.size() > best->match.size())) {
          best = &a;
        }
      }
      if (!best) {
        i += char_len(text, i);
        continue;
      }
      size_t start = i, end = i + best->match.size();
      if (best->lstrip) {
        while (start > piece &&
               std::isspace(static_cast<unsigned char>(text[start - 1]))) {
          --start;
        }
      }
      if (best->rstrip) {
        while (end < text.size() &&
               std::isspace(static_cast<unsigned char>(text[end]))) {
          ++end;
        }
      }
      if (start > piece) {
        on_text(text.substr(piece, start - piece), piece == 0);
      }
      on_token(best->id);
      i = piece = end;
    }
    if (piece < text.size()) {
      on_text(text.substr(piece), piece == 0);
    }
  }

  std::string normalize(const std::string& s) const {
    std::string out = s;
    for (const auto& n : normalizers) {
      switch (n.kind) {
        case Norm::kNfc:
          for (size_t i = 0; i < out.size(); i += char_len(out, i)) {
            const auto cp = code_point(out, i);
            if (!nfc_invariant(cp)) {
              char hex[16];
              std::snprintf(hex, sizeof(hex), "U+%04X", cp);
              fail(
                  file,
                  "normalizer",
                  std::string("NFC is only supported on text it leaves "
                              "unchanged (ASCII, Latin, Greek, Cyrillic, CJK, "
                              "kana, Hangul syllables, symbols, emoji, no "
                              "combining marks); the text has ") +
                      hex);
            }
          }
          break;
        case Norm::kPrepend:
          if (!out.empty()) {
            out = n.text + out;
          }
          break;
        case Norm::kReplace:
          out = n.pattern.replace(out, n.text);
          break;
      }
    }
    return out;
  }

  struct Piece {
    std::string text;
    bool at_start;
  };

  std::vector<Piece> pre_tokenize(const std::string& s, bool at_start) const {
    std::vector<Piece> pieces{{s, at_start}};
    for (const auto& p : pre_tokenizers) {
      std::vector<Piece> next;
      for (auto& piece : pieces) {
        std::vector<std::string> parts;
        std::string t = piece.text;
        switch (p.kind) {
          case Pre::kByteLevel: {
            if (p.add_prefix_space && t.rfind(' ', 0) != 0) {
              t = " " + t;
            }
            parts = p.use_regex ? split_by(
                                      t,
                                      segments_of(t, gpt2->find_all(t)),
                                      Behavior::kIsolated,
                                      false)
                                : std::vector<std::string>{t};
            const auto& alpha = byte_alphabet();
            for (auto& part : parts) {
              std::string mapped;
              for (unsigned char c : part) {
                mapped += alpha.to_char[c];
              }
              part = mapped;
            }
            break;
          }
          case Pre::kSplit:
            parts = split_by(
                t, segments_of(t, p.pattern.find(t)), p.behavior, p.invert);
            break;
          case Pre::kMetaspace: {
            t = find_literal(t, " ").empty()
                    ? t
                    : Pattern{" ", nullptr}.replace(t, p.replacement);
            const bool starts = t.rfind(p.replacement, 0) == 0;
            if (!starts && (p.prepend_scheme == "always" ||
                            (p.prepend_scheme == "first" && piece.at_start))) {
              t = p.replacement + t;
            }
            parts = p.split
                        ? split_by(
                              t,
                              segments_of(t, find_literal(t, p.replacement)),
                              Behavior::kMergedWithNext,
                              false)
                        : std::vector<std::string>{t};
            break;
          }
          case Pre::kDigits: {
            std::vector<std::pair<size_t, size_t>> m;
            for (size_t i = 0; i < t.size(); ++i) {
              if (t[i] >= '0' && t[i] <= '9') {
                m.emplace_back(i, i + 1);
              }
            }
            parts = split_by(
                t,
                segments_of(t, m),
                p.individual_digits ? Behavior::kIsolated
                                    : Behavior::kContiguous,
                false);
            break;
          }
        }
        for (size_t k = 0; k < parts.size(); ++k) {
          if (!parts[k].empty()) {
            next.push_back({std::move(parts[k]), piece.at_start && k == 0});
          }
        }
      }
      pieces = std::move(next);
    }
    return pieces;
  }

  int64_t unk_id() const {
    const auto it = vocab.find(*unk_token);
    if (it == vocab.end()) {
      fail(
          file, "model.unk_token", dump(*unk_token) + " is not in model.vocab");
    }
    return it->second;
  }

  void bpe(const std::string& word, std::vector<int64_t>& out) const {
    if (ignore_merges) {
      const auto it = vocab.find(word);
      if (it != vocab.end()) {
        out.push_back(it->second);
        return;
      }
    }
    struct Sym {
      int64_t id;
      int64_t prev, next;
    };
    std::vector<Sym> syms;
    int64_t pending_unk = -1; // a <unk> not yet added (fuse_unk)
    const auto add = [&](int64_t id) {
      const int64_t n = syms.size();
      syms.push_back({id, n - 1, -1});
      if (n > 0) {
        syms[n - 1].next = n;
      }
    };
    for (size_t i = 0; i < word.size();) {
      const size_t n = char_len(word, i);
      const auto ch = word.substr(i, n);
      i += n;
      const auto it = vocab.find(ch);
      if (it != vocab.end()) {
        if (pending_unk >= 0) {
          add(pending_unk);
          pending_unk = -1;
        }
        add(it->second);
        continue;
      }
      if (byte_fallback) {
        bool all = true;
        for (unsigned char c : ch) {
          all = all && byte_ids[c] >= 0;
        }
        if (all) {
          // As in `tokenizers`, a pending unk stays pending across bytes.
          for (unsigned char c : ch) {
            add(byte_ids[c]);
          }
          continue;
        }
      }
      if (unk_token) {
        const int64_t u = unk_id();
        if (pending_unk >= 0 && !fuse_unk) {
          add(pending_unk);
        }
        pending_unk = u;
      }
    }
    if (pending_unk >= 0) {
      add(pending_unk);
    }
    // Merge the lowest-ranked pair, leftmost first, until none applies.
    using Entry = std::tuple<int64_t, int64_t, int64_t, int64_t>;
    std::priority_queue<Entry, std::vector<Entry>, std::greater<>> queue;
    const auto push = [&](int64_t pos) {
      const int64_t nx = syms[pos].next;
      if (nx < 0) {
        return;
      }
      const auto it = merges.find(key(syms[pos].id, syms[nx].id));
      if (it != merges.end()) {
        queue.emplace(it->second.first, pos, syms[pos].id, syms[nx].id);
      }
    };
    for (int64_t p = 0; p + 1 < static_cast<int64_t>(syms.size()); ++p) {
      push(p);
    }
    std::vector<bool> dead(syms.size(), false);
    while (!queue.empty()) {
      const auto [rank, pos, left, right] = queue.top();
      queue.pop();
      const int64_t nx = syms[pos].next;
      if (dead[pos] || syms[pos].id != left || nx < 0 || syms[nx].id != right) {
        continue;
      }
      syms[pos].id = merges.at(key(left, right)).second;
      dead[nx] = true;
      syms[pos].next = syms[nx].next;
      if (syms[pos].next >= 0) {
        syms[syms[pos].next].prev = pos;
      }
      if (syms[pos].prev >= 0) {
        push(syms[pos].prev);
      }
      push(pos);
    }
    for (int64_t p = syms.empty() ? -1 : 0; p >= 0; p = syms[p].next) {
      out.push_back(syms[p].id);
    }
  }

  // -- decoding --

  std::vector<std::string> decode_chain(std::vector<std::string> toks) const {
    for (const auto& d : decoders) {
      std::vector<std::string> next;
      switch (d.kind) {
        case Dec::kByteLevel: {
          // A token with a character outside the byte alphabet stays as its
          // own UTF-8 bytes.
          const auto& alpha = byte_alphabet();
          std::string bytes;
          for (const auto& t : toks) {
            std::string b;
            bool ok = true;
            for (size_t i = 0; i < t.size() && ok; i += char_len(t, i)) {
              const auto it = alpha.to_byte.find(code_point(t, i));
              ok = it != alpha.to_byte.end();
              if (ok) {
                b.push_back(static_cast<char>(it->second));
              }
            }
            bytes += ok ? b : t;
          }
          next.push_back(from_utf8_lossy(bytes));
          break;
        }
        case Dec::kMetaspace:
          for (size_t i = 0; i < toks.size(); ++i) {
            const auto& t = toks[i];
            std::string s;
            for (size_t k = 0; k < t.size();) {
              if (t.compare(k, d.text.size(), d.text) == 0) {
                if (!(i == 0 && d.prepend)) {
                  s.push_back(' ');
                }
                k += d.text.size();
              } else {
                const size_t n = char_len(t, k);
                s.append(t, k, n);
                k += n;
              }
            }
            next.push_back(std::move(s));
          }
          break;
        case Dec::kReplace:
          for (const auto& t : toks) {
            next.push_back(d.pattern.replace(t, d.text));
          }
          break;
        case Dec::kByteFallback: {
          std::string pending;
          size_t count = 0;
          const auto flush = [&] {
            if (count == 0) {
              return;
            }
            if (is_valid_utf8(pending)) {
              next.push_back(pending);
            } else {
              for (size_t k = 0; k < count; ++k) {
                next.emplace_back("\xEF\xBF\xBD");
              }
            }
            pending.clear();
            count = 0;
          };
          for (const auto& t : toks) {
            unsigned v = 0;
            const bool is_byte =
                t.size() == 6 && t.rfind("<0x", 0) == 0 && t[5] == '>' &&
                std::isxdigit(static_cast<unsigned char>(t[3])) &&
                std::isxdigit(static_cast<unsigned char>(t[4])) &&
                std::sscanf(t.c_str() + 3, "%2x", &v) == 1;
            if (is_byte) {
              pending.push_back(static_cast<char>(v));
              ++count;
            } else {
              flush();
              next.push_back(t);
            }
          }
          flush();
          break;
        }
        case Dec::kBpe: // the suffix ends a word: a space, none at the end
          for (size_t i = 0; i < toks.size(); ++i) {
            next.push_back(Pattern{d.text, nullptr}.replace(
                toks[i], i + 1 == toks.size() ? "" : " "));
          }
          break;
        case Dec::kFuse: {
          std::string all;
          for (const auto& t : toks) {
            all += t;
          }
          next.push_back(std::move(all));
          break;
        }
        case Dec::kStrip:
          for (const auto& t : toks) {
            std::vector<std::pair<size_t, size_t>> chars; // (offset, len)
            for (size_t k = 0; k < t.size(); k += char_len(t, k)) {
              chars.emplace_back(k, char_len(t, k));
            }
            const auto is_content = [&](size_t c) {
              return t.compare(chars[c].first, chars[c].second, d.text) == 0;
            };
            size_t a = 0, b = chars.size();
            for (size_t c = 0; c < std::min(d.start, chars.size()); ++c) {
              if (!is_content(c)) {
                break;
              }
              a = c + 1;
            }
            for (size_t c = 0; c < d.stop && c < chars.size(); ++c) {
              const size_t idx = chars.size() - c - 1;
              if (!is_content(idx)) {
                break;
              }
              b = idx;
            }
            next.push_back(
                a < b ? t.substr(
                            chars[a].first,
                            (b < chars.size() ? chars[b].first : t.size()) -
                                chars[a].first)
                      : std::string());
          }
          break;
      }
      toks = std::move(next);
    }
    return toks;
  }
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    throw std::runtime_error("tokenizer " + path + ": cannot open the file");
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return from_json_string(ss.str(), path);
}

Tokenizer Tokenizer::from_json_string(
    const std::string& text, const std::string& name) {
  auto impl = std::make_unique<Impl>();
  impl->file = name;
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail(name, "", std::string("not valid JSON (") + e.what() + ")");
  }
  if (!j.is_object() || !j.contains("model")) {
    fail(name, "model", "missing (not a tokenizer.json)");
  }
  try {
    impl->parse_model(j.at("model"));
    impl->parse_normalizer(j.value("normalizer", json()), "normalizer");
    impl->parse_pre_tokenizer(
        j.value("pre_tokenizer", json()), "pre_tokenizer");
    impl->parse_decoder(j.value("decoder", json()), "decoder");
    impl->parse_post_processor(
        j.value("post_processor", json()), "post_processor");
    if (j.contains("truncation") && !j.at("truncation").is_null()) {
      fail(
          name,
          "truncation",
          "is not supported, got " + dump(j.at("truncation")));
    }
    const auto& added = j.value("added_tokens", json::array());
    for (size_t i = 0; i < added.size(); ++i) {
      const auto& a = added[i];
      Impl::Added t;
      t.content = a.at("content").get<std::string>();
      t.id = a.at("id").get<int64_t>();
      t.special = a.value("special", false);
      t.normalized = a.value("normalized", !t.special);
      t.lstrip = a.value("lstrip", false);
      t.rstrip = a.value("rstrip", false);
      if (a.value("single_word", false)) {
        fail(
            name,
            "added_tokens[" + std::to_string(i) + "].single_word",
            "single_word tokens are not supported (" + dump(t.content) + ")");
      }
      t.match = t.normalized ? impl->normalize(t.content) : t.content;
      impl->id_to_added[t.id] = t.content;
      impl->added.push_back(std::move(t));
    }
  } catch (const json::exception& e) {
    fail(name, "", std::string("malformed (") + e.what() + ")");
  }
  int64_t size = 0;
  for (const auto& [tok, id] : impl->vocab) {
    size = std::max(size, id + 1);
  }
  for (const auto& a : impl->added) {
    size = std::max(size, a.id + 1);
  }
  impl->size = size;
  impl->id_to_token.assign(size, std::string());
  for (const auto& [tok, id] : impl->vocab) {
    if (id >= 0) {
      impl->id_to_token[id] = tok;
    }
  }
  // The end-of-sequence token: the template's last appended token, else a
  // special token with a well-known name.
  if (!impl->suffix.empty()) {
    impl->eos = impl->suffix.back();
  } else {
    static const char* kNames[] = {
        "</s>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<|eos|>",
        "<eos>",
        "<\xEF\xBD\x9C"
        "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>"};
    for (const char* n : kNames) {
      for (const auto& a : impl->added) {
        if (!impl->eos && a.special && a.content == n) {
          impl->eos = a.id;
        }
      }
    }
  }
  return Tokenizer(std::move(impl));
}

std::vector<int64_t> Tokenizer::encode(
    const std::string& text, bool add_special_tokens) const {
  const auto& m = *impl_;
  if (!is_valid_utf8(text)) {
    throw std::runtime_error(
        "tokenizer " + m.file + ": the text is not valid UTF-8");
  }
  std::vector<int64_t> ids;
  if (add_special_tokens) {
    ids = m.prefix;
  }
  const auto on_token = [&](int64_t id) { ids.push_back(id); };
  m.split_added(
      text,
      /*normalized=*/false,
      [&](const std::string& raw, bool at_start) {
        m.split_added(
            m.normalize(raw),
            /*normalized=*/true,
            [&](const std::string& s, bool first) {
              for (const auto& piece : m.pre_tokenize(s, at_start && first)) {
                m.bpe(piece.text, ids);
              }
            },
            on_token);
      },
      on_token);
  if (add_special_tokens) {
    ids.insert(ids.end(), m.suffix.begin(), m.suffix.end());
  }
  return ids;
}

std::string Tokenizer::decode(
    const std::vector<int64_t>& ids, bool skip_special_tokens) const {
  const auto& m = *impl_;
  std::vector<std::string> toks;
  for (const auto id : ids) {
    const auto it = m.id_to_added.find(id);
    if (it != m.id_to_added.end()) {
      if (skip_special_tokens) {
        const auto a = std::find_if(
            m.added.begin(), m.added.end(), [&](const Impl::Added& t) {
              return t.id == id;
            });
        if (a->special) {
          continue;
        }
      }
      toks.push_back(it->second);
    } else if (id >= 0 && id < m.size && !m.id_to_token[id].empty()) {
      toks.push_back(m.id_to_token[id]);
    }
  }
  if (!m.has_decoder) {
    std::string out;
    for (size_t i = 0; i < toks.size(); ++i) {
      out += (i ? " " : "") + toks[i];
    }
    return out;
  }
  std::string out;
  for (const auto& t : m.decode_chain(std::move(toks))) {
    out += t;
  }
  return out;
}

int64_t Tokenizer::vocab_size() const {
  return impl_->size;
}

std::optional<int64_t> Tokenizer::token_to_id(const std::string& token) const {
  for (const auto& a : impl_->added) {
    if (a.content == token) {
      return a.id;
    }
  }
  const auto it = impl_->vocab.find(token);
  return it == impl_->vocab.end() ? std::nullopt
                                  : std::optional<int64_t>(it->second);
}

std::optional<int64_t> Tokenizer::bos_id() const {
  return impl_->prefix.empty() ? std::nullopt
                               : std::optional<int64_t>(impl_->prefix.front());
}

std::optional<int64_t> Tokenizer::eos_id() const {
  return impl_->eos;
}

std::string Tokenizer::kind() const {
  return impl_->byte_level      ? "byte-level BPE"
         : impl_->byte_fallback ? "SentencePiece-style BPE (byte fallback)"
                                : "BPE";
}

} // namespace moeyard
