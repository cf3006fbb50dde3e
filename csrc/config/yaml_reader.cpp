#include "config/yaml_reader.h"

#include <c10/util/Exception.h>

#include <cstdio>
#include <cstdlib>

namespace moeyard::config {
namespace {

std::string location(const YAML::Node& n, const std::string& file) {
  const auto mark = n.Mark();
  if (mark.line < 0) {
    return file.empty() ? "" : " (" + file + ")";
  }
  return " (" + (file.empty() ? std::string("line ") : file + ":") +
         std::to_string(mark.line + 1) + ")";
}

std::string show(const YAML::Node& n) {
  if (n.IsScalar()) {
    return "'" + n.Scalar() + "'";
  }
  return n.IsSequence() ? "a list" : (n.IsMap() ? "a mapping" : "null");
}

std::string repr(int64_t v) {
  return std::to_string(v);
}
std::string repr(double v) { // the shortest text that reads back as v
  char buf[32];
  for (int digits = 6; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*g", digits, v);
    if (std::strtod(buf, nullptr) == v) {
      break;
    }
  }
  return buf;
}
std::string repr(bool v) {
  return v ? "true" : "false";
}
std::string repr(const std::string& v) {
  return v;
}
template <typename T>
std::string repr(const std::vector<T>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) {
    s += (i ? ", " : "") + repr(v[i]);
  }
  return s + "]";
}

} // namespace

template <typename T>
void YamlReader::note(const char* key, const T& value) {
  if (sink_) {
    (*sink_)[path_.empty() ? key : path_ + "." + key] = repr(value);
  }
}

YamlReader::YamlReader(YAML::Node node, std::string path, std::string file)
    : node_(std::move(node)), path_(std::move(path)), file_(std::move(file)) {
  TORCH_CHECK(
      !node_.IsDefined() || node_.IsNull() || node_.IsMap(),
      "config: ",
      path_,
      location(node_, file_),
      ": expected a mapping, got ",
      show(node_));
}

std::string YamlReader::where(const char* key) const {
  const std::string p = path_.empty() ? key : path_ + "." + key;
  if (node_.IsMap() && node_[key]) {
    return p + location(node_[key], file_);
  }
  return p + location(node_, file_);
}

void YamlReader::fail(const char* key, const std::string& what) const {
  TORCH_CHECK(false, "config: ", where(key), ": ", what);
}

bool YamlReader::has(const char* key) const {
  return node_.IsMap() && node_[key];
}

std::optional<YAML::Node> YamlReader::lookup(const char* key) {
  used_.insert(key);
  if (!node_.IsMap() || !node_[key]) {
    return std::nullopt;
  }
  return node_[key];
}

void YamlReader::get(const char* key, int64_t& out) {
  auto found = lookup(key);
  if (!found) {
    note(key, out);
    return;
  }
  const YAML::Node n = *found;
  try {
    TORCH_CHECK(n.IsScalar());
    const std::string s = n.Scalar();
    size_t used = 0;
    out = std::stoll(s, &used);
    TORCH_CHECK(used == s.size());
  } catch (...) {
    fail(key, "expected an integer, got " + show(n));
  }
  note(key, out);
}

void YamlReader::get(const char* key, double& out) {
  auto found = lookup(key);
  if (!found) {
    note(key, out);
    return;
  }
  const YAML::Node n = *found;
  try {
    TORCH_CHECK(n.IsScalar());
    const std::string s = n.Scalar();
    size_t used = 0;
    out = std::stod(s, &used);
    TORCH_CHECK(used == s.size());
  } catch (...) {
    fail(key, "expected a number, got " + show(n));
  }
  note(key, out);
}

void YamlReader::get(const char* key, bool& out) {
  auto found = lookup(key);
  if (!found) {
    note(key, out);
    return;
  }
  const YAML::Node n = *found;
  const std::string s = n.IsScalar() ? n.Scalar() : "";
  if (s == "true" || s == "True" || s == "yes") {
    out = true;
  } else if (s == "false" || s == "False" || s == "no") {
    out = false;
  } else {
    fail(key, "expected true or false, got " + show(n));
  }
  note(key, out);
}

void YamlReader::get(const char* key, std::string& out) {
  auto found = lookup(key);
  if (!found) {
    note(key, out);
    return;
  }
  const YAML::Node n = *found;
  if (!n.IsScalar()) {
    fail(key, "expected a string, got " + show(n));
  }
  out = n.Scalar();
  note(key, out);
}

void YamlReader::get(const char* key, std::vector<int64_t>& out) {
  auto found = lookup(key);
  if (!found) {
    note(key, out);
    return;
  }
  const YAML::Node n = *found;
  if (!n.IsSequence()) {
    fail(key, "expected a list of integers, got " + show(n));
  }
  out.clear();
  for (const auto& item : n) {
    try {
      out.push_back(std::stoll(item.Scalar()));
    } catch (...) {
      fail(key, "expected a list of integers, found " + show(item));
    }
  }
  note(key, out);
}

void YamlReader::get(const char* key, std::vector<std::string>& out) {
  auto found = lookup(key);
  if (!found) {
    note(key, out);
    return;
  }
  const YAML::Node n = *found;
  if (!n.IsSequence()) {
    fail(key, "expected a list of strings, got " + show(n));
  }
  out.clear();
  for (const auto& item : n) {
    if (!item.IsScalar()) {
      fail(key, "expected a list of strings, found " + show(item));
    }
    out.push_back(item.Scalar());
  }
  note(key, out);
}

YamlReader YamlReader::child(const char* key) {
  auto n = lookup(key);
  YamlReader r(
      n ? *n : YAML::Node(YAML::NodeType::Null),
      path_.empty() ? key : path_ + "." + key,
      file_);
  r.sink_ = sink_;
  return r;
}

std::vector<YamlReader> YamlReader::child_list(const char* key) {
  auto n = lookup(key);
  std::vector<YamlReader> out;
  if (!n) {
    return out;
  }
  if (!n->IsSequence()) {
    fail(key, "expected a list of mappings, got " + show(*n));
  }
  int i = 0;
  for (const auto& item : *n) {
    out.emplace_back(
        item,
        (path_.empty() ? std::string(key) : path_ + "." + key) + "[" +
            std::to_string(i++) + "]",
        file_);
    out.back().sink_ = sink_;
  }
  return out;
}

void YamlReader::finish() const {
  if (!node_.IsMap()) {
    return;
  }
  for (const auto& kv : node_) {
    const std::string k = kv.first.as<std::string>();
    if (!used_.count(k)) {
      std::string known;
      for (const auto& u : used_) {
        known += (known.empty() ? "" : ", ") + u;
      }
      TORCH_CHECK(
          false,
          "config: ",
          path_.empty() ? k : path_ + "." + k,
          location(kv.first, file_),
          ": unknown key (known keys: ",
          known,
          ")");
    }
  }
}

} // namespace moeyard::config
