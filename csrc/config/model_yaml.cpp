#include "config/model_yaml.h"

#include <c10/util/Exception.h>
#include <yaml-cpp/yaml.h>

#include "model/config_fields.h"

namespace moeyard::config {

void read_model_fields(YamlReader& r, ModelConfig& c) {
  model_fields(c, [&](const char* key, auto& v, const auto&... range) {
    r.get(key, v, range...);
  });
}

void read_model_field(YamlReader& r, ModelConfig& c, const char* key) {
  model_fields(c, [&](const char* k, auto& v, const auto&... range) {
    if (std::string(k) == key) {
      r.get(k, v, range...);
    }
  });
}

void read_moe_config(YamlReader r, MoEConfig& m) {
  moe_fields(m, [&](const char* key, auto& v, const auto&... range) {
    r.get(key, v, range...);
  });
  r.finish();
}

ModelConfig model_config_from_yaml(
    const YAML::Node& node, const std::string& path, const std::string& file) {
  ModelConfig c;
  YamlReader r(node, path, file);
  read_model_fields(r, c);
  read_moe_config(r.child("moe"), c.moe);
  r.finish();
  // "model.num_heads" is `num_heads` here, "moe.top_k" `moe.top_k`.
  c.validate([&](const std::string& key) {
    const bool model = key.rfind("model.", 0) == 0;
    const std::string loc = r.locate(model ? key.substr(6) : key);
    return key + (loc.empty() ? " (default)" : loc);
  });
  return c;
}

ModelConfig model_config_from_yaml_string(const std::string& text) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    TORCH_CHECK(false, "config: cannot parse YAML: ", e.what());
  }
  return model_config_from_yaml(root, "");
}

ModelConfig model_config_from_yaml_file(const std::string& file) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(file);
  } catch (const YAML::Exception& e) {
    TORCH_CHECK(false, "config: cannot read ", file, ": ", e.what());
  }
  return model_config_from_yaml(root, "", file);
}

} // namespace moeyard::config
