#pragma once
// The compute dtypes a config names (model.dtype) and their ScalarType. The
// model, attention and the Hugging Face exporter all read names through
// parse_dtype, so the list of accepted names lives here only.

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace moeyard {

// The accepted names, as model.dtype's check lists them.
inline const std::vector<std::string>& dtype_names() {
  static const std::vector<std::string> names = {
      "float32", "bfloat16", "float64"};
  return names;
}

// "float32" -> kFloat, "bfloat16" -> kBFloat16, "float64" -> kDouble;
// any other name is an error.
inline at::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32") {
    return at::kFloat;
  }
  if (name == "bfloat16") {
    return at::kBFloat16;
  }
  TORCH_CHECK(
      name == "float64",
      "config: model.dtype must be float32, bfloat16 or float64, got '",
      name,
      "'");
  return at::kDouble;
}

} // namespace moeyard
