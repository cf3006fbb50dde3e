// The Hugging Face checkpoint families. Adding one: a file in this folder
// that defines `HfFamily <name>_family()` (see mixtral.cpp), and one line in
// the list below.

#include "io/hf/family.h"

// clang-format off
#define MOEYARD_HF_FAMILIES(X) \
  X(mixtral)                   \
  X(qwen2_moe)                 \
  X(qwen3_moe)                 \
  X(olmoe)                     \
  X(deepseek_v3)               \
  X(gpt_oss)
// clang-format on

namespace moeyard::io::hf {

#define MOEYARD_DECLARE_FAMILY(name) HfFamily name##_family();
MOEYARD_HF_FAMILIES(MOEYARD_DECLARE_FAMILY)
#undef MOEYARD_DECLARE_FAMILY

const std::vector<HfFamily>& all_families() {
#define MOEYARD_LIST_FAMILY(name) name##_family(),
  static const std::vector<HfFamily> all = {
      MOEYARD_HF_FAMILIES(MOEYARD_LIST_FAMILY)};
#undef MOEYARD_LIST_FAMILY
  return all;
}

const HfFamily& family_of(
    const std::string& model_type, const std::string& file) {
  const HfFamily* found = nullptr;
  std::string names;
  for (const HfFamily& f : all_families()) {
    if (f.model_type == model_type) {
      found = &f;
    }
    names += (names.empty() ? "" : ", ") + f.model_type;
  }
  TORCH_CHECK(
      found != nullptr,
      file,
      ": model_type '",
      model_type,
      "' has no importer; supported: ",
      names);
  return *found;
}

nlohmann::json with_class_defaults(
    const nlohmann::json& hf, const HfFamily& family) {
  nlohmann::json out = hf;
  for (const auto& [alias, key] : family.aliases) {
    if (out.contains(alias) && !out.contains(key)) {
      out[key] = out.at(alias);
    }
  }
  for (const auto& [key, value] : family.defaults.items()) {
    if (!out.contains(key)) {
      out[key] = value;
    }
  }
  if (family.derived_defaults) {
    family.derived_defaults(out);
  }
  return out;
}

} // namespace moeyard::io::hf
