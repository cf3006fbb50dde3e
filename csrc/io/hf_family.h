#pragma once
// Internal to csrc/io/hf_*.cpp: the checkpoint families and a config.json
// reader whose errors name the file, the key and the value.

#include <c10/util/Exception.h>

#include <nlohmann/json.hpp>

#include <string>
#include <utility>
#include <vector>

namespace moeyard::io::detail {

// ---- config.json reading with errors naming file, key and value -----------

struct JsonReader {
  const nlohmann::json& j;
  std::string file;

  bool has(const std::string& key) const {
    return j.contains(key) && !j.at(key).is_null();
  }
  template <typename T>
  T get(const std::string& key, T fallback) const {
    if (!has(key)) {
      return fallback;
    }
    try {
      return j.at(key).get<T>();
    } catch (const std::exception&) {
      TORCH_CHECK(
          false,
          file,
          ": key '",
          key,
          "' has value ",
          j.at(key).dump(),
          " of the wrong type");
    }
    return fallback;
  }
  template <typename T>
  T need(const std::string& key) const {
    TORCH_CHECK(
        !j.contains(key) || !j.at(key).is_null(),
        file,
        ": key '",
        key,
        "' is null, which is not a value it can take");
    TORCH_CHECK(has(key), file, ": required key '", key, "' is missing");
    return get<T>(key, T{});
  }
  // A key whose only supported value is `ok` (or absent).
  template <typename T>
  void only(const std::string& key, const T& ok, const std::string& why) const {
    if (has(key)) {
      const T v = get<T>(key, ok);
      TORCH_CHECK(
          v == ok,
          file,
          ": key '",
          key,
          "' = ",
          j.at(key).dump(),
          " is not supported (",
          why,
          ")");
    }
  }
};

enum class Family {
  kMixtral,
  kQwen2Moe,
  kQwen3Moe,
  kOlmoe,
  kDeepseekV3,
  kGptOss
};

// The family of a model_type; an error naming the file and the supported
// families otherwise.
Family family_of(const std::string& model_type, const std::string& file);

// The attribute_map of the family's transformers config class: (alias, key)
// pairs, e.g. Mixtral's num_experts for num_local_experts.
std::vector<std::pair<std::string, std::string>> class_aliases(Family fam);

// config.json as the family's transformers config class sees it: aliases
// renamed to their keys, then the class default under every key that is
// absent (hf_config.cpp lists them; tests/python/test_hf_defaults.py checks
// them against transformers). A key present as null stays null: it is the
// class's None, read with the fallback at its use.
nlohmann::json with_class_defaults(const nlohmann::json& hf, Family fam);

} // namespace moeyard::io::detail
