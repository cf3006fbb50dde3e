// The pipeline components of tokenizer.json into Tokenizer::Impl:
// normalizers, pre-tokenizers, decoders and the post-processor (the model and
// the file itself: tokenizer_load.cpp); errors name the file, the field and
// the value.

#include <utf8proc.h>

#include "text/tokenizer_impl.h"

namespace moeyard {

using namespace text_detail;

namespace {

// An optional count (Strip's start/stop): an integer >= 0.
size_t count_field(
    const json& j,
    const char* key,
    const std::string& file,
    const std::string& field) {
  if (!j.contains(key)) {
    return 0;
  }
  const json& v = j.at(key);
  if (!v.is_number_unsigned() &&
      !(v.is_number_integer() && v.get<int64_t>() >= 0)) {
    fail(file, field + "." + key, "expected an integer >= 0, got " + dump(v));
  }
  return static_cast<size_t>(v.get<uint64_t>());
}

} // namespace

void Tokenizer::Impl::parse_normalizer(
    const json& j, const std::string& field) {
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
  } else if (
      type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
    // Canonical (compatibility with K) decomposition, then composition
    // for the C forms; utf8proc's STABLE keeps unassigned code points.
    int form = UTF8PROC_STABLE;
    form |=
        type[type.size() - 1] == 'C' ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE;
    form |= type.size() == 4 ? UTF8PROC_COMPAT : 0;
    normalizers.push_back({Norm::kUnicode, type, {}, form});
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
            " (supported: NFC, NFD, NFKC, NFKD, Prepend, Replace, Sequence)");
  }
}

void Tokenizer::Impl::parse_pre_tokenizer(
    const json& j, const std::string& field) {
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
      p.prepend_scheme = j.value("add_prefix_space", true) ? "always" : "never";
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

void Tokenizer::Impl::parse_decoder(const json& j, const std::string& field) {
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
    d.start = count_field(j, "start", file, field);
    d.stop = count_field(j, "stop", file, field);
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

void Tokenizer::Impl::parse_post_processor(
    const json& j, const std::string& field) {
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
      const auto& ids = st.at(name).at("ids");
      for (size_t k = 0; k < ids.size(); ++k) {
        (seen_a ? suffix : prefix)
            .push_back(token_id(
                ids[k],
                file,
                field + ".special_tokens[" + dump(name) + "].ids[" +
                    std::to_string(k) + "]"));
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

} // namespace moeyard
