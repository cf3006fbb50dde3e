// Decoding (ids to text): the tokens of the ids, then the decoder chain of
// tokenizer.json (ByteLevel, Metaspace, Replace, ByteFallback, BPE suffix,
// Fuse, Strip). Encoding is in tokenizer.cpp, loading in tokenizer_load.cpp.

#include <algorithm>
#include <cctype>
#include <cstdio>

#include "text/tokenizer_impl.h"

namespace moeyard {

using namespace text_detail;

std::vector<std::string> Tokenizer::Impl::decode_chain(
    std::vector<std::string> toks) const {
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

} // namespace moeyard
