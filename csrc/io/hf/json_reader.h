#pragma once
// Internal to the Hugging Face import: a config.json reader whose errors
// name the file, the key and the value.

#include <c10/util/Exception.h>

#include <nlohmann/json.hpp>

#include <string>

namespace moeyard::io::hf {

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

} // namespace moeyard::io::hf
