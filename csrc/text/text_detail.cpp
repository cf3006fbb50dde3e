#include "text/text_detail.h"

namespace moeyard::text_detail {

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

// ---- errors
// -------------------------------------------------------------------

[[noreturn]] void fail(
    const std::string& file, const std::string& field, const std::string& msg) {
  throw std::runtime_error(
      "tokenizer " + file + ": " + field + (field.empty() ? "" : ": ") + msg);
}

namespace {

// Whether `v` nests more than `limit` levels, found without recursion (a
// crafted file may nest a million levels; json::dump recurses per level).
bool nested_deeper_than(const json& v, size_t limit) {
  std::vector<std::pair<const json*, size_t>> stack{{&v, 1}};
  while (!stack.empty()) {
    const auto [p, depth] = stack.back();
    stack.pop_back();
    if (depth > limit) {
      return true;
    }
    if (p->is_structured()) {
      for (const auto& child : *p) {
        stack.emplace_back(&child, depth + 1);
      }
    }
  }
  return false;
}

} // namespace

std::string dump(const json& v) {
  if (nested_deeper_than(v, 64)) {
    return std::string("a JSON ") + v.type_name() +
           " nested more than 64 levels deep";
  }
  auto s = v.dump();
  return s.size() > 120 ? s.substr(0, 117) + "..." : s;
}

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

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet a;
  return a;
}

const char* const kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|"
    "\\s+(?!\\S)|\\s+";

} // namespace moeyard::text_detail
