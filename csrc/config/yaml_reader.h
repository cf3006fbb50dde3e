#pragma once
// Reads one YAML mapping into typed fields, remembering which keys it used,
// so that unknown keys, wrong types and bad values become errors that name
// the key path and the file line: "config: model.num_heads (tiny.yaml:7):
// expected an integer, got 'four'".

#include <yaml-cpp/yaml.h>

#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace moeyard::config {

class YamlReader {
 public:
  YamlReader(YAML::Node node, std::string path, std::string file = "");

  // Reads `key` into `out` if present (the default stays otherwise).
  void get(const char* key, int64_t& out);
  void get(const char* key, double& out);
  void get(const char* key, bool& out);
  void get(const char* key, std::string& out);
  void get(const char* key, std::vector<int64_t>& out);
  void get(const char* key, std::vector<std::string>& out);

  bool has(const char* key) const;
  // A nested mapping (an empty one if the key is absent).
  YamlReader child(const char* key);
  // A list of mappings (empty if the key is absent).
  std::vector<YamlReader> child_list(const char* key);
  // Errors on keys that no get()/child() asked for.
  void finish() const;

  // "path.key (file:line)" for error messages about a value already read.
  std::string where(const char* key) const;
  [[noreturn]] void fail(const char* key, const std::string& what) const;

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

  YAML::Node node_;
  std::string path_;
  std::string file_;
  std::set<std::string> used_;
  std::shared_ptr<Resolved> sink_;
};

} // namespace moeyard::config
