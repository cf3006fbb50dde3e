// tokenizer.json into Tokenizer::Impl: the file, the model (BPE vocabulary
// and merges), added tokens and the assembly of the pipeline, whose
// components (normalizers, pre-tokenizers, decoders, post-processor) are
// read by tokenizer_load_pipeline.cpp; errors name the file, the field and
// the value.

#include <fstream>
#include <sstream>

#include "text/tokenizer_impl.h"

namespace moeyard {

using namespace text_detail;

// Token ids size id_to_token (largest id + 1 entries) and are packed two to a
// 64-bit merge key (Impl::key). The largest published vocabularies have
// ~262k tokens; 2^24 leaves room while bounding what a file can allocate.
constexpr int64_t kMaxTokenId = int64_t(1) << 24;

int64_t Tokenizer::Impl::token_id(
    const json& v, const std::string& file, const std::string& field) {
  const bool ok = v.is_number_unsigned()
                      ? v.get<uint64_t>() < static_cast<uint64_t>(kMaxTokenId)
                      : v.is_number_integer() && v.get<int64_t>() >= 0 &&
                            v.get<int64_t>() < kMaxTokenId;
  if (!ok) {
    fail(
        file,
        field,
        "token id " + dump(v) + " is not an integer in [0, " +
            std::to_string(kMaxTokenId) + ")");
  }
  return v.get<int64_t>();
}

void Tokenizer::Impl::parse_model(const json& m) {
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
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
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
    vocab[tok] = token_id(id, file, "model.vocab[" + dump(tok) + "]");
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
    const auto ia = vocab.find(a), ib = vocab.find(b), iab = vocab.find(a + b);
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
      t.id = Impl::token_id(
          a.at("id"), name, "added_tokens[" + std::to_string(i) + "].id");
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
  // Every id is in [0, kMaxTokenId) (token_id): the size is bounded. Ids
  // the template adds count too, so that checks of vocab_size() against a
  // model cover every id encode() can return.
  int64_t size = 0;
  for (const auto& [tok, id] : impl->vocab) {
    size = std::max(size, id + 1);
  }
  for (const auto& a : impl->added) {
    size = std::max(size, a.id + 1);
  }
  for (const auto id : impl->prefix) {
    size = std::max(size, id + 1);
  }
  for (const auto id : impl->suffix) {
    size = std::max(size, id + 1);
  }
  impl->size = size;
  impl->id_to_token.assign(size, std::string());
  for (const auto& [tok, id] : impl->vocab) {
    impl->id_to_token[id] = tok;
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

} // namespace moeyard
