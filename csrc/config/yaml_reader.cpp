// YamlReader (typed, range-checked reads of one YAML mapping, with --set
// overrides and the file line in every error) and Sources; Range and
// check_range are in range.cpp.

#include "config/yaml_reader.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <sstream>

namespace moeyard::config {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

std::string show(const YAML::Node& n) {
  if (n.IsScalar()) {
    return "'" + n.Scalar() + "'";
  }
  return n.IsSequence() ? "a list" : (n.IsMap() ? "a mapping" : "null");
}

// An integer scalar (the whole text), else nullopt.
std::optional<int64_t> parse_int(const YAML::Node& n) {
  if (!n.IsScalar()) {
    return std::nullopt;
  }
  const std::string& s = n.Scalar();
  try {
    size_t used = 0;
    const int64_t v = std::stoll(s, &used);
    if (used == s.size()) {
      return v;
    }
  } catch (...) {
  }
  return std::nullopt;
}

// A number scalar (the whole text; also YAML's .inf, -.inf and .nan, which
// no range contains), else nullopt.
std::optional<double> parse_double(const YAML::Node& n) {
  if (!n.IsScalar()) {
    return std::nullopt;
  }
  std::string s = n.Scalar();
  const bool neg = !s.empty() && s[0] == '-';
  const std::string body = s.substr(!s.empty() && (s[0] == '-' || s[0] == '+'));
  if (body == ".inf" || body == ".Inf" || body == ".INF") {
    return neg ? -kInf : kInf;
  }
  if (s == ".nan" || s == ".NaN" || s == ".NAN") {
    return std::numeric_limits<double>::quiet_NaN();
  }
  try {
    size_t used = 0;
    const double v = std::stod(s, &used);
    if (used == s.size()) {
      return v;
    }
  } catch (...) {
  }
  return std::nullopt;
}

std::string join(const std::string& path, const std::string& key) {
  return path.empty() ? key : path + "." + key;
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
    (*sink_)[full(key)] = repr(value);
  }
}

// ---- Sources ----------------------------------------------------------------

void Sources::add_override(const std::string& path, const std::string& kv) {
  for (auto it = overrides.begin(); it != overrides.end();) {
    const std::string& p = it->first;
    const bool below = p.size() > path.size() &&
                       p.compare(0, path.size(), path) == 0 &&
                       (p[path.size()] == '.' || p[path.size()] == '[');
    it = below ? overrides.erase(it) : std::next(it);
  }
  overrides[path] = kv;
}

const std::string* Sources::override_of(const std::string& path) const {
  // The most specific first: path itself, then the mappings above it.
  for (size_t end = path.size(); end > 0;) {
    const auto it = overrides.find(path.substr(0, end));
    if (it != overrides.end()) {
      return &it->second;
    }
    const auto cut = path.find_last_of(".[", end - 1);
    if (cut == std::string::npos || cut == 0) {
      break;
    }
    end = cut;
  }
  return nullptr;
}

// ---- YamlReader -------------------------------------------------------------

YamlReader::YamlReader(YAML::Node node, std::string path, std::string file)
    : YamlReader(
          std::move(node),
          std::move(path),
          std::make_shared<const Sources>(Sources{std::move(file), {}})) {}

YamlReader::YamlReader(
    YAML::Node node, std::string path, std::shared_ptr<const Sources> sources)
    : node_(std::move(node)),
      path_(std::move(path)),
      sources_(std::move(sources)) {
  TORCH_CHECK(
      !node_.IsDefined() || node_.IsNull() || node_.IsMap(),
      "config: ",
      path_,
      location(node_, path_),
      ": expected a mapping, got ",
      show(node_));
}

std::string YamlReader::full(const std::string& key) const {
  return join(path_, key);
}

