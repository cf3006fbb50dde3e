// Encoding (text to ids): added tokens, normalizers, pre-tokenizers, BPE
// merges, the post-processor's template; plus the Tokenizer's accessors.
// Decoding is in tokenizer_decode.cpp, loading in tokenizer_load*.cpp.

#include "text/tokenizer.h"

#include <utf8proc.h>

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <queue>

#include "text/tokenizer_impl.h"

namespace moeyard {

using namespace text_detail;

uint64_t Tokenizer::Impl::key(int64_t a, int64_t b) {
  return (static_cast<uint64_t>(a) << 32) | static_cast<uint64_t>(b);
}

// -- encoding --
// Splits pieces at added tokens (only those with the given `normalized`
// flag), leftmost longest. Tokens become ids in `out` order via callback.
void Tokenizer::Impl::split_added(
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

std::string Tokenizer::Impl::normalize(const std::string& s) const {
  std::string out = s;
  for (const auto& n : normalizers) {
    switch (n.kind) {
      case Norm::kUnicode: {
        utf8proc_uint8_t* mapped = nullptr;
        const auto len = utf8proc_map(
            reinterpret_cast<const utf8proc_uint8_t*>(out.data()),
            static_cast<utf8proc_ssize_t>(out.size()),
            &mapped,
            static_cast<utf8proc_option_t>(n.form));
        if (len < 0) {
          fail(
              file,
              "normalizer",
              n.text + " normalization failed: " + utf8proc_errmsg(len));
        }
        out.assign(reinterpret_cast<const char*>(mapped), len);
        std::free(mapped);
        break;
      }
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

auto Tokenizer::Impl::pre_tokenize(const std::string& s, bool at_start) const
    -> std::vector<Piece> {
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
          parts = p.split ? split_by(
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
              p.individual_digits ? Behavior::kIsolated : Behavior::kContiguous,
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

int64_t Tokenizer::Impl::unk_id() const {
  const auto it = vocab.find(*unk_token);
  if (it == vocab.end()) {
    fail(file, "model.unk_token", dump(*unk_token) + " is not in model.vocab");
  }
  return it->second;
}

void Tokenizer::Impl::bpe(
    const std::string& word, std::vector<int64_t>& out) const {
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

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

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
