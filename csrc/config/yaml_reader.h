#pragma once
// Reads one YAML mapping into typed fields, remembering which keys it used,
// so that unknown keys, wrong types and bad values become errors that name
// the key path, where the value was given and, for numbers, the valid range:
//   config: optim.beta1 (tiny.yaml:12): 1.5 is outside [0, 1)
//   config: train.steps (--set train.steps=many): expected an integer, got
//   'many'
// Every number is read with its Range, so a field's valid values are
// declared once, at the read; NaN and infinities are outside every range.

#include <yaml-cpp/yaml.h>

#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "config/range.h"

namespace moeyard::config {

// Where a config's values came from: the file, and the key paths that
// `--set key=value` replaced, which messages cite instead of a file line.
struct Sources {
  std::string file;
  std::map<std::string, std::string> overrides; // "a.b" -> "a.b=value"

  // Records `--set path=...` (`kv` the whole argument); it replaces any
  // earlier override below `path`.
  void add_override(const std::string& path, const std::string& kv);
  // The override that gave the value at `path` (itself or a mapping above
  // it), if any.
  const std::string* override_of(const std::string& path) const;
};

class YamlReader {
 public:
  YamlReader(YAML::Node node, std::string path, std::string file = "");
  YamlReader(
      YAML::Node node,
      std::string path,
      std::shared_ptr<const Sources> sources);

  // Reads `key` into `out` if present (the default stays otherwise); a
  // number outside `range` is an error naming the key, value and range.
  void get(const char* key, int64_t& out, const Range& range);
  void get(const char* key, double& out, const Range& range);
  void get(const char* key, std::vector<int64_t>& out, const Range& each);
  void get(const char* key, bool& out);
  void get(const char* key, std::string& out);
  void get(const char* key, std::vector<std::string>& out);

  bool has(const char* key) const;
  // Whether this mapping was given: an absent key and a null value (e.g.
  // `--set schedule.top_k=null`) both read as not given.
  bool given() const;
  // Whether this value is a mapping.
  bool is_map() const {
    return node_.IsMap();
  }
  // A nested mapping (an empty one if the key is absent).
  YamlReader child(const char* key);
  // A list of mappings (empty if the key is absent).
  std::vector<YamlReader> child_list(const char* key);
  // Errors on keys that no get()/child() asked for.
  void finish() const;

  // "path.key (file:line)" or "path.key (--set path.key=value)" for error
  // messages about a value already read; an absent key cites this mapping.
  std::string where(const std::string& key) const;
  // " (file:line)" or " (--set a.b=value)" for the value at the dotted path
  // `dotted` below this mapping; "" when it was not given.
  std::string locate(const std::string& dotted) const;
  [[noreturn]] void fail(const std::string& key, const std::string& what) const;

  // Every value read through this reader and the readers it hands out,
  // resolved (a default when the key is absent), by key path
  // ("optim.lr" -> "0.003"): what a checkpoint records of its config.
  using Resolved = std::map<std::string, std::string>;
  void record_into(std::shared_ptr<Resolved> sink) {
    sink_ = std::move(sink);
  }

 private:
  template <typename T>
  void note(const char* key, const T& value);
  std::optional<YAML::Node> lookup(const char* key);
  std::string full(const std::string& key) const;
  std::string location(const YAML::Node& n, const std::string& path) const;

  YAML::Node node_;
  std::string path_;
  std::shared_ptr<const Sources> sources_;
  std::set<std::string> used_;
  std::shared_ptr<Resolved> sink_;
};

} // namespace moeyard::config