std::string YamlReader::location(
    const YAML::Node& n, const std::string& path) const {
  if (const std::string* kv = sources_->override_of(path)) {
    return " (--set " + *kv + ")";
  }
  const std::string& file = sources_->file;
  const auto mark = n.Mark();
  if (mark.line < 0) {
    return file.empty() ? "" : " (" + file + ")";
  }
  return " (" + (file.empty() ? std::string("line ") : file + ":") +
         std::to_string(mark.line + 1) + ")";
}

std::string YamlReader::where(const std::string& key) const {
  const std::string p = full(key);
  if (node_.IsMap() && node_[key]) {
    return p + location(node_[key], p);
  }
  return p + location(node_, path_);
}

std::string YamlReader::locate(const std::string& dotted) const {
  const std::string p = full(dotted);
  if (sources_->override_of(p)) {
    return location(node_, p);
  }
  YAML::Node cur = node_;
  std::stringstream parts(dotted);
  std::string part;
  while (std::getline(parts, part, '.')) {
    if (!cur.IsMap()) {
      return "";
    }
    const YAML::Node& c = cur;
    YAML::Node next = c[part];
    if (!next.IsDefined()) {
      return "";
    }
    cur.reset(next);
  }
  return location(cur, p);
}

void YamlReader::fail(const std::string& key, const std::string& what) const {
  TORCH_CHECK(false, "config: ", where(key), ": ", what);
}

bool YamlReader::has(const char* key) const {
  return node_.IsMap() && node_[key];
}

bool YamlReader::given() const {
  return node_.IsDefined() && !node_.IsNull();
}

std::optional<YAML::Node> YamlReader::lookup(const char* key) {
  used_.insert(key);
  if (!node_.IsMap() || !node_[key]) {
    return std::nullopt;
  }
  return node_[key];
}

void YamlReader::get(const char* key, int64_t& out, const Range& range) {
  auto found = lookup(key);
  if (!found) {
    note(key, out);
    return;
  }
  const auto v = parse_int(*found);
  if (!v) {
    fail(key, "expected an integer, got " + show(*found));
  }
  if (!range.contains(static_cast<double>(*v))) {
    fail(key, found->Scalar() + " is outside " + range.str());
  }
  out = *v;
  note(key, out);
}

void YamlReader::get(const char* key, double& out, const Range& range) {
  auto found = lookup(key);
  if (!found) {
    note(key, out);
    return;
  }
  const auto v = parse_double(*found);
  if (!v) {
    fail(key, "expected a number, got " + show(*found));
  }
  if (!range.contains(*v)) {
    fail(key, found->Scalar() + " is outside " + range.str());
  }
  out = *v;
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

void YamlReader::get(
    const char* key, std::vector<int64_t>& out, const Range& each) {
  auto found = lookup(key);
  if (!found) {
    note(key, out);
    return;
  }
  const YAML::Node n = *found;
  if (!n.IsSequence()) {
    fail(key, "expected a list of integers, got " + show(n));
  }
  std::vector<int64_t> values;
  for (const auto& item : n) {
    const auto v = parse_int(item);
    if (!v) {
      fail(key, "expected a list of integers, found " + show(item));
    }
    if (!each.contains(static_cast<double>(*v))) {
      fail(key, "entry " + item.Scalar() + " is outside " + each.str());
    }
    values.push_back(*v);
  }
  out = std::move(values);
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
  YamlReader r(n ? *n : YAML::Node(YAML::NodeType::Null), full(key), sources_);
  r.sink_ = sink_;
  return r;
}

std::vector<YamlReader> YamlReader::child_list(const char* key) {
  auto n = lookup(key);
  std::vector<YamlReader> out;
  if (!n || n->IsNull()) {
    return out;
  }
  if (!n->IsSequence()) {
    fail(key, "expected a list of mappings, got " + show(*n));
  }
  int i = 0;
  for (const auto& item : *n) {
    out.emplace_back(
        item, full(key) + "[" + std::to_string(i++) + "]", sources_);
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
          full(k),
          location(kv.first, full(k)),
          ": unknown key (known keys: ",
          known,
          ")");
    }
  }
}

} // namespace moeyard::config
